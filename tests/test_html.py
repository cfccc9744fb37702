"""The HTML report (render/html.py, ``--html``): self-contained, escaped, bounded in size for a
500-layer model, and working in a real browser (headless Chromium: no console errors, no network,
a sortable and paginated table, a screenshot that is not blank)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from gradcheck_cli.records import Report
from gradcheck_cli.render.html import HISTOGRAM_GROUP_ROWS, SIZE_BOUND_500_ROWS, TABLE_PAGE_ROWS, render_html
from tests._browser import chromium_page, is_blank, require_browser
from tests._reports import mixed_report
from tests.conftest import SAMPLES


class _Collector(HTMLParser):
    """Every tag with its attributes, in document order."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def _tags(page: str) -> list[tuple[str, dict[str, str | None]]]:
    collector = _Collector()
    collector.feed(page)
    return collector.tags


def _assert_self_contained(page: str) -> None:
    for tag, attrs in _tags(page):
        for name in ("src", "href", "xlink:href", "action", "data"):
            value = (attrs.get(name) or "").strip().lower()
            # Only in-page anchors and data: URLs; nothing to fetch from a server or another file.
            assert not value or value.startswith(("#", "data:")), f"<{tag} {name}={value!r}> is not self-contained"
        assert not (tag == "link" and attrs.get("rel") == "stylesheet"), "external stylesheet"
    assert not re.search(r"@import|url\(\s*['\"]?(https?:)?//", page), "CSS fetches something"
    assert "http://" not in page and "https://" not in page


@pytest.fixture(scope="module")
def deep_report() -> Report:
    """A probed 500-row model (250 x Linear + ReLU) with histograms: the size bound's case."""
    import torch
    from torch import nn

    from gradcheck_cli import api
    from gradcheck_cli.gate.rules import with_findings

    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(250):
        layers += [nn.Linear(16, 16), nn.ReLU()]
    probe = api.ProbeOptions(inputs=api.InputOptions(input_shape=((8, 16),)), histograms=True)
    report = with_findings(api.inspect_module(nn.Sequential(*layers), probe, name="deep_mlp"))
    assert len(report.layers) == 500
    return report


def test_page_is_self_contained_and_escaped() -> None:
    hostile = mixed_report(histograms=True)
    name = "<script>alert('x')</script>&"
    rows = (replace(hostile.layers[0], name=name), *hostile.layers[1:])
    page = render_html(replace(hostile, layers=rows))
    _assert_self_contained(page)
    assert name not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;&amp;" in page
    assert page.count("<script>") == 1  # the report's own, inline


def test_page_sections_follow_the_report() -> None:
    report = mixed_report(histograms=True)
    page = render_html(report)
    tags = _tags(page)
    row_ids = [attrs["id"] for tag, attrs in tags if tag == "tr" and (attrs.get("id") or "").startswith("row-")]
    assert row_ids == [f"row-{row.index}" for row in report.layers]
    # Findings are grouped by rule, worst first, and link to their rows.
    codes = [attrs["data-code"] for tag, attrs in tags if tag == "li" and "data-code" in attrs]
    assert codes == ["GC101", "GC102", "GC003"]
    links = {attrs["href"] for tag, attrs in tags if tag == "a" and "row-link" in (attrs.get("class") or "")}
    assert {"#row-1", "#row-3", "#row-5"} <= links
    # Two histograms (output, dL/dOutput) per row, each a single path, sharing one axis definition.
    histograms = [attrs for tag, attrs in tags if tag == "svg" and attrs.get("class") == "hist"]
    assert len(histograms) == 2 * len(report.layers)
    assert page.count('id="hist-axis"') == 1
    # The depth chart: a line per group and metric, the NaN row marked, the finding rows shaded.
    assert page.count('class="finding-span"') == 3
    assert page.count('class="nonfinite"') == 2  # row 4, in both log panels
    assert page.count('<svg class="heatmap"') == 2  # outputs and gradients over depth
    assert 'id="through-time"' not in page  # no recurrent row recorded it


def test_histograms_missing_says_how_to_get_them() -> None:
    page = render_html(mixed_report(histograms=False))
    assert "--histograms" in page and 'class="hist"' not in page


def test_histogram_bars_follow_the_counts() -> None:
    from gradcheck_cli.render.html import histogram_svg

    svg = histogram_svg([0, 4, 0, 1, 0, 0], colour="#000", label="x")
    # One x unit per bin; each step is (top of the bars, number of bins): heights ∝ sqrt(count), so
    # the bin of 4 is full height (top 0) and the bin of 1 is half (top 22); empty bins sit at 44.
    steps = [(int(top), int(run)) for top, run in re.findall(r"V(\d+)h(\d+)", svg)]
    assert steps == [(44, 1), (0, 1), (44, 1), (22, 1), (44, 2)]
    assert "scale(33.33333 1)" in svg  # 6 bins across the 200-unit card
    assert "no finite values" in histogram_svg([0, 0, 0], colour="#000", label="x")


