"""Data-free init scale: each layer's weight variance against what its init formula prescribes.

The formula is picked by the activation that *actually follows* the layer in the probe's row
order (docs/theory.md#initialisation-schemes): He after the ReLU family (with the leaky slope), LeCun before
SELU, Glorot after tanh/sigmoid or when no activation follows. Norm rows between a layer and
its activation (conv -> BN -> ReLU) are skipped over, because the normalisation does not change
which nonlinearity the layer's output ends up in. Fans and gains come from
:mod:`gradcheck_cli.rewrite.init_math`, the same maths ``reinit`` draws from, so a layer that
``reinit`` wrote measures ~1.0 here.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from gradcheck_cli.records import InitScale, LayerStats, Report, RowKind
from gradcheck_cli.rewrite.init_math import (
    WeightLayout,
    auto_scheme,
    default_mode,
    fans,
    scheme_gain,
)

if TYPE_CHECKING:
    from torch import nn

# F.leaky_relu's default slope: a functional call's own slope is not recorded by the probe.
_FUNCTIONAL_LEAKY_SLOPE = 0.01
_LEAKY = ("leaky_relu", "prelu", "rrelu")


def following_activation(rows: tuple[LayerStats, ...], index: int) -> LayerStats | None:
    """The activation row that consumes row ``index``'s output, or None when another layer
    comes first (no activation: the layer is linear up to the next one)."""
    for row in rows[index + 1 :]:
        if row.kind is RowKind.ACTIVATION:
            return row
        if row.kind is not RowKind.NORM:
            return None
    return None


def with_init_scales(report: Report, module: nn.Module) -> Report:
    """``report`` with ``init`` filled on every Linear/Conv/ConvTranspose row whose module can be
    found in ``module`` (rows of graph-instrumented models may not map to modules: None)."""
    rows = list(report.layers)
    # A lookup table rather than get_submodule, which ScriptModules refuse: their submodules are
    # then simply not Linear/Conv instances and are skipped.
    modules = dict(module.named_modules())
    seen: set[str] = set()
    for index, row in enumerate(report.layers):
        if row.kind is not RowKind.PARAM or row.module in seen:
            continue
        seen.add(row.module)  # a module called twice has one weight: measure it at its first call
        activation = following_activation(report.layers, index)
        scale = _init_scale(modules, row, activation)
        if scale is not None:
            rows[index] = replace(row, init=scale)
    return replace(report, layers=tuple(rows))


def _init_scale(
    modules: dict[str, nn.Module], row: LayerStats, activation: LayerStats | None
) -> InitScale | None:
    import torch
    from torch import nn
    from torch.nn.modules.conv import _ConvNd

    layer = modules.get(row.module)
    weight = getattr(layer, "weight", None)
    if (
        not isinstance(weight, torch.Tensor)
        or weight.dim() < 2
        or not weight.dtype.is_floating_point
    ):
        return None
    if isinstance(layer, nn.Linear):
        layout, groups = WeightLayout.OUT_IN, 1
    elif isinstance(layer, _ConvNd):
        layout = WeightLayout.CONV_TRANSPOSE if layer.transposed else WeightLayout.CONV
        groups = int(layer.groups)
    else:
        return None  # embeddings, recurrent and attention weights follow other conventions
    fan = fans(tuple(weight.shape), layout=layout, groups=groups)
    fn = activation.fn if activation is not None else None
    scheme, _why = auto_scheme(fn)  # He / LeCun (SELU) / Glorot, as reinit's 'auto' picks
    slope = _slope(modules, activation) if fn in _LEAKY else None
    gain = scheme_gain(scheme, fn, slope=slope)
    expected = gain * gain / fan.pick(default_mode(scheme))
    with torch.no_grad():
        finite = weight.detach()[torch.isfinite(weight.detach())].double()
        if not finite.numel():
            return None  # all NaN/Inf: GC001 reports the tensor; a variance would say nothing
        measured = float(finite.var(unbiased=False))
    return InitScale(
        scheme=str(scheme),
        activation=fn,
        fan_in=fan.fan_in,
        fan_out=fan.fan_out,
        expected_var=expected,
        measured_var=measured,
    )


def _slope(modules: dict[str, nn.Module], activation: LayerStats | None) -> float:
    """Negative slope of the leaky activation: the module's own when it is a module."""
    from torch import nn

    act = modules.get(activation.module) if activation is not None else None
    if isinstance(act, nn.LeakyReLU):
        return float(act.negative_slope)
    if isinstance(act, nn.PReLU):
        return float(act.weight.detach().mean())
    if isinstance(act, nn.RReLU):
        return (float(act.lower) + float(act.upper)) / 2.0
    return _FUNCTIONAL_LEAKY_SLOPE
