"""Activation statistics computed inside the onnxruntime graph, so only a few numbers per value leave it.

Exposing a value as a graph output makes onnxruntime keep it alive until the run ends, so
exposing every row value costs memory that grows with depth (see :mod:`.ort_stats`, which bounds
it by running the graph once per group of values). Here each row value instead feeds a few
reduction nodes added to the graph, and only their small results are graph outputs: one session
and one run per micro-batch cover every row, memory stays at plain inference's level, and the
reductions run in onnxruntime's threads.

For a value ``x`` whose rank and element type are known, cut into rows of at most
:data:`MAX_ROW` elements (``Reshape(x, [-1, L])``, L dividing the per-sample size), the graph
computes per row the sum and the sum of squares (ReduceSum, ReduceSumSquare: two reads, nothing
written), and the host turns them into the row's mean and centred sum of squares and merges the
rows in float64 (Chan's formula), as the torch path merges micro-batches. Short rows keep
float32 accumulation error small; a value whose variance is below 5% of its mean square (the
torch path's cancellation guard: a mean of 1e4 with a spread of 1 is the case) gets a second,
centred pass, each row's squares taken about its own float32 mean (Chan, Golub & LeVeque's
corrected two-pass formula). Also per value:

- minimum and maximum: of the whole value, or per unit for ReLU-family rows (dead units), from
  per-row extremes over the trailing block, finished on the host;
- saturation counts for sigmoid/tanh-family rows, with the criterion of
  :func:`gradcheck_cli.probe.activations.saturated_mask`, counted in int32 per row.

Anything that cannot be reduced in the graph is returned as ``exposed`` for the caller's old
path (:func:`.ort_stats.statistics_pass`, which hands the full tensor to the Recorder): values
of unknown type or rank, of a floating type other than float16/bfloat16/float32/double, known to
be empty, initializers or graph inputs without a type, and, after the run, values with a
non-finite partial (NaN/Inf, whose counts need the full tensor; rare, and a second run is cheap
next to a diverged model).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gradcheck_cli.errors import ProbeError, first_line
from gradcheck_cli.onnx.ort_stats import ValueType
from gradcheck_cli.stats import CANCELLATION_GUARD

if TYPE_CHECKING:
    import numpy as np
    import onnx

    from gradcheck_cli.probe.recorder import Row

FLOAT, FLOAT16, DOUBLE, BFLOAT16 = 1, 10, 11, 16
_FLOATS = {FLOAT, FLOAT16, DOUBLE, BFLOAT16}
# ONNX element types that are neither floating nor reducible: integers and bool (skipped, as the
# torch path skips them), by the name torch gives them, for the row's reason.
_NOT_FLOAT = {
    2: "uint8",
    3: "int8",
    4: "uint16",
    5: "int16",
    6: "int32",
    7: "int64",
    9: "bool",
    12: "uint32",
    13: "uint64",
}
_PREFIX = "gradcheck_reduce"

# A saturating function and the parameters that move its saturation region (sorted pairs).
SaturationSpec = tuple[str, tuple[tuple[str, float], ...]]


@dataclass
class ValueRequest:
    """What the rows reading one value need from it."""

    name: str
    unit_axes: set[int] = field(default_factory=set)  # per-unit extremes (ReLU-family rows)
    saturation: set[SaturationSpec] = field(default_factory=set)


@dataclass
class _Outputs:
    shape: str
    total: str  # per row: sum of (x - shift)
    squares: str  # per row: sum of (x - shift)^2
    shift: str | None = None  # per row: its float32 mean (centred form), else no shift
    low: str | None = None  # the whole value's extremes (when no per-unit extremes are wanted)
    high: str | None = None
    units: dict[int, tuple[str, str, bool]] = field(default_factory=dict)  # axis -> (min, max, per unit already)
    saturated: dict[SaturationSpec, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ValueStats:
    """One value's statistics on one micro-batch, finished in float64 on the host."""

    shape: tuple[int, ...]
    count: int
    mean: float
    m2: float
    minimum: float
    maximum: float
    unit_extremes: dict[int, tuple[np.ndarray, np.ndarray]]  # axis -> per-unit (min, max)
    saturated: dict[SaturationSpec, int]
    cancelled: bool = False  # the moments lost digits to cancellation: take them centred


