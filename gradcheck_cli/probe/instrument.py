"""Instrumentation: turn one forward pass into report rows, without keeping activations.

Two ways in, one set of rows out:

* :class:`EagerInstrument` for ordinary ``nn.Module`` models. Module hooks (closure factories,
  always removed in ``finally``) record layers with parameters and activation modules; a
  ``TorchFunctionMode`` records activation *functions* (``torch.relu(self.fc(x))``,
  ``F.gelu``, ``x.sigmoid()``) and attributes them to the module whose ``forward`` called them.
* :class:`GraphInstrument` for graphs (``torch.export`` programs, TorchScript converted to one),
  which interprets the FX graph node by node and reads the module of each node from the
  ``nn_module_stack`` metadata, or from the parameters it consumes when that is missing.

Row names: a module row is its module path (``features.0``); a function row is
``<caller path>.<fn>()`` (``relu()`` at the root); a repeated call of the same row within one
forward pass gets ``#k`` (``layer1.0.relu#1``), a character module paths cannot contain.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gradcheck_cli.probe.activations import (
    MODULE_ACTIVATIONS,
    activation_of_call,
    call_parameters,
    function_name,
    module_parameters,
)
from gradcheck_cli.probe.attention import AttentionRows, attention_rows
from gradcheck_cli.probe.layers import OP_TYPES, is_channel_first, is_norm, row_kind
from gradcheck_cli.probe.recorder import Recorder, Row
from gradcheck_cli.probe.recurrent import RECURRENT_TYPES, RecurrentUnroller
from gradcheck_cli.records import RowKind
from gradcheck_cli.torch_util import type_name

if TYPE_CHECKING:
    import torch
    from torch import fx, nn


def first_tensor(value: Any) -> torch.Tensor | None:
    """The tensor a row's statistics are taken from: the output, or its first tensor."""
    import torch

    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


def function_row_name(module_path: str, fn: str) -> str:
    return f"{module_path}.{fn}()" if module_path else f"{fn}()"


@dataclass
class _CallCounter:
    counts: dict[str, int] = field(default_factory=dict)

    def name(self, base: str) -> str:
        k = self.counts.get(base, 0)
        self.counts[base] = k + 1
        return base if k == 0 else f"{base}#{k}"


