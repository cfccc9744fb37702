"""``gradcheck reinit``: re-initialise layers (He, Glorot, LeCun, orthogonal, LSUV) and show the
probe before and after. An unsafe rewrite: it discards trained weights."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from gradcheck_cli.cli import options as opt
from gradcheck_cli.cli.command import Given, ModelArg, ModelOutput, command
from gradcheck_cli.cli.common import EXIT_OK, report_targets, settings, with_flag_notes, write_reports
from gradcheck_cli.options import ReportFormat

if TYPE_CHECKING:
    from gradcheck_cli.rewrite.reinit_records import ReinitReport


@command(
    opt.WRITE, opt.REINIT, opt.LOAD, opt.INPUTS, opt.DEVICE, opt.PROBE, opt.CONFIG, opt.REPORT, opt.PICTURES, opt.DEBUG
)
def reinit(model: ModelArg, output: ModelOutput = None, *, given: Given) -> None:
    """Re-initialise a model's layers and show the probe before and after.

    Unsafe rewrite: the trained values of every selected layer are discarded. The input is never
    modified; an existing output is refused without --force. Exit 0 on success, 2 on errors.
    """
    from gradcheck_cli.cli.visual import check_visual_outputs
    from gradcheck_cli.options import WriteOptions
    from gradcheck_cli.render.reinit import reinit_json, render_reinit
    from gradcheck_cli.rewrite.reinit import UNSAFE_NOTE
    from gradcheck_cli.rewrite.reinit import reinit as run_reinit

    chosen = settings(given)
    targets = report_targets(given, None, allowed=(ReportFormat.TABLE, ReportFormat.JSON))
    plot: Path | None = given.get("plot")
    check_visual_outputs(plot=plot, html=None)
    write = WriteOptions(**{k: v for k, v in given.values.items() if k in ("to", "dry_run", "force")})
    report = run_reinit(model, out=output, options=chosen.reinit, load=chosen.load, probe=chosen.probe, write=write)
    report = with_flag_notes(report)
    shown = report
    if report.written:
        sys.stderr.write(
            f"warning: unsafe rewrite: {output} holds re-initialised weights; the trained "
            f"values of {len(report.layers)} layer(s) were discarded ({model} is unchanged)\n"
        )
        # The warning says what the report's note says: the table need not repeat it (the JSON keeps it).
        shown = replace(report, notes=tuple(note for note in report.notes if note != UNSAFE_NOTE))
    if plot is not None:
        _write_plot(report, plot)
    write_reports(
        targets,
        table=lambda console: render_reinit(shown, console),
        documents={ReportFormat.JSON: lambda: reinit_json(report)},
    )
    raise typer.Exit(EXIT_OK)


def _write_plot(report: ReinitReport, plot: Path) -> None:
    """The probe before and after the rewrite, overlaid; a model probed neither time (ONNX) has none."""
    from gradcheck_cli.render.plot import write_comparison

    if report.before is None or report.after is None:
        sys.stderr.write(
            f"warning: --plot {plot} not written: this model was not probed before and after (see the notes)\n"
        )
        return
    write_comparison(report.before, report.after, plot)
