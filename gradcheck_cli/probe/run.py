"""Run the probe: micro-batches forward and backward, then finished rows.

Everything the probe changes on the model (train/eval mode, ``requires_grad``, existing
``.grad`` values, BatchNorm running statistics in train mode, the global RNG) is saved first
and restored in ``finally``, so probing a model a caller still holds leaves it as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from gradcheck_cli import __version__
from gradcheck_cli.errors import GradcheckError, ProbeError, UsageError, first_line
from gradcheck_cli.model.formats import ModelFormat
from gradcheck_cli.model.torch_load import resolve_device
from gradcheck_cli.options import LossKind, Mode, ProbeOptions, StatisticsPass
from gradcheck_cli.parameters import module_parameter_count
from gradcheck_cli.probe.batch import ProbeBatch, ProbeInputs, probe_inputs
from gradcheck_cli.probe.compiled import CompiledStatistics, pays
from gradcheck_cli.probe.distributed import (
    Ranks,
    check_shares,
    join_ranks,
    local_share,
    merge_rows,
    shard_model,
    sum_across,
)
from gradcheck_cli.probe.instrument import EagerInstrument, GraphInstrument
from gradcheck_cli.probe.lean import GradientReducer, local_tensor, sparse_embedding_gradients
from gradcheck_cli.probe.loss import LossFunction, model_loss, select_output
from gradcheck_cli.probe.recorder import Recorder, sum_of_squares, uncomputed_note
from gradcheck_cli.probe.recurrent import (
    HORIZON_FRACTION,
    RecurrentUnroller,
    fit_decay,
    spectral_radii,
    spectral_radii_of,
)
from gradcheck_cli.records import (
    DirectionTrace,
    GateStats,
    LayerStats,
    ModelInfo,
    ProbeInfo,
    Report,
    ThroughTime,
    ToolInfo,
)
from gradcheck_cli.stats import histogram_edges
from gradcheck_cli.torch_util import type_name

if TYPE_CHECKING:
    import torch
    from torch import nn

    from gradcheck_cli.model.handle import LoadedModel

Progress = Callable[[int, int], None]


def run_probe(loaded: LoadedModel, options: ProbeOptions, *, progress: Progress | None = None) -> Report:
    device = resolve_device(options.device)
    ranks = join_ranks(device)
    try:
        return _run_probe(loaded, options, device if ranks is None else ranks.device, ranks, progress)
    finally:
        if ranks is not None:
            ranks.close()


def _run_probe(
    loaded: LoadedModel, options: ProbeOptions, device: torch.device, ranks: Ranks | None, progress: Progress | None
) -> Report:
    inputs = probe_inputs(
        loaded.module,
        options.inputs,
        device=device,
        example_args=loaded.example_args,
        example_kwargs=loaded.example_kwargs,
    )
    if ranks is None:
        inputs, split_note = _fit_memory(loaded.module, inputs, options)
    else:
        # Each rank holds 1/world of the weights once sharded; the split is the user's to choose.
        split_note = None
        check_shares(inputs.batches, ranks)
    if not any(p.dtype.is_floating_point for p in loaded.module.parameters()):
        raise ProbeError(
            "the model has no floating-point parameters, so its output does not depend on any "
            "parameter: there is no gradient to measure",
            hint="probe a model with trainable layers (a bare activation has nothing to train)",
        )
    module, instrument_kind, notes = _runnable(loaded, options, inputs.batches[0])
    notes.extend(inputs.notes)
    if split_note:
        notes.append(split_note)
    dtype_note = _dtype_note(module)
    if dtype_note:
        notes.append(dtype_note)
    if ranks is not None:
        if instrument_kind != "eager":
            raise UsageError(
                "under torchrun, only eager PyTorch models can be sharded",
                hint="probe exported programs and TorchScript archives in one process",
            )
        shard_model(module, ranks)
        notes.append(
            f"sharded with FSDP2 across {ranks.world} processes; each ran its share of every "
            "micro-batch and the statistics were merged exactly"
        )
    recorder = Recorder(saturation_cutoff=options.saturation_cutoff, histograms=options.histograms)
    if options.statistics_pass is StatisticsPass.COMPILED:
        recorder.compiled = CompiledStatistics()
    instrument: EagerInstrument | GraphInstrument = (
        GraphInstrument(module, recorder) if instrument_kind == "graph" else EagerInstrument(module, recorder)
    )
    loss_fn = LossFunction(kind=options.loss, total=inputs.total, seed=options.inputs.seed, target_file=options.target)
    reducer = GradientReducer(module.parameters(), batches=len(inputs.batches))
    loss_total = 0.0
    output_label = "output"
    offset = 0
    with (
        _probe_state(module, options.mode, instrument_kind == "eager", options.inputs.seed),
        instrument.attached(),
        reducer.attached(),
        sparse_embedding_gradients(module, enabled=instrument_kind == "eager" and ranks is None),
        _checkpointing(module, options.activation_checkpointing),
    ):
        for index, whole in enumerate(inputs.batches):
            batch, start = (whole, 0) if ranks is None else local_share(whole, ranks)
            loss_fn.seek(offset + start)
            offset += whole.size
            with _collector_paused():
                instrument.start_batch()
                # On the first micro-batch only, watch the float inputs: a model whose loss ignores
                # them trains on nothing, and the report should say so rather than look healthy.
                batch, watched = _watch_inputs(batch) if index == 0 else (batch, [])
                output = _forward(instrument, batch.args, batch.kwargs, inputs)
                if inputs.model_loss and options.loss in (LossKind.AUTO, LossKind.MODEL):
                    loss, output_label = model_loss(output, batch.size, inputs.total), "output['loss']"
                    loss_fn.kind = LossKind.MODEL
                else:
                    if options.loss is LossKind.MODEL:
                        raise UsageError(
                            "`loss` model needs a model that computes its own loss from labels "
                            "(a transformers LM head)",
                            hint="use `loss` auto, cross_entropy or mse",
                        )
                    selected, output_label = select_output(output, options.model_output)
                    loss = loss_fn(selected)
                    del selected
                del output
                try:
                    # Activation checkpointing recomputes blocks during backward: those forwards
                    # are not the probe's and make no rows.
                    with instrument.paused():
                        inputs_reached = _backward(loss, watched, module, recorder, sharded=ranks is not None)
                except RuntimeError as exc:
                    raise ProbeError(
                        f"the backward pass failed: {first_line(exc)}", hint="pass `debug` for the traceback"
                    ) from exc
                reducer.end_backward()
                loss_total += float(loss.detach())
                del loss
                if watched and not inputs_reached:
                    notes.append(
                        "the loss does not depend on the model's inputs: no path leads from them to it "
                        "(a model that ignores its input, or an output cut off from it)"
                    )
                recorder.end_batch()
            if (
                options.statistics_pass is StatisticsPass.AUTO
                and recorder.compiled is None
                and pays(recorder.large_output_bytes, len(inputs.batches) - index - 1)
            ):
                recorder.compiled = CompiledStatistics()
            if progress is not None:
                progress(index + 1, len(inputs.batches))
        param_grads, param_counts = parameter_gradients(instrument.row_params, reducer, ranks)
    if ranks is not None:
        merge_rows(
            recorder, ranks, [local_share(b, ranks)[0].size for b in inputs.batches], [b.size for b in inputs.batches]
        )
        loss_total = float(sum_across(_float64(loss_total), ranks))
    traces = through_time_records(instrument.unrollers) if isinstance(instrument, EagerInstrument) else {}

    if recorder.compiled is not None:
        notes.append(recorder.compiled.note())
    layers = recorder.layer_stats(param_grads, param_counts, traces)
    if instrument_kind == "eager":
        layers = cell_loop_traces(layers, module)
    summary = uncomputed_note(layers)
    if summary:
        notes.append(summary)
    if not layers:
        notes.append(
            "no layer produced a row: the model has no parameters or activation calls that the probe could see"
        )
    probe = ProbeInfo(
        inputs=inputs.specs,
        batch_size=inputs.batch_size,
        batches=len(inputs.batches),
        seed=options.inputs.seed,
        loss=str(loss_fn.kind),
        loss_value=loss_total if math.isfinite(loss_total) else None,
        mode=str(options.mode) if instrument_kind == "eager" else "as-exported",
        device=str(device),
        output=output_label,
        saturation_cutoff=options.saturation_cutoff,
        method=instrument.method,
    )
    model = ModelInfo(
        path=str(loaded.path),
        format=str(loaded.format),
        parameters=module_parameter_count(loaded.module)
        if ranks is None
        else int(sum_across(_float64(sum(local_tensor(p).numel() for p in module.parameters())), ranks)),
    )
    return Report(
        tool=ToolInfo(name="gradcheck", version=__version__),
        model=model,
        probe=probe,
        layers=tuple(layers),
        notes=tuple(loaded.notes + notes),
        histogram_edges=tuple(histogram_edges()) if options.histograms else None,
    )


def _float64(value: float) -> torch.Tensor:
    import torch

    return torch.tensor([value], dtype=torch.float64)


def _dtype_note(module: nn.Module) -> str | None:
    """Which dtype ran, when it is not float32 (the default, which needs no saying), and why."""
    dtypes = {p.dtype for p in module.parameters() if p.dtype.is_floating_point}
    if not dtypes or dtypes == {_float32()}:
        return None
    names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
    return (
        f"ran in {names}: the weights' own precision, as deployed (a half-precision checkpoint is not "
        "upcast); statistics are accumulated in float32, sums of squares combined in float64"
    )


def _float32() -> torch.dtype:
    import torch

    return torch.float32


@contextlib.contextmanager
def _checkpointing(module: nn.Module, enabled: bool) -> Iterator[None]:
    """The transformers model's own activation (gradient) checkpointing for the probe's duration.

    Non-reentrant checkpointing keeps the original autograd graph (only saved activations are
    recomputed), so the gradient hooks the recorder puts on block outputs still fire.
    """
    if not enabled:
        yield
        return
    # transformers 5 names it activation checkpointing; 4.x gradient checkpointing.
    names = (
        ("activation_checkpointing_enable", "activation_checkpointing_disable", "is_activation_checkpointing"),
        ("gradient_checkpointing_enable", "gradient_checkpointing_disable", "is_gradient_checkpointing"),
    )
    found = next((n for n in names if callable(getattr(module, n[0], None))), None)
    if found is None:
        raise UsageError(
            "`activation_checkpointing` needs a transformers model (one that can checkpoint its own blocks)",
            hint="leave it off for other models, or lower `batch_size`",
        )
    enable, disable, state = (getattr(module, name) for name in found)
    was = bool(state)
    try:
        enable({"use_reentrant": False})
    except ValueError as exc:  # the model class does not support it
        raise UsageError(
            f"`activation_checkpointing`: {first_line(exc)}", hint="leave it off for this model, or lower `batch_size`"
        ) from exc
    try:
        yield
    finally:
        if not was:
            disable()


def _watch_inputs(batch: ProbeBatch) -> tuple[ProbeBatch, list[torch.Tensor]]:
    """The batch with each float input replaced by a differentiable copy (a non-leaf, so that a
    model may still modify its input in place), and the leaves whose .grad will tell."""
    leaves: list[torch.Tensor] = []

    def watch(tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.dtype.is_floating_point or tensor.requires_grad:
            return tensor
        leaf = tensor.detach().requires_grad_(True)
        leaves.append(leaf)
        return leaf.clone()

    watched = ProbeBatch(tuple(watch(t) for t in batch.args), {k: watch(v) for k, v in batch.kwargs.items()})
    return watched, leaves


def _backward(
    loss: torch.Tensor, watched: list[torch.Tensor], module: nn.Module, recorder: Recorder, *, sharded: bool
) -> bool:
    """Run the backward pass; whether the loss reached the watched inputs (True when none are
    watched). The inputs' own gradient is pruned where nothing needs it (probe/reach.py); under
    FSDP2 the graph's leaves are the unsharded parameters, not the module's, so nothing is pruned."""
    import torch

    from gradcheck_cli.probe.reach import graph_reach

    hooked = recorder.end_forward()
    if not watched:
        del hooked
        loss.backward()
        return True
    parameters = [p for p in module.parameters() if p.requires_grad]
    reach = graph_reach(loss, watched, parameters, hooked)
    del hooked
    if sharded or not reach.prunable or not parameters:
        loss.backward()
    else:
        torch.autograd.backward(loss, inputs=parameters)
    return reach.inputs_reached


def _fit_memory(module: nn.Module, inputs: ProbeInputs, options: ProbeOptions) -> tuple[ProbeInputs, str | None]:
    """The inputs, split into smaller micro-batches when one would not fit the memory available or
    the user's budget (the estimate: probe/budget.py), with the note that says so; a probe that
    cannot fit even one sample is refused before it runs.

    The lean probe holds one parameter's gradient at a time for a single micro-batch, but every
    gradient across several (the norm of their sum needs the sum): splitting costs gradient
    memory, so the split is sized with all gradients counted.
    """
    from gradcheck_cli.probe.budget import (
        available_memory,
        estimate_probe_memory,
        gradient_bytes,
        micro_batch_that_fits,
        over_limit,
    )

    first = inputs.batches[0]
    available = available_memory(options.device)
    resident = _resident_bytes(module, resolve_device(options.device))
    count = len(inputs.batches)
    # Sizing the activations costs a one-sample forward: pay it when a budget is set, or when the
    # gradients and inputs alone (the weights are already in memory) take a good share of the
    # memory there is.
    estimate = dataclasses.replace(
        estimate_probe_memory(module, first.args, first.kwargs, measure=False, micro_batches=count), resident=resident
    )
    if options.memory_budget is not None or (available is not None and 4 * (estimate.total - resident) > available):
        estimate = dataclasses.replace(
            estimate_probe_memory(module, first.args, first.kwargs, measure=True, micro_batches=count),
            resident=resident,
        )
    fits = micro_batch_that_fits(estimate, budget=options.memory_budget, available=available)
    if fits is None or max(batch.size for batch in inputs.batches) <= fits:
        return inputs, None
    if count == 1:
        split = dataclasses.replace(estimate, gradients=gradient_bytes(module, 2), micro_batches=2)
        fits = micro_batch_that_fits(split, budget=options.memory_budget, available=available)
        if fits is None:  # cannot happen: more gradients held never fit better
            return inputs, None
    batches = [
        ProbeBatch(
            tuple(a[start : start + fits] for a in batch.args),
            {k: v[start : start + fits] for k, v in batch.kwargs.items()},
        )
        for batch in inputs.batches
        for start in range(0, batch.size, fits)
    ]
    note = (
        f"split into {len(batches)} micro-batches of at most {fits} samples to fit memory: the probe needs "
        f"{over_limit(estimate, budget=options.memory_budget, available=available)}; statistics are merged "
        "exactly"
        + (
            " (BatchNorm with batch statistics normalises each micro-batch with its own)"
            if options.mode.batch_statistics
            else ""
        )
    )
    return dataclasses.replace(inputs, batches=batches, batch_size=fits), note


def _resident_bytes(module: nn.Module, device: torch.device) -> int:
    """Bytes of the module's parameters and buffers already on ``device``."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(
        t.numel() * t.element_size()
        for t in tensors
        if t.device.type == device.type and (device.index is None or t.device.index == device.index)
    )


