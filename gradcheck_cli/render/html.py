"""The HTML report: one self-contained file to open, attach to a CI run, or mail.

Everything is inline (CSS, a little vanilla JS, SVG drawn here), so the file opens offline and
loads nothing from the network. matplotlib is not needed: the depth chart and the histograms are
SVG written by this module from the report's numbers. Sections, top to bottom:

- summary: model, probe, counts of rows and findings, notes;
- findings: each with its rule, message and fix, linked to its row;
- depth chart: activation variance and |dL/dy| (log scales), dead and saturated fractions, the
  findings shaded on their layers; with ``compare_with`` an earlier run is overlaid, dashed;
- the per-layer table, sortable by any column (click a header), filterable, paginated;
- histograms over depth: heatmaps with one column per row (Glorot & Bengio's distributions at once);
- per-layer histograms of the output and of dL/dOutput (`histograms`), collapsed in groups of
  consecutive rows, so that a 500-layer model stays a page of a few headings;
- gradient through time, for recurrent rows (``LayerStats.through_time``): one curve per layer and
  direction.

Size: with histograms, a probed 500-row report is about 0.73 MB and a worst case (random counts in
every bin, a finding on every row) about 1.5 MB, under ``SIZE_BOUND_500_ROWS`` (tests/test_html.py
checks both): the page never embeds one element per histogram bin; each histogram is one short
path, and the over-depth heatmaps are palette PNGs.
Nothing here computes a statistic: positions on the charts are the report's values, scaled.
"""

from __future__ import annotations

import base64
import html
import math
import struct
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from gradcheck_cli.options import flag_of
from gradcheck_cli.records import DirectionTrace, Finding, LayerStats, Report, RowKind, Severity
from gradcheck_cli.render.table import fmt  # numbers read the same in the terminal and the page

# Documented bound (docs/reports.md), checked by tests/test_html.py on a probed 500-row model.
SIZE_BOUND_500_ROWS = 2 * 1024 * 1024
# Rows per collapsible histogram group, and the table's default page size.
HISTOGRAM_GROUP_ROWS = 25
TABLE_PAGE_ROWS = 100

_SEVERITY_ORDER = (Severity.ERROR, Severity.WARNING, Severity.INFO)

# Chart coordinates: row position -> x pixels, value -> y pixels (log-scaled where it applies).
_XOf = Callable[[int], float]
_YOf = Callable[[float], float]


def render_html(
    report: Report,
    *,
    compare_with: Report | Sequence[LayerStats] | None = None,
    compare_label: str = "baseline",
    title: str | None = None,
) -> str:
    """The whole document. ``compare_with``: an earlier run drawn under this one in the depth chart."""
    rows_by_name: dict[str, LayerStats] = {}
    for row in report.layers:
        rows_by_name.setdefault(row.name, row)
    earlier = None
    if compare_with is not None:
        earlier = tuple(compare_with.layers if isinstance(compare_with, Report) else compare_with)
    heading = title or f"gradcheck report: {report.model.path}"
    sections = [
        _summary(report),
        _findings(report, rows_by_name),
        _depth_section(report, earlier, compare_label),
        _table(report),
        _histogram_section(report),
        _through_time_section(report),
    ]
    body = "\n".join(section for section in sections if section)
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        # An empty data: icon keeps the browser from requesting /favicon.ico (a network access).
        f'<link rel="icon" href="data:,">\n'
        f"<title>{_e(heading)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<h1>{_e(heading)}</h1>\n{body}\n<script>{_JS}</script>\n</body>\n</html>\n"
    )


# ---------------------------------------------------------------- formatting helpers


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _sort_value(value: float | None) -> str:
    # Empty data-v sorts last in either direction (see _JS).
    return "" if value is None or not math.isfinite(value) else repr(float(value))


def _row_anchor(row: LayerStats) -> str:
    return f"row-{row.index}"


def _worst(findings: Iterable[Finding]) -> Severity | None:
    worst: Severity | None = None
    for finding in findings:
        if worst is None or finding.severity.rank > worst.rank:
            worst = finding.severity
    return worst


def _findings_by_layer(report: Report) -> dict[str, list[Finding]]:
    by_layer: dict[str, list[Finding]] = {}
    for finding in report.findings:
        if finding.layer is not None:
            by_layer.setdefault(finding.layer, []).append(finding)
    return by_layer


# ---------------------------------------------------------------- summary and findings


def _summary(report: Report) -> str:
    model, probe = report.model, report.probe
    inputs = "; ".join(
        f"{spec.name}: {'×'.join(str(d) for d in spec.shape)} {spec.dtype} ({spec.source})" for spec in probe.inputs
    )
    counts = {severity: sum(1 for f in report.findings if f.severity is severity) for severity in _SEVERITY_ORDER}
    badges = " ".join(f'<span class="badge sev-{s.value}">{counts[s]} {s.value}</span>' for s in _SEVERITY_ORDER)
    facts = [
        ("model", f"{model.path} ({model.format}, {model.parameters:,} parameters)"),
        ("rows", f"{len(report.layers)} (layers and activation calls, in execution order)"),
        ("findings", badges),
        ("probe inputs", inputs),
        (
            "probe",
            f"{probe.batches} micro-batch(es) of {probe.batch_size} · seed {probe.seed} · mode {probe.mode} · "
            f"{probe.device} · instrumented by {probe.method}",
        ),
        ("loss", f"{probe.loss} on {probe.output} = {fmt(probe.loss_value)}"),
        ("saturation cut-off", f"derivative below {probe.saturation_cutoff:g} × its maximum"),
        ("tool", f"{report.tool.name} {report.tool.version} · report schema {report.schema_version}"),
    ]
    items = "\n".join(
        f"<dt>{_e(name)}</dt><dd>{value if name == 'findings' else _e(value)}</dd>" for name, value in facts
    )
    notes = "".join(f"<li>{_e(note)}</li>" for note in report.notes)
    notes_html = f'<h3>Notes</h3><ul class="notes">{notes}</ul>' if notes else ""
    return f'<section id="summary"><h2>Summary</h2><dl class="facts">\n{items}\n</dl>{notes_html}</section>'


