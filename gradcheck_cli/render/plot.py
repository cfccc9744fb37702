"""The gradient-flow figure: per-layer statistics over depth, as matplotlib draws them.

Three panels share one x axis, the report's rows in execution order:

1. activation variance (log scale): Glorot & Bengio's forward picture, where a variance that
   shrinks or grows geometrically with depth shows a bad init (docs/theory.md#variance-through-a-layer);
2. output-gradient norm |dL/dy| (log scale): the backward picture, vanishing or exploding;
3. dead (ReLU) and saturated (sigmoid/tanh) fractions as bars (docs/theory.md#saturation, #dead-relus).

Findings are shaded on the layers they concern, in their severity's colour, and each rule is
labelled once, where it starts. A comparison figure overlays two runs (``reinit``'s before and
after, or `baseline`'s earlier report and this one): the earlier dashed and hatched.

matplotlib is an optional extra (``gradcheck-cli[plot]``) and is imported inside the functions
only, so that everything else works without it. Figures are built on ``matplotlib.figure.Figure``
directly, never through pyplot, so no global figure state or GUI backend is involved.
Nothing here computes a statistic: values are read from the records as they are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gradcheck_cli.choice import Choice
from gradcheck_cli.errors import MissingDependencyError, UsageError
from gradcheck_cli.records import Finding, LayerStats, Report, RowKind, Severity

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

SEVERITY_COLOURS = {Severity.ERROR: "#d62728", Severity.WARNING: "#ff7f0e", Severity.INFO: "#1f77b4"}
VARIANCE_COLOUR = "#1f77b4"
GRADIENT_COLOUR = "#2ca02c"
DEAD_COLOUR = "#7f7f7f"
SATURATED_COLOUR = "#9467bd"
NONFINITE_COLOUR = "#d62728"

# Layer names fit under the axis up to this many rows; beyond it the ticks are row numbers.
MAX_NAMED_TICKS = 40
PNG_DPI = 120

# Panel titles double as the axes' labels that tests and readers look for.
VARIANCE_PANEL = "activation variance"
GRADIENT_PANEL = "output-gradient norm |dL/dy|"
FRACTION_PANEL = "dead / saturated fraction"


class PlotFormat(Choice):
    PNG = "png"
    SVG = "svg"


def plot_format(path: Path) -> PlotFormat:
    """The figure format ``path`` asks for, by its suffix; refused before any model runs."""
    suffix = path.suffix.lower().lstrip(".")
    try:
        return PlotFormat(suffix)
    except ValueError:
        raise UsageError(
            f"`plot` {path}: the file name must end in .png or .svg", hint=f"e.g. `plot` {path.with_suffix('.png')}"
        ) from None


def require_matplotlib() -> None:
    """Fail early, with the install hint, when matplotlib is missing (exit 2 through the CLI)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingDependencyError("matplotlib", purpose="`plot`", extra="plot") from None


@dataclass(frozen=True)
class PlotSeries:
    """One run to draw: its rows in execution order and the findings that concern them."""

    label: str
    layers: tuple[LayerStats, ...]
    findings: tuple[Finding, ...] = ()

    @classmethod
    def from_report(cls, report: Report, label: str | None = None) -> PlotSeries:
        return cls(label=label or report.model.path, layers=report.layers, findings=report.findings)


def gradient_flow_figure(report: Report) -> Figure:
    """The figure for one report (inspect and check, with a plot asked for)."""
    run = PlotSeries.from_report(report, label="this run")
    figure = depth_figure([run])
    figure.suptitle(_title(f"{report.model.path}: gradient flow over depth ({len(report.layers)} rows)", run))
    return figure