def _runnable(loaded: LoadedModel, options: ProbeOptions, sample: ProbeBatch) -> tuple[Any, str, list[str]]:
    """The module to run and how to instrument it."""
    import torch

    notes: list[str] = []
    if loaded.format is ModelFormat.EXPORTED_PROGRAM:
        if options.mode is not Mode.EVAL:
            notes.append(f"`mode` {options.mode} ignored: an exported program runs in the mode it was exported in")
        return loaded.module, "graph", notes
    if isinstance(loaded.module, torch.jit.ScriptModule):
        return _torchscript_graph(loaded, options, sample, notes), "graph", notes
    return loaded.module, "eager", notes


def _torchscript_graph(loaded: LoadedModel, options: ProbeOptions, sample: ProbeBatch, notes: list[str]) -> nn.Module:
    """TorchScript has no hooks; convert it to an exported program to see inside it."""
    import warnings

    import torch
    from torch._export.converter import TS2EPConverter

    script = loaded.module
    assert isinstance(script, torch.jit.ScriptModule)
    _set_mode(script, options.mode)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = TS2EPConverter(script, sample.args, sample.kwargs or None).convert()
    except Exception as exc:
        hint = "export the model with torch.export (.pt2) or save a state_dict and pass `arch`"
        if options.mode is not Mode.EVAL:
            # The converter takes modules in training mode through their `if self.training`
            # branches, which it cannot translate for BatchNorm.
            hint = f"pass `mode` eval (the converter fails on {options.mode} branches), or " + hint
        raise ProbeError(
            f"the TorchScript archive could not be converted into a graph the probe can instrument "
            f"in `mode` {options.mode}: {first_line(exc)}",
            hint=hint,
        ) from exc
    _restore_parameters(program_module := program.module(), {n for n, _ in script.named_parameters()})
    notes.append(
        "TorchScript was converted to an exported program to instrument it: activation rows "
        "are named by function, since scripted module boundaries are not kept"
    )
    # Read by the graph plan for the rows' type names (the converted graph knows only ops).
    object.__setattr__(
        program_module, "gradcheck_module_types", {path: type_name(sub) for path, sub in script.named_modules() if path}
    )
    return program_module


