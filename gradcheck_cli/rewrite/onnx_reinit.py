"""Re-initialise the weight initializers of an ONNX graph: the same verbs as ``torch_reinit``.

Layers are the nodes Conv, ConvTranspose, Gemm, MatMul (weight as the second input) and
RNN/LSTM/GRU whose weights are stored in the graph: initializers, or Constant nodes
(Paddle2ONNX), directly or through Transpose/Reshape/Cast/... (the parameter map of
:mod:`gradcheck_cli.onnx.params`). Values are drawn in the shape the layer sees and stored back
in the tensor's own layout. The activation that follows a layer is found
by walking the graph from the layer's output, breadth first, through every op that is neither an
activation nor another layer (Add, BatchNormalization, Reshape, pooling, ...). Only the top-level
graph is rewritten; the model passed in is never modified (the pass works on a copy).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gradcheck_cli.errors import GradcheckError
from gradcheck_cli.onnx.params import ParameterMap, parameter_map
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
    "Relu": "relu",
    "LeakyRelu": "leaky_relu",
    "PRelu": "prelu",
    "Elu": "elu",
    "Celu": "celu",
    "Selu": "selu",
    "Gelu": "gelu",
    "Mish": "mish",
    "HardSwish": "hardswish",
    "Softplus": "softplus",
    "ThresholdedRelu": "relu",
    "Tanh": "tanh",
    "Sigmoid": "sigmoid",
    "HardSigmoid": "hardsigmoid",
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
    weight: str  # the stored tensor (initializer or Constant output) of each parameter
    bias: str | None
    layout: WeightLayout
    groups: int = 1
    scale: float = 1.0  # Gemm's alpha: the effective weight is alpha·B
    recurrent: str | None = None  # R of RNN/LSTM/GRU
    hidden: int = 0
    # Stored tensor -> the plumbing nodes (Transpose, Reshape, ...) between it and this layer, and
    # the shape the layer sees: fans are the layer's, values are stored in the tensor's layout.
    paths: dict[str, tuple[int, ...]] = field(default_factory=dict, compare=False)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, compare=False)


def find_layers(graph: onnx.GraphProto, pmap: ParameterMap | None = None) -> tuple[list[OnnxLayer], list[Change]]:
    """Layer nodes whose weight is stored in the graph (an initializer or a Constant node, through
    the plumbing of the parameter map), in graph order; the others are declined."""
    pmap = parameter_map(graph) if pmap is None else pmap
    consumers = _consumers(graph)
    layers: list[OnnxLayer] = []
    declined: list[Change] = []
    for index, node in enumerate(graph.node):
        if node.op_type not in LAYER_OPS:
            continue
        name = node.name or f"{node.op_type}_{index}"
        paths: dict[str, tuple[int, ...]] = {}
        shapes: dict[str, tuple[int, ...]] = {}

        def stored(
            value: str, paths: dict[str, tuple[int, ...]] = paths, shapes: dict[str, tuple[int, ...]] = shapes
        ) -> str | None:
            found = pmap.trace(value) if value else None
            if found is None:
                return None
            source, path = found
            paths[source.name] = path
            shapes[source.name] = tuple(int(d) for d in pmap.evaluate(pmap.array(source.name), path).shape)
            return source.name

        weight = stored(node.input[1] if len(node.input) > 1 else "")
        if weight is None:
            if node.op_type != "MatMul" or (node.input and pmap.trace(node.input[0]) is not None):
                declined.append(
                    Change(
                        name,
                        "reinit",
                        node.op_type,
                        applied=False,
                        reason="its weight is computed in the graph, not stored as an "
                        "initializer or constant; left as it was",
                    )
                )
            continue  # a MatMul of two activations (attention scores) is no layer
        attrs = _attributes(node)
        bias = stored(node.input[2]) if len(node.input) > 2 and node.op_type != "MatMul" else None
        if bias is None and node.op_type in ("Conv", "ConvTranspose") and len(node.input) < 3:
            separate = _conv_bias(node, graph, consumers, pmap)
            bias = stored(separate) if separate else None
        common: dict[str, Any] = {"paths": paths, "shapes": shapes}
        if node.op_type == "Conv":
            layer = OnnxLayer(
                name, node.op_type, index, weight, bias, WeightLayout.CONV, groups=int(attrs.get("group", 1)), **common
            )
        elif node.op_type == "ConvTranspose":
            layer = OnnxLayer(
                name,
                node.op_type,
                index,
                weight,
                bias,
                WeightLayout.CONV_TRANSPOSE,
                groups=int(attrs.get("group", 1)),
                **common,
            )
        elif node.op_type == "Gemm":
            layout = WeightLayout.OUT_IN if int(attrs.get("transB", 0)) else WeightLayout.IN_OUT
            layer = OnnxLayer(
                name, node.op_type, index, weight, bias, layout, scale=float(attrs.get("alpha", 1.0)), **common
            )
        elif node.op_type == "MatMul":
            bias_value = _matmul_bias(node, graph, consumers, pmap)
            layer = OnnxLayer(
                name,
                node.op_type,
                index,
                weight,
                stored(bias_value) if bias_value else None,
                WeightLayout.IN_OUT,
                **common,
            )
        else:
            recurrent = stored(node.input[2]) if len(node.input) > 2 else None
            rnn_bias = stored(node.input[3]) if len(node.input) > 3 else None
            if recurrent is None or "hidden_size" not in attrs:
                declined.append(
                    Change(
                        name,
                        "reinit",
                        node.op_type,
                        applied=False,
                        reason="its recurrent weight R is not stored in the graph (or "
                        "hidden_size is missing); left as it was",
                    )
                )
                continue
            layer = OnnxLayer(
                name,
                node.op_type,
                index,
                weight,
                rnn_bias,
                WeightLayout.OUT_IN,
                recurrent=recurrent,
                hidden=int(attrs["hidden_size"]),
                **common,
            )
        layers.append(layer)
    return layers, declined


def _matmul_bias(
    node: onnx.NodeProto, graph: onnx.GraphProto, consumers: dict[str, list[int]], pmap: ParameterMap
) -> str | None:
    """The bias of x @ W + b: a following Add whose other operand is a stored 1-D tensor."""
    users = consumers.get(node.output[0], [])
    if len(users) != 1:
        return None
    add = graph.node[users[0]]
    if add.op_type != "Add":
        return None
    other = [name for name in add.input if name != node.output[0]]
    if len(other) == 1:
        value = pmap.value(other[0])
        if value is not None and value.ndim == 1:
            return str(other[0])
    return None


def _conv_bias(
    node: onnx.NodeProto, graph: onnx.GraphProto, consumers: dict[str, list[int]], pmap: ParameterMap
) -> str | None:
    """The bias Paddle2ONNX writes after a bias-less Conv: Conv -> Add(b), ``b`` a stored tensor
    that varies along the channel axis only, such as (1, C, 1, 1)."""
    users = consumers.get(node.output[0], [])
    weight = pmap.value(node.input[1])
    if len(users) != 1 or graph.node[users[0]].op_type != "Add" or weight is None:
        return None
    other = [name for name in graph.node[users[0]].input if name != node.output[0]]
    value = pmap.value(other[0]) if len(other) == 1 else None
    if value is None or value.ndim > weight.ndim:
        return None
    shape = [1] * (weight.ndim - value.ndim) + list(value.shape)
    return str(other[0]) if all(d == 1 for axis, d in enumerate(shape) if axis != 1) else None


def following_activation(
    graph: onnx.GraphProto, layer: OnnxLayer, consumers: dict[str, list[int]]
) -> tuple[str | None, float | None]:
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
    pmap = parameter_map(graph)
    layers, declined = find_layers(graph, pmap)
    consumers = _consumers(graph)
    chosen = select([layer.name for layer in layers], options.layers)
    tensors = _stored_tensors(pmap)
    sharers = _initializer_users(pmap)
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
            record = _init_recurrent(layer, activation, source, tensors, sharers, done, options, pmap)
        else:
            record = _init_layer(layer, activation, slope, source, tensors, sharers, done, options, pmap)
        records.append(record)
        detail = ", ".join(f"{t.parameter}: {t.scheme} std {t.std:.4g}" for t in record.tensors)
        changes.append(Change(layer.name, f"reinit:{record.scheme}", detail))
    verify_untouched(model, new, set(done))
    notes = []
    if any(node.op_type in ("If", "Loop", "Scan") for node in graph.node):
        notes.append("layers inside If/Loop/Scan subgraphs were not re-initialised")
    return OnnxReinitResult(model=new, layers=records, changes=changes, notes=notes)


def _stored_tensors(pmap: ParameterMap) -> dict[str, onnx.TensorProto]:
    """Stored tensor name -> the TensorProto to overwrite: the initializer, or the Constant node's
    ``value`` (renamed after the Constant's output when it differs: ONNX ignores that name, and
    the records name a tensor by it). A Constant written as ``value_floats`` has no tensor to
    overwrite and is left out (its layer is declined)."""
    tensors: dict[str, onnx.TensorProto] = {}
    for name, source in pmap.sources.items():
        if source.node is None:
            tensors[name] = source.tensor
            continue
        for attribute in pmap.graph.node[source.node].attribute:
            if attribute.name == "value":
                attribute.t.name = name
                tensors[name] = attribute.t
    return tensors


def _unsupported(layer: OnnxLayer, tensors: dict[str, onnx.TensorProto]) -> str | None:
    for name in (layer.weight, layer.bias, layer.recurrent):
        if name is None:
            continue
        if name not in tensors:
            return f"{name} is a Constant written as a list of floats; left as it was"
        if tensors[name].data_type not in _FLOAT_TYPES:
            return f"{name} has ONNX data type {tensors[name].data_type}, not float16/32/64; left as it was"
    if len(layer.shapes[layer.weight]) < 2:
        return f"{layer.weight} has fewer than 2 dimensions; no fan is defined"
    return None


def _init_layer(
    layer: OnnxLayer,
    activation: str | None,
    slope: float | None,
    source: ActivationSource,
    tensors: dict[str, onnx.TensorProto],
    sharers: dict[str, list[str]],
    done: dict[str, str],
    options: ReinitOptions,
    pmap: ParameterMap,
) -> LayerInit:
    shape = layer.shapes[layer.weight]
    layer_fans = fans(shape, layout=layer.layout, groups=layer.groups)
    plan = plan_weight(options, shape=shape, fans_=layer_fans, activation=activation, slope=slope)
    written: list[TensorInit] = []
    reason = plan.reason
    if layer.weight in done:
        reason = (
            f"shares its weight {layer.weight} with {done[layer.weight]}, which was initialised "
            "first (one tensor, still shared)"
        )
    else:
        values = sample(shape, plan.spec, layer_rng(options.seed, layer.weight))
        if layer.scale not in (0.0, 1.0):  # Gemm computes alpha·A·B: store B so that alpha·B has the std
            values = values / layer.scale
            reason += f"; divided by Gemm alpha {layer.scale:g}"
        values = _as_stored(pmap, layer, layer.weight, values)
        written.append(_write(tensors[layer.weight], values, plan.spec, sharers, layer.name, done))
    if layer.bias is not None and layer.bias not in done:
        written.append(_constant(tensors[layer.bias], None, sharers, layer.name, done))
    return LayerInit(layer.name, layer.op, str(plan.scheme), reason, activation, source, tuple(written))


def _init_recurrent(
    layer: OnnxLayer,
    activation: str | None,
    source: ActivationSource,
    tensors: dict[str, onnx.TensorProto],
    sharers: dict[str, list[str]],
    done: dict[str, str],
    options: ReinitOptions,
    pmap: ParameterMap,
) -> LayerInit:
    """W [dirs, gates·H, in] by the scheme per gate block; R [dirs, gates·H, H] orthogonal or I."""
    import numpy as np

    gates, hidden = _GATES[layer.op], layer.hidden
    w_dims = layer.shapes[layer.weight]
    directions, in_features = w_dims[0], w_dims[2]
    plan = plan_weight(
        options, shape=(hidden, in_features), fans_=Fans(in_features, hidden), activation=activation, slope=None
    )
    rng = layer_rng(options.seed, layer.weight)
    w = np.stack(
        [
            np.concatenate([sample((hidden, in_features), plan.spec, rng) for _ in range(gates)])
            for _ in range(directions)
        ]
    )
    w = _as_stored(pmap, layer, layer.weight, w)
    written = [_write(tensors[layer.weight], w, plan.spec, sharers, layer.name, done)]
    assert layer.recurrent is not None
    hh_fans = Fans(hidden, hidden)
    if options.recurrent is RecurrentInit.IDENTITY:
        r = np.stack([identity_blocks((gates * hidden, hidden), block=hidden) for _ in range(directions)])
        r = _as_stored(pmap, layer, layer.recurrent, r)
        hh_spec = InitSpec(Scheme.ORTHOGONAL, None, None, 1.0, hh_fans, std=1.0 / float(np.sqrt(hidden)))
        written.append(_write(tensors[layer.recurrent], r, hh_spec, sharers, layer.name, done, label="identity"))
    else:
        rng_r = layer_rng(options.seed, layer.recurrent)
        r = np.stack(
            [
                np.concatenate([orthogonal((hidden, hidden), gain=1.0, rng=rng_r) for _ in range(gates)])
                for _ in range(directions)
            ]
        )
        r = _as_stored(pmap, layer, layer.recurrent, r)
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


def _write(
    tensor: onnx.TensorProto,
    values: npt.NDArray[np.float64],
    spec: InitSpec,
    sharers: dict[str, list[str]],
    layer: str,
    done: dict[str, str],
    *,
    label: str | None = None,
) -> TensorInit:
    import numpy as np
    from onnx import numpy_helper

    dtype = _FLOAT_TYPES[tensor.data_type]
    fresh = numpy_helper.from_array(values.astype(dtype), name=tensor.name)
    tensor.CopyFrom(fresh)  # also drops any external-data reference: the values are inline now
    done.setdefault(tensor.name, layer)
    stored = numpy_helper.to_array(tensor).astype(np.float64)
    return TensorInit(
        parameter=tensor.name,
        shape=tuple(int(d) for d in tensor.dims),
        dtype=dtype,
        scheme=label or str(spec.scheme),
        std=spec.std,
        measured_std=float(np.sqrt(np.mean(stored**2))) if stored.size else 0.0,
        distribution=str(spec.distribution) if spec.distribution else None,
        mode=str(spec.mode) if spec.mode else None,
        gain=spec.gain,
        fan_in=spec.fans.fan_in,
        fan_out=spec.fans.fan_out,
        shared_with=tuple(n for n in sharers.get(tensor.name, []) if n != layer),
    )


def _constant(
    tensor: onnx.TensorProto,
    forget: tuple[int, int] | None,
    sharers: dict[str, list[str]],
    layer: str,
    done: dict[str, str],
) -> TensorInit:
    """Zero a bias; for an ONNX LSTM with the flag, set the forget-gate block of Wb to 1."""
    import numpy as np
    from onnx import numpy_helper

    dims = tuple(int(d) for d in tensor.dims)
    values = np.zeros(dims, dtype=np.float64)
    if forget is not None:
        block, hidden = forget
        values[..., block * hidden : (block + 1) * hidden] = 1.0  # Wb half; Rb stays 0: total 1
    tensor.CopyFrom(numpy_helper.from_array(values.astype(_FLOAT_TYPES[tensor.data_type]), name=tensor.name))
    done.setdefault(tensor.name, layer)
    return TensorInit(
        parameter=tensor.name,
        shape=dims,
        dtype=_FLOAT_TYPES[tensor.data_type],
        scheme="zeros, forget gate 1" if forget else "zeros",
        std=0.0,
        measured_std=float(np.sqrt(np.mean(values**2))) if values.size else 0.0,
        shared_with=tuple(n for n in sharers.get(tensor.name, []) if n != layer),
    )


def verify_untouched(original: onnx.ModelProto, new: onnx.ModelProto, changed: set[str]) -> None:
    """Every initializer not chosen keeps its exact bytes; chosen ones keep name, shape and type."""
    before = _stored_by_name(original)
    after = _stored_by_name(new)
    if list(before) != list(after) or len(original.graph.node) != len(new.graph.node):
        raise GradcheckError(
            "internal error: the re-initialised ONNX graph lost or gained tensors",
            hint="please report this; nothing was written",
        )
    for name, old in before.items():
        fresh = after[name]
        if name in changed:
            if (tuple(old.dims), old.data_type) != (tuple(fresh.dims), fresh.data_type):
                raise GradcheckError(
                    f"internal error: {name} changed shape or type", hint="please report this; nothing was written"
                )
        elif _without_name(old) != _without_name(fresh):
            raise GradcheckError(
                f"internal error: {name} was not selected but changed", hint="please report this; nothing was written"
            )


def _stored_by_name(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initializers and Constant nodes' tensors, by initializer name or Constant output."""
    stored = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            for attribute in node.attribute:
                if attribute.name == "value":
                    stored[node.output[0]] = attribute.t
    return stored


