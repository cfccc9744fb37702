"""``gradcheck check``: the CI gate. Probe each model, evaluate the rules, write the findings in
the requested formats, print one summary line on stderr, and exit 0 (pass), 1 (findings at or
above --fail-on) or 2 (usage, config, load or probe error)."""

from __future__ import annotations

import glob
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from gradcheck_cli.cli import options as opt
from gradcheck_cli.cli.common import EXIT_FINDINGS, EXIT_OK, EXIT_USAGE, user_errors, write_text
from gradcheck_cli.config import OutputFormat, OutputTarget, ProbeSettings, Settings, parse_output
from gradcheck_cli.errors import ConfigError, GradcheckError, UsageError
from gradcheck_cli.probe.options import DEFAULT_SATURATION_CUTOFF, LossKind, Mode
from gradcheck_cli.records import Severity
from gradcheck_cli.rules import RuleOverride

if TYPE_CHECKING:
    from gradcheck_cli.check import GateResult

_GATE = "Gate"
# Formats that are documents: one of them on stdout must be alone there.
_DOCUMENTS = {OutputFormat.JSON, OutputFormat.JUNIT, OutputFormat.MARKDOWN}


def check(
    models: Annotated[
        list[str],
        typer.Argument(
            help="Model files or globs (quoted globs are expanded by gradcheck, '**' included).",
            show_default=False,
        ),
    ],
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="Config file (pyproject.toml or a file holding the \\[tool.gradcheck] keys). "
            "Default: the nearest pyproject.toml with \\[tool.gradcheck], searched upward.",
            rich_help_panel=_GATE,
        ),
    ] = None,
    isolated: Annotated[
        bool, typer.Option("--isolated", help="Ignore every config file.", rich_help_panel=_GATE)
    ] = False,
    fail_on: Annotated[
        Severity | None,
        typer.Option(
            "--fail-on",
            help="Exit 1 when a finding at or above this severity is found [default: error].",
            rich_help_panel=_GATE,
            show_default=False,
        ),
    ] = None,
    exit_zero: Annotated[
        bool,
        typer.Option(
            "--exit-zero",
            help="Report findings but exit 0 (errors loading a model still exit 2).",
            rich_help_panel=_GATE,
        ),
    ] = False,
    select: Annotated[
        list[str] | None,
        typer.Option(
            "--select",
            help="Rules to run: codes, code prefixes (GC2) or names, comma-separated or repeated. "
            "Replaces the config's list. GC001 non-finite always runs.",
            rich_help_panel=_GATE,
        ),
    ] = None,
    ignore: Annotated[
        list[str] | None,
        typer.Option(
            "--ignore", help="Rules to skip (added to the config's list).", rich_help_panel=_GATE
        ),
    ] = None,
    threshold: Annotated[
        list[str] | None,
        typer.Option(
            "--threshold", help="RULE=VALUE, e.g. dead-relu=0.3. Repeatable.", rich_help_panel=_GATE
        ),
    ] = None,
    severity: Annotated[
        list[str] | None,
        typer.Option(
            "--severity",
            help="RULE=LEVEL, e.g. init-scale=error. Repeatable.",
            rich_help_panel=_GATE,
        ),
    ] = None,
    output_format: Annotated[
        list[str] | None,
        typer.Option(
            "--format",
            "-f",
            help="FORMAT or FORMAT=PATH; repeat for several at once. FORMAT: table, json, "
            "markdown, junit, github. Without PATH it goes to stdout, where json, markdown and "
            "junit must "
            "be alone. [default: table]",
            rich_help_panel="Output",
        ),
    ] = None,
    baseline: Annotated[
        Path | None,
        typer.Option(
            "--baseline",
            help="JSON report of an earlier run (--format json=FILE): fail only on findings "
            "that are new or worse than there.",
            rich_help_panel=_GATE,
        ),
    ] = None,
    baseline_tolerance: Annotated[
        float | None,
        typer.Option(
            "--baseline-tolerance",
            min=0.0,
            help="Relative change a baseline finding's value may make before "
            "it counts as worsened [default: 0.05].",
            rich_help_panel=_GATE,
            show_default=False,
        ),
    ] = None,
    arch: opt.Arch = None,
    arch_kwargs: opt.ArchKwargs = None,
    non_strict: opt.NonStrict = False,
    trust_pickle: opt.TrustPickle = False,
    device: Annotated[
        str | None,
        typer.Option(
            "--device", help="cpu, cuda or cuda:N [default: cpu].", rich_help_panel="Probe"
        ),
    ] = None,
    input_file: opt.InputFile = None,
    input_shape: opt.InputShape = None,
    input_dtype: opt.InputDtype = None,
    input_range: opt.InputRange = None,
    batch_size: opt.BatchSize = None,
    batches: Annotated[
        int | None,
        typer.Option(
            "--batches",
            min=1,
            help="Number of micro-batches [default: 1].",
            rich_help_panel="Probe",
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed",
            help="Seed for inputs, targets and dropout [default: 0].",
            rich_help_panel="Probe",
        ),
    ] = None,
    loss: Annotated[
        LossKind | None,
        typer.Option(
            "--loss",
            help="Scalar to differentiate (as for inspect) [default: auto].",
            rich_help_panel="Probe",
        ),
    ] = None,
    target: Annotated[
        Path | None,
        typer.Option(
            "--target",
            help="Real targets for the loss, one per probe sample.",
            rich_help_panel="Probe",
        ),
    ] = None,
    mode: Annotated[
        Mode | None,
        typer.Option("--mode", help="eval or train [default: eval].", rich_help_panel="Probe"),
    ] = None,
    model_output: Annotated[
        str | None,
        typer.Option(
            "--model-output",
            help="Which output the loss uses (index or key).",
            rich_help_panel="Probe",
        ),
    ] = None,
    saturation_cutoff: Annotated[
        float | None,
        typer.Option(
            "--saturation-cutoff",
            help=f"Saturated = derivative below this fraction of its maximum "
            f"[default: {DEFAULT_SATURATION_CUTOFF}].",
            rich_help_panel="Probe",
        ),
    ] = None,
    plot: opt.PlotFile = None,
    html: opt.HtmlFile = None,
    debug: opt.Debug = False,
) -> None:
    """Gate CI on gradient health: probe each model, apply the rules, and exit 1 on findings at or
    above --fail-on. Settings come from \\[tool.gradcheck] in pyproject.toml; flags override."""
    from gradcheck_cli.cli.visual import check_visual_outputs
    from gradcheck_cli.config import load_settings

    with user_errors(debug):
        check_visual_outputs(plot=plot, html=html)
        cli = Settings(
            fail_on=fail_on,
            select=_split(select) if select is not None else None,
            ignore=_split(ignore or []),
            baseline=baseline,
            baseline_tolerance=baseline_tolerance,
            outputs=tuple(parse_output(text) for text in output_format) if output_format else None,
            rules=_rule_flags(threshold or [], severity or []),
            probe=ProbeSettings(
                arch=arch,
                arch_kwargs=_arch_kwargs(arch_kwargs),
                non_strict=non_strict or None,
                trust_pickle=trust_pickle or None,
                device=device,
                input_file=input_file,
                input_shape=tuple(input_shape) if input_shape else None,
                input_dtype=input_dtype,
                input_range=input_range,
                batch_size=batch_size,
                batches=batches,
                seed=seed,
                loss=loss,
                target=target,
                mode=mode,
                model_output=model_output,
                saturation_cutoff=saturation_cutoff,
            ),
        )
        file_settings = Settings() if isolated else load_settings(config)
        settings = file_settings.merged(cli)
        outputs = _check_outputs(settings.outputs or (OutputTarget(OutputFormat.TABLE),))
        paths = expand_models(models)
        result = _run(settings, paths, debug=debug, histograms=html is not None)
        _write(result, outputs)
        _write_pictures(result, plot=plot, html=html, baseline=settings.baseline)
        sys.stderr.write(result.summary() + "\n")
    if result.errored:
        raise typer.Exit(EXIT_USAGE)
    raise typer.Exit(EXIT_FINDINGS if result.failed and not exit_zero else EXIT_OK)


