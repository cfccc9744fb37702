"""Re-initialise the layers of a PyTorch module: the plumbing around :mod:`init_math`.

Which activation follows a layer is read from the data flow of one forward pass on the probe
batch: a ``TorchFunctionMode`` sees every torch call, including functional activations
(``torch.relu(self.fc(x))``) and the aten ops of a ``torch.export`` program, and follows the
layer's output through shape, norm, pooling and arithmetic ops until it meets an activation
(that one follows the layer) or another layer (then none does). TorchScript runs in C++ where no
mode can see it; there the same walk is done on the module's inlined graph, and only where that
fails is the next activation module in definition order used (the report says so).

The pass works on a deep copy: the caller's module is never changed. Each new tensor is written
into the copy's existing ``Parameter`` in place, so shapes, dtypes, devices and tying (one
``Parameter`` reachable under several names) are kept by construction, and every tensor the
pass did not choose keeps its bytes (checked by :func:`verify_untouched`).
"""

from __future__ import annotations

import contextlib
import copy
import re
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gradcheck_cli.choice import Choice
from gradcheck_cli.errors import GradcheckError, ProbeError, UsageError, first_line
from gradcheck_cli.options import RecurrentInit, ReinitOptions, Scheme
from gradcheck_cli.probe.activations import MODULE_ACTIVATIONS, activation_of_call, function_name
from gradcheck_cli.probe.batch import ProbeBatch
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
from gradcheck_cli.rewrite.reinit_records import ActivationSource, LayerInit, LsuvStep, TensorInit
from gradcheck_cli.torch_util import set_training, type_name

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    import torch
    from torch import nn


class LayerRole(Choice):
    DENSE = "dense"  # weight (out, in)
    DENSE_IN_OUT = "dense_in_out"  # x @ W with W (in, out)
    CONV = "conv"
    CONV_TRANSPOSE = "conv_transpose"
    RECURRENT = "recurrent"
    NORM = "norm"

    @property
    def layout(self) -> WeightLayout:
        return {
            LayerRole.DENSE: WeightLayout.OUT_IN,
            LayerRole.DENSE_IN_OUT: WeightLayout.IN_OUT,
            LayerRole.CONV: WeightLayout.CONV,
            LayerRole.CONV_TRANSPOSE: WeightLayout.CONV_TRANSPOSE,
        }.get(self, WeightLayout.OUT_IN)


@dataclass(frozen=True)
class RecurrentCell:
    """One layer and direction of an RNN/LSTM/GRU: its four parameter names."""

    weight_ih: str
    weight_hh: str
    bias_ih: str | None
    bias_hh: str | None


@dataclass(frozen=True)
class TorchLayer:
    name: str  # module path, or the weight's name without '.weight' for layers seen only as ops
    type: str
    role: LayerRole
    weight: str | None
    bias: str | None = None
    groups: int = 1
    buffers: tuple[str, ...] = ()  # norm running statistics
    cells: tuple[RecurrentCell, ...] = ()
    gates: int = 1
    hidden: int = 0
    nonlinearity: str | None = None  # recurrent: 'tanh', 'relu' (RNN) or 'sigmoid' (LSTM/GRU gates)


@dataclass(frozen=True)
class Following:
    activation: str | None
    slope: float | None
    source: ActivationSource


@dataclass
class ExecutionTrace:
    """What one forward pass showed about each weight (keyed by parameter name)."""

    order: dict[str, int] = field(default_factory=dict)  # first execution index
    roles: dict[str, tuple[LayerRole, int, str | None, str]] = field(default_factory=dict)
    following: dict[str, tuple[str | None, float | None]] = field(default_factory=dict)
    norms_after: dict[str, set[str]] = field(default_factory=dict)  # weight -> norm weights it feeds
    norm_ops: dict[str, str] = field(default_factory=dict)  # norm weight name -> op type
    ran: bool = False  # False: nothing was visible (TorchScript)


@dataclass
class TorchReinitResult:
    module: nn.Module
    layers: list[LayerInit]
    changes: list[Change]
    notes: list[str]


_RECURRENT_PARAM = re.compile(r"^(weight|bias)_(ih|hh)_l(\d+)(_reverse)?$")
_RECURRENT_TYPES = {"RNN": None, "LSTM": 4, "GRU": 3}
_CONV_TYPE = re.compile(r"^(Conv|LazyConv)([123])d$")
_CONV_TRANSPOSE_TYPE = re.compile(r"^(ConvTranspose|LazyConvTranspose)([123])d$")
_NORM_OPS = frozenset(
    {
        "batch_norm",
        "native_batch_norm",
        "_native_batch_norm_legit",
        "_native_batch_norm_legit_no_training",
        "layer_norm",
        "native_layer_norm",
        "group_norm",
        "native_group_norm",
        "instance_norm",
        "rms_norm",
    }
)
_NORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")
_OP_TYPES = {
    "linear": "Linear",
    "conv1d": "Conv1d",
    "conv2d": "Conv2d",
    "conv3d": "Conv3d",
    "conv_transpose1d": "ConvTranspose1d",
    "conv_transpose2d": "ConvTranspose2d",
    "conv_transpose3d": "ConvTranspose3d",
    "matmul": "MatMul",
    "mm": "MatMul",
}


# --------------------------------------------------------------------------- discovery


