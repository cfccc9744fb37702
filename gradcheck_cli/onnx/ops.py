"""The operator registry: one small torch function per ONNX operator and opset range.

Each function follows the ONNX operator specification (Operators.md) for the opsets it is
registered for, and is written with differentiable torch operations so that autograd gives the
gradient of the graph. ``lookup(op_type, opset)`` picks the implementation whose ``since``
is the highest one not above the model's opset, which is how the spec versions operators: an
op keeps its behaviour until a later ``since_version`` changes it.

Shapes, axes and other "static" operands arrive as tensors (the lowering is eager) and are
read with ``.tolist()``; values that flow into the loss stay tensors.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx
    import torch

Values = Sequence["torch.Tensor | None"]
SubgraphRunner = Callable[["onnx.GraphProto", list["torch.Tensor | None"]], list["torch.Tensor"]]


class OpError(Exception):
    """An operator (or one of its attributes) the lowering does not implement."""


@dataclass
class OpCall:
    """One node's call: its operands, decoded attributes and context."""

    op_type: str
    inputs: list[torch.Tensor | None]
    attrs: dict[str, Any] = field(default_factory=dict)
    opset: int = 13
    num_outputs: int = 1
    run_subgraph: SubgraphRunner | None = None

    def input(self, index: int) -> torch.Tensor | None:
        return self.inputs[index] if index < len(self.inputs) else None

    def required(self, index: int) -> torch.Tensor:
        value = self.input(index)
        if value is None:
            raise OpError(f"{self.op_type}: input {index} is required")
        return value

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)


OpImpl = Callable[[OpCall], Values]


@dataclass(frozen=True)
class OpEntry:
    op_type: str
    since: int
    impl: OpImpl
    differentiable: bool


_REGISTRY: dict[str, list[OpEntry]] = {}


def op(*names: str, since: int = 1, differentiable: bool = True) -> Callable[[OpImpl], OpImpl]:
    """Register ``impl`` for ``names`` from opset ``since`` on (until a later registration)."""

    def register(impl: OpImpl) -> OpImpl:
        for name in names:
            entries = _REGISTRY.setdefault(name, [])
            entries.append(OpEntry(name, since, impl, differentiable))
            entries.sort(key=lambda e: e.since)
        return impl

    return register


def lookup(op_type: str, opset: int) -> OpEntry | None:
    """The implementation of ``op_type`` for a model of ``opset`` (None: not supported)."""
    ensure_registered()
    chosen = None
    for entry in _REGISTRY.get(op_type, []):
        if entry.since <= opset:
            chosen = entry
    return chosen


def supported_ops() -> dict[str, list[int]]:
    """Every supported op with the opsets at which its implementation changes (for docs)."""
    ensure_registered()
    return {name: [e.since for e in entries] for name, entries in sorted(_REGISTRY.items())}


# ---- helpers -------------------------------------------------------------------------------

# ONNX TensorProto element types to torch dtype names.
ONNX_DTYPES = {
    1: "float32",
    2: "uint8",
    3: "int8",
    5: "int16",
    6: "int32",
    7: "int64",
    9: "bool",
    10: "float16",
    11: "float64",
    16: "bfloat16",
}


def torch_dtype(elem_type: int) -> torch.dtype:
    import torch

    name = ONNX_DTYPES.get(elem_type)
    if name is None:
        raise OpError(f"ONNX element type {elem_type} is not supported by the lowering")
    dtype: torch.dtype = getattr(torch, name)
    return dtype


def ints(value: torch.Tensor | Sequence[int] | None) -> list[int]:
    import torch

    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.reshape(-1).tolist()]
    return [int(v) for v in value]


def _scalar(value: torch.Tensor | None, default: float | None = None) -> float | None:
    if value is None or value.numel() == 0:
        return default
    return float(value.reshape(-1)[0].item())


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _one(value: torch.Tensor) -> list[torch.Tensor | None]:
    return [value]


def _axes_operand(call: OpCall, attr_until: int, index: int = 1) -> list[int] | None:
    """Axes given as an attribute before opset ``attr_until`` and as input ``index`` from it on."""
    if call.opset < attr_until:
        value = call.attr("axes")
        return None if value is None else [int(a) for a in value]
    tensor = call.input(index)
    return None if tensor is None else ints(tensor)


# ---- elementwise arithmetic ---------------------------------------------------------------


def _is_int(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex)


@op("Add")
def add(call: OpCall) -> Values:
    return _one(call.required(0) + call.required(1))


@op("Sub")
def sub(call: OpCall) -> Values:
    return _one(call.required(0) - call.required(1))


@op("Mul")
def mul(call: OpCall) -> Values:
    return _one(call.required(0) * call.required(1))


@op("Div")
def div(call: OpCall) -> Values:
    import torch

    a, b = call.required(0), call.required(1)
    if _is_int(a) and _is_int(b):
        return _one(torch.div(a, b, rounding_mode="trunc"))  # C integer division
    return _one(a / b)


@op("Pow")
def pow_(call: OpCall) -> Values:
    import torch

    base, exponent = call.required(0), call.required(1)
    # The output has the base's type (the exponent may be of another type since opset 12).
    return _one(torch.pow(base, exponent).to(base.dtype))


@op("Mod")
def mod(call: OpCall) -> Values:
    import torch

    a, b = call.required(0), call.required(1)
    return _one(torch.fmod(a, b) if call.attr("fmod", 0) else torch.remainder(a, b))


def _unary(name: str, fn: Callable[[torch.Tensor], torch.Tensor], *, differentiable: bool = True) -> None:
    def impl(call: OpCall) -> Values:
        return _one(fn(call.required(0)))

    impl.__name__ = name.lower()
    op(name, differentiable=differentiable)(impl)


def _register_unary() -> None:
    import torch

    table: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "Sqrt": torch.sqrt,
        "Exp": torch.exp,
        "Log": torch.log,
        "Neg": torch.neg,
        "Abs": torch.abs,
        "Reciprocal": torch.reciprocal,
        "Erf": torch.erf,
        "Tanh": torch.tanh,
        "Sigmoid": torch.sigmoid,
        "Relu": torch.relu,
        "Sin": torch.sin,
        "Cos": torch.cos,
        "Tan": torch.tan,
        "Atan": torch.atan,
        "Softsign": lambda x: x / (1 + x.abs()),
        "Softplus": lambda x: torch.nn.functional.softplus(x),
        "Mish": lambda x: x * torch.tanh(torch.nn.functional.softplus(x)),
        "Identity": lambda x: x,
    }
    for name, fn in table.items():
        _unary(name, fn)
    piecewise: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "Floor": torch.floor,
        "Ceil": torch.ceil,
        "Round": torch.round,
        "Sign": torch.sign,
        "IsNaN": torch.isnan,
        "Not": torch.logical_not,
    }
    for name, fn in piecewise.items():
        _unary(name, fn, differentiable=False)