def _split(values: list[str]) -> tuple[str, ...]:
    return tuple(part.strip() for value in values for part in value.split(",") if part.strip())


def _arch_kwargs(text: str | None) -> dict[str, object] | None:
    from gradcheck_cli.model.arch import parse_arch_kwargs

    return parse_arch_kwargs(text) if text is not None else None


def _rule_flags(thresholds: list[str], severities: list[str]) -> dict[str, RuleOverride]:
    from gradcheck_cli.config import parse_rule_assignment

    overrides: dict[str, RuleOverride] = {}
    for text in thresholds:
        rule, value = parse_rule_assignment(text, where="--threshold")
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"--threshold {text!r}: {value!r} is not a number") from None
        current = overrides.get(rule, RuleOverride())
        overrides[rule] = RuleOverride(threshold=number, severity=current.severity)
    for text in severities:
        rule, value = parse_rule_assignment(text, where="--severity")
        try:
            level = Severity(value.lower())
        except ValueError:
            raise ConfigError(
                f"--severity {text!r}: {value!r} is not error, warning or info"
            ) from None
        current = overrides.get(rule, RuleOverride())
        overrides[rule] = RuleOverride(threshold=current.threshold, severity=level)
    return overrides


def _check_outputs(outputs: tuple[OutputTarget, ...]) -> tuple[OutputTarget, ...]:
    """Refuse before any model runs what would garble stdout or fail to be written at the end."""
    to_stdout = [o.format for o in outputs if o.path is None]
    documents = [f for f in to_stdout if f in _DOCUMENTS]
    if documents and len(to_stdout) > 1:
        raise UsageError(
            f"{documents[0]} on stdout cannot share it with {len(to_stdout) - 1} other format(s)",
            hint=f"write it to a file: --format {documents[0]}=PATH",
        )
    for output in outputs:
        if output.path is not None:
            parent = output.path.parent if str(output.path.parent) else Path(".")
            if not parent.is_dir():
                raise UsageError(
                    f"cannot write {output.path}: the directory {parent} does not exist",
                    hint="create it first",
                )
    return outputs


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
                    hint="check the pattern and the "
                    "working directory; quote it so the shell does not expand it first",
                )
            paths.extend(Path(p) for p in matched)
        else:
            paths.append(Path(pattern))
    unique: dict[str, Path] = {}
    for path in paths:
        unique.setdefault(str(path), path)
    return list(unique.values())


