"""Which ONNX nodes become report rows, and which initializers are each row's parameters.

Rows follow the PyTorch probe's contract: a row per layer with parameters (Conv, ConvTranspose,
Gemm, MatMul with a weight, Gather of an embedding table, LSTM/GRU/RNN), per normalisation
(BatchNormalization, LayerNormalization, ...), per activation (single ops and the decomposed
patterns of :mod:`.patterns`), and per other node that owns a trainable initializer. Rows are
in node order (topological) and named by node name, or by output name when the node has none.

A trainable initializer is a floating-point initializer that is a parameter in the source
model: it is owned by the first node that consumes it (looking through Transpose/Cast/...
chains exporters put in front of weights). BatchNormalization's running mean and variance and
scalar constants (0.5, sqrt(2), clip bounds) are not parameters. ``MatMul(x, W) + b`` with an
initializer ``b`` is one row (an nn.Linear on 3-D inputs), so it matches the PyTorch probe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gradcheck_cli.onnx.lower import node_label
from gradcheck_cli.onnx.patterns import PATTERN_TYPES, GraphIndex, recognise_activations
from gradcheck_cli.records import RowKind

if TYPE_CHECKING:
    import onnx

PARAM_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Gather", "LSTM", "GRU", "RNN", "Einsum"})
NORM_OPS = frozenset({"BatchNormalization", "LayerNormalization", "InstanceNormalization",
                      "GroupNormalization", "RMSNormalization"})
# Input slots that hold parameters, for ops where other initializer inputs are not parameters.
PARAM_SLOTS = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "BatchNormalization": (1, 2), "LayerNormalization": (1, 2),
    "InstanceNormalization": (1, 2), "GroupNormalization": (1, 2), "RMSNormalization": (1,),
    "LSTM": (1, 2, 3, 7), "GRU": (1, 2, 3), "RNN": (1, 2, 3), "Gather": (0,), "PRelu": (1,),
    "Gemm": (0, 1, 2), "MatMul": (0, 1), "Einsum": tuple(range(16)),
}
# Ops exporters put between a weight and its layer (W^T, a dtype cast): looked through.
_WEIGHT_PLUMBING = frozenset({"Transpose", "Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze",
                              "Flatten", "CastLike"})
# Producers whose outputs are laid out (N, C, ...): a following activation's units are channels.
_CHANNEL_FIRST_OPS = frozenset({"Conv", "ConvTranspose", "BatchNormalization", "InstanceNormalization",
                                "GroupNormalization", "MaxPool", "AveragePool", "GlobalAveragePool",
                                "LpPool", "Resize", "Upsample"})
_FLOAT_TYPES = frozenset({1, 10, 11, 16})  # float, float16, double, bfloat16


@dataclass
class RowPlan:
    name: str
    type: str
    kind: RowKind
    node: int  # position of the node the row is named after
    output: str  # the value whose statistics the row reports
    module: str  # the node's name scope ('' when the exporter gave none)
    fn: str | None = None
    fn_params: dict[str, float] = field(default_factory=dict)
    channel_first: bool = False
    params: list[str] = field(default_factory=list)  # leaf keys of the parameters the row owns
    input: str | None = None  # norm rows: the value they normalise (its statistics are reported too)
    attention: bool = False  # a softmax over attention scores: its output is the probabilities


@dataclass
class GraphPlan:
    rows: list[RowPlan]
    trainable: set[str]  # leaf keys that get gradients
    recognised: dict[str, int]  # decomposed activations recognised, by function
    leaves: dict[str, str] = field(default_factory=dict)  # leaf key -> initializer it copies
    uses: dict[tuple[int, int], str] = field(default_factory=dict)  # (node, input slot) -> leaf key


def _uses(index: GraphIndex, name: str) -> list[tuple[int, int, int, int]]:
    """Every use of initializer ``name`` as (consumer node, slot, owner node, owner slot): the
    owner is the layer the value reaches through weight plumbing (W -> Transpose -> MatMul)."""
    uses = []
    for position in dict.fromkeys(index.consumers.get(name, [])):
        node = index.node(position)
        for slot, input_name in enumerate(node.input):
            if input_name != name:
                continue
            owner, owner_slot, value, hops = position, slot, name, 0
            while index.node(owner).op_type in _WEIGHT_PLUMBING and hops < 8:
                following = index.only_consumer(index.node(owner).output[0])
                if following is None:
                    break
                value = index.node(owner).output[0]
                owner, hops = following, hops + 1
                owner_slot = list(index.node(owner).input).index(value)
            uses.append((position, slot, owner, owner_slot))
    return uses


def _is_trainable(index: GraphIndex, init: onnx.TensorProto, owner: tuple[int, int]) -> bool:
    import math

    if init.data_type not in _FLOAT_TYPES:
        return False
    node = index.node(owner[0])
    slots = PARAM_SLOTS.get(node.op_type)
    if slots is not None:
        return owner[1] in slots
    return bool(math.prod(init.dims) > 1)  # scalars feeding arithmetic are constants, not weights


def _scope(node: onnx.NodeProto) -> str:
    """'/layer1/layer1.0/conv1/Conv' -> 'layer1/layer1.0/conv1' (the exporter's name scope)."""
    if not node.name.startswith("/"):
        return ""
    return "/".join(part for part in node.name.split("/")[1:-1] if part)


def _channel_first(index: GraphIndex, value: str, depth: int = 0) -> bool:
    node = index.producer_of(value)
    if node is None or depth > 4:
        return False
    if node.op_type in _CHANNEL_FIRST_OPS:
        return True
    if node.op_type in ("Add", "Mul", "Sub", "Relu", "Identity", "Clip", "Sigmoid", "LeakyRelu"):
        return any(_channel_first(index, name, depth + 1) for name in node.input if name)
    return False


def _is_attention_softmax(index: GraphIndex, position: int) -> bool:
    """Softmax(scores) @ V: a softmax whose output is, possibly through Dropout/Cast or the
    exporters' NaN guard (Where(IsNaN(p), 0, p)), a MatMul's left operand. Classifier softmaxes
    feed no MatMul, so attention is found by its data flow in both exporters' graphs."""
    node = index.node(position)
    if node.op_type != "Softmax":
        return False
    derived = {node.output[0]}
    frontier = [node.output[0]]
    for _ in range(4):
        following = []
        for value in frontier:
            for reader_position in index.consumers.get(value, []):
                reader = index.node(reader_position)
                if reader.op_type == "MatMul" and reader.input[0] in derived:
                    return True
                if reader.op_type in ("Where", "Dropout", "Cast", "Identity") and reader.output[0] not in derived:
                    derived.add(reader.output[0])
                    following.append(reader.output[0])
        frontier = following
    return False


def _other_input(node: onnx.NodeProto, name: str) -> str | None:
    inputs = list(node.input)
    if len(inputs) != 2 or name not in inputs:
        return None
    return str(inputs[1] if inputs[0] == name else inputs[0])


def _unique(name: str, taken: set[str]) -> str:
    candidate, suffix = name, 1
    while candidate in taken:
        suffix += 1
        candidate = f"{name}#{suffix}"
    taken.add(candidate)
    return candidate


@dataclass
class _Parameters:
    owned: dict[int, list[str]] = field(default_factory=dict)  # node -> leaf keys it owns
    trainable: set[str] = field(default_factory=set)
    leaves: dict[str, str] = field(default_factory=dict)
    uses: dict[tuple[int, int], str] = field(default_factory=dict)


def _assign_parameters(index: GraphIndex) -> _Parameters:
    """Which node owns which initializer.

    One initializer read by several layers is one parameter shared by them (an unrolled RNN's
    recurrent weight, an embedding tied to the output projection): one leaf, whose gradient sums
    every use, owned by the first layer, as the PyTorch probe reports a shared nn.Parameter.
    The legacy exporter also merges parameters that merely hold equal values (every fresh
    BatchNorm's ones and zeros), giving each merged one an Identity node named after it: each such
    alias is a parameter of its own (a copy under its name), so gradients stay per layer. Uses
    that are not parameters (BatchNorm running statistics) read a constant copy.
    """
    found = _Parameters()
    for init in index.graph.initializer:
        consumers = _uses(index, init.name)
        trainable_uses = {u for u in consumers if _is_trainable(index, init, (u[2], u[3]))}
        for use in consumers:
            consumer, slot, owner, _ = use
            if use not in trainable_uses:
                if trainable_uses:
                    found.leaves[f"{init.name}@const"] = init.name
                    found.uses[(consumer, slot)] = f"{init.name}@const"
                continue
            node = index.node(consumer)
            key = node.output[0] if node.op_type == "Identity" else init.name
            if key not in found.leaves:
                found.owned.setdefault(owner, []).append(key)
                found.trainable.add(key)
                found.leaves[key] = init.name
            found.uses[(consumer, slot)] = key
    return found


def _fuse_linear_bias(index: GraphIndex, params: _Parameters) -> tuple[set[int], dict[int, str]]:
    """MatMul(x, W) + b, b a 1-D initializer, is one Linear-like row (nn.Linear on 3-D inputs):
    the bias moves to the MatMul's row, whose value becomes the Add's output. Returns the Add
    nodes absorbed and the new output of each fused MatMul."""
    absorbed: set[int] = set()
    outputs: dict[int, str] = {}
    for position, node in enumerate(index.graph.node):
        if node.op_type != "MatMul" or position not in params.owned:
            continue
        add_position = index.only_consumer(node.output[0])
        if add_position is None or index.node(add_position).op_type != "Add":
            continue
        add = index.node(add_position)
        bias = _other_input(add, node.output[0])
        init = index.initializers.get(bias or "")
        if bias is None or init is None or init.data_type not in _FLOAT_TYPES or len(init.dims) != 1:
            continue
        key = params.uses.get((add_position, list(add.input).index(bias)))
        owned_by_add = params.owned.get(add_position, [])
        if key is not None and key in owned_by_add:
            params.owned[position].append(key)
            owned_by_add.remove(key)
            if not owned_by_add:
                del params.owned[add_position]
        absorbed.add(add_position)
        outputs[position] = add.output[0]
    return absorbed, outputs


def plan_rows(graph: onnx.GraphProto) -> GraphPlan:
    index = GraphIndex.of(graph)
    params = _assign_parameters(index)
    activations = {a.anchor: a for a in recognise_activations(index)}
    absorbed, outputs = _fuse_linear_bias(index, params)
    absorbed |= {p for a in activations.values() for p in a.absorbed}
    rows: list[RowPlan] = []
    taken: set[str] = set()
    recognised: dict[str, int] = {}
    for position, node in enumerate(graph.node):
        if position in absorbed or not node.output:
            continue
        owned = params.owned.get(position, [])
        activation = activations.get(position)
        if activation is not None:
            kind, output = RowKind.ACTIVATION, activation.output
        elif node.op_type in PARAM_OPS and owned:
            kind, output = RowKind.PARAM, outputs.get(position, node.output[0])
        elif node.op_type in NORM_OPS:
            kind, output = RowKind.NORM, node.output[0]
        elif _is_attention_softmax(index, position):
            kind, output = RowKind.ACTIVATION, node.output[0]
        elif owned:
            kind, output = RowKind.OTHER, node.output[0]
        else:
            continue
        row = RowPlan(name=_unique(node_label(node), taken), type=node.op_type, kind=kind, node=position,
                      output=output, module=_scope(node), params=owned)
        if activation is not None:
            if activation.pattern:
                recognised[activation.fn] = recognised.get(activation.fn, 0) + 1
                row.type = PATTERN_TYPES.get(activation.fn, node.op_type)
            row.fn, row.fn_params = activation.fn, dict(activation.params)
            row.channel_first = _channel_first(index, activation.source)
        elif kind is RowKind.NORM:
            row.input = node.input[0]
        elif kind is RowKind.ACTIVATION:  # attention, as the PyTorch probe reports it
            row.fn, row.attention = "attention", True
        rows.append(row)
    return GraphPlan(rows=rows, trainable=params.trainable, recognised=recognised, leaves=params.leaves,
                     uses=params.uses)