_table_ops_registered: list[bool] = []  # set once: the table-driven ops are registered


def ensure_registered() -> None:
    """Register the table-driven ops; they need torch, which is imported lazily, not at import."""
    if not _table_ops_registered:
        _register_unary()
        _register_reductions()
        _table_ops_registered.append(True)


@op("IsInf", differentiable=False)
def isinf(call: OpCall) -> Values:
    import torch

    x = call.required(0)
    positive, negative = call.attr("detect_positive", 1), call.attr("detect_negative", 1)
    return _one((torch.isposinf(x) & bool(positive)) | (torch.isneginf(x) & bool(negative)))


def _compare(name: str, fn_name: str) -> None:
    def impl(call: OpCall) -> Values:
        import torch

        return _one(getattr(torch, fn_name)(call.required(0), call.required(1)))

    op(name, differentiable=False)(impl)


for _name, _fn in {
    "Equal": "eq",
    "Less": "lt",
    "Greater": "gt",
    "LessOrEqual": "le",
    "GreaterOrEqual": "ge",
    "And": "logical_and",
    "Or": "logical_or",
    "Xor": "logical_xor",
    "BitwiseAnd": "bitwise_and",
}.items():
    _compare(_name, _fn)


def _variadic(call: OpCall, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    operands = [t for t in call.inputs if t is not None]
    return functools.reduce(fn, operands)


@op("Max")
def max_(call: OpCall) -> Values:
    import torch

    return _one(_variadic(call, torch.maximum))


@op("Min")
def min_(call: OpCall) -> Values:
    import torch

    return _one(_variadic(call, torch.minimum))


@op("Sum")
def sum_(call: OpCall) -> Values:
    return _one(_variadic(call, lambda a, b: a + b))


@op("Mean")
def mean_(call: OpCall) -> Values:
    operands = [t for t in call.inputs if t is not None]
    return _one(_variadic(call, lambda a, b: a + b) / len(operands))


@op("Where")
def where(call: OpCall) -> Values:
    import torch

    return _one(torch.where(call.required(0).bool(), call.required(1), call.required(2)))


# ---- activations ----------------------------------------------------------------------------


@op("LeakyRelu")
def leaky_relu(call: OpCall) -> Values:
    import torch.nn.functional as F

    return _one(F.leaky_relu(call.required(0), float(call.attr("alpha", 0.01))))


@op("PRelu")
def prelu(call: OpCall) -> Values:
    import torch

    x, slope = call.required(0), call.required(1)  # slope broadcasts to x (unidirectionally)
    return _one(torch.where(x < 0, slope * x, x))


@op("Elu")
def elu(call: OpCall) -> Values:
    import torch.nn.functional as F

    return _one(F.elu(call.required(0), float(call.attr("alpha", 1.0))))


@op("Celu")
def celu(call: OpCall) -> Values:
    import torch.nn.functional as F

    return _one(F.celu(call.required(0), float(call.attr("alpha", 1.0))))


# The spec's SELU constants, as float32 literals (they are stored as float attributes).
SELU_ALPHA = 1.67326319217681884765625
SELU_GAMMA = 1.05070102214813232421875


@op("Selu")
def selu(call: OpCall) -> Values:
    import torch

    x = call.required(0)
    alpha, gamma = float(call.attr("alpha", SELU_ALPHA)), float(call.attr("gamma", SELU_GAMMA))
    return _one(gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1)))


@op("HardSigmoid")
def hard_sigmoid(call: OpCall) -> Values:
    x = call.required(0)
    alpha, beta = float(call.attr("alpha", 0.2)), float(call.attr("beta", 0.5))
    return _one((alpha * x + beta).clamp(0.0, 1.0))


@op("HardSwish", since=14)
def hard_swish(call: OpCall) -> Values:
    x = call.required(0)
    return _one(x * (x / 6 + 0.5).clamp(0.0, 1.0))


@op("ThresholdedRelu")
def thresholded_relu(call: OpCall) -> Values:
    import torch

    x = call.required(0)
    return _one(torch.where(x > float(call.attr("alpha", 1.0)), x, torch.zeros_like(x)))


@op("Gelu", since=20)
def gelu(call: OpCall) -> Values:
    import torch.nn.functional as F

    approximate = call.attr("approximate", "none")
    return _one(F.gelu(call.required(0), approximate="tanh" if approximate == "tanh" else "none"))


@op("Clip")
def clip_attr(call: OpCall) -> Values:  # opsets 1-10: bounds are attributes
    return _one(call.required(0).clamp(float(call.attr("min", -math.inf)), float(call.attr("max", math.inf))))


@op("Clip", since=11)
def clip(call: OpCall) -> Values:  # opset 11+: bounds are optional inputs
    import torch

    x = call.required(0)
    low, high = call.input(1), call.input(2)
    if low is not None:
        x = torch.maximum(x, low.to(x.dtype))
    if high is not None:
        x = torch.minimum(x, high.to(x.dtype))
    return _one(x)


def _softmax_like(call: OpCall, kind: str) -> Values:
    import torch

    x = call.required(0)

    def apply(t: torch.Tensor, dim: int) -> torch.Tensor:
        if kind == "softmax":
            return torch.softmax(t, dim)
        if kind == "log_softmax":
            return torch.log_softmax(t, dim)
        hot = torch.nn.functional.one_hot(t.argmax(dim), t.shape[dim]).to(t.dtype)
        return hot.movedim(-1, dim)

    if call.opset >= 13:
        return _one(apply(x, _axis(int(call.attr("axis", -1)), x.dim())))
    # Before opset 13 the input is coerced to 2-D at ``axis`` (default 1) and normalised per row.
    axis = _axis(int(call.attr("axis", 1)), x.dim())
    rows = math.prod(x.shape[:axis])
    return _one(apply(x.reshape(rows, -1), 1).reshape(x.shape))