def _findings(report: Report, rows_by_name: dict[str, LayerStats]) -> str:
    """One entry per rule, most severe first: where it starts, its message and fix once, then every
    layer it concerns (collapsed), so that 300 findings on a deep model stay a short list."""
    if not report.findings:
        return (
            '<section id="findings"><h2>Findings</h2><p class="ok">No findings: the rules found no '
            "non-finite values, dead or saturated layers, or vanishing or exploding gradients.</p></section>"
        )
    by_rule: dict[str, list[Finding]] = {}
    for finding in report.findings:
        by_rule.setdefault(finding.code, []).append(finding)
    items = []
    for findings in sorted(by_rule.values(), key=lambda group: -max(f.severity.rank for f in group)):
        first = findings[0]
        severity = _worst(findings) or first.severity
        more = f" and {len(findings) - 1} more" if len(findings) > 1 else ""
        layers = "".join(
            f"<li>{_where(f, rows_by_name)}{_value(f)}: {_e(f.message)}{_baseline(f)}</li>" for f in findings
        )
        items.append(
            f'<li class="finding sev-{severity.value}" data-code="{_e(first.code)}">'
            f'<span class="badge sev-{severity.value}">{severity.value}</span> <b>{_e(first.code)} {_e(first.rule)}'
            f"</b>: starts at {_where(first, rows_by_name)}{more}<div>{_e(first.message)}{_value(first)}</div>"
            f'<div class="advice">fix: {_e(first.advice)}</div><details><summary>{len(findings)} finding(s)'
            f'</summary><ul class="finding-rows">{layers}</ul></details></li>'
        )
    return (
        f'<section id="findings"><h2>Findings ({len(report.findings)})</h2>'
        f'<ul class="findings">{"".join(items)}</ul></section>'
    )


def _where(finding: Finding, rows_by_name: dict[str, LayerStats]) -> str:
    if finding.layer is None:
        return "the model"
    row = rows_by_name.get(finding.layer)
    name = _e(finding.layer)
    return name if row is None else f'<a href="#{_row_anchor(row)}" class="row-link">{name}</a>'


def _value(finding: Finding) -> str:
    value = "" if finding.value is None else f" · value {fmt(finding.value)}"
    return value + ("" if finding.threshold is None else f" (threshold {fmt(finding.threshold)})")


def _baseline(finding: Finding) -> str:
    return "" if finding.baseline is None else f' <span class="badge">{_e(finding.baseline.value)}</span>'


# ---------------------------------------------------------------- depth chart (SVG)

_CHART_WIDTH = 960
_PLOT_LEFT = 70
_PLOT_RIGHT = 10
_PANEL_HEIGHT = 150
_BAR_PANEL_HEIGHT = 90
_PANEL_GAP = 28
_SEVERITY_FILL = {Severity.ERROR: "#d62728", Severity.WARNING: "#ff7f0e", Severity.INFO: "#1f77b4"}


@dataclass(frozen=True)
class _Panel:
    title: str
    top: float
    height: float


def _depth_section(report: Report, earlier: tuple[LayerStats, ...] | None, earlier_label: str) -> str:
    if not report.layers:
        return ""
    legend = (
        '<p class="legend"><span class="key var"></span> activation variance · <span class="key grad">'
        '</span> |dL/dy| · solid: layer outputs, dotted: activation outputs · <span class="key dead"></span> '
        'dead · <span class="key sat"></span> saturated · shaded: findings · × at the top: NaN/Inf output · '
        "tick at the floor: exactly 0"
    )
    if earlier is not None:
        legend += f" · dashed, faint: {_e(earlier_label)}"
    legend += "</p>"
    return f'<section id="depth"><h2>Gradient flow over depth</h2>{legend}{depth_chart_svg(report, earlier)}</section>'


def depth_chart_svg(report: Report, earlier: Sequence[LayerStats] | None = None) -> str:
    """Three panels over the rows in execution order; hover a point for the layer and value."""
    rows = report.layers
    count = len(rows)
    plot_width = _CHART_WIDTH - _PLOT_LEFT - _PLOT_RIGHT
    step = plot_width / max(count, 1)
    panels = [
        _Panel("activation variance (log)", 18, _PANEL_HEIGHT),
        _Panel("|dL/dy| (log)", 18 + _PANEL_HEIGHT + _PANEL_GAP, _PANEL_HEIGHT),
        _Panel("dead / saturated fraction", 18 + 2 * (_PANEL_HEIGHT + _PANEL_GAP), _BAR_PANEL_HEIGHT),
    ]
    height = panels[-1].top + panels[-1].height + 34
    position = {(row.name, row.type): i for i, row in enumerate(rows)}

    def x_of(i: int) -> float:
        return _PLOT_LEFT + step * (i + 0.5)

    parts: list[str] = []
    # Findings first, so that lines and bars are drawn over the shading.
    by_layer = _findings_by_layer(report)
    for i, row in enumerate(rows):
        severity = _worst(by_layer.get(row.name, ()))
        if severity is None:
            continue
        codes = ", ".join(sorted({f.code for f in by_layer[row.name]}))
        # One band through all three panels (not one per panel): a deep model has hundreds of these.
        parts.append(
            f'<rect class="finding-span" x="{x_of(i) - step / 2:.1f}" y="{panels[0].top}" '
            f'width="{max(step, 1.0):.1f}" height="{panels[-1].top + panels[-1].height - panels[0].top}" '
            f'fill="{_SEVERITY_FILL[severity]}" fill-opacity="0.15">'
            f"<title>#{row.index} {_e(row.name)}: {_e(codes)}</title></rect>"
        )
    runs: list[tuple[Sequence[tuple[int, LayerStats]], bool]] = []
    if earlier is not None:
        runs.append(([(position[(r.name, r.type)], r) for r in earlier if (r.name, r.type) in position], True))
    runs.append((list(enumerate(rows)), False))
    for panel, metric, colour in ((panels[0], "var", "#1f77b4"), (panels[1], "grad", "#2ca02c")):
        values = [(r.output.var if metric == "var" else r.output_grad_norm) for run, _ in runs for _, r in run]
        positive = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
        parts.append(_panel_frame(panel, plot_width))
        if not positive:
            parts.append(
                f'<text x="{_PLOT_LEFT + 8}" y="{panel.top + panel.height / 2}" class="muted">'
                f"no positive values to draw on a log scale</text>"
            )
            continue
        low, high = math.floor(math.log10(min(positive))), math.ceil(math.log10(max(positive)))
        if high == low:
            high += 1
        parts.append(_log_ticks(panel, low, high))

        def y_of(value: float, panel: _Panel = panel, low: int = low, high: int = high) -> float:
            return panel.top + panel.height * (1 - (math.log10(value) - low) / (high - low))

        for run, faint in runs:
            for group_is_activation in (False, True):
                points = [(i, r) for i, r in run if (r.kind is RowKind.ACTIVATION) == group_is_activation]
                parts.append(_polyline(points, metric, x_of, y_of, colour, faint=faint, dotted=group_is_activation))
            parts.append(_nonfinite_marks(run, x_of, panel, faint=faint))
            parts.append(_zero_marks(run, metric, x_of, panel, colour, faint=faint))
    parts.append(_panel_frame(panels[2], plot_width))
    parts.append(_fraction_bars(runs, x_of, step, panels[2]))
    for panel in panels:
        parts.append(f'<text x="{_PLOT_LEFT}" y="{panel.top - 5}" class="panel-title">{_e(panel.title)}</text>')
    parts.append(_row_ticks(count, x_of, panels[-1].top + panels[-1].height))
    parts.append(
        f'<text x="{_PLOT_LEFT + plot_width / 2}" y="{height - 6}" text-anchor="middle" class="muted">'
        f"depth: row # in execution order (0 … {count - 1})</text>"
    )
    return (
        f'<svg class="depth-chart" viewBox="0 0 {_CHART_WIDTH} {height:.0f}" role="img" '
        f'aria-label="gradient flow over depth">{"".join(parts)}</svg>'
    )


