"""``--plot`` and ``--html``, shared by the commands that probe a model (inspect, check, reinit).

Both are checked before any model runs (a wrong suffix, a missing directory or a missing
matplotlib would otherwise surface only after a long probe) and written after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gradcheck_cli.records import LayerStats, Report


def check_visual_outputs(*, plot: Path | None, html: Path | None) -> None:
    """Refuse up front what could not be written at the end; raises GradcheckError (exit 2)."""
    from gradcheck_cli.fsutil import check_writable_output

    if plot is not None:
        from gradcheck_cli.render.plot import plot_format, require_matplotlib

        plot_format(plot)
        check_writable_output(plot, force=True)
        require_matplotlib()
    if html is not None:
        check_writable_output(html, force=True)


def write_visual_outputs(
    report: Report,
    *,
    plot: Path | None,
    html: Path | None,
    before: Report | Sequence[LayerStats] | None = None,
    before_label: str = "before",
    after_label: str = "after",
) -> None:
    """Write the figure and the HTML report; with ``before``, both overlay it under ``report``."""
    from gradcheck_cli.fsutil import atomic_write_text

    if plot is not None:
        from gradcheck_cli.render import plot as plotting

        if before is None:
            plotting.write_gradient_flow(report, plot)
        else:
            plotting.write_comparison(before, report, plot, before_label=before_label, after_label=after_label)
    if html is not None:
        from gradcheck_cli.render.html import render_html

        atomic_write_text(html, render_html(report, compare_with=before, compare_label=before_label))


def per_model_paths(path: Path | None, models: Sequence[str]) -> list[Path | None]:
    """Where each model's picture goes: ``path`` itself for one model; for several (``check`` on a
    glob), ``<stem>-<model stem><suffix>`` beside it, numbered where two models share a stem."""
    if path is None:
        return [None] * len(models)
    if len(models) == 1:
        return [path]
    stems = [Path(model).stem for model in models]
    paths: list[Path | None] = []
    for index, stem in enumerate(stems):
        unique = stem if stems.count(stem) == 1 else f"{stem}-{index + 1}"
        paths.append(path.with_name(f"{path.stem}-{unique}{path.suffix}"))
    return paths
