"""Fold BatchNorms of a PyTorch module: a graph pass, with a module-structure fallback.

How the BatchNorms and their neighbours are found, in order of preference:

1. ``torch.fx`` symbolic tracing (nn.Module calls and functional calls, ``F.batch_norm`` too);
2. ``torch.export`` when symbolic tracing fails (data-dependent Python, unsupported ops);
   a ``.pt2`` program is already such a graph (aten ops reading ``get_attr`` weights);
3. the module structure, when the model cannot be traced at all (TorchScript, or both tracers
   fail): a BatchNorm is paired with the layer whose output tensor it receives during a real
   forward pass (hooks), and skipped when anything else also reads that tensor.

Two ways of applying the folds:

- *graph*: the BatchNorm nodes disappear and bias-free layers get a bias (ExportedProgram,
  TorchScript, pickled module and ONNX output);
- *structure*: the module keeps its class and every state_dict key, so the file still loads
  into the original architecture; folded BatchNorms are set to exact identities
  (mean 0, var 1 - eps, gamma 1, beta 0), or keep only the shift when the layer has no bias.

The input module is never modified: everything happens on a copy (for graph output one that shares
the input's parameters, which the pass replaces rather than writes into; see
``_copy_sharing_parameters``).
"""

from __future__ import annotations

import copy
import itertools
import operator
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from gradcheck_cli.errors import first_line
from gradcheck_cli.rewrite.fold_math import (
    ChannelAffine,
    LayerKind,
    affine_for_rank,
    bn_affine,
    fold_after,
    fold_before,
    identity_running_var,
)
from gradcheck_cli.rewrite.fold_records import FoldEntry, Pattern
from gradcheck_cli.torch_util import set_training, type_name

if TYPE_CHECKING:
    import torch
    from torch import fx, nn

METHOD_FX = "torch.fx"
METHOD_EXPORT = "torch.export"
METHOD_PROGRAM = "exported program graph"
METHOD_STRUCTURE = "module structure"


@dataclass
class TorchFoldResult:
    module: nn.Module
    entries: list[FoldEntry]
    method: str
    notes: list[str] = field(default_factory=list)
    batchnorms_before: int = 0
    batchnorms_after: int = 0
    # Graph operations (fx/export methods) or modules (module structure), before and after.
    nodes_before: int = 0
    nodes_after: int = 0


def fold_torch_module(
    module: nn.Module,
    *,
    example_args: tuple[torch.Tensor, ...],
    example_kwargs: dict[str, torch.Tensor] | None = None,
    keep_structure: bool = False,
    affine_standalone: bool = False,
) -> TorchFoldResult:
    """Fold every exactly foldable BatchNorm of ``module`` (a copy of it, in eval mode).

    ``keep_structure`` keeps the module's class and state_dict keys (for state_dict/safetensors
    output); otherwise the folded BatchNorms are removed from the graph.
    """

    import torch

    notes: list[str] = []
    # Graph output replaces every tensor it changes (never writes into one), so the copy may share
    # the parameters with ``module``; structure output writes in place and needs its own tensors.
    shared = not keep_structure and not isinstance(module, torch.jit.ScriptModule)
    source = set_eval(_copy_sharing_parameters(module) if shared else copy.deepcopy(module))
    graph_module, method = _trace(source, example_args, example_kwargs, notes)
    if method == METHOD_EXPORT:
        frozen = sum(1 for sub in source.modules() if isinstance(sub, _frozen_bn_classes()))
        if frozen:
            # torch.export inlines them into plain multiply-adds, which carry no statistics.
            notes.append(
                f"{frozen} frozen BatchNorm(s) became plain arithmetic in the torch.export graph and were not folded"
            )
    if graph_module is None:
        if shared:  # the structure fallback folds in place
            source = set_eval(copy.deepcopy(module))
        before_bn, before_nodes = count_batchnorms(source), count_nodes(source)
        entries = _fold_by_structure(source, example_args, example_kwargs or {}, notes)
        return TorchFoldResult(
            source,
            entries,
            METHOD_STRUCTURE,
            notes,
            before_bn,
            count_batchnorms(source),
            before_nodes,
            count_nodes(source),
        )
    before_bn, before_nodes = count_batchnorms(graph_module), count_nodes(graph_module)
    if not example_kwargs and (affine_standalone or _rank_matters(graph_module)):
        # One sample is enough for ranks; a whole forward pass of a big batch is not free.
        _propagate_shapes(graph_module, tuple(_first_sample(a) for a in example_args), notes)
    target: nn.Module = graph_module
    applier: _Applier
    if keep_structure:
        # Plan on the graph, apply by name on a module of the original class. The names of
        # get_attr/call_module targets are the original attribute paths for fx and export.
        applier = _StructureApplier(source)
        target = source
    else:
        applier = _GraphApplier(graph_module)
    entries = _fold_graph(graph_module, applier, affine_standalone=affine_standalone and not keep_structure)
    if affine_standalone and keep_structure:
        notes.append(
            "`affine_standalone` does not apply to state_dict/safetensors output: the "
            "architecture keeps its BatchNorm modules"
        )
    if not keep_structure:
        applier.finish()
    set_eval(target)
    if keep_structure:
        # Same graph as before; the folded BatchNorms are still called but are identities.
        after_nodes = before_nodes
        after_bn = before_bn - sum(1 for e in entries if e.folded and e.note is None)
    else:
        after_nodes, after_bn = count_nodes(graph_module), count_batchnorms(graph_module)
    return TorchFoldResult(target, entries, method, notes, before_bn, after_bn, before_nodes, after_nodes)


