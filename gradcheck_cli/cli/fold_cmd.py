"""``gradcheck fold-bn``: fold BatchNorms into neighbouring layers, verified before writing.

A safe rewrite: the folded model computes the same function (up to float rounding, checked
on the probe batch). Exit 0: written (or --dry-run verified); 1: verification above tolerance,
nothing written; 2: usage or load error.
"""

from __future__ import annotations

import typer

from gradcheck_cli.cli import options as opt
from gradcheck_cli.cli.command import Given, ModelArg, ModelOutput, command
from gradcheck_cli.cli.common import EXIT_FINDINGS, EXIT_OK, report_targets, settings, with_flag_notes, write_reports
from gradcheck_cli.options import ReportFormat


@command(opt.WRITE, opt.FOLD, opt.LOAD, opt.INPUTS, opt.DEVICE, opt.CONFIG, opt.REPORT, opt.DEBUG)
def fold_bn(model: ModelArg, output: ModelOutput = None, *, given: Given) -> None:
    """Fold every exactly foldable BatchNorm (PyTorch or ONNX) and verify the result.

    The original and the folded model run on the probe batch; each output's max error is
    checked against a tolerance from its dtype and scale. Above it: exit 1, nothing written.
    The input is never modified; an existing output is refused without --force.
    """
    from gradcheck_cli.options import WriteOptions
    from gradcheck_cli.render.fold import fold_json, render_fold
    from gradcheck_cli.rewrite.fold import fold_batchnorm

    chosen = settings(given)
    targets = report_targets(given, None, allowed=(ReportFormat.TABLE, ReportFormat.JSON))
    write = WriteOptions(**{k: v for k, v in given.values.items() if k in ("to", "dry_run", "force")})
    report = fold_batchnorm(model, out=output, options=chosen.fold, load=chosen.load, probe=chosen.probe, write=write)
    report = with_flag_notes(report)
    write_reports(
        targets,
        table=lambda console: render_fold(report, console),
        documents={ReportFormat.JSON: lambda: fold_json(report)},
    )
    raise typer.Exit(EXIT_OK if report.verification.passed else EXIT_FINDINGS)