class EagerInstrument:
    """Hooks plus a function mode over an eager ``nn.Module``."""

    method = "hooks"

    def __init__(self, model: nn.Module, recorder: Recorder) -> None:
        self.model = model
        self.recorder = recorder
        self.stack: list[tuple[str, nn.Module]] = []
        self.calls = _CallCounter()
        self.channel_first = False
        self.row_params: dict[str, Sequence[torch.Tensor]] = {}
        self.recording = False
        self.unrollers: dict[str, RecurrentUnroller] = {}  # module path -> its unroller
        self.blocks: dict[str, bool] = {}  # module path -> is a repeated block (residual stream row)
        self.is_paused = False  # forwards run by autograd itself (checkpoint recomputation) make no rows

    def failing_layer(self) -> str | None:
        if not self.stack:
            return None
        path, module = self.stack[-1]
        return f"'{path or '<root>'}' ({type_name(module)})"

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        import torch

        handles: list[Any] = []
        try:
            modules = dict(self.model.named_modules())
            for path, module in modules.items():
                if isinstance(module, torch.jit.ScriptModule):
                    continue  # scripted submodules run as one opaque call; they take no hooks
                parent = modules.get(path.rpartition(".")[0]) if path else None
                self.blocks[path] = is_block(module, parent)
                handles.append(module.register_forward_pre_hook(self._push(path, module)))
                kind_name = type_name(module)
                if kind_name in RECURRENT_TYPES and isinstance(module, torch.nn.RNNBase):
                    # Before the statistics hook, so that it sees (and hooks) the unrolled output.
                    unroller = self.unrollers.setdefault(
                        path, RecurrentUnroller(module, kind_name, self.recorder.saturation_cutoff)
                    )
                    handles.append(module.register_forward_hook(unroller))
                handles.append(module.register_forward_hook(self._pop(path, module)))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def start_batch(self) -> None:
        self.stack.clear()
        self.calls = _CallCounter()
        self.channel_first = False

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self.is_paused = True
        try:
            yield
        finally:
            self.is_paused = False

    def _push(self, path: str, module: nn.Module) -> Any:
        def hook(_module: nn.Module, _args: Any) -> None:
            if not self.is_paused:
                self.stack.append((path, module))

        return hook

    def _pop(self, path: str, module: nn.Module) -> Any:
        kind_name = type_name(module)
        direct = [p for p in module._parameters.values() if p is not None]
        import torch

        fn = MODULE_ACTIVATIONS.get(kind_name)
        norm = is_norm(kind_name)

        def hook(_module: nn.Module, args: Any, output: Any) -> None:
            if self.is_paused:
                return
            if self.stack and self.stack[-1][1] is module:
                self.stack.pop()
            if not (direct or fn is not None or norm or self.blocks.get(path)):
                if is_channel_first(kind_name):
                    self.channel_first = True
                return
            tensor = first_tensor(output)
            if tensor is None:
                return
            name = self.calls.name(path or "<root>")
            row = self.recorder.row(
                name,
                type=kind_name,
                kind=row_kind(kind_name),
                module=path,
                fn=fn,
                fn_params=module_parameters(fn, module) if fn else {},
                channel_first=self.channel_first,
            )
            if fn is None:
                self.channel_first = is_channel_first(kind_name)
            if direct:
                self.row_params.setdefault(name, direct)
            with self._recording():
                self.recorder.record_output(row, tensor)
                if norm and args and isinstance(args[0], torch.Tensor):
                    self.recorder.record_input(row, args[0])

        return hook

    def on_function(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None, result: Any) -> None:
        if self.recording:
            return
        fn = activation_of_call(func, args, kwargs)
        if fn is None:
            rows = attention_rows(func, args, kwargs or {}, result, inside_attention(self.stack))
            if rows is not None:
                self._record_attention(func, rows, result)
            return
        path, module = self.stack[-1] if self.stack else ("", self.model)
        if type_name(module) in MODULE_ACTIVATIONS:
            return  # the activation module's own hook records this call
        if type_name(module) in RECURRENT_TYPES:
            return  # the gate functions of our own unroll: reported as gate statistics instead
        tensor = first_tensor(result)
        if tensor is None:
            return
        name = self.calls.name(function_row_name(path, fn))
        row = self.recorder.row(
            name,
            type=function_name(func) or fn,
            kind=RowKind.ACTIVATION,
            module=path,
            fn=fn,
            fn_params=call_parameters(fn, func, args, kwargs),
            channel_first=self.channel_first,
        )
        with self._recording():
            self.recorder.record_output(row, tensor)

    def _record_attention(self, func: Any, rows: AttentionRows, result: Any) -> None:
        path = self.stack[-1][0] if self.stack else ""
        tensor = first_tensor(result)
        if tensor is None:
            return
        name = self.calls.name(function_row_name(path, "attention"))
        row = self.recorder.row(
            name, type=function_name(func) or "attention", kind=RowKind.ACTIVATION, module=path, fn="attention"
        )
        with self._recording():
            self.recorder.record_output(row, tensor)
            self.recorder.record_attention(row, rows)

    @contextlib.contextmanager
    def _recording(self) -> Iterator[None]:
        """The statistics' own tensor operations are not the model's: keep them out of the
        function mode, which would otherwise see (and pay Python dispatch for) every one."""
        import torch

        self.recording = True
        try:
            with torch._C.DisableTorchFunction():
                yield
        finally:
            self.recording = False

    def forward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # The function mode spans the forward only: loss, backward and gradient hooks run
        # without it, so they pay no Python dispatch per tensor operation.
        with _ActivationMode(self):
            return self.model(*args, **kwargs)


def is_block(module: nn.Module, parent: nn.Module | None) -> bool:
    """A repeated transformer block (BertLayer, GPT2Block, ViTLayer, T5Block, ...), stacked in an
    nn.ModuleList as transformers does: its output is the residual stream, whose variance growth
    with depth matters. (Blocks in an nn.Sequential, like torchvision's ResNet stages, are left
    out: their inner layers already give the picture, and ONNX exports have no such rows.)"""
    from torch import nn

    if parent is None or not isinstance(parent, nn.ModuleList):
        return False
    if next(iter(module._parameters.values()), None) is not None:
        return False  # already a row of its own
    return type_name(module).endswith(("Layer", "Block"))


def inside_attention(stack: Sequence[tuple[str, Any]]) -> bool:
    """Whether the innermost modules of the call stack are an attention module (by path or type)."""
    return any("att" in path.rsplit(".", 1)[-1].lower() or "att" in type_name(m).lower() for path, m in stack[-3:])


def _activation_mode_class() -> type:
    from torch.overrides import TorchFunctionMode

    class ActivationMode(TorchFunctionMode):
        def __init__(self, instrument: EagerInstrument) -> None:
            super().__init__()
            self.instrument = instrument

        def __torch_function__(
            self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
        ) -> Any:
            result = func(*args, **(kwargs or {}))
            self.instrument.on_function(func, args, kwargs, result)
            return result

    return ActivationMode


def _ActivationMode(instrument: EagerInstrument) -> Any:
    return _activation_mode_class()(instrument)


# --------------------------------------------------------------------------------------------
# Graph path


@dataclass(frozen=True)
class _PlannedRow:
    name: str
    type: str
    kind: RowKind
    module: str
    fn: str | None
    fn_params: dict[str, float]
    channel_first: bool
    params: tuple[str, ...]


_WRAPPER_MARKERS = ("<locals>", "Wrapper")


def _innermost_module(node: fx.Node) -> tuple[str, str] | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    type_str = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    if any(marker in type_str for marker in _WRAPPER_MARKERS):
        return None
    return str(path), type_str.rsplit(".", 1)[-1]


