"""``gradcheck check``: the CI gate. Probe each model, evaluate the rules, write the findings in
the requested formats, print one summary line on stderr, and exit 0 (pass), 1 (findings at or
above ``--fail-on``) or 2 (usage, config, load or probe error)."""

from __future__ import annotations

import glob
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from gradcheck_cli.cli import options as opt
from gradcheck_cli.cli.command import Given, ReportOutput, command
from gradcheck_cli.cli.common import (
    EXIT_FINDINGS,
    EXIT_OK,
    EXIT_USAGE,
    flag_text,
    report_targets,
    settings,
    with_flag_notes,
    write_reports,
)
from gradcheck_cli.errors import GradcheckError, UsageError
from gradcheck_cli.options import ReportFormat

if TYPE_CHECKING:
    from gradcheck_cli.config import Settings
    from gradcheck_cli.gate.check import GateResult

ModelsArg = Annotated[
    list[str],
    typer.Argument(
        help="Model files or globs (quoted globs are expanded by gradcheck, '**' included).",
        show_default=False,
        metavar="MODEL...",
    ),
]


@command(
    opt.LOAD, opt.INPUTS, opt.DEVICE, opt.PROBE, opt.RULES, opt.GATE, opt.CONFIG, opt.REPORT, opt.PICTURES, opt.DEBUG
)
def check(models: ModelsArg, output: ReportOutput = None, *, given: Given) -> None:
    """Gate CI on gradient health: probe each model, apply the rules, and exit 1 on findings at or
    above --fail-on. Settings come from [tool.gradcheck] in pyproject.toml; flags override."""
    from gradcheck_cli.cli.visual import check_visual_outputs
    from gradcheck_cli.probe.distributed import is_rank_zero
    from gradcheck_cli.render.check_table import render_check
    from gradcheck_cli.render.github import render_github
    from gradcheck_cli.render.json_report import render_check_json
    from gradcheck_cli.render.junit import render_junit
    from gradcheck_cli.render.markdown import render_markdown

    chosen = settings(given)
    targets = report_targets(given, output, allowed=tuple(ReportFormat), configured=chosen.format)
    plot, html = given.get("plot"), given.get("html")
    check_visual_outputs(plot=plot, html=html)
    paths = expand_models(models)
    result = _run(chosen, paths, debug=bool(given.get("debug")), histograms=html is not None)
    if not is_rank_zero():  # under torchrun, rank 0 alone writes the merged reports and exits on them
        raise typer.Exit(EXIT_OK)
    write_reports(
        targets,
        table=lambda console: render_check(result, console),
        documents={
            ReportFormat.JSON: lambda: render_check_json(result.outcomes),
            ReportFormat.MARKDOWN: lambda: render_markdown(result),
            ReportFormat.JUNIT: lambda: render_junit(result),
            ReportFormat.GITHUB: lambda: render_github(result),
        },
    )
    _write_pictures(result, plot=plot, html=html, baseline=chosen.gate.baseline)
    for outcome in result.outcomes:
        if outcome.error is not None:  # on stderr whatever the formats: a person must see why
            hint = f" (hint: {outcome.hint})" if outcome.hint else ""
            sys.stderr.write(f"error: {outcome.path}: {outcome.error}{hint}\n")
    sys.stderr.write(result.summary() + "\n")
    if result.errored:
        raise typer.Exit(EXIT_USAGE)
    raise typer.Exit(EXIT_FINDINGS if result.failed and not chosen.gate.exit_zero else EXIT_OK)


def expand_models(patterns: list[str]) -> list[Path]:
    """Paths in the order given; a pattern with glob characters that names no existing file is
    expanded (sorted, '**' recursive). A glob that matches nothing is a usage error."""
    paths: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern) and not Path(pattern).exists():
            matched = sorted(p for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
            if not matched:
                raise UsageError(
                    f"no model file matches {pattern!r}",
                    hint="check the pattern and the working directory; quote it so the shell does not expand it first",
                )
            paths.extend(Path(p) for p in matched)
        else:
            paths.append(Path(pattern))
    unique: dict[str, Path] = {}
    for path in paths:
        unique.setdefault(str(path), path)
    return list(unique.values())


def _run(chosen: Settings, paths: list[Path], *, debug: bool, histograms: bool = False) -> GateResult:
    from dataclasses import replace

    from gradcheck_cli.gate.baseline import load_baseline
    from gradcheck_cli.gate.check import GateResult, ModelOutcome, check_path
    from gradcheck_cli.gate.rules import configure
    from gradcheck_cli.render.console import progress_on_stderr

    gate = chosen.gate
    rules = configure(select=gate.select, ignore=gate.ignore, overrides=gate.rules)
    probe = replace(chosen.probe, histograms=True) if histograms else chosen.probe
    accepted = load_baseline(gate.baseline) if gate.baseline is not None else None
    outcomes: list[ModelOutcome] = []
    for path in paths:
        try:
            with progress_on_stderr(f"checking {path.name}") as progress:
                report = check_path(
                    path,
                    load=chosen.load,
                    probe=probe,
                    rules=rules,
                    baseline=accepted.for_model(str(path)) if accepted is not None else None,
                    use_baseline=accepted is not None,
                    tolerance=gate.baseline_tolerance,
                    progress=progress,
                )
            outcomes.append(ModelOutcome(path=str(path), report=with_flag_notes(report)))
        except GradcheckError as exc:
            # One broken model must not hide the others' findings: record it, go on, exit 2.
            if debug:
                traceback.print_exc()
            outcomes.append(
                ModelOutcome(
                    path=str(path), error=flag_text(exc.message), hint=flag_text(exc.hint) if exc.hint else None
                )
            )
    return GateResult(outcomes=tuple(outcomes), fail_on=gate.fail_on, rules=rules, baseline=accepted is not None)


def _write_pictures(result: GateResult, *, plot: Path | None, html: Path | None, baseline: Path | None) -> None:
    """--plot/--html for each model that was probed; with --baseline, its rows drawn underneath."""
    from gradcheck_cli.cli.visual import per_model_paths, write_visual_outputs
    from gradcheck_cli.gate.baseline_layers import baseline_layers

    if plot is None and html is None:
        return
    models = [outcome.path for outcome in result.outcomes]
    for outcome, plot_path, html_path in zip(
        result.outcomes, per_model_paths(plot, models), per_model_paths(html, models), strict=True
    ):
        if outcome.report is None:
            continue  # a model that could not be probed has nothing to draw (its error is reported)
        before = baseline_layers(baseline, outcome.path) if baseline is not None else None
        write_visual_outputs(
            outcome.report,
            plot=plot_path,
            html=html_path,
            before=before,
            before_label="baseline",
            after_label="this run",
        )
