"""Where an ONNX graph keeps its parameters: the parameter map.

Exporters store weights in different places. The torch exporters write initializers;
Paddle2ONNX writes every weight as a ``Constant`` node; some exporters put Identity, Cast,
Transpose, Reshape, Unsqueeze or Squeeze nodes between the stored tensor and the layer that
reads it (``W -> Transpose -> MatMul``). :func:`parameter_map` finds every stored floating-point
tensor (a *source*: an initializer or a Constant node's value), follows each of its uses through
that plumbing to the node it reaches (the *owner* and the owner's input slot), and decides which
uses make it a parameter. The probe (row plan and lowering), the gate's scan, fold-bn and reinit
read weights through this one map, so they agree on what a parameter is.

A use is a parameter use when the tensor reaches a weight or bias slot (``PARAM_SLOTS``: Conv's
W and B, BatchNormalization's scale and bias, Gemm, MatMul, PRelu's slope, ...), or when it is a
non-scalar operand of other arithmetic (a learned per-channel scale ``Mul(x, s)``, a separate
bias ``Add(conv, b)``, which is how Paddle2ONNX writes many biases). Configuration inputs are
never parameters: Resize scales, Pad values, Clip bounds, shapes, BatchNormalization's running
mean and variance. Scalars (``0.5``, ``sqrt(2)``) are constants, not weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    import onnx

# Input slots that hold parameters, for ops where other float inputs are not parameters.
PARAM_SLOTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "BatchNormalization": (1, 2),
    "LayerNormalization": (1, 2),
    "InstanceNormalization": (1, 2),
    "GroupNormalization": (1, 2),
    "RMSNormalization": (1,),
    "LSTM": (1, 2, 3, 7),
    "GRU": (1, 2, 3),
    "RNN": (1, 2, 3),
    "Gather": (0,),
    "PRelu": (1,),
    "Gemm": (0, 1, 2),
    "MatMul": (0, 1),
    "Einsum": tuple(range(16)),
}
# Inputs that configure an op rather than feed it data: never parameters, whatever their type.
CONFIG_SLOTS: dict[str, tuple[int, ...]] = {
    "Resize": (1, 2, 3),
    "Upsample": (1,),
    "Pad": (1, 2, 3),
    "Clip": (1, 2),
    "Reshape": (1,),
    "Expand": (1,),
    "Tile": (1,),
    "Slice": (1, 2, 3, 4),
    "ConstantOfShape": (0,),
    "Range": (0, 1, 2),
    "TopK": (1,),
    "Dropout": (1, 2),
    "Where": (0,),
    "Pow": (1,),
    "Unsqueeze": (1,),
    "Squeeze": (1,),
    "ReduceMean": (1,),
    "ReduceSum": (1,),
    "Split": (1,),
    "OneHot": (1, 2),
    "CumSum": (1,),
}
# Ops whose every float input is data, so that a non-scalar constant operand is a learned tensor
# (a per-channel scale or a bias the exporter kept out of the layer).
_ARITHMETIC = frozenset({"Add", "Sub", "Mul"})
# Ops exporters put between a stored weight and its layer (W^T, a dtype cast, a reshape).
PLUMBING = frozenset({"Transpose", "Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "CastLike"})
# How far a weight is followed through plumbing: exporters use one or two such nodes.
_MAX_HOPS = 8
FLOAT_TYPES = frozenset({1, 10, 11, 16})  # float, float16, double, bfloat16


@dataclass(frozen=True)
class Source:
    """A stored tensor: an initializer, or the value of a Constant node (``node`` is its position)."""

    name: str  # the graph value: the initializer's name or the Constant's output
    tensor: onnx.TensorProto
    node: int | None = None

    @property
    def numel(self) -> int:
        return math.prod(int(d) for d in self.tensor.dims)

    @property
    def is_float(self) -> bool:
        return self.tensor.data_type in FLOAT_TYPES


@dataclass(frozen=True)
class Use:
    """One use of a source: read at (``consumer``, ``slot``), reaching (``owner``, ``owner_slot``)
    after the plumbing nodes ``path`` (consumer first; empty when the consumer is the owner)."""

    source: str
    consumer: int
    slot: int
    owner: int
    owner_slot: int
    path: tuple[int, ...]
    parameter: bool


@dataclass
class ParameterMap:
    graph: onnx.GraphProto
    sources: dict[str, Source] = field(default_factory=dict)
    uses: dict[str, list[Use]] = field(default_factory=dict)  # source -> its uses, in node order
    producer: dict[str, int] = field(default_factory=dict)
    consumers: dict[str, list[int]] = field(default_factory=dict)
    outputs: set[str] = field(default_factory=set)

    @property
    def parameters(self) -> list[str]:
        """Sources with at least one parameter use, in the order they are stored."""
        return [name for name, uses in self.uses.items() if any(use.parameter for use in uses)]

    def is_parameter(self, name: str) -> bool:
        return any(use.parameter for use in self.uses.get(name, []))

    def array(self, name: str) -> npt.NDArray[Any]:
        """A source's values (a copy, safe to modify)."""
        from onnx import numpy_helper

        return numpy_helper.to_array(self.sources[name].tensor).copy()

    def trace(self, value: str) -> tuple[Source, tuple[int, ...]] | None:
        """The source ``value`` is computed from through plumbing, and the plumbing nodes in
        forward order; None when ``value`` is not a constant of that kind."""
        path: list[int] = []
        while value not in self.sources:
            position = self.producer.get(value)
            if position is None or len(path) >= _MAX_HOPS:
                return None
            node = self.graph.node[position]
            if node.op_type not in PLUMBING or not node.input or node.op_type == "CastLike":
                return None
            if any(name and self.constant(name) is None for name in node.input[1:]):
                return None
            path.append(position)
            value = node.input[0]
        return self.sources[value], tuple(reversed(path))

    def value(self, name: str) -> npt.NDArray[Any] | None:
        """The value of a graph value computed only from a source through plumbing (None if not)."""
        found = self.trace(name)
        if found is None:
            return None
        source, path = found
        return self.evaluate(self.array(source.name), path)

    def constant(self, name: str) -> npt.NDArray[Any] | None:
        """The value of an initializer or a Constant node's output, any type."""
        from onnx import numpy_helper

        source = self.sources.get(name)
        if source is not None:
            return numpy_helper.to_array(source.tensor)
        position = self.producer.get(name)
        if position is None or self.graph.node[position].op_type != "Constant":
            return None
        return constant_array(self.graph.node[position])

    def evaluate(self, array: npt.NDArray[Any], path: tuple[int, ...]) -> npt.NDArray[Any]:
        """``array`` carried through the plumbing nodes ``path`` (numpy, the ONNX semantics)."""
        for position in path:
            node = self.graph.node[position]
            extra = [self.constant(name) if name else None for name in node.input[1:]]
            array = plumb(node, array, extra)
        return array

    def to_source(self, values: npt.NDArray[Any], source: Source, path: tuple[int, ...]) -> npt.NDArray[Any]:
        """Values laid out as they reach the end of ``path``, mapped back to the stored layout.

        Every plumbing op moves or casts elements without combining them, so the inverse exists:
        transposes are undone, reshapes go back to the shape that entered them, casts are left to
        the caller (who stores in the source's dtype).
        """
        import numpy as np

        shapes = []
        array = self.array(source.name)
        for position in path:
            shapes.append(array.shape)
            array = self.evaluate(array, (position,))
        if tuple(values.shape) != tuple(array.shape):
            raise ValueError(f"values of shape {tuple(values.shape)} for a weight of shape {tuple(array.shape)}")
        for position, shape in zip(reversed(path), reversed(shapes), strict=True):
            node = self.graph.node[position]
            if node.op_type == "Transpose":
                perm = _perm(node, values.ndim)
                values = np.transpose(values, np.argsort(perm))
            else:
                values = values.reshape(shape)
        return values


