"""Fold BatchNormalization nodes of an ONNX graph (the same verbs as :mod:`torch_fold`).

Patterns (main graph; BatchNorms inside If/Loop/Scan bodies are reported, not folded):

- after Conv, ConvTranspose (``group`` read from the node), Gemm (any transA/transB, alpha,
  beta), MatMul with a constant rank-2 weight on a rank-2 input, with or without a following Add
  of a per-feature constant (Conv/ConvTranspose + Add of a per-channel constant too: how
  Paddle2ONNX writes conv biases);
- before Conv without zero padding, Gemm with transA=0, MatMul with a constant weight;
- optionally, a BatchNorm left alone becomes Mul + Add (``affine_standalone``).

Invariants kept: graph inputs/outputs (names and order), opset, metadata, value_info of every
name that still exists. A folded producer takes over the BatchNorm's output name, so every
downstream name, graph outputs included, is unchanged. New weights are new initializers, never
edits of existing ones, so an initializer shared with another node is never changed under it.
Weights may be initializers or Constant nodes, seen through the plumbing of the parameter map
(:mod:`gradcheck_cli.onnx.params`). The maths is :mod:`fold_math`'s, on numpy arrays, exactly as
the PyTorch path does it; this module never imports torch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gradcheck_cli.errors import first_line
from gradcheck_cli.onnx.params import PLUMBING, plumb
from gradcheck_cli.rewrite.fold_math import (
    ChannelAffine,
    LayerKind,
    affine_for_rank,
    bn_affine,
    fold_after,
    fold_before,
)
from gradcheck_cli.rewrite.fold_records import FoldEntry, Pattern

if TYPE_CHECKING:
    import numpy as np
    import onnx

METHOD_ONNX = "onnx graph"
_DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass
class OnnxFoldResult:
    model: onnx.ModelProto
    entries: list[FoldEntry]
    notes: list[str] = field(default_factory=list)
    batchnorms_after: int = 0


def fold_onnx_model(model: onnx.ModelProto, *, affine_standalone: bool = False) -> OnnxFoldResult:
    """Fold every exactly foldable BatchNormalization of a copy of ``model`` (left unchanged)."""
    import onnx

    work = onnx.ModelProto()
    work.CopyFrom(model)
    folder = _GraphFolder(work)
    entries = folder.run(affine_standalone=affine_standalone)
    folder.finish()
    notes = list(folder.notes)
    return OnnxFoldResult(work, entries, notes, count_batchnorms(work))


def count_batchnorms(model: onnx.ModelProto) -> int:
    return sum(1 for node in model.graph.node if _is_bn(node))


def count_nodes(model: onnx.ModelProto) -> int:
    return len(model.graph.node)


def count_parameters(model: onnx.ModelProto) -> int:
    """Elements of every initializer (external ones included, from their dims), and of every
    parameter an exporter kept in a Constant node (the parameter map's)."""
    from gradcheck_cli.onnx.params import parameter_map

    total = 0
    for tensor in model.graph.initializer:
        size = 1
        for dim in tensor.dims:
            size *= int(dim)
        total += size
    pmap = parameter_map(model.graph)
    total += sum(pmap.sources[name].numel for name in pmap.parameters if pmap.sources[name].node is not None)
    return total


def _is_bn(node: onnx.NodeProto) -> bool:
    return node.op_type == "BatchNormalization" and node.domain in _DEFAULT_DOMAINS


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    import onnx

    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _set_attr(node: onnx.NodeProto, name: str, value: Any) -> None:
    import onnx

    for index, attribute in enumerate(node.attribute):
        if attribute.name == name:
            del node.attribute[index]
            break
    node.attribute.append(onnx.helper.make_attribute(name, value))


@dataclass
class _Bn:
    node: onnx.NodeProto
    name: str
    affine: ChannelAffine
    channels: int


class _GraphFolder:
    def __init__(self, model: onnx.ModelProto) -> None:

        self.model = model
        self.graph = model.graph
        self.notes: list[str] = []
        self.nodes: list[onnx.NodeProto] = list(self.graph.node)
        self.removed: set[int] = set()  # id() of removed nodes
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.constants = {
            node.output[0]: node
            for node in self.nodes
            if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS and node.output
        }
        self.graph_outputs = {o.name for o in self.graph.output}
        self.orphan_candidates: set[str] = set()
        self.dropped_names: set[str] = set()
        self.names = self._all_names()
        self._rank_cache: dict[str, int] | None = None
        self.bn_counter = 0

    # -- bookkeeping ---------------------------------------------------------------------------

    def _all_names(self) -> set[str]:
        names = set(self.initializers)
        names.update(i.name for i in self.graph.input)
        for node in self.nodes:
            names.update(node.input)
            names.update(node.output)
            names.add(node.name)
        return names

    @property
    def ranks(self) -> dict[str, int]:
        """Tensor ranks from ONNX shape inference, run on first use only: just the MatMul and
        standalone-affine folds need them, and inference serialises the whole model (weights too)."""
        if self._rank_cache is None:
            self._rank_cache = self._ranks()
        return self._rank_cache

    def _ranks(self) -> dict[str, int]:
        import onnx

        ranks: dict[str, int] = {}
        try:
            inferred = onnx.shape_inference.infer_shapes(self.model)
        except Exception as exc:
            self.notes.append(
                f"ONNX shape inference failed ({first_line(exc)}); rank-dependent "
                "folds (MatMul, BatchNorm1d) are skipped"
            )
            inferred = self.model
        for value in [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]:
            tensor_type = value.type.tensor_type
            if tensor_type.HasField("shape"):
                ranks[value.name] = len(tensor_type.shape.dim)
        for tensor in self.graph.initializer:
            ranks[tensor.name] = len(tensor.dims)
        return ranks

    def _fresh(self, base: str) -> str:
        name = base
        counter = 1
        while name in self.names:
            name = f"{base}_{counter}"
            counter += 1
        self.names.add(name)
        return name

    def _live_nodes(self) -> list[onnx.NodeProto]:
        return [n for n in self.nodes if id(n) not in self.removed]

    def _consumers(self, name: str) -> list[onnx.NodeProto]:
        found = []
        for node in self._live_nodes():
            if name in node.input:
                found.append(node)
        return found

    def _read_by_subgraph(self, name: str) -> bool:
        # If/Loop/Scan bodies may read outer-scope names: such a reader is a consumer too.
        return any(name in names for names in self._subgraph_readers())

    def _subgraph_readers(self) -> list[set[str]]:
        import onnx

        readers: list[set[str]] = []

        def names_in(graph: onnx.GraphProto) -> set[str]:
            used: set[str] = set()
            for node in graph.node:
                used.update(node.input)
                for attribute in node.attribute:
                    if attribute.type == onnx.AttributeProto.GRAPH:
                        used |= names_in(attribute.g)
                    elif attribute.type == onnx.AttributeProto.GRAPHS:
                        for sub in attribute.graphs:
                            used |= names_in(sub)
            return used

        for node in self._live_nodes():
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    readers.append(names_in(attribute.g))
                elif attribute.type == onnx.AttributeProto.GRAPHS:
                    for sub in attribute.graphs:
                        readers.append(names_in(sub))
        return readers

    def _producer(self, name: str) -> onnx.NodeProto | None:
        for node in self._live_nodes():
            if name in node.output:
                return node
        return None

    def _const(self, name: str) -> np.ndarray[Any, Any] | None:
        from onnx import numpy_helper

        if not name:
            return None
        tensor = self.initializers.get(name)
        if tensor is not None:
            return numpy_helper.to_array(tensor).copy()
        constant = self.constants.get(name)
        if constant is not None and id(constant) not in self.removed:
            value = _attr(constant, "value", None)
            if value is not None:
                return numpy_helper.to_array(value).copy()
        # The TorchScript exporter deduplicates equal initializers (e.g. every untouched
        # running_var of ones) and re-exposes them through Identity nodes, and other exporters put
        # Cast/Transpose/Reshape/Unsqueeze/Squeeze in front of stored weights (the plumbing of the
        # parameter map): see through those, evaluating them on the stored values.
        producer = self._producer(name)
        if (
            producer is None
            or producer.domain not in _DEFAULT_DOMAINS
            or producer.op_type not in PLUMBING
            or producer.op_type == "CastLike"
            or not producer.input
        ):
            return None
        if self._is_graph_input(producer.input[0]):
            return None
        data = self._const(producer.input[0])
        extra = [self._const(n) if n else None for n in producer.input[1:]]
        if data is None or any(n and e is None for n, e in zip(producer.input[1:], extra, strict=True)):
            return None
        try:
            return plumb(producer, data, extra).copy()
        except ValueError:
            return None

    def _is_graph_input(self, name: str) -> bool:
        # A graph input with an initializer of the same name is overridable at run time (IR < 4
        # style): its value is not a constant we may fold.
        return any(i.name == name for i in self.graph.input)

    def _add_initializer(self, base: str, value: np.ndarray[Any, Any]) -> str:
        from onnx import numpy_helper

        name = self._fresh(base)
        tensor = numpy_helper.from_array(value, name)
        self.graph.initializer.append(tensor)
        self.initializers[name] = self.graph.initializer[-1]
        return name

    def _replace_conv_parameters(
        self, conv: onnx.NodeProto, new_w: np.ndarray[Any, Any], new_b: np.ndarray[Any, Any]
    ) -> bool:
        """Point a Conv/ConvTranspose at fresh weight and bias initializers (adding the bias input when it
        had none) and retire the old ones; initializers shared with other nodes are never mutated.
        Returns whether the layer already had a bias."""
        old_w, old_b = conv.input[1], conv.input[2] if len(conv.input) > 2 else ""
        conv.input[1] = self._add_initializer(f"{old_w}_bnfold", new_w)
        bias_name = self._add_initializer(f"{old_b or conv.output[0]}_bnfold_bias", new_b)
        if len(conv.input) > 2:
            conv.input[2] = bias_name
        else:
            conv.input.append(bias_name)
        self._retire(old_w, old_b)
        return bool(old_b)

    def _retire(self, *names: str) -> None:
        """Names whose initializer/Constant may now be unused; removed at the end if they are."""
        self.orphan_candidates.update(n for n in names if n)

    # -- the pass ------------------------------------------------------------------------------

    def run(self, *, affine_standalone: bool) -> list[FoldEntry]:
        entries: list[FoldEntry] = []
        for node in list(self.nodes):
            if not _is_bn(node) or id(node) in self.removed:
                continue
            self.bn_counter += 1
            label = node.name or node.output[0]
            bn = self._bn(node, label)
            if isinstance(bn, str):
                entries.append(FoldEntry(label, folded=False, reason=bn))
                continue
            outcome = self._fold_after(bn)
            if isinstance(outcome, FoldEntry):
                entries.append(outcome)
                continue
            before = self._fold_before(bn)
            if isinstance(before, FoldEntry):
                entries.append(before)
                continue
            reason = f"{outcome}; {before}"
            if affine_standalone:
                affine = self._to_affine(bn, reason)
                if affine is not None:
                    entries.append(affine)
                    continue
            entries.append(FoldEntry(label, folded=False, reason=reason))
        nested = self._nested_batchnorms()
        if nested:
            self.notes.append(
                f"{nested} BatchNormalization node(s) inside If/Loop/Scan bodies were "
                "left alone (only the main graph is folded)"
            )
        return entries

    def _nested_batchnorms(self) -> int:
        import onnx

        def count(graph: onnx.GraphProto) -> int:
            total = 0
            for node in graph.node:
                for attribute in node.attribute:
                    if attribute.type == onnx.AttributeProto.GRAPH:
                        total += sum(1 for n in attribute.g.node if _is_bn(n)) + count(attribute.g)
                    elif attribute.type == onnx.AttributeProto.GRAPHS:
                        for sub in attribute.graphs:
                            total += sum(1 for n in sub.node if _is_bn(n)) + count(sub)
            return total

        return count(self.graph)

    def _bn(self, node: onnx.NodeProto, label: str) -> _Bn | str:
        if int(_attr(node, "training_mode", 0)) != 0:
            return "training_mode=1: it normalises with batch statistics"
        if int(_attr(node, "spatial", 1)) == 0:
            return "spatial=0: statistics per element, not per channel"
        used_extra = [
            o
            for o in node.output[1:]
            if o and (self._consumers(o) or o in self.graph_outputs or self._read_by_subgraph(o))
        ]
        if used_extra:
            return "its running-statistics outputs are used"
        params = []
        for name in node.input[1:5]:
            value = self._const(name)
            if value is None or self._is_graph_input(name):
                return f"its parameter '{name}' is not a constant of the graph"
            params.append(value)
        scale, bias, mean, var = params
        affine = bn_affine(
            running_mean=mean,
            running_var=var,
            eps=float(_attr(node, "epsilon", 1e-5)),
            weight=scale,
            bias=bias,
        )
        return _Bn(node, label, affine, int(mean.size))

    def _single_consumer(self, name: str, consumer: onnx.NodeProto) -> bool:
        consumers = self._consumers(name)
        return (
            len(consumers) == 1
            and consumers[0] is consumer
            and name not in self.graph_outputs
            and not self._read_by_subgraph(name)
        )

    def _weight(self, node: onnx.NodeProto, index: int) -> np.ndarray[Any, Any] | str:
        if len(node.input) <= index or not node.input[index]:
            return "missing"
        name = node.input[index]
        value = self._const(name)
        if value is None or self._is_graph_input(name):
            return f"the weight '{name}' of '{node.name or node.op_type}' is not a constant"
        if value.dtype.kind != "f":
            return f"'{node.name or node.op_type}' has {value.dtype} weights (quantised or integer)"
        return value

    def _fold_after(self, bn: _Bn) -> FoldEntry | str:
        x = bn.node.input[0]
        producer = self._producer(x)
        if producer is None:
            return "its input is a graph input or initializer, not a layer output"
        label = producer.name or producer.op_type
        if producer.domain not in _DEFAULT_DOMAINS or producer.op_type not in (
            "Conv",
            "ConvTranspose",
            "Gemm",
            "MatMul",
            "Add",
        ):
            return f"its input comes from {producer.op_type} '{label}', not a Conv/ConvTranspose/Gemm/MatMul"
        if not self._single_consumer(x, bn.node):
            return f"the output of {producer.op_type} '{label}' also feeds other nodes or is a graph output"
        try:
            if producer.op_type in ("Conv", "ConvTranspose"):
                return self._after_conv(bn, producer)
            if producer.op_type == "Gemm":
                return self._after_gemm(bn, producer)
            if producer.op_type == "MatMul":
                return self._after_matmul(bn, producer, add=None)
            return self._after_add(bn, producer)
        except ValueError as exc:  # channel counts that do not match: a graph we misread
            return str(exc)

    def _take_output(self, producer: onnx.NodeProto, bn: _Bn) -> None:
        """The producer now writes the BatchNorm's output name; the BatchNorm goes."""
        old = producer.output[0]
        producer.output[0] = bn.node.output[0]
        self.dropped_names.add(old)
        self._remove_bn(bn)

    def _remove_bn(self, bn: _Bn) -> None:
        self.removed.add(id(bn.node))
        self._retire(*bn.node.input[1:5])

    def _after_conv(self, bn: _Bn, conv: onnx.NodeProto) -> FoldEntry | str:
        weight = self._weight(conv, 1)
        if isinstance(weight, str):
            return weight
        bias = self._const(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
        if len(conv.input) > 2 and conv.input[2] and (bias is None or self._is_graph_input(conv.input[2])):
            return f"the bias of '{conv.name or conv.op_type}' is not a constant"
        kind = LayerKind.CONV if conv.op_type == "Conv" else LayerKind.CONV_TRANSPOSE
        new_w, new_b = fold_after(
            weight,
            bias,
            bn.affine,
            kind=kind,
            groups=int(_attr(conv, "group", 1)),
        )
        had_bias = self._replace_conv_parameters(conv, new_w, new_b)
        self._take_output(conv, bn)
        pattern = Pattern.CONV_BN if kind is LayerKind.CONV else Pattern.CONV_TRANSPOSE_BN
        return FoldEntry(
            bn.name,
            folded=True,
            pattern=pattern,
            layer=conv.name or conv.output[0],
            note=None if had_bias else "the layer got a bias",
        )

    def _after_conv_bias(self, bn: _Bn, conv: onnx.NodeProto, add: onnx.NodeProto) -> FoldEntry | str:
        """Conv -> Add(b) -> BatchNorm, with ``b`` a per-channel constant (Paddle2ONNX writes conv
        biases so): ``b`` joins the conv's bias, then the BatchNorm folds as after a plain Conv."""
        import numpy as np

        label = conv.name or conv.op_type
        if not self._single_consumer(conv.output[0], add):
            return f"the output of {conv.op_type} '{label}' also feeds other nodes"
        other = next(name for name in add.input if name != conv.output[0])
        value = self._const(other)
        if value is None or self._is_graph_input(other):
            return f"Add '{add.name}' adds a run-time value, not a constant bias"
        weight = self._weight(conv, 1)
        if isinstance(weight, str):
            return weight
        padded = (1,) * (weight.ndim - value.ndim) + tuple(value.shape)
        if (
            value.ndim > weight.ndim
            or padded[1] != bn.channels
            or any(d != 1 for axis, d in enumerate(padded) if axis != 1)
        ):
            return f"Add '{add.name}' does not add a per-channel bias to {conv.op_type} '{label}'"
        bias = self._const(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
        if len(conv.input) > 2 and conv.input[2] and (bias is None or self._is_graph_input(conv.input[2])):
            return f"the bias of '{label}' is not a constant"
        total = value.reshape(-1).astype(np.float64) + (0.0 if bias is None else bias.astype(np.float64))
        kind = LayerKind.CONV if conv.op_type == "Conv" else LayerKind.CONV_TRANSPOSE
        new_w, new_b = fold_after(
            weight, total.astype(weight.dtype), bn.affine, kind=kind, groups=int(_attr(conv, "group", 1))
        )
        self._replace_conv_parameters(conv, new_w, new_b)
        self.removed.add(id(add))
        self.dropped_names.add(add.output[0])
        self._retire(other)
        self._take_output(conv, bn)
        pattern = Pattern.CONV_BN if kind is LayerKind.CONV else Pattern.CONV_TRANSPOSE_BN
        return FoldEntry(
            bn.name,
            folded=True,
            pattern=pattern,
            layer=conv.name or conv.output[0],
            note=f"with the bias Add '{add.name or add.output[0]}' that followed it",
        )

    def _gemm_bias(self, gemm: onnx.NodeProto, out_features: int) -> tuple[Any, str] | str:
        """beta·C as a per-output-feature vector (None: no C); str: why C cannot be folded into."""
        import numpy as np

        if len(gemm.input) < 3 or not gemm.input[2]:
            return None, ""
        c_value = self._const(gemm.input[2])
        if c_value is None or self._is_graph_input(gemm.input[2]):
            return f"the C input of Gemm '{gemm.name}' is not a constant"
        if c_value.size not in (1, out_features) or (c_value.ndim == 2 and c_value.shape[0] != 1):
            return f"the C input of Gemm '{gemm.name}' varies along the batch axis"
        beta = float(_attr(gemm, "beta", 1.0))
        vector = np.broadcast_to(c_value.reshape(-1), (out_features,)).astype(np.float64) * beta
        return vector, gemm.input[2]

    def _gemm_weight(self, gemm: onnx.NodeProto) -> tuple[Any, bool] | str:
        """B as an (out, in) Linear weight, and whether B was stored transposed (transB=1)."""
        weight = self._weight(gemm, 1)
        if isinstance(weight, str):
            return weight
        trans_b = bool(_attr(gemm, "transB", 0))
        return (weight if trans_b else weight.T), trans_b

    def _set_gemm(self, gemm: onnx.NodeProto, linear_weight: Any, trans_b: bool, bias: Any, old_c: str) -> None:
        import numpy as np

        old_b = gemm.input[1]
        # alpha multiplies A·B; keep it, and fold only into B (exact up to the usual rounding).
        stored = linear_weight if trans_b else np.ascontiguousarray(linear_weight.T)
        gemm.input[1] = self._add_initializer(f"{old_b}_bnfold", stored)
        c_name = self._add_initializer(f"{old_c or gemm.output[0]}_bnfold_c", bias)
        if len(gemm.input) > 2:
            gemm.input[2] = c_name
        else:
            gemm.input.append(c_name)
        _set_attr(gemm, "beta", 1.0)
        self._retire(old_b, old_c)

    def _after_gemm(self, bn: _Bn, gemm: onnx.NodeProto) -> FoldEntry | str:
        found = self._gemm_weight(gemm)
        if isinstance(found, str):
            return found
        linear_weight, trans_b = found
        c = self._gemm_bias(gemm, linear_weight.shape[0])
        if isinstance(c, str):
            return c
        c_vector, old_c = c
        # Y = alpha·A·W^T + c  ->  scale·Y + shift = alpha·A·(scale·W)^T + (scale·c + shift)
        new_w, new_b = fold_after(
            linear_weight,
            c_vector,
            bn.affine,
            kind=LayerKind.LINEAR,
        )
        dtype = linear_weight.dtype
        self._set_gemm(gemm, new_w, trans_b, new_b.astype(dtype), old_c)
        self._take_output(gemm, bn)
        return FoldEntry(
            bn.name,
            folded=True,
            pattern=Pattern.LINEAR_BN,
            layer=gemm.name or gemm.output[0],
            note=None if old_c else "the Gemm got a C input",
        )

    def _matmul_weight(self, matmul: onnx.NodeProto, data_index: int) -> Any | str:
        weight_index = 1 - data_index
        weight = self._weight(matmul, weight_index)
        if isinstance(weight, str):
            return weight
        if weight_index != 1 or weight.ndim != 2:
            return f"MatMul '{matmul.name}' does not multiply by a constant rank-2 weight on the right"
        rank = self.ranks.get(matmul.input[data_index])
        if rank != 2:
            return (
                f"MatMul '{matmul.name}' input has rank {rank or 'unknown'}; the BatchNorm "
                "channel is its feature axis only for rank 2"
            )
        return weight

    def _after_matmul(self, bn: _Bn, matmul: onnx.NodeProto, add: onnx.NodeProto | None) -> FoldEntry | str:
        weight = self._matmul_weight(matmul, 0)
        if isinstance(weight, str):
            return weight
        bias_value = None
        old_bias = ""
        if add is not None:
            old_bias = next(name for name in add.input if name != matmul.output[0])
            bias_value = self._const(old_bias)
            assert bias_value is not None
            bias_value = bias_value.reshape(-1)
        new_w, new_b = fold_after(
            weight.T,
            bias_value,
            bn.affine,
            kind=LayerKind.LINEAR,
        )
        old_w = matmul.input[1]
        matmul.input[1] = self._add_initializer(f"{old_w}_bnfold", new_w.T.copy())
        self._retire(old_w)
        if add is not None:
            position = list(add.input).index(old_bias)
            add.input[position] = self._add_initializer(f"{old_bias}_bnfold", new_b)
            self._retire(old_bias)
            self._take_output(add, bn)
            note = None
        else:
            self._append_bias_add(matmul, new_b, output=bn.node.output[0])
            self._remove_bn(bn)
            note = "an Add of the folded bias follows the MatMul"
        return FoldEntry(
            bn.name,
            folded=True,
            pattern=Pattern.MATMUL_BN,
            layer=matmul.name or matmul.output[0],
            note=note,
        )

    def _append_bias_add(self, producer: onnx.NodeProto, bias: Any, *, output: str) -> None:
        """producer -> Add(bias) -> ``output``, right after the producer (topological order)."""
        import onnx

        old_output = producer.output[0]
        if old_output == output:
            producer.output[0] = self._fresh(f"{old_output}_unbiased")
            hidden = producer.output[0]
        else:
            hidden = old_output
        bias_name = self._add_initializer(f"{producer.name or 'matmul'}_bnfold_bias", bias)
        add = onnx.helper.make_node(
            "Add",
            [hidden, bias_name],
            [output],
            name=self._fresh(f"{producer.name or 'matmul'}_bnfold_add"),
        )
        self.nodes.insert(self.nodes.index(producer) + 1, add)

    def _after_add(self, bn: _Bn, add: onnx.NodeProto) -> FoldEntry | str:
        producers = [self._producer(name) for name in add.input]
        convs = [
            p
            for p in producers
            if p is not None and p.op_type in ("Conv", "ConvTranspose") and p.domain in _DEFAULT_DOMAINS
        ]
        if len(convs) == 1 and len(add.input) == 2:
            return self._after_conv_bias(bn, convs[0], add)
        matmuls = [p for p in producers if p is not None and p.op_type == "MatMul"]
        if len(matmuls) != 1 or len(add.input) != 2:
            return f"its input comes from Add '{add.name}', which does not follow a MatMul"
        matmul = matmuls[0]
        if not self._single_consumer(matmul.output[0], add):
            return f"the output of MatMul '{matmul.name}' also feeds other nodes"
        other = next(name for name in add.input if name != matmul.output[0])
        value = self._const(other)
        if value is None or self._is_graph_input(other):
            return f"Add '{add.name}' adds a run-time value, not a constant bias"
        if value.size != bn.channels or (value.ndim == 2 and value.shape[0] != 1) or value.ndim > 2:
            return f"Add '{add.name}' does not add a per-feature bias"
        return self._after_matmul(bn, matmul, add)

    def _fold_before(self, bn: _Bn) -> str | FoldEntry:
        y = bn.node.output[0]
        consumers = self._consumers(y)
        if len(consumers) != 1 or y in self.graph_outputs or self._read_by_subgraph(y):
            also = " and is a graph output" if y in self.graph_outputs else ""
            return f"its output feeds {len(consumers)} nodes{also}"
        consumer = consumers[0]
        label = consumer.name or consumer.op_type
        if consumer.domain not in _DEFAULT_DOMAINS or consumer.op_type not in (
            "Conv",
            "Gemm",
            "MatMul",
        ):
            return f"its output goes to {consumer.op_type} '{label}', not a Conv/Gemm/MatMul"
        if consumer.input[0] != y:
            return f"it feeds {consumer.op_type} '{label}' as a weight, not as the data input"
        try:
            if consumer.op_type == "Conv":
                return self._before_conv(bn, consumer)
            if consumer.op_type == "Gemm":
                return self._before_gemm(bn, consumer)
            return self._before_matmul(bn, consumer)
        except ValueError as exc:
            return str(exc)

    def _bypass(self, bn: _Bn, consumer: onnx.NodeProto) -> None:
        consumer.input[0] = bn.node.input[0]
        self.dropped_names.add(bn.node.output[0])
        self._remove_bn(bn)

    def _before_conv(self, bn: _Bn, conv: onnx.NodeProto) -> FoldEntry | str:
        label = conv.name or conv.op_type
        pads = list(_attr(conv, "pads", []))
        auto_pad = _attr(conv, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
        if any(int(p) != 0 for p in pads) or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            return (
                f"Conv '{label}' pads its input with zeros; folding the BatchNorm in would turn "
                "those zeros into the shifted values"
            )
        weight = self._weight(conv, 1)
        if isinstance(weight, str):
            return weight
        bias = self._const(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
        new_w, new_b = fold_before(
            weight,
            bias,
            bn.affine,
            kind=LayerKind.CONV,
            groups=int(_attr(conv, "group", 1)),
        )
        had_bias = self._replace_conv_parameters(conv, new_w, new_b)
        self._bypass(bn, conv)
        return FoldEntry(
            bn.name,
            folded=True,
            pattern=Pattern.BN_CONV,
            layer=conv.name or conv.output[0],
            note=None if had_bias else "the layer got a bias",
        )

    def _before_gemm(self, bn: _Bn, gemm: onnx.NodeProto) -> FoldEntry | str:
        import numpy as np

        if int(_attr(gemm, "transA", 0)):
            return f"Gemm '{gemm.name}' has transA=1: the BatchNorm channel is its batch axis, not the contraction axis"
        found = self._gemm_weight(gemm)
        if isinstance(found, str):
            return found
        linear_weight, trans_b = found
        c = self._gemm_bias(gemm, linear_weight.shape[0])
        if isinstance(c, str):
            return c
        c_vector, old_c = c
        alpha = float(_attr(gemm, "alpha", 1.0))
        new_w, shift_through = fold_before(linear_weight, None, bn.affine, kind=LayerKind.LINEAR)
        # Y = alpha·(s·A + t)·W^T + c = alpha·A·(W·s)^T + (alpha·W·t + c)
        bias = alpha * np.asarray(shift_through, dtype=np.float64)
        if c_vector is not None:
            bias = bias + c_vector
        self._set_gemm(gemm, new_w, trans_b, bias.astype(linear_weight.dtype), old_c)
        self._bypass(bn, gemm)
        return FoldEntry(bn.name, folded=True, pattern=Pattern.BN_LINEAR, layer=gemm.name or gemm.output[0])

    def _before_matmul(self, bn: _Bn, matmul: onnx.NodeProto) -> FoldEntry | str:
        weight = self._matmul_weight(matmul, 0)
        if isinstance(weight, str):
            return weight
        new_w, new_b = fold_before(weight.T, None, bn.affine, kind=LayerKind.LINEAR)
        old_w = matmul.input[1]
        matmul.input[1] = self._add_initializer(f"{old_w}_bnfold", new_w.T.copy())
        self._retire(old_w)
        self._bypass(bn, matmul)
        self._append_bias_add(matmul, new_b, output=matmul.output[0])
        return FoldEntry(
            bn.name,
            folded=True,
            pattern=Pattern.BN_LINEAR,
            layer=matmul.name or matmul.output[0],
            note="an Add of the folded bias follows the MatMul",
        )

    def _to_affine(self, bn: _Bn, reason: str) -> FoldEntry | None:
        import onnx

        rank = self.ranks.get(bn.node.input[0])
        if rank is None or rank < 2:
            return None
        scale_value = self._const(bn.node.input[1])
        assert scale_value is not None
        scale, shift = affine_for_rank(bn.affine, rank=rank - 1, dtype=scale_value.dtype, channel_axis=0)
        base = bn.node.name or bn.node.output[0]
        scale_name = self._add_initializer(f"{base}_affine_scale", scale)
        shift_name = self._add_initializer(f"{base}_affine_shift", shift)
        product = self._fresh(f"{base}_scaled")
        mul = onnx.helper.make_node(
            "Mul", [bn.node.input[0], scale_name], [product], name=self._fresh(f"{base}_affine_mul")
        )
        add = onnx.helper.make_node(
            "Add",
            [product, shift_name],
            [bn.node.output[0]],
            name=self._fresh(f"{base}_affine_add"),
        )
        position = self.nodes.index(bn.node)
        self.nodes[position + 1 : position + 1] = [mul, add]
        self._remove_bn(bn)
        return FoldEntry(
            bn.name,
            folded=True,
            pattern=Pattern.AFFINE,
            note=f"kept as a per-channel Mul + Add ({reason})",
        )

    # -- finishing -----------------------------------------------------------------------------

    def finish(self) -> None:
        live = self._live_nodes()
        # Constant and plumbing (Identity, Reshape, ...) nodes that only fed what we folded go,
        # then (transitively) what they read, then the initializers we orphaned. Nothing else
        # is touched.
        while True:
            used = self._used_names(live)
            dead = [
                n
                for n in live
                if (n.op_type == "Constant" or n.op_type in PLUMBING)
                and n.domain in _DEFAULT_DOMAINS
                and n.output
                and n.output[0] in self.orphan_candidates
                and not used[n.output[0]]
            ]
            if not dead:
                break
            for node in dead:
                self.orphan_candidates.update(node.input)
                self.dropped_names.update(node.output)
            live = [n for n in live if all(n is not d for d in dead)]
        del self.graph.node[:]
        self.graph.node.extend(live)
        keep = [
            t
            for t in self.graph.initializer
            if t.name not in self.orphan_candidates or used[t.name] or self._is_graph_input(t.name)
        ]
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep)
        produced = {o for n in live for o in n.output} | {i.name for i in self.graph.input}
        stale = [v for v in self.graph.value_info if v.name in self.dropped_names and v.name not in produced]
        for value in stale:
            self.graph.value_info.remove(value)

    def _used_names(self, live: list[onnx.NodeProto]) -> Counter[str]:
        used: Counter[str] = Counter()
        for node in live:
            used.update(node.input)
        for names in self._subgraph_readers():
            used.update(names)
        used.update(self.graph_outputs)
        return used
