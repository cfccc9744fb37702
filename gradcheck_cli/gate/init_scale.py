"""Data-free init scale: each layer's weight variance against what its init formula prescribes.

The formula is picked by the activation that *actually follows* the layer in the probe's row
order (docs/theory.md#initialisation-schemes): He after the ReLU family (with the leaky slope), LeCun before
SELU, Glorot after tanh/sigmoid or when no activation follows. Either fan is accepted (He et al.
2015: fan_in keeps the forward signal, fan_out the backward one, both are stable), as is
Glorot's average. Fans and gains come from :mod:`gradcheck_cli.rewrite.init_math`, the same
maths ``reinit`` draws from, so a layer that ``reinit`` wrote measures ~1.0 here.

An init scale is only judged where it means something, and the reason a layer is not judged is
recorded in its row (``reasons['init']``):

* weights no longer at init (a checkpoint with optimizer/step keys, BatchNorm statistics that
  moved, or weights that fail the i.i.d. test an init draw passes) are trained: their scale is
  whatever training made it;
* a layer whose output reaches a normalisation with no saturating nonlinearity in between is
  scale-invariant: the norm resets the signal's scale, so a weight scale does not compound with
  depth (transformers' std 0.02 convention, conv -> BatchNorm);
* a zero weight is a zero-initialised branch (GC302), and a weight tied to an embedding follows
  the embedding's convention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from gradcheck_cli.options import FanMode
from gradcheck_cli.probe.activations import SATURATING
from gradcheck_cli.records import InitScale, LayerStats, Report, RowKind
from gradcheck_cli.rewrite.init_math import (
    WeightLayout,
    auto_scheme,
    fans,
    scheme_gain,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from gradcheck_cli.gate.scan import CheckpointScan

# F.leaky_relu's default slope: a functional call's own slope is not recorded by the probe.
_FUNCTIONAL_LEAKY_SLOPE = 0.01
_LEAKY = ("leaky_relu", "prelu", "rrelu")
# Activations after which a weight scale no longer passes through to the next norm: the
# saturating ones squash it, SELU's fixed point depends on it.
_SCALE_BREAKING = SATURATING | {"selu"}
# A norm still bounds the layer when it comes within this many nonlinear stages (attention, an
# activation): a transformer block has two (attention, the MLP's activation) whatever the number
# of projections, which run in parallel (q, k, v) but follow each other in execution order.
# Further away the scale compounds through the nonlinearities as in a plain net.
_MAX_STAGES_TO_NORM = 2
# Linear maps with no activation between them multiply their scales, but q/k/v projections and
# the convolutions of parallel branches (CoaT's multi-scale blocks) follow each other in execution
# order without feeding each other: the bound is generous for that reason.
_MAX_MAPS_TO_NORM = 16
# Tolerances of the i.i.d. test, in standard errors: wide, because a false "trained" only
# silences a warning while a trained layer judged as an init is a false alarm.
_Z = 6.0


@dataclass(frozen=True)
class InitJudgement:
    """Why a layer's weights were judged as an initialisation, and which fan matched best."""

    evidence: str
    mode: FanMode
    # The variance lies between the fans' prescriptions (a compromise between forward and backward
    # stability, as Glorot's average is): within the accepted family whatever its distance to each.
    between: bool = False


@dataclass(frozen=True)
class WeightVerdict:
    at_init: bool
    evidence: str
    variance: float = math.nan  # the weight's (population) variance, in float64


@dataclass(frozen=True)
class _WeightMoments:
    """A weight matrix's moments, (out units, inputs), for the i.i.d. test."""

    count: int
    mean: float
    variance: float  # population variance
    fourth: float  # fourth central moment
    unit_spread: float | None  # variance of the per-output-unit variances (each unbiased)
    input_spread: float | None  # the same over inputs (the matrix's columns)


def _weight_moments(matrix: torch.Tensor) -> _WeightMoments:
    """Two passes over row blocks in float64 (the mean first, so the central moments do not
    cancel): the same values as the whole-matrix formulas, without a float64 copy of a weight
    that may be a 32000x4096 embedding-sized projection."""
    import torch

    from gradcheck_cli.torch_util import float64_row_blocks

    rows, cols = matrix.shape
    column_sums = torch.zeros(cols, dtype=torch.float64)
    for block in float64_row_blocks(matrix):
        column_sums += block.sum(dim=0)
    count = rows * cols
    mean = float(column_sums.sum()) / count
    column_means = column_sums / rows
    second = fourth = 0.0
    unit_variances: list[torch.Tensor] = []
    column_squares = torch.zeros(cols, dtype=torch.float64)
    for block in float64_row_blocks(matrix):
        squares = (block - mean).square_()
        second += float(squares.sum())
        fourth += float(squares.square_().sum())
        if cols >= 2:
            unit_variances.append(block.var(dim=1, unbiased=True))
        column_squares += (block - column_means).square_().sum(dim=0)
    unit_spread = float(torch.cat(unit_variances).var(unbiased=True)) if unit_variances and rows >= 2 else None
    input_spread = float((column_squares / (rows - 1)).var(unbiased=True)) if rows >= 2 and cols >= 2 else None
    return _WeightMoments(count, mean, second / count, fourth / count, unit_spread, input_spread)