@dataclass
class ReducedPass:
    outputs: list[dict[str, Any]]  # the graph outputs (torch tensors), per micro-batch
    stats: dict[str, list[ValueStats]]  # per value, one entry per micro-batch
    exposed: list[str]  # values the caller must reduce from the full tensor (old path)
    skipped: dict[str, str]  # non-floating values -> the reason the row reports


def saturation_spec(fn: str, params: dict[str, float]) -> SaturationSpec:
    return fn, tuple(sorted(params.items()))


def requests_for(
    values: Sequence[str], types: dict[str, ValueType], initializers: set[str], wants: dict[str, ValueRequest]
) -> tuple[list[ValueRequest], list[str], dict[str, str]]:
    """Split ``values`` into in-graph requests, values for the old path, and skipped values."""
    reducible: list[ValueRequest] = []
    exposed: list[str] = []
    skipped: dict[str, str] = {}
    for name in values:
        value_type = types.get(name)
        request = wants.get(name) or ValueRequest(name)
        if value_type is None or name in initializers or value_type.elem_type == 0:
            exposed.append(name)
        elif value_type.elem_type in _NOT_FLOAT:
            skipped[name] = f"the output is {_NOT_FLOAT[value_type.elem_type]}, not floating point"
        elif (
            value_type.elem_type not in _FLOATS
            or value_type.dims is None
            or 0 in value_type.dims
            or any(axis >= max(len(value_type.dims), 1) for axis in request.unit_axes)
        ):
            exposed.append(name)
        else:
            reducible.append(request)
    return reducible, exposed, skipped


class _Builder:
    """Appends nodes to a graph with fresh names, in the form the model's opset wants."""

    def __init__(self, graph: onnx.GraphProto, opset: int, taken: set[str]) -> None:
        self.graph, self.opset, self.taken = graph, opset, taken
        self.counter = 0

    def fresh(self, hint: str) -> str:
        while True:
            self.counter += 1
            name = f"{_PREFIX}/{self.counter}/{hint}"
            if name not in self.taken:
                self.taken.add(name)
                return name

    def node(self, op: str, inputs: list[str], hint: str, **attributes: Any) -> str:
        import onnx

        out = self.fresh(hint)
        self.graph.node.append(onnx.helper.make_node(op, inputs, [out], name=out, **attributes))
        return out

    def constant(self, value: Any, elem_type: int, hint: str) -> str:
        import numpy as np
        import onnx
        from onnx import numpy_helper

        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
        name = self.fresh(hint)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def reduce(self, op: str, x: str, axes: list[int] | None, hint: str, *, keepdims: int = 0) -> str:
        # ReduceSum takes its axes as an input from opset 13, the other reductions from 18.
        axes_as_input = self.opset >= (13 if op == "ReduceSum" else 18)
        if axes is None:
            return self.node(op, [x], hint, keepdims=keepdims)
        if axes_as_input:
            return self.node(op, [x, self.constant(axes, 7, "axes")], hint, keepdims=keepdims)
        return self.node(op, [x], hint, axes=axes, keepdims=keepdims)

    def flatten(self, x: str, rank: int, axis: int) -> str:
        """(prod(dims[:axis]), prod(dims[axis:])); below rank 1, one row."""
        if rank == 0:
            return self.node("Reshape", [x, self.constant([1, 1], 7, "shape")], "flat")
        return self.node("Flatten", [x], "flat", axis=axis)