def _panel_frame(panel: _Panel, plot_width: float) -> str:
    return f'<rect class="frame" x="{_PLOT_LEFT}" y="{panel.top}" width="{plot_width}" height="{panel.height}"/>'


def _log_ticks(panel: _Panel, low: int, high: int) -> str:
    # At most ~6 labelled decades per panel, whatever the range.
    stride = max(1, math.ceil((high - low) / 6))
    ticks = []
    for decade in range(low, high + 1, stride):
        y = panel.top + panel.height * (1 - (decade - low) / (high - low))
        ticks.append(
            f'<line class="grid" x1="{_PLOT_LEFT}" x2="{_CHART_WIDTH - _PLOT_RIGHT}" y1="{y:.1f}" '
            f'y2="{y:.1f}"/><text x="{_PLOT_LEFT - 4}" y="{y + 4:.1f}" text-anchor="end" '
            f'class="tick">1e{decade}</text>'
        )
    return "".join(ticks)


def _polyline(
    points: Sequence[tuple[int, LayerStats]],
    metric: str,
    x_of: _XOf,
    y_of: _YOf,
    colour: str,
    *,
    faint: bool,
    dotted: bool,
) -> str:
    """A line through the positive values; a missing or zero value breaks it (log scale)."""
    segments: list[list[str]] = [[]]
    dots: list[str] = []
    for i, row in points:
        value = row.output.var if metric == "var" else row.output_grad_norm
        if value is None or not value > 0 or not math.isfinite(value):
            segments.append([])
            continue
        x, y = x_of(i), y_of(value)
        segments[-1].append(f"{x:.1f},{y:.1f}")
        if not faint:
            dots.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.2"><title>#{row.index} {_e(row.name)}: '
                f"{fmt(value)}</title></circle>"
            )
    dash = ' stroke-dasharray="5 3"' if faint else (' stroke-dasharray="2 2"' if dotted else "")
    opacity = ' stroke-opacity="0.45"' if faint else ""
    lines = "".join(
        f'<polyline points="{" ".join(segment)}" fill="none" stroke="{colour}" stroke-width="1.4"{dash}{opacity}/>'
        for segment in segments
        if len(segment) > 1
    )
    singles = "".join(
        f'<circle cx="{segment[0].split(",")[0]}" cy="{segment[0].split(",")[1]}" r="1.6" fill="{colour}"/>'
        for segment in segments
        if len(segment) == 1 and faint
    )
    return f'{lines}{singles}<g fill="{colour}">{"".join(dots)}</g>' if dots else f"{lines}{singles}"


def _nonfinite_marks(run: Sequence[tuple[int, LayerStats]], x_of: _XOf, panel: _Panel, *, faint: bool) -> str:
    marks = []
    opacity = ' opacity="0.5"' if faint else ""
    for i, row in run:
        if row.output.nan or row.output.inf:
            marks.append(
                f'<text x="{x_of(i):.1f}" y="{panel.top + 12}" text-anchor="middle" '
                f'class="nonfinite"{opacity}>×<title>#{row.index} {_e(row.name)}: '
                f"{row.output.nan} NaN, {row.output.inf} Inf</title></text>"
            )
    return "".join(marks)


def _zero_marks(
    run: Sequence[tuple[int, LayerStats]], metric: str, x_of: _XOf, panel: _Panel, colour: str, *, faint: bool
) -> str:
    """Exact zeros (an all-dead layer, a gradient that vanished to 0) have no place on a log axis:
    a tick rising from the panel's floor marks each, all in one path."""
    bottom = panel.top + panel.height
    ticks = "".join(
        f"M{x_of(i):.1f} {bottom}v-7"
        for i, row in run
        if (row.output.var if metric == "var" else row.output_grad_norm) == 0
    )
    if not ticks:
        return ""
    opacity = ' stroke-opacity="0.45"' if faint else ""
    return f'<path class="zero-marks" d="{ticks}" stroke="{colour}" stroke-width="2"{opacity}/>'