def comparison_figure(
    before: Report | Sequence[LayerStats],
    after: Report | Sequence[LayerStats],
    *,
    before_label: str = "before",
    after_label: str = "after",
    title: str | None = None,
) -> Figure:
    """Before and after overlaid (reinit's plot, or check's plot with a baseline).

    Either side may be a report or just its rows (``ReinitReport.before``/``.after``). Rows are
    matched by (name, type) and drawn at the ``after`` run's positions; earlier rows with no
    counterpart are left out (the model changed).
    """
    series = [_series(before, before_label), _series(after, after_label)]
    figure = depth_figure(series)
    figure.suptitle(_title(title or f"gradient flow over depth: {before_label} vs {after_label}", series[-1]))
    return figure


def write_gradient_flow(report: Report, path: Path) -> None:
    save_figure(gradient_flow_figure(report), path)


def write_comparison(
    before: Report | Sequence[LayerStats],
    after: Report | Sequence[LayerStats],
    path: Path,
    *,
    before_label: str = "before",
    after_label: str = "after",
) -> None:
    save_figure(comparison_figure(before, after, before_label=before_label, after_label=after_label), path)


def save_figure(figure: Figure, path: Path) -> None:
    """Write PNG or SVG by suffix, whole, then renamed into place (as every output is written)."""
    import io

    from gradcheck_cli.fsutil import atomic_write_bytes

    file_format = plot_format(path)
    buffer = io.BytesIO()
    # SVG: fixed hash salt and no date, so the same report gives the same file.
    metadata = {"Date": None} if file_format is PlotFormat.SVG else None
    import matplotlib

    # A local rc context, not rcParams: the caller's matplotlib settings stay as they were.
    with matplotlib.rc_context({"svg.hashsalt": "gradcheck"}):
        figure.savefig(buffer, format=file_format.value, dpi=PNG_DPI, bbox_inches="tight", metadata=metadata)
    atomic_write_bytes(path, buffer.getvalue())


def depth_figure(series: Sequence[PlotSeries]) -> Figure:
    """Three stacked panels over depth; the last series is the primary one (solid, findings shown)."""
    require_matplotlib()
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    primary = series[-1]
    count = len(primary.layers)
    width = min(26.0, max(11.0, 6.0 + 0.12 * count))
    figure = Figure(figsize=(width, 8.5), layout="constrained")
    variance_axes, gradient_axes, fraction_axes = figure.subplots(
        3, 1, sharex=True, gridspec_kw={"height_ratios": [3, 3, 2]}
    )
    positions = _positions(primary.layers)
    overlay = len(series) > 1
    for order, run in enumerate(series):
        earlier = overlay and order < len(series) - 1
        rows = [(positions[_key(row)], row) for row in run.layers if _key(row) in positions]
        suffix = f" ({run.label})" if overlay else ""
        # Layers and activation calls alternate in most models (Linear, relu, Linear, ...); one line
        # each keeps the depth trend readable instead of a zigzag between the two.
        for group, group_rows in _row_groups(rows):
            _log_line(
                variance_axes,
                group_rows,
                [row.output.var for _, row in group_rows],
                colour=VARIANCE_COLOUR,
                label=f"variance, {group}{suffix}",
                earlier=earlier,
                group=group,
                gid=f"variance-{group}-{order}",
            )
            _log_line(
                gradient_axes,
                group_rows,
                [row.output_grad_norm for _, row in group_rows],
                colour=GRADIENT_COLOUR,
                label=f"|dL/dy|, {group}{suffix}",
                earlier=earlier,
                group=group,
                gid=f"gradient-{group}-{order}",
            )
        _fraction_bars(fraction_axes, rows, order=order, runs=len(series), earlier=earlier, suffix=suffix)
        _nonfinite_marks((variance_axes, gradient_axes), rows, earlier=earlier, order=order)
    _finding_marks((variance_axes, gradient_axes, fraction_axes), primary, positions)

    variance_axes.set_ylabel(VARIANCE_PANEL)
    gradient_axes.set_ylabel(GRADIENT_PANEL)
    fraction_axes.set_ylabel(FRACTION_PANEL)
    for axes in (variance_axes, gradient_axes):
        axes.set_yscale("log")
        axes.grid(True, which="major", alpha=0.3)
    fraction_axes.set_ylim(0, 1.05)
    fraction_axes.grid(True, axis="y", alpha=0.3)
    for axes in (variance_axes, gradient_axes, fraction_axes):
        # Outside the panels, so that no entry hides a layer's value.
        if axes.get_legend_handles_labels()[0]:
            axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    fraction_axes.set_xlim(-0.6, max(count, 1) - 0.4)
    fraction_axes.set_xlabel("depth: report row # in execution order")
    if count <= MAX_NAMED_TICKS:
        fraction_axes.set_xticks(range(count))
        fraction_axes.set_xticklabels([row.name or "(root)" for row in primary.layers], rotation=90, fontsize="x-small")
    else:
        fraction_axes.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=20))
    return figure