@op("Softmax")
@op("Softmax", since=13)
def softmax(call: OpCall) -> Values:
    return _softmax_like(call, "softmax")


@op("LogSoftmax")
@op("LogSoftmax", since=13)
def log_softmax(call: OpCall) -> Values:
    return _softmax_like(call, "log_softmax")


@op("Hardmax", differentiable=False)
@op("Hardmax", since=13, differentiable=False)
def hardmax(call: OpCall) -> Values:
    return _softmax_like(call, "hardmax")


# ---- tensors: constants, casts, shapes -----------------------------------------------------


@op("Constant", differentiable=False)
def constant(call: OpCall) -> Values:
    import torch

    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in call.attrs:
            value = call.attrs[key]
            if isinstance(value, torch.Tensor):
                return _one(value)
            dtype = torch.float32 if "float" in key else torch.int64
            return _one(torch.tensor(value, dtype=dtype))
    raise OpError(f"Constant with attribute(s) {sorted(call.attrs)} is not supported")


@op("ConstantOfShape", differentiable=False)
def constant_of_shape(call: OpCall) -> Values:
    import torch

    shape = ints(call.required(0))
    value = call.attr("value")
    if value is None:
        return _one(torch.zeros(shape, dtype=torch.float32))
    return _one(torch.full(shape, value.reshape(-1)[0].item(), dtype=value.dtype))


@op("Cast")
def cast(call: OpCall) -> Values:
    return _one(call.required(0).to(torch_dtype(int(call.attr("to")))))


@op("CastLike")
def cast_like(call: OpCall) -> Values:
    return _one(call.required(0).to(call.required(1).dtype))


@op("Shape", differentiable=False)
def shape(call: OpCall) -> Values:
    import torch

    dims = list(call.required(0).shape)
    start, end = call.attr("start", 0), call.attr("end")  # opset 15+; absent before
    return _one(torch.tensor(dims[start:end] if end is not None else dims[start:], dtype=torch.int64))


@op("Size", differentiable=False)
def size(call: OpCall) -> Values:
    import torch

    return _one(torch.tensor(call.required(0).numel(), dtype=torch.int64))


@op("Reshape", since=5)
def reshape(call: OpCall) -> Values:
    x = call.required(0)
    target = ints(call.required(1))
    allow_zero = bool(call.attr("allowzero", 0))  # opset 14+: 0 is a real zero, not 'copy'
    if not allow_zero:
        target = [x.shape[i] if d == 0 else d for i, d in enumerate(target)]
    return _one(x.reshape(target))


@op("Flatten")
def flatten(call: OpCall) -> Values:
    x = call.required(0)
    axis = _axis(int(call.attr("axis", 1)), x.dim())
    return _one(x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:])))


@op("Squeeze")
@op("Squeeze", since=13)
def squeeze(call: OpCall) -> Values:
    x = call.required(0)
    axes = _axes_operand(call, 13)
    if axes is None:
        return _one(x.squeeze())
    dims = sorted({_axis(a, x.dim()) for a in axes}, reverse=True)
    for d in dims:
        x = x.squeeze(d)
    return _one(x)


@op("Unsqueeze")
@op("Unsqueeze", since=13)
def unsqueeze(call: OpCall) -> Values:
    x = call.required(0)
    axes = _axes_operand(call, 13) or []
    rank = x.dim() + len(axes)  # negative axes count from the output's rank
    for d in sorted(_axis(a, rank) for a in axes):
        x = x.unsqueeze(d)
    return _one(x)


@op("Transpose")
def transpose(call: OpCall) -> Values:
    x = call.required(0)
    perm = call.attr("perm")
    return _one(x.permute(*(list(perm) if perm is not None else list(range(x.dim()))[::-1])))


@op("Concat")
def concat(call: OpCall) -> Values:
    import torch

    tensors = [t for t in call.inputs if t is not None]
    return _one(torch.cat(tensors, _axis(int(call.attr("axis")), tensors[0].dim())))


@op("Split")
@op("Split", since=13)
@op("Split", since=18)
def split(call: OpCall) -> Values:
    x = call.required(0)
    axis = _axis(int(call.attr("axis", 0)), x.dim())
    sizes = call.attr("split") if call.opset < 13 else (ints(call.input(1)) if call.input(1) is not None else None)
    if sizes:
        return list(x.split([int(s) for s in sizes], dim=axis))
    count = int(call.attr("num_outputs", call.num_outputs)) if call.opset >= 18 else call.num_outputs
    # Equal parts; from opset 18 an uneven split makes the last part smaller (ceil-sized parts).
    return list(x.split(math.ceil(x.shape[axis] / count), dim=axis))


@op("Slice")
def slice_attr(call: OpCall) -> Values:  # opset 1-9: starts/ends/axes are attributes
    return _slice(call.required(0), list(call.attr("starts")), list(call.attr("ends")), call.attr("axes"), None)


@op("Slice", since=10)
def slice_(call: OpCall) -> Values:
    axes = call.input(3)
    steps = call.input(4)
    return _slice(
        call.required(0),
        ints(call.required(1)),
        ints(call.required(2)),
        ints(axes) if axes is not None else None,
        ints(steps) if steps is not None else None,
    )


def _slice(
    x: torch.Tensor, starts: list[int], ends: list[int], axes: list[int] | None, steps: list[int] | None
) -> Values:
    import torch

    axes = list(range(len(starts))) if axes is None else [_axis(int(a), x.dim()) for a in axes]
    steps = steps or [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=False):
        dim = x.shape[axis]
        start = start + dim if start < 0 else start
        end = end + dim if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), dim), min(max(end, 0), dim)
            index = [slice(None)] * x.dim()
            index[axis] = slice(start, end, step)
            x = x[tuple(index)]
        else:  # torch slicing has no negative steps: gather the indices instead
            start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
            picked = torch.arange(start, end, step, device=x.device)
            x = x.index_select(axis, picked)
    return _one(x)


def _wrap_indices(indices: torch.Tensor, size: int) -> torch.Tensor:
    import torch

    indices = indices.long()
    return torch.where(indices < 0, indices + size, indices)


