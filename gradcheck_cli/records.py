"""The records gradcheck produces: frozen dataclasses with a stable JSON form.

These are the library's results and the JSON report's contract (``schema/report.schema.json``).
They hold plain Python numbers only, never tensors, so that renderers can print them and
other tools can compare them without importing torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from typing import Any

from gradcheck_cli.choice import Choice

SCHEMA_VERSION = "1.0"


class RowKind(Choice):
    """What a report row stands for."""

    PARAM = "param"  # a layer with a weight used as a linear map: Linear, Conv*, Embedding, ...
    ACTIVATION = "activation"  # an activation-function call (module or functional)
    NORM = "norm"  # BatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm
    OTHER = "other"  # any other module that owns parameters


class Severity(Choice):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def rank(self) -> int:
        return {"info": 0, "warning": 1, "error": 2}[self.value]


@dataclass(frozen=True)
class OutputStats:
    """Statistics of a row's output over the whole probe (every micro-batch).

    ``mean``/``var``/``min``/``max`` are None when the output held NaN or Inf (see the counts),
    because a statistic over non-finite values says nothing. ``var`` is the population variance.
    """

    count: int
    mean: float | None
    var: float | None
    min: float | None
    max: float | None
    nan: int
    inf: int


@dataclass(frozen=True)
class DeadUnits:
    """ReLU-family units whose output was exactly zero for every element of the probe."""

    units: int
    total: int
    axis: int  # the output dimension that indexes units (1 for (N, C, ...), -1 for (N, T, F))

    @property
    def fraction(self) -> float:
        return self.units / self.total if self.total else 0.0


@dataclass(frozen=True)
class Saturation:
    """Share of outputs whose local derivative is below ``cutoff`` times its maximum."""

    fraction: float
    cutoff: float


@dataclass(frozen=True)
class GradStats:
    """Gradient of the loss with respect to the row's own parameters (L2 norms)."""

    norm: float | None
    weight_norm: float  # NaN (null in JSON) when the weights themselves hold NaN/Inf
    ratio: float | None  # norm / weight_norm; None when the weights are all zero


@dataclass(frozen=True)
class LayerStats:
    """One report row: a layer with parameters, or one activation-function call."""

    index: int
    name: str
    type: str
    kind: RowKind
    module: str  # module path that executed the row ('' is the root module)
    shape: tuple[int, ...]  # output shape of one micro-batch
    output: OutputStats
    output_grad_norm: float | None  # L2 norm of dLoss/dOutput over the whole probe
    fn: str | None = None
    dead: DeadUnits | None = None
    saturation: Saturation | None = None
    grad: GradStats | None = None
    params: int = 0  # number of parameters the row owns directly
    init: InitScale | None = None
    histograms: Histograms | None = None  # with `histograms`; bins are Report.histogram_edges
    through_time: ThroughTime | None = None  # recurrent layers (nn.RNN/LSTM/GRU) only
    input: OutputStats | None = None  # norm layers: statistics of what they normalise
    # Why a value that applies to this row is null: field name -> reason. Empty when all were computed.
    reasons: dict[str, str] = field(default_factory=dict)
    attention: AttentionStats | None = None  # attention rows (softmax or scaled_dot_product_attention)


@dataclass(frozen=True)
class AttentionStats:
    """Attention probabilities over the whole probe. A row (one query) counts as saturated in
    ``LayerStats.saturation`` when its largest probability p has p(1 - p) below the saturation cutoff
    times 1/4: the softmax then passes almost no gradient (near one-hot attention)."""

    heads: int
    entropy: tuple[float, ...]  # mean entropy of each head's rows, in nats
    max_entropy: float  # log(number of keys): the entropy of uniform attention


@dataclass(frozen=True)
class GateStats:
    """One gate of a recurrent layer over every step and sample of the probe."""

    saturation: float  # share of gate values with derivative below the saturation cutoff
    mean: float


@dataclass(frozen=True)
class DirectionTrace:
    """Gradient through time for one layer and direction of a recurrent module."""

    layer: int
    direction: str  # 'forward' or 'reverse'
    steps: int
    grad_norms: tuple[float, ...]  # |dL/dh_t| for t = 0 .. steps-1, in time order, over the whole probe
    decay_rate: float | None  # per step back from the last processed step: < 1 decays, > 1 explodes
    horizon: int  # steps back from the last over which |dL/dh_t| >= horizon_fraction * its last value
    spectral_radius: dict[str, float]  # of each gate's square block of W_hh
    gates: dict[str, GateStats]