def _title(text: str, run: PlotSeries) -> str:
    # Findings about the whole model have no layer to shade: they are named in the title.
    model_level = sorted({f.code for f in run.findings if f.layer is None})
    return text + (f"\nmodel-level findings: {', '.join(model_level)}" if model_level else "")


def _series(source: Report | Sequence[LayerStats], label: str) -> PlotSeries:
    if isinstance(source, Report):
        return PlotSeries.from_report(source, label=label)
    return PlotSeries(label=label, layers=tuple(source))


def _key(row: LayerStats) -> tuple[str, str]:
    return row.name, row.type


def _positions(layers: Sequence[LayerStats]) -> dict[tuple[str, str], int]:
    positions: dict[tuple[str, str], int] = {}
    for position, row in enumerate(layers):
        positions.setdefault(_key(row), position)
    return positions


ACTIVATION_GROUP = "activation outputs"
LAYER_GROUP = "layer outputs"


def _row_groups(rows: Sequence[tuple[int, LayerStats]]) -> list[tuple[str, list[tuple[int, LayerStats]]]]:
    activations = [item for item in rows if item[1].kind is RowKind.ACTIVATION]
    layers = [item for item in rows if item[1].kind is not RowKind.ACTIVATION]
    return [(name, items) for name, items in ((LAYER_GROUP, layers), (ACTIVATION_GROUP, activations)) if items]


def _log_line(
    axes: Axes,
    rows: Sequence[tuple[int, LayerStats]],
    values: Sequence[float | None],
    *,
    colour: str,
    label: str,
    earlier: bool,
    group: str,
    gid: str,
) -> None:
    """A line over the positive values; zeros (an all-dead layer) are marked at the panel's floor,
    since a log axis cannot show them; missing values (non-finite outputs) leave a gap."""
    from matplotlib.transforms import blended_transform_factory

    xs = [float(x) for x, _ in rows]
    ys = [value if value is not None and value > 0 and math.isfinite(value) else math.nan for value in values]
    marker = "^" if group == ACTIVATION_GROUP else "o"
    linestyle = "--" if earlier else ("-" if group == LAYER_GROUP else ":")
    # Markers help on a few rows and clutter hundreds: they shrink with the row count.
    size = 4.0 if len(xs) <= 60 else (2.0 if len(xs) <= 200 else 0.0)
    (line,) = axes.plot(
        xs,
        ys,
        color=colour,
        label=label,
        marker=marker,
        markersize=size,
        linewidth=1.2,
        linestyle=linestyle,
        alpha=0.55 if earlier else 1.0,
        markerfacecolor="none" if earlier else colour,
    )
    line.set_gid(gid)
    zeros = [x for x, value in zip(xs, values, strict=True) if value == 0]
    if zeros:
        floor = blended_transform_factory(axes.transData, axes.transAxes)
        zero_label = f"exactly 0{' (earlier)' if earlier else ''}"
        if zero_label in axes.get_legend_handles_labels()[1]:
            zero_label = "_nolegend_"  # one legend entry for the zeros of both lines
        marks = axes.scatter(
            zeros,
            [0.02] * len(zeros),
            transform=floor,
            marker="v",
            color=colour,
            alpha=0.6 if earlier else 1.0,
            label=zero_label,
            zorder=3,
        )
        marks.set_gid(f"{gid}-zero")


