"""``gradcheck inspect``: probe a model and print the per-layer report."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from gradcheck_cli.cli import options as opt
from gradcheck_cli.cli.common import EXIT_OK, fail, parse_range, user_errors, write_text
from gradcheck_cli.probe.options import DEFAULT_SATURATION_CUTOFF, LossKind, Mode, ProbeOptions


class ReportFormat(str, Enum):
    TABLE = "table"
    JSON = "json"


def build_probe_options(
    *, device: str, input_file: Path | None, input_shape: list[str] | None, input_dtype: str | None,
    input_range: str | None, batch_size: int | None, batches: int, seed: int, loss: LossKind,
    target: Path | None, mode: Mode, model_output: str | None, saturation_cutoff: float,
    histograms: bool = False, seq_len: int | None = None, memory_budget: str | None = None,
    activation_checkpointing: bool = False,
) -> ProbeOptions:
    from gradcheck_cli.probe.batch import InputOptions, parse_shape
    from gradcheck_cli.probe.budget import parse_memory_budget

    if not 0 < saturation_cutoff < 1:
        raise fail(f"--saturation-cutoff {saturation_cutoff} must be between 0 and 1",
                   "e.g. 0.01: saturated means a derivative below 1% of its maximum")
    inputs = InputOptions(
        input_file=input_file, input_shapes=tuple(parse_shape(s) for s in input_shape or ()),
        input_dtype=input_dtype, input_range=parse_range(input_range), batch_size=batch_size,
        batches=batches, seed=seed, seq_len=seq_len)
    return ProbeOptions(inputs=inputs, loss=loss, target_file=target, mode=mode, device=device,
                        output=model_output, saturation_cutoff=saturation_cutoff, histograms=histograms,
                        memory_budget=parse_memory_budget(memory_budget) if memory_budget else None,
                        activation_checkpointing=activation_checkpointing)


def inspect(
    model: opt.ModelArg,
    arch: opt.Arch = None,
    arch_kwargs: opt.ArchKwargs = None,
    non_strict: opt.NonStrict = False,
    trust_pickle: opt.TrustPickle = False,
    device: opt.Device = "cpu",
    input_file: opt.InputFile = None,
    input_shape: opt.InputShape = None,
    input_dtype: opt.InputDtype = None,
    input_range: opt.InputRange = None,
    batch_size: opt.BatchSize = None,
    batches: opt.Batches = 1,
    seed: opt.Seed = 0,
    loss: Annotated[LossKind, typer.Option(
        "--loss", help="Scalar to differentiate: auto = cross_entropy for (N, C) logits against seeded "
        "random labels, else mse against a seeded N(0,1) target.", rich_help_panel="Probe")] = LossKind.AUTO,
    target: Annotated[Path | None, typer.Option(
        "--target", help="Real targets (labels or tensors) for the loss, one per probe sample.",
        rich_help_panel="Probe")] = None,
    mode: Annotated[Mode, typer.Option(
        "--mode", help="eval (default: exact micro-batching, no dropout noise, BatchNorm running stats as "
        "deployed) or train (batch statistics and dropout, as training sees them).",
        rich_help_panel="Probe")] = Mode.EVAL,
    model_output: Annotated[str | None, typer.Option(
        "--model-output", help="Which output the loss uses when the model returns several: an index or "
        "a key (default: 'logits' if present, else the first tensor).", rich_help_panel="Probe")] = None,
    saturation_cutoff: Annotated[float, typer.Option(
        "--saturation-cutoff", help="Saturated = local derivative below this fraction of its maximum.",
        rich_help_panel="Probe")] = DEFAULT_SATURATION_CUTOFF,
    memory_budget: Annotated[str | None, typer.Option(
        "--memory-budget", help="Keep the probe within this much memory (e.g. 4GiB): a batch estimated to "
        "need more runs in micro-batches that fit (statistics merge exactly).", rich_help_panel="Probe")] = None,
    seq_len: Annotated[int | None, typer.Option(
        "--seq-len", min=1, help="Sequence length of synthesised token inputs (transformers models; default 16).",
        rich_help_panel="Probe")] = None,
    activation_checkpointing: Annotated[bool, typer.Option(
        "--activation-checkpointing", help="transformers models: recompute each block's activations during "
        "backward (the model's own gradient checkpointing) instead of keeping them, for long sequences.",
        rich_help_panel="Probe")] = False,
    histograms: Annotated[bool, typer.Option(
        "--histograms", help="Add fixed-bin histograms of every row's output and output gradient to the JSON.",
        rich_help_panel="Probe")] = False,
    allow_nonfinite: Annotated[bool, typer.Option(
        "--allow-nonfinite", help="Probe a model whose weights hold NaN/Inf instead of refusing it.",
        rich_help_panel="Loading")] = False,
    report_format: Annotated[ReportFormat, typer.Option(
        "--format", "-f", help="What to print on stdout.")] = ReportFormat.TABLE,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Also write the JSON report to this file.")] = None,
    plot: opt.PlotFile = None,
    html: opt.HtmlFile = None,
    debug: opt.Debug = False,
) -> None:
    """Probe a model forward and backward and report every layer: activation statistics, dead ReLU
    units, saturated sigmoid/tanh outputs and gradient norms."""
    from gradcheck_cli import api
    from gradcheck_cli.cli.visual import check_visual_outputs, write_visual_outputs
    from gradcheck_cli.model.arch import parse_arch_kwargs
    from gradcheck_cli.render.console import make_console, progress_on_stderr
    from gradcheck_cli.render.json_report import render_json
    from gradcheck_cli.render.table import render_inspect
    from gradcheck_cli.rules import with_findings

    with user_errors(debug):
        check_visual_outputs(plot=plot, html=html)
        probe = build_probe_options(
            device=device, input_file=input_file, input_shape=input_shape, input_dtype=input_dtype,
            input_range=input_range, batch_size=batch_size, batches=batches, seed=seed, loss=loss,
            target=target, mode=mode, model_output=model_output, saturation_cutoff=saturation_cutoff,
            histograms=histograms or html is not None, seq_len=seq_len, memory_budget=memory_budget,
            activation_checkpointing=activation_checkpointing)
        load = api.LoadOptions(arch=arch, arch_kwargs=parse_arch_kwargs(arch_kwargs), strict=not non_strict,
                               trust_pickle=trust_pickle, allow_nonfinite=allow_nonfinite)
        from gradcheck_cli.probe.distributed import is_rank_zero

        with progress_on_stderr(f"probing {model.name}") as progress:
            report = api.inspect(model, load_options=load, probe=probe, progress=progress)
        if not is_rank_zero():
            raise typer.Exit(EXIT_OK)  # under torchrun, rank 0 alone writes the merged report
        report = with_findings(report)
        if output is not None:
            write_text(render_json(report), output)
        write_visual_outputs(report, plot=plot, html=html)
        if report_format is ReportFormat.JSON:
            write_text(render_json(report), None)
        else:
            render_inspect(report, make_console())
    raise typer.Exit(EXIT_OK)