def weight_verdict(weight: torch.Tensor, *, out_dim: int = 0) -> WeightVerdict:
    """Whether ``weight`` looks like a draw from a standard init family (i.i.d. zero-mean entries,
    normal, truncated normal, uniform or orthogonal) rather than trained values.

    Three tests, each against what an i.i.d. draw gives: the excess kurtosis lies in
    [-1.2, 0] (uniform -1.2, truncated normals between, normal and orthogonal 0; trained weights
    are heavy-tailed); the per-output-unit and per-input variances spread no more than sampling
    noise (training makes some units large, others small); the mean is 0 within sampling noise.
    """
    import torch

    with torch.no_grad():
        w = weight.detach()
        matrix = w.movedim(out_dim, 0).reshape(w.shape[out_dim], -1)
        moments = _weight_moments(matrix)
    n, var = moments.count, moments.variance
    if n < 16 or var <= 0:
        return WeightVerdict(True, f"too few weights ({n}) to tell trained from init", var)
    excess = moments.fourth / (var * var) - 3.0
    tol = max(0.25, _Z * math.sqrt(24.0 / n))
    if not -1.2 - tol <= excess <= tol:
        return WeightVerdict(
            False, f"weights are not an init draw: excess kurtosis {excess:.2f} (an init family gives -1.2 to 0)", var
        )
    mean_z = moments.mean / math.sqrt(var / n)
    if abs(mean_z) > _Z:
        return WeightVerdict(
            False, f"weights are not an init draw: their mean is {mean_z:.1f} standard errors from 0", var
        )
    rows, cols = matrix.shape
    for label, observed, count, size in (
        ("output unit", moments.unit_spread, rows, cols),
        ("input", moments.input_spread, cols, rows),
    ):
        spread = _variance_spread(observed, count, size, var, excess)
        if spread is not None and spread[0] > spread[1]:
            return WeightVerdict(
                False,
                f"weights are not an init draw: per-{label} variances "
                f"spread {spread[0]:.1f} times what an i.i.d. draw gives",
                var,
            )
    return WeightVerdict(True, f"weights pass the i.i.d. init test (excess kurtosis {excess:.2f})", var)


def _variance_spread(
    observed: float | None, count: int, size: int, var: float, excess: float
) -> tuple[float, float] | None:
    """The variance of ``count`` per-row variances (rows of ``size`` entries) over what i.i.d.
    entries give, and the bound for it."""
    if observed is None or count < 4 or size < 4:
        return None
    # Var(s²) of a sample of `size` i.i.d. values: σ⁴·(κ - (size-3)/(size-1))/size.
    expected = var * var * (excess + 2.0 + 2.0 / (size - 1)) / size
    if expected <= 0:
        return None
    return observed / expected, 1.0 + _Z * math.sqrt(2.0 / (count - 1)) + 0.5


def model_trained_evidence(scan: CheckpointScan | None) -> str | None:
    """Evidence, valid for every layer, that the model was trained (None: none found)."""
    if scan is None:
        return None
    if scan.training_keys:
        keys = ", ".join(repr(k) for k in scan.training_keys[:3])
        return f"the checkpoint holds training state ({keys})"
    bn = scan.trained_batchnorm
    if bn is not None:
        return f"BatchNorm statistics were updated ('{bn.module}': num_batches_tracked = {bn.num_batches_tracked})"
    return None


def following_activation(rows: tuple[LayerStats, ...], index: int) -> LayerStats | None:
    """The activation row that consumes row ``index``'s output, or None when another layer
    comes first (no activation: the layer is linear up to the next one)."""
    for row in rows[index + 1 :]:
        if row.kind is RowKind.ACTIVATION:
            return row
        if row.kind is not RowKind.NORM:
            return None
    return None


def pooled(shape: tuple[int, ...]) -> bool:
    """One value per channel and sample, (N, C, 1, ...): globally pooled features, as a
    squeeze-excitation block computes its channel gate from."""
    return len(shape) >= 3 and all(d == 1 for d in shape[2:])


