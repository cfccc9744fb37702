"""``gradcheck reinit``: re-initialise layers (He, Glorot, LeCun, orthogonal, LSUV) and show the
probe before and after. An unsafe rewrite: it discards trained weights."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from gradcheck_cli.cli import options as opt
from gradcheck_cli.cli.command import Given, ModelArg, ModelOutput, command
from gradcheck_cli.cli.common import EXIT_OK, report_targets, settings, write_reports
from gradcheck_cli.options import ReportFormat

if TYPE_CHECKING:
    from gradcheck_cli.rewrite.reinit_records import ReinitReport


@command(opt.WRITE, opt.REINIT, opt.LOAD, opt.INPUTS, opt.DEVICE, opt.PROBE, opt.CONFIG, opt.REPORT,
         opt.PICTURES, opt.DEBUG)
def reinit(model: ModelArg, output: ModelOutput = None, *, given: Given) -> None:
    """Re-initialise a model's layers and show the probe before and after.

    Unsafe rewrite: the trained values of every selected layer are discarded. The input is never
    modified; an existing output is refused without --force. Exit 0 on success, 2 on errors.
    """
    from gradcheck_cli.cli.visual import check_visual_outputs
    from gradcheck_cli.options import WriteOptions
    from gradcheck_cli.render.reinit import reinit_json, render_reinit
    from gradcheck_cli.rewrite.reinit import reinit as run_reinit

    chosen = settings(given)
    targets = report_targets(given, None, allowed=(ReportFormat.TABLE, ReportFormat.JSON))
    plot: Path | None = given.get("plot")
    check_visual_outputs(plot=plot, html=None)
    write = WriteOptions(**given.pop("to", "dry_run", "force"))
    report = run_reinit(model, out=output, options=chosen.reinit, load=chosen.load, probe=chosen.probe, write=write)
    if plot is not None:
        _write_plot(report, plot)
    write_reports(targets, table=lambda console: render_reinit(report, console),
                  documents={ReportFormat.JSON: lambda: reinit_json(report)})
    raise typer.Exit(EXIT_OK)


def _write_plot(report: ReinitReport, plot: Path) -> None:
    """The probe before and after the rewrite, overlaid; a model probed neither time (ONNX) has none."""
    from gradcheck_cli.render.plot import write_comparison

    if report.before is None or report.after is None:
        sys.stderr.write(f"warning: --plot {plot} not written: this model was not probed before and after "
                         "(see the notes)\n")
        return
    write_comparison(report.before, report.after, plot)
