"""Which ONNX nodes become report rows, and which initializers are each row's parameters.

Rows follow the PyTorch probe's contract: a row per layer with parameters (Conv, ConvTranspose,
Gemm, MatMul with a weight, Gather of an embedding table, LSTM/GRU/RNN), per normalisation
(BatchNormalization, LayerNormalization, ...), per activation (single ops and the decomposed
patterns of :mod:`.patterns`), and per other node that owns a trainable initializer. Rows are
in node order (topological) and named by node name, or by output name when the node has none.

Parameters are those of the parameter map (:mod:`.params`): initializers or Constant nodes that
reach a weight slot, looking through the Transpose/Cast/Reshape chains exporters put in front of
weights. Each is owned by the first node it reaches. BatchNormalization's running mean and
variance and scalar constants (0.5, sqrt(2), clip bounds) are not parameters. ``MatMul(x, W) + b``
with a stored ``b`` is one row (an nn.Linear on 3-D inputs), so it matches the PyTorch probe, and
so is Paddle2ONNX's ``Conv(x, W) + b``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gradcheck_cli.onnx.lower import node_label
from gradcheck_cli.onnx.params import ParameterMap, parameter_map
from gradcheck_cli.onnx.patterns import PATTERN_TYPES, GraphIndex, recognise_activations
from gradcheck_cli.records import RowKind

if TYPE_CHECKING:
    import onnx

PARAM_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Gather", "LSTM", "GRU", "RNN", "Einsum"})
NORM_OPS = frozenset(
    {"BatchNormalization", "LayerNormalization", "InstanceNormalization", "GroupNormalization", "RMSNormalization"}
)
# Producers whose outputs are laid out (N, C, ...): a following activation's units are channels.
_CHANNEL_FIRST_OPS = frozenset(
    {
        "Conv",
        "ConvTranspose",
        "BatchNormalization",
        "InstanceNormalization",
        "GroupNormalization",
        "MaxPool",
        "AveragePool",
        "GlobalAveragePool",
        "LpPool",
        "Resize",
        "Upsample",
    }
)


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
    leaves: dict[str, str] = field(default_factory=dict)  # leaf key -> source (initializer/Constant)
    uses: dict[tuple[int, int], str] = field(default_factory=dict)  # (node, input slot) -> leaf key
    numel: dict[str, int] = field(default_factory=dict)  # trainable leaf key -> elements


def _scope(node: onnx.NodeProto) -> str:
    """The source module's path, when the exporter recorded it: the dynamo exporter's
    ``pkg.torch.onnx.name_scopes`` metadata (``['', 'layer1', 'layer1.0', 'conv']``: full paths,
    then the op), or the legacy exporter's node name (``/layer1/layer1.0/conv1/Conv``). '' when
    neither is there (Paddle2ONNX's ``p2o.Conv.0``, tf2onnx's ``model/conv2d/Conv2D``)."""
    import ast

    props = {prop.key: prop.value for prop in node.metadata_props}
    if "FuseBatchNormInto" in props.get("pkg.onnxscript.rewriter.rule_name", ""):
        # The dynamo exporter's optimiser folded a BatchNorm into this layer and gave it the
        # BatchNorm's scopes; the weight keeps the layer's state_dict name ('layer1.0.conv1.weight').
        weight = node.input[1] if len(node.input) > 1 else ""
        if weight.endswith(".weight"):
            return weight[: -len(".weight")]
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                break
            if isinstance(scopes, list) and len(scopes) >= 2 and all(isinstance(s, str) for s in scopes):
                return str(scopes[-2])
            break
    if not node.name.startswith("/"):
        return ""
    return legacy_module_path(node.name)


def legacy_module_path(name: str) -> str:
    """'/layer1/layer1.0/conv1/Conv' -> 'layer1.0.conv1'.

    The legacy exporter names each scope by the module's qualified name from its last non-numeric
    atom on ('layer1.0' stays whole, 'layer1.0.conv1' becomes 'conv1'), so a component with a dot
    adds only its last atom to the parent's path, and one without a dot adds itself.
    """
    path = ""
    for part in [p for p in name.split("/")[1:-1] if p]:
        atom = part.rsplit(".", 1)[-1] if "." in part and path else part
        path = f"{path}.{atom}" if path else atom
    return path


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
    numel: dict[str, int] = field(default_factory=dict)  # leaf key -> elements


def _assign_parameters(index: GraphIndex, pmap: ParameterMap) -> _Parameters:
    """Which node owns which parameter (an initializer or a Constant node's value).

    One tensor read by several layers is one parameter shared by them (an unrolled RNN's
    recurrent weight, an embedding tied to the output projection): one leaf, whose gradient sums
    every use, owned by the first layer, as the PyTorch probe reports a shared nn.Parameter.
    The legacy exporter also merges parameters that merely hold equal values (every fresh
    BatchNorm's ones and zeros), giving each merged one an Identity node named after it: each such
    alias is a parameter of its own (a copy under its name), so gradients stay per layer. Uses
    that are not parameters (BatchNorm running statistics) read a constant copy.
    """
    found = _Parameters()
    for name, source in pmap.sources.items():
        consumers = pmap.uses[name]
        trainable_uses = [use for use in consumers if use.parameter]
        for use in consumers:
            if not use.parameter:
                if trainable_uses:
                    found.leaves[f"{name}@const"] = name
                    found.uses[(use.consumer, use.slot)] = f"{name}@const"
                continue
            node = index.node(use.consumer)
            key = node.output[0] if node.op_type == "Identity" else name
            if key not in found.leaves:
                found.owned.setdefault(use.owner, []).append(key)
                found.trainable.add(key)
                found.leaves[key] = name
                found.numel[key] = source.numel
            found.uses[(use.consumer, use.slot)] = key
    return found


def _bias_of(pmap: ParameterMap, node: onnx.NodeProto, add: onnx.NodeProto) -> str | None:
    """The operand of ``add`` that is a stored bias of ``node``'s output: a 1-D tensor after a
    MatMul (nn.Linear on 3-D inputs); after a Conv/ConvTranspose, a tensor that broadcasts along
    the channel axis only, such as (1, C, 1, 1) (how Paddle2ONNX writes conv biases)."""
    bias = _other_input(add, node.output[0])
    value = pmap.value(bias) if bias else None
    if bias is None or value is None:
        return None
    if node.op_type == "MatMul":
        return bias if value.ndim == 1 else None
    weight = pmap.value(node.input[1]) if len(node.input) > 1 else None
    if weight is None or value.ndim > weight.ndim:
        return None
    shape = [1] * (weight.ndim - value.ndim) + list(value.shape)
    return bias if all(d == 1 for axis, d in enumerate(shape) if axis != 1) else None


def _fuse_layer_bias(index: GraphIndex, pmap: ParameterMap, params: _Parameters) -> tuple[set[int], dict[int, str]]:
    """A layer followed by an Add of its own stored bias is one row (nn.Linear on 3-D inputs is
    ``MatMul(x, W) + b``; Paddle2ONNX writes ``Conv(x, W) + b``): the bias moves to the layer's
    row, whose value becomes the Add's output. Returns the Add nodes absorbed and the new output
    of each fused layer."""
    absorbed: set[int] = set()
    outputs: dict[int, str] = {}
    for position, node in enumerate(index.graph.node):
        if node.op_type not in ("MatMul", "Conv", "ConvTranspose") or position not in params.owned:
            continue
        add_position = index.only_consumer(node.output[0])
        if add_position is None or index.node(add_position).op_type != "Add":
            continue
        add = index.node(add_position)
        bias = _bias_of(pmap, node, add)
        found = pmap.trace(bias) if bias is not None else None
        if found is None:
            continue
        owned_by_add = params.owned.get(add_position, [])
        for use in pmap.uses.get(found[0].name, []):
            key = params.uses.get((use.consumer, use.slot))
            if use.owner == add_position and key is not None and key in owned_by_add:
                params.owned[position].append(key)
                owned_by_add.remove(key)
        if add_position in params.owned and not owned_by_add:
            del params.owned[add_position]
        absorbed.add(add_position)
        outputs[position] = add.output[0]
    return absorbed, outputs


def plan_rows(graph: onnx.GraphProto) -> GraphPlan:
    index = GraphIndex.of(graph)
    pmap = parameter_map(graph)
    params = _assign_parameters(index, pmap)
    activations = {a.anchor: a for a in recognise_activations(index)}
    absorbed, outputs = _fuse_layer_bias(index, pmap, params)
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
        row = RowPlan(
            name=_unique(node_label(node), taken),
            type=node.op_type,
            kind=kind,
            node=position,
            output=output,
            module=_scope(node),
            params=owned,
        )
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
    return GraphPlan(
        rows=rows,
        trainable=params.trainable,
        recognised=recognised,
        leaves=params.leaves,
        uses=params.uses,
        numel=params.numel,
    )