def carries_batch(shape: tuple[int, ...], batch: int) -> bool:
    """Whether a row's output has a sample dimension: batch-first (or windows x batch, as Swin
    splits images) or sequence-first. A row without one was computed from parameters and
    constants only (Swin V2's position-bias MLP on its coordinate table, ConViT's sigmoid of a
    gating parameter): it is not on the signal's path. With one sample the test cannot tell, and
    every row counts as carrying it."""
    if batch <= 1 or not shape:
        return True
    return shape[0] % batch == 0 or (len(shape) > 1 and shape[1] == batch)


def following_norm(rows: tuple[LayerStats, ...], index: int, *, batch: int = 1) -> LayerStats | None:
    """The normalisation row that row ``index``'s output reaches through scale-preserving rows
    only (linear maps, attention, the ReLU family and GELU/SiLU, which are positively homogeneous
    or linear near 0) within two nonlinear stages, or None.

    Rows off the signal's path are passed over: rows without a sample dimension (see
    :func:`carries_batch`), and further calls of a module the walk already went through (a
    block applied to several scales or branches runs its calls one after another, each on its
    own input)."""
    maps = stages = 0
    passed = {rows[index].module}
    for row in rows[index + 1 :]:
        if not carries_batch(row.shape, batch):
            continue
        if row.kind is not RowKind.NORM and row.module in passed and row.module:
            continue
        passed.add(row.module)
        if row.kind is RowKind.NORM:
            return row
        if row.kind is RowKind.ACTIVATION:
            if row.fn in _SCALE_BREAKING:
                return None
            stages += 1
            if stages > _MAX_STAGES_TO_NORM:
                return None
        if row.kind is RowKind.PARAM:
            maps += 1
            if maps > _MAX_MAPS_TO_NORM:
                return None
    return None


_GATES = frozenset({"sigmoid", "hardsigmoid"})


def _gate_branch(rows: tuple[LayerStats, ...], index: int) -> bool:
    """Row ``index`` is a squeeze-excitation (channel attention) layer: a conv on globally pooled
    features (1x1 output) whose path reaches a sigmoid gate within one more linear map."""
    if not pooled(rows[index].shape):
        return False
    maps = 0
    for row in rows[index + 1 :]:
        if row.kind is RowKind.ACTIVATION and row.fn in _GATES:
            return True
        if row.kind is RowKind.NORM:
            return False
        if row.kind is RowKind.PARAM:
            maps += 1
            if maps > 1:
                return False
    return False


def with_init_scales(
    report: Report, module: nn.Module, *, scan: CheckpointScan | None = None
) -> tuple[Report, dict[str, InitJudgement]]:
    """``report`` with ``init`` filled on every Linear/Conv/ConvTranspose/Conv1D row whose weights
    are judged (or ``reasons['init']`` saying why not), and the evidence for each judged row."""
    import torch

    rows = list(report.layers)
    # A lookup table rather than get_submodule, which ScriptModules refuse: their submodules are
    # then simply not Linear/Conv instances and are skipped.
    modules = dict(module.named_modules())
    # By class name (a custom 'Embedding' may hold no weight: timm's SwiftFormer patch embedding).
    embedded = {
        id(weight): name
        for name, m in modules.items()
        if type(m).__name__ in ("Embedding", "EmbeddingBag")
        and isinstance(weight := getattr(m, "weight", None), torch.Tensor)
    }
    trained = model_trained_evidence(scan)
    candidates: list[tuple[int, LayerStats, torch.Tensor, tuple[WeightLayout, int, int]]] = []
    seen: set[str] = set()
    for index, row in enumerate(report.layers):
        if row.kind is not RowKind.PARAM or row.module in seen:
            continue
        seen.add(row.module)  # a module called twice has one weight: measure it at its first call
        layer = modules.get(row.module)
        shape = _layout(layer)
        weight = getattr(layer, "weight", None)
        if shape is None or not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point:
            continue  # embeddings, recurrent and attention weights follow other conventions
        reason = _structural_reason(report.layers, index, weight, embedded, batch=report.probe.batch_size)
        if reason is not None:
            rows[index] = replace(row, reasons={**row.reasons, "init": reason})
            continue
        candidates.append((index, row, weight, shape))
    # The i.i.d. test only on the layers a structure does not already exclude (it reads every
    # weight once, in float64).
    verdicts = {row.name: weight_verdict(weight, out_dim=shape[2]) for _, row, weight, shape in candidates}
    failed = sum(1 for v in verdicts.values() if not v.at_init)
    if trained is None and verdicts and 2 * failed >= len(verdicts):
        # Training moves every layer, but a small layer's test has little power: when most layers
        # are clearly trained, the model is, and the layers that pass by chance are not judged.
        trained = f"{failed} of {len(verdicts)} layers' weights are not an init draw (the model is trained)"
    judged: dict[str, InitJudgement] = {}
    for index, row, weight, (layout, groups, _out_dim) in candidates:
        verdict = verdicts[row.name]
        if not verdict.at_init or trained is not None:
            reason = f"not at init: {verdict.evidence if not verdict.at_init else trained}"
            rows[index] = replace(row, reasons={**row.reasons, "init": reason})
            continue
        scale = _init_scale(
            weight, verdict.variance, layout, groups, following_activation(report.layers, index), modules
        )
        if scale is None:
            continue
        measured, mode, between = scale
        rows[index] = replace(row, init=measured)
        judged[row.name] = InitJudgement(evidence=verdict.evidence, mode=mode, between=between)
    return replace(report, layers=tuple(rows)), judged