def _saturated(builder: _Builder, y: str, spec: SaturationSpec, cutoff: float, elem: int) -> str:
    """The boolean mask of :func:`saturated_mask` as ONNX nodes (same float type, same formula,
    so elementwise results match torch's bit for bit apart from Exp's last ulp)."""
    fn, pairs = spec
    params = dict(pairs)

    def const(value: float) -> str:
        return builder.constant(value, elem, "c")

    def below(value: str, limit: float) -> str:
        return builder.node("Less", [value, const(limit)], "below")

    def at_most(value: str, limit: float) -> str:  # LessOrEqual is opset 12: not(value > limit)
        return builder.node("Not", [builder.node("Greater", [value, const(limit)], "gt")], "le")

    def at_least(value: str, limit: float) -> str:
        return builder.node("Not", [builder.node("Less", [value, const(limit)], "lt")], "ge")

    one = const(1.0)
    if fn == "sigmoid":
        return below(builder.node("Mul", [y, builder.node("Sub", [one, y], "t")], "t"), cutoff * 0.25)
    if fn == "tanh":
        return below(builder.node("Sub", [one, builder.node("Mul", [y, y], "t")], "t"), cutoff)
    if fn == "softsign":
        t = builder.node("Sub", [one, builder.node("Abs", [y], "t")], "t")
        return below(builder.node("Mul", [t, t], "t"), cutoff)
    if fn == "softplus":
        scaled = builder.node("Mul", [const(-params.get("beta", 1.0)), y], "t")
        return below(builder.node("Sub", [one, builder.node("Exp", [scaled], "t")], "t"), cutoff)
    if fn == "logsigmoid":
        return below(builder.node("Sub", [one, builder.node("Exp", [y], "t")], "t"), cutoff)
    low, high = (params.get("min_val", -1.0), params.get("max_val", 1.0)) if fn == "hardtanh" else (0.0, 1.0)
    if fn in ("hardtanh", "hardsigmoid"):
        return builder.node("Or", [at_most(y, low), at_least(y, high)], "sat")
    raise ValueError(f"{fn} is not a saturating activation")


def moment_row_length(dims: tuple[int, ...]) -> int | None:
    """Length of the partial rows the moments are taken over: the largest divisor of the
    per-sample size (dims[1:], so any batch size fits) up to :data:`MAX_ROW`; None when a
    dimension is unknown or no usable divisor exists (the caller flattens instead)."""
    if any(d < 0 for d in dims):
        return None
    per_sample = math.prod(dims[1:]) if len(dims) >= 2 else math.prod(dims)
    if per_sample <= MAX_ROW:
        return max(per_sample, 1)
    length = next(n for n in range(MAX_ROW, 0, -1) if per_sample % n == 0)
    return length if length >= MIN_ROW else None


# onnxruntime's CPU reductions accumulate in the value's type (float32) nearly sequentially:
# over one row of a million values with mean 3e4 the mean is off by more than the spread. Rows
# of at most MAX_ROW values keep each row's relative error near float32's epsilon times a few
# dozen; the rows are merged in float64 on the host.
MAX_ROW = 2048
MIN_ROW = 64  # shorter rows would return most of the tensor


def reduced_model(
    model: onnx.ModelProto,
    requests: Sequence[ValueRequest],
    types: dict[str, ValueType],
    *,
    opset: int,
    cutoff: float,
    centred: bool = False,
) -> tuple[onnx.ModelProto, dict[str, _Outputs]]:
    """A copy of ``model`` whose only outputs are its own plus the reductions of each request.

    Each value is reduced, and its buffer free for reuse, as soon as the node that produces it
    has run (see the node order below), so memory stays at plain inference's level.
    """
    import onnx

    reduced = onnx.ModelProto()
    reduced.CopyFrom(model)
    graph = reduced.graph
    taken = {name for node in graph.node for name in node.output} | {v.name for v in graph.input}
    taken |= {init.name for init in graph.initializer}
    builder = _Builder(onnx.GraphProto(), opset, taken)
    names: dict[str, _Outputs] = {}
    after: dict[str, list[onnx.NodeProto]] = {}
    for request in requests:
        value_type = types[request.name]
        assert value_type.dims is not None
        start = len(builder.graph.node)
        names[request.name] = _reduce_value(builder, request, value_type, cutoff, centred=centred)
        after[request.name] = list(builder.graph.node[start:])
    graph.initializer.extend(builder.graph.initializer)
    # onnxruntime orders execution by a depth-first search from the graph's leaf nodes, the
    # last leaf first. Appending each value's reductions in reverse order of production makes
    # the first value's reductions the last leaves, so the search emits each layer followed by
    # its reductions, and each value's buffer is free for reuse before the next layers run.
    # (In graph order, the final layer's reductions come first and pull the whole forward pass
    # before any reduction: every value then stays alive, +0.9 GiB for resnet50 at batch 8.)
    position = {name: i for i, node in enumerate(graph.node) for name in node.output}
    for value in sorted(after, key=lambda name: position.get(name, -1), reverse=True):
        graph.node.extend(after[value])
    exposed = [o.name for o in model.graph.output]
    for out in names.values():
        exposed += [out.shape, out.total, out.squares] + ([out.shift] if out.shift else [])
        exposed += [n for n in (out.low, out.high) if n is not None]
        for low, high, _ in out.units.values():
            exposed += [low, high]
        exposed += list(out.saturated.values())
    kept = {o.name: o for o in graph.output}
    del graph.output[:]
    # Added outputs get no type: onnxruntime infers it.
    graph.output.extend(kept.get(name) or onnx.ValueInfoProto(name=name) for name in exposed)
    return reduced, names


