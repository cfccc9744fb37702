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
from gradcheck_cli.onnx.patterns import PATTERN_TYPES, Activation, GraphIndex, recognise_activations
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
    return math.prod(init.dims) > 1  # scalars feeding arithmetic are constants, not weights


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


def _other_input(node: onnx.NodeProto, name: str) -> str | None:
    inputs = list(node.input)
    if len(inputs) != 2 or name not in inputs:
        return None
    return inputs[1] if inputs[0] == name else inputs[0]


def _unique(name: str, taken: set[str]) -> str:
    candidate, suffix = name, 1
    while candidate in taken:
        suffix += 1
        candidate = f"{name}#{suffix}"
    taken.add(candidate)
    return candidate


def plan_rows(graph: onnx.GraphProto) -> GraphPlan:
    index = GraphIndex.of(graph)
    owned: dict[int, list[str]] = {}
    trainable: set[str] = set()
    leaves: dict[str, str] = {}
    uses: dict[tuple[int, int], str] = {}
    for init in graph.initializer:
        # Exporters merge initializers with equal values (every fresh BatchNorm's ones and
        # zeros, every zero bias). The source model had one parameter per layer, so each owning
        # layer gets its own leaf (a copy under an alias), and uses that are not parameters
        # (running statistics) read a constant copy: gradients are then per layer, as in PyTorch.
        per_owner: dict[int, str] = {}
        consumers = _uses(index, init.name)
        trainable_uses = [u for u in consumers if _is_trainable(index, init, (u[2], u[3]))]
        for consumer, slot, owner, _ in consumers:
            if (consumer, slot, owner, _) not in trainable_uses:
                if trainable_uses:
                    key = f"{init.name}@const"
                    leaves[key] = init.name
                    uses[(consumer, slot)] = key
                continue
            key = per_owner.get(owner) or (init.name if not per_owner else f"{init.name}@{len(per_owner) + 1}")
            if owner not in per_owner:
                per_owner[owner] = key
                owned.setdefault(owner, []).append(key)
                trainable.add(key)
                leaves[key] = init.name
            uses[(consumer, slot)] = key

    activations = {a.anchor: a for a in recognise_activations(index)}
    absorbed = {p for a in activations.values() for p in a.absorbed}
    outputs: dict[int, str] = {}
    # MatMul + bias Add -> one Linear-like row: the Add's bias moves to the MatMul's row.
    for position, node in enumerate(graph.node):
        if node.op_type != "MatMul" or position not in owned:
            continue
        add_position = index.only_consumer(node.output[0])
        if add_position is None or index.node(add_position).op_type != "Add":
            continue
        add = index.node(add_position)
        bias = _other_input(add, node.output[0])
        init = index.initializers.get(bias or "")
        if init is None or init.data_type not in _FLOAT_TYPES or len(init.dims) != 1:
            continue
        key = uses.get((add_position, list(add.input).index(bias or "")))
        if key is not None and key in owned.get(add_position, []):
            owned[position].append(key)
            owned[add_position].remove(key)
            if not owned[add_position]:
                del owned[add_position]
        absorbed.add(add_position)
        outputs[position] = add.output[0]

    rows: list[RowPlan] = []
    taken: set[str] = set()
    recognised: dict[str, int] = {}
    for position, node in enumerate(graph.node):
        if position in absorbed or not node.output:
            continue
        params = owned.get(position, [])
        activation: Activation | None = activations.get(position)
        base = dict(name=_unique(node_label(node), taken), node=position, module=_scope(node), params=params)
        if activation is not None:
            if activation.pattern:
                recognised[activation.fn] = recognised.get(activation.fn, 0) + 1
            source = node.input[0] if activation.fn not in ("silu", "hardswish", "gelu") else ""
            if activation.pattern and activation.fn in ("silu", "hardswish"):
                source = next((n for n in node.input if index.producer_of(n) is None
                               or index.producer[n] not in activation.absorbed), node.input[0])
            rows.append(RowPlan(
                type=PATTERN_TYPES.get(activation.fn, node.op_type) if activation.pattern else node.op_type,
                kind=RowKind.ACTIVATION, output=activation.output, fn=activation.fn,
                fn_params=dict(activation.params),
                channel_first=_channel_first(index, source) if source else False, **base))  # type: ignore[arg-type]
        elif node.op_type in PARAM_OPS and params:
            rows.append(RowPlan(type=node.op_type, kind=RowKind.PARAM,
                                output=outputs.get(position, node.output[0]), **base))  # type: ignore[arg-type]
        elif node.op_type in NORM_OPS:
            rows.append(RowPlan(type=node.op_type, kind=RowKind.NORM, output=node.output[0], **base))  # type: ignore[arg-type]
        elif params:
            rows.append(RowPlan(type=node.op_type, kind=RowKind.OTHER, output=node.output[0], **base))  # type: ignore[arg-type]
    return GraphPlan(rows=rows, trainable=trainable, recognised=recognised, leaves=leaves, uses=uses)
