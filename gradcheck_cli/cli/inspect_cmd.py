"""``gradcheck inspect``: probe a model and print the per-layer report with its diagnosis."""

from __future__ import annotations

from dataclasses import replace

import typer

from gradcheck_cli.cli import options as opt
from gradcheck_cli.cli.command import Given, ModelArg, ReportOutput, command
from gradcheck_cli.cli.common import EXIT_OK, report_targets, settings, with_flag_notes, write_reports
from gradcheck_cli.options import ReportFormat


@command(opt.LOAD, opt.INPUTS, opt.DEVICE, opt.PROBE, opt.RULES, opt.CONFIG, opt.REPORT, opt.PICTURES, opt.DEBUG)
def inspect(model: ModelArg, output: ReportOutput = None, *, given: Given) -> None:
    """Probe a model forward and backward and report every layer: activation statistics, dead ReLU
    units, saturated sigmoid/tanh outputs and gradient norms, then the diagnosis (the same findings
    as `gradcheck check`, which alone exits 1 on them). Settings come from [tool.gradcheck] in
    pyproject.toml; flags override."""
    from gradcheck_cli.cli.visual import check_visual_outputs, write_visual_outputs
    from gradcheck_cli.gate.check import diagnose
    from gradcheck_cli.gate.rules import configure
    from gradcheck_cli.probe.distributed import is_rank_zero
    from gradcheck_cli.render.console import progress_on_stderr
    from gradcheck_cli.render.json_report import render_json
    from gradcheck_cli.render.table import render_inspect

    chosen = settings(given)
    targets = report_targets(given, output, allowed=(ReportFormat.TABLE, ReportFormat.JSON))
    plot, html = given.get("plot"), given.get("html")
    check_visual_outputs(plot=plot, html=html)
    gate = chosen.gate
    rules = configure(select=gate.select, ignore=gate.ignore, overrides=gate.rules)
    probe = chosen.probe if html is None else replace(chosen.probe, histograms=True)
    with progress_on_stderr(f"probing {model.name}") as progress:
        report = diagnose(model, load=chosen.load, probe=probe, rules=rules, progress=progress)
    if not is_rank_zero():
        raise typer.Exit(EXIT_OK)  # under torchrun, rank 0 alone writes the merged report
    report = with_flag_notes(report)
    write_reports(
        targets,
        table=lambda console: render_inspect(report, console),
        documents={ReportFormat.JSON: lambda: render_json(report)},
    )
    write_visual_outputs(report, plot=plot, html=html)
    raise typer.Exit(EXIT_OK)
