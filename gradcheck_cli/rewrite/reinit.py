"""``reinit``: re-initialise a saved model's layers and probe it before and after. Never prints.

    from gradcheck_cli.rewrite.reinit import reinit
    from gradcheck_cli.options import ReinitOptions
    report = reinit(Path("model.pt"), out=Path("fresh.pt"), options=ReinitOptions(scheme=Scheme.AUTO))

The rewrite is unsafe by nature (it discards trained weights): the input is never modified, an
existing output is refused without ``force``, and the file is written atomically.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from gradcheck_cli.errors import UsageError
from gradcheck_cli.fsutil import check_writable_output
from gradcheck_cli.model.formats import ModelFormat, detect_format
from gradcheck_cli.options import LoadOptions, ProbeOptions, ReinitOptions, Scheme, WriteOptions
from gradcheck_cli.records import LayerStats
from gradcheck_cli.rewrite.fold_records import Verification
from gradcheck_cli.rewrite.output import WrittenFormat, written_format
from gradcheck_cli.rewrite.reinit_options import validate
from gradcheck_cli.rewrite.reinit_records import ReinitReport

if TYPE_CHECKING:
    from torch import nn

    from gradcheck_cli.model.handle import LoadedModel
    from gradcheck_cli.probe.batch import ProbeInputs

UNSAFE_NOTE = (
    "reinit is an unsafe rewrite: it discards the trained values of every re-initialised "
    "layer; the input file was not modified"
)


def reinit(
    path: Path,
    *,
    out: Path | None,
    options: ReinitOptions | None = None,
    load: LoadOptions | None = None,
    probe: ProbeOptions | None = None,
    write: WriteOptions | None = None,
    compare: bool = True,
) -> ReinitReport:
    """Re-initialise ``path`` into ``out``; with ``compare``, probe before and after.

    The written format is ``write.to``, or what ``out``'s extension says (see
    :func:`gradcheck_cli.rewrite.output.written_format`). The written file is loaded back and run
    against the re-initialised model at two batch sizes where the model allows it before it is
    kept. ``dry_run`` computes everything (and the after-probe, on the model in memory) but writes
    nothing; ``out`` may then be None. None options mean the defaults (``auto``, the probe's own).
    """
    options = options or ReinitOptions()
    probe = probe or ProbeOptions()
    write = write or WriteOptions()
    dry_run = write.dry_run
    validate(options)
    fmt = detect_format(path)
    if not dry_run:
        if out is None:
            raise UsageError("reinit needs an output file", hint="pass `output`, or `dry_run` to only look")
        check_writable_output(out, force=write.force, source=path)
    written_as = written_format(out, write.to, input_format=fmt)
    if fmt is ModelFormat.ONNX:
        return _reinit_onnx(path, out=out, options=options, probe=probe, dry_run=dry_run, compare=compare)
    return _reinit_torch(
        path,
        fmt,
        out=out,
        written_as=written_as,
        options=options,
        load=load,
        probe=probe,
        dry_run=dry_run,
        compare=compare,
    )


def _reinit_torch(
    path: Path,
    fmt: ModelFormat,
    *,
    out: Path | None,
    written_as: WrittenFormat,
    options: ReinitOptions,
    load: LoadOptions | None,
    probe: ProbeOptions,
    dry_run: bool,
    compare: bool,
) -> ReinitReport:
    from gradcheck_cli.model.load import load_model
    from gradcheck_cli.model.torch_load import resolve_device
    from gradcheck_cli.probe.batch import probe_inputs
    from gradcheck_cli.rewrite.torch_reinit import reinit_module
    from gradcheck_cli.rewrite.written import check_writable_as

    load_options = load or LoadOptions()
    loaded = load_model(path, load_options, device=probe.device)
    check_writable_as(loaded, written_as, None if dry_run else out)
    inputs = probe_inputs(
        loaded.module,
        probe.inputs,
        device=resolve_device(probe.device),
        example_args=loaded.example_args,
        example_kwargs=loaded.example_kwargs,
    )
    # The probe's own micro-batches drive tracing and LSUV, so both see exactly what the report shows.
    probe = _with_known_shapes(loaded, probe, inputs)
    before = _probe(loaded, probe) if compare else None
    result = reinit_module(loaded.module, inputs.batches, options=options)
    notes = [UNSAFE_NOTE, *loaded.notes, *result.notes]
    written = False
    after: tuple[LayerStats, ...] | None = None
    verification: Verification | None = None
    if not dry_run:
        assert out is not None
        verification, reloaded, written_notes = _write_verified(
            loaded, result.module, out, written_as, inputs, load_options, probe.device
        )
        notes += written_notes
        written = True
        if compare:
            if reloaded is not None:  # probe the file as written: it proves the output loads and runs
                after = _probe(reloaded, probe)
            else:  # ONNX written from PyTorch: the probe stays in torch, so the rows compare
                after = _probe(_in_memory(loaded, result.module), probe)
                notes.append(
                    "the after-probe ran on the re-initialised model in torch; the written ONNX file was "
                    "checked against it"
                )
    elif compare:
        after = _probe(_in_memory(loaded, result.module), probe)
    if not result.layers:
        notes.append("no layer was re-initialised" + (" (check `layers`)" if options.layers else ""))
    return ReinitReport(
        model=str(path),
        format=str(fmt),
        output=None if out is None else str(out),
        written=written,
        scheme=str(options.scheme),
        seed=options.seed,
        layers=tuple(result.layers),
        changes=tuple(result.changes),
        before=before,
        after=after,
        notes=tuple(dict.fromkeys(notes)),
        output_format=str(written_as.format),
        verification=verification,
    )


def _in_memory(loaded: LoadedModel, module: nn.Module) -> LoadedModel:
    in_memory = copy.copy(loaded)
    in_memory.module = module
    return in_memory


def _write_verified(
    loaded: LoadedModel,
    module: nn.Module,
    out: Path,
    written_as: WrittenFormat,
    inputs: ProbeInputs,
    load_options: LoadOptions,
    device: str,
) -> tuple[Verification, LoadedModel | None, list[str]]:
    """Write ``module`` to ``out``, checked against itself in memory at two batch sizes.

    Re-initialised weights leave nothing to compare with the input, but the file must still be
    the model the report describes, and deployable at the batch sizes the input took: a file that
    does not reproduce the in-memory model is a bug, refused with nothing written.
    """
    from gradcheck_cli.errors import VerificationError
    from gradcheck_cli.rewrite.verify import plan_for
    from gradcheck_cli.rewrite.written import write_onnx_verified, write_torch_verified

    # One probe batch is enough to tell a faithful file from a wrong one; the second size is the
    # deployability check.
    plan = plan_for(loaded, inputs.batches[:1], reference=module)
    if written_as.format is ModelFormat.ONNX:
        written = write_onnx_verified(loaded, module, out, plan, against="the re-initialised model")
    else:
        arch_kwargs = dict(load_options.arch_kwargs) if load_options.arch_kwargs else None
        written = write_torch_verified(
            loaded,
            module,
            out,
            written_as,
            plan,
            arch_kwargs=arch_kwargs,
            device=device,
            what="the re-initialised model",
        )
    if written.path is None:
        worst = max(written.verification.outputs, key=lambda check: check.max_rel_error)
        raise VerificationError(
            f"the written file does not reproduce the re-initialised model (output '{worst.name}' is off by "
            f"{worst.max_rel_error:.3g} of its scale); nothing was written",
            hint="this is a bug in gradcheck; please report it with the model",
        )
    return written.verification, written.reloaded, written.notes


def _with_known_shapes(loaded: LoadedModel, probe: ProbeOptions, inputs: ProbeInputs) -> ProbeOptions:
    """``probe`` with the input shapes written in, where that rebuilds exactly ``inputs``.

    Without shapes, every probe infers them again with a trial forward pass; reinit probes twice
    (before and after) on top of building ``inputs`` itself. Synthesised inputs depend only on the
    shapes, the dtype and the seed, so the shapes found once reproduce the very same tensors; that
    is checked here (building synthesised inputs runs no model), and anything else keeps ``probe``.
    """
    from dataclasses import replace

    import torch

    from gradcheck_cli.model.torch_load import resolve_device
    from gradcheck_cli.probe.batch import probe_inputs

    options = probe.inputs
    if (
        options.input is not None
        or options.input_shape
        or loaded.example_args is not None
        or loaded.example_kwargs is not None
        or any(batch.kwargs for batch in inputs.batches)
    ):
        return probe
    first = inputs.batches[0]
    shapes = tuple(tuple(int(d) for d in arg.shape) for arg in first.args)
    known = replace(probe, inputs=replace(options, input_shape=shapes, batch_size=None))
    again = probe_inputs(loaded.module, known.inputs, device=resolve_device(probe.device))
    same = (
        again.specs == inputs.specs
        and again.batch_size == inputs.batch_size
        and again.model_loss == inputs.model_loss
        and len(again.batches) == len(inputs.batches)
        and all(
            len(a.args) == len(b.args)
            and not a.kwargs
            and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a.args, b.args, strict=True))
            for a, b in zip(again.batches, inputs.batches, strict=True)
        )
    )
    return known if same else probe


def _probe(loaded: LoadedModel, probe: ProbeOptions) -> tuple[LayerStats, ...]:
    from gradcheck_cli.probe.entry import inspect_loaded as inspect_model

    return inspect_model(loaded, probe).layers


def _reinit_onnx(
    path: Path, *, out: Path | None, options: ReinitOptions, probe: ProbeOptions, dry_run: bool, compare: bool
) -> ReinitReport:
    from gradcheck_cli.model.onnx_load import onnx_model_from_path, onnx_model_to_path
    from gradcheck_cli.rewrite.onnx_reinit import reinit_onnx_model

    if options.scheme is Scheme.LSUV:
        raise UsageError(
            "`scheme` lsuv is not available for ONNX models in this version: it needs each "
            "layer's output on the probe batch",
            hint="run it on the PyTorch model and export again, or use `scheme` orthogonal",
        )
    model = onnx_model_from_path(path)
    result = reinit_onnx_model(model, options=options)
    notes = [UNSAFE_NOTE, *result.notes]
    before = after = None
    if compare:
        before = _probe_onnx(path, probe, notes)
    written = False
    if not dry_run:
        assert out is not None
        onnx_model_to_path(result.model, out)
        written = True
        if before is not None:  # probe the file as written: it proves the output loads and runs
            after = _probe_onnx(out, probe, notes)
    elif before is not None:
        with tempfile.TemporaryDirectory(prefix="gradcheck-reinit-") as scratch:
            staged = Path(scratch) / "reinit.onnx"
            onnx_model_to_path(result.model, staged)
            after = _probe_onnx(staged, probe, notes)
    return ReinitReport(
        model=str(path),
        format=str(ModelFormat.ONNX),
        output=None if out is None else str(out),
        written=written,
        scheme=str(options.scheme),
        seed=options.seed,
        layers=tuple(result.layers),
        changes=tuple(result.changes),
        before=before,
        after=after,
        notes=tuple(dict.fromkeys(notes)),
        output_format=str(ModelFormat.ONNX),
    )


def _probe_onnx(path: Path, probe: ProbeOptions, notes: list[str]) -> tuple[LayerStats, ...] | None:
    """The ONNX probe's rows; a probe failure costs the comparison, not the rewrite (it is noted)."""
    from gradcheck_cli.errors import GradcheckError
    from gradcheck_cli.probe.entry import inspect_onnx

    try:
        return inspect_onnx(path, probe=probe, allow_nonfinite=True).layers
    except GradcheckError as exc:
        notes.append(f"the before/after probe was skipped: {exc.message}")
        return None


__all__ = ["UNSAFE_NOTE", "ReinitOptions", "ReinitReport", "reinit"]