def _fraction_bars(
    axes: Axes, rows: Sequence[tuple[int, LayerStats]], *, order: int, runs: int, earlier: bool, suffix: str
) -> None:
    # Dead and saturated bars sit side by side in each row's slot, one pair per run.
    slot = 0.8 / (2 * runs)
    dead = [(x, row.dead.fraction) for x, row in rows if row.dead is not None]
    saturated = [(x, row.saturation.fraction) for x, row in rows if row.saturation is not None]
    hatch = "//" if earlier else None
    alpha = 0.5 if earlier else 0.9
    for which, (points, colour, name) in enumerate(
        ((dead, DEAD_COLOUR, "dead"), (saturated, SATURATED_COLOUR, "saturated"))
    ):
        if not points:
            continue  # no such rows in this run: no empty legend entry either
        offset = -0.4 + slot * (2 * order + which) + slot / 2
        bars = axes.bar(
            [x + offset for x, _ in points],
            [value for _, value in points],
            width=slot,
            color=colour,
            alpha=alpha,
            hatch=hatch,
            label=f"{name}{suffix}",
        )
        for patch in bars.patches:
            patch.set_gid(f"{name}-{order}")


def _nonfinite_marks(
    panels: Sequence[Axes], rows: Sequence[tuple[int, LayerStats]], *, earlier: bool, order: int
) -> None:
    """Rows whose output held NaN/Inf have no variance to draw: an x at the top of both line panels."""
    from matplotlib.transforms import blended_transform_factory

    xs = [x for x, row in rows if row.output.nan or row.output.inf]
    if not xs:
        return
    for axes in panels:
        top = blended_transform_factory(axes.transData, axes.transAxes)
        marks = axes.scatter(
            xs,
            [0.97] * len(xs),
            transform=top,
            marker="x",
            color=NONFINITE_COLOUR,
            alpha=0.5 if earlier else 1.0,
            label="NaN/Inf output" + (" (earlier)" if earlier else ""),
            zorder=4,
        )
        marks.set_gid(f"nonfinite-{order}")


def _finding_marks(panels: Sequence[Axes], run: PlotSeries, positions: dict[tuple[str, str], int]) -> None:
    """Shade each finding's layer in every panel; label each rule once, at its first layer."""
    by_name: dict[str, int] = {}
    for row in run.layers:
        by_name.setdefault(row.name, positions[_key(row)])
    labelled: set[str] = set()
    labels_at: dict[int, int] = {}  # labels already placed near a position: stack, do not overlap
    slot = max(1, len(run.layers) // 60)
    for finding in run.findings:
        if finding.layer is None or finding.layer not in by_name:
            continue
        x = by_name[finding.layer]
        colour = SEVERITY_COLOURS[finding.severity]
        for axes in panels:
            span = axes.axvspan(x - 0.45, x + 0.45, color=colour, alpha=0.15, linewidth=0, zorder=0)
            span.set_gid(f"finding-{finding.code}-{x}")
        if finding.code not in labelled:
            labelled.add(finding.code)
            stacked = labels_at.get(x // slot, 0)
            labels_at[x // slot] = stacked + 1
            text = panels[0].annotate(
                finding.code,
                xy=(x, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(0, 2 + 9 * stacked),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize="x-small",
                color=colour,
                annotation_clip=False,
            )
            text.set_gid(f"finding-label-{finding.code}")
            # A legend entry per rule names it in full; the label above the panel stays short.
            panels[-1].fill_between(
                [], [], color=colour, alpha=0.3, label=f"{finding.code} {finding.rule} ({finding.severity.value})"
            )