@dataclass(frozen=True)
class ThroughTime:
    ok: bool  # the unrolled equations reproduced the fused layer on every micro-batch
    reason: str | None  # why data is missing (None when ok)
    max_abs_error: float | None  # largest |unrolled - fused| over the probe
    tolerance: float | None
    horizon_fraction: float
    directions: tuple[DirectionTrace, ...]


@dataclass(frozen=True)
class Histograms:
    """Counts per fixed bin of the row's output and of dLoss/dOutput over the whole probe.

    There is one more count than there are edges: count i covers (edges[i-1], edges[i]], the first
    and last are the overflow bins. NaN is never binned (OutputStats.nan counts it).
    """

    output: tuple[int, ...] | None
    output_grad: tuple[int, ...] | None


@dataclass(frozen=True)
class InitScale:
    """Measured weight variance against what the init formula for the following activation prescribes."""

    scheme: str  # he, glorot or lecun
    activation: str | None  # the activation that follows the layer (None: no activation)
    fan_in: int
    fan_out: int
    expected_var: float
    measured_var: float

    @property
    def ratio(self) -> float:
        return self.measured_var / self.expected_var if self.expected_var > 0 else math.inf


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]  # shape of one micro-batch
    dtype: str
    source: str  # 'synthesized', 'file' or 'example'
    low: float | None = None  # value range of synthesized integer inputs
    high: float | None = None


@dataclass(frozen=True)
class LoweringCheck:
    """How an ONNX graph's gradients were obtained: its torch lowering, checked against
    onnxruntime on every micro-batch. ``ok`` False means every gradient field is null."""

    ok: bool
    max_abs_error: float | None  # largest |lowered - onnxruntime| over the outputs (None: not run)
    tolerance: float | None  # the error allowed: atol + rtol * max|output|
    unsupported_ops: tuple[str, ...]  # operators the lowering has no function for
    reason: str | None  # why gradients are null (None when ok)


@dataclass(frozen=True)
class ProbeInfo:
    inputs: tuple[InputSpec, ...]
    batch_size: int
    batches: int
    seed: int
    loss: str
    loss_value: float | None
    mode: str
    device: str
    output: str  # which model output the loss was taken from
    saturation_cutoff: float
    method: str  # how the model was instrumented: 'hooks', 'graph' or 'onnxruntime'
    lowering: LoweringCheck | None = None  # ONNX models only: the gradient lowering's check


@dataclass(frozen=True)
class ModelInfo:
    path: str
    format: str
    parameters: int


@dataclass(frozen=True)
class ToolInfo:
    name: str
    version: str


class BaselineStatus(Choice):
    """A finding compared with the same rule and layer in a `baseline` report."""

    NEW = "new"  # not in the baseline
    WORSENED = "worsened"  # in the baseline, but its value moved further past the threshold
    UNCHANGED = "unchanged"  # in the baseline, no worse (within the tolerance)


@dataclass(frozen=True)
class Finding:
    """A rule's verdict on one layer (or on the whole model when ``layer`` is None)."""

    code: str
    rule: str
    severity: Severity
    layer: str | None
    value: float | None
    threshold: float | None
    message: str
    advice: str
    baseline: BaselineStatus | None = None  # None: no baseline was given


@dataclass(frozen=True)
class Report:
    tool: ToolInfo
    model: ModelInfo
    probe: ProbeInfo
    layers: tuple[LayerStats, ...]
    findings: tuple[Finding, ...] = ()
    notes: tuple[str, ...] = ()
    histogram_edges: tuple[float, ...] | None = None
    schema_version: str = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        data = to_jsonable(self)
        assert isinstance(data, dict)
        ordered = {"schema_version": data.pop("schema_version")}
        ordered.update(data)
        return ordered


@dataclass(frozen=True)
class Change:
    """One thing a rewrite did to one layer (or declined to do, with ``reason``)."""

    target: str
    action: str
    detail: str
    applied: bool = True
    reason: str | None = None


@dataclass(frozen=True)
class RewriteResult:
    changes: tuple[Change, ...]
    written: str | None
    safe: bool
    extra: dict[str, Any] = field(default_factory=dict)


def to_jsonable(value: Any) -> Any:
    """Plain JSON data for a record: enums to strings, non-finite floats to None."""
    if is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in fields(value):
            out[f.name] = to_jsonable(getattr(value, f.name))
        if isinstance(value, DeadUnits):
            out["fraction"] = value.fraction
        if isinstance(value, InitScale):
            out["ratio"] = to_jsonable(value.ratio)
        return out
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    return value
