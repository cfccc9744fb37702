"""The ONNX probe: onnxruntime statistics plus gradients from the torch lowering, one Report.

1. Inputs are read from the graph (names, element types, shapes); symbolic dimensions are
   filled from `batch_size` (the first one) and a default sequence length, or given with
   `input_shape`. Token-id inputs feeding an embedding Gather get the table's index range.
2. onnxruntime runs the real graph; every row's value is reduced to statistics by the same
   :class:`Recorder` the PyTorch probe uses (so numbers are computed identically).
3. The graph is lowered to torch (:mod:`.lower`), run forward and backward on the same batch
   with the PyTorch probe's loss; per-row output-gradient norms come from tensor hooks and
   per-initializer gradient norms are attributed to the row that owns the initializer.
4. The lowered forward output is compared with onnxruntime's on every micro-batch. If they
   differ beyond tolerance, or an op is not supported, every gradient field is null and the
   report names the op; the forward statistics are still given.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradcheck_cli import __version__
from gradcheck_cli.errors import LoadError, ProbeError, UsageError, first_line
from gradcheck_cli.onnx.plan import GraphPlan, RowPlan, plan_rows
from gradcheck_cli.options import Mode, ProbeOptions
from gradcheck_cli.parameters import onnx_parameter_count
from gradcheck_cli.probe.attention import rows_of_probabilities
from gradcheck_cli.probe.recorder import Recorder, Row, uncomputed_note
from gradcheck_cli.records import LoweringCheck, ModelInfo, ProbeInfo, Report, ToolInfo
from gradcheck_cli.stats import histogram_edges

if TYPE_CHECKING:
    import onnx
    import torch

    from gradcheck_cli.onnx.ort_stats import ValueType
    from gradcheck_cli.probe.batch import ProbeInputs
    from gradcheck_cli.probe.loss import LossFunction
    from gradcheck_cli.probe.onnx_stats import ReducedPass, SaturationSpec

Progress = Callable[[int, int], None]
# (grad norm or None, weight norm) per row, and parameter counts per row: what Recorder.layer_stats takes.
ParamGrads = tuple[dict[str, tuple[float | None, float]], dict[str, int]]

# The lowering must reproduce onnxruntime's outputs to within ATOL + RTOL * max|output|: float32
# kernels differ in summation order, which leaves relative differences around 1e-6 per layer;
# 1e-3 of the output's scale leaves room for deep models while catching any semantic error
# (a wrong axis, a missing bias, a transposed weight gives errors of the order of the output).
LOWERING_ATOL = 1e-4
LOWERING_RTOL = 1e-3
# Stands in for symbolic non-batch dimensions (sequence lengths) unless `input_shape` says.
DEFAULT_SYMBOLIC_DIM = 16


@dataclass(frozen=True)
class GraphInput:
    name: str
    dims: tuple[int | None, ...]  # None: symbolic
    elem_type: int


def graph_inputs(model: onnx.ModelProto) -> list[GraphInput]:
    """The inputs the caller must feed (initializers listed as inputs, IR < 4, excluded)."""
    initializers = {init.name for init in model.graph.initializer}
    out = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        # A negative dim_value is dynamic, as onnxruntime reads it (Paddle2ONNX writes -1); zero is
        # a fixed empty dimension to onnxruntime, kept so that the probe can refuse it by name.
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None for d in tensor.shape.dim)
        out.append(GraphInput(value.name, dims, tensor.elem_type))
    return out


def _index_range(model: onnx.ModelProto, name: str) -> tuple[float, float] | None:
    """[0, rows) when ``name`` indexes an embedding table (Gather on a stored tensor: an
    initializer or a Constant node)."""
    from gradcheck_cli.onnx.params import parameter_map

    consumers = [n for n in model.graph.node if name in n.input]
    initializers = {source.name: source.tensor for source in parameter_map(model.graph).sources.values()}
    for _ in range(3):  # through a Cast or Reshape or two
        for node in consumers:
            if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == name:
                table = initializers.get(node.input[0])
                axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                if table is not None and table.dims:
                    return 0.0, float(table.dims[axis])
        passed = [n for n in consumers if n.op_type in ("Cast", "Reshape", "Unsqueeze", "Flatten")]
        if not passed:
            break
        name = passed[0].output[0]
        consumers = [n for n in model.graph.node if name in n.input]
    return None


def onnx_probe_inputs(
    model: onnx.ModelProto, options: ProbeOptions, device: torch.device
) -> tuple[ProbeInputs, list[str]]:
    """The probe's micro-batches for the graph's inputs, drawn exactly as the PyTorch probe
    draws them (same generator, same order), and notes on what was filled in."""
    import torch

    from gradcheck_cli.onnx.ops import OpError, torch_dtype
    from gradcheck_cli.probe.batch import (
        DEFAULT_BATCH_SIZE,
        ProbeBatch,
        ProbeInputs,
        inputs_from_file,
        parse_dtype,
        synthesise,
    )

    inputs_options = options.inputs
    if inputs_options.batches < 1:
        raise UsageError("`batches` must be at least 1")
    if inputs_options.batch_size is not None and inputs_options.batch_size < 1:
        raise UsageError("`batch_size` must be at least 1")
    wanted = graph_inputs(model)
    if not wanted:
        raise ProbeError("the ONNX graph has no inputs to feed", hint="nothing to probe: the graph is constant")
    notes: list[str] = []
    for graph_input in wanted:
        if 0 in graph_input.dims:
            raise ProbeError(
                f"graph input '{graph_input.name}' declares a dimension of size 0 (axis "
                f"{graph_input.dims.index(0)}); onnxruntime runs it only on empty tensors",
                hint="export the model with a dynamic (symbolic or -1) dimension there",
            )
    if inputs_options.input is not None:
        loaded = inputs_from_file(inputs_options, device)
        batches = []
        for batch in loaded.batches:
            named = {w.name: t for w, t in zip(wanted, batch.args, strict=False)}
            named.update(batch.kwargs)
            missing = [w.name for w in wanted if w.name not in named]
            if missing:
                raise UsageError(
                    f"`input` does not provide the graph input(s) {', '.join(missing)}",
                    hint="save a tuple in graph-input order or a dict keyed by input name",
                )
            batches.append(ProbeBatch((), named))
        specs = tuple(
            replace(s, name=w.name) if s.name.startswith("input_") else s
            for s, w in zip(loaded.specs, wanted, strict=False)
        )
        return ProbeInputs(batches, specs, loaded.batch_size), notes
    if len(inputs_options.input_shape) > len(wanted):
        raise UsageError(
            f"`input_shape` given {len(inputs_options.input_shape)} times, but the graph has "
            f"{len(wanted)} input(s): {', '.join(w.name for w in wanted)}",
            hint="give one `input_shape` per graph input, in order",
        )
    batch_size = inputs_options.batch_size or DEFAULT_BATCH_SIZE
    positional = []
    for number, graph_input in enumerate(wanted):
        try:
            dtype = torch_dtype(graph_input.elem_type)
        except OpError as exc:
            raise ProbeError(
                f"graph input '{graph_input.name}': {exc}", hint="gradcheck feeds float, integer and bool inputs"
            ) from exc
        if inputs_options.input_dtype and dtype.is_floating_point:
            dtype = parse_dtype(inputs_options.input_dtype)
        if number < len(inputs_options.input_shape):
            shape = inputs_options.input_shape[number]
            if inputs_options.batch_size is not None:
                shape = (inputs_options.batch_size, *shape[1:])
            _check_fixed_dims(graph_input, shape)
        else:
            shape = _filled_shape(graph_input, batch_size, notes)
        value_range = inputs_options.input_range
        if value_range is None and not dtype.is_floating_point and dtype != torch.bool:
            value_range = _index_range(model, graph_input.name)
            if value_range is None and "mask" in graph_input.name.lower():
                value_range = (1.0, 2.0)  # an attention mask that masks nothing
                notes.append(f"input '{graph_input.name}' is all ones (an attention mask that masks nothing)")
        positional.append((shape, dtype, value_range))
    generator = torch.Generator().manual_seed(inputs_options.seed)
    drawn = synthesise(
        positional, (), inputs_options, generator, device, source="file" if inputs_options.input else "synthesized"
    )
    batches = [ProbeBatch((), {w.name: t for w, t in zip(wanted, batch.args, strict=False)}) for batch in drawn.batches]
    specs = tuple(replace(spec, name=w.name) for spec, w in zip(drawn.specs, wanted, strict=False))
    return ProbeInputs(batches, specs, drawn.batch_size), notes


def _check_fixed_dims(graph_input: GraphInput, shape: tuple[int, ...]) -> None:
    declared = "(" + ", ".join("?" if d is None else str(d) for d in graph_input.dims) + ")"
    fits = len(shape) == len(graph_input.dims) and all(
        d is None or d == s for d, s in zip(graph_input.dims, shape, strict=False)
    )
    if graph_input.dims and not fits:
        raise UsageError(
            f"`input_shape` {','.join(map(str, shape))} does not fit graph input "
            f"'{graph_input.name}', declared as {declared} ('?' is free)",
            hint="re-export with dynamic axes to probe other sizes, or match the declared shape",
        )


def _filled_shape(graph_input: GraphInput, batch_size: int, notes: list[str]) -> tuple[int, ...]:
    dims = list(graph_input.dims)
    filled = []
    for axis, size in enumerate(dims):
        if size is None:
            dims[axis] = batch_size if axis == 0 else DEFAULT_SYMBOLIC_DIM
            if axis > 0:
                filled.append(axis)
    if dims and graph_input.dims[0] is not None and batch_size != dims[0]:
        notes.append(
            f"input '{graph_input.name}' has a fixed batch dimension of {dims[0]}; `batch_size` does not apply to it"
        )
    if filled:
        notes.append(
            f"input '{graph_input.name}': symbolic dimension(s) {filled} set to "
            f"{DEFAULT_SYMBOLIC_DIM} (set them with `input_shape`)"
        )
    return tuple(int(d) for d in dims)  # type: ignore[arg-type]


def _feeds(inputs: ProbeInputs) -> list[dict[str, Any]]:
    return [{name: t.detach().cpu().numpy() for name, t in batch.kwargs.items()} for batch in inputs.batches]


def check_finite_initializers(model: onnx.ModelProto, path: Path) -> None:
    import numpy as np
    from onnx import numpy_helper

    from gradcheck_cli.onnx.params import parameter_map

    # Every float initializer, and the parameters exporters keep in Constant nodes (other
    # Constants may hold -inf on purpose: an attention mask).
    pmap = parameter_map(model.graph)
    for name, source in pmap.sources.items():
        if source.node is not None and not pmap.is_parameter(name):
            continue
        values = numpy_helper.to_array(source.tensor)
        finite = np.isfinite(values)
        if not finite.all():
            what = "initializer" if source.node is None else "Constant"
            raise LoadError(
                f"{path}: {what} '{name}' holds {int((~finite).sum())} NaN/Inf value(s) of {values.size}",
                hint="restore a model from before training diverged, or pass `allow_nonfinite` to probe it anyway",
            )


def run_onnx_probe(
    path: Path,
    options: ProbeOptions,
    *,
    progress: Progress | None = None,
    allow_nonfinite: bool = False,
    group_budget: int | None = None,
    in_graph: bool = True,
) -> Report:
    """Probe the ONNX model at ``path``: forward statistics from onnxruntime, gradients from the
    torch lowering, checked against each other on every micro-batch.

    ``in_graph`` (the default) reduces values inside the onnxruntime graph (:mod:`gradcheck_cli.probe.onnx_stats`);
    False exposes every value in groups under ``group_budget`` bytes (:mod:`.ort_stats`), the
    path that values the graph cannot reduce (NaN/Inf, unknown rank, histograms) always take.
    """
    import torch

    from gradcheck_cli.model.onnx_load import onnx_model_from_path, opset_of
    from gradcheck_cli.model.torch_load import parse_device
    from gradcheck_cli.onnx.ort_stats import (
        DEFAULT_GROUP_BUDGET_BYTES,
        output_groups,
        sizes_of,
        statistics_pass,
        value_types,
    )

    model = onnx_model_from_path(path)
    opset = opset_of(model)
    if opset == 0:
        raise LoadError(f"{path} imports no default-domain opset", hint="re-export it with a standard opset")
    if not allow_nonfinite:
        check_finite_initializers(model, path)
    # Named but not required: the ONNX probe runs on the CPU whatever the machine has (docs/onnx.md).
    requested = parse_device(options.device)
    # onnxruntime runs on its CPU provider, and the lowering's shape arithmetic creates CPU
    # tensors: the whole ONNX probe stays on the CPU rather than mixing devices.
    device = torch.device("cpu")
    inputs, notes = onnx_probe_inputs(model, options, device)
    if requested.type != "cpu":
        notes.append(f"`device` {options.device} ignored: the ONNX probe runs on the CPU")
    if options.mode is not Mode.EVAL:
        notes.append(f"`mode` {options.mode} ignored: an ONNX graph runs as exported")
    if opset < 11:
        notes.append(f"opset {opset} is older than 11, the oldest gradcheck tests against")
    plan = plan_rows(model.graph)
    if plan.recognised:
        found = ", ".join(f"{fn} x{count}" for fn, count in sorted(plan.recognised.items()))
        notes.append(f"decomposed activations recognised: {found}")
    recorder = Recorder(saturation_cutoff=options.saturation_cutoff, histograms=options.histograms)
    rows = {p.name: _recorder_row(recorder, p) for p in plan.rows}
    by_value: dict[str, list[Row]] = {}
    for p in plan.rows:
        by_value.setdefault(p.output, []).append(rows[p.name])
    attention = {p.name for p in plan.rows if p.attention}
    norm_inputs: dict[str, list[Row]] = {}
    for p in plan.rows:
        if p.input is not None:
            norm_inputs.setdefault(p.input, []).append(rows[p.name])

    feeds = _feeds(inputs)
    shapes = {name: tuple(array.shape) for name, array in feeds[0].items()}
    budget = DEFAULT_GROUP_BUDGET_BYTES if group_budget is None else (group_budget or None)
    total_steps = [0, 0]

    def step() -> None:
        total_steps[0] += 1
        if progress is not None:
            progress(total_steps[0], max(total_steps[0], total_steps[1]))

    def record(name: str, tensor: torch.Tensor) -> None:
        for row in by_value.get(name, []):
            recorder.record_output(row, tensor)
            if row.name in attention and tensor.dim() >= 3:
                recorder.record_attention(row, rows_of_probabilities(tensor))
        for row in norm_inputs.get(name, []):
            recorder.record_input(row, tensor)

    values = list(dict.fromkeys([p.output for p in plan.rows] + [p.input for p in plan.rows if p.input]))
    types = value_types(model, shapes)
    sizes = sizes_of(types)
    graph_outputs = {o.name for o in model.graph.output}
    reference: list[dict[str, torch.Tensor]] | None = None
    exposed = values
    if in_graph and not options.histograms:  # histograms need every value whole
        total_steps[1] = len(inputs.batches) * 2
        try:
            reduced = _reduce_in_graph(model, opset, plan, values, types, feeds, options, recorder, rows, attention)
        except ProbeError:
            # The graph with reduction nodes failed where the plain one may not (an empty value,
            # a shape inference got wrong): the exposing path below takes every value, and
            # raises the error itself if the graph cannot run at all. No row was touched yet.
            pass
        else:
            reference, exposed = reduced.outputs, reduced.exposed
            for _ in feeds:
                step()
    if exposed or reference is None:
        group_count = max(1, len(output_groups([v for v in exposed if v not in graph_outputs], sizes, budget)))
        total_steps[1] = len(inputs.batches) * (group_count + 1 + (reference is not None))
        try:
            ort_pass = statistics_pass(
                model, exposed, feeds, record, sizes=sizes, budget=budget, end_batch=recorder.end_batch, progress=step
            )
        except ProbeError as exc:
            # A size gradcheck chose for a free dimension is the likeliest cause (PaddleOCR's
            # detector needs sides that are multiples of 32): say which, and how to set them.
            filled = [note for note in notes if "symbolic dimension" in note]
            if not filled:
                raise
            raise ProbeError(exc.message, hint=f"{filled[0]}; the model may need other sizes") from exc
        if ort_pass.groups > 1:
            notes.append(f"onnxruntime statistics taken in {ort_pass.groups} groups of outputs to bound memory")
        if reference is None:
            reference = ort_pass.outputs
    loss_value, output_label, loss_kind = _reference_loss(reference, options, inputs, model)

    lowering, grads = _lowered_gradients(
        model, opset, plan, inputs, reference, options, device, recorder, by_value, step, sizes, budget
    )
    if not lowering.ok:
        notes.append(f"gradients not reported: {lowering.reason}")
    param_grads, param_counts = grads
    layers = recorder.layer_stats(
        param_grads, param_counts, gradient_reason=None if lowering.ok else f"gradients not reported: {lowering.reason}"
    )
    summary = uncomputed_note(layers)
    if summary:
        notes.append(summary)
    if not layers:
        notes.append("no node produced a row: the graph has no parameters, normalisations or activations")
    probe = ProbeInfo(
        inputs=inputs.specs,
        batch_size=inputs.batch_size,
        batches=len(inputs.batches),
        seed=options.inputs.seed,
        loss=loss_kind,
        loss_value=loss_value,
        mode="as-exported",
        device=str(device),
        output=output_label,
        saturation_cutoff=options.saturation_cutoff,
        method="onnxruntime",
        lowering=lowering,
    )
    parameters = onnx_parameter_count(plan)
    return Report(
        tool=ToolInfo(name="gradcheck", version=__version__),
        model=ModelInfo(path=str(path), format="onnx", parameters=parameters),
        probe=probe,
        layers=tuple(layers),
        notes=tuple(notes),
        histogram_edges=tuple(histogram_edges()) if options.histograms else None,
    )


def _reduce_in_graph(
    model: onnx.ModelProto,
    opset: int,
    plan: GraphPlan,
    values: list[str],
    types: dict[str, ValueType],
    feeds: list[dict[str, Any]],
    options: ProbeOptions,
    recorder: Recorder,
    rows: dict[str, Row],
    attention: set[str],
) -> ReducedPass:
    """Statistics of every reducible value from one run per micro-batch of the graph with reduction
    nodes added; the values left in ``exposed`` (attention probabilities, NaN/Inf, unknown rank)
    are for the caller's exposing path."""
    from gradcheck_cli.probe.activations import RELU_FAMILY, SATURATING, unit_axis
    from gradcheck_cli.probe.onnx_stats import ValueRequest, apply_stats, reduced_statistics_pass, saturation_spec

    def rank(value: str) -> int | None:
        known = types.get(value)
        return None if known is None or known.dims is None else len(known.dims)

    wants: dict[str, ValueRequest] = {}
    by_value: dict[str, list[tuple[Row, int | None, SaturationSpec | None]]] = {}
    # Attention probabilities need the whole tensor (per-row entropy): they go the old way.
    whole = {p.output for p in plan.rows if p.name in attention}
    for p in plan.rows:
        request = wants.setdefault(p.output, ValueRequest(p.output))
        r = rank(p.output)
        axis = unit_axis((0,) * r, p.channel_first) if p.fn in RELU_FAMILY and r is not None and r >= 1 else None
        spec = saturation_spec(p.fn, p.fn_params) if p.fn in SATURATING else None
        if axis is not None:
            request.unit_axes.add(axis)
        if spec is not None:
            request.saturation.add(spec)
        by_value.setdefault(p.output, []).append((rows[p.name], axis, spec))
    norm_inputs: dict[str, list[Row]] = {}
    for p in plan.rows:
        if p.input is not None:
            wants.setdefault(p.input, ValueRequest(p.input))
            norm_inputs.setdefault(p.input, []).append(rows[p.name])
    reducible = [v for v in values if v not in whole]
    reduced = reduced_statistics_pass(
        model, reducible, wants, types, feeds, opset=opset, cutoff=options.saturation_cutoff
    )
    reduced.exposed += [v for v in values if v in whole]
    for value, reason in reduced.skipped.items():
        for row, _, _ in by_value.get(value, []):
            row.skip_reason = reason
        for row in norm_inputs.get(value, []):
            row.input_of().skip_reason = reason
    # Micro-batch by micro-batch, in row order: the order Recorder.end_batch merges in.
    for batch in range(len(feeds)):
        for value, per_batch in reduced.stats.items():
            for row, axis, spec in by_value.get(value, []):
                apply_stats(row, per_batch[batch], unit_axis=axis, saturation=spec)
            for row in norm_inputs.get(value, []):
                apply_stats(row.input_of(), per_batch[batch], unit_axis=None, saturation=None)
    return reduced