@op("Gather")
def gather(call: OpCall) -> Values:
    x, indices = call.required(0), call.required(1)
    axis = _axis(int(call.attr("axis", 0)), x.dim())
    flat = _wrap_indices(indices, x.shape[axis]).reshape(-1)
    picked = x.index_select(axis, flat)
    return _one(picked.reshape((*x.shape[:axis], *indices.shape, *x.shape[axis + 1 :])))


@op("GatherElements")
def gather_elements(call: OpCall) -> Values:
    import torch

    x, indices = call.required(0), call.required(1)
    axis = _axis(int(call.attr("axis", 0)), x.dim())
    return _one(torch.gather(x, axis, _wrap_indices(indices, x.shape[axis])))


@op("GatherND")
def gather_nd(call: OpCall) -> Values:
    x, indices = call.required(0), call.required(1)
    if int(call.attr("batch_dims", 0)) != 0:
        raise OpError("GatherND with batch_dims != 0 is not supported")
    depth = indices.shape[-1]
    index = tuple(_wrap_indices(indices[..., i], x.shape[i]) for i in range(depth))
    return _one(x[index])


@op("ScatterND")
def scatter_nd(call: OpCall) -> Values:
    x, indices, updates = call.required(0), call.required(1), call.required(2)
    if call.attr("reduction", "none") != "none":
        raise OpError(f"ScatterND with reduction={call.attr('reduction')!r} is not supported")
    depth = indices.shape[-1]
    index = tuple(_wrap_indices(indices[..., i], x.shape[i]) for i in range(depth))
    return _one(x.index_put(index, updates))


@op("ScatterElements")
def scatter_elements(call: OpCall) -> Values:
    x, indices, updates = call.required(0), call.required(1), call.required(2)
    if call.attr("reduction", "none") != "none":
        raise OpError(f"ScatterElements with reduction={call.attr('reduction')!r} is not supported")
    axis = _axis(int(call.attr("axis", 0)), x.dim())
    return _one(x.scatter(axis, _wrap_indices(indices, x.shape[axis]), updates))


@op("Expand")
def expand(call: OpCall) -> Values:
    import torch

    x = call.required(0)
    target = torch.broadcast_shapes(tuple(x.shape), tuple(ints(call.required(1))))  # bidirectional
    return _one(x.expand(target))


@op("Tile")
def tile(call: OpCall) -> Values:
    return _one(call.required(0).repeat(*ints(call.required(1))))


@op("Range", differentiable=False)
def range_(call: OpCall) -> Values:
    import torch

    start, limit, delta = call.required(0), call.required(1), call.required(2)
    return _one(torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype))


@op("Trilu")
def trilu(call: OpCall) -> Values:
    import torch

    x = call.required(0)
    k = int(_scalar(call.input(1), 0) or 0)
    return _one(torch.triu(x, k) if call.attr("upper", 1) else torch.tril(x, k))


@op("CumSum")
def cumsum(call: OpCall) -> Values:
    import torch

    x = call.required(0)
    axis = _axis(int(_scalar(call.required(1)) or 0), x.dim())
    if call.attr("reverse", 0):
        x = x.flip(axis)
    out = torch.cumsum(x, axis)
    if call.attr("exclusive", 0):
        out = out - x
    return _one(out.flip(axis) if call.attr("reverse", 0) else out)


@op("Pad")
@op("Pad", since=11)
def pad(call: OpCall) -> Values:
    import torch.nn.functional as F

    x = call.required(0)
    if call.opset < 11:
        pads, value = list(call.attr("pads")), float(call.attr("value", 0.0))
    else:
        pads, value = ints(call.required(1)), _scalar(call.input(2), 0.0) or 0.0
    axes = list(range(x.dim()))
    if call.opset >= 18 and call.input(3) is not None:
        axes = [_axis(a, x.dim()) for a in ints(call.input(3))]
    half = len(pads) // 2
    per_axis = {axis: (pads[i], pads[i + half]) for i, axis in enumerate(axes)}
    padded_axes = [axis for axis, amounts in per_axis.items() if amounts != (0, 0)]
    if not padded_axes:
        return _one(x)
    # F.pad lists (begin, end) from the last axis backwards, down to the first padded one.
    torch_pads = [v for axis in range(x.dim() - 1, min(padded_axes) - 1, -1) for v in per_axis.get(axis, (0, 0))]
    mode = call.attr("mode", "constant")
    torch_mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(mode)
    if torch_mode is None:
        raise OpError(f"Pad mode {mode!r} is not supported")
    if torch_mode == "constant":
        return _one(F.pad(x, torch_pads, mode="constant", value=value))
    return _one(F.pad(x, torch_pads, mode=torch_mode))


# ---- reductions -----------------------------------------------------------------------------


def _reduce(call: OpCall, attr_until: int, fn: Callable[[torch.Tensor, list[int], bool], torch.Tensor]) -> Values:
    x = call.required(0)
    axes = _axes_operand(call, attr_until)
    keepdims = bool(call.attr("keepdims", 1))
    if not axes:
        if call.attr("noop_with_empty_axes", 0) and call.opset >= attr_until:
            return _one(x)
        axes = list(range(x.dim()))
    return _one(fn(x, [_axis(a, x.dim()) for a in axes], keepdims))


def _register_reductions() -> None:
    import torch

    table: dict[str, Callable[[torch.Tensor, list[int], bool], torch.Tensor]] = {
        "ReduceMean": lambda x, d, k: x.mean(dim=d, keepdim=k),
        "ReduceSum": lambda x, d, k: x.sum(dim=d, keepdim=k),
        "ReduceMax": lambda x, d, k: x.amax(dim=d, keepdim=k),
        "ReduceMin": lambda x, d, k: x.amin(dim=d, keepdim=k),
        "ReduceProd": lambda x, d, k: _prod(x, d, k),
        "ReduceL1": lambda x, d, k: x.abs().sum(dim=d, keepdim=k),
        "ReduceL2": lambda x, d, k: x.pow(2).sum(dim=d, keepdim=k).sqrt(),
        "ReduceSumSquare": lambda x, d, k: x.pow(2).sum(dim=d, keepdim=k),
        "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k),
        "ReduceLogSum": lambda x, d, k: x.sum(dim=d, keepdim=k).log(),
    }
    for name, fn in table.items():
        # ReduceSum takes its axes as an input from opset 13, the others from opset 18.
        until = 13 if name == "ReduceSum" else 18

        def impl(
            call: OpCall, fn: Callable[[torch.Tensor, list[int], bool], torch.Tensor] = fn, until: int = until
        ) -> Values:
            return _reduce(call, until, fn)

        op(name)(impl)