def _without_name(tensor: onnx.TensorProto) -> bytes:
    import onnx

    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    copy.name = ""
    data: bytes = copy.SerializeToString()
    return data


def _consumers(graph: onnx.GraphProto) -> dict[str, list[int]]:
    users: dict[str, list[int]] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            if name:
                users.setdefault(name, []).append(index)
    return users


def _as_stored(pmap: ParameterMap, layer: OnnxLayer, name: str, values: Any) -> Any:
    """Values drawn in the shape the layer sees, in the layout of the stored tensor ``name``."""
    path = layer.paths.get(name, ())
    return pmap.to_source(values, pmap.sources[name], path) if path else values


def _initializer_users(pmap: ParameterMap) -> dict[str, list[str]]:
    """Stored tensor -> names of the layer nodes that read it as a weight or bias (tied weights
    have several), through plumbing."""
    users: dict[str, list[str]] = {}
    for name, uses in pmap.uses.items():
        for use in uses:
            node = pmap.graph.node[use.owner]
            if node.op_type in LAYER_OPS and use.owner_slot >= 1:
                label = node.name or f"{node.op_type}_{use.owner}"
                if label not in users.get(name, []):
                    users.setdefault(name, []).append(label)
    return users


def _attributes(node: onnx.NodeProto) -> dict[str, Any]:
    from onnx import helper

    return {attr.name: helper.get_attribute_value(attr) for attr in node.attribute}


def _initializer_values(graph: onnx.GraphProto, name: str) -> Any:
    """The value of an initializer or Constant node output (None when it is neither)."""
    from onnx import numpy_helper

    from gradcheck_cli.onnx.params import constant_array

    for tensor in graph.initializer:
        if tensor.name == name:
            return numpy_helper.to_array(tensor)
    for node in graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] == name:
            return constant_array(node)
    return None