def test_heatmap_columns_are_the_rows_histograms() -> None:
    import base64
    import io

    from PIL import Image

    from tests._reports import BINS

    report = mixed_report(histograms=True)
    page = render_html(report)
    (first, _) = re.findall(r'href="data:image/png;base64,([^"]+)"', page)
    image = Image.open(io.BytesIO(base64.b64decode(first))).convert("RGB")
    assert image.size == (len(report.layers), BINS)
    counts = report.layers[0].histograms.output  # type: ignore[union-attr]
    fullest = counts.index(max(counts))
    # Bin b is image row BINS-1-b (largest values on top); the fullest bin gets the full colour,
    # an empty one stays white.
    assert image.getpixel((0, BINS - 1 - fullest)) == (0x1F, 0x77, 0xB4)
    assert image.getpixel((0, BINS - 1)) == (255, 255, 255)
    assert counts[fullest + 1] < max(counts) and image.getpixel((0, BINS - 2 - fullest))[0] > 0x1F


def test_worst_case_500_rows_stay_under_the_documented_size() -> None:
    # Every histogram bin holding a random count (incompressible), a finding on every row, long
    # names: the bound holds for any data, not only for the probed model below.
    import random

    from gradcheck_cli.records import Histograms
    from tests._reports import BINS, finding, report, row

    noise = random.Random(0)
    rows = []
    for index in range(500):
        base = row(
            index, f"encoder.layers.{index // 4}.block.{index}.projection_with_a_long_name", dead=0.5, saturated=0.5
        )
        output, gradient = (tuple(noise.randint(1, 10**6) for _ in range(BINS)) for _ in range(2))
        rows.append(replace(base, histograms=Histograms(output=output, output_grad=gradient)))
    findings = tuple(finding("GC101", r.name) for r in rows)
    page = render_html(report(tuple(rows), findings, histograms=True))
    size = len(page.encode("utf-8"))
    assert size < SIZE_BOUND_500_ROWS, f"{size:,} bytes for 500 rows"


def test_gradient_through_time_is_drawn_for_recurrent_rows() -> None:
    from gradcheck_cli.records import DirectionTrace, GateStats, ThroughTime

    def trace(direction: str, norms: tuple[float, ...]) -> DirectionTrace:
        return DirectionTrace(
            layer=0,
            direction=direction,
            steps=len(norms),
            grad_norms=norms,
            decay_rate=0.3,
            horizon=2,
            spectral_radius={"hh": 0.9},
            gates={"input": GateStats(0.25, 0.5)},
        )

    rising = (0.0081, 0.027, 0.09, 0.3, 1.0)  # |dL/dh_t| grows towards the last step: it decays going back
    measured = ThroughTime(
        ok=True,
        reason=None,
        max_abs_error=1e-7,
        tolerance=1e-5,
        horizon_fraction=0.1,
        directions=(trace("forward", rising), trace("reverse", rising[::-1])),
    )
    failed = ThroughTime(
        ok=False,
        reason="unrolled <cell> did not match",
        max_abs_error=None,
        tolerance=None,
        horizon_fraction=0.1,
        directions=(),
    )
    report = mixed_report()
    rows = (
        replace(report.layers[0], type="RNN", through_time=measured),
        replace(report.layers[2], type="LSTM", through_time=failed),
        *report.layers[3:],
    )
    page = render_html(replace(report, layers=rows))
    assert 'id="through-time"' in page
    curves = re.findall(r'<svg class="through-time".*?<polyline points="([^"]+)"', page)
    assert len(curves) == 2  # one per direction
    ys = [float(p.split(",")[1]) for p in curves[0].split()]
    assert len(ys) == 5 and ys == sorted(ys, reverse=True)  # larger norms are higher on the page
    assert "layer 0 forward" in page and "layer 0 reverse" in page
    assert "decay per step 0.3" in page and "horizon 2 step(s)" in page and "input: 25% saturated" in page
    assert "not measured: unrolled &lt;cell&gt; did not match" in page


def test_probed_recurrent_model_gets_one_curve_per_layer_and_direction() -> None:
    import torch
    from torch import nn

    from gradcheck_cli import api

    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(4, 8, num_layers=2, bidirectional=True, batch_first=True)
            self.head = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out, _ = self.lstm(x)
            return self.head(out[:, -1])

    torch.manual_seed(0)
    probe = api.ProbeOptions(inputs=api.InputOptions(input_shape=((4, 12, 4),)), histograms=True)
    report = api.inspect_module(Tagger(), probe, name="tagger")
    page = render_html(report)
    for layer in (0, 1):
        for direction in ("forward", "reverse"):
            assert f"layer {layer} {direction}" in page
    assert page.count('<svg class="through-time"') == 4
    _assert_self_contained(page)


