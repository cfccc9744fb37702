"""``check``'s terminal output: per model, a table of findings and the advice for each rule."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from gradcheck_cli.gate.check import GateResult, ModelOutcome
from gradcheck_cli.records import Finding, Severity
from gradcheck_cli.render.table import fmt

_STYLE = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "cyan"}


def findings_table(result: GateResult, outcome: ModelOutcome) -> Table:
    show_status = result.baseline
    table = Table(header_style="bold", expand=False, pad_edge=False, box=None)
    table.add_column("severity")
    if show_status:
        table.add_column("baseline")
    table.add_column("rule")
    table.add_column("layer", overflow="fold")
    table.add_column("value", justify="right")
    table.add_column("threshold", justify="right")
    table.add_column("message", overflow="fold", ratio=1)
    failing = set(map(id, result.failing(outcome)))
    for finding in outcome.findings:
        marker = "✗ " if id(finding) in failing else "  "
        cells = [Text(marker + finding.severity.value, style=_STYLE[finding.severity])]
        if show_status:
            cells.append(Text(str(finding.baseline or "")))
        cells += [
            Text(f"{finding.code} {finding.rule}"),
            Text(finding.layer or "(model)"),
            Text(fmt(finding.value)),
            Text(fmt(finding.threshold)),
            Text(finding.message),
        ]
        table.add_row(*cells)
    return table


def _advice(findings: tuple[Finding, ...]) -> list[Text]:
    seen: dict[str, str] = {}
    for finding in findings:
        seen.setdefault(f"{finding.code} {finding.rule}", finding.advice)
    return [Text(f"  fix {rule}: {advice}", style="dim") for rule, advice in seen.items()]


def render_check(result: GateResult, console: Console) -> None:
    """Findings of every model; the summary line is the CLI's (it goes to stderr)."""
    for outcome in result.outcomes:
        if outcome.error is not None:
            console.print(Text(f"{outcome.path}: could not be checked: {outcome.error}", style="bold red"))
            if outcome.hint:
                console.print(Text(f"  hint: {outcome.hint}", style="dim"))
            continue
        count = len(outcome.findings)
        if not count:
            console.print(Text(f"{outcome.path}: no findings", style="green"))
            continue
        console.print(Text(f"{outcome.path}: {count} finding{'s' if count != 1 else ''}", style="bold"))
        console.print(findings_table(result, outcome))
        for line in _advice(outcome.findings):
            console.print(line)
