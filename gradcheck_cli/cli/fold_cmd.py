"""``gradcheck fold-bn``: fold BatchNorms into neighbouring layers, verified before writing.

A safe rewrite: the folded model computes the same function (up to float rounding, checked
on the probe batch). Exit 0: written (or --dry-run verified); 1: verification above tolerance,
nothing written; 2: usage or load error.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from gradcheck_cli.cli import options as opt
from gradcheck_cli.cli.common import EXIT_FINDINGS, EXIT_OK, parse_range, user_errors, write_text
from gradcheck_cli.rewrite.output import OutputFormat


class FoldReportFormat(str, Enum):
    TABLE = "table"
    JSON = "json"


def fold_bn(
    model: opt.ModelArg,
    out: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Where to write the folded model.", show_default=False),
    ] = None,
    to: Annotated[
        OutputFormat | None,
        typer.Option(
            "--to",
            "--format",
            help="Format of the written model (default: from the -o extension: .pt2, .onnx, "
            ".safetensors, .pt/.pth/.ckpt/.pkl/.tar (the input's torch format, or a state_dict), .torchscript/.ts). "
            "state_dict/safetensors keep the architecture (folded BatchNorms become identities); "
            "pickle only for inputs loaded with --trust-pickle.",
            show_default=False,
            rich_help_panel="Fold",
        ),
    ] = None,
    affine_standalone: Annotated[
        bool,
        typer.Option(
            "--affine-standalone",
            help="Rewrite a BatchNorm that has no foldable neighbour as a plain "
            "per-channel multiply-add.",
            rich_help_panel="Fold",
        ),
    ] = False,
    benchmark: Annotated[
        int,
        typer.Option(
            "--benchmark",
            min=0,
            help="Also time inference before and after: median of N runs (0: off).",
            rich_help_panel="Fold",
        ),
    ] = 0,
    dry_run: opt.DryRun = False,
    force: opt.Force = False,
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
    report_format: Annotated[
        FoldReportFormat, typer.Option("--report", help="How to print the report on stdout.")
    ] = FoldReportFormat.TABLE,
    debug: opt.Debug = False,
) -> None:
    """Fold every exactly foldable BatchNorm (PyTorch or ONNX) and verify the result.

    The original and the folded model run on the probe batch; each output's max error is
    checked against a tolerance from its dtype and scale. Above it: exit 1, nothing written.
    The input is never modified; an existing output is refused without --force.
    """
    from gradcheck_cli.model.arch import parse_arch_kwargs
    from gradcheck_cli.probe.batch import InputOptions, parse_shape
    from gradcheck_cli.render.console import make_console
    from gradcheck_cli.render.fold import fold_json, render_fold
    from gradcheck_cli.rewrite.fold import fold_batchnorm

    with user_errors(debug):
        inputs = InputOptions(
            input_file=input_file,
            input_shapes=tuple(parse_shape(s) for s in input_shape or ()),
            input_dtype=input_dtype,
            input_range=parse_range(input_range),
            batch_size=batch_size,
            batches=batches,
            seed=seed,
        )
        report = fold_batchnorm(
            model,
            out=out,
            to=to,
            dry_run=dry_run,
            force=force,
            affine_standalone=affine_standalone,
            arch=arch,
            arch_kwargs=parse_arch_kwargs(arch_kwargs),
            strict=not non_strict,
            trust_pickle=trust_pickle,
            device=device,
            inputs=inputs,
            benchmark_runs=benchmark,
        )
        if report_format is FoldReportFormat.JSON:
            write_text(fold_json(report), None)
        else:
            render_fold(report, make_console())
    raise typer.Exit(EXIT_OK if report.verification.passed else EXIT_FINDINGS)
