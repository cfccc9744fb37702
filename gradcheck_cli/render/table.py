"""The terminal report: one row per layer, unhealthy rows highlighted, a diagnosis under it."""

from __future__ import annotations

from collections import OrderedDict

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

from gradcheck_cli.records import Finding, LayerStats, Report, Severity

_STYLE = {Severity.ERROR: "bold red", Severity.WARNING: "yellow", Severity.INFO: "cyan"}


def fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1e4 or magnitude < 1e-3:
        return f"{value:.2e}"
    return f"{value:.4g}"


def _row_health(report: Report) -> dict[str, Severity]:
    worst: dict[str, Severity] = {}
    for finding in report.findings:
        if finding.layer is None:
            continue
        current = worst.get(finding.layer)
        if current is None or finding.severity.rank > current.rank:
            worst[finding.layer] = finding.severity
    return worst


def _dead_cell(row: LayerStats) -> str:
    if row.dead is None:
        return ""
    return f"{row.dead.units}/{row.dead.total}"


def _sat_cell(row: LayerStats) -> str:
    return "" if row.saturation is None else f"{row.saturation.fraction:.0%}"


def layer_table(report: Report) -> Table:
    model = report.model
    probe = report.probe
    shapes = ", ".join("x".join(str(d) for d in spec.shape) + f" {spec.dtype}" for spec in probe.inputs)
    title = (f"{model.path} · {model.format} · {model.parameters:,} parameters\n"
             f"probe: {shapes} × {probe.batches} batch(es) · loss {probe.loss} on {probe.output} · "
             f"mode {probe.mode} · seed {probe.seed} · {probe.device}")
    table = Table(title=title, title_justify="left", header_style="bold", expand=False, pad_edge=False)
    table.add_column("#", justify="right", style="dim")
    table.add_column("layer", overflow="fold", min_width=8)
    table.add_column("type")
    table.add_column("mean", justify="right")
    table.add_column("var", justify="right")
    table.add_column("min", justify="right")
    table.add_column("max", justify="right")
    table.add_column("dead", justify="right")
    table.add_column("sat", justify="right")
    table.add_column("|dL/dy|", justify="right")
    table.add_column("|dL/dW|", justify="right")
    table.add_column("|dL/dW|/|W|", justify="right")
    health = _row_health(report)
    for row in report.layers:
        out = row.output
        nonfinite = out.nan + out.inf
        severity = health.get(row.name)
        style = _STYLE[severity] if severity is not None else ("bold red" if nonfinite else None)
        type_cell = row.type if row.fn is None or row.fn == row.type else f"{row.type} ({row.fn})"
        table.add_row(
            str(row.index), row.name, type_cell,
            fmt(out.mean) if not nonfinite else f"{out.nan} NaN",
            fmt(out.var) if not nonfinite else f"{out.inf} Inf",
            fmt(out.min), fmt(out.max), _dead_cell(row), _sat_cell(row),
            fmt(row.output_grad_norm),
            fmt(row.grad.norm) if row.grad else "", fmt(row.grad.ratio) if row.grad else "",
            style=style,
        )
    return table


def diagnosis(report: Report) -> RenderableType:
    """What is wrong, where it starts, what to do: one entry per rule that fired."""
    if not report.findings:
        return Text("No findings: the default rules found no non-finite values, dead or saturated "
                    "layers, or vanishing or exploding gradients.", style="green")
    by_rule: OrderedDict[str, list[Finding]] = OrderedDict()
    for finding in report.findings:
        by_rule.setdefault(finding.code, []).append(finding)
    parts: list[RenderableType] = [Text("Diagnosis", style="bold")]
    for findings in by_rule.values():
        first = findings[0]
        more = f" (and {len(findings) - 1} more layer(s))" if len(findings) > 1 else ""
        line = Text()
        line.append(f"{first.severity.value.upper():7} ", style=_STYLE[first.severity])
        line.append(f"{first.code} {first.rule}", style="bold")
        line.append(f": starts at {first.layer or 'the model'}{more}: {first.message}")
        parts.append(line)
        parts.append(Text(f"        fix: {first.advice}", style="dim"))
    return Group(*parts)


def render_inspect(report: Report, console: Console) -> None:
    console.print(layer_table(report))
    console.print(diagnosis(report))
    for note in report.notes:
        console.print(Text(f"note: {note}", style="dim"))