def _layout(layer: nn.Module | None) -> tuple[WeightLayout, int, int] | None:
    """(layout, groups, output dim) of a Linear-like weight, or None for any other layer."""
    from torch import nn
    from torch.nn.modules.conv import _ConvNd

    if isinstance(layer, nn.Linear):
        return WeightLayout.OUT_IN, 1, 0
    if isinstance(layer, _ConvNd):
        if layer.transposed:
            return WeightLayout.CONV_TRANSPOSE, int(layer.groups), 1
        return WeightLayout.CONV, int(layer.groups), 0
    if type(layer).__name__ == "Conv1D":  # transformers (GPT-2): a Linear with weight (in, out)
        return WeightLayout.IN_OUT, 1, 1
    return None


def _structural_reason(
    rows: tuple[LayerStats, ...], index: int, weight: torch.Tensor, embedded: dict[int, str], *, batch: int
) -> str | None:
    """Why row ``index``'s init scale is not judged whatever its values (None: it may be)."""
    import torch

    if weight.dim() < 2:
        return "the weight has fewer than 2 dimensions"
    # One pass gives both tests: NaN propagates through min and max, and zero extremes bound zeros.
    low, high = (float(v) for v in torch.aminmax(weight.detach()))
    if not (math.isfinite(low) and math.isfinite(high)):
        return "the weight holds NaN/Inf (GC001 reports it)"
    if low == 0 and high == 0:
        return "the weight is all zero: a zero-initialised branch (GC302), not a scale"
    if id(weight) in embedded:
        return f"the weight is tied to the embedding '{embedded[id(weight)]}', whose init convention it follows"
    if not carries_batch(rows[index].shape, batch):
        return (
            f"its output {rows[index].shape} has no sample dimension: the layer maps a table of constants "
            "(a position-bias MLP on coordinates, a gate computed from parameters), not the signal, so its "
            "scale does not compound with depth"
        )
    if _gate_branch(rows, index):
        return (
            "a channel-attention gate branch (pooled 1x1 input, a sigmoid gate within one more layer): "
            "its scale sets how open the gate starts and does not compound with depth"
        )
    norm = following_norm(rows, index, batch=batch)
    if norm is not None:
        return (
            f"its output reaches the normalisation '{norm.name}' through no saturating nonlinearity: "
            "the norm resets the scale, so it does not compound with depth"
        )
    return None


def _init_scale(
    weight: torch.Tensor,
    measured: float,
    layout: WeightLayout,
    groups: int,
    activation: LayerStats | None,
    modules: dict[str, nn.Module],
) -> tuple[InitScale, FanMode, bool] | None:
    """``measured``: the weight's population variance (the i.i.d. test computed it)."""
    fan = fans(tuple(weight.shape), layout=layout, groups=groups)
    fn = activation.fn if activation is not None else None
    scheme, _why = auto_scheme(fn)  # He / LeCun (SELU) / Glorot, as reinit's 'auto' picks
    slope = _slope(modules, activation) if fn in _LEAKY else None
    gain = scheme_gain(scheme, fn, slope=slope)
    # Every fan is a sound choice (fan_in: forward, fan_out: backward, average: Glorot): the one
    # closest to the measured variance is what the layer was initialised with.
    candidates = {mode: gain * gain / fan.pick(mode) for mode in FanMode}
    mode = min(candidates, key=lambda m: abs(math.log(measured / candidates[m])) if measured > 0 else 0.0)
    # A depthwise conv's fans differ 64-fold or more (PyTorch counts fan_out as out_channels x kernel,
    # and torchvision draws depthwise convs with it): a variance between the two is a compromise
    # of the accepted prescriptions.
    between = min(candidates.values()) <= measured <= max(candidates.values())
    return (
        InitScale(
            scheme=str(scheme),
            activation=fn,
            fan_in=fan.fan_in,
            fan_out=fan.fan_out,
            expected_var=candidates[mode],
            measured_var=measured,
        ),
        mode,
        between,
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