def _run(settings: Settings, paths: list[Path], *, debug: bool, histograms: bool = False) -> GateResult:
    from gradcheck_cli import api
    from gradcheck_cli.baseline import DEFAULT_TOLERANCE, load_baseline
    from gradcheck_cli.check import GateResult, ModelOutcome, check_path
    from gradcheck_cli.cli.inspect_cmd import build_probe_options
    from gradcheck_cli.probe.options import ProbeOptions
    from gradcheck_cli.render.console import progress_on_stderr
    from gradcheck_cli.rules import configure

    rules = configure(
        select=settings.select,
        ignore=settings.ignore,
        overrides=settings.rules,
        where="--select/--ignore",
        rules_where="--threshold/--severity",
    )
    p = settings.probe
    probe = build_probe_options(
        device=p.device or "cpu",
        input_file=p.input_file,
        input_shape=list(p.input_shape or ()) or None,
        input_dtype=p.input_dtype,
        input_range=p.input_range,
        batch_size=p.batch_size,
        batches=p.batches or 1,
        seed=p.seed if p.seed is not None else 0,
        loss=p.loss or LossKind.AUTO,
        target=p.target,
        mode=p.mode or Mode.EVAL,
        model_output=p.model_output,
        saturation_cutoff=p.saturation_cutoff
        if p.saturation_cutoff is not None
        else DEFAULT_SATURATION_CUTOFF,
        histograms=histograms,
    )
    assert isinstance(probe, ProbeOptions)
    load = api.LoadOptions(
        arch=p.arch,
        arch_kwargs=p.arch_kwargs,
        strict=not p.non_strict,
        trust_pickle=bool(p.trust_pickle),
        allow_nonfinite=True,
    )
    accepted = load_baseline(settings.baseline) if settings.baseline is not None else None
    tolerance = (
        settings.baseline_tolerance
        if settings.baseline_tolerance is not None
        else DEFAULT_TOLERANCE
    )
    outcomes: list[ModelOutcome] = []
    for path in paths:
        try:
            with progress_on_stderr(f"checking {path.name}") as progress:
                report = check_path(
                    path,
                    load_options=load,
                    probe=probe,
                    rules=rules,
                    baseline=accepted.for_model(str(path)) if accepted is not None else None,
                    use_baseline=accepted is not None,
                    tolerance=tolerance,
                    progress=progress,
                )
            outcomes.append(ModelOutcome(path=str(path), report=report))
        except GradcheckError as exc:
            # One broken model must not hide the others' findings: record it, go on, exit 2.
            if debug:
                traceback.print_exc()
            outcomes.append(ModelOutcome(path=str(path), error=exc.message, hint=exc.hint))
    return GateResult(
        outcomes=tuple(outcomes),
        fail_on=settings.fail_on or Severity.ERROR,
        rules=rules,
        baseline=accepted is not None,
    )


def _write_pictures(result: GateResult, *, plot: Path | None, html: Path | None, baseline: Path | None) -> None:
    """--plot/--html for each model that was probed; with --baseline, its rows drawn underneath."""
    from gradcheck_cli.baseline_layers import baseline_layers
    from gradcheck_cli.cli.visual import per_model_paths, write_visual_outputs

    if plot is None and html is None:
        return
    models = [outcome.path for outcome in result.outcomes]
    for outcome, plot_path, html_path in zip(
        result.outcomes, per_model_paths(plot, models), per_model_paths(html, models), strict=True
    ):
        if outcome.report is None:
            continue  # a model that could not be probed has nothing to draw (its error is reported)
        before = baseline_layers(baseline, outcome.path) if baseline is not None else None
        write_visual_outputs(outcome.report, plot=plot_path, html=html_path, before=before,
                             before_label="baseline", after_label="this run")


def _write(result: GateResult, outputs: tuple[OutputTarget, ...]) -> None:
    from gradcheck_cli.render.check_table import render_check
    from gradcheck_cli.render.console import make_console
    from gradcheck_cli.render.github import render_github
    from gradcheck_cli.render.json_report import render_check_json
    from gradcheck_cli.render.junit import render_junit
    from gradcheck_cli.render.markdown import render_markdown

    for output in outputs:
        if output.format is OutputFormat.TABLE:
            if output.path is None:
                render_check(result, make_console())
            else:
                from io import StringIO

                buffer = StringIO()
                render_check(result, make_console(buffer, width=120))
                write_text(buffer.getvalue(), output.path)
            continue
        text = {
            OutputFormat.JSON: lambda: render_check_json(result.outcomes),
            OutputFormat.MARKDOWN: lambda: render_markdown(result),
            OutputFormat.JUNIT: lambda: render_junit(result),
            OutputFormat.GITHUB: lambda: render_github(result),
        }[output.format]()
        write_text(text, output.path)