def _prod(x: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    for d in sorted(dims, reverse=True):
        x = x.prod(dim=d, keepdim=keepdim)
    return x


def _arg(call: OpCall, largest: bool) -> Values:
    x = call.required(0)
    axis = _axis(int(call.attr("axis", 0)), x.dim())
    keepdims = bool(call.attr("keepdims", 1))
    if call.attr("select_last_index", 0):
        flipped = x.flip(axis)
        index = flipped.argmax(axis, keepdims) if largest else flipped.argmin(axis, keepdims)
        return _one(x.shape[axis] - 1 - index)
    return _one(x.argmax(axis, keepdims) if largest else x.argmin(axis, keepdims))


@op("ArgMax", differentiable=False)
def argmax(call: OpCall) -> Values:
    return _arg(call, True)


@op("ArgMin", differentiable=False)
def argmin(call: OpCall) -> Values:
    return _arg(call, False)


@op("TopK", since=10)
def topk(call: OpCall) -> Values:
    x = call.required(0)
    k = int(_scalar(call.required(1)) or 0)
    axis = _axis(int(call.attr("axis", -1)), x.dim())
    values, indices = x.topk(k, dim=axis, largest=bool(call.attr("largest", 1)), sorted=True)
    return [values, indices]


@op("NonZero", differentiable=False)
def nonzero(call: OpCall) -> Values:
    return _one(call.required(0).nonzero().T.contiguous())


# ---- linear algebra ------------------------------------------------------------------------


@op("MatMul")
def matmul(call: OpCall) -> Values:
    import torch

    return _one(torch.matmul(call.required(0), call.required(1)))


@op("Gemm")
def gemm(call: OpCall) -> Values:
    a, b, c = call.required(0), call.required(1), call.input(2)
    if call.attr("transA", 0):
        a = a.T
    if call.attr("transB", 0):
        b = b.T
    out = float(call.attr("alpha", 1.0)) * (a @ b)
    if c is not None:
        out = out + float(call.attr("beta", 1.0)) * c
    return _one(out)


@op("Einsum")
def einsum(call: OpCall) -> Values:
    import torch

    return _one(torch.einsum(str(call.attr("equation")), *[t for t in call.inputs if t is not None]))


# ---- convolution and pooling ----------------------------------------------------------------


def _same_pads(
    in_sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int], upper: bool
) -> list[int]:
    """SAME_UPPER/SAME_LOWER padding: output = ceil(input / stride); the odd pixel goes at the
    end (UPPER) or the beginning (LOWER)."""
    begins, ends = [], []
    for size, k, s, d in zip(in_sizes, kernel, strides, dilations, strict=False):
        out = -(-size // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        begins.append(small if upper else large)
        ends.append(large if upper else small)
    return begins + ends


def _conv_pads(
    call: OpCall, in_sizes: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]
) -> list[int]:
    auto_pad = call.attr("auto_pad", "NOTSET")
    n = len(kernel)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return _same_pads(in_sizes, kernel, strides, dilations, auto_pad == "SAME_UPPER")
    if auto_pad == "VALID":
        return [0] * (2 * n)
    return list(call.attr("pads", [0] * (2 * n)))


def _torch_pad_order(pads: Sequence[int]) -> list[int]:
    """ONNX [x1_begin, x2_begin, ..., x1_end, x2_end, ...] to F.pad's (last_begin, last_end, ...)."""
    n = len(pads) // 2
    out: list[int] = []
    for i in range(n - 1, -1, -1):
        out += [int(pads[i]), int(pads[i + n])]
    return out


def _spatial_fn(kind: str, n: int) -> Callable[..., torch.Tensor]:
    import torch.nn.functional as F

    if n not in (1, 2, 3):
        raise OpError(f"{kind} over {n} spatial dimensions is not supported")
    fn: Callable[..., torch.Tensor] = getattr(F, f"{kind}{n}d")
    return fn


@op("Conv")
def conv(call: OpCall) -> Values:
    import torch.nn.functional as F

    x, weight, bias = call.required(0), call.required(1), call.input(2)
    n = weight.dim() - 2
    kernel = list(call.attr("kernel_shape", weight.shape[2:]))
    strides = list(call.attr("strides", [1] * n))
    dilations = list(call.attr("dilations", [1] * n))
    pads = _conv_pads(call, x.shape[2:], kernel, strides, dilations)
    padding: list[int] | int = 0
    if pads[:n] == pads[n:]:
        padding = pads[:n]
    else:  # asymmetric padding: pad explicitly with zeros first
        x = F.pad(x, _torch_pad_order(pads))
    return _one(_spatial_fn("conv", n)(x, weight, bias, strides, padding, dilations, int(call.attr("group", 1))))