def _row_ticks(count: int, x_of: _XOf, bottom: float) -> str:
    """About ten row numbers under the last panel, at round steps."""
    if count == 0:
        return ""
    raw = max(1, count // 10)
    magnitude = 10 ** (len(str(raw)) - 1)
    stride = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    return "".join(
        f'<text x="{x_of(i):.1f}" y="{bottom + 12:.1f}" text-anchor="middle" class="tick">{i}</text>'
        for i in range(0, count, stride)
    )


def _fraction_bars(
    runs: Sequence[tuple[Sequence[tuple[int, LayerStats]], bool]], x_of: _XOf, step: float, panel: _Panel
) -> str:
    slot = step * 0.8 / (2 * len(runs))
    bars = []
    for order, (run, faint) in enumerate(runs):
        opacity = ' fill-opacity="0.45"' if faint else ""
        for which, colour in ((0, "#7f7f7f"), (1, "#9467bd")):
            for i, row in run:
                fraction = (
                    (row.dead.fraction if row.dead is not None else None)
                    if which == 0
                    else (row.saturation.fraction if row.saturation is not None else None)
                )
                if not fraction:
                    continue
                x = x_of(i) - step * 0.4 + slot * (2 * order + which)
                h = panel.height * min(fraction, 1.0)
                name = "dead" if which == 0 else "saturated"
                bars.append(
                    f'<rect x="{x:.1f}" y="{panel.top + panel.height - h:.1f}" '
                    f'width="{max(slot, 0.8):.1f}" height="{h:.1f}" fill="{colour}"{opacity}>'
                    f"<title>#{row.index}: {fraction:.0%} {name}</title></rect>"
                )
    return "".join(bars)


# ---------------------------------------------------------------- the table

_COLUMNS = (
    "#",
    "layer",
    "type",
    "module",
    "mean",
    "var",
    "min",
    "max",
    "dead",
    "sat",
    "|dL/dy|",
    "|dL/dW|",
    "|dL/dW|/|W|",
    "findings",
)
_NUMERIC = {"#", "mean", "var", "min", "max", "dead", "sat", "|dL/dy|", "|dL/dW|", "|dL/dW|/|W|"}


def _table(report: Report) -> str:
    by_layer = _findings_by_layer(report)
    header = "".join(
        f'<th data-type="{"num" if name in _NUMERIC else "text"}" tabindex="0" '
        f'title="sort by {_e(name)}">{_e(name)}</th>'
        for name in _COLUMNS
    )
    body = "\n".join(_table_row(row, by_layer.get(row.name, [])) for row in report.layers)
    controls = (
        f'<div class="controls"><input type="search" id="row-filter" placeholder="filter by name, type, '
        f'module or rule" aria-label="filter rows"> <label><input type="checkbox" id="only-findings"> '
        f'rows with findings only</label> <label>rows per page <select id="page-size"><option>50</option>'
        f'<option selected>{TABLE_PAGE_ROWS}</option><option>250</option><option value="0">all</option>'
        f'</select></label> <span class="pager"><button type="button" id="prev-page">‹ previous</button> '
        f'<span id="page-info"></span> <button type="button" id="next-page">next ›</button></span></div>'
    )
    return (
        f'<section id="layers"><h2>Layers</h2><p class="muted">Click a column header to sort (again to '
        f"reverse). Values are over the whole probe; — means undefined (non-finite output).</p>{controls}"
        f'<div class="table-wrap"><table id="layer-table"><thead><tr>{header}</tr></thead>\n<tbody>\n{body}\n'
        f"</tbody></table></div></section>"
    )


def _cell(text: str, sort: str | None = None, css: str | None = None) -> str:
    attributes = (f' data-v="{sort}"' if sort is not None else "") + (f' class="{css}"' if css else "")
    return f"<td{attributes}>{_e(text)}</td>"


def _table_row(row: LayerStats, findings: Sequence[Finding]) -> str:
    out = row.output
    nonfinite = out.nan + out.inf
    severity = _worst(findings)
    css = f' class="sev-{severity.value}"' if severity else (' class="sev-error"' if nonfinite else "")
    type_text = row.type if row.fn is None or row.fn == row.type else f"{row.type} ({row.fn})"
    dead = row.dead.fraction if row.dead is not None else None
    sat = row.saturation.fraction if row.saturation is not None else None
    grad_norm = row.grad.norm if row.grad is not None else None
    ratio = row.grad.ratio if row.grad is not None else None
    cells = [
        _cell(str(row.index), _sort_value(row.index)),
        _cell(row.name or "(root)", css="name"),
        _cell(type_text),
        _cell(row.module or "(root)", css="module"),
        _cell(fmt(out.mean) if not nonfinite else f"{out.nan} NaN", _sort_value(out.mean)),
        _cell(fmt(out.var) if not nonfinite else f"{out.inf} Inf", _sort_value(out.var)),
        _cell(fmt(out.min), _sort_value(out.min)),
        _cell(fmt(out.max), _sort_value(out.max)),
        _cell(f"{row.dead.units}/{row.dead.total}" if row.dead is not None else "", _sort_value(dead)),
        _cell(f"{sat:.0%}" if sat is not None else "", _sort_value(sat)),
        _cell(fmt(row.output_grad_norm), _sort_value(row.output_grad_norm)),
        _cell(fmt(grad_norm) if row.grad is not None else "", _sort_value(grad_norm)),
        _cell(fmt(ratio) if row.grad is not None else "", _sort_value(ratio)),
        _cell(" ".join(sorted({f.code for f in findings}))),
    ]
    return f'<tr id="{_row_anchor(row)}"{css}>{"".join(cells)}</tr>'


# ---------------------------------------------------------------- histograms

_HIST_WIDTH = 200
_HIST_HEIGHT = 44


def _histogram_section(report: Report) -> str:
    edges = report.histogram_edges
    rows = [row for row in report.layers if row.histograms is not None]
    if edges is None or not rows:
        return (
            '<section id="histograms"><h2>Histograms</h2><p class="muted">Not collected: run with '
            f"<code>{flag_of('histograms')}</code> (on by default with <code>{flag_of('html')}</code>)."
            "</p></section>"
        )
    bins = len(edges) + 1
    by_layer = _findings_by_layer(report)
    axis = _histogram_axis(edges)
    groups = []
    for start in range(0, len(rows), HISTOGRAM_GROUP_ROWS):
        chunk = rows[start : start + HISTOGRAM_GROUP_ROWS]
        severity = _worst(f for row in chunk for f in by_layer.get(row.name, ()))
        flag = f' <span class="badge sev-{severity.value}">findings</span>' if severity else ""
        cards = "".join(_histogram_card(row, bins, by_layer.get(row.name, [])) for row in chunk)
        summary = (
            f"rows {chunk[0].index}–{chunk[-1].index}: {_e(chunk[0].name or '(root)')} … "
            f"{_e(chunk[-1].name or '(root)')}{flag}"
        )
        # Groups holding findings start open: they are what a reader came for.
        groups.append(
            f'<details class="hist-group"{" open" if severity else ""}><summary>{summary}</summary>'
            f'<div class="cards">{cards}</div></details>'
        )
    explanation = (
        '<p class="muted">Counts per fixed bin over the whole probe (every micro-batch), on a '
        "symmetric-log axis: four bins per decade from 1e-8 to 1e4 on each side, the centre bin for "
        "|x| ≤ 1e-8 (exact zeros land there), overflow bins at both ends. Bar height ∝ √count, so that "
        "a spike of zeros does not flatten the rest. Output in blue, dL/dOutput in green.</p>"
    )
    overview = (
        '<h3>Over depth</h3><p class="muted">Each column is one row\'s histogram (rows in execution '
        "order, left to right; values from -1e4 at the bottom to 1e4 at the top), shaded by √(count / the "
        "column's largest count): the distributions of Glorot &amp; Bengio's figures, for every layer at "
        "once. Grey columns have no histogram.</p>"
        + depth_heatmap_svg(report.layers, edges, output=True)
        + depth_heatmap_svg(report.layers, edges, output=False)
        + "<h3>Per layer</h3>"
    )
    return (
        f'<section id="histograms"><h2>Histograms ({len(rows)} rows)</h2>{explanation}{overview}'
        f'<svg width="0" height="0" style="position:absolute" aria-hidden="true"><defs>{axis}</defs></svg>'
        f"{''.join(groups)}</section>"
    )


_HEATMAP_HEIGHT = 160
_HEATMAP_LEVELS = 32  # shades from white to the full colour; enough for a √count scale
_HEATMAP_COLOURS = {True: (0x1F, 0x77, 0xB4), False: (0x2C, 0xA0, 0x2C)}  # output blue, gradient green
_NO_HISTOGRAM = (0xDD, 0xDD, 0xDD)


def depth_heatmap_svg(rows: Sequence[LayerStats], edges: Sequence[float], *, output: bool) -> str:
    """All rows' output (or dL/dOutput) histograms as one image: a column per row, a pixel per bin.

    A palette PNG written here (no imaging library), one byte per pixel in _HEATMAP_LEVELS shades:
    500 rows x 99 bins cost at most ~65 KB in base64 whatever the counts, where the same picture as
    SVG rectangles would cost megabytes. It is scaled up without smoothing.
    """
    bins = len(edges) + 1
    no_histogram = _HEATMAP_LEVELS  # palette index of the grey of a column without a histogram
    columns: list[list[int]] = []
    for row in rows:
        counts = None
        if row.histograms is not None:
            counts = row.histograms.output if output else row.histograms.output_grad
        if counts is None or len(counts) != bins or max(counts, default=0) <= 0:
            columns.append([no_histogram] * bins)
            continue
        top = max(counts)
        columns.append([round(math.sqrt(c / top) * (_HEATMAP_LEVELS - 1)) for c in counts])
    if not columns:
        return ""
    # Image rows top to bottom: the largest values (last bin) first.
    scanlines = bytearray()
    for bin_index in reversed(range(bins)):
        scanlines.append(0)  # PNG filter type 0 (none) for this scanline
        scanlines.extend(column[bin_index] for column in columns)
    colour = _HEATMAP_COLOURS[output]
    palette = [_tint(colour, level / (_HEATMAP_LEVELS - 1)) for level in range(_HEATMAP_LEVELS)] + [_NO_HISTOGRAM]
    image = base64.b64encode(png_indexed(len(columns), bins, bytes(scanlines), palette)).decode("ascii")
    plot_width = _CHART_WIDTH - _PLOT_LEFT - _PLOT_RIGHT
    top_y = 16
    step = plot_width / len(columns)

    def y_at_edge(index: int) -> float:
        # The boundary above bin ``index`` (bins are drawn upside down: bin 0 at the bottom).
        return top_y + (bins - 1 - index) / bins * _HEATMAP_HEIGHT

    ticks = []
    for value, label in ((1e4, "1e4"), (1.0, "1"), (1e-4, "1e-4"), (-1e-4, "-1e-4"), (-1.0, "-1"), (-1e4, "-1e4")):
        if value in edges:
            y = y_at_edge(list(edges).index(value))
            ticks.append(f'<text x="{_PLOT_LEFT - 4}" y="{y + 4:.1f}" text-anchor="end" class="tick">{label}</text>')
    centre = top_y + (bins - bins // 2 - 0.5) / bins * _HEATMAP_HEIGHT
    ticks.append(f'<text x="{_PLOT_LEFT - 4}" y="{centre + 4:.1f}" text-anchor="end" class="tick">0</text>')
    bottom = top_y + _HEATMAP_HEIGHT
    row_ticks = _row_ticks(len(columns), lambda i: _PLOT_LEFT + step * (i + 0.5), bottom)
    title = "output" if output else "dL/dOutput"
    return (
        f'<svg class="heatmap" viewBox="0 0 {_CHART_WIDTH} {bottom + 18:.0f}" role="img">'
        f"<title>{title} histograms over depth</title>"
        f'<text x="{_PLOT_LEFT}" y="{top_y - 4}" class="panel-title">{title}</text>'
        f'<image x="{_PLOT_LEFT}" y="{top_y}" width="{plot_width}" height="{_HEATMAP_HEIGHT}" '
        f'preserveAspectRatio="none" href="data:image/png;base64,{image}"/>'
        f'<rect class="frame" x="{_PLOT_LEFT}" y="{top_y}" width="{plot_width}" '
        f'height="{_HEATMAP_HEIGHT}"/>{"".join(ticks)}{row_ticks}</svg>'
    )


def _tint(colour: tuple[int, int, int], shade: float) -> tuple[int, int, int]:
    """White blended towards ``colour`` by ``shade`` (0: white, 1: the colour)."""
    red, green, blue = (round(255 + (channel - 255) * shade) for channel in colour)
    return red, green, blue


def png_indexed(width: int, height: int, scanlines: bytes, palette: Sequence[tuple[int, int, int]]) -> bytes:
    """A minimal 8-bit palette PNG; ``scanlines`` holds each row's filter byte, then one palette
    index per pixel."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)  # 8 bits, palette, no interlace
    colours = b"".join(bytes(entry) for entry in palette)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"PLTE", colours)
        + chunk(b"IDAT", zlib.compress(scanlines, 9))
        + chunk(b"IEND", b"")
    )


def _histogram_axis(edges: Sequence[float]) -> str:
    """Shared decoration of every histogram (baseline and ticks at ±1, ±1e-4 and 0), defined once."""
    bins = len(edges) + 1
    width = _HIST_WIDTH / bins
    marks = []
    for value, label in ((-1.0, "-1"), (-1e-4, "-1e-4"), (1e-4, "1e-4"), (1.0, "1")):
        # Bin i covers (edges[i-1], edges[i]]: the tick sits at the right end of the bin whose edge is the value.
        if value in edges:
            x = (edges.index(value) + 1) * width
            marks.append(
                f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{_HIST_HEIGHT}" y2="{_HIST_HEIGHT + 3}"/>'
                f'<text x="{x:.1f}" y="{_HIST_HEIGHT + 11}" text-anchor="middle">{label}</text>'
            )
    centre = (bins // 2 + 0.5) * width
    marks.append(
        f'<line x1="{centre:.1f}" x2="{centre:.1f}" y1="{_HIST_HEIGHT}" y2="{_HIST_HEIGHT + 3}"/>'
        f'<text x="{centre:.1f}" y="{_HIST_HEIGHT + 11}" text-anchor="middle">0</text>'
    )
    return (
        f'<g id="hist-axis" class="hist-axis"><line x1="0" x2="{_HIST_WIDTH}" y1="{_HIST_HEIGHT}" '
        f'y2="{_HIST_HEIGHT}"/>{"".join(marks)}</g>'
    )


def histogram_svg(counts: Sequence[int], *, colour: str, label: str) -> str:
    """One histogram as one step-outline path, one unit of x per bin (scaled to the card's width).

    The outline is written as vertical moves and runs of equal height, so a histogram costs at
    most about 6 bytes per bin whatever its data (a full 99-bin histogram is about 0.6 KB): this is
    what keeps a 500-row page under SIZE_BOUND_500_ROWS even when every bin holds values.
    """
    bins = len(counts)
    top = max(counts) if counts else 0
    if top <= 0:
        shape = f'<text x="4" y="{_HIST_HEIGHT / 2}" class="muted">no finite values</text>'
    else:
        scale = _HIST_HEIGHT / math.sqrt(top)
        # Whole pixels (the card is 44 px high); a bin that holds anything is at least 1 px high, so
        # that a single value in a far bin stays visible next to a bin of thousands.
        tops = [_HIST_HEIGHT - (max(round(math.sqrt(c) * scale), 1) if c > 0 else 0) for c in counts]
        steps: list[str] = []
        run_top, run_length = tops[0], 0
        for value in tops:
            if value == run_top:
                run_length += 1
                continue
            steps.append(f"V{run_top}h{run_length}")
            run_top, run_length = value, 1
        steps.append(f"V{run_top}h{run_length}")
        outline = f"M0 {_HIST_HEIGHT}{''.join(steps)}V{_HIST_HEIGHT}z"
        shape = f'<path transform="scale({_HIST_WIDTH / bins:.5f} 1)" d="{outline}" fill="{colour}"/>'
    # The <title> is the chart's accessible name and its tooltip (no aria-label: it would repeat it).
    return (
        f'<svg class="hist" viewBox="0 0 {_HIST_WIDTH} {_HIST_HEIGHT + 13}" role="img">'
        f'<title>{_e(label)}</title><use href="#hist-axis"/>{shape}</svg>'
    )


def _histogram_card(row: LayerStats, bins: int, findings: Sequence[Finding]) -> str:
    histograms = row.histograms
    assert histograms is not None
    name = row.name or "(root)"
    parts = []
    for counts, colour, what in (
        (histograms.output, "#1f77b4", "output"),
        (histograms.output_grad, "#2ca02c", "dL/dOutput"),
    ):
        if counts is None:
            parts.append(f'<div class="muted">{what}: not collected</div>')
        elif len(counts) != bins:
            parts.append(f'<div class="muted">{what}: {len(counts)} counts for {bins} bins (not drawn)</div>')
        else:
            parts.append(histogram_svg(counts, colour=colour, label=f"#{row.index} {what}: {sum(counts):,} values"))
    codes = " ".join(sorted({f.code for f in findings}))
    severity = _worst(findings)
    css = f" sev-{severity.value}" if severity else ""
    return (
        f'<figure class="card{css}"><figcaption><a href="#{_row_anchor(row)}" class="row-link">'
        f'#{row.index} {_e(name)}</a> <span class="muted">{_e(row.type)}</span> {_e(codes)}</figcaption>'
        f"{''.join(parts)}</figure>"
    )


# ---------------------------------------------------------------- gradient through time


def _through_time_section(report: Report) -> str:
    """One card per recurrent layer and direction: ||dL/dh_t|| over t, with the decay rate, the
    horizon, the recurrent weights' spectral radii and the gate statistics the probe recorded."""
    cards = []
    for row in report.layers:
        through_time = row.through_time
        if through_time is None:
            continue
        heading = f'#{row.index} {_e(row.name)} <span class="muted">{_e(row.type)}</span>'
        if not through_time.ok:
            cards.append(
                f'<figure class="card wide"><figcaption>{heading}</figcaption><p class="muted">'
                f"not measured: {_e(through_time.reason or 'no reason given')}</p></figure>"
            )
            continue
        for trace in through_time.directions:
            cards.append(
                f'<figure class="card wide"><figcaption>{heading} · layer {trace.layer} '
                f"{_e(trace.direction)}</figcaption>{through_time_svg(trace.grad_norms)}"
                f'<div class="muted">{_trace_facts(trace, through_time.horizon_fraction)}</div></figure>'
            )
    if not cards:
        return ""  # no recurrent layer: the section would only be noise
    return (
        f'<section id="through-time"><h2>Gradient through time</h2><p class="muted">‖dL/dh<sub>t</sub>‖ '
        f"per time step t (log scale), summed over the probe: how far back from the last step the gradient "
        f"reaches (gradcheck's docs/theory.md#gradient-through-time).</p>"
        f'<div class="cards">{"".join(cards)}</div></section>'
    )


def _trace_facts(trace: DirectionTrace, horizon_fraction: float) -> str:
    facts = [
        f"{trace.steps} steps",
        f"decay per step {fmt(trace.decay_rate)}",
        f"horizon {trace.horizon} step(s) (≥ {horizon_fraction:g} × the last step's norm)",
    ]
    if trace.spectral_radius:
        facts.append(
            "spectral radius of W_hh "
            + ", ".join(f"{_e(gate)} {fmt(value)}" for gate, value in trace.spectral_radius.items())
        )
    if trace.gates:
        facts.append(
            "gates "
            + ", ".join(
                f"{_e(gate)}: {stats.saturation:.0%} saturated, mean {fmt(stats.mean)}"
                for gate, stats in trace.gates.items()
            )
        )
    return " · ".join(f'<span class="fact">{fact}</span>' for fact in facts)


def through_time_svg(norms: Sequence[float | None]) -> str:
    width, height, left = 420.0, 120.0, 46.0
    positive = [v for v in norms if v is not None and v > 0 and math.isfinite(v)]
    if not positive:
        return '<p class="muted">no positive norms to draw</p>'
    low, high = math.floor(math.log10(min(positive))), math.ceil(math.log10(max(positive)))
    if high == low:
        high += 1
    steps = len(norms)
    plot = width - left - 6
    points = []
    zeros = []  # steps the gradient does not reach at all: ticks on the floor (no place on a log axis)
    for t, value in enumerate(norms):
        x = left + plot * (t / max(steps - 1, 1))
        if value == 0:
            zeros.append(f"M{x:.1f} {height - 18}v-6")
        if value is None or not value > 0 or not math.isfinite(value):
            continue
        y = 6 + (height - 24) * (1 - (math.log10(value) - low) / (high - low))
        points.append(f"{x:.1f},{y:.1f}")
    # Dots too when there are few points: a lone point (one step reached) is otherwise invisible.
    dots = (
        "".join(f'<circle cx="{p.split(",")[0]}" cy="{p.split(",")[1]}" r="1.8" fill="#2ca02c"/>' for p in points)
        if len(points) <= 60
        else ""
    )
    zero_marks = (f'<path d="{"".join(zeros)}" stroke="#2ca02c" stroke-width="1.5"/>') if zeros else ""
    labels = (
        f'<text x="{left - 4}" y="12" text-anchor="end" class="tick">1e{high}</text>'
        f'<text x="{left - 4}" y="{height - 16}" text-anchor="end" class="tick">1e{low}</text>'
        f'<text x="{left}" y="{height - 3}" class="tick">t = 0</text>'
        f'<text x="{width - 6}" y="{height - 3}" text-anchor="end" class="tick">t = {steps - 1}</text>'
    )
    return (
        f'<svg class="through-time" viewBox="0 0 {width:.0f} {height:.0f}" role="img" '
        f'aria-label="gradient norm per time step"><rect class="frame" x="{left}" y="6" '
        f'width="{plot}" height="{height - 24}"/>{labels}<polyline points="{" ".join(points)}" '
        f'fill="none" stroke="#2ca02c" stroke-width="1.5"/>{dots}{zero_marks}</svg>'
    )


# ---------------------------------------------------------------- inline CSS and JS

_CSS = """
:root{--fg:#1b1f24;--muted:#57606a;--line:#d0d7de;--bg:#fff;--stripe:#f6f8fa;--err:#d62728;--warn:#e07000;
--info:#1f77b4}
@media (prefers-color-scheme:dark){:root{--fg:#e6edf3;--muted:#9da7b3;--line:#30363d;--bg:#0d1117;--stripe:#161b22}}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:var(--fg);background:var(--bg);
margin:0 auto;padding:1rem 1.5rem;max-width:1400px}
h1{font-size:1.35rem;margin:.2rem 0 1rem}h2{font-size:1.15rem;border-bottom:1px solid var(--line);padding-bottom:.2rem}
.muted,.tick{color:var(--muted);fill:var(--muted)}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:.2rem 1rem}
dl.facts dt{font-weight:600}dl.facts dd{margin:0}
.badge{display:inline-block;padding:0 .45em;border-radius:.6em;font-size:.85em;border:1px solid var(--line)}
.badge.sev-error{background:var(--err);color:#fff;border-color:var(--err)}
.badge.sev-warning{background:var(--warn);color:#fff;border-color:var(--warn)}
.badge.sev-info{background:var(--info);color:#fff;border-color:var(--info)}
ul.findings{list-style:none;padding:0}li.finding{border-left:4px solid var(--line);padding:.3rem .7rem;margin:.4rem 0}
li.finding.sev-error{border-color:var(--err)}li.finding.sev-warning{border-color:var(--warn)}
li.finding.sev-info{border-color:var(--info)}.advice{color:var(--muted)}.ok{color:#2a7d2a}
ul.finding-rows{max-height:18rem;overflow-y:auto;font-size:.9em}
svg.depth-chart{width:100%;height:auto;max-width:1200px}svg text{font-size:11px;fill:var(--fg)}
.frame{fill:none;stroke:var(--line)}.grid{stroke:var(--line);stroke-dasharray:2 3}
.panel-title{font-weight:600}.nonfinite{fill:var(--err);font-weight:700}
.legend .key{display:inline-block;width:1.2em;height:.6em;vertical-align:middle}
.key.var{background:#1f77b4}.key.grad{background:#2ca02c}.key.dead{background:#7f7f7f}.key.sat{background:#9467bd}
.controls{margin:.5rem 0;display:flex;flex-wrap:wrap;gap:.4rem 1rem;align-items:center}
.table-wrap{overflow-x:auto}table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{padding:.2rem .5rem;border-bottom:1px solid var(--line);text-align:right;white-space:nowrap}
td.name,td.module,th:nth-child(2),th:nth-child(3),th:nth-child(4),td:nth-child(3){text-align:left}
td.name{white-space:normal;word-break:break-all;min-width:8rem}
th{cursor:pointer;user-select:none;position:sticky;top:0;background:var(--bg)}
th[aria-sort=ascending]::after{content:" ▲"}th[aria-sort=descending]::after{content:" ▼"}
tbody tr:nth-child(even){background:var(--stripe)}
tr.sev-error td{color:var(--err)}tr.sev-warning td{color:var(--warn)}tr.sev-info td{color:var(--info)}
tr:target{outline:2px solid var(--info)}
details.hist-group{border:1px solid var(--line);border-radius:4px;margin:.35rem 0;padding:.2rem .6rem}
details.hist-group summary{cursor:pointer}
.cards{display:flex;flex-wrap:wrap;gap:.6rem;margin:.5rem 0}
figure.card{margin:0;padding:.3rem;border:1px solid var(--line);border-radius:4px;width:210px}
figure.card.wide{width:440px}figure.card.sev-error{border-color:var(--err)}figure.card.sev-warning{border-color:var(--warn)}
figure.card figcaption{font-size:.85em;word-break:break-all}
svg.hist{width:200px;height:57px;display:block}.hist-axis line{stroke:var(--muted)}.hist-axis text{font-size:8px}
svg.heatmap{width:100%;height:auto;max-width:1200px}svg.heatmap image{image-rendering:pixelated}
svg.through-time{width:420px;height:120px}.fact{margin-right:.6em}
"""

# Sorting, filtering and paging of the layer table. Without JavaScript every row is simply shown.
_JS = r"""
(function () {
  "use strict";
  var table = document.getElementById("layer-table");
  if (!table) { return; }
  var body = table.tBodies[0];
  var rows = Array.prototype.slice.call(body.rows);
  var headers = Array.prototype.slice.call(table.tHead.rows[0].cells);
  var filter = document.getElementById("row-filter");
  var onlyFindings = document.getElementById("only-findings");
  var pageSize = document.getElementById("page-size");
  var info = document.getElementById("page-info");
  var page = 0;
  var sortColumn = -1;
  var descending = false;

  function key(row, column, numeric) {
    var cell = row.cells[column];
    if (numeric) {
      var raw = cell.getAttribute("data-v");
      return raw === null || raw === "" ? null : parseFloat(raw);
    }
    return cell.textContent.toLowerCase();
  }

  function visibleRows() {
    var text = filter.value.trim().toLowerCase();
    return rows.filter(function (row) {
      if (onlyFindings.checked && !row.className) { return false; }
      return !text || row.textContent.toLowerCase().indexOf(text) !== -1;
    });
  }

  function render() {
    var shown = visibleRows();
    var size = parseInt(pageSize.value, 10) || shown.length || 1;
    var pages = Math.max(1, Math.ceil(shown.length / size));
    page = Math.min(page, pages - 1);
    var first = page * size;
    var onPage = new Set(shown.slice(first, first + size));
    rows.forEach(function (row) { row.hidden = !onPage.has(row); });
    info.textContent = shown.length ? "rows " + (first + 1) + "–" + Math.min(first + size, shown.length) +
      " of " + shown.length + " (page " + (page + 1) + " of " + pages + ")" : "no rows match";
    document.getElementById("prev-page").disabled = page === 0;
    document.getElementById("next-page").disabled = page >= pages - 1;
  }

  function sortBy(column) {
    descending = column === sortColumn ? !descending : false;
    sortColumn = column;
    var numeric = headers[column].getAttribute("data-type") === "num";
    var sign = descending ? -1 : 1;
    rows.sort(function (a, b) {
      var ka = key(a, column, numeric), kb = key(b, column, numeric);
      if (ka === kb) { return 0; }
      if (ka === null) { return 1; }  // rows without a value go last either way
      if (kb === null) { return -1; }
      return (ka < kb ? -1 : 1) * sign;
    });
    var fragment = document.createDocumentFragment();
    rows.forEach(function (row) { fragment.appendChild(row); });
    body.appendChild(fragment);
    headers.forEach(function (th, i) {
      if (i === column) { th.setAttribute("aria-sort", descending ? "descending" : "ascending"); }
      else { th.removeAttribute("aria-sort"); }
    });
    page = 0;
    render();
  }

  headers.forEach(function (th, i) {
    th.addEventListener("click", function () { sortBy(i); });
    th.addEventListener("keydown", function (event) {
      if (event.key === "Enter" || event.key === " ") { event.preventDefault(); sortBy(i); }
    });
  });
  filter.addEventListener("input", function () { page = 0; render(); });
  onlyFindings.addEventListener("change", function () { page = 0; render(); });
  pageSize.addEventListener("change", function () { page = 0; render(); });
  document.getElementById("prev-page").addEventListener("click", function () { page -= 1; render(); });
  document.getElementById("next-page").addEventListener("click", function () { page += 1; render(); });

  // A link to a row (from a finding or a histogram) turns to the page that holds it.
  function reveal() {
    var target = location.hash ? document.getElementById(location.hash.slice(1)) : null;
    if (!target || target.parentNode !== body) { return; }
    filter.value = ""; onlyFindings.checked = false;
    var size = parseInt(pageSize.value, 10) || rows.length;
    page = Math.floor(rows.indexOf(target) / size);
    render();
    target.scrollIntoView({block: "center"});
  }
  window.addEventListener("hashchange", reveal);
  render();
  reveal();
})();
"""