def _reduce_value(
    builder: _Builder, request: ValueRequest, value_type: ValueType, cutoff: float, *, centred: bool
) -> _Outputs:
    assert value_type.dims is not None
    rank = len(value_type.dims)
    x = request.name
    elem = value_type.elem_type
    if elem in (FLOAT16, BFLOAT16):  # statistics of half-precision values accumulate in float32
        x = builder.node("Cast", [x], "f32", to=FLOAT)
        elem = FLOAT
    length = moment_row_length(value_type.dims)
    flattened: dict[int, str] = {}

    def flat(axis: int) -> str:
        if axis not in flattened:
            flattened[axis] = builder.flatten(x, rank, axis)
        return flattened[axis]

    if length is not None:
        rows = builder.node("Reshape", [x, builder.constant([-1, length], 7, "shape")], "rows")
    else:  # unknown dimensions: (N·C, rest) for rank >= 3, (N, F) for rank 2, one row below
        rows = flat(min(rank - 1, 2) if rank >= 2 else 0)
    shift: str | None = None
    deviations = rows
    if centred:
        shift = builder.reduce("ReduceMean", rows, [1], "mean", keepdims=1)
        deviations = builder.node("Sub", [rows, shift], "centred")
    out = _Outputs(
        shape=builder.node("Shape", [request.name], "shape"),
        shift=shift,
        total=builder.reduce("ReduceSum", deviations, [1], "total"),
        squares=builder.reduce("ReduceSumSquare", deviations, [1], "squares"),
    )
    if centred:  # the second pass for values whose mean dwarfs their spread: moments only
        return out
    for axis in sorted(request.unit_axes):
        if axis == rank - 1:  # (rest, units): reduce the columns
            columns = flat(max(rank - 1, 0))
            out.units[axis] = (
                builder.reduce("ReduceMin", columns, [0], "unit_min"),
                builder.reduce("ReduceMax", columns, [0], "unit_max"),
                True,
            )
        else:  # (leading x units, rest): reduce the rows, finish per unit on the host
            blocks = flat(axis + 1)
            out.units[axis] = (
                builder.reduce("ReduceMin", blocks, [1], "row_min"),
                builder.reduce("ReduceMax", blocks, [1], "row_max"),
                False,
            )
    if not out.units:
        out.low = builder.reduce("ReduceMin", rows, None, "min")
        out.high = builder.reduce("ReduceMax", rows, None, "max")
    for spec in sorted(request.saturation):
        mask = builder.node("Cast", [_saturated(builder, rows, spec, cutoff, elem)], "mask", to=6)
        out.saturated[spec] = builder.reduce("ReduceSum", mask, [1], "saturated")
    return out