def constant_array(node: onnx.NodeProto) -> npt.NDArray[Any] | None:
    """The value of a Constant node (its tensor, float(s), int(s)); None for sparse or strings."""
    import numpy as np
    from onnx import numpy_helper

    for attribute in node.attribute:
        if attribute.name == "value":
            return numpy_helper.to_array(attribute.t)
        if attribute.name == "value_float":
            return np.asarray(attribute.f, dtype=np.float32)
        if attribute.name == "value_floats":
            return np.asarray(list(attribute.floats), dtype=np.float32)
        if attribute.name == "value_int":
            return np.asarray(attribute.i, dtype=np.int64)
        if attribute.name == "value_ints":
            return np.asarray(list(attribute.ints), dtype=np.int64)
    return None


def _constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The stored tensor of a Constant node holding floats; None for any other Constant."""
    from onnx import numpy_helper

    for attribute in node.attribute:
        if attribute.name == "value":
            return attribute.t if attribute.t.data_type in FLOAT_TYPES else None
        if attribute.name in ("value_float", "value_floats"):
            array = constant_array(node)
            return None if array is None else numpy_helper.from_array(array, node.output[0])
    return None


def parameter_map(graph: onnx.GraphProto) -> ParameterMap:
    """Every stored float tensor of the main graph and where each of its uses leads."""
    found = ParameterMap(graph=graph)
    for position, node in enumerate(graph.node):
        for name in node.output:
            if name:
                found.producer[name] = position
        for name in node.input:
            if name:
                found.consumers.setdefault(name, []).append(position)
    found.outputs = {o.name for o in graph.output}
    graph_inputs = {value.name for value in graph.input}
    for init in graph.initializer:
        # An initializer that is also a graph input (IR < 4) can be overridden at run time; it is
        # still the model's stored parameter, as it always was for gradcheck.
        if init.data_type in FLOAT_TYPES and init.name not in found.sources:
            found.sources[init.name] = Source(init.name, init)
    for position, node in enumerate(graph.node):
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or not node.output:
            continue
        name = node.output[0]
        if name in found.sources or name in graph_inputs:
            continue
        tensor = _constant_tensor(node)
        if tensor is not None:
            found.sources[name] = Source(name, tensor, position)
    for name, source in found.sources.items():
        found.uses[name] = _uses(found, source)
    return found


def _only_consumer(pmap: ParameterMap, name: str) -> int | None:
    readers = pmap.consumers.get(name, [])
    return readers[0] if len(readers) == 1 and name not in pmap.outputs else None


def _uses(pmap: ParameterMap, source: Source) -> list[Use]:
    uses = []
    for position in dict.fromkeys(pmap.consumers.get(source.name, [])):
        node = pmap.graph.node[position]
        for slot, input_name in enumerate(node.input):
            if input_name != source.name:
                continue
            owner, owner_slot, value = position, slot, source.name
            path: list[int] = []
            # Follow single-consumer plumbing on the data input only: a Reshape's shape input is
            # configuration, not a weight on its way to a layer.
            while pmap.graph.node[owner].op_type in PLUMBING and owner_slot == 0 and len(path) < _MAX_HOPS:
                following = _only_consumer(pmap, pmap.graph.node[owner].output[0])
                if following is None:
                    break
                path.append(owner)
                value = pmap.graph.node[owner].output[0]
                owner = following
                owner_slot = list(pmap.graph.node[owner].input).index(value)
            uses.append(
                Use(
                    source.name,
                    position,
                    slot,
                    owner,
                    owner_slot,
                    tuple(path),
                    _is_parameter(pmap, source, owner, owner_slot),
                )
            )
    return uses


def _is_parameter(pmap: ParameterMap, source: Source, owner: int, slot: int) -> bool:
    node = pmap.graph.node[owner]
    slots = PARAM_SLOTS.get(node.op_type)
    if slots is not None:
        return slot in slots
    if slot in CONFIG_SLOTS.get(node.op_type, ()) or source.numel <= 1:
        return False  # scalars feeding arithmetic are constants, not weights
    if source.node is None:
        return True  # an initializer: the torch exporters' parameters (and buffers) live there
    # A Constant node is an exporter's way of writing any constant (masks, tables, shapes):
    # only learned operands of arithmetic count beyond the weight slots.
    return node.op_type in _ARITHMETIC


def _perm(node: onnx.NodeProto, rank: int) -> list[int]:
    for attribute in node.attribute:
        if attribute.name == "perm":
            return [int(p) for p in attribute.ints]
    return list(reversed(range(rank)))


def _attribute(node: onnx.NodeProto, name: str) -> Any:
    import onnx

    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return None


def _axes(node: onnx.NodeProto, extra: list[Any]) -> list[int] | None:
    axes = _attribute(node, "axes")
    if axes is None and extra and extra[0] is not None:
        axes = [int(a) for a in extra[0].reshape(-1)]
    return None if axes is None else [int(a) for a in axes]


def plumb(node: onnx.NodeProto, array: np.ndarray[Any, Any], extra: list[Any]) -> np.ndarray[Any, Any]:
    """One plumbing node (``PLUMBING`` but CastLike) applied to a constant ``array``; ``extra``
    are its other inputs' values (a Reshape's shape, an opset-13 Unsqueeze's axes)."""
    import numpy as np
    import onnx

    op = node.op_type
    if op == "Identity":
        return array
    if op == "Cast":
        return array.astype(onnx.helper.tensor_dtype_to_np_dtype(int(_attribute(node, "to"))))
    if op == "Transpose":
        return np.transpose(array, _perm(node, array.ndim))
    if op == "Reshape":
        shape = [int(d) for d in extra[0].reshape(-1)]
        if not _attribute(node, "allowzero"):
            shape = [array.shape[i] if d == 0 else d for i, d in enumerate(shape)]
        return array.reshape(shape)
    if op == "Flatten":
        axis = int(_attribute(node, "axis") if _attribute(node, "axis") is not None else 1) % (array.ndim + 1)
        return array.reshape(math.prod(array.shape[:axis]), -1)
    if op == "Unsqueeze":
        axes = _axes(node, extra) or []
        rank = array.ndim + len(axes)
        for axis in sorted(a % rank for a in axes):
            array = np.expand_dims(array, axis)
        return array
    if op == "Squeeze":
        squeezed = _axes(node, extra)
        if squeezed is None:
            return np.squeeze(array)
        return np.squeeze(array, axis=tuple(a % array.ndim for a in squeezed))
    raise ValueError(f"{op} is not evaluated on constants")
