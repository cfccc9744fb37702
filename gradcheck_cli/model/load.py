"""``load_model``: any supported PyTorch model file, as :class:`LoadOptions` describe it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from gradcheck_cli.errors import LoadError
from gradcheck_cli.options import LoadOptions

if TYPE_CHECKING:
    from gradcheck_cli.model.handle import LoadedModel


def load_model(path: Path, options: LoadOptions | None = None, *, device: str = "cpu") -> LoadedModel:
    """Load any supported PyTorch model file (its format detected from its content). Weights that
    hold NaN/Inf are refused unless ``allow_nonfinite``."""
    from gradcheck_cli.model.torch_load import model_from_path

    options = options or LoadOptions()
    loaded = model_from_path(
        path,
        arch=options.arch,
        arch_kwargs=dict(options.arch_kwargs or {}) or None,
        strict=not options.non_strict,
        trust_pickle=options.trust_pickle,
        device=device,
    )
    if not options.allow_nonfinite:
        check_finite_weights(loaded)
        loaded.weights_finite = True
    return loaded


def check_finite_weights(loaded: LoadedModel) -> None:
    """Refuse weights with NaN/Inf: every statistic downstream of them would be meaningless."""
    import torch

    from gradcheck_cli.torch_util import all_finite, open_bound

    buffers = {name for name, _ in loaded.module.named_buffers()}
    for name, tensor in list(loaded.module.named_parameters()) + list(loaded.module.named_buffers()):
        if not tensor.dtype.is_floating_point or tensor.numel() == 0:
            continue
        if not all_finite(tensor):
            owner_path, _, leaf = name.rpartition(".")
            if name in buffers and open_bound(loaded.module.get_submodule(owner_path), leaf):
                continue
            bad = int((~torch.isfinite(tensor)).sum())
            raise LoadError(
                f"{loaded.path}: '{name}' holds {bad} NaN/Inf value(s) of {tensor.numel()}",
                hint="restore a checkpoint from before training diverged, or set `allow_nonfinite` to probe it anyway",
            )