def _recorder_row(recorder: Recorder, plan: RowPlan) -> Row:
    return recorder.row(
        plan.name,
        type=plan.type,
        kind=plan.kind,
        module=plan.module,
        fn=plan.fn,
        fn_params=plan.fn_params,
        channel_first=plan.channel_first,
        param_names=tuple(plan.params),
    )


def _sigmoid_output(model: onnx.ModelProto, options: ProbeOptions) -> bool:
    """Whether the output the loss is taken from is a Sigmoid node's (see ``LossKind.BCE``)."""
    from gradcheck_cli.probe.loss import selected_key

    name = selected_key([o.name for o in model.graph.output], options.model_output)
    return any(node.op_type == "Sigmoid" and name in node.output for node in model.graph.node)


def _loss_function(model: onnx.ModelProto, options: ProbeOptions, inputs: ProbeInputs) -> LossFunction:
    """The probe's loss for this graph: the same for onnxruntime's outputs and the lowering's."""
    from gradcheck_cli.probe.loss import LossFunction

    return LossFunction(
        kind=options.loss,
        total=inputs.total,
        seed=options.inputs.seed,
        target_file=options.target,
        sigmoid_output=_sigmoid_output(model, options),
    )


def _reference_loss(
    reference: list[dict[str, torch.Tensor]], options: ProbeOptions, inputs: ProbeInputs, model: onnx.ModelProto
) -> tuple[float | None, str, str]:
    """The probe loss on onnxruntime's outputs (the real graph), with the PyTorch probe's rules."""
    from gradcheck_cli.probe.loss import select_output

    loss_fn = _loss_function(model, options, inputs)
    total = 0.0
    label = "output"
    for outputs in reference:
        selected, label = select_output(outputs, options.model_output)
        if not selected.dtype.is_floating_point:
            return None, label, str(options.loss)
        total += float(loss_fn(selected.detach().clone().requires_grad_(True)).detach())
    return (total if math.isfinite(total) else None), label, str(loss_fn.kind)


