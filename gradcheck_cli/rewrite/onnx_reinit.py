"""Re-initialise the weight initializers of an ONNX graph: the same verbs as ``torch_reinit``.

Layers are the nodes Conv, ConvTranspose, Gemm, MatMul (weight as the second input) and
RNN/LSTM/GRU whose weights are graph initializers. The activation that follows a layer is found
by walking the graph from the layer's output, breadth first, through every op that is neither an
activation nor another layer (Add, BatchNormalization, Reshape, pooling, ...). Only the top-level
graph is rewritten; the model passed in is never modified (the pass works on a copy).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gradcheck_cli.errors import GradcheckError
from gradcheck_cli.options import RecurrentInit, ReinitOptions, Scheme
from gradcheck_cli.records import Change
from gradcheck_cli.rewrite.init_math import (
    Fans,
    InitSpec,
    WeightLayout,
    fans,
    identity_blocks,
    layer_rng,
    orthogonal,
    orthogonal_spec,
    sample,
)
from gradcheck_cli.rewrite.reinit_options import matches_any, plan_weight, select, validate
from gradcheck_cli.rewrite.reinit_records import ActivationSource, LayerInit, TensorInit

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    import onnx

LAYER_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "RNN", "LSTM", "GRU"})
# ONNX op -> the probe's normalised activation name.
ACTIVATION_OPS = {
    "Relu": "relu", "LeakyRelu": "leaky_relu", "PRelu": "prelu", "Elu": "elu", "Celu": "celu",
    "Selu": "selu", "Gelu": "gelu", "Mish": "mish", "HardSwish": "hardswish", "Softplus": "softplus",
    "ThresholdedRelu": "relu", "Tanh": "tanh", "Sigmoid": "sigmoid", "HardSigmoid": "hardsigmoid",
    "Softsign": "softsign",
}
# Recurrent ops: gate count, and where ONNX puts the LSTM forget gate (gate order i, o, f, c).
_GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
_ONNX_LSTM_FORGET_BLOCK = 2
_FLOAT_TYPES = {1: "float32", 10: "float16", 11: "float64"}  # TensorProto.FLOAT, FLOAT16, DOUBLE


@dataclass
class OnnxReinitResult:
    model: onnx.ModelProto
    layers: list[LayerInit]
    changes: list[Change]
    notes: list[str]


@dataclass(frozen=True)
class OnnxLayer:
    name: str
    op: str
    node_index: int
    weight: str
    bias: str | None
    layout: WeightLayout
    groups: int = 1
    scale: float = 1.0  # Gemm's alpha: the effective weight is alpha·B
    recurrent: str | None = None  # R initializer of RNN/LSTM/GRU
    hidden: int = 0


def find_layers(graph: onnx.GraphProto) -> tuple[list[OnnxLayer], list[Change]]:
    """Layer nodes whose weight is an initializer, in graph order; the others are declined."""
    initializers = {tensor.name for tensor in graph.initializer}
    consumers = _consumers(graph)
    layers: list[OnnxLayer] = []
    declined: list[Change] = []
    for index, node in enumerate(graph.node):
        if node.op_type not in LAYER_OPS:
            continue
        name = node.name or f"{node.op_type}_{index}"
        weight = node.input[1] if len(node.input) > 1 else ""
        if weight not in initializers:
            if node.op_type != "MatMul" or (node.input and node.input[0] in initializers):
                declined.append(Change(name, "reinit", node.op_type, applied=False,
                                       reason="its weight is computed in the graph, not stored as an "
                                       "initializer; left as it was"))
            continue  # a MatMul of two activations (attention scores) is no layer
        attrs = _attributes(node)
        bias = node.input[2] if len(node.input) > 2 and node.input[2] in initializers else None
        if node.op_type == "Conv":
            layer = OnnxLayer(name, node.op_type, index, weight, bias, WeightLayout.CONV,
                              groups=int(attrs.get("group", 1)))
        elif node.op_type == "ConvTranspose":
            layer = OnnxLayer(name, node.op_type, index, weight, bias, WeightLayout.CONV_TRANSPOSE,
                              groups=int(attrs.get("group", 1)))
        elif node.op_type == "Gemm":
            layout = WeightLayout.OUT_IN if int(attrs.get("transB", 0)) else WeightLayout.IN_OUT
            layer = OnnxLayer(name, node.op_type, index, weight, bias, layout,
                              scale=float(attrs.get("alpha", 1.0)))
        elif node.op_type == "MatMul":
            layer = OnnxLayer(name, node.op_type, index, weight, _matmul_bias(node, graph, consumers,
                                                                             initializers),
                              WeightLayout.IN_OUT)
        else:
            recurrent = node.input[2] if len(node.input) > 2 and node.input[2] in initializers else None
            rnn_bias = node.input[3] if len(node.input) > 3 and node.input[3] in initializers else None
            if recurrent is None or "hidden_size" not in attrs:
                declined.append(Change(name, "reinit", node.op_type, applied=False,
                                       reason="its recurrent weight R is not an initializer (or "
                                       "hidden_size is missing); left as it was"))
                continue
            layer = OnnxLayer(name, node.op_type, index, weight, rnn_bias, WeightLayout.OUT_IN,
                              recurrent=recurrent, hidden=int(attrs["hidden_size"]))
        layers.append(layer)
    return layers, declined


def _matmul_bias(node: onnx.NodeProto, graph: onnx.GraphProto, consumers: dict[str, list[int]],
                 initializers: set[str]) -> str | None:
    """The bias of x @ W + b: a following Add whose other operand is a 1-D initializer."""
    users = consumers.get(node.output[0], [])
    if len(users) != 1:
        return None
    add = graph.node[users[0]]
    if add.op_type != "Add":
        return None
    other = [name for name in add.input if name != node.output[0]]
    if len(other) == 1 and other[0] in initializers:
        shape = next(tuple(t.dims) for t in graph.initializer if t.name == other[0])
        if len(shape) == 1:
            return str(other[0])
    return None


def following_activation(graph: onnx.GraphProto, layer: OnnxLayer,
                         consumers: dict[str, list[int]]) -> tuple[str | None, float | None]:
    """The first activation reached from the layer's output before any other layer (BFS)."""
    if layer.op in _GATES:
        return _recurrent_activation(graph.node[layer.node_index]), None
    start = graph.node[layer.node_index]
    queue = deque(start.output)
    seen: set[str] = set()
    while queue:
        value = queue.popleft()
        if value in seen:
            continue
        seen.add(value)
        for index in consumers.get(value, []):
            node = graph.node[index]
            fn = ACTIVATION_OPS.get(node.op_type)
            if fn is not None:
                return fn, _onnx_slope(node, graph)
            if node.op_type == "Clip" and _clips_at_zero(node, graph):
                return "relu6", None
            if node.op_type in LAYER_OPS:
                continue  # another layer: this path has no activation
            queue.extend(node.output)
    return None, None