def _finish(out: _Outputs, arrays: dict[str, np.ndarray]) -> ValueStats | None:
    """Merge the partial rows in float64; None when a partial is not finite (NaN/Inf present,
    or a float32 sum overflowed), so the caller counts them from the full tensor."""
    import numpy as np

    shape = tuple(int(d) for d in arrays[out.shape])
    count = math.prod(shape)
    moments = _moments(out, arrays, count)
    if moments is None:
        return None
    mean, m2, cancelled = moments
    units: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    lows: list[float] = []
    highs: list[float] = []
    for axis, (low_name, high_name, per_unit) in out.units.items():
        low, high = arrays[low_name].reshape(-1), arrays[high_name].reshape(-1)
        if not per_unit:
            size = shape[axis] if shape else 1
            low, high = low.reshape(-1, size).min(axis=0), high.reshape(-1, size).max(axis=0)
        units[axis] = (low, high)
        lows.append(float(low.min()))
        highs.append(float(high.max()))
    if out.low is not None and out.high is not None:
        lows.append(float(arrays[out.low]))
        highs.append(float(arrays[out.high]))
    minimum, maximum = min(lows), max(highs)
    if not (math.isfinite(minimum) and math.isfinite(maximum)):
        return None
    saturated = {spec: int(arrays[name].astype(np.int64).sum()) for spec, name in out.saturated.items()}
    return ValueStats(
        shape=shape,
        count=count,
        mean=mean,
        m2=m2,
        minimum=minimum,
        maximum=maximum,
        unit_extremes=units,
        saturated=saturated,
        cancelled=cancelled,
    )


def _moments(out: _Outputs, arrays: dict[str, np.ndarray], count: int) -> tuple[float, float, bool] | None:
    """(mean, M2, cancelled) from the per-row sums; None when a sum is not finite.

    Per row, mean = shift + total/n and M2 = squares - total²/n: exact for any shift, accurate
    when the shift is within a few spreads of the mean (the centred pass: the row's own float32
    mean) or when the mean does not dwarf the spread (the first pass: no shift). ``cancelled``
    says the first pass's M2 lost digits by that test, the same one, with the same threshold,
    that makes the torch path fall back to a two-pass variance. Rows are merged in float64 with
    Chan's formula.
    """
    import numpy as np

    total = arrays[out.total].astype(np.float64).reshape(-1)
    squares = arrays[out.squares].astype(np.float64).reshape(-1)
    shift = arrays[out.shift].astype(np.float64).reshape(-1) if out.shift is not None else 0.0
    if count == 0 or not total.size or count % total.size:
        return None
    if not (np.isfinite(total).all() and np.isfinite(squares).all() and np.isfinite(shift).all()):
        return None
    n_p = count // total.size
    means = shift + total / n_p
    m2_rows = np.maximum(squares - total * total / n_p, 0.0)
    mean = float(means.mean())
    m2 = float(m2_rows.sum() + n_p * np.square(means - mean).sum())
    return mean, m2, out.shift is None and m2 < CANCELLATION_GUARD * float(squares.sum())