def test_histograms_of_micro_batches_draw_the_same_picture() -> None:
    # The probe merges histogram counts exactly across micro-batches (tests/test_probe.py); the page
    # drawn from 4 x 8 samples is then the one drawn from 32 at once, bar for bar.
    import torch
    from torch import nn

    from gradcheck_cli import api

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))

    def histograms(batch: int, batches: int) -> str:
        probe = api.ProbeOptions(inputs=api.InputOptions(input_shape=((batch, 8),), batches=batches), histograms=True)
        page = render_html(api.inspect_module(model, probe, name="mlp"))
        return page[page.index('<section id="histograms">') :]

    one, four = histograms(32, 1), histograms(8, 4)
    assert one.count('class="hist"') == 6
    assert one == four


def test_500_rows_stay_under_the_documented_size(deep_report: Report) -> None:
    page = render_html(deep_report)
    size = len(page.encode("utf-8"))
    assert size < SIZE_BOUND_500_ROWS, f"{size:,} bytes for 500 rows"
    _assert_self_contained(page)
    assert page.count('<tr id="row-') == 500
    assert page.count('class="hist-group"') == 500 // HISTOGRAM_GROUP_ROWS


def test_inspect_writes_html_with_histograms(cli: Any, tmp_path: Path) -> None:
    target = tmp_path / "report.html"
    code, out, err = cli(
        "inspect", SAMPLES / "sigmoid_saturated.pt", "--arch", f"{SAMPLES / 'models.py'}:sigmoid_mlp", "--html", target
    )
    assert code == 0, err
    page = target.read_text(encoding="utf-8")
    _assert_self_contained(page)
    assert "GC102" in page and 'class="hist"' in page  # --html turned the histograms on
    assert "sigmoid()#1" in out


# ---------------------------------------------------------------- in headless Chromium


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = require_browser()
    with chromium_page(executable) as page:
        yield page


def _column(page: Any, header: str) -> list[str | None]:
    return page.evaluate(
        "(() => { const t = document.getElementById('layer-table');"
        f" const i = Array.from(t.tHead.rows[0].cells).findIndex(c => c.textContent === {header!r});"
        " return Array.from(t.tBodies[0].rows).map(r => r.cells[i].getAttribute('data-v')); })()"
    )


def _click_header(page: Any, header: str) -> None:
    page.evaluate(
        f"Array.from(document.querySelectorAll('#layer-table th')).find(c => c.textContent === {header!r}).click()"
    )


def test_report_opens_sorts_and_renders_in_chromium(browser: Any, tmp_path: Path) -> None:
    target = tmp_path / "report.html"
    target.write_text(render_html(mixed_report(histograms=True)), encoding="utf-8")
    browser.open(target.as_uri())
    assert browser.errors() == []
    assert all(url.startswith(("file:", "data:")) for url in browser.requests()), browser.requests()

    # Sorting: ascending by variance, rows without a value last; a second click reverses.
    before = _column(browser, "var")
    _click_header(browser, "var")
    ascending = _column(browser, "var")
    assert ascending != before
    values = [float(v) for v in ascending if v]
    assert values == sorted(values) and ascending[-1] in ("", None)
    assert browser.evaluate("document.querySelector('#layer-table tbody tr').id") == "row-3"  # variance 0
    _click_header(browser, "var")
    descending = [float(v) for v in _column(browser, "var") if v]
    assert descending == sorted(values, reverse=True)
    _click_header(browser, "#")
    assert _column(browser, "#") == [repr(float(i)) for i in range(6)]

    # The screenshot shows a rendered page, not a blank one (and the check can tell them apart).
    shot = browser.screenshot()
    (tmp_path / "report.png").write_bytes(shot)
    assert not is_blank(shot)
    browser.open("about:blank")
    assert is_blank(browser.screenshot())
    assert browser.errors() == []


def test_500_row_report_is_paginated_in_chromium(browser: Any, deep_report: Report, tmp_path: Path) -> None:
    target = tmp_path / "deep.html"
    target.write_text(render_html(deep_report), encoding="utf-8")
    browser.open(target.as_uri())
    assert browser.errors() == []
    visible = "Array.from(document.querySelectorAll('#layer-table tbody tr')).filter(r => !r.hidden).map(r => r.id)"
    assert browser.evaluate(visible) == [f"row-{i}" for i in range(TABLE_PAGE_ROWS)]
    browser.evaluate("document.getElementById('next-page').click()")
    assert browser.evaluate(visible)[0] == f"row-{TABLE_PAGE_ROWS}"
    # A link to a row turns to the page that holds it.
    browser.evaluate("location.hash = '#row-450'")
    assert "row-450" in browser.evaluate(visible)
    # The filter narrows the table to matching rows.
    browser.evaluate(
        "const f = document.getElementById('row-filter'); f.value = 'relu'; f.dispatchEvent(new Event('input'))"
    )
    shown = browser.evaluate(visible)
    assert len(shown) == TABLE_PAGE_ROWS and all(int(r.split("-")[1]) % 2 == 1 for r in shown)
    # Histogram groups are collapsed unless they hold findings.
    closed = browser.evaluate("document.querySelectorAll('details.hist-group:not([open])').length")
    assert isinstance(closed, int) and closed >= 0
    assert not is_blank(browser.screenshot())
    assert browser.errors() == []