def _lowered_gradients(
    model: onnx.ModelProto,
    opset: int,
    plan: GraphPlan,
    inputs: ProbeInputs,
    reference: list[dict[str, torch.Tensor]],
    options: ProbeOptions,
    device: torch.device,
    recorder: Recorder,
    by_value: dict[str, list[Row]],
    step: Callable[[], None],
    sizes: dict[str, int],
    budget: int | None,
) -> tuple[LoweringCheck, ParamGrads]:
    """Forward and backward through the lowering; null gradients (with the reason) when the
    lowering cannot run the graph or disagrees with onnxruntime."""
    import torch

    from gradcheck_cli.onnx.lower import LoweredGraph, LoweringError, unsupported_ops
    from gradcheck_cli.probe.loss import select_output
    from gradcheck_cli.probe.run import parameter_gradients

    missing = unsupported_ops(model, opset)
    lowered = LoweredGraph(
        model, opset=opset, trainable=plan.trainable, device=device, leaves=plan.leaves, uses=plan.uses
    )
    row_params = {p.name: [lowered.parameters[n] for n in p.params] for p in plan.rows if p.params}
    tolerance: float | None = None

    def failed(reason: str, error: float | None = None) -> tuple[LoweringCheck, ParamGrads]:
        # Nothing half-measured survives: gradient norms of rows that did run are dropped too.
        for row in recorder.rows.values():
            row.grad_sumsq, row.has_grad, row.pending_grad = 0.0, False, []
        for tensors in row_params.values():
            for t in tensors:
                t.grad = None
        grads, counts = parameter_gradients(row_params)
        return (
            LoweringCheck(
                ok=False, max_abs_error=error, tolerance=tolerance, unsupported_ops=tuple(missing), reason=reason
            ),
            ({k: (None, w) for k, (_, w) in grads.items()}, counts),
        )

    if missing:
        return failed(f"the lowering does not support {', '.join(missing)}")
    loss_fn = _loss_function(model, options, inputs)
    worst = (0.0, math.inf)  # (error, allowed) of the output closest to its tolerance

    def watch(name: str, value: torch.Tensor) -> None:
        if value.requires_grad and name in by_value:
            for row in by_value[name]:
                # The recorder's own hook, so norms (and histograms) match the PyTorch probe's.
                value.register_hook(recorder.grad_hook(row))  # type: ignore[arg-type]

    try:
        with torch.enable_grad():
            for batch, expected in zip(inputs.batches, reference, strict=True):
                try:
                    outputs = lowered.run(batch.kwargs, watch=watch)
                except LoweringError as exc:
                    return failed(f"the lowering failed at {exc}")
                for name, want in expected.items():
                    error, allowed = _difference(outputs[name].detach().cpu(), want)
                    if error > allowed:
                        tolerance = allowed
                        culprit = _first_divergent_row(model, plan, lowered, batch.kwargs, sizes, budget)
                        return failed(
                            f"the lowered forward differs from onnxruntime at output '{name}' by "
                            f"{error:.3g} (tolerance {allowed:.3g}){culprit}",
                            error,
                        )
                    if error * worst[1] >= worst[0] * allowed:  # error/allowed, without dividing by 0
                        worst = (error, allowed)
                selected, _ = select_output(outputs, options.model_output)
                loss = loss_fn(selected)
                del outputs, selected
                loss.backward()
                del loss
                recorder.end_batch()
                step()
    except (RuntimeError, ProbeError) as exc:
        text = first_line(exc, 200)
        return failed(f"the backward pass through the lowering failed: {text}")
    grads, counts = parameter_gradients(row_params)
    for tensors in row_params.values():
        for t in tensors:
            t.grad = None
    return LoweringCheck(
        ok=True,
        max_abs_error=worst[0],
        tolerance=worst[1] if math.isfinite(worst[1]) else None,
        unsupported_ops=(),
        reason=None,
    ), (grads, counts)


