"""``fold_batchnorm``: the library entry point behind ``gradcheck fold-bn``. Never prints.

Order of work, so that nothing reaches the output path unless it is verified:

1. refuse an existing output (unless ``force``) or the input itself, before any expensive work;
2. load, build the probe batch, fold a deep copy;
3. write the result to a temporary file in the output's directory, *load that file back* and run
   it against the original on the probe batch (what is verified is what is written);
4. above tolerance: delete the temporary file and report ``written=None``; otherwise rename it
   onto the output path.

``dry_run`` folds and verifies in memory and writes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradcheck_cli.errors import GradcheckError, UsageError
from gradcheck_cli.fsutil import check_writable_output
from gradcheck_cli.model.formats import ModelFormat, detect_format
from gradcheck_cli.options import FoldOptions, InputOptions, LoadOptions, ProbeOptions, WriteOptions
from gradcheck_cli.rewrite.fold_records import Counts, FoldReport, Latency
from gradcheck_cli.rewrite.output import WrittenFormat, written_format

if TYPE_CHECKING:
    import onnx
    from torch import nn

    from gradcheck_cli.probe.batch import ProbeBatch


# Samples per verification batch when the user gives no `batch_size` (see _verification_inputs).
# Two rather than one: the smallest batch in which samples could be mixed up by a wrong fold.
VERIFY_BATCH_SIZE = 2


def fold_batchnorm(
    path: Path,
    *,
    out: Path | None,
    options: FoldOptions | None = None,
    load: LoadOptions | None = None,
    probe: ProbeOptions | None = None,
    write: WriteOptions | None = None,
) -> FoldReport:
    """Fold every exactly foldable BatchNorm of the model at ``path`` into ``out`` (verified).

    The written format is ``write.to``, or what ``out``'s extension says (see
    :func:`gradcheck_cli.rewrite.output.written_format`); a dry run without ``out`` keeps the
    input's format. Returns the report; ``report.written`` is None when nothing was written (dry
    run, or a verification above tolerance: check ``report.verification.passed``).
    """
    fold = options or FoldOptions()
    load = load or LoadOptions()
    probe = probe or ProbeOptions()
    write = write or WriteOptions()
    dry_run = write.dry_run
    if out is None and not dry_run:
        raise UsageError("no output path given", hint="pass `output`, or `dry_run` to only report")
    if out is not None and not dry_run:
        check_writable_output(out, force=write.force, source=path)
    fmt = detect_format(path)
    written_as = written_format(out, write.to, input_format=fmt)
    if fmt is ModelFormat.ONNX:
        return _fold_onnx(
            path,
            out=None if dry_run else out,
            affine_standalone=fold.affine_standalone,
            options=probe.inputs,
            benchmark_runs=fold.benchmark,
        )
    return _fold_torch(
        path,
        out=None if dry_run else out,
        written_as=written_as,
        affine_standalone=fold.affine_standalone,
        arch=load.arch,
        arch_kwargs=dict(load.arch_kwargs) if load.arch_kwargs is not None else None,
        strict=not load.non_strict,
        trust_pickle=load.trust_pickle,
        device=probe.device,
        options=probe.inputs,
        benchmark_runs=fold.benchmark,
    )


# --------------------------------------------------------------------------------------------
# ONNX


def _fold_onnx(
    path: Path,
    *,
    out: Path | None,
    affine_standalone: bool,
    options: InputOptions,
    benchmark_runs: int,
) -> FoldReport:
    from gradcheck_cli.model.dynamic import onnx_batch_is_dynamic
    from gradcheck_cli.model.onnx_load import (
        check_onnx_model,
        onnx_model_and_bytes,
        onnx_model_to_path,
        serialized_or_none,
    )
    from gradcheck_cli.onnx.plan import plan_rows
    from gradcheck_cli.parameters import onnx_parameter_count
    from gradcheck_cli.rewrite import onnx_fold
    from gradcheck_cli.rewrite.verify import onnx_probe_feeds, verify_onnx

    # Each model is serialised at most once: the original's file bytes go to onnxruntime as
    # they are, the folded model's bytes to the checker, onnxruntime and the writer alike.
    model, original_bytes = onnx_model_and_bytes(path)
    had_external_data = original_bytes is None
    feeds = onnx_probe_feeds(model, _verification_inputs(options, fixed_batch=False))
    result = onnx_fold.fold_onnx_model(model, affine_standalone=affine_standalone)
    folded_bytes = None if had_external_data else serialized_or_none(result.model)
    problem = check_onnx_model(result.model if folded_bytes is None else folded_bytes)
    if problem is not None:
        raise GradcheckError(
            f"the folded graph fails onnx.checker: {problem}",
            hint="this is a bug in gradcheck; please report it with the model",
        )
    notes = list(result.notes)
    verification = verify_onnx(
        model if original_bytes is None else original_bytes,
        result.model if folded_bytes is None else folded_bytes,
        feeds,
        batch_dynamic=onnx_batch_is_dynamic(model),
        notes=notes,
    )
    written = None
    if out is not None and verification.passed:
        onnx_model_to_path(
            result.model,
            out,
            external_data=True if had_external_data else None,
            serialized=folded_bytes,
        )
        written = str(out)
    latency: tuple[Latency, ...] = ()
    if benchmark_runs > 0:
        latency = (_onnx_latency(model, result.model, feeds[0], benchmark_runs),)
    before = Counts(
        onnx_parameter_count(plan_rows(model.graph)),
        onnx_fold.count_batchnorms(model),
        onnx_fold.count_nodes(model),
    )
    after = Counts(
        onnx_parameter_count(plan_rows(result.model.graph)),
        result.batchnorms_after,
        onnx_fold.count_nodes(result.model),
    )
    return FoldReport(
        model=str(path),
        input_format=str(ModelFormat.ONNX),
        output_format=str(ModelFormat.ONNX),
        method=onnx_fold.METHOD_ONNX,
        entries=tuple(result.entries),
        before=before,
        after=after,
        verification=verification,
        written=written,
        latency=latency,
        notes=tuple(notes),
    )


def _onnx_latency(original: onnx.ModelProto, folded: onnx.ModelProto, feed: dict[str, Any], runs: int) -> Latency:
    from gradcheck_cli.rewrite.verify import median_ms

    # Latency is measured with onnxruntime's default optimisations, as deployed; only the
    # verification disables them.
    before_session = _default_ort_session(original)
    after_session = _default_ort_session(folded)
    before = median_ms(lambda: before_session.run(None, feed), runs=runs)
    after = median_ms(lambda: after_session.run(None, feed), runs=runs)
    return Latency("onnxruntime", runs, before, after)


def _default_ort_session(model: onnx.ModelProto) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------------------------
# PyTorch


def _fold_torch(
    path: Path,
    *,
    out: Path | None,
    written_as: WrittenFormat,
    affine_standalone: bool,
    arch: str | None,
    arch_kwargs: dict[str, Any] | None,
    strict: bool,
    trust_pickle: bool,
    device: str,
    options: InputOptions,
    benchmark_runs: int,
) -> FoldReport:
    from gradcheck_cli.model.torch_load import model_from_path
    from gradcheck_cli.parameters import module_parameter_count
    from gradcheck_cli.probe.batch import probe_inputs
    from gradcheck_cli.rewrite.torch_fold import fold_torch_module
    from gradcheck_cli.rewrite.verify import BACKEND_TORCH, plan_for, verify_torch_plan
    from gradcheck_cli.rewrite.written import check_writable_as, write_onnx_verified, write_torch_verified

    loaded = model_from_path(
        path,
        arch=arch,
        arch_kwargs=arch_kwargs,
        strict=strict,
        trust_pickle=trust_pickle,
        device=device,
    )
    target = written_as.format
    keep_structure = check_writable_as(loaded, written_as, out)
    import torch

    probe = probe_inputs(
        loaded.module,
        _verification_inputs(options, fixed_batch=loaded.example_args is not None or loaded.example_kwargs is not None),
        device=torch.device(device),
        example_args=loaded.example_args,
        example_kwargs=loaded.example_kwargs,
    )
    first = probe.batches[0]
    result = fold_torch_module(
        loaded.module,
        example_args=first.args,
        example_kwargs=first.kwargs,
        keep_structure=keep_structure,
        affine_standalone=affine_standalone,
    )
    plan = plan_for(loaded, probe.batches)
    notes = list(loaded.notes) + result.notes
    written: str | None = None
    if target is ModelFormat.ONNX:
        onnx_written = write_onnx_verified(loaded, result.module, out, plan)
        verification, written, written_notes = onnx_written.verification, onnx_written.path, onnx_written.notes
    elif out is None:
        verification = verify_torch_plan(result.module, plan, backend=BACKEND_TORCH, what="the folded model")
        written_notes = plan.notes
    else:
        torch_written = write_torch_verified(
            loaded,
            result.module,
            out,
            written_as,
            plan,
            arch_kwargs=arch_kwargs,
            device=device,
            what="the folded model",
        )
        verification, written, written_notes = torch_written.verification, torch_written.path, torch_written.notes
    notes += written_notes
    latency: tuple[Latency, ...] = ()
    if benchmark_runs > 0:
        latency = (_torch_latency(loaded.module, result.module, first, benchmark_runs),)
    before = Counts(module_parameter_count(loaded.module), result.batchnorms_before, result.nodes_before)
    after = Counts(module_parameter_count(result.module), result.batchnorms_after, result.nodes_after)
    return FoldReport(
        model=str(path),
        input_format=str(loaded.format),
        output_format=str(target),
        method=result.method,
        entries=tuple(result.entries),
        before=before,
        after=after,
        verification=verification,
        written=written,
        latency=latency,
        notes=tuple(dict.fromkeys(notes)),
    )


def _verification_inputs(options: InputOptions, *, fixed_batch: bool) -> InputOptions:
    """The inputs with fold-bn's own default batch size where the user chose none.

    Verification needs every channel of every layer exercised, not many samples: a wrong fold
    (wrong axis, lost shift, padding seen through a shift) moves every sample's outputs alike.
    :data:`VERIFY_BATCH_SIZE` samples instead of the probe's 8 make the two or three forward passes
    of verification 4x cheaper. Left alone: an explicit `batch_size`, an `input` file (all its
    samples are used), `input_shape` (its batch dimension is the user's), and a model's own
    example inputs (``fixed_batch``; an exported program may only accept that batch size).
    """
    from dataclasses import replace

    if options.batch_size is not None or options.input is not None or options.input_shape or fixed_batch:
        return options
    return replace(options, batch_size=VERIFY_BATCH_SIZE)


def _torch_latency(original: nn.Module, folded: nn.Module, batch: ProbeBatch, runs: int) -> Latency:
    import torch

    from gradcheck_cli.rewrite.torch_fold import set_eval
    from gradcheck_cli.rewrite.verify import median_ms

    def timed(module: nn.Module) -> float:
        was_training = module.training
        set_eval(module)
        try:
            with torch.inference_mode():
                return median_ms(lambda: module(*batch.args, **batch.kwargs), runs=runs)
        finally:
            set_eval(module, was_training)

    return Latency("torch eager", runs, timed(original), timed(folded))
