"""The terminal report: one row per layer, unhealthy rows highlighted, a diagnosis under it."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
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
    title = (
        f"{model.path} · {model.format} · {model.parameters:,} parameters\n"
        f"probe: {shapes} × {probe.batches} batch(es) · loss {probe.loss} on {probe.output} · "
        f"mode {probe.mode} · seed {probe.seed} · {probe.device}"
    )
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
            str(row.index),
            row.name,
            type_cell,
            fmt(out.mean) if not nonfinite else f"{out.nan} NaN",
            fmt(out.var) if not nonfinite else f"{out.inf} Inf",
            fmt(out.min),
            fmt(out.max),
            _dead_cell(row),
            _sat_cell(row),
            fmt(row.output_grad_norm),
            fmt(row.grad.norm) if row.grad else "",
            fmt(row.grad.ratio) if row.grad else "",
            style=style,
        )
    return table


def diagnosis(report: Report) -> RenderableType:
    """What is wrong, where it starts, what to do: one entry per rule that fired."""
    if not report.findings:
        return Text(
            "No findings: the default rules found no non-finite values, dead or saturated "
            "layers, or vanishing or exploding gradients.",
            style="green",
        )
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


# Eight heights of a sparkline cell, lowest to highest.
SPARK_LEVELS = "▁▂▃▄▅▆▇█"
_SPARK_LABEL_WIDTH = 8
_SEVERITY_MARK = {Severity.ERROR: "E", Severity.WARNING: "W", Severity.INFO: "i"}


class DepthSparklines:
    """Activation variance and |dL/dy| over depth, one character per row (or per group of rows when
    the terminal is narrower than the model is deep), on a log scale, with a line marking the rows
    that have findings (E/W/i) so the trend can be read without colour (NO_COLOR, CI logs).

    A rich renderable: it lays itself out in the width the console offers, so it never wraps.
    """

    def __init__(self, report: Report) -> None:
        self.report = report

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        rows = self.report.layers
        value_width = 9  # fmt() is at most 9 characters wide ("-1.23e-04")
        cells = options.max_width - (_SPARK_LABEL_WIDTH + 2 * value_width + 3)
        if not rows or cells < 8:
            return  # too narrow for a readable line: the table above says it all
        per_cell = math.ceil(len(rows) / cells)
        groups = [rows[start : start + per_cell] for start in range(0, len(rows), per_cell)]
        heading = f"depth: rows 0–{len(rows) - 1} left to right, log scale"
        if per_cell > 1:
            heading += f", {per_cell} rows/char"
        yield Text(heading, style="bold", no_wrap=True, overflow="ellipsis")
        yield _spark_line(
            "var",
            [[row.output.var for row in group] for group in groups],
            [_nonfinite(group) for group in groups],
            style="blue",
            value_width=value_width,
        )
        yield _spark_line(
            "|dL/dy|",
            [[row.output_grad_norm for row in group] for group in groups],
            [_nonfinite(group) for group in groups],
            style="green",
            value_width=value_width,
        )
        health = _row_health(self.report)
        if health:
            line = Text(f"{'findings':<{_SPARK_LABEL_WIDTH}} {'':>{value_width}} ")
            for group in groups:
                worst = max(
                    (health[row.name] for row in group if row.name in health), key=lambda s: s.rank, default=None
                )
                line.append(_SEVERITY_MARK[worst] if worst else " ", style=_STYLE[worst] if worst else "")
            yield line


def _nonfinite(group: Sequence[LayerStats]) -> bool:
    return any(row.output.nan or row.output.inf for row in group)


def _spark_line(
    label: str, groups: Sequence[Sequence[float | None]], nonfinite: Sequence[bool], *, style: str, value_width: int
) -> Text:
    """One sparkline: '!' where an output held NaN/Inf, '·' where there is nothing to draw on a log
    scale (a zero or missing value), else a block whose height is the value's place between the
    smallest and largest positive value shown at either end."""
    logs: list[float | None] = []
    for values in groups:
        positive = [math.log10(v) for v in values if v is not None and v > 0 and math.isfinite(v)]
        # Several rows per character: the mean of their logs, i.e. where a log axis would put their
        # geometric mean. A display choice over the report's numbers, not a new statistic.
        logs.append(sum(positive) / len(positive) if positive else None)
    present = [value for value in logs if value is not None]
    low, high = (min(present), max(present)) if present else (0.0, 0.0)
    line = Text(f"{label:<{_SPARK_LABEL_WIDTH}} ")
    line.append(f"{fmt(10**low) if present else '':>{value_width}} ", style="dim")
    for log_value, broken in zip(logs, nonfinite, strict=True):
        if broken:
            line.append("!", style="bold red")
        elif log_value is None:
            line.append("·", style="dim")
        else:
            # All values equal: a flat line at mid height, not one that reads as "vanished".
            level = (
                len(SPARK_LEVELS) // 2 - 1
                if high == low
                else round((log_value - low) / (high - low) * (len(SPARK_LEVELS) - 1))
            )
            line.append(SPARK_LEVELS[level], style=style)
    line.append(f" {fmt(10**high) if present else ''}", style="dim")
    return line


class ThroughTimeView:
    """For each recurrent layer and direction: |dL/dh_t| over time as a log-scale sparkline, with the
    fitted per-step rate and the horizon (the numbers are the report's; this only draws them)."""

    def __init__(self, report: Report) -> None:
        self.rows = [row for row in report.layers if row.through_time is not None]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if not self.rows:
            return
        yield Text("gradient through time: |dL/dh_t| for t = 0 .. T-1, log scale", style="bold", no_wrap=True)
        for row in self.rows:
            tt = row.through_time
            assert tt is not None
            if not tt.ok:
                yield Text(f"  {row.name}: not unrolled ({tt.reason})", style="dim")
                continue
            for trace in tt.directions:
                rate = "—" if trace.decay_rate is None else f"{trace.decay_rate:.3g}"
                yield Text(
                    f"  {row.name} layer {trace.layer} {trace.direction}: rate {rate}/step back, "
                    f"horizon {trace.horizon}/{trace.steps} steps",
                    no_wrap=True,
                    overflow="ellipsis",
                )
                cells = max(options.max_width - (_SPARK_LABEL_WIDTH + 2 * 9 + 3), 8)
                norms = list(trace.grad_norms)
                per_cell = max(1, math.ceil(len(norms) / cells))
                groups = [norms[start : start + per_cell] for start in range(0, len(norms), per_cell)]
                yield _spark_line(
                    "|dL/dh|", [list(g) for g in groups], [False] * len(groups), style="magenta", value_width=9
                )


def render_inspect(report: Report, console: Console) -> None:
    console.print(layer_table(report))
    console.print(DepthSparklines(report))
    console.print(ThroughTimeView(report))
    console.print(diagnosis(report))
    for note in report.notes:
        console.print(Text(f"note: {note}", style="dim"))