def _restore_parameters(gm: nn.Module, names: set[str]) -> None:
    """The converter lifts every tensor as a buffer; parameters must be parameters again to get
    gradients (and to be reported as the rows' weights)."""
    from torch import nn

    for name in sorted(names):
        owner_path, _, leaf = name.rpartition(".")
        try:
            owner = gm.get_submodule(owner_path) if owner_path else gm
        except AttributeError:
            continue
        tensor = owner._buffers.pop(leaf, None)
        if tensor is not None:
            owner.register_parameter(leaf, nn.Parameter(tensor.detach().clone(), requires_grad=True))


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for one micro-batch, then one young-generation pass.

    A probe allocates thousands of small Python objects per micro-batch (rows, hooks, scalar
    tensors), which would trigger about ten automatic collections, and every tenth of those a
    full one: with the 300k objects torch and a model leave on the heap, a full collection took
    150 ms, 5% of a ResNet-50 step (BENCHMARKS.md). Objects freed by reference counting never
    needed the collector; one pass at the end frees any cycles the micro-batch made, so memory
    stays bounded batch by batch, and the caller's setting is restored.
    """
    import gc

    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
            gc.collect(0)


def _set_mode(module: nn.Module, mode: Mode) -> None:
    """Train or eval throughout; for batch-stats, eval except the BatchNorms (InstanceNorm with
    running statistics too: the same base class), which normalise with the batch's statistics.
    Scripted submodules are recognised by their original class name."""
    from torch.nn.modules.batchnorm import _NormBase

    module.train(mode is Mode.TRAIN)
    if mode is Mode.BATCH_STATS:
        for m in module.modules():
            if isinstance(m, _NormBase) or type_name(m) in _SCRIPTED_NORMS:
                m.train(True)


_SCRIPTED_NORMS = frozenset(
    f"{kind}Norm{dims}d" for kind in ("Batch", "Instance", "LazyBatch", "LazyInstance") for dims in (1, 2, 3)
) | {"SyncBatchNorm"}


@contextlib.contextmanager
def _probe_state(module: nn.Module, mode: Mode, set_mode: bool, seed: int) -> Iterator[None]:
    import torch

    was_training = {m: m.training for m in module.modules()}
    params = [p for p in module.parameters() if p.dtype.is_floating_point or p.dtype.is_complex]
    saved_requires = [p.requires_grad for p in params]
    saved_grads = [p.grad for p in params]
    saved_buffers = {name: b.detach().clone() for name, b in module.named_buffers()} if mode.batch_statistics else {}
    try:
        for p in params:
            p.grad = None
            p.requires_grad_(True)
        if set_mode:
            _set_mode(module, mode)
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            torch.manual_seed(seed)
            yield
    finally:
        for p, requires, grad in zip(params, saved_requires, saved_grads, strict=True):
            p.requires_grad_(requires)
            p.grad = grad
        if set_mode:
            for m, training in was_training.items():
                m.training = training
        if saved_buffers:
            with torch.no_grad():
                for name, buffer in module.named_buffers():
                    if name in saved_buffers:
                        buffer.copy_(saved_buffers[name])


def _forward(
    instrument: EagerInstrument | GraphInstrument, args: tuple[Any, ...], kwargs: dict[str, Any], inputs: ProbeInputs
) -> Any:
    try:
        return instrument.forward(args, {**kwargs, **inputs.constants})
    except GradcheckError:
        raise
    except Exception as exc:
        where = instrument.failing_layer()
        shapes = ", ".join(f"{s.name} {tuple(s.shape)} {s.dtype}" for s in inputs.specs)
        place = f" in {where}" if where else ""
        raise ProbeError(
            f"the forward pass failed{place}: {first_line(exc)}",
            hint=f"check the probe inputs ({shapes}); set them with `input_shape`, `input_dtype` or `input`",
        ) from exc


def parameter_gradients(
    row_params: Mapping[str, Sequence[torch.Tensor]],
    reducer: GradientReducer | None = None,
    ranks: Ranks | None = None,
) -> tuple[dict[str, tuple[float | None, float]], dict[str, int]]:
    """(grad norm, weight norm) per row, from the sums of squares the reducer took as gradients
    arrived (without one: from each parameter's ``.grad``); computed on device and fetched in one
    transfer (summed over the ranks' shards)."""
    import torch

    names = list(row_params)
    if not names:
        return {}, {}
    with torch.no_grad():
        stacked = []
        for name in names:
            tensors = row_params[name]
            zero = torch.zeros((), dtype=torch.float64, device=local_tensor(tensors[0]).device)
            weight_sq = sum((sum_of_squares(local_tensor(p.detach())) if p.numel() else zero for p in tensors), zero)
            grads = (
                [g for g in (reducer.gradient_sum_squares(p) for p in tensors) if g is not None]
                if reducer is not None
                else [sum_of_squares(p.grad) for p in tensors if p.grad is not None]
            )
            grad_sq = sum((g.to(zero.device) for g in grads), zero)
            has_grad = torch.tensor(1.0 if grads else 0.0, dtype=torch.float64, device=zero.device)
            stacked.append(torch.stack([grad_sq, weight_sq, has_grad]))
        table = torch.stack([s.cpu() for s in stacked])
        counts_local = torch.tensor(
            [float(sum(local_tensor(p).numel() for p in row_params[name])) for name in names], dtype=torch.float64
        )
        if ranks is not None:
            table = sum_across(table, ranks)
            counts_local = sum_across(counts_local, ranks)
        values = table.tolist()
    result: dict[str, tuple[float | None, float]] = {}
    counts: dict[str, int] = {}
    for name, (grad_sq, weight_sq, has_grad), count in zip(names, values, counts_local.tolist(), strict=True):
        result[name] = (math.sqrt(grad_sq) if has_grad else None, math.sqrt(weight_sq))
        counts[name] = int(count)
    return result, counts


def through_time_records(unrollers: Mapping[str, RecurrentUnroller]) -> dict[str, ThroughTime]:
    """Finished through-time records, keyed by the row name of each recurrent module."""
    import torch

    out: dict[str, ThroughTime] = {}
    for path, unroller in unrollers.items():
        trace = unroller.trace
        if not trace.directions and trace.declined is None:
            continue  # the module never ran
        directions = []
        for record in trace.directions:
            sums = torch.stack(record.grad_sumsq).cpu().tolist() if record.grad_sumsq else []
            norms = tuple(math.sqrt(v) for v in sums) + (0.0,) * (record.steps - len(sums))
            # Steps back from the last processed step: the end of time going forward, t = 0 in reverse.
            backwards = list(reversed(norms)) if record.direction == "forward" else list(norms)
            rate, horizon = fit_decay(backwards)
            gates = {
                name: GateStats(
                    saturation=record.gate_saturated[name] / record.gate_count[name],
                    mean=record.gate_sum[name] / record.gate_count[name],
                )
                for name in record.gate_count
                if record.gate_count[name]
            }
            directions.append(
                DirectionTrace(
                    layer=record.layer,
                    direction=record.direction,
                    steps=record.steps,
                    grad_norms=norms,
                    decay_rate=rate,
                    horizon=horizon,
                    spectral_radius=spectral_radii(
                        unroller.module, trace.kind, record.layer, record.direction == "reverse"
                    ),
                    gates=gates,
                )
            )
        ok = trace.declined is None
        out[path or "<root>"] = ThroughTime(
            ok=ok,
            reason=trace.declined,
            max_abs_error=trace.max_abs_error if trace.directions else None,
            tolerance=trace.tolerance or None,
            horizon_fraction=HORIZON_FRACTION,
            directions=tuple(directions) if ok else (),
        )
    return out


_CELL_KINDS = {"RNNCell": "RNN", "LSTMCell": "LSTM", "GRUCell": "GRU"}


def cell_loop_traces(layers: list[LayerStats], model: nn.Module) -> list[LayerStats]:
    """A cell called once per step (an RNNCell/LSTMCell/GRUCell loop) is a row per call, and each
    call's |dL/dy| is already dL/dh_t (through the output and through time): gather them into the
    first call's ``through_time``, as the fused layers get."""
    import dataclasses

    calls: dict[str, list[LayerStats]] = {}
    for row in layers:
        if row.type in _CELL_KINDS:
            calls.setdefault(row.name.split("#", 1)[0], []).append(row)
    replaced: dict[str, ThroughTime] = {}
    for rows in calls.values():
        if len(rows) < 2:
            continue
        norms = tuple(r.output_grad_norm or 0.0 for r in rows)
        rate, horizon = fit_decay(list(reversed(norms)))
        try:
            cell = model.get_submodule(rows[0].module)
            radius = spectral_radii_of(cell.weight_hh, _CELL_KINDS[rows[0].type])  # type: ignore[arg-type]
        except AttributeError:
            radius = {}
        replaced[rows[0].name] = ThroughTime(
            ok=True,
            reason=None,
            max_abs_error=None,
            tolerance=None,
            horizon_fraction=HORIZON_FRACTION,
            directions=(
                DirectionTrace(
                    layer=0,
                    direction="forward",
                    steps=len(rows),
                    grad_norms=norms,
                    decay_rate=rate,
                    horizon=horizon,
                    spectral_radius=radius,
                    gates={},
                ),
            ),
        )
    return [
        dataclasses.replace(row, through_time=replaced[row.name]) if row.name in replaced else row for row in layers
    ]