def _copy_sharing_parameters(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters are the original ``Parameter`` objects.

    Copying ResNet-50's 100 MB of weights only for the graph pass to replace the folded ones with
    new tensors is wasted time. Shared parameters are safe because nothing in the graph pass
    writes into a parameter: folds give layers new tensors (``_replace_tensor``), removed
    BatchNorms' tensors are dropped, and the copy's ties are the original's (one object each).
    Buffers are still copied: they are small, and a forward pass (shape propagation) of a graph
    exported in training mode would update running statistics in place.
    """
    memo: dict[int, Any] = {id(p): p for _, p in module.named_parameters(remove_duplicate=False)}
    return copy.deepcopy(module, memo)


def set_eval(module: nn.Module, mode: bool = False) -> nn.Module:
    """``module.train(mode)``, except where the mode is fixed (``ExportedProgram.module()``)."""
    set_training(module, mode)
    return module


# --------------------------------------------------------------------------------------------
# Tracing


def _trace(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    kwargs: dict[str, torch.Tensor] | None,
    notes: list[str],
) -> tuple[fx.GraphModule | None, str]:
    import torch
    from torch import fx

    if isinstance(module, torch.jit.ScriptModule):
        notes.append("TorchScript modules cannot be traced by torch.fx; folded on module structure")
        return None, METHOD_STRUCTURE
    if isinstance(module, fx.GraphModule) and _is_aten_graph(module):
        return module, METHOD_PROGRAM
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _symbolic_trace(module), METHOD_FX
    except Exception as exc:
        notes.append(f"torch.fx could not trace the model ({first_line(exc)}); used torch.export")
    try:
        return _export_graph(module, args, kwargs, notes), METHOD_EXPORT
    except Exception as exc:
        notes.append(f"torch.export could not trace the model either ({first_line(exc)}); folded on module structure")
    return None, METHOD_STRUCTURE


def _export_graph(
    module: nn.Module, args: tuple[torch.Tensor, ...], kwargs: dict[str, torch.Tensor] | None, notes: list[str]
) -> fx.GraphModule:
    """The module as a torch.export graph whose batch dimension stays dynamic (the folded graph is
    what gets written, and it must run at every batch size the original runs at); a model whose
    code fixes its batch is exported at the example's batch, with a note."""
    import torch
    from torch import fx

    from gradcheck_cli.model.dynamic import batch_dims, export_dynamic_shapes

    def export(dynamic: Any) -> fx.GraphModule:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exported = torch.export.export(module, args, kwargs or {}, dynamic_shapes=dynamic).module()
        assert isinstance(exported, fx.GraphModule)
        return exported

    try:
        return export(export_dynamic_shapes(module, args, kwargs, batch_dims(args, kwargs)))
    except Exception as exc:
        graph = export(None)
        batch = int(args[0].shape[0]) if args and args[0].dim() else 1
        notes.append(
            f"torch.export fixed the batch at {batch} ({first_line(exc)}): the folded graph runs at that batch only"
        )
        return graph


def _symbolic_trace(module: nn.Module) -> fx.GraphModule:
    """``fx.symbolic_trace``, keeping frozen BatchNorms as module calls.

    A frozen BatchNorm computes its affine map with plain tensor arithmetic (``x * scale + bias``
    after ``rsqrt``); traced through, it would be a handful of anonymous operations, but as one
    module call it is a BatchNorm with named buffers that ``_norm_of`` can fold.
    """
    from torch import fx

    frozen = _frozen_bn_classes()

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
            if isinstance(m, frozen) and _known_forward(m):
                return True
            return bool(super().is_leaf_module(m, module_qualified_name))

    tracer = Tracer()
    graph = tracer.trace(module)
    return fx.GraphModule(tracer.root, graph, type(module).__name__)


def _is_aten_graph(graph_module: fx.GraphModule) -> bool:
    import torch

    return any(isinstance(node.target, torch._ops.OpOverload) for node in graph_module.graph.nodes)


def _propagate_shapes(graph_module: fx.GraphModule, args: tuple[torch.Tensor, ...], notes: list[str]) -> None:
    """Record each node's output shape (node.meta['tensor_meta']): ranks decide BN1d folds."""
    import torch
    from torch.fx.passes.shape_prop import ShapeProp

    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ShapeProp(graph_module).propagate(*args)
    except Exception as exc:
        notes.append(
            f"shape propagation failed ({first_line(exc)}); BatchNorm1d folds that need the tensor rank are skipped"
        )


def _rank_matters(graph_module: fx.GraphModule) -> bool:
    """Ranks only decide folds between a BatchNorm and a Linear ((N, F) against (N, C, L))."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    def is_linear(node: Any) -> bool:
        if not isinstance(node, _fx_node()):
            return False
        if node.op == "call_module":
            return isinstance(_submodule(graph_module, str(node.target)), nn.Linear)
        return node.op == "call_function" and node.target in (F.linear, torch.ops.aten.linear.default)

    for node in graph_module.graph.nodes:
        if _norm_of(graph_module, node) is None:
            continue
        if (node.args and is_linear(node.args[0])) or any(is_linear(user) for user in node.users):
            return True
    return False


def _first_sample(value: torch.Tensor) -> torch.Tensor:
    return value[:1] if value.dim() > 0 and value.shape[0] > 1 else value


def _rank(node: fx.Node) -> int | None:
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    if shape is None:
        value = node.meta.get("val")
        shape = getattr(value, "shape", None)
    return len(shape) if shape is not None else None


# --------------------------------------------------------------------------------------------
# What the graph holds: linear layers and BatchNorms, whatever their spelling


class _NormTensors(Protocol):
    """Where a BatchNorm's tensors live (attribute paths from the root module)."""

    name: str
    mean_path: str | None
    var_path: str | None
    weight_path: str | None
    bias_path: str | None
    eps: float


class _LayerTensors(Protocol):
    name: str
    kind: LayerKind
    groups: int
    weight_path: str | None
    bias_path: str | None


@dataclass
class _StructureNorm:
    """A BatchNorm found without a graph (module-structure fallback)."""

    name: str
    mean_path: str | None
    var_path: str | None
    weight_path: str | None
    bias_path: str | None
    eps: float


@dataclass
class _StructureLayer:
    name: str
    kind: LayerKind
    groups: int
    weight_path: str | None
    bias_path: str | None


@dataclass
class _Layer:
    node: fx.Node
    name: str
    kind: LayerKind
    groups: int
    weight_path: str | None  # None: the weight is computed at run time
    bias_path: str | None
    input_padded_with_zeros: bool  # would a BN before it see zero padding?
    module_target: str | None = None  # call_module target, if any


@dataclass
class _Norm:
    node: fx.Node  # the node whose value is the normalised tensor
    calls: list[fx.Node]  # nodes to erase when the BN is folded (call, getitem)
    name: str
    input: fx.Node
    mean_path: str | None
    var_path: str | None
    weight_path: str | None
    bias_path: str | None
    eps: float
    training: bool
    module_target: str | None = None
    # Modules the BatchNorm's module applies after normalising (a frozen norm-act's drop and
    # act): they stay in the graph when the BatchNorm goes.
    tail: tuple[str, ...] = ()


_CONV_TYPES: dict[str, tuple[LayerKind, int]] = {
    "Conv1d": (LayerKind.CONV, 1),
    "Conv2d": (LayerKind.CONV, 2),
    "Conv3d": (LayerKind.CONV, 3),
    "ConvTranspose1d": (LayerKind.CONV_TRANSPOSE, 1),
    "ConvTranspose2d": (LayerKind.CONV_TRANSPOSE, 2),
    "ConvTranspose3d": (LayerKind.CONV_TRANSPOSE, 3),
    "Linear": (LayerKind.LINEAR, 0),
}


def _layer_module_classes() -> dict[type[nn.Module], LayerKind]:
    from torch import nn

    return {
        nn.Conv1d: LayerKind.CONV,
        nn.Conv2d: LayerKind.CONV,
        nn.Conv3d: LayerKind.CONV,
        nn.ConvTranspose1d: LayerKind.CONV_TRANSPOSE,
        nn.ConvTranspose2d: LayerKind.CONV_TRANSPOSE,
        nn.ConvTranspose3d: LayerKind.CONV_TRANSPOSE,
        nn.Linear: LayerKind.LINEAR,
    }


def _bn_module_classes() -> tuple[type[nn.Module], ...]:
    from torch import nn

    return (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


# BatchNorm subclasses whose forward is F.batch_norm followed by ``self.drop`` and ``self.act``
# (timm's fused norm-act layers): the BatchNorm part folds, the dropout and activation stay.
_NORM_ACT_CLASSES = (
    ("timm.layers.norm_act", "BatchNormAct2d"),
    ("timm.layers.norm_act", "BatchNormAct1d"),
    ("timm.layers.norm_act", "SyncBatchNormAct"),
)
# BatchNorms with frozen statistics in buffers (weight, bias, running_mean, running_var, eps),
# computed as ``x * scale + shift``; the Act variant then applies ``self.drop`` and ``self.act``.
_FROZEN_CLASSES = (
    ("torchvision.ops.misc", "FrozenBatchNorm2d"),
    ("timm.layers.norm_act", "FrozenBatchNorm2d"),
    ("timm.layers.norm_act", "FrozenBatchNormAct2d"),
)
# Names as TorchScript keeps them (``original_name``), where the class itself is gone.
_BATCHNORM_TYPE_NAMES = frozenset(
    {"BatchNorm1d", "BatchNorm2d", "BatchNorm3d"}
    | {name for _, name in _NORM_ACT_CLASSES}
    | {name for _, name in _FROZEN_CLASSES}
)


def _loaded_classes(names: tuple[tuple[str, str], ...]) -> dict[type[nn.Module], str]:
    """The classes among ``names`` whose library is already imported (a model using them has
    imported it; gradcheck never imports timm or torchvision just to look)."""
    import sys

    found: dict[type[nn.Module], str] = {}
    for module_name, class_name in names:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if isinstance(cls, type):
            found[cls] = f"{module_name}.{class_name}"
    return found


def _frozen_bn_classes() -> tuple[type[nn.Module], ...]:
    return tuple(_loaded_classes(_FROZEN_CLASSES))


def _known_forward(module: nn.Module) -> bool:
    """The module runs the forward of a known BatchNorm class (not an override of it)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    forward = type(module).forward
    if forward is _BatchNorm.forward:
        return True
    known = _loaded_classes(_NORM_ACT_CLASSES + _FROZEN_CLASSES)
    return any(forward is cls.forward for cls in known)


def _tail_modules(module: nn.Module) -> tuple[str, ...]:
    """Submodules a fused norm-act module applies after normalising (``drop`` then ``act``)."""
    if type(module).__name__.endswith(("Act2d", "Act1d", "Act")) and _known_forward(module):
        return tuple(name for name in ("drop", "act") if hasattr(module, name))
    return ()


def is_batchnorm_module(module: nn.Module) -> bool:
    """A BatchNorm in any of the spellings fold-bn knows (plain, fused norm-act, frozen)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    if isinstance(module, (_BatchNorm, *_frozen_bn_classes())):
        return True
    return type_name(module) in _BATCHNORM_TYPE_NAMES


def _layer_of(graph_module: fx.GraphModule, node: fx.Node) -> _Layer | str | None:
    """The node as a linear layer; a string says why it cannot take a fold; None: not a layer."""
    import torch
    import torch.nn.functional as F

    if node.op == "call_module":
        sub = _submodule(graph_module, str(node.target))
        for cls, module_kind in _layer_module_classes().items():
            if isinstance(sub, cls):
                if type(sub).forward is not cls.forward:
                    return f"{type(sub).__name__} overrides forward(); its weights may not act linearly"
                bias = getattr(sub, "bias", None)
                padding = getattr(sub, "padding", 0)
                zero_padded = _has_zero_padding(padding) and getattr(sub, "padding_mode", "zeros") == "zeros"
                return _Layer(
                    node,
                    str(node.target),
                    module_kind,
                    int(getattr(sub, "groups", 1)),
                    f"{node.target}.weight",
                    f"{node.target}.bias" if bias is not None else None,
                    zero_padded,
                    module_target=str(node.target),
                )
        return None
    if node.op != "call_function":
        return None
    aten = torch.ops.aten
    functional: dict[Any, LayerKind] = {
        F.conv1d: LayerKind.CONV,
        F.conv2d: LayerKind.CONV,
        F.conv3d: LayerKind.CONV,
        F.conv_transpose1d: LayerKind.CONV_TRANSPOSE,
        F.conv_transpose2d: LayerKind.CONV_TRANSPOSE,
        F.conv_transpose3d: LayerKind.CONV_TRANSPOSE,
        F.linear: LayerKind.LINEAR,
        aten.conv1d.default: LayerKind.CONV,
        aten.conv2d.default: LayerKind.CONV,
        aten.conv3d.default: LayerKind.CONV,
        aten.conv_transpose1d.default: LayerKind.CONV_TRANSPOSE,
        aten.conv_transpose2d.input: LayerKind.CONV_TRANSPOSE,
        aten.conv_transpose3d.input: LayerKind.CONV_TRANSPOSE,
        aten.linear.default: LayerKind.LINEAR,
        aten.convolution.default: LayerKind.CONV,
    }
    found_kind = functional.get(node.target)
    if found_kind is None:
        return None
    kind: LayerKind = found_kind
    arguments = _arguments(graph_module, node)
    if arguments is None:
        return "its arguments could not be read from the graph"
    if node.target is aten.convolution.default and arguments.get("transposed"):
        kind = LayerKind.CONV_TRANSPOSE
    weight = arguments.get("weight")
    bias = arguments.get("bias")
    padding = arguments.get("padding", 0)
    weight_path = _attr_path(weight)
    if weight_path is None:
        return "its weight is computed at run time, not a constant of the model"
    bias_path = _attr_path(bias)
    if bias is not None and bias_path is None:
        return "its bias is computed at run time, not a constant of the model"
    return _Layer(
        node,
        node.name,
        kind,
        int(arguments.get("groups", 1) or 1),
        weight_path,
        bias_path,
        _has_zero_padding(padding),
    )


def _norm_of(graph_module: fx.GraphModule, node: fx.Node) -> _Norm | str | None:
    import torch
    import torch.nn.functional as F

    if node.op == "call_module":
        sub = _submodule(graph_module, str(node.target))
        if isinstance(sub, _frozen_bn_classes()):
            return _frozen_norm(node, sub)
        if not isinstance(sub, _bn_module_classes()):
            return None
        if not _plain_bn(sub):
            return f"{type(sub).__name__} overrides forward(); it may not be a plain BatchNorm"
        bn: Any = sub
        if bn.running_mean is None or bn.running_var is None:
            return "no running statistics (track_running_stats=False): it normalises with batch statistics"
        target = str(node.target)
        return _Norm(
            node,
            [node],
            target,
            node.args[0] if isinstance(node.args[0], _fx_node()) else node,
            f"{target}.running_mean",
            f"{target}.running_var",
            f"{target}.weight" if bn.weight is not None else None,
            f"{target}.bias" if bn.bias is not None else None,
            float(bn.eps),
            False,
            target,
        )
    if node.op != "call_function":
        return None
    aten = torch.ops.aten
    if node.target not in (
        F.batch_norm,
        aten.batch_norm.default,
        aten._native_batch_norm_legit_no_training.default,
    ):
        return None
    arguments = _arguments(graph_module, node)
    if arguments is None:
        return "its arguments could not be read from the graph"
    value_node = node
    calls = [node]
    if node.target is aten._native_batch_norm_legit_no_training.default:
        users = list(node.users)
        if len(users) != 1 or users[0].target is not operator.getitem or users[0].args[1] != 0:
            return "its saved statistics are used by other nodes"
        value_node = users[0]
        calls = [users[0], node]
        training = False
    else:
        training = bool(arguments.get("training", False))
    mean, var = arguments.get("running_mean"), arguments.get("running_var")
    if mean is None or var is None:
        return "no running statistics: it normalises with batch statistics"
    paths = [_attr_path(arguments.get(key)) for key in ("running_mean", "running_var")]
    weight, bias = arguments.get("weight"), arguments.get("bias")
    weight_path, bias_path = _attr_path(weight), _attr_path(bias)
    if None in paths or (weight is not None and weight_path is None) or (bias is not None and bias_path is None):
        return "its statistics or affine parameters are computed at run time"
    source = arguments.get("input")
    if not isinstance(source, _fx_node()):
        return "its input is not a graph value"
    return _Norm(
        value_node,
        calls,
        _display_name(node, paths[0]),
        source,
        paths[0],
        paths[1],
        weight_path,
        bias_path,
        float(arguments.get("eps", 1e-5)),
        training,
    )


def _frozen_norm(node: fx.Node, module: nn.Module) -> _Norm | str:
    if not _known_forward(module):
        return f"{type(module).__name__} overrides forward(); it may not be a plain BatchNorm"
    target = str(node.target)
    source = node.args[0] if node.args else None
    if not isinstance(source, _fx_node()):
        return "its input is not a graph value"
    return _Norm(
        node,
        [node],
        target,
        source,
        f"{target}.running_mean",
        f"{target}.running_var",
        f"{target}.weight",
        f"{target}.bias",
        float(getattr(module, "eps", 1e-5)),
        False,
        target,
        tail=tuple(f"{target}.{name}" for name in _tail_modules(module)),
    )


def _plain_bn(module: nn.Module) -> bool:
    from torch.nn.modules.batchnorm import _BatchNorm

    return type(module).forward is _BatchNorm.forward


def _fx_node() -> type[fx.Node]:
    from torch import fx

    return fx.Node


def _display_name(node: fx.Node, stat_path: str | None) -> str:
    # 'layer1.0.bn1.running_mean' -> 'layer1.0.bn1': the name users know the BatchNorm by.
    if stat_path and "." in stat_path:
        return stat_path.rsplit(".", 1)[0]
    return node.name


def _arguments(graph_module: fx.GraphModule, node: fx.Node) -> dict[str, Any] | None:
    try:
        normalized = node.normalized_arguments(graph_module, normalize_to_only_use_kwargs=True)
    except Exception:
        normalized = None
    if normalized is None:
        return None
    return dict(normalized.kwargs)


def _attr_path(value: Any) -> str | None:
    if isinstance(value, _fx_node()) and value.op == "get_attr":
        return str(value.target)
    return None


def _has_zero_padding(padding: Any) -> bool:
    """True when a conv pads its input with zeros (any nonzero padding, or 'same')."""
    if isinstance(padding, str):
        return padding != "valid"
    if isinstance(padding, int):
        return padding != 0
    return any(int(p) != 0 for p in padding)


# --------------------------------------------------------------------------------------------
# The pass


def _fold_graph(graph_module: fx.GraphModule, applier: _Applier, *, affine_standalone: bool) -> list[FoldEntry]:
    entries: dict[str, FoldEntry] = {}
    norms: list[_Norm] = []
    for node in list(graph_module.graph.nodes):
        found = _norm_of(graph_module, node)
        if isinstance(found, str):
            entries[node.name] = FoldEntry(_node_label(node), folded=False, reason=found)
        elif found is not None:
            norms.append(found)
    module_calls = Counter(str(n.target) for n in graph_module.graph.nodes if n.op == "call_module")
    tensor_names = _tensor_alias_counts(graph_module)
    pending: list[_Norm] = []
    for norm in norms:
        reason = _norm_precondition(norm, module_calls)
        if reason is not None:
            entries[norm.name] = FoldEntry(norm.name, folded=False, reason=reason)
            continue
        outcome = _try_after(graph_module, applier, norm, module_calls, tensor_names)
        if isinstance(outcome, FoldEntry):
            entries[norm.name] = outcome
        else:
            pending.append(norm)
            entries[norm.name] = FoldEntry(norm.name, folded=False, reason=outcome)
    for norm in pending:
        outcome = _try_before(graph_module, applier, norm, module_calls, tensor_names)
        if isinstance(outcome, FoldEntry):
            entries[norm.name] = outcome
            continue
        reason_after = entries[norm.name].reason
        reason = f"{reason_after}; {outcome}" if outcome != reason_after else outcome
        if affine_standalone:
            affine_entry = applier.to_affine(norm, reason)
            if affine_entry is not None:
                entries[norm.name] = affine_entry
                continue
        entries[norm.name] = FoldEntry(norm.name, folded=False, reason=reason)
    return list(entries.values())


def _node_label(node: fx.Node) -> str:
    return str(node.target) if node.op == "call_module" else node.name


def _norm_precondition(norm: _Norm, module_calls: Counter[str]) -> str | None:
    if norm.training:
        return "it runs in training mode in the graph (batch statistics); folding is for eval mode"
    if norm.module_target is not None and module_calls[norm.module_target] > 1:
        return f"the BatchNorm module is called {module_calls[norm.module_target]} times in the graph"
    return None


def _tensor_alias_counts(graph_module: fx.GraphModule) -> Counter[int]:
    """How many names each parameter/buffer storage has (tied weights appear more than once)."""
    counts: Counter[int] = Counter()
    for _, parameter in graph_module.named_parameters(remove_duplicate=False):
        counts[id(parameter)] += 1
    for _, buffer in graph_module.named_buffers(remove_duplicate=False):
        counts[id(buffer)] += 1
    return counts


def _layer_precondition(
    graph_module: fx.GraphModule,
    layer: _Layer,
    module_calls: Counter[str],
    tensor_names: Counter[int],
) -> str | None:
    if layer.module_target is not None and module_calls[layer.module_target] > 1:
        return f"'{layer.name}' is called {module_calls[layer.module_target]} times (shared weights)"
    assert layer.weight_path is not None
    weight = _get_tensor(graph_module, layer.weight_path)
    if tensor_names[id(weight)] > 1:
        return f"the weight of '{layer.name}' is tied to another parameter"
    if layer.bias_path is not None and tensor_names[id(_get_tensor(graph_module, layer.bias_path))] > 1:
        return f"the bias of '{layer.name}' is tied to another parameter"
    if layer.module_target is None:
        readers = [n for n in graph_module.graph.nodes if n.op == "get_attr" and n.target == layer.weight_path]
        if sum(len(n.users) for n in readers) > 1:
            return f"the weight of '{layer.name}' is also read by other nodes"
    if not weight.dtype.is_floating_point:
        return f"'{layer.name}' has {weight.dtype} weights (quantised or integer)"
    return None


def _try_after(
    graph_module: fx.GraphModule,
    applier: _Applier,
    norm: _Norm,
    module_calls: Counter[str],
    tensor_names: Counter[int],
) -> FoldEntry | str:
    producer = norm.input
    layer = _layer_of(graph_module, producer)
    if layer is None:
        return f"its input comes from '{_node_label(producer)}', not a Conv/ConvTranspose/Linear"
    if isinstance(layer, str):
        return f"its producer '{_node_label(producer)}' cannot take it: {layer}"
    others = [user for user in _value_readers(producer) if user is not norm.calls[-1]]
    if others:
        return f"the output of '{layer.name}' also feeds {len(others)} other node(s)"
    reason = _layer_precondition(graph_module, layer, module_calls, tensor_names)
    if reason is not None:
        return reason
    if layer.kind is LayerKind.LINEAR:
        rank = _rank(norm.node)
        if rank is None:
            return "BatchNorm after a Linear: the tensor rank is unknown, so the channel axis cannot be checked"
        if rank != 2:
            return (
                f"BatchNorm1d on a rank-{rank} Linear output normalises dim 1, while the Linear's "
                "features are on the last dim: not a per-feature affine of the Linear"
            )
    pattern = {
        LayerKind.CONV: Pattern.CONV_BN,
        LayerKind.CONV_TRANSPOSE: Pattern.CONV_TRANSPOSE_BN,
        LayerKind.LINEAR: Pattern.LINEAR_BN,
    }[layer.kind]
    outcome = _apply_safely(applier.fold_after, norm, layer)
    if outcome.startswith("!"):
        return outcome[1:]
    return FoldEntry(norm.name, folded=True, pattern=pattern, layer=layer.name, note=outcome or None)


def _try_before(
    graph_module: fx.GraphModule,
    applier: _Applier,
    norm: _Norm,
    module_calls: Counter[str],
    tensor_names: Counter[int],
) -> FoldEntry | str:
    if norm.tail:
        return "its activation comes between it and the next layer, so it can only fold into the layer before it"
    users = _value_readers(norm.node)
    if len(users) != 1:
        return f"its output feeds {len(users)} nodes, so it cannot be folded into the next layer"
    consumer = users[0]
    layer = _layer_of(graph_module, consumer)
    if layer is None:
        return f"its output goes to '{_node_label(consumer)}', not a Conv/Linear"
    if isinstance(layer, str):
        return f"its consumer '{_node_label(consumer)}' cannot take it: {layer}"
    if consumer.args[0] is not norm.node and consumer.kwargs.get("input") is not norm.node:
        return f"it feeds '{layer.name}' as a weight, not as the input"
    if layer.kind is LayerKind.CONV_TRANSPOSE:
        return (
            f"a BatchNorm before the ConvTranspose '{layer.name}' cannot be folded exactly: the "
            "shift reaches each output through a position-dependent number of kernel taps"
        )
    if layer.kind is LayerKind.CONV and layer.input_padded_with_zeros:
        return (
            f"'{layer.name}' pads its input with zeros; folding the BatchNorm in would turn those "
            "zeros into the shifted values (docs/theory.md#batchnorm-before-the-layer)"
        )
    if layer.kind is LayerKind.LINEAR:
        rank = _rank(norm.node)
        if rank != 2:
            return (
                "BatchNorm before a Linear: exact only on (N, F) inputs, where the BatchNorm "
                f"channel is the Linear's input feature (rank here: {rank if rank else 'unknown'})"
            )
    reason = _layer_precondition(graph_module, layer, module_calls, tensor_names)
    if reason is not None:
        return reason
    outcome = _apply_safely(applier.fold_before, norm, layer)
    if outcome.startswith("!"):
        return outcome[1:]
    pattern = Pattern.BN_LINEAR if layer.kind is LayerKind.LINEAR else Pattern.BN_CONV
    return FoldEntry(norm.name, folded=True, pattern=pattern, layer=layer.name, note=outcome or None)


# Reads of a tensor's metadata, not of its values: a fold keeps shapes and dtypes, so these do
# not make a producer's output "also used elsewhere" (timm's BatchNormAct2d asserts x.ndim == 4
# on the producer's output before normalising it).
_METADATA_ATTRIBUTES = frozenset({"ndim", "shape", "dtype", "device", "is_cuda", "layout"})
_METADATA_METHODS = frozenset({"size", "dim", "numel", "get_device", "ndimension"})


def _value_readers(node: fx.Node) -> list[fx.Node]:
    """The users of ``node`` that read its values (metadata reads left out)."""

    def metadata_only(user: fx.Node) -> bool:
        if not user.args or user.args[0] is not node:
            return False
        if user.op == "call_function" and user.target is getattr:
            return len(user.args) > 1 and user.args[1] in _METADATA_ATTRIBUTES
        return user.op == "call_method" and user.target in _METADATA_METHODS

    return [user for user in node.users if not metadata_only(user)]


def _apply_safely(fold: Callable[[_Norm, _Layer], str], norm: _Norm, layer: _Layer) -> str:
    # fold_math raises ValueError when the channel counts do not match: a model we misread.
    try:
        return fold(norm, layer)
    except ValueError as exc:
        return f"!{exc}"


# --------------------------------------------------------------------------------------------
# Applying folds: to the graph, or to a module that keeps its class


def _submodule(root: nn.Module, path: str) -> nn.Module:
    """``root.get_submodule(path)``, also for TorchScript modules (which do not implement it)."""
    module = root
    for part in path.split(".") if path else ():
        module = getattr(module, part)
    return module


def _get_tensor(root: nn.Module, path: str) -> torch.Tensor:
    owner_path, _, name = path.rpartition(".")
    owner = _submodule(root, owner_path) if owner_path else root
    value = getattr(owner, name)
    return value  # type: ignore[no-any-return]


def _affine_of(root: nn.Module, norm: _NormTensors) -> ChannelAffine:
    assert norm.mean_path is not None and norm.var_path is not None
    return bn_affine(
        running_mean=_get_tensor(root, norm.mean_path),
        running_var=_get_tensor(root, norm.var_path),
        eps=norm.eps,
        weight=_get_tensor(root, norm.weight_path) if norm.weight_path else None,
        bias=_get_tensor(root, norm.bias_path) if norm.bias_path else None,
    )


class _Applier:
    """Applies one fold; returns a note ('' for none), or '!reason' when it cannot."""

    def fold_after(self, norm: _Norm, layer: _Layer) -> str:
        raise NotImplementedError

    def fold_before(self, norm: _Norm, layer: _Layer) -> str:
        raise NotImplementedError

    def to_affine(self, norm: _Norm, reason: str) -> FoldEntry | None:
        return None

    def finish(self) -> None:
        return None


class _GraphApplier(_Applier):
    """Rewrites the GraphModule: BatchNorm nodes go, bias-free layers get a bias."""

    def __init__(self, graph_module: fx.GraphModule) -> None:
        self.graph_module = graph_module
        self.dropped_paths: set[str] = set()
        self.affine_count = 0

    def fold_after(self, norm: _Norm, layer: _Layer) -> str:
        assert layer.weight_path is not None
        root = self.graph_module
        weight = _get_tensor(root, layer.weight_path)
        bias = _get_tensor(root, layer.bias_path) if layer.bias_path else None
        new_weight, new_bias = fold_after(weight, bias, _affine_of(root, norm), kind=layer.kind, groups=layer.groups)
        note = self._write_layer(layer, new_weight, new_bias)
        self._remove_norm(norm, replacement=layer.node)
        return note

    def fold_before(self, norm: _Norm, layer: _Layer) -> str:
        assert layer.weight_path is not None
        root = self.graph_module
        weight = _get_tensor(root, layer.weight_path)
        bias = _get_tensor(root, layer.bias_path) if layer.bias_path else None
        new_weight, new_bias = fold_before(weight, bias, _affine_of(root, norm), kind=layer.kind, groups=layer.groups)
        note = self._write_layer(layer, new_weight, new_bias)
        self._remove_norm(norm, replacement=norm.input)
        return note

    def to_affine(self, norm: _Norm, reason: str) -> FoldEntry | None:
        import torch

        rank = _rank(norm.input)
        if rank is None or rank < 2:
            return None
        root = self.graph_module
        assert norm.mean_path is not None
        dtype = _get_tensor(root, norm.mean_path).dtype
        value = norm.input.meta.get("tensor_meta")
        dtype = getattr(value, "dtype", dtype)
        scale, shift = affine_for_rank(_affine_of(root, norm), rank=rank, dtype=dtype)
        self.affine_count += 1
        stem = re.sub(r"\W", "_", norm.name)
        scale_name, shift_name = f"_bn_affine_{stem}_scale", f"_bn_affine_{stem}_shift"
        root.register_buffer(scale_name, scale.to(_get_tensor(root, norm.mean_path).device))
        root.register_buffer(shift_name, shift.to(_get_tensor(root, norm.mean_path).device))
        graph = root.graph
        with graph.inserting_before(norm.calls[-1]):
            scale_node = graph.get_attr(scale_name)
            shift_node = graph.get_attr(shift_name)
            product = graph.call_function(torch.mul, (norm.input, scale_node))
            result = graph.call_function(torch.add, (product, shift_node))
        self._remove_norm(norm, replacement=result)
        return FoldEntry(
            norm.name,
            folded=True,
            pattern=Pattern.AFFINE,
            layer=None,
            note=f"kept as a per-channel multiply-add ({reason})",
        )

    def _write_layer(self, layer: _Layer, weight: torch.Tensor, bias: torch.Tensor) -> str:
        from torch import nn

        root = self.graph_module
        assert layer.weight_path is not None
        _replace_tensor(root, layer.weight_path, weight)
        if layer.bias_path is not None:
            _replace_tensor(root, layer.bias_path, bias)
            return ""
        old_weight = _get_tensor(root, layer.weight_path)
        parameter = nn.Parameter(bias.to(old_weight.device), requires_grad=old_weight.requires_grad)
        if layer.module_target is not None:
            sub = _submodule(root, layer.module_target)
            sub.bias = parameter  # nn.Conv*/Linear read self.bias in forward
            layer.bias_path = f"{layer.module_target}.bias"
            return "the layer got a bias"
        owner_path, _, weight_name = layer.weight_path.rpartition(".")
        owner = _submodule(root, owner_path) if owner_path else root
        name = f"{weight_name}_folded_bias"
        while hasattr(owner, name):
            name += "_"
        owner.register_parameter(name, parameter)
        layer.bias_path = f"{owner_path}.{name}" if owner_path else name
        graph = root.graph
        with graph.inserting_before(layer.node):
            bias_node = graph.get_attr(layer.bias_path)
        args = list(layer.node.args)
        if len(args) > 2:
            args[2] = bias_node
            layer.node.args = tuple(args)
        else:
            kwargs = dict(layer.node.kwargs)
            if "bias" in kwargs or len(args) < 2:
                kwargs["bias"] = bias_node
                layer.node.kwargs = kwargs
            else:
                layer.node.args = (*args, bias_node)
        return "the layer got a bias"

    def _remove_norm(self, norm: _Norm, *, replacement: fx.Node) -> None:
        graph = self.graph_module.graph
        if norm.tail:
            value = replacement
            for tail_path in norm.tail:
                with graph.inserting_after(value):
                    value = graph.call_module(tail_path, (value,))
            replacement = value
        norm.node.replace_all_uses_with(replacement)
        readers = [arg for call in norm.calls for arg in call.all_input_nodes if arg.op == "get_attr"]
        for call in norm.calls:
            graph.erase_node(call)
        for reader in readers:
            if not reader.users and reader.graph is graph:
                self.dropped_paths.add(str(reader.target))
                graph.erase_node(reader)
        for path in (norm.mean_path, norm.var_path, norm.weight_path, norm.bias_path):
            if path is not None:
                self.dropped_paths.add(path)

    def finish(self) -> None:
        root = self.graph_module
        still_read = {str(n.target) for n in root.graph.nodes if n.op == "get_attr"}
        for path in sorted(self.dropped_paths - still_read):
            owner_path, _, name = path.rpartition(".")
            try:
                owner = _submodule(root, owner_path) if owner_path else root
            except AttributeError:
                continue
            if name in owner._parameters or name in owner._buffers:
                delattr(owner, name)
        root.graph.lint()
        root.delete_all_unused_submodules()
        _empty_norm_shells(root)
        root.recompile()


def _empty_norm_shells(root: fx.GraphModule) -> None:
    """Replace each folded norm-act module that stays only as the parent of its activation.

    The graph calls ``bn1.act`` by path, so ``bn1`` must remain; left a BatchNormAct2d without
    its tensors it would still look (and count) like a BatchNorm. A plain container holding the
    same children keeps the paths and shows what is left.
    """
    from torch import nn

    called = {str(n.target) for n in root.graph.nodes if n.op == "call_module"}
    read = {str(n.target) for n in root.graph.nodes if n.op == "get_attr"}
    for name, sub in list(root.named_modules()):
        if not name or name in called or not is_batchnorm_module(sub):
            continue
        own = [*sub._parameters, *sub._buffers]
        if any(f"{name}.{tensor}" in read for tensor in own):
            continue  # a BatchNorm that was not folded: the graph still reads its tensors
        container = nn.Module()
        for child_name, child in sub.named_children():
            container.add_module(child_name, child)
        owner_path, _, attribute = name.rpartition(".")
        owner = _submodule(root, owner_path) if owner_path else root
        setattr(owner, attribute, container)


class _StructureApplier(_Applier):
    """Writes folded values into a module that keeps its class and every state_dict key."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def fold_after(self, norm: _NormTensors, layer: _LayerTensors) -> str:
        assert layer.weight_path is not None
        root = self.module
        weight = _get_tensor(root, layer.weight_path)
        bias = _get_tensor(root, layer.bias_path) if layer.bias_path else None
        # A BatchNorm this applier already neutralised (an earlier fold-bn run) is left alone:
        # folding it again would be a no-op reported as a change.
        state = _neutral_state(root, norm)
        if state == "identity":
            return "!already folded: the BatchNorm is an exact identity"
        if state == "shift" and bias is None:
            return "!already folded: only its shift is left, and the layer has no bias to take it"
        affine = _affine_of(root, norm)
        new_weight, new_bias = fold_after(weight, bias, affine, kind=layer.kind, groups=layer.groups)
        if bias is None and norm.bias_path is None:
            return (
                "!the layer has no bias and the BatchNorm no beta, so the shift has nowhere to go "
                "in the unchanged architecture"
            )
        _copy_into(weight, new_weight)
        if bias is not None:
            _copy_into(bias, new_bias)
            _set_identity(root, norm, shift=None)
            return ""
        _set_identity(root, norm, shift=new_bias)
        return "the layer has no bias: the shift stays in the BatchNorm (mean 0, var 1-eps, gamma 1)"

    def fold_before(self, norm: _NormTensors, layer: _LayerTensors) -> str:
        assert layer.weight_path is not None
        root = self.module
        weight = _get_tensor(root, layer.weight_path)
        bias = _get_tensor(root, layer.bias_path) if layer.bias_path else None
        if bias is None:
            return "!the next layer has no bias to absorb the shift, and the architecture must not change"
        new_weight, new_bias = fold_before(weight, bias, _affine_of(root, norm), kind=layer.kind, groups=layer.groups)
        _copy_into(weight, new_weight)
        _copy_into(bias, new_bias)
        _set_identity(root, norm, shift=None)
        return ""


def _neutral_state(root: nn.Module, norm: _NormTensors) -> str | None:
    """'identity' (BN(z) == z), 'shift' (BN(z) == z + beta) or None, as _set_identity leaves them."""
    import torch

    if norm.mean_path is None or norm.var_path is None:
        return None
    mean, var = _get_tensor(root, norm.mean_path), _get_tensor(root, norm.var_path)
    with torch.no_grad():
        if not bool((mean == 0).all()) or not bool((var + norm.eps == 1).all()):
            return None
        if norm.weight_path and not bool((_get_tensor(root, norm.weight_path) == 1).all()):
            return None
        if norm.bias_path and not bool((_get_tensor(root, norm.bias_path) == 0).all()):
            return "shift"
    return "identity"


def _copy_into(target: torch.Tensor, value: torch.Tensor) -> None:
    import torch

    with torch.no_grad():
        target.copy_(value.to(device=target.device, dtype=target.dtype))


def _set_identity(root: nn.Module, norm: _NormTensors, *, shift: torch.Tensor | None) -> None:
    """Turn the BatchNorm into z -> z (or z -> z + shift) exactly, keeping its tensors' shapes."""
    import torch

    assert norm.mean_path is not None and norm.var_path is not None
    mean = _get_tensor(root, norm.mean_path)
    var = _get_tensor(root, norm.var_path)
    with torch.no_grad():
        mean.zero_()
        var.fill_(identity_running_var(norm.eps, var.dtype))
        if norm.weight_path:
            _get_tensor(root, norm.weight_path).fill_(1.0)
        if norm.bias_path:
            beta = _get_tensor(root, norm.bias_path)
            if shift is None:
                beta.zero_()
            else:
                beta.copy_(shift.to(dtype=beta.dtype, device=beta.device))


def _replace_tensor(root: nn.Module, path: str, value: torch.Tensor) -> None:
    """Give ``path`` a new tensor (never written in place: other modules may share the old one)."""
    from torch import nn

    owner_path, _, name = path.rpartition(".")
    owner = _submodule(root, owner_path) if owner_path else root
    old = getattr(owner, name)
    moved = value.to(device=old.device)
    if name in owner._parameters:
        owner._parameters[name] = nn.Parameter(moved, requires_grad=old.requires_grad)
    elif name in owner._buffers:
        owner._buffers[name] = moved
    else:
        setattr(owner, name, moved)


# --------------------------------------------------------------------------------------------
# Module-structure fallback


def _fold_by_structure(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    kwargs: dict[str, torch.Tensor],
    notes: list[str],
) -> list[FoldEntry]:
    """Pair BatchNorms with their producers without a graph, then fold in place (on the copy).

    For an nn.Module the pairing is observed: a forward pass records which module call produced
    each tensor and how many operations read it. TorchScript modules accept no hooks, so for them
    the pairing is read from the structure (consecutive children of a Sequential, and siblings
    named like conv1/bn1); verification then decides whether the result is kept.
    """
    import torch

    is_script = isinstance(module, torch.jit.ScriptModule)
    pairs = _pairs_by_name(module) if is_script else _pairs_by_dataflow(module, args, kwargs, notes)
    entries: list[FoldEntry] = []
    paired = {bn for _, bn, _ in pairs}
    for name, sub in module.named_modules():
        if is_batchnorm_module(sub) and name not in paired:
            entries.append(
                FoldEntry(
                    name,
                    folded=False,
                    reason="no Conv/ConvTranspose/Linear found directly before it with no other reader of its output",
                )
            )
    applier = _StructureApplier(module)
    for layer_name, bn_name, reason in pairs:
        if reason is not None:
            entries.append(FoldEntry(bn_name, folded=False, reason=reason))
            continue
        layer_module = _submodule(module, layer_name)
        bn_module: Any = _submodule(module, bn_name)
        kind, _ = _CONV_TYPES[type_name(layer_module)]
        if getattr(bn_module, "running_mean", None) is None:
            entries.append(FoldEntry(bn_name, folded=False, reason="no running statistics"))
            continue
        norm = _StructureNorm(
            name=bn_name,
            mean_path=f"{bn_name}.running_mean",
            var_path=f"{bn_name}.running_var",
            weight_path=f"{bn_name}.weight" if getattr(bn_module, "weight", None) is not None else None,
            bias_path=f"{bn_name}.bias" if getattr(bn_module, "bias", None) is not None else None,
            eps=float(bn_module.eps),
        )
        layer = _StructureLayer(
            name=layer_name,
            kind=kind,
            groups=int(getattr(layer_module, "groups", 1)),
            weight_path=f"{layer_name}.weight",
            bias_path=f"{layer_name}.bias" if getattr(layer_module, "bias", None) is not None else None,
        )
        outcome = applier.fold_after(norm, layer)
        if outcome.startswith("!"):
            entries.append(FoldEntry(bn_name, folded=False, reason=outcome[1:]))
            continue
        pattern = {
            LayerKind.CONV: Pattern.CONV_BN,
            LayerKind.CONV_TRANSPOSE: Pattern.CONV_TRANSPOSE_BN,
            LayerKind.LINEAR: Pattern.LINEAR_BN,
        }[kind]
        entries.append(FoldEntry(bn_name, folded=True, pattern=pattern, layer=layer_name, note=outcome or None))
    return entries


def _pairs_by_name(module: nn.Module) -> list[tuple[str, str, str | None]]:
    """(layer, batchnorm, None) for Sequential neighbours and conv{k}/bn{k}-style siblings."""
    pairs: list[tuple[str, str, str | None]] = []
    taken: set[str] = set()
    for parent_name, parent in module.named_modules():
        children = list(parent.named_children())
        prefix = f"{parent_name}." if parent_name else ""
        names = dict(children)
        candidates: list[tuple[str, str]] = []
        if type_name(parent) == "Sequential":
            candidates += [(a, b) for (a, _), (b, _) in itertools.pairwise(children)]
        for child_name in names:
            match = re.fullmatch(r"(conv|fc|linear|deconv)(_?\d*)", child_name)
            if match:
                for norm_word in ("bn", "norm", "batchnorm"):
                    candidates.append((child_name, f"{norm_word}{match.group(2)}"))
        for layer_name, bn_name in candidates:
            if layer_name not in names or bn_name not in names or prefix + bn_name in taken:
                continue
            layer_type, bn_type = type_name(names[layer_name]), type_name(names[bn_name])
            if layer_type in _CONV_TYPES and bn_type in _BATCHNORM_TYPE_NAMES:
                if layer_type == "Linear" and bn_type not in ("BatchNorm1d", "BatchNormAct1d"):
                    continue
                taken.add(prefix + bn_name)
                pairs.append((prefix + layer_name, prefix + bn_name, None))
    return pairs


def _pairs_by_dataflow(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    kwargs: dict[str, torch.Tensor],
    notes: list[str],
) -> list[tuple[str, str, str | None]]:
    """Observe one forward pass: which layer produced each BatchNorm's input, who else read it."""
    import torch
    from torch.overrides import TorchFunctionMode

    layer_classes = tuple(_layer_module_classes())
    produced_by: dict[int, str] = {}  # id(output tensor) -> layer name
    bn_inputs: list[tuple[str, int, int]] = []  # (bn name, id(input), rank)
    readers: Counter[int] = Counter()
    call_counts: Counter[str] = Counter()
    keep_alive: list[torch.Tensor] = []  # ids are only unique while the tensors live
    in_module_call: list[str] = []

    class CountReaders(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            result = func(*args, **(kwargs or {}))
            # Only operations that produce tensors count as readers; .shape, .dim() do not.
            if isinstance(result, torch.Tensor) or (
                isinstance(result, tuple) and any(isinstance(r, torch.Tensor) for r in result)
            ):
                for value in _flatten(args, kwargs or {}):
                    if isinstance(value, torch.Tensor):
                        readers[id(value)] += 1
            return result

    def pre_hook(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any) -> None:
            in_module_call.append(name)
            call_counts[name] += 1

        return hook

    def post_hook(name: str, is_layer: bool) -> Callable[..., None]:
        def hook(_module: nn.Module, inputs: Any, output: Any) -> None:
            in_module_call.pop()
            if is_layer and isinstance(output, torch.Tensor):
                produced_by[id(output)] = name
                keep_alive.append(output)
            elif not is_layer and inputs and isinstance(inputs[0], torch.Tensor):
                bn_inputs.append((name, id(inputs[0]), inputs[0].dim()))
                keep_alive.append(inputs[0])

        return hook

    handles = []
    try:
        for name, sub in module.named_modules():
            is_layer = any(isinstance(sub, cls) and type(sub).forward is cls.forward for cls in layer_classes)
            # A fused norm-act or frozen BatchNorm set to an identity is an identity followed
            # by its own drop/act: the same structure fold is exact for it.
            is_bn = is_batchnorm_module(sub) and _known_forward(sub)
            if is_layer or is_bn:
                handles.append(sub.register_forward_pre_hook(pre_hook(name)))
                handles.append(sub.register_forward_hook(post_hook(name, is_layer)))
        with torch.no_grad(), CountReaders():
            module(*args, **kwargs)
    except Exception as exc:
        notes.append(f"the forward pass used to pair BatchNorms failed ({first_line(exc)})")
        return []
    finally:
        for handle in handles:
            handle.remove()
    pairs: list[tuple[str, str, str | None]] = []
    for bn_name, tensor_id, rank in bn_inputs:
        layer_name = produced_by.get(tensor_id)
        if layer_name is None:
            continue
        layer_type = type_name(_submodule(module, layer_name))
        reason: str | None = None
        if readers[tensor_id] > 1:
            others = readers[tensor_id] - 1
            reason = f"the output of '{layer_name}' also feeds {others} other operation(s)"
        elif call_counts[layer_name] > 1 or call_counts[bn_name] > 1:
            reason = "the layer or the BatchNorm is called more than once per forward pass"
        elif layer_type == "Linear" and rank != 2:
            reason = f"BatchNorm1d on a rank-{rank} Linear output: not a per-feature affine of the Linear"
        pairs.append((layer_name, bn_name, reason))
    return pairs


def _flatten(args: Any, kwargs: dict[str, Any]) -> Iterator[Any]:
    stack: list[Any] = [*args, *kwargs.values()]
    while stack:
        value = stack.pop()
        if isinstance(value, (list, tuple)):
            stack.extend(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
        else:
            yield value


# --------------------------------------------------------------------------------------------
# Counting


def count_batchnorms(module: nn.Module) -> int:
    """BatchNorm modules that are still called, plus functional batch_norm nodes of a graph."""
    import torch
    import torch.nn.functional as F
    from torch import fx

    if isinstance(module, fx.GraphModule):
        aten = torch.ops.aten
        functional = (
            F.batch_norm,
            aten.batch_norm.default,
            aten._native_batch_norm_legit_no_training.default,
        )
        count = 0
        for node in module.graph.nodes:
            if (node.op == "call_function" and node.target in functional) or (
                node.op == "call_module" and is_batchnorm_module(_submodule(module, str(node.target)))
            ):
                count += 1
        return count
    return sum(1 for _, sub in module.named_modules() if is_batchnorm_module(sub) and not _is_identity_bn(sub))


def _is_identity_bn(module: nn.Module) -> bool:
    """A BatchNorm that structure folding turned into z -> z (still there, but doing nothing)."""
    import torch

    mean = getattr(module, "running_mean", None)
    var = getattr(module, "running_var", None)
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    if mean is None or var is None:
        return False
    eps = float(getattr(module, "eps", 1e-5))
    with torch.no_grad():
        one = bool(((var + eps) == 1).all())
        return (
            bool((mean == 0).all())
            and one
            and (weight is None or bool((weight == 1).all()))
            and (bias is None or bool((bias == 0).all()))
        )


def count_nodes(module: nn.Module) -> int:
    """Operations in the graph (fx), or modules when there is no graph."""
    from torch import fx

    if isinstance(module, fx.GraphModule):
        return sum(1 for node in module.graph.nodes if node.op in ("call_module", "call_function", "call_method"))
    return sum(1 for _ in module.modules())