def session_options(ort: Any) -> Any:
    options = ort.SessionOptions()
    # onnxruntime logs to stderr itself, errors included; the exception it raises carries the same
    # text, which the probe turns into its one-line error, so only fatal messages may print.
    options.log_severity_level = 4
    # All of onnxruntime's graph optimisations stay on: the reductions' inputs are the unfused
    # values themselves (a fusion never swallows a node whose output has a second consumer), and
    # their outputs are small, so the layout conversions that made the old path prefer the basic
    # level cost one reorder per value at most.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def reduced_statistics_pass(
    model: onnx.ModelProto,
    values: Sequence[str],
    wants: dict[str, ValueRequest],
    types: dict[str, ValueType],
    feeds: Sequence[dict[str, Any]],
    *,
    opset: int,
    cutoff: float,
) -> ReducedPass:
    """One session, one run per micro-batch: the graph outputs plus every reducible value's statistics."""
    import onnxruntime as ort
    import torch

    initializers = {init.name for init in model.graph.initializer}
    requests, exposed, skipped = requests_for(values, types, initializers, wants)
    reduced, names = reduced_model(model, requests, types, opset=opset, cutoff=cutoff)
    output_names = [o.name for o in reduced.graph.output]
    data = reduced.SerializeToString()
    del reduced  # a copy of every initializer: not kept while the session holds its own
    try:
        session = ort.InferenceSession(data, session_options(ort), providers=["CPUExecutionProvider"])
    except Exception as exc:
        text = first_line(exc)
        raise ProbeError(
            f"onnxruntime could not load the graph: {text}",
            hint="check the model with `python -m onnx.checker` or re-export it",
        ) from exc
    del data
    graph_outputs = [o.name for o in model.graph.output]
    per_batch: list[dict[str, Any]] = []
    stats: dict[str, list[ValueStats]] = {name: [] for name in names}
    nonfinite: set[str] = set()
    for feed in feeds:
        try:
            arrays = dict(zip(output_names, session.run(output_names, feed), strict=True))
        except Exception as exc:
            text = first_line(exc)
            raise ProbeError(
                f"onnxruntime failed on the probe batch: {text}",
                hint="check the probe inputs with `input_shape`/`input_dtype`",
            ) from exc
        per_batch.append({name: torch.from_numpy(arrays[name]) for name in graph_outputs})
        for name, out in names.items():
            finished = _finish(out, arrays)
            if finished is None:
                nonfinite.add(name)
            else:
                stats[name].append(finished)
    for name in nonfinite:  # every micro-batch of such a value goes the old way, so none counts twice
        del stats[name]
    cancelled = [name for name, per_batch in stats.items() if any(s.cancelled for s in per_batch)]
    if cancelled:
        _centred_moments(
            model, [r for r in requests if r.name in cancelled], types, feeds, stats, opset=opset, cutoff=cutoff
        )
    exposed += [name for name in values if name in nonfinite]
    return ReducedPass(outputs=per_batch, stats=stats, exposed=exposed, skipped=skipped)


def _centred_moments(
    model: onnx.ModelProto,
    requests: Sequence[ValueRequest],
    types: dict[str, ValueType],
    feeds: Sequence[dict[str, Any]],
    stats: dict[str, list[ValueStats]],
    *,
    opset: int,
    cutoff: float,
) -> None:
    """Replace the moments of ``requests`` by centred ones, from one more run per micro-batch:
    each row is centred on its own float32 mean before its squares are summed (a mean of 1e4
    with a spread of 1 is the case this is for)."""
    import dataclasses

    import onnxruntime as ort

    reduced, names = reduced_model(model, requests, types, opset=opset, cutoff=cutoff, centred=True)
    output_names = [o.name for o in reduced.graph.output]
    try:
        session = ort.InferenceSession(
            reduced.SerializeToString(), session_options(ort), providers=["CPUExecutionProvider"]
        )
        runs = [session.run(output_names, feed) for feed in feeds]
    except Exception as exc:
        text = first_line(exc)
        raise ProbeError(f"onnxruntime failed on the centred statistics pass: {text}") from exc
    for batch, outputs in enumerate(runs):
        arrays = dict(zip(output_names, outputs, strict=True))
        for name, out in names.items():
            first = stats[name][batch]
            moments = _moments(out, arrays, first.count)
            if moments is not None:
                stats[name][batch] = dataclasses.replace(first, mean=moments[0], m2=moments[1], cancelled=False)


def apply_stats(row: Row, stats: ValueStats, *, unit_axis: int | None, saturation: SaturationSpec | None) -> None:
    """Merge one micro-batch's in-graph statistics into ``row`` as Recorder.record_output followed
    by Recorder.end_batch would have merged the same value's (finite) tensor."""
    import torch

    row.shape = stats.shape
    row.seen_output = True
    row.moments.merge(stats.count, stats.mean, stats.m2, stats.minimum, stats.maximum)
    if saturation is not None:
        row.saturated += stats.saturated[saturation]
    if unit_axis is not None:
        row.axis = unit_axis
        low, high = stats.unit_extremes[unit_axis]
        nonzero = torch.from_numpy((low != 0) | (high != 0))
        row.alive = nonzero if row.alive is None or row.alive.shape != nonzero.shape else row.alive | nonzero
