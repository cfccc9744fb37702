"""Run an ONNX graph with torch, under autograd: the source of the ONNX probe's gradients.

The graph is interpreted eagerly, node by node in the order the file lists them (ONNX requires
that order to be topological), each node through its registry function (:mod:`.ops`).
Trainable initializers become leaf tensors with ``requires_grad``, so ``loss.backward()``
leaves their gradients in ``.grad``; a ``watch`` callback sees chosen intermediate values as
they are produced, which is where the probe hooks per-node output gradients. Values are
dropped after their last use, so the forward keeps no more than autograd itself needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gradcheck_cli.errors import first_line
from gradcheck_cli.onnx.ops import OpCall, OpError, lookup

if TYPE_CHECKING:
    import onnx
    import torch

Watch = Callable[[str, "torch.Tensor"], None]

_DEFAULT_DOMAINS = ("", "ai.onnx")


class LoweringError(Exception):
    """A node the lowering could not run; ``op_type`` names the operator."""

    def __init__(self, op_type: str, node: str, message: str) -> None:
        super().__init__(f"{op_type} node '{node}': {message}")
        self.op_type = op_type
        self.node = node


def node_label(node: onnx.NodeProto) -> str:
    """How a node is named in reports: its name, else its first output."""
    return node.name or (node.output[0] if node.output else node.op_type)


def decode_attributes(node: onnx.NodeProto) -> dict[str, Any]:
    """Attributes as Python values: strings decoded, tensors as torch tensors, graphs kept."""
    import onnx
    import torch
    from onnx import numpy_helper

    out: dict[str, Any] = {}
    for attribute in node.attribute:
        value = onnx.helper.get_attribute_value(attribute)
        if attribute.type == onnx.AttributeProto.STRING:
            value = value.decode("utf-8")
        elif attribute.type == onnx.AttributeProto.STRINGS:
            value = [v.decode("utf-8") for v in value]
        elif attribute.type == onnx.AttributeProto.TENSOR:
            value = torch.from_numpy(numpy_helper.to_array(value).copy())
        elif attribute.type in (onnx.AttributeProto.INTS, onnx.AttributeProto.FLOATS):
            value = list(value)
        out[attribute.name] = value
    return out


def iter_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node, subgraphs (If/Loop bodies) included."""
    import onnx

    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from iter_nodes(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for sub in attribute.graphs:
                    yield from iter_nodes(sub)


def unsupported_ops(model: onnx.ModelProto, opset: int) -> list[str]:
    """Operators of the model (subgraphs included) the registry has no function for."""
    missing: dict[str, None] = {}
    for node in iter_nodes(model.graph):
        if node.domain not in _DEFAULT_DOMAINS:
            missing.setdefault(f"{node.domain}::{node.op_type}", None)
        elif lookup(node.op_type, opset) is None:
            missing.setdefault(node.op_type, None)
    return list(missing)


def outer_names(node: onnx.NodeProto) -> set[str]:
    """Outer-scope names a node's subgraphs read (they count as uses of the node)."""
    import onnx

    names: set[str] = set()
    for attribute in node.attribute:
        graphs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)
        for graph in graphs:
            for sub in iter_nodes(graph):
                names.update(n for n in sub.input if n)
    return names


@dataclass
class _Step:
    node: onnx.NodeProto
    attrs: dict[str, Any]
    release: list[str] = field(default_factory=list)  # values whose last use is this node
    skip: bool = False  # a Constant node whose value is already a leaf