def find_layers(module: nn.Module, trace: ExecutionTrace | None) -> tuple[list[TorchLayer], list[Change]]:
    """Every layer reinit knows how to initialise, and the parameterised modules it declines."""
    from torch import nn

    layers: list[TorchLayer] = []
    covered: set[str] = set()
    declined: list[Change] = []
    unknown: list[tuple[str, str, list[str]]] = []
    for path, sub in module.named_modules():
        kind = type_name(sub)
        prefix = f"{path}." if path else ""
        direct = [n for n, _ in sub.named_parameters(recurse=False)]
        layer: TorchLayer | None = None
        if any(_RECURRENT_PARAM.match(n) for n in direct):
            layer = _recurrent_layer(path, kind, sub, direct)
        elif (kind == "Linear" or isinstance(sub, nn.Linear)) and "weight" in direct:
            layer = TorchLayer(path, kind, LayerRole.DENSE, f"{prefix}weight", _bias(prefix, direct))
        elif _CONV_TYPE.match(kind) and "weight" in direct:
            layer = TorchLayer(
                path,
                kind,
                LayerRole.CONV,
                f"{prefix}weight",
                _bias(prefix, direct),
                groups=int(getattr(sub, "groups", 1)),
            )
        elif _CONV_TRANSPOSE_TYPE.match(kind) and "weight" in direct:
            layer = TorchLayer(
                path,
                kind,
                LayerRole.CONV_TRANSPOSE,
                f"{prefix}weight",
                _bias(prefix, direct),
                groups=int(getattr(sub, "groups", 1)),
            )
        elif "Norm" in kind and kind != "RMSNorm" and (direct or _has_running_stats(sub)):
            buffers = tuple(f"{prefix}{b}" for b in _NORM_BUFFERS if _has_buffer(sub, b))
            layer = TorchLayer(
                path,
                kind,
                LayerRole.NORM,
                f"{prefix}weight" if "weight" in direct else None,
                _bias(prefix, direct),
                buffers=buffers,
            )
        elif direct:
            unknown.append((path, kind, [prefix + n for n in direct]))
        if layer is not None:
            layers.append(layer)
            covered.update(_tensor_names(layer))
    seen_in_trace = trace.roles if trace is not None else {}
    for weight, (role, groups, bias, op_type) in seen_in_trace.items():
        if weight in covered:
            continue
        name = weight.removesuffix(".weight")
        if role is LayerRole.NORM:
            owner = weight.rsplit(".", 1)[0] + "." if "." in weight else ""
            buffers = tuple(f"{owner}{b}" for b in _NORM_BUFFERS if _named_buffer(module, f"{owner}{b}"))
            layer = TorchLayer(name, op_type, role, weight, bias, buffers=buffers)
        else:
            layer = TorchLayer(name, op_type, role, weight, bias, groups=groups)
        layers.append(layer)
        covered.update(_tensor_names(layer))
    for path, kind, names in unknown:
        left = [n for n in names if n not in covered]
        if left:
            declined.append(
                Change(
                    target=path or "(root)",
                    action="reinit",
                    detail=", ".join(left),
                    applied=False,
                    reason=f"{kind}: no initialisation rule for this layer type "
                    "(reinit handles Linear, Conv, ConvTranspose, RNN/LSTM/GRU and "
                    "normalisation layers); left as it was",
                )
            )
    return layers, declined


def _recurrent_layer(path: str, kind: str, sub: nn.Module, direct: list[str]) -> TorchLayer:
    prefix = f"{path}." if path else ""
    params = dict(sub.named_parameters(recurse=False))
    cells = []
    for name in direct:
        match = _RECURRENT_PARAM.match(name)
        if match and match.group(1) == "weight" and match.group(2) == "ih":
            suffix = f"l{match.group(3)}{match.group(4) or ''}"
            cells.append(
                RecurrentCell(
                    weight_ih=prefix + name,
                    weight_hh=f"{prefix}weight_hh_{suffix}",
                    bias_ih=f"{prefix}bias_ih_{suffix}" if f"bias_ih_{suffix}" in params else None,
                    bias_hh=f"{prefix}bias_hh_{suffix}" if f"bias_hh_{suffix}" in params else None,
                )
            )
    first_hh = params[cells[0].weight_hh.removeprefix(prefix)]
    hidden = int(getattr(sub, "hidden_size", first_hh.shape[1]))
    gates = int(first_hh.shape[0]) // hidden
    if kind not in _RECURRENT_TYPES:
        kind = {1: "RNN", 3: "GRU", 4: "LSTM"}.get(gates, kind)
    nonlinearity = str(getattr(sub, "nonlinearity", "tanh")) if gates == 1 else "sigmoid"
    # LSTM with proj_size has a fifth tensor per cell, weight_hr; declined by the caller.
    return TorchLayer(
        path, kind, LayerRole.RECURRENT, None, cells=tuple(cells), gates=gates, hidden=hidden, nonlinearity=nonlinearity
    )


def _bias(prefix: str, direct: list[str]) -> str | None:
    return f"{prefix}bias" if "bias" in direct else None


def _has_buffer(sub: nn.Module, name: str) -> bool:
    return any(n == name for n, _ in sub.named_buffers(recurse=False))


def _has_running_stats(sub: nn.Module) -> bool:
    return _has_buffer(sub, "running_mean")


def _named_buffer(module: nn.Module, name: str) -> bool:
    return any(n == name for n, _ in module.named_buffers())


def _tensor_names(layer: TorchLayer) -> list[str]:
    names = [n for n in (layer.weight, layer.bias) if n is not None]
    names += list(layer.buffers)
    for cell in layer.cells:
        names += [n for n in (cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh) if n is not None]
    return names


# --------------------------------------------------------------------------- data flow


class _Captured(Exception):
    """Raised inside the forward pass once LSUV has the output it needs: the rest is not run."""

    def __init__(self, output: Any) -> None:
        super().__init__("captured")
        self.output = output