def _difference(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(max |got - want|, allowed) with NaN/Inf required at the same places with the same value."""
    import torch

    if got.shape != want.shape:
        return math.inf, 0.0
    if not want.dtype.is_floating_point:
        return (0.0 if torch.equal(got.to(want.dtype), want) else math.inf), 0.0
    got64, want64 = got.double(), want.double()
    finite = torch.isfinite(want64)
    same_nonfinite = bool(((got64 == want64) | (got64.isnan() & want64.isnan()))[~finite].all())
    if not same_nonfinite or not bool(torch.isfinite(got64[finite]).all()):
        return math.inf, 0.0
    if not bool(finite.any()):
        return 0.0, LOWERING_ATOL
    error = float((got64[finite] - want64[finite]).abs().max())
    scale = float(want64[finite].abs().max())
    return error, LOWERING_ATOL + LOWERING_RTOL * scale


def _first_divergent_row(
    model: onnx.ModelProto,
    plan: GraphPlan,
    lowered: Any,
    feeds: dict[str, torch.Tensor],
    sizes: dict[str, int],
    budget: int | None,
) -> str:
    """Name the first row (in node order) whose lowered value differs from onnxruntime's on this
    micro-batch, so the report says which op to look at. Runs only when the outputs disagree;
    values are compared group by group, so memory stays bounded as in the statistics pass."""
    import numpy as np
    import torch

    from gradcheck_cli.onnx.ort_stats import output_groups, session_for

    feed_arrays = {name: t.detach().cpu().numpy() for name, t in feeds.items()}
    values = list(dict.fromkeys(p.output for p in plan.rows))
    for group in output_groups(values, sizes, budget):
        wanted = set(group)
        kept: dict[str, torch.Tensor] = {}

        def keep(
            name: str, value: torch.Tensor, wanted: set[str] = wanted, kept: dict[str, torch.Tensor] = kept
        ) -> None:
            if name in wanted:
                kept[name] = value.detach().cpu()

        try:
            with torch.no_grad():
                lowered.run(feeds, watch=keep)
            arrays = dict(zip(group, session_for(model, group).run(group, feed_arrays), strict=False))
        except Exception:
            return ""
        for p in plan.rows:
            if p.output not in wanted or p.output not in kept:
                continue
            error, allowed = _difference(kept[p.output], torch.from_numpy(np.ascontiguousarray(arrays[p.output])))
            if error > allowed:
                return f"; the first row that differs is '{p.name}' ({p.type})"
    return ""