@op("ConvTranspose")
def conv_transpose(call: OpCall) -> Values:
    import torch.nn.functional as F

    x, weight, bias = call.required(0), call.required(1), call.input(2)
    n = weight.dim() - 2
    groups = int(call.attr("group", 1))
    kernel = list(call.attr("kernel_shape", weight.shape[2:]))
    strides = list(call.attr("strides", [1] * n))
    dilations = list(call.attr("dilations", [1] * n))
    output_padding = list(call.attr("output_padding", [0] * n))
    in_sizes = list(x.shape[2:])
    auto_pad = call.attr("auto_pad", "NOTSET")
    output_shape = call.attr("output_shape")
    if output_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if output_shape is not None:
            wanted = list(output_shape)[-n:]
        else:  # SAME_*: the output is input * stride
            wanted = [size * stride for size, stride in zip(in_sizes, strides, strict=True)]
        begins, ends = [], []
        for i in range(n):
            full = strides[i] * (in_sizes[i] - 1) + output_padding[i] + ((kernel[i] - 1) * dilations[i] + 1)
            total = full - wanted[i]
            if auto_pad == "SAME_UPPER":
                begins.append(total // 2)
                ends.append(total - total // 2)
            else:
                begins.append(total - total // 2)
                ends.append(total // 2)
        pads = begins + ends
    elif auto_pad == "VALID":
        pads = [0] * (2 * n)
    else:
        pads = list(call.attr("pads", [0] * (2 * n)))
    # Full transposed convolution, then output_padding zeros at the end and the pads cropped
    # (F.pad crops for negative amounts); the bias is added last so padded cells get it too.
    full = _spatial_fn("conv_transpose", n)(x, weight, None, strides, 0, 0, groups, dilations)
    crop = [(-pads[i], output_padding[i] - pads[i + n]) for i in range(n)]
    torch_pads = [v for i in range(n - 1, -1, -1) for v in crop[i]]
    out = F.pad(full, torch_pads) if any(torch_pads) else full
    if bias is not None:
        out = out + bias.reshape(1, -1, *([1] * n))
    return _one(out)


def _pool_geometry(call: OpCall, x: torch.Tensor) -> tuple[list[int], list[int], list[int], list[int]]:
    kernel = list(call.attr("kernel_shape"))
    n = len(kernel)
    strides = list(call.attr("strides", [1] * n))
    dilations = list(call.attr("dilations", [1] * n))
    pads = _conv_pads(call, x.shape[2:], kernel, strides, dilations)
    return kernel, strides, dilations, pads


@op("MaxPool")
def max_pool(call: OpCall) -> Values:
    import torch.nn.functional as F

    x = call.required(0)
    if call.num_outputs > 1:
        raise OpError("MaxPool's Indices output is not supported")
    kernel, strides, dilations, pads = _pool_geometry(call, x)
    n = len(kernel)
    ceil_mode = bool(call.attr("ceil_mode", 0))
    padding: list[int] = [0] * n
    if pads[:n] == pads[n:] and all(p <= k // 2 for p, k in zip(pads[:n], kernel, strict=False)):
        padding = pads[:n]
    elif any(pads):
        x = F.pad(x, _torch_pad_order(pads), value=-math.inf)  # padding never wins a max
    return _one(_spatial_fn("max_pool", n)(x, kernel, strides, padding, dilations, ceil_mode))


@op("AveragePool")
def average_pool(call: OpCall) -> Values:
    import torch
    import torch.nn.functional as F

    x = call.required(0)
    kernel, strides, dilations, pads = _pool_geometry(call, x)
    if any(d != 1 for d in dilations):
        raise OpError("AveragePool with dilations is not supported")
    n = len(kernel)
    ceil_mode = bool(call.attr("ceil_mode", 0))
    pool = _spatial_fn("avg_pool", n)
    if not any(pads):
        return _one(pool(x, kernel, strides, 0, ceil_mode, True))
    # Pad explicitly, then divide by the count of real cells when padding must not count: the
    # ratio of two average pools (values / ones mask) is exact for any pads, even asymmetric.
    padded = F.pad(x, _torch_pad_order(pads))
    summed = pool(padded, kernel, strides, 0, ceil_mode, True)
    if call.attr("count_include_pad", 0):
        return _one(summed)
    mask = F.pad(torch.ones_like(x[:1, :1]), _torch_pad_order(pads))
    return _one(summed / pool(mask, kernel, strides, 0, ceil_mode, True))


@op("GlobalAveragePool")
def global_average_pool(call: OpCall) -> Values:
    x = call.required(0)
    return _one(x.mean(dim=tuple(range(2, x.dim())), keepdim=True))


@op("GlobalMaxPool")
def global_max_pool(call: OpCall) -> Values:
    x = call.required(0)
    return _one(x.amax(dim=tuple(range(2, x.dim())), keepdim=True))


# ---- normalisation --------------------------------------------------------------------------


def _channel_view(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t.reshape(1, -1, *([1] * (rank - 2)))


@op("BatchNormalization")
@op("BatchNormalization", since=14)
def batch_norm(call: OpCall) -> Values:
    import torch

    x, scale, bias, mean, var = (call.required(i) for i in range(5))
    eps = float(call.attr("epsilon", 1e-5))
    momentum = float(call.attr("momentum", 0.9))
    # Opset 14+ says so with training_mode; before, extra outputs meant training.
    training = bool(call.attr("training_mode", 0)) if call.opset >= 14 else call.num_outputs > 1
    if not training:
        y = (x - _channel_view(mean, x.dim())) / torch.sqrt(_channel_view(var, x.dim()) + eps)
        return _one(y * _channel_view(scale, x.dim()) + _channel_view(bias, x.dim()))
    dims = [d for d in range(x.dim()) if d != 1]
    batch_var, batch_mean = torch.var_mean(x, dim=dims, correction=0)
    y = (x - _channel_view(batch_mean, x.dim())) / torch.sqrt(_channel_view(batch_var, x.dim()) + eps)
    y = y * _channel_view(scale, x.dim()) + _channel_view(bias, x.dim())
    running_mean = mean * momentum + batch_mean * (1 - momentum)
    running_var = var * momentum + batch_var * (1 - momentum)
    return [y, running_mean, running_var][: max(1, call.num_outputs)]


@op("InstanceNormalization")
def instance_norm(call: OpCall) -> Values:
    import torch.nn.functional as F

    return _one(
        F.instance_norm(
            call.required(0), weight=call.required(1), bias=call.required(2), eps=float(call.attr("epsilon", 1e-5))
        )
    )


@op("LayerNormalization", since=17)
def layer_norm(call: OpCall) -> Values:
    import torch

    x, scale, bias = call.required(0), call.required(1), call.input(2)
    axis = _axis(int(call.attr("axis", -1)), x.dim())
    eps = float(call.attr("epsilon", 1e-5))
    dims = list(range(axis, x.dim()))
    var, mean = torch.var_mean(x, dim=dims, keepdim=True, correction=0)
    inv_std = torch.rsqrt(var + eps)
    y = (x - mean) * inv_std * scale
    if bias is not None:
        y = y + bias
    return [y, mean, inv_std][: max(1, call.num_outputs)]


@op("RMSNormalization", since=23)
def rms_norm(call: OpCall) -> Values:
    import torch

    x, scale = call.required(0), call.required(1)
    axis = _axis(int(call.attr("axis", -1)), x.dim())
    eps = float(call.attr("epsilon", 1e-5))
    dims = list(range(axis, x.dim()))
    return _one(x * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps) * scale)


@op("GroupNormalization", since=18)
@op("GroupNormalization", since=21)
def group_norm(call: OpCall) -> Values:
    import torch

    x, scale, bias = call.required(0), call.required(1), call.required(2)
    groups = int(call.attr("num_groups"))
    eps = float(call.attr("epsilon", 1e-5))
    n, c = x.shape[0], x.shape[1]
    grouped = x.reshape(n, groups, -1)
    var, mean = torch.var_mean(grouped, dim=-1, keepdim=True, correction=0)
    y = ((grouped - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    if call.opset < 21:  # opset 18: scale and bias are per group
        scale = scale.repeat_interleave(c // groups)
        bias = bias.repeat_interleave(c // groups)
    return _one(y * _channel_view(scale, x.dim()) + _channel_view(bias, x.dim()))


@op("Dropout")
def dropout(call: OpCall) -> Values:
    import torch

    x = call.required(0)
    # Inference semantics (what onnxruntime runs unless training_mode is true): the identity.
    if call.opset >= 12 and call.input(2) is not None and bool(call.required(2).item()):
        raise OpError("Dropout with training_mode=true is random; it cannot be compared with onnxruntime")
    return [x, torch.ones_like(x, dtype=torch.bool)][: max(1, call.num_outputs)]


# ---- recurrent layers (ONNX layout: W [dirs, gates*H, I], R [dirs, gates*H, H], B [dirs, 2*gates*H])


def _activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    import torch

    table: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "Sigmoid": torch.sigmoid,
        "Tanh": torch.tanh,
        "Relu": torch.relu,
    }
    if name not in table:
        raise OpError(f"recurrent activation {name!r} is not supported")
    return table[name]


def _recurrent(
    call: OpCall, gates: int, default_acts: list[str], step: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
) -> Values:
    import torch

    x, w, r = call.required(0), call.required(1), call.required(2)
    b, seq_lens = call.input(3), call.input(4)
    h0, c0 = call.input(5), call.input(6) if call.op_type == "LSTM" else None
    peep = call.input(7) if call.op_type == "LSTM" else None
    layout = int(call.attr("layout", 0))
    if layout == 1:  # [batch, seq, ...] to [seq, batch, ...]
        x = x.transpose(0, 1)
        h0 = h0.transpose(0, 1) if h0 is not None else None
        c0 = c0.transpose(0, 1) if c0 is not None else None
    seq, batch = x.shape[0], x.shape[1]
    if seq_lens is not None and bool((seq_lens != seq).any()):
        raise OpError(f"{call.op_type} with variable sequence_lens is not supported")
    if call.attr("input_forget", 0):
        raise OpError("LSTM with input_forget=1 is not supported")
    direction = call.attr("direction", "forward")
    dirs = 2 if direction == "bidirectional" else 1
    hidden = int(call.attr("hidden_size", r.shape[-1]))
    acts = list(call.attr("activations", default_acts * dirs))
    clip = call.attr("clip")
    ys, hs, cs = [], [], []
    for d in range(dirs):
        reverse = direction == "reverse" or d == 1
        bias = b[d] if b is not None else torch.zeros(2 * gates * hidden, dtype=x.dtype, device=x.device)
        h = h0[d] if h0 is not None else torch.zeros(batch, hidden, dtype=x.dtype, device=x.device)
        c = c0[d] if c0 is not None else torch.zeros(batch, hidden, dtype=x.dtype, device=x.device)
        fns = [_activation_fn(a) for a in acts[d * len(default_acts) : (d + 1) * len(default_acts)]]
        # The input projection of every step at once: one matmul instead of ``seq``.
        projected = x @ w[d].T + bias[: gates * hidden]
        outputs = [torch.empty(0)] * seq
        for t in range(seq - 1, -1, -1) if reverse else range(seq):
            h, c_next = step(
                projected[t], h, c, r[d], bias[gates * hidden :], fns, clip, peep[d] if peep is not None else None, call
            )
            c = c_next if c_next is not None else c
            outputs[t] = h
        ys.append(torch.stack(outputs))
        hs.append(h)
        cs.append(c)
    y = torch.stack(ys, dim=1)  # [seq, dirs, batch, hidden]
    y_h, y_c = torch.stack(hs), torch.stack(cs)
    if layout == 1:
        y, y_h, y_c = y.permute(2, 0, 1, 3), y_h.transpose(0, 1), y_c.transpose(0, 1)
    return [y, y_h, y_c][: max(1, call.num_outputs)]


def _clipped(t: torch.Tensor, clip: float | None) -> torch.Tensor:
    return t if clip is None else t.clamp(-float(clip), float(clip))


def _lstm_step(
    xw: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    r: torch.Tensor,
    rb: torch.Tensor,
    fns: list[Callable[[torch.Tensor], torch.Tensor]],
    clip: float | None,
    peep: torch.Tensor | None,
    call: OpCall,
) -> tuple[torch.Tensor, torch.Tensor]:
    f, g, hf = fns
    i_, o_, f_, c_ = _clipped(xw + h @ r.T + rb, clip).chunk(4, dim=-1)  # gate order i, o, f, c
    if peep is not None:
        p_i, _p_o, p_f = peep.chunk(3)
        i_, f_ = i_ + p_i * c, f_ + p_f * c
    i, ff, ct = f(i_), f(f_), g(c_)
    c_new = ff * c + i * ct
    if peep is not None:
        o_ = o_ + peep.chunk(3)[1] * c_new
    return f(o_) * hf(c_new), c_new


def _gru_step(
    xw: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    r: torch.Tensor,
    rb: torch.Tensor,
    fns: list[Callable[[torch.Tensor], torch.Tensor]],
    clip: float | None,
    peep: torch.Tensor | None,
    call: OpCall,
) -> tuple[torch.Tensor, None]:
    f, g = fns
    hidden = h.shape[-1]
    xz, xr, xh = xw.split(hidden, dim=-1)  # gate order z, r, h
    rz, rr, rh = r.split(hidden, dim=0)
    bz, br, bh = rb.split(hidden)
    z = f(_clipped(xz + h @ rz.T + bz, clip))
    reset = f(_clipped(xr + h @ rr.T + br, clip))
    if call.attr("linear_before_reset", 0):
        candidate = g(_clipped(xh + reset * (h @ rh.T + bh), clip))
    else:
        candidate = g(_clipped(xh + (reset * h) @ rh.T + bh, clip))
    return (1 - z) * candidate + z * h, None


def _rnn_step(
    xw: torch.Tensor,
    h: torch.Tensor,
    c: torch.Tensor,
    r: torch.Tensor,
    rb: torch.Tensor,
    fns: list[Callable[[torch.Tensor], torch.Tensor]],
    clip: float | None,
    peep: torch.Tensor | None,
    call: OpCall,
) -> tuple[torch.Tensor, None]:
    return fns[0](_clipped(xw + h @ r.T + rb, clip)), None


@op("LSTM", since=7)
@op("LSTM", since=14)
def lstm(call: OpCall) -> Values:
    return _recurrent(call, 4, ["Sigmoid", "Tanh", "Tanh"], _lstm_step)


@op("GRU", since=7)
@op("GRU", since=14)
def gru(call: OpCall) -> Values:
    return _recurrent(call, 3, ["Sigmoid", "Tanh"], _gru_step)


@op("RNN", since=7)
@op("RNN", since=14)
def rnn(call: OpCall) -> Values:
    return _recurrent(call, 1, ["Tanh"], _rnn_step)


# ---- control flow: the lowering is eager, so the branch and the trip count are known --------


@op("If")
def if_(call: OpCall) -> Values:
    if call.run_subgraph is None:
        raise OpError("If needs a subgraph runner")
    condition = bool(call.required(0).reshape(-1)[0].item())
    branch = call.attr("then_branch") if condition else call.attr("else_branch")
    return call.run_subgraph(branch, [])


@op("Loop")
def loop(call: OpCall) -> Values:
    import torch

    if call.run_subgraph is None:
        raise OpError("Loop needs a subgraph runner")
    body = call.attr("body")
    max_trips = call.input(0)
    condition = call.input(1)
    carried: list[torch.Tensor | None] = list(call.inputs[2:])
    trips = int(max_trips.item()) if max_trips is not None else None
    keep_going = bool(condition.item()) if condition is not None else True
    scans: list[list[torch.Tensor]] = []
    i = 0
    while keep_going and (trips is None or i < trips):
        if trips is None and condition is None:
            raise OpError("Loop without a trip count or condition never ends")
        outputs = call.run_subgraph(body, [torch.tensor(i, dtype=torch.int64), torch.tensor(keep_going), *carried])
        keep_going = bool(outputs[0].item())
        carried = list(outputs[1 : 1 + len(carried)])
        scan_values = outputs[1 + len(carried) :]
        if not scans:
            scans = [[] for _ in scan_values]
        for store, value in zip(scans, scan_values, strict=False):
            store.append(value)
        i += 1
    stacked = [torch.stack(values) for values in scans]
    return [*carried, *stacked]


# ---- resampling and rearrangement -----------------------------------------------------------


@op("Resize", since=11)
def resize(call: OpCall) -> Values:
    """The modes exporters emit (nn.Upsample / F.interpolate), mapped to F.interpolate:
    nearest with asymmetric coordinates and floor rounding, (bi/tri)linear and cubic with
    half_pixel / pytorch_half_pixel / align_corners coordinates. Other combinations are refused."""
    import torch.nn.functional as F

    x = call.required(0)
    scales, sizes = call.input(2), call.input(3)
    spatial = x.dim() - 2
    if spatial not in (1, 2, 3):
        raise OpError(f"Resize of a {x.dim()}-D tensor is not supported")
    mode = call.attr("mode", "nearest")
    transform = call.attr("coordinate_transformation_mode", "half_pixel")
    keyword: dict[str, Any] = {}
    if sizes is not None and sizes.numel():
        target = ints(sizes)
        if target[:2] != list(x.shape[:2]):
            raise OpError("Resize of the batch or channel dimension is not supported")
        keyword["size"] = target[2:]
    elif scales is not None and scales.numel():
        factors = [float(v) for v in scales.reshape(-1).tolist()]
        if factors[:2] != [1.0, 1.0]:
            raise OpError("Resize of the batch or channel dimension is not supported")
        # ONNX maps coordinates with the given scale, not output/input: so does torch with
        # recompute_scale_factor=False.
        keyword.update(scale_factor=factors[2:], recompute_scale_factor=False)
    else:
        raise OpError("Resize needs scales or sizes")
    if mode == "nearest":
        if transform != "asymmetric" or call.attr("nearest_mode", "round_prefer_floor") != "floor":
            raise OpError(
                f"Resize nearest with {transform}/{call.attr('nearest_mode', 'round_prefer_floor')} "
                "is not supported (asymmetric/floor is)"
            )
        return _one(F.interpolate(x, mode="nearest", **keyword))
    torch_mode = {"linear": ["linear", "bilinear", "trilinear"][spatial - 1], "cubic": "bicubic"}.get(mode)
    if torch_mode is None or (mode == "cubic" and (spatial != 2 or float(call.attr("cubic_coeff_a", -0.75)) != -0.75)):
        raise OpError(f"Resize mode {mode!r} is not supported here")
    if transform == "align_corners":
        return _one(F.interpolate(x, mode=torch_mode, align_corners=True, **keyword))
    if transform in ("half_pixel", "pytorch_half_pixel"):
        return _one(F.interpolate(x, mode=torch_mode, align_corners=False, **keyword))
    raise OpError(f"Resize coordinate_transformation_mode {transform!r} is not supported")


@op("DepthToSpace")
def depth_to_space(call: OpCall) -> Values:
    x = call.required(0)
    block = int(call.attr("blocksize"))
    n, c, h, w = x.shape
    if call.attr("mode", "DCR") == "DCR":
        y = x.reshape(n, block, block, c // block**2, h, w).permute(0, 3, 4, 1, 5, 2)
    else:  # CRD: what nn.PixelShuffle computes
        y = x.reshape(n, c // block**2, block, block, h, w).permute(0, 1, 4, 2, 5, 3)
    return _one(y.reshape(n, c // block**2, h * block, w * block))


@op("SpaceToDepth")
def space_to_depth(call: OpCall) -> Values:
    x = call.required(0)
    block = int(call.attr("blocksize"))
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // block, block, w // block, block).permute(0, 3, 5, 1, 2, 4)
    return _one(y.reshape(n, c * block**2, h // block, w // block))


@op("LRN")
def lrn(call: OpCall) -> Values:
    import torch.nn.functional as F

    return _one(
        F.local_response_norm(
            call.required(0),
            int(call.attr("size")),
            alpha=float(call.attr("alpha", 1e-4)),
            beta=float(call.attr("beta", 0.75)),
            k=float(call.attr("bias", 1.0)),
        )
    )
