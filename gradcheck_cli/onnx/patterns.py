"""Recognise activations in an ONNX graph, including the decomposed forms exporters emit.

Exporters often spell an activation as several nodes: SiLU as ``x * Sigmoid(x)``, HardSwish
as ``x * HardSigmoid(x)`` (before opset 14), ReLU6 as ``Clip(x, 0, 6)`` and GELU as
``0.5 * x * (1 + Erf(x / sqrt(2)))`` (before opset 20). Each match becomes one activation row
anchored at the node whose output is the activation's value; the helper nodes it absorbs get
no rows of their own, so the report reads like the source model's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx

# Single ONNX ops that are activations, by the probe's normalised names (probe/activations.py).
DIRECT_ACTIVATIONS = {
    "Relu": "relu",
    "LeakyRelu": "leaky_relu",
    "PRelu": "prelu",
    "Elu": "elu",
    "Selu": "selu",
    "Celu": "celu",
    "Gelu": "gelu",
    "Mish": "mish",
    "HardSwish": "hardswish",
    "Sigmoid": "sigmoid",
    "Tanh": "tanh",
    "HardSigmoid": "hardsigmoid",
    "Softsign": "softsign",
    "Softplus": "softplus",
}
# How a recognised function is shown in the row's ``type`` when it spans several nodes.
PATTERN_TYPES = {
    "silu": "SiLU",
    "hardswish": "HardSwish",
    "gelu": "GELU",
    "relu6": "ReLU6",
    "hardtanh": "Hardtanh",
    "relu": "Relu",
}

_CONST_TOLERANCE = 1e-4


@dataclass
class GraphIndex:
    """Who produces and who consumes each value, and the values known without running."""

    graph: onnx.GraphProto
    producer: dict[str, int] = field(default_factory=dict)
    consumers: dict[str, list[int]] = field(default_factory=dict)
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)
    outputs: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, graph: onnx.GraphProto) -> GraphIndex:
        index = cls(graph=graph)
        for position, node in enumerate(graph.node):
            for name in node.output:
                if name:
                    index.producer[name] = position
            for name in node.input:
                if name:
                    index.consumers.setdefault(name, []).append(position)
        index.initializers = {init.name: init for init in graph.initializer}
        index.outputs = {o.name for o in graph.output}
        return index

    def node(self, position: int) -> onnx.NodeProto:
        node: onnx.NodeProto = self.graph.node[position]
        return node

    def producer_of(self, name: str) -> onnx.NodeProto | None:
        position = self.producer.get(name)
        return None if position is None else self.graph.node[position]

    def only_consumer(self, name: str) -> int | None:
        """The single node reading ``name`` (None when several read it or it is a graph output)."""
        readers = self.consumers.get(name, [])
        return readers[0] if len(readers) == 1 and name not in self.outputs else None

    def constant(self, name: str) -> Any | None:
        """The numpy value of an initializer or Constant node output (None when not constant)."""
        from onnx import numpy_helper

        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer_of(name)
        if node is not None and node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    return numpy_helper.to_array(attribute.t)
                if attribute.name in ("value_float", "value_int"):
                    return attribute.f if attribute.name == "value_float" else attribute.i
        if node is not None and node.op_type in ("Cast", "Identity") and node.input:
            return self.constant(node.input[0])
        return None

    def scalar(self, name: str) -> float | None:
        import numpy as np

        value = self.constant(name) if name else None
        if value is None:
            return None
        array = np.asarray(value)
        return float(array.reshape(-1)[0]) if array.size == 1 else None


@dataclass(frozen=True)
class Activation:
    fn: str
    anchor: int  # node producing the activation's output; the row is named after it
    output: str
    source: str  # the activation's input (x)
    absorbed: tuple[int, ...] = ()  # helper nodes that belong to the pattern
    params: dict[str, float] = field(default_factory=dict)
    pattern: bool = False  # recognised from several nodes (shown with a PATTERN_TYPES type)


def _close(value: float | None, target: float) -> bool:
    return value is not None and abs(value - target) <= _CONST_TOLERANCE * max(1.0, abs(target))


def _attr(node: onnx.NodeProto, name: str, default: float) -> float:
    for attribute in node.attribute:
        if attribute.name == name:
            return float(attribute.f)
    return default


def _clip_bounds(index: GraphIndex, node: onnx.NodeProto) -> tuple[float | None, float | None, bool]:
    """(min, max, known): the bounds of a Clip, from attributes (opset < 11) or constant inputs."""
    low: float | None = None
    high: float | None = None
    for attribute in node.attribute:
        if attribute.name == "min":
            low = float(attribute.f)
        elif attribute.name == "max":
            high = float(attribute.f)
    known = True
    for slot in (1, 2):
        if len(node.input) > slot and node.input[slot]:
            value = index.scalar(node.input[slot])
            known = known and value is not None
            if slot == 1:
                low = value
            else:
                high = value
    return low, high, known


def _other_operand(node: onnx.NodeProto, name: str) -> str | None:
    if len(node.input) != 2:
        return None
    if node.input[0] == name:
        return str(node.input[1])
    if node.input[1] == name:
        return str(node.input[0])
    return None


def _gated(index: GraphIndex, position: int, gate_op: str) -> tuple[int, str] | None:
    """``x * Gate(x)`` at Mul ``position``: (gate node, x), when the gate feeds only this Mul."""
    node = index.node(position)
    if node.op_type != "Mul" or len(node.input) != 2:
        return None
    for gate_name, x in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
        gate_position = index.producer.get(gate_name)
        if gate_position is None:
            continue
        gate = index.node(gate_position)
        if gate.op_type == gate_op and gate.input and gate.input[0] == x and index.only_consumer(gate_name) == position:
            return gate_position, x
    return None


def _gelu_from_erf(index: GraphIndex, erf_position: int) -> Activation | None:
    """0.5 * x * (1 + erf(x / sqrt 2)), in any association order exporters produce."""
    erf = index.node(erf_position)
    scaled = index.producer_of(erf.input[0])
    if scaled is None or scaled.op_type not in ("Div", "Mul") or len(scaled.input) != 2:
        return None
    x = scaled.input[0]
    factor = index.scalar(scaled.input[1])
    if not (_close(factor, math.sqrt(2)) if scaled.op_type == "Div" else _close(factor, 1 / math.sqrt(2))):
        return None
    return _gelu_tail(index, erf_position, x, [index.producer[erf.input[0]]])


def _gelu_from_tanh(index: GraphIndex, tanh_position: int) -> Activation | None:
    """0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))): GELU's tanh approximation
    (GPT-2's gelu_new), whose Tanh must not be reported as a saturating tanh."""
    tanh = index.node(tanh_position)
    scaled = index.producer_of(tanh.input[0])
    if scaled is None or scaled.op_type != "Mul" or len(scaled.input) != 2:
        return None
    for inner_name, factor_name in ((scaled.input[0], scaled.input[1]), (scaled.input[1], scaled.input[0])):
        inner = index.producer_of(inner_name)
        if not _close(index.scalar(factor_name), math.sqrt(2 / math.pi)) or inner is None:
            continue
        if inner.op_type != "Add" or len(inner.input) != 2:
            continue
        for x, cubic_name in ((inner.input[0], inner.input[1]), (inner.input[1], inner.input[0])):
            cubic = index.producer_of(cubic_name)
            if cubic is not None and cubic.op_type == "Mul":
                helpers = [index.producer[n] for n in (tanh.input[0], inner_name, cubic_name)]
                for name in cubic.input:  # 0.044715 * x^3, x^3 = Pow(x, 3) or x*x*x
                    power = index.producer_of(name)
                    if power is not None and power.op_type in ("Pow", "Mul"):
                        helpers.append(index.producer[name])
                return _gelu_tail(index, tanh_position, x, helpers)
    return None


def _gelu_tail(index: GraphIndex, core_position: int, x: str, helpers: list[int]) -> Activation | None:
    """The common end of both GELU forms: (1 + core) times x and 0.5, in any order."""
    core = index.node(core_position)
    add_position = index.only_consumer(core.output[0])
    if add_position is None or index.node(add_position).op_type != "Add":
        return None
    add = index.node(add_position)
    if not _close(index.scalar(_other_operand(add, core.output[0]) or ""), 1.0):
        return None
    absorbed = [*helpers, core_position, add_position]
    value, seen_x, seen_half = add.output[0], False, False
    for _ in range(2):
        mul_position = index.only_consumer(value) if not (seen_x and seen_half) else None
        if mul_position is None or index.node(mul_position).op_type != "Mul":
            break
        mul = index.node(mul_position)
        other = _other_operand(mul, value)
        if other is None:
            return None
        half_x = index.producer_of(other)
        if other == x:
            seen_x = True
        elif _close(index.scalar(other), 0.5):
            seen_half = True
        elif (
            half_x is not None
            and half_x.op_type == "Mul"
            and x in half_x.input
            and _close(index.scalar(_other_operand(half_x, x) or ""), 0.5)
        ):
            seen_x = seen_half = True
            absorbed.append(index.producer[other])
        else:
            return None
        absorbed.append(mul_position)
        value = mul.output[0]
        if seen_x and seen_half:
            return Activation("gelu", mul_position, value, x, tuple(absorbed[:-1]), pattern=True)
    return None


def recognise_activations(index: GraphIndex) -> list[Activation]:
    """Every activation of the graph, single-node or decomposed, in node order."""
    found: dict[int, Activation] = {}
    absorbed: set[int] = set()
    for position, node in enumerate(index.graph.node):
        if node.op_type in ("Erf", "Tanh") and node.input:
            gelu = _gelu_from_erf(index, position) if node.op_type == "Erf" else _gelu_from_tanh(index, position)
            if gelu is not None and not (set(gelu.absorbed) | {gelu.anchor}) & absorbed:
                found[gelu.anchor] = gelu
                absorbed.update(gelu.absorbed)
        elif node.op_type == "Mul":
            silu = _gated(index, position, "Sigmoid")
            if silu is not None:
                found[position] = Activation("silu", position, node.output[0], silu[1], (silu[0],), pattern=True)
                absorbed.add(silu[0])
                continue
            hard = _gated(index, position, "HardSigmoid")
            if hard is not None:
                gate = index.node(hard[0])
                if _close(_attr(gate, "alpha", 0.2), 1 / 6) and _close(_attr(gate, "beta", 0.5), 0.5):
                    found[position] = Activation(
                        "hardswish", position, node.output[0], hard[1], (hard[0],), pattern=True
                    )
                    absorbed.add(hard[0])
        elif node.op_type == "Clip":
            low, high, known = _clip_bounds(index, node)
            if not known:
                continue
            if _close(low, 0.0) and _close(high, 6.0):
                found[position] = Activation("relu6", position, node.output[0], node.input[0], pattern=True)
            elif _close(low, 0.0) and high is None:
                found[position] = Activation("relu", position, node.output[0], node.input[0], pattern=True)
            elif low is not None and high is not None:
                found[position] = Activation(
                    "hardtanh",
                    position,
                    node.output[0],
                    node.input[0],
                    params={"min_val": low, "max_val": high},
                    pattern=True,
                )
    for position, node in enumerate(index.graph.node):
        fn = DIRECT_ACTIVATIONS.get(node.op_type)
        if fn is not None and position not in absorbed and position not in found and node.output:
            params = {"beta": 1.0} if fn == "softplus" else {}
            found[position] = Activation(fn, position, node.output[0], node.input[0], params=params)
    return [found[p] for p in sorted(found)]
