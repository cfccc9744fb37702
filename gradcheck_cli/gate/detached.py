"""Layers cut off from the gradient: the loss depends on them, yet no gradient reaches them.

The probe turns ``requires_grad`` on for every parameter, so a layer that ran and got no gradient
at all is either unused by the loss (a second output head the loss is not taken from: nothing to
report) or detached (``.detach()``, ``torch.no_grad()``, a ``.data`` round trip on the way: the
layer shapes the loss but never learns). The two are told apart by evidence: the probe runs once
more with those layers' weights doubled, and a layer whose change moves the loss is detached.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from gradcheck_cli.records import Report, RowKind

if TYPE_CHECKING:
    from gradcheck_cli.model.handle import LoadedModel
    from gradcheck_cli.options import ProbeOptions

# Rows tried one by one; more gradient-less rows than this are a model whose loss uses few of its
# layers (a multi-head model), where one run per row would cost more than the answer is worth.
MAX_TRIED = 8
# Relative change of the loss that counts as "depends on it" (float32 noise is ~1e-7).
_CHANGED = 1e-5


def find_detached(loaded: LoadedModel, probe: ProbeOptions, report: Report) -> frozenset[str]:
    """Names of the parameter rows the loss depends on although they received no gradient."""
    base = report.probe.loss_value
    suspects = [
        row for row in report.layers if row.kind is RowKind.PARAM and row.grad is not None and row.grad.norm is None
    ]
    if base is None or not suspects or len(suspects) > MAX_TRIED:
        return frozenset()
    modules = dict(loaded.module.named_modules())
    found: set[str] = set()
    tried: set[str] = set()
    for row in suspects:
        if row.module in tried or row.module not in modules:
            continue
        tried.add(row.module)
        loss = _loss_with_doubled(loaded, probe, modules[row.module])
        if loss is not None and abs(loss - base) > _CHANGED * max(abs(base), 1e-12):
            found.update(r.name for r in suspects if r.module == row.module)
    return frozenset(found)


def _loss_with_doubled(loaded: LoadedModel, probe: ProbeOptions, module: object) -> float | None:
    import torch

    from gradcheck_cli.probe.entry import inspect_loaded

    assert isinstance(module, torch.nn.Module)
    own = [p for p in module.parameters(recurse=False) if p.dtype.is_floating_point]
    saved = [p.detach().clone() for p in own]
    try:
        with torch.no_grad():
            for p in own:
                p.mul_(2.0).add_(0.1)  # doubling alone leaves a zero weight at zero
        loss = inspect_loaded(loaded, probe).probe.loss_value
        return loss if loss is not None and math.isfinite(loss) else None
    finally:
        with torch.no_grad():
            for p, value in zip(own, saved, strict=True):
                p.copy_(value)
