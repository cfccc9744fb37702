"""Per-node activation statistics from onnxruntime, on the real graph, in bounded memory.

onnxruntime only returns graph outputs, so the values we want statistics of are added as extra
graph outputs. Adding all of them at once makes onnxruntime keep every one of them alive until
the run ends (it cannot reuse their buffers), so peak memory grows with the number of nodes.
Instead the values are split into groups whose estimated size (from shape inference with the
probe's concrete input shapes) stays under a byte budget, and the graph runs once per group:
peak memory is then bounded by the budget plus one inference, whatever the depth of the model,
at the price of one extra forward pass per extra group. Each returned array is reduced to
statistics (in torch, by the probe's :class:`~gradcheck_cli.probe.recorder.Recorder`) and
dropped before the next group runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gradcheck_cli.errors import ProbeError, first_line

if TYPE_CHECKING:
    import onnx
    import torch


# Extra outputs held at once, per micro-batch: the bound on the statistics pass's extra memory.
DEFAULT_GROUP_BUDGET_BYTES = 256 * 1024**2
_ITEM_SIZE = {1: 4, 2: 1, 3: 1, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}

Record = Callable[[str, "torch.Tensor"], None]


@dataclass(frozen=True)
class OrtPass:
    outputs: list[dict[str, torch.Tensor]]  # the graph outputs, per micro-batch
    groups: int


@dataclass(frozen=True)
class ValueType:
    """What shape inference says of one value."""

    elem_type: int  # ONNX TensorProto element type, 0 when unknown
    dims: tuple[int, ...] | None  # -1 for an unknown dimension; None when the rank is unknown


def value_types(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, ValueType]:
    """Element type and dimensions of every value shape inference can type, with the given
    input shapes (empty when inference fails)."""
    import onnx

    concrete = onnx.ModelProto()
    concrete.CopyFrom(model)
    for value in concrete.graph.input:
        shape = input_shapes.get(value.name)
        if shape is None or not value.type.HasField("tensor_type"):
            continue
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for size in shape:
            dims.add().dim_value = size
    del concrete.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(concrete, strict_mode=False, data_prop=True)
    except Exception:
        return {}
    types: dict[str, ValueType] = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        if not value.type.HasField("tensor_type"):
            continue
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
        types[value.name] = ValueType(tensor.elem_type, dims if tensor.HasField("shape") else None)
    return types


def sizes_of(types: dict[str, ValueType]) -> dict[str, int]:
    """Bytes of every value whose dimensions are all known."""
    return {
        name: math.prod(t.dims) * _ITEM_SIZE.get(t.elem_type, 4)
        for name, t in types.items()
        if t.dims is not None and all(d >= 0 for d in t.dims)
    }


def value_sizes(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, int]:
    """Bytes of every value whose shape inference resolves with the given input shapes."""
    return sizes_of(value_types(model, input_shapes))


def output_groups(names: Sequence[str], sizes: dict[str, int], budget: int | None) -> list[list[str]]:
    """Consecutive groups of ``names`` whose estimated bytes stay within ``budget`` (a value
    larger than the budget gets a group of its own; None: one group)."""
    if budget is None or not names:
        return [list(names)] if names else []
    known = [sizes[n] for n in names if n in sizes]
    fallback = max(known) if known else budget // 8  # unknown sizes: assume the largest seen
    groups: list[list[str]] = [[]]
    used = 0
    for name in names:
        size = sizes.get(name, fallback)
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


def serialized_prefix(model: onnx.ModelProto, outputs: Sequence[str]) -> bytes:
    """The model cut down to the nodes ``outputs`` depend on, with exactly those outputs.

    onnxruntime runs every node of its graph whatever is fetched, so a group of early values
    would otherwise cost a whole forward pass; with the prefix only, the statistics pass costs
    about (groups + 1) / 2 forward passes instead of one per group.
    """
    import onnx

    from gradcheck_cli.onnx.lower import outer_names

    graph = model.graph
    producer = {name: i for i, node in enumerate(graph.node) for name in node.output if name}
    needed: set[int] = set()
    seen: set[str] = set()
    stack = list(outputs)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        position = producer.get(name)
        if position is None or position in needed:
            continue
        needed.add(position)
        node = graph.node[position]
        stack.extend(n for n in node.input if n)
        stack.extend(outer_names(node))  # If/Loop bodies read outer values too
    typed = {o.name: o for o in graph.output}
    pruned = onnx.GraphProto(name=graph.name)
    pruned.node.extend(graph.node[i] for i in sorted(needed))
    pruned.input.extend(graph.input)  # every input stays declared: the caller feeds them all
    pruned.initializer.extend(init for init in graph.initializer if init.name in seen)
    # Exposed intermediate values get no type: onnxruntime infers it.
    pruned.output.extend(typed.get(name) or onnx.ValueInfoProto(name=name) for name in outputs)
    cut = onnx.ModelProto(ir_version=model.ir_version, producer_name=model.producer_name, graph=pruned)
    cut.opset_import.extend(model.opset_import)
    cut.functions.extend(model.functions)
    return bytes(cut.SerializeToString())


def session_for(model: onnx.ModelProto, outputs: Sequence[str]) -> Any:
    """An onnxruntime session computing exactly ``outputs`` (graph outputs or intermediate values)."""
    import onnxruntime as ort

    data = serialized_prefix(model, list(dict.fromkeys(outputs)))
    options = ort.SessionOptions()
    # onnxruntime logs to stderr itself, errors included; the exception it raises carries the same
    # text, which the probe turns into its one-line error, so only fatal messages may print.
    options.log_severity_level = 4
    # Basic optimisations only (constant folding, exact fusions): the extended ones convert
    # layouts (NCHWc) and must convert back at every exposed output, which made sessions with
    # many outputs slower to create and to run (resnet18: 0.40 s + 0.53 s vs 0.16 s + 0.34 s).
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    # No arena: it would keep the peak of every group's outputs reserved until the session is
    # gone; plain allocations of these sizes go back to the system when freed.
    options.enable_cpu_mem_arena = False
    try:
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        text = first_line(exc)
        raise ProbeError(
            f"onnxruntime could not load the graph: {text}",
            hint="check the model with `python -m onnx.checker` or re-export it",
        ) from exc


def _as_torch(value: Any) -> torch.Tensor:
    """An onnxruntime output as a torch tensor over the same memory (DLPack), so an exposed
    value is never held twice; a copy for element types DLPack cannot carry."""
    import torch
    import torch.utils.dlpack

    try:
        tensor: torch.Tensor = torch.utils.dlpack.from_dlpack(value)
    except Exception:
        tensor = torch.from_numpy(value.numpy())
    return tensor


def statistics_pass(
    model: onnx.ModelProto,
    values: Sequence[str],
    feeds: Sequence[dict[str, Any]],
    record: Record,
    *,
    sizes: dict[str, int],
    budget: int | None,
    end_batch: Callable[[], None],
    progress: Callable[[], None] | None = None,
) -> OrtPass:
    """Run every micro-batch once per group, handing each value to ``record`` as it arrives.

    ``end_batch`` is called after each (group, micro-batch) run so the caller can fold the
    statistics; each output's memory is released as soon as it has been recorded. Returns the
    graph outputs of every micro-batch (copies, from the last group's runs).
    """
    import onnxruntime as ort

    graph_outputs = [o.name for o in model.graph.output]
    wanted_values = set(values)
    groups = output_groups([v for v in values if v not in graph_outputs], sizes, budget) or [[]]
    last = len(groups) - 1
    per_batch: list[dict[str, torch.Tensor]] = []
    for number, group in enumerate(groups):
        # The graph outputs come with the last group: it runs the whole graph anyway.
        wanted = (group + graph_outputs) if number == last else group
        session = session_for(model, wanted)
        for feed in feeds:
            try:
                ort_feed = {name: ort.OrtValue.ortvalue_from_numpy(array) for name, array in feed.items()}
                outputs: list[Any] = list(session.run_with_ort_values(wanted, ort_feed))
            except Exception as exc:
                text = first_line(exc)
                raise ProbeError(
                    f"onnxruntime failed on the probe batch: {text}",
                    hint="check the probe inputs with `input_shape`/`input_dtype`",
                ) from exc
            kept: dict[str, torch.Tensor] = {}
            for position, name in enumerate(wanted):
                tensor = _as_torch(outputs[position])
                if number == last and name in graph_outputs:
                    kept[name] = tensor.clone()
                if name in wanted_values:
                    record(name, tensor)
                outputs[position] = None  # release this output before reducing the next one
                del tensor
            if number == last:
                per_batch.append(kept)
            end_batch()
            if progress is not None:
                progress()
        del session
    return OrtPass(outputs=per_batch, groups=len(groups))
