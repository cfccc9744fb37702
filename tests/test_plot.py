"""The gradient-flow figure (render/plot.py) and ``--plot``: panels and artists checked on the
matplotlib Figure object, files written in both formats, and the install hint without matplotlib."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from tests._reports import mixed_report
from tests.conftest import SAMPLES, one_line_error

pytest.importorskip("matplotlib", reason="the plot extra is not installed: pip install -e '.[plot]'")

from gradcheck_cli.render import plot

SIGMOID = (str(SAMPLES / "sigmoid_saturated.pt"), "--arch", f"{SAMPLES / 'models.py'}:sigmoid_mlp")


def _gids(axes: Any) -> set[str]:
    return {artist.get_gid() for artist in axes.get_children() if artist.get_gid()}


def _legend_labels(axes: Any) -> list[str]:
    legend = axes.get_legend()
    return [text.get_text() for text in legend.get_texts()] if legend else []


def test_figure_has_the_three_panels_over_depth() -> None:
    report = mixed_report()
    figure = plot.gradient_flow_figure(report)
    variance, gradient, fractions = figure.axes
    assert variance.get_ylabel() == plot.VARIANCE_PANEL and variance.get_yscale() == "log"
    assert gradient.get_ylabel() == plot.GRADIENT_PANEL and gradient.get_yscale() == "log"
    assert fractions.get_ylabel() == plot.FRACTION_PANEL and fractions.get_yscale() == "linear"
    # One x axis for all three: the rows in execution order, named when there are few.
    assert variance.get_shared_x_axes().joined(variance, fractions)
    assert [label.get_text() for label in fractions.get_xticklabels()] == [r.name for r in report.layers]

    # Layer outputs and activation outputs are separate lines; NaN leaves a gap, zero is not on the line.
    lines = {line.get_gid(): line for line in variance.get_lines()}
    layer_line = lines["variance-layer outputs-0"]
    assert list(layer_line.get_xdata()) == [0.0, 2.0, 4.0]
    y = list(layer_line.get_ydata())
    assert y[:2] == [4.0, 0.04] and y[2] != y[2]  # fc3's output held NaN: no point
    activation_line = lines["variance-activation outputs-0"]
    assert list(activation_line.get_xdata()) == [1.0, 3.0, 5.0]
    assert activation_line.get_ydata()[1] != activation_line.get_ydata()[1]  # variance 0: off a log axis...
    assert "variance-activation outputs-0-zero" in _gids(variance)  # ...so marked at the floor instead
    assert "nonfinite-0" in _gids(variance) and "nonfinite-0" in _gids(gradient)

    # Bars: one dead bar per row that has dead units counted, one saturated bar per saturation row.
    (dead,) = [c for c in fractions.containers if c.get_label() == "dead"]
    (saturated,) = [c for c in fractions.containers if c.get_label() == "saturated"]
    assert [round(p.get_height(), 3) for p in dead.patches] == [0.6, 1.0]
    assert [round(p.get_height(), 3) for p in saturated.patches] == [0.7]


def test_findings_are_marked_on_their_layers() -> None:
    figure = plot.gradient_flow_figure(mixed_report())
    variance, gradient, fractions = figure.axes
    for axes in (variance, gradient, fractions):
        # GC101 on rows 1 and 3, GC102 on row 5; the model-level GC003 has no layer to shade.
        assert {"finding-GC101-1", "finding-GC101-3", "finding-GC102-5"} <= _gids(axes)
        assert not any(gid.startswith("finding-GC003") for gid in _gids(axes))
    spans = [a for a in variance.patches if a.get_gid() == "finding-GC101-1"]
    assert spans and spans[0].get_facecolor()[:3] == pytest.approx((214 / 255, 39 / 255, 40 / 255), abs=0.01)
    # Each rule is labelled once, and named in full in the legend.
    labels = [t for t in variance.texts if (t.get_gid() or "").startswith("finding-label-")]
    assert sorted(t.get_text() for t in labels) == ["GC101", "GC102"]
    assert "GC101 dead-relu (error)" in _legend_labels(fractions)
    assert "GC003" in figure.get_suptitle()  # model-level findings are named in the title


def test_comparison_overlays_before_and_after() -> None:
    after = mixed_report()
    # The earlier run lacks the last row (the model changed): it is matched by name, not position.
    before = after.layers[:-1]
    figure = plot.comparison_figure(before, after)
    variance, _, fractions = figure.axes
    gids = {line.get_gid() for line in variance.get_lines()}
    assert {"variance-layer outputs-0", "variance-layer outputs-1"} <= gids
    earlier = next(line for line in variance.get_lines() if line.get_gid() == "variance-activation outputs-0")
    assert earlier.get_linestyle() == "--" and list(earlier.get_xdata()) == [1.0, 3.0]
    labels = _legend_labels(variance)
    assert any(label.endswith("(before)") for label in labels) and any(label.endswith("(after)") for label in labels)
    hatched = [c for c in fractions.containers if c.get_label() == "dead (before)"]
    assert hatched and all(p.get_hatch() == "//" for p in hatched[0].patches)


def test_many_rows_get_numbered_ticks() -> None:
    from tests._reports import report, row

    big = report(tuple(row(i, f"block.{i}") for i in range(120)))
    figure = plot.gradient_flow_figure(big)
    labels = [t.get_text() for t in figure.axes[-1].get_xticklabels()]
    assert len(labels) < 40 and "block.7" not in labels


@pytest.mark.parametrize("suffix", ["png", "svg"])
def test_inspect_writes_the_figure(cli: Any, tmp_path: Path, suffix: str) -> None:
    target = tmp_path / f"flow.{suffix}"
    code, out, err = cli("inspect", *SIGMOID, "--plot", target)
    assert code == 0, err
    data = target.read_bytes()
    if suffix == "png":
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
    else:
        text = data.decode()
        assert "<svg" in text and plot.VARIANCE_PANEL in text
        assert 'id="finding-label-GC102"' in text  # the saturated sigmoids are marked
    assert "layers.0" in out  # the table is still printed


def test_plot_suffix_is_checked_before_probing(cli: Any, tmp_path: Path) -> None:
    code, _, err = cli("inspect", tmp_path / "does-not-exist.pt", "--plot", tmp_path / "flow.pdf")
    assert code == 2
    one_line_error(err)
    assert ".png or .svg" in err  # not the missing model: the flag is refused first


def test_missing_matplotlib_gives_the_install_hint(cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes `import matplotlib` raise ImportError, as if it were not installed.
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    target = tmp_path / "flow.png"
    code, out, err = cli("inspect", *SIGMOID, "--plot", target)
    assert code == 2
    one_line_error(err)
    assert "pip install 'gradcheck-cli[plot]'" in err
    assert not target.exists() and out == ""
    # Everything else keeps working without matplotlib, the HTML report included.
    page = tmp_path / "report.html"
    code, out, err = cli("inspect", *SIGMOID, "--html", page)
    assert code == 0, err
    assert "layers.0" in out and page.read_text().startswith("<!DOCTYPE html>")


def test_svg_is_deterministic(tmp_path: Path) -> None:
    # No date, a fixed hash salt: the same report gives the same bytes (diffable CI artifacts).
    first, second = tmp_path / "a.svg", tmp_path / "b.svg"
    plot.write_gradient_flow(mixed_report(), first)
    plot.write_gradient_flow(mixed_report(), second)
    assert first.read_bytes() == second.read_bytes()
    assert b"<dc:date>" not in first.read_bytes()
