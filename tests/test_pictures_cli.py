"""``--plot`` and ``--html`` on the commands other than ``inspect``: ``check`` (one picture per
model, the ``--baseline`` run overlaid) and ``reinit`` (before and after overlaid)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SAMPLES, one_line_error


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # relative model paths, and no pyproject.toml above a tmp dir
    for name in ("relu_healthy.pt2", "tanh_old_init.pt2"):
        shutil.copy(SAMPLES / name, tmp_path / name)
    return tmp_path


def test_check_draws_one_picture_per_model(cli: Any, workdir: Path) -> None:
    pytest.importorskip("matplotlib")
    code, _, err = cli("check", "*.pt2", "--isolated", "--exit-zero", "--plot", "flow.svg", "--html", "gate.html")
    assert code == 0, err
    for stem in ("relu_healthy", "tanh_old_init"):
        assert "<svg" in (workdir / f"flow-{stem}.svg").read_text()
        page = (workdir / f"gate-{stem}.html").read_text()
        assert 'class="hist"' in page  # --html turned the histograms on
    assert "GC103" in (workdir / "gate-tanh_old_init.html").read_text()  # variance collapses with depth
    assert "No findings" in (workdir / "gate-relu_healthy.html").read_text()
    assert not (workdir / "flow.svg").exists()


def test_check_overlays_the_baseline(cli: Any, workdir: Path) -> None:
    pytest.importorskip("matplotlib")
    model = "tanh_old_init.pt2"
    code, _, err = cli("check", model, "--isolated", "--exit-zero", "--format", "json=baseline.json")
    assert code == 0, err
    code, _, err = cli(
        "check", model, "--isolated", "--baseline", "baseline.json", "--plot", "flow.svg", "--html", "gate.html"
    )
    assert code == 0, err  # the findings are all in the baseline
    figure = (workdir / "flow.svg").read_text()
    assert "(baseline)" in figure and "(this run)" in figure
    page = (workdir / "gate.html").read_text()
    assert "dashed, faint: baseline" in page and 'stroke-dasharray="5 3"' in page


def test_check_refuses_a_bad_plot_name_before_probing(cli: Any, workdir: Path) -> None:
    code, _, err = cli("check", "no-such-model.pt", "--isolated", "--plot", "flow.jpg")
    assert code == 2
    one_line_error(err)
    assert ".png or .svg" in err


def test_reinit_overlays_before_and_after(cli: Any, workdir: Path) -> None:
    pytest.importorskip("matplotlib")
    code, _, err = cli("reinit", "tanh_old_init.pt2", "--dry-run", "--plot", "flow.svg")
    assert code == 0, err
    figure = (workdir / "flow.svg").read_text()
    assert "(before)" in figure and "(after)" in figure and "variance, layer outputs" in figure


def test_reinit_refuses_a_bad_plot_name_before_rewriting(cli: Any, workdir: Path) -> None:
    code, _, err = cli("reinit", "tanh_old_init.pt2", "-o", "new.pt2", "--plot", "flow.gif")
    assert code == 2
    one_line_error(err)
    assert not (workdir / "new.pt2").exists()