def _tensors_in(value: Any) -> Iterator[Any]:
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            if isinstance(item, torch.Tensor):
                yield item
    elif isinstance(value, Mapping):
        for item in value.values():
            if isinstance(item, torch.Tensor):
                yield item


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str, default: Any = None) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _weighted_call(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[LayerRole, Any, Any, int] | None:
    """(role, weight, bias, groups) when the call is a layer's own op; None otherwise."""
    if name == "linear":
        return LayerRole.DENSE, _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias"), 1
    if name in ("conv1d", "conv2d", "conv3d"):
        return (
            LayerRole.CONV,
            _arg(args, kwargs, 1, "weight"),
            _arg(args, kwargs, 2, "bias"),
            int(_arg(args, kwargs, 6, "groups", 1)),
        )
    if name in ("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"):
        return (
            LayerRole.CONV_TRANSPOSE,
            _arg(args, kwargs, 1, "weight"),
            _arg(args, kwargs, 2, "bias"),
            int(_arg(args, kwargs, 6, "groups", 1)),
        )
    if name in ("convolution", "_convolution"):
        transposed = bool(_arg(args, kwargs, 6, "transposed", False))
        return (
            LayerRole.CONV_TRANSPOSE if transposed else LayerRole.CONV,
            _arg(args, kwargs, 1, "weight"),
            _arg(args, kwargs, 2, "bias"),
            int(_arg(args, kwargs, 8, "groups", 1)),
        )
    if name in ("matmul", "mm"):
        return LayerRole.DENSE_IN_OUT, _arg(args, kwargs, 1, "other"), None, 1
    return None


def _slope(fn: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float | None:
    if fn == "leaky_relu":
        return float(_arg(args, kwargs, 1, "negative_slope", 0.01))
    if fn == "prelu":
        weight = _arg(args, kwargs, 1, "weight")
        return float(weight.detach().float().mean()) if weight is not None else 0.25
    if fn == "rrelu":  # eval mode uses the mean of [lower, upper]
        return (float(_arg(args, kwargs, 1, "lower", 1 / 8)) + float(_arg(args, kwargs, 2, "upper", 1 / 3))) / 2
    return None


class _FlowRecorder:
    """Follows each layer's output through the calls of one forward pass."""

    def __init__(self, module: nn.Module, *, capture: str | None = None) -> None:
        self.names: dict[int, str] = {}
        for name, param in module.named_parameters(remove_duplicate=False):
            self.names.setdefault(id(param), name)
        self.trace = ExecutionTrace()
        self.capture = capture
        self._taint: dict[int, tuple[weakref.ref[Any], frozenset[str]]] = {}

    def _layers_of(self, tensors: list[Any]) -> set[str]:
        found: set[str] = set()
        for t in tensors:
            entry = self._taint.get(id(t))
            if entry is not None and entry[0]() is t:
                found |= entry[1]
        return found

    def _mark(self, output: Any, layers: set[str]) -> None:
        open_layers = frozenset(layer for layer in layers if layer not in self.trace.following)
        if not open_layers:
            return
        for t in _tensors_in(output):
            self._taint[id(t)] = (weakref.ref(t), open_layers)

    def observe(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        name = function_name(func)
        if name is None:
            return
        if name.endswith("_") and not name.startswith("_"):
            name = name[:-1]
        self.trace.ran = True
        inputs = [t for value in (*args, *kwargs.values()) for t in _tensors_in(value)]
        upstream = self._layers_of(inputs)
        fn = activation_of_call(func, args, kwargs)
        if fn is not None:
            for layer in upstream:
                self.trace.following.setdefault(layer, (fn, _slope(fn, args, kwargs)))
            return
        weighted = _weighted_call(name, args, kwargs)
        weight_name = self.names.get(id(weighted[1])) if weighted is not None else None
        if weighted is not None and weight_name is not None:
            role, _, bias, groups = weighted
            for layer in upstream:  # another layer comes first: nothing nonlinear in between
                self.trace.following.setdefault(layer, (None, None))
            self.trace.order.setdefault(weight_name, len(self.trace.order))
            bias_name = self.names.get(id(bias)) if bias is not None else None
            self.trace.roles.setdefault(weight_name, (role, groups, bias_name, _OP_TYPES.get(name, name)))
            if self.capture == weight_name:
                raise _Captured(output)
            self._mark(output, {weight_name})
            return
        if name in _NORM_OPS:
            norm_weights = [self.names[id(t)] for t in inputs if id(t) in self.names]
            for layer in upstream:
                self.trace.norms_after.setdefault(layer, set()).update(norm_weights)
            if norm_weights:
                weight = next((n for n in norm_weights if n.endswith("weight")), norm_weights[0])
                bias = next((n for n in norm_weights if n.endswith("bias")), None)
                kind = "BatchNorm" if "batch_norm" in name else "LayerNorm" if "layer" in name else "Norm"
                self.trace.roles.setdefault(weight, (LayerRole.NORM, 1, bias, kind))
        self._mark(output, upstream)


def _mode_class() -> type:
    from torch.overrides import TorchFunctionMode

    class FlowMode(TorchFunctionMode):
        def __init__(self, recorder: _FlowRecorder) -> None:
            super().__init__()
            self.recorder = recorder

        def __torch_function__(
            self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
        ) -> Any:
            kwargs = kwargs or {}
            output = func(*args, **kwargs)
            self.recorder.observe(func, args, kwargs, output)
            return output

    return FlowMode


@contextlib.contextmanager
def _inference_forward(module: nn.Module, doing: str) -> Iterator[None]:
    """Eval mode and no_grad for the block, the training flag restored; a failure of the model
    becomes a ProbeError that says what reinit was ``doing`` (_Captured passes through)."""
    import torch

    was_training = module.training
    switched = set_training(module, False)
    try:
        with torch.no_grad():
            yield
    except _Captured:
        raise
    except Exception as exc:
        raise ProbeError(
            f"the model failed on the probe batch while reinit {doing}: {type(exc).__name__}: {first_line(exc)}",
            hint="check `input_shape`/`input`; pass `debug` for the traceback",
        ) from exc
    finally:
        if switched:
            set_training(module, was_training)


def _run(module: nn.Module, batches: list[ProbeBatch], recorder: _FlowRecorder) -> Any:
    """Run the batches under the recorder; eval mode and no_grad, training flag restored."""
    try:
        with _inference_forward(module, "traced it"), _mode_class()(recorder):
            for batch in batches:
                module(*batch.args, **batch.kwargs)
    except _Captured as captured:
        return captured.output
    return None


def _run_intercepted(
    module: nn.Module, batch: ProbeBatch, intercept: Callable[[Any, tuple[Any, ...], dict[str, Any]], Any]
) -> None:
    """One forward pass with every torch call made by ``intercept(func, args, kwargs)``; eval mode
    and no_grad, training flag restored (as :func:`_run`)."""
    from torch.overrides import TorchFunctionMode

    class Intercept(TorchFunctionMode):
        def __torch_function__(
            self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
        ) -> Any:
            return intercept(func, args, kwargs or {})

    with _inference_forward(module, "rescaled it (LSUV)"), Intercept():
        module(*batch.args, **batch.kwargs)


def trace_execution(module: nn.Module, batches: list[ProbeBatch]) -> ExecutionTrace:
    """Execution order and following activation of every weight, from one forward pass."""
    recorder = _FlowRecorder(module)
    _run(module, batches[:1], recorder)
    return recorder.trace


_SCRIPT_LAYER_OPS = frozenset(
    {
        "aten::linear",
        "aten::conv1d",
        "aten::conv2d",
        "aten::conv3d",
        "aten::conv_transpose1d",
        "aten::conv_transpose2d",
        "aten::conv_transpose3d",
        "aten::_convolution",
        "aten::convolution",
    }
)


def following_in_torchscript(module: nn.Module) -> dict[str, Following]:
    """TorchScript: follow each layer's output through the inlined graph to the next activation.

    Keyed by weight name. Values are named by walking ``prim::GetAttr`` chains from ``self``;
    a weight that is not an attribute path (computed in forward) is skipped. Returns {} when the
    graph cannot be read, and the caller falls back to module order.
    """
    try:
        graph: Any = getattr(module, "inlined_graph")  # noqa: B009 - TorchScript-only attribute
    except Exception:
        return {}
    inputs = list(graph.inputs())
    if not inputs:
        return {}
    paths: dict[Any, str] = {inputs[0]: ""}
    result: dict[str, Following] = {}

    def walk(block: Any) -> None:
        for node in block.nodes():
            kind = node.kind()
            if kind == "prim::GetAttr" and node.input() in paths:
                base = paths[node.input()]
                paths[node.output()] = f"{base}.{node.s('name')}" if base else node.s("name")
            elif kind in _SCRIPT_LAYER_OPS:
                weight = paths.get(list(node.inputs())[1])
                if weight is not None and weight not in result:
                    fn, slope = _script_following(node.output())
                    result[weight] = Following(fn, slope, ActivationSource.GRAPH)
            for inner in node.blocks():
                walk(inner)

    walk(graph)
    return result


def _script_following(start: Any) -> tuple[str | None, float | None]:
    queue = [start]
    seen: set[str] = set()
    while queue:
        value = queue.pop(0)
        if value.debugName() in seen:
            continue
        seen.add(value.debugName())
        for use in value.uses():
            user = use.user
            kind = user.kind()
            fn = _script_activation(kind)
            if fn is not None:
                return fn, _script_slope(fn, user)
            if kind in _SCRIPT_LAYER_OPS:
                continue
            if kind == "prim::Return":  # a block's result flows out of the If/Loop that owns it
                owner = user.owningBlock().owningNode()
                if owner is not None:
                    queue.extend(owner.outputs())
                continue
            queue.extend(user.outputs())
    return None, None


def _script_activation(kind: str) -> str | None:
    import torch

    if not kind.startswith("aten::"):
        return None
    name = kind.removeprefix("aten::")
    if name.endswith("_") and not name.startswith("_"):
        name = name[:-1]
    packet = getattr(torch.ops.aten, name, None)
    overload = getattr(packet, "default", None) if packet is not None else None
    return activation_of_call(overload, (), {}) if overload is not None else None


def _script_slope(fn: str, node: Any) -> float | None:
    if fn not in ("leaky_relu", "rrelu"):
        return None
    try:
        values = [i.toIValue() for i in list(node.inputs())[1:3]]
    except Exception:
        return None
    numbers = [float(v) for v in values if isinstance(v, (int, float))]
    if fn == "leaky_relu":
        return numbers[0] if numbers else 0.01
    return sum(numbers) / len(numbers) if len(numbers) == 2 else (1 / 8 + 1 / 3) / 2


def following_by_module_order(module: nn.Module, layers: list[TorchLayer]) -> dict[str, Following]:
    """TorchScript fallback: the next activation module in definition order, before the next layer."""
    leaves = [(name, sub) for name, sub in module.named_modules() if not list(sub.children())]
    layer_names = {layer.name for layer in layers if layer.role is not LayerRole.NORM}
    result: dict[str, Following] = {}
    for index, (name, _) in enumerate(leaves):
        if name not in layer_names:
            continue
        found: tuple[str | None, float | None] = (None, None)
        for later_name, later in leaves[index + 1 :]:
            fn = MODULE_ACTIVATIONS.get(type_name(later))
            if fn is not None:
                found = (fn, _module_slope(fn, later))
                break
            if later_name in layer_names:
                break
        result[name] = Following(found[0], found[1], ActivationSource.MODULE_ORDER)
    return result


def _module_slope(fn: str, sub: nn.Module) -> float | None:
    if fn == "leaky_relu":
        return float(getattr(sub, "negative_slope", 0.01))
    if fn == "prelu":
        weight = getattr(sub, "weight", None)
        return float(weight.detach().float().mean()) if weight is not None else 0.25
    if fn == "rrelu":
        return (float(getattr(sub, "lower", 1 / 8)) + float(getattr(sub, "upper", 1 / 3))) / 2
    return None


def _following(layer: TorchLayer, trace: ExecutionTrace | None, by_order: dict[str, Following]) -> Following:
    if layer.role is LayerRole.RECURRENT:
        return Following(layer.nonlinearity, None, ActivationSource.INTERNAL)
    if trace is not None and trace.ran and layer.weight is not None:
        if layer.weight in trace.following:
            fn, slope = trace.following[layer.weight]
            return Following(fn, slope, ActivationSource.EXECUTION)
        if layer.weight in trace.order:  # ran, and its output reached the model's output
            return Following(None, None, ActivationSource.EXECUTION)
    if layer.name in by_order:
        return by_order[layer.name]
    return Following(None, None, ActivationSource.NOT_EXECUTED)


# --------------------------------------------------------------------------- the pass


def reinit_module(module: nn.Module, batches: list[ProbeBatch], *, options: ReinitOptions) -> TorchReinitResult:
    """A re-initialised deep copy of ``module`` and the record of what it got and why."""
    import torch

    validate(options)
    scripted = isinstance(module, torch.jit.ScriptModule)
    trace = None if scripted else trace_execution(module, batches)
    if trace is not None and not trace.ran:
        trace = None
    layers, declined = find_layers(module, trace)
    by_order: dict[str, Following] = {}
    if trace is None:
        by_order = following_by_module_order(module, layers)
        in_graph = following_in_torchscript(module) if scripted else {}
        by_order.update(
            {
                layer.name: in_graph[layer.weight]
                for layer in layers
                if layer.weight is not None and layer.weight in in_graph
            }
        )
    selectable = [layer for layer in layers if layer.role is not LayerRole.NORM or options.reset_norm]
    chosen = select([layer.name for layer in selectable], options.layers)
    declined = [change for change in declined if matches_any(change.target, options.layers)]
    if options.scheme is Scheme.LSUV and scripted:
        raise UsageError(
            "`scheme` lsuv needs to observe each layer's output on the probe batch, which "
            "a TorchScript module does not allow",
            hint="load the model as a state_dict with `arch` (or as a .pt2 program), or use `scheme` orthogonal",
        )
    if trace is not None:
        # Execution order: LSUV rescales in it, and the report reads top to bottom like the model.
        layers.sort(key=lambda layer: trace.order.get(_first_weight(layer) or "", len(trace.order)))
    new = copy.deepcopy(module)
    params = _tensors_by_name(new)
    aliases = _aliases(new)
    done: dict[int, str] = {}  # id of a tensor already given new values -> the name it was set under
    records: list[LayerInit] = []
    changes: list[Change] = list(declined)
    notes: list[str] = []
    stale_norms: list[str] = []
    for layer in layers:
        if layer.name not in chosen:
            continue
        following = _following(layer, trace, by_order)
        problem = _unsupported(layer, params)
        if problem is not None:
            changes.append(Change(layer.name, "reinit", layer.type, applied=False, reason=problem))
            continue
        record = _apply(layer, following, params, aliases, done, options)
        records.append(record)
        shared = [n for t in record.tensors for n in t.shared_with]
        detail = ", ".join(f"{t.parameter}: {t.scheme} std {t.std:.4g}" for t in record.tensors)
        changes.append(
            Change(
                layer.name,
                f"reinit:{record.scheme}",
                detail + (f" (shared with {', '.join(shared)})" if shared else ""),
            )
        )
        if trace is not None and layer.weight and not options.reset_norm:
            stale_norms.extend(sorted(trace.norms_after.get(layer.weight, set()) & _norms_with_stats(layers)))
    if stale_norms:
        names = ", ".join(dict.fromkeys(norm.removesuffix(".weight") for norm in stale_norms))
        notes.append(
            f"the running statistics of {names} were measured on the outputs of the old weights; "
            "pass `reset_norm` to reset them to (0, 1), or recompute them on data before using "
            "the model in eval mode"
        )
    if options.scheme is Scheme.LSUV:
        records = _lsuv(new, batches, records, layers, options)
    if any(record.activation_source is ActivationSource.MODULE_ORDER for record in records):
        notes.append(
            "TorchScript: for some layers the following activation could not be read from "
            "the graph and was taken from module definition order instead; save the model as "
            "a state_dict with `arch` or as a .pt2 program for exact data flow"
        )
    verify_untouched(module, new, {t.parameter for r in records for t in r.tensors}, aliases)
    return TorchReinitResult(module=new, layers=records, changes=changes, notes=_unique(notes))


def _first_weight(layer: TorchLayer) -> str | None:
    return layer.weight or (layer.cells[0].weight_ih if layer.cells else None)


def _norms_with_stats(layers: list[TorchLayer]) -> set[str]:
    return {
        layer.weight
        for layer in layers
        if layer.role is LayerRole.NORM and layer.weight and any("running_var" in b for b in layer.buffers)
    }


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _tensors_by_name(module: nn.Module) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        tensors[name] = param
    for name, buffer in module.named_buffers(remove_duplicate=False):
        tensors[name] = buffer
    return tensors


def _aliases(module: nn.Module) -> dict[str, tuple[str, ...]]:
    """Every name of each tensor (tied weights have several), keyed by each of them."""
    groups: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    for name, buffer in module.named_buffers(remove_duplicate=False):
        groups.setdefault(id(buffer), []).append(name)
    return {name: tuple(names) for names in groups.values() for name in names}


def _unsupported(layer: TorchLayer, params: dict[str, torch.Tensor]) -> str | None:
    for name in _tensor_names(layer):
        tensor = params.get(name)
        if tensor is None:
            return f"its tensor {name} could not be found in the module"
        if type(tensor).__name__ == "UninitializedParameter":
            return "a lazy module whose parameters are not materialised yet; run it once first"
        if not tensor.dtype.is_floating_point and not name.endswith("num_batches_tracked"):
            return f"{name} is {tensor.dtype}, not floating point (quantised layers are not re-initialised)"
    if layer.role is LayerRole.RECURRENT:
        prefix = f"{layer.name}." if layer.name else ""
        if any(n.startswith(f"{prefix}weight_hr") for n in params):
            return "LSTM with proj_size: the projection weights have no rule here; left as it was"
        if layer.hidden <= 0 or layer.gates not in (1, 3, 4):
            return "unrecognised recurrent layout"
    return None


def _apply(
    layer: TorchLayer,
    following: Following,
    params: dict[str, torch.Tensor],
    aliases: dict[str, tuple[str, ...]],
    done: dict[int, str],
    options: ReinitOptions,
) -> LayerInit:
    if layer.role is LayerRole.NORM:
        tensors = _reset_norm(layer, params, aliases, done)
        return LayerInit(
            layer.name,
            layer.type,
            "reset",
            "normalisation reset asked for: affine (1, 0), running stats (0, 1)",
            None,
            ActivationSource.INTERNAL,
            tuple(tensors),
        )
    if layer.role is LayerRole.RECURRENT:
        return _init_recurrent(layer, following, params, aliases, done, options)
    assert layer.weight is not None
    weight = params[layer.weight]
    shape = tuple(weight.shape)
    layer_fans = fans(shape, layout=layer.role.layout, groups=layer.groups)
    plan = plan_weight(options, shape=shape, fans_=layer_fans, activation=following.activation, slope=following.slope)
    tensors = []
    already = done.get(id(weight))
    if already is None:
        values = sample(shape, plan.spec, layer_rng(options.seed, layer.weight))
        tensors.append(_write(layer.weight, values, plan.spec, params, aliases, done))
        reason = plan.reason
        if following.source is ActivationSource.NOT_EXECUTED:
            reason += " (the layer did not run on the probe batch, so no activation could be seen)"
    else:
        reason = f"shares its weight with {already}, which was initialised first (one tensor, still shared)"
    if layer.bias is not None:
        tensors.append(_zero(layer.bias, params, aliases, done))
    return LayerInit(
        layer.name, layer.type, str(plan.scheme), reason, following.activation, following.source, tuple(tensors)
    )


def _init_recurrent(
    layer: TorchLayer,
    following: Following,
    params: dict[str, torch.Tensor],
    aliases: dict[str, tuple[str, ...]],
    done: dict[int, str],
    options: ReinitOptions,
) -> LayerInit:
    """Input weights by the scheme, gate block by gate block; recurrent weights orthogonal or I."""
    import numpy as np

    tensors: list[TensorInit] = []
    scheme = Scheme.AUTO
    reason = ""
    for cell in layer.cells:
        w_ih = params[cell.weight_ih]
        in_features = int(w_ih.shape[1])
        block_fans = Fans(fan_in=in_features, fan_out=layer.hidden)
        plan = plan_weight(
            options, shape=(layer.hidden, in_features), fans_=block_fans, activation=following.activation, slope=None
        )
        scheme, reason = plan.scheme, plan.reason
        rng = layer_rng(options.seed, cell.weight_ih)
        blocks = [sample((layer.hidden, in_features), plan.spec, rng) for _ in range(layer.gates)]
        tensors.append(_write(cell.weight_ih, np.concatenate(blocks), plan.spec, params, aliases, done))
        w_hh = params[cell.weight_hh]
        hh_fans = Fans(fan_in=int(w_hh.shape[1]), fan_out=layer.hidden)
        if options.recurrent is RecurrentInit.IDENTITY:
            values = identity_blocks(tuple(w_hh.shape), block=layer.hidden)
            hh_spec = InitSpec(
                scheme=Scheme.ORTHOGONAL,
                distribution=None,
                mode=None,
                gain=1.0,
                fans=hh_fans,
                std=1.0 / np.sqrt(layer.hidden),
            )
            tensors.append(_write(cell.weight_hh, values, hh_spec, params, aliases, done, label="identity"))
        else:
            hh_spec = orthogonal_spec((layer.hidden, layer.hidden), fans_=hh_fans, gain=1.0)
            rng_hh = layer_rng(options.seed, cell.weight_hh)
            values = np.concatenate(
                [orthogonal((layer.hidden, layer.hidden), gain=1.0, rng=rng_hh) for _ in range(layer.gates)]
            )
            tensors.append(_write(cell.weight_hh, values, hh_spec, params, aliases, done))
        for bias in (cell.bias_ih, cell.bias_hh):
            if bias is None:
                continue
            if options.forget_bias and layer.gates == 4 and bias == cell.bias_ih:
                # PyTorch's LSTM gate order is (input, forget, cell, output): block 1 is the forget
                # gate. b_hh stays 0, so the gate's total bias b_ih + b_hh is 1.
                tensors.append(_forget_bias(bias, layer.hidden, params, done))
            else:
                tensors.append(_zero(bias, params, aliases, done))
    reason += f"; recurrent weights {options.recurrent}"
    if options.forget_bias and layer.gates == 4:
        reason += "; forget-gate bias 1"
    return LayerInit(
        layer.name, layer.type, str(scheme), reason, following.activation, following.source, tuple(tensors)
    )


def _write(
    name: str,
    values: npt.NDArray[np.float64],
    spec: InitSpec,
    params: dict[str, torch.Tensor],
    aliases: dict[str, tuple[str, ...]],
    done: dict[int, str],
    *,
    label: str | None = None,
) -> TensorInit:
    import torch

    target = params[name]
    with torch.no_grad():
        # In place, converting while copying (one pass): the Parameter object (and every tied
        # alias of it) is kept.
        target.copy_(torch.from_numpy(values))
    done.setdefault(id(target), name)
    return TensorInit(
        parameter=name,
        shape=tuple(target.shape),
        dtype=_dtype(target),
        scheme=label or str(spec.scheme),
        std=spec.std,
        measured_std=_rms(target),
        distribution=str(spec.distribution) if spec.distribution else None,
        mode=str(spec.mode) if spec.mode else None,
        gain=spec.gain,
        fan_in=spec.fans.fan_in,
        fan_out=spec.fans.fan_out,
        shared_with=tuple(a for a in aliases.get(name, ()) if a != name),
    )


def _zero(
    name: str,
    params: dict[str, torch.Tensor],
    aliases: dict[str, tuple[str, ...]],
    done: dict[int, str],
    value: float = 0.0,
) -> TensorInit:
    import torch

    target = params[name]
    with torch.no_grad():
        target.fill_(value)
    done.setdefault(id(target), name)
    return TensorInit(
        parameter=name,
        shape=tuple(target.shape),
        dtype=_dtype(target),
        scheme="zeros" if value == 0 else "ones" if value == 1 else f"constant {value:g}",
        std=0.0,
        measured_std=_rms(target),
        shared_with=tuple(a for a in aliases.get(name, ()) if a != name),
    )


def _forget_bias(name: str, hidden: int, params: dict[str, torch.Tensor], done: dict[int, str]) -> TensorInit:
    import torch

    target = params[name]
    with torch.no_grad():
        target.zero_()
        target[hidden : 2 * hidden] = 1.0
    done.setdefault(id(target), name)
    return TensorInit(
        parameter=name,
        shape=tuple(target.shape),
        dtype=_dtype(target),
        scheme="zeros, forget gate 1",
        std=0.0,
        measured_std=_rms(target),
    )


def _reset_norm(
    layer: TorchLayer, params: dict[str, torch.Tensor], aliases: dict[str, tuple[str, ...]], done: dict[int, str]
) -> list[TensorInit]:
    tensors = []
    if layer.weight is not None:
        tensors.append(_zero(layer.weight, params, aliases, done, value=1.0))
    if layer.bias is not None:
        tensors.append(_zero(layer.bias, params, aliases, done))
    for buffer in layer.buffers:
        value = 1.0 if buffer.endswith("running_var") else 0.0
        tensors.append(_zero(buffer, params, aliases, done, value=value))
    return tensors


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def _rms(tensor: torch.Tensor) -> float:
    import math

    import torch

    if tensor.numel() == 0 or not tensor.dtype.is_floating_point:
        return 0.0
    # One fused pass accumulating in float64, no float64 copy of the tensor.
    norm = float(torch.linalg.vector_norm(tensor.detach(), dtype=torch.float64))
    return norm / math.sqrt(tensor.numel())


# --------------------------------------------------------------------------- LSUV


def _lsuv(
    module: nn.Module,
    batches: list[ProbeBatch],
    records: list[LayerInit],
    layers: list[TorchLayer],
    options: ReinitOptions,
) -> list[LayerInit]:
    """Rescale each layer, in execution order, until its output variance is 1 (Mishkin & Matas 2016).

    The orthogonal start is already in place. Biases are zero, so one rescale is exact for a plain
    layer; the loop is there for layers whose output is not linear in the weight alone (a weight
    used twice, a bias the user's code adds). Recurrent and norm layers keep their orthogonal or
    reset values: a gated recurrent output is bounded and cannot be scaled to variance 1.
    """
    by_name = {layer.name: layer for layer in layers}
    params = _tensors_by_name(module)
    rescalable = [
        by_name[r.name].weight
        for r in records
        if by_name[r.name].role not in (LayerRole.RECURRENT, LayerRole.NORM) and by_name[r.name].weight
    ]
    measured = (
        _lsuv_in_one_pass(module, batches, [w for w in rescalable if w is not None], params, options)
        if len(batches) == 1
        else None
    )
    updated: list[LayerInit] = []
    for record in records:
        layer = by_name[record.name]
        if layer.role is LayerRole.RECURRENT:
            updated.append(
                _replace(
                    record,
                    reason=record.reason + "; LSUV keeps the orthogonal start "
                    "here: a gated recurrent output is bounded and cannot be scaled "
                    "to variance 1",
                )
            )
            continue
        if layer.role is LayerRole.NORM or layer.weight is None:
            updated.append(record)
            continue
        weight = params[layer.weight]
        if measured is not None:
            initial, variance, rescales = measured.get(layer.weight, (None, None, 0))
        else:
            initial, variance, rescales = _lsuv_by_truncated_forwards(module, batches, layer.weight, weight, options)
        if variance is None or initial is None:
            reason = record.reason + "; LSUV: the layer did not run on the probe batch, kept orthogonal"
            updated.append(_replace(record, reason=reason))
            continue
        step = LsuvStep(
            iterations=rescales,
            initial_variance=initial,
            variance=variance,
            converged=abs(variance - 1.0) <= options.lsuv_tolerance,
        )
        tensors = list(record.tensors)
        if tensors and tensors[0].parameter == layer.weight:
            first = tensors[0]
            tensors[0] = TensorInit(
                first.parameter,
                first.shape,
                first.dtype,
                "lsuv",
                std=first.std * (1.0 / initial) ** 0.5 if initial > 0 else first.std,
                measured_std=_rms(weight),
                gain=first.gain,
                fan_in=first.fan_in,
                fan_out=first.fan_out,
                shared_with=first.shared_with,
            )
        reason = record.reason + (
            ""
            if step.converged
            else f"; LSUV did not reach variance 1 ± {options.lsuv_tolerance} in {options.lsuv_max_iterations} rescales"
        )
        if initial == 0:
            reason += "; its output is constant on the probe batch, so it cannot be rescaled"
        updated.append(_replace(record, reason=reason, tensors=tuple(tensors), lsuv=step))
    return updated


def _needs_rescale(variance: float | None, rescales: int, options: ReinitOptions) -> bool:
    return (
        variance is not None
        and variance > 0
        and abs(variance - 1.0) > options.lsuv_tolerance
        and rescales < options.lsuv_max_iterations
    )


def _lsuv_by_truncated_forwards(
    module: nn.Module, batches: list[ProbeBatch], name: str, weight: torch.Tensor, options: ReinitOptions
) -> tuple[float | None, float | None, int]:
    """One layer: a forward pass up to its op per measurement (every micro-batch each time)."""

    initial = _output_variance(module, batches, name)
    variance, rescales = _rescale_to_unit_variance(
        weight, initial, lambda: _output_variance(module, batches, name), options
    )
    return initial, variance, rescales


def _rescale_to_unit_variance(
    weight: torch.Tensor, variance: float | None, remeasure: Callable[[], float | None], options: ReinitOptions
) -> tuple[float | None, int]:
    """LSUV's loop for one layer: scale ``weight`` by 1/sqrt(variance) and measure the layer's output
    again until its variance is within tolerance (or the rescale limit): (final variance, rescales)."""
    import torch

    rescales = 0
    while _needs_rescale(variance, rescales, options):
        assert variance is not None
        with torch.no_grad():
            weight.mul_(1.0 / float(variance) ** 0.5)
        rescales += 1
        variance = remeasure()
    return variance, rescales


def _lsuv_in_one_pass(
    module: nn.Module,
    batches: list[ProbeBatch],
    weights: list[str],
    params: dict[str, torch.Tensor],
    options: ReinitOptions,
) -> dict[str, tuple[float, float, int]]:
    """Every layer in a single forward pass (one probe micro-batch): (initial, final variance, rescales).

    The truncated-forward loop runs the model from its input up to each layer once per
    measurement, O(layers²) ops in all. Here the pass stops at each selected layer's op when it
    first runs, measures its output, rescales the weight and runs that op again until the variance
    is within tolerance, then hands the final output on. Every later layer therefore sees exactly
    the input a fresh forward pass with the rescaled weights would give it, so the result is the
    truncated loop's, at the cost of one forward pass plus the repeated ops.
    """

    pending = set(weights)
    results: dict[str, tuple[float, float, int]] = {}
    recorder = _FlowRecorder(module)

    def measure(output: Any) -> float | None:
        values = next(_tensors_in(output), None)
        if values is None:
            return None
        return _variance_of([values])

    def intercept(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        output = func(*args, **kwargs)
        name = function_name(func)
        if name is None or not pending:
            return output
        if name.endswith("_") and not name.startswith("_"):  # as _FlowRecorder.observe names ops
            name = name[:-1]
        weighted = _weighted_call(name, args, kwargs)
        weight_name = recorder.names.get(id(weighted[1])) if weighted is not None else None
        if weight_name is None or weight_name not in pending:
            return output
        pending.discard(weight_name)
        weight = params[weight_name]
        latest = [output]

        def remeasure() -> float | None:
            latest[0] = func(*args, **kwargs)  # the op again, with the rescaled weight
            return measure(latest[0])

        initial = measure(output)
        variance, rescales = _rescale_to_unit_variance(weight, initial, remeasure, options)
        output = latest[0]
        if initial is not None and variance is not None:
            results[weight_name] = (initial, variance, rescales)
        return output

    _run_intercepted(module, batches[0], intercept)
    return results


def _variance_of(outputs: list[torch.Tensor]) -> float | None:
    """Population variance over every element, accumulated in float64 (the LSUV measure)."""
    total = total_sq = 0.0
    count = 0
    for output in outputs:
        values = output.detach().double()
        total += float(values.sum())
        total_sq += float(values.pow(2).sum())
        count += values.numel()
    if count == 0:
        return None
    mean = total / count
    return max(total_sq / count - mean * mean, 0.0)


def _replace(record: LayerInit, **changes: Any) -> LayerInit:
    import dataclasses

    return dataclasses.replace(record, **changes)


def _output_variance(module: nn.Module, batches: list[ProbeBatch], weight: str) -> float | None:
    """Variance of the output of the op that uses ``weight``, over every probe micro-batch."""
    outputs = []
    for batch in batches:
        recorder = _FlowRecorder(module, capture=weight)
        output = _run(module, [batch], recorder)
        if output is None:
            return None
        outputs.append(next(_tensors_in(output)))
    return _variance_of(outputs)


# --------------------------------------------------------------------------- verification


def verify_untouched(
    original: nn.Module, new: nn.Module, changed: set[str], aliases: dict[str, tuple[str, ...]]
) -> None:
    """Every tensor reinit did not choose is bit-identical; shapes, dtypes, devices and ties kept.

    A failure here is a bug in gradcheck, not a user error: nothing is written.
    """
    changed_all = {alias for name in changed for alias in aliases.get(name, (name,))}
    before = _tensors_by_name(original)
    after = _tensors_by_name(new)
    if before.keys() != after.keys():
        raise GradcheckError(
            "internal error: the re-initialised copy has different tensors than the model",
            hint="please report this; nothing was written",
        )
    for name, old in before.items():
        fresh = after[name]
        if (old.shape, old.dtype, old.device) != (fresh.shape, fresh.dtype, fresh.device):
            raise GradcheckError(
                f"internal error: {name} changed shape, dtype or device", hint="please report this; nothing was written"
            )
        if name not in changed_all and not _same_bits(old, fresh):
            raise GradcheckError(
                f"internal error: {name} was not selected but its values changed",
                hint="please report this; nothing was written",
            )
    ties_before = _tie_groups(original)
    if ties_before != _tie_groups(new):
        raise GradcheckError(
            "internal error: tied weights are no longer shared in the copy",
            hint="please report this; nothing was written",
        )


def _tie_groups(module: nn.Module) -> set[tuple[str, ...]]:
    return {names for names in _aliases(module).values() if len(names) > 1}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    import torch

    if a.numel() == 0:
        return True
    # Compare bytes, not values: NaN != NaN, and -0.0 == 0.0, would both mislead torch.equal.
    return bool(
        torch.equal(
            a.detach().contiguous().reshape(-1).view(torch.uint8), b.detach().contiguous().reshape(-1).view(torch.uint8)
        )
    )


# Re-exported for the facade's type hints.
__all__ = [
    "ExecutionTrace",
    "TorchLayer",
    "TorchReinitResult",
    "find_layers",
    "reinit_module",
    "trace_execution",
    "verify_untouched",
]
