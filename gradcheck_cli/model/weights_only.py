"""Weights-only loading forced on every ``torch.load``, including the ones other libraries make."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


@contextlib.contextmanager
def forced_weights_only(enabled: bool) -> Iterator[None]:
    """Make every torch.load in the block weights-only (torch reads this variable on each call).

    Process-wide while it lasts: gradcheck loads one model at a time on one thread.
    """
    if not enabled:
        yield
        return
    saved = {key: os.environ.get(key) for key in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