def _clean_path(path: str) -> str:
    # torch.export writes paths of nested modules as 'L__self___layer1_0' in older versions and
    # 'layer1.0' in newer ones; only the latter is a module path a user recognises.
    return "" if path in ("", "L__self__") else path


def plan_graph(gm: fx.GraphModule) -> dict[fx.Node, _PlannedRow]:
    """Decide, once per graph, which nodes produce a row and what each row is called."""
    import torch

    parameters = dict(gm.named_parameters())
    known_types: dict[str, str] = getattr(gm, "gradcheck_module_types", {})
    owners: dict[fx.Node, tuple[str, str]] = {}
    consumed: dict[str, list[str]] = {}
    order: list[fx.Node] = [n for n in gm.graph.nodes if n.op == "call_function"]
    for node in order:
        used = [str(a.target) for a in node.all_input_nodes if a.op == "get_attr" and str(a.target) in parameters]
        located = _innermost_module(node)
        if located is not None and _clean_path(located[0]):
            owners[node] = (_clean_path(located[0]), located[1])
        elif used:
            op = function_name(node.target) or "op"
            path = used[0].rsplit(".", 1)[0] if "." in used[0] else ""
            owners[node] = (path, known_types.get(path) or OP_TYPES.get(op, op))
        if used and node in owners:
            consumed.setdefault(owners[node][0], []).extend(used)
    last_of: dict[str, fx.Node] = {}
    for node in order:
        if node in owners:
            last_of[owners[node][0]] = node
    plan: dict[fx.Node, _PlannedRow] = {}
    calls = _CallCounter()
    channel_first = False
    for node in order:
        owner = owners.get(node)
        args = tuple(node.args)
        fn = activation_of_call(node.target, args, dict(node.kwargs))
        value = node.meta.get("val")
        if fn is not None:
            if owner is not None and owner[1] in MODULE_ACTIVATIONS:
                name, type_str, module = calls.name(owner[0]), owner[1], owner[0]
            else:
                module = owner[0] if owner is not None else ""
                name, type_str = calls.name(function_row_name(module, fn)), fn
            plan[node] = _PlannedRow(
                name,
                type_str,
                RowKind.ACTIVATION,
                module,
                fn,
                call_parameters(fn, node.target, args, dict(node.kwargs)),
                channel_first,
                (),
            )
            continue
        if owner is None or last_of.get(owner[0]) is not node:
            continue
        path, type_str = owner
        own = tuple(dict.fromkeys(p for p in consumed.get(path, []) if p.rsplit(".", 1)[0] == path))
        if not own and not is_norm(type_str):
            continue
        if isinstance(value, torch.Tensor) or value is None or isinstance(value, (tuple, list)):
            plan[node] = _PlannedRow(calls.name(path), type_str, row_kind(type_str), path, None, {}, channel_first, own)
            channel_first = is_channel_first(type_str)
    return plan


class GraphInstrument:
    """Interprets an FX graph node by node and records the planned rows."""

    method = "graph"

    def __init__(self, gm: fx.GraphModule, recorder: Recorder) -> None:
        self.gm = gm
        self.recorder = recorder
        self.plan = plan_graph(gm)
        self.current: fx.Node | None = None
        parameters = dict(gm.named_parameters())
        self.row_params: dict[str, Sequence[torch.Tensor]] = {
            row.name: [parameters[p] for p in row.params] for row in self.plan.values() if row.params
        }

    def failing_layer(self) -> str | None:
        node = self.current
        if node is None:
            return None
        row = self.plan.get(node)
        where = f" in '{row.module or '<root>'}'" if row else ""
        return f"node '{node.name}' ({node.target}){where}"

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        yield

    def start_batch(self) -> None:
        self.current = None

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        yield  # an interpreted graph runs no forward during backward

    def forward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        import torch.fx

        instrument = self

        class Runner(torch.fx.Interpreter):
            def run_node(self, n: fx.Node) -> Any:
                instrument.current = n
                result = super().run_node(n)
                planned = instrument.plan.get(n)
                if planned is not None:
                    instrument._record(planned, result)
                return result

        runner = Runner(self.gm)
        if _has_pytree_codegen(self.gm):
            flat = runner.run(*_flatten_inputs(self.gm, args, kwargs), enable_io_processing=False)
            return self.gm.graph._codegen.process_outputs(flat)
        return runner.run(*args)

    def _record(self, planned: _PlannedRow, result: Any) -> None:
        tensor = first_tensor(result)
        if tensor is None:
            return
        row: Row = self.recorder.row(
            planned.name,
            type=planned.type,
            kind=planned.kind,
            module=planned.module,
            fn=planned.fn,
            fn_params=planned.fn_params,
            channel_first=planned.channel_first,
        )
        self.recorder.record_output(row, tensor)


def _has_pytree_codegen(gm: fx.GraphModule) -> bool:
    return getattr(gm.graph._codegen, "pytree_info", None) is not None


def _flatten_inputs(gm: fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    from torch.fx._pytree import tree_flatten_spec

    in_spec = gm.graph._codegen.pytree_info.in_spec  # type: ignore[attr-defined]
    return list(tree_flatten_spec((args, kwargs), in_spec))