def _recurrent_activation(node: onnx.NodeProto) -> str:
    if node.op_type != "RNN":
        return "sigmoid"
    names = _attributes(node).get("activations", [b"Tanh"])
    first = names[0].decode() if isinstance(names[0], bytes) else str(names[0])
    return "relu" if first.lower() == "relu" else "tanh"  # ONNX's default is Tanh


def _onnx_slope(node: onnx.NodeProto, graph: onnx.GraphProto) -> float | None:
    if node.op_type == "LeakyRelu":
        return float(_attributes(node).get("alpha", 0.01))
    if node.op_type == "PRelu" and len(node.input) > 1:
        values = _initializer_values(graph, node.input[1])
        return float(values.mean()) if values is not None else 0.25
    return None


def _clips_at_zero(node: onnx.NodeProto, graph: onnx.GraphProto) -> bool:
    low = _attributes(node).get("min")
    if low is None and len(node.input) > 1 and node.input[1]:
        values = _initializer_values(graph, node.input[1])
        low = float(values) if values is not None and values.size == 1 else None
    return low is not None and float(low) == 0.0


def reinit_onnx_model(model: onnx.ModelProto, *, options: ReinitOptions) -> OnnxReinitResult:
    """A re-initialised copy of ``model`` and the record of what each layer got and why."""
    import onnx

    validate(options)
    new = onnx.ModelProto()
    new.CopyFrom(model)
    graph = new.graph
    layers, declined = find_layers(graph)
    consumers = _consumers(graph)
    chosen = select([layer.name for layer in layers], options.layers)
    tensors = {tensor.name: tensor for tensor in graph.initializer}
    sharers = _initializer_users(graph)
    done: dict[str, str] = {}  # initializer -> layer that set it
    records: list[LayerInit] = []
    changes: list[Change] = [c for c in declined if matches_any(c.target, options.layers)]
    for layer in layers:
        if layer.name not in chosen:
            continue
        problem = _unsupported(layer, tensors)
        if problem is not None:
            changes.append(Change(layer.name, "reinit", layer.op, applied=False, reason=problem))
            continue
        activation, slope = following_activation(graph, layer, consumers)
        source = ActivationSource.INTERNAL if layer.op in _GATES else ActivationSource.GRAPH
        if layer.op in _GATES:
            record = _init_recurrent(layer, activation, source, tensors, sharers, done, options)
        else:
            record = _init_layer(layer, activation, slope, source, tensors, sharers, done, options)
        records.append(record)
        detail = ", ".join(f"{t.parameter}: {t.scheme} std {t.std:.4g}" for t in record.tensors)
        changes.append(Change(layer.name, f"reinit:{record.scheme}", detail))
    verify_untouched(model, new, set(done))
    notes = []
    if any(node.op_type in ("If", "Loop", "Scan") for node in graph.node):
        notes.append("layers inside If/Loop/Scan subgraphs were not re-initialised")
    return OnnxReinitResult(model=new, layers=records, changes=changes, notes=notes)