class LoweredGraph:
    """An ONNX graph as a torch callable over its initializers."""

    def __init__(
        self,
        model: onnx.ModelProto,
        *,
        opset: int,
        trainable: set[str],
        device: torch.device,
        leaves: dict[str, str] | None = None,
        uses: dict[tuple[int, int], str] | None = None,
    ) -> None:
        """``trainable`` names the leaves that get gradients. ``leaves`` adds leaves that copy an
        initializer under another key, and ``uses`` routes a (node, input slot) of the main
        graph to such a key, so one shared initializer can be several independent parameters."""
        import numpy as np
        import torch
        from onnx import numpy_helper

        from gradcheck_cli.onnx.params import constant_array

        self.opset = opset
        self.graph = model.graph
        self.device = device
        self.parameters: dict[str, torch.Tensor] = {}
        self.constants: dict[str, torch.Tensor] = {}
        self.uses = uses or {}
        values: dict[str, torch.Tensor] = {}
        for init in model.graph.initializer:
            values[init.name] = torch.from_numpy(numpy_helper.to_array(init).copy()).to(device)
        aliases = {name: name for name in values}
        aliases.update(leaves or {})
        # Parameters an exporter stored as Constant nodes (Paddle2ONNX) become leaves too, and
        # their Constant nodes are skipped so that the graph reads the leaf.
        constant_nodes = {
            node.output[0]: node for node in model.graph.node if node.op_type == "Constant" and node.output
        }
        for source in set(aliases.values()) - set(values):
            array = constant_array(constant_nodes[source]) if source in constant_nodes else None
            if array is None:
                raise ValueError(f"parameter source '{source}' is neither an initializer nor a Constant node")
            values[source] = torch.from_numpy(np.array(array)).to(device)
        for key, source in aliases.items():
            tensor = values[source] if key == source else values[source].detach().clone()
            if key in trainable and tensor.dtype.is_floating_point:
                self.parameters[key] = tensor.requires_grad_(True)
            else:
                self.constants[key] = tensor
        keep = {o.name for o in model.graph.output}
        last_use: dict[str, int] = {}
        for position, node in enumerate(model.graph.node):
            for name in [*node.input, *outer_names(node)]:
                if name:
                    last_use[name] = position
        self.steps = [_Step(node, decode_attributes(node)) for node in model.graph.node]
        for step in self.steps:
            step.skip = (
                step.node.op_type == "Constant"
                and bool(step.node.output)
                and (step.node.output[0] in self.parameters or step.node.output[0] in self.constants)
            )
        for name, position in last_use.items():
            if name not in keep and name not in self.parameters and name not in self.constants:
                self.steps[position].release.append(name)

    def run(self, feeds: dict[str, torch.Tensor], *, watch: Watch | None = None) -> dict[str, torch.Tensor]:
        """Forward pass; returns the graph outputs by name."""
        env: dict[str, torch.Tensor] = {**self.constants, **self.parameters}
        env.update({name: value.to(self.device) for name, value in feeds.items()})
        for position, step in enumerate(self.steps):
            if not step.skip:
                self._run_node(step.node, step.attrs, env, watch, position)
            for name in step.release:
                env.pop(name, None)
        return {o.name: env[o.name] for o in self.graph.output}

    def _run_node(
        self,
        node: onnx.NodeProto,
        attrs: dict[str, Any],
        env: dict[str, torch.Tensor],
        watch: Watch | None,
        position: int | None = None,
    ) -> None:
        label = node_label(node)
        if node.domain not in _DEFAULT_DOMAINS:
            raise LoweringError(f"{node.domain}::{node.op_type}", label, "operator domain not supported")
        entry = lookup(node.op_type, self.opset)
        if entry is None:
            raise LoweringError(node.op_type, label, f"not supported at opset {self.opset}")
        try:
            inputs = (
                [env[self.uses.get((position, slot), name)] if name else None for slot, name in enumerate(node.input)]
                if position is not None
                else [env[name] if name else None for name in node.input]
            )
        except KeyError as exc:
            raise LoweringError(node.op_type, label, f"input {exc} is not available") from exc

        def run_subgraph(graph: onnx.GraphProto, bound: list[torch.Tensor | None]) -> list[torch.Tensor]:
            return self._run_subgraph(graph, bound, env, watch)

        call = OpCall(
            op_type=node.op_type,
            inputs=inputs,
            attrs=attrs,
            opset=self.opset,
            num_outputs=len(node.output),
            run_subgraph=run_subgraph,
        )
        try:
            outputs = entry.impl(call)
        except LoweringError:
            raise
        except (OpError, RuntimeError, ValueError, IndexError, TypeError) as exc:
            text = first_line(exc, 200)
            raise LoweringError(node.op_type, label, text) from exc
        for name, value in zip(node.output, outputs, strict=False):
            if name and value is not None:
                env[name] = value
                if watch is not None:
                    watch(name, value)

    def _run_subgraph(
        self,
        graph: onnx.GraphProto,
        bound: list[torch.Tensor | None],
        outer: dict[str, torch.Tensor],
        watch: Watch | None,
    ) -> list[torch.Tensor]:
        import torch
        from onnx import numpy_helper

        # Subgraphs see the outer scope; their own names shadow it.
        env = dict(outer)
        for init in graph.initializer:
            env[init.name] = torch.from_numpy(numpy_helper.to_array(init).copy()).to(self.device)
        for value_info, tensor in zip(graph.input, bound, strict=False):
            if tensor is not None:
                env[value_info.name] = tensor
        # Attributes are decoded on every call: protobuf wrappers have no stable identity to
        # cache them by, and subgraphs are small.
        for node in graph.node:
            self._run_node(node, decode_attributes(node), env, watch)
        return [env[o.name] for o in graph.output]