def _unsupported(layer: OnnxLayer, tensors: dict[str, onnx.TensorProto]) -> str | None:
    for name in (layer.weight, layer.bias, layer.recurrent):
        if name is None:
            continue
        if tensors[name].data_type not in _FLOAT_TYPES:
            return f"{name} has ONNX data type {tensors[name].data_type}, not float16/32/64; left as it was"
    if len(tensors[layer.weight].dims) < 2:
        return f"{layer.weight} has fewer than 2 dimensions; no fan is defined"
    return None


def _init_layer(layer: OnnxLayer, activation: str | None, slope: float | None, source: ActivationSource,
                tensors: dict[str, onnx.TensorProto], sharers: dict[str, list[str]], done: dict[str, str],
                options: ReinitOptions) -> LayerInit:
    weight = tensors[layer.weight]
    shape = tuple(int(d) for d in weight.dims)
    layer_fans = fans(shape, layout=layer.layout, groups=layer.groups)
    plan = plan_weight(options, shape=shape, fans_=layer_fans, activation=activation, slope=slope)
    written: list[TensorInit] = []
    reason = plan.reason
    if layer.weight in done:
        reason = (f"shares its weight {layer.weight} with {done[layer.weight]}, which was initialised "
                  "first (one tensor, still shared)")
    else:
        values = sample(shape, plan.spec, layer_rng(options.seed, layer.weight))
        if layer.scale not in (0.0, 1.0):  # Gemm computes alpha·A·B: store B so that alpha·B has the std
            values = values / layer.scale
            reason += f"; divided by Gemm alpha {layer.scale:g}"
        written.append(_write(tensors[layer.weight], values, plan.spec, sharers, layer.name, done))
    if layer.bias is not None and layer.bias not in done:
        written.append(_constant(tensors[layer.bias], None, sharers, layer.name, done))
    return LayerInit(layer.name, layer.op, str(plan.scheme), reason, activation, source, tuple(written))


def _init_recurrent(layer: OnnxLayer, activation: str | None, source: ActivationSource,
                    tensors: dict[str, onnx.TensorProto], sharers: dict[str, list[str]], done: dict[str, str],
                    options: ReinitOptions) -> LayerInit:
    """W [dirs, gates·H, in] by the scheme per gate block; R [dirs, gates·H, H] orthogonal or I."""
    import numpy as np

    gates, hidden = _GATES[layer.op], layer.hidden
    w_dims = tuple(int(d) for d in tensors[layer.weight].dims)
    directions, in_features = w_dims[0], w_dims[2]
    plan = plan_weight(options, shape=(hidden, in_features), fans_=Fans(in_features, hidden),
                       activation=activation, slope=None)
    rng = layer_rng(options.seed, layer.weight)
    w = np.stack([np.concatenate([sample((hidden, in_features), plan.spec, rng) for _ in range(gates)])
                  for _ in range(directions)])
    written = [_write(tensors[layer.weight], w, plan.spec, sharers, layer.name, done)]
    assert layer.recurrent is not None
    hh_fans = Fans(hidden, hidden)
    if options.recurrent is RecurrentInit.IDENTITY:
        r = np.stack([identity_blocks((gates * hidden, hidden), block=hidden) for _ in range(directions)])
        hh_spec = InitSpec(Scheme.ORTHOGONAL, None, None, 1.0, hh_fans, std=1.0 / float(np.sqrt(hidden)))
        written.append(_write(tensors[layer.recurrent], r, hh_spec, sharers, layer.name, done,
                              label="identity"))
    else:
        rng_r = layer_rng(options.seed, layer.recurrent)
        r = np.stack([np.concatenate([orthogonal((hidden, hidden), gain=1.0, rng=rng_r) for _ in range(gates)])
                      for _ in range(directions)])
        hh_spec = orthogonal_spec((hidden, hidden), fans_=hh_fans, gain=1.0)
        written.append(_write(tensors[layer.recurrent], r, hh_spec, sharers, layer.name, done))
    reason = plan.reason + f"; recurrent weights {options.recurrent}"
    if layer.bias is not None:
        forget = options.forget_bias and layer.op == "LSTM"
        block = (_ONNX_LSTM_FORGET_BLOCK, hidden) if forget else None
        written.append(_constant(tensors[layer.bias], block, sharers, layer.name, done))
        if forget:
            reason += "; forget-gate bias 1"
    return LayerInit(layer.name, layer.op, str(plan.scheme), reason, activation, source, tuple(written))


def _write(tensor: onnx.TensorProto, values: npt.NDArray[np.float64], spec: InitSpec,
           sharers: dict[str, list[str]], layer: str, done: dict[str, str], *,
           label: str | None = None) -> TensorInit:
    import numpy as np
    from onnx import numpy_helper

    dtype = _FLOAT_TYPES[tensor.data_type]
    fresh = numpy_helper.from_array(values.astype(dtype), name=tensor.name)
    tensor.CopyFrom(fresh)  # also drops any external-data reference: the values are inline now
    done.setdefault(tensor.name, layer)
    stored = numpy_helper.to_array(tensor).astype(np.float64)
    return TensorInit(parameter=tensor.name, shape=tuple(int(d) for d in tensor.dims), dtype=dtype,
                      scheme=label or str(spec.scheme), std=spec.std,
                      measured_std=float(np.sqrt(np.mean(stored ** 2))) if stored.size else 0.0,
                      distribution=str(spec.distribution) if spec.distribution else None,
                      mode=str(spec.mode) if spec.mode else None, gain=spec.gain,
                      fan_in=spec.fans.fan_in, fan_out=spec.fans.fan_out,
                      shared_with=tuple(n for n in sharers.get(tensor.name, []) if n != layer))


def _constant(tensor: onnx.TensorProto, forget: tuple[int, int] | None, sharers: dict[str, list[str]],
              layer: str, done: dict[str, str]) -> TensorInit:
    """Zero a bias; for an ONNX LSTM with the flag, set the forget-gate block of Wb to 1."""
    import numpy as np
    from onnx import numpy_helper

    dims = tuple(int(d) for d in tensor.dims)
    values = np.zeros(dims, dtype=np.float64)
    if forget is not None:
        block, hidden = forget
        values[..., block * hidden:(block + 1) * hidden] = 1.0  # Wb half; Rb stays 0: total 1
    tensor.CopyFrom(numpy_helper.from_array(values.astype(_FLOAT_TYPES[tensor.data_type]), name=tensor.name))
    done.setdefault(tensor.name, layer)
    return TensorInit(parameter=tensor.name, shape=dims, dtype=_FLOAT_TYPES[tensor.data_type],
                      scheme="zeros, forget gate 1" if forget else "zeros", std=0.0,
                      measured_std=float(np.sqrt(np.mean(values ** 2))) if values.size else 0.0,
                      shared_with=tuple(n for n in sharers.get(tensor.name, []) if n != layer))


def verify_untouched(original: onnx.ModelProto, new: onnx.ModelProto, changed: set[str]) -> None:
    """Every initializer not chosen keeps its exact bytes; chosen ones keep name, shape and type."""
    before = {t.name: t for t in original.graph.initializer}
    after = {t.name: t for t in new.graph.initializer}
    if list(before) != list(after) or len(original.graph.node) != len(new.graph.node):
        raise GradcheckError("internal error: the re-initialised ONNX graph lost or gained tensors",
                             hint="please report this; nothing was written")
    for name, old in before.items():
        fresh = after[name]
        if name in changed:
            if (tuple(old.dims), old.data_type) != (tuple(fresh.dims), fresh.data_type):
                raise GradcheckError(f"internal error: {name} changed shape or type",
                                     hint="please report this; nothing was written")
        elif old.SerializeToString() != fresh.SerializeToString():
            raise GradcheckError(f"internal error: {name} was not selected but changed",
                                 hint="please report this; nothing was written")


def _consumers(graph: onnx.GraphProto) -> dict[str, list[int]]:
    users: dict[str, list[int]] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            if name:
                users.setdefault(name, []).append(index)
    return users


def _initializer_users(graph: onnx.GraphProto) -> dict[str, list[str]]:
    """Initializer name -> names of the layer nodes that use it (tied weights have several)."""
    users: dict[str, list[str]] = {}
    for index, node in enumerate(graph.node):
        if node.op_type in LAYER_OPS:
            for name in node.input[1:]:
                users.setdefault(name, []).append(node.name or f"{node.op_type}_{index}")
    return users


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    from onnx import helper

    return {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}


def _initializer_values(graph: onnx.GraphProto, name: str) -> Any:
    from onnx import numpy_helper

    for tensor in graph.initializer:
        if tensor.name == name:
            return numpy_helper.to_array(tensor)
    return None
