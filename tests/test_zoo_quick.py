"""bench/zoo.py: the quick sweep runs end to end, and its bookkeeping says what happened."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import ROOT

pytest.importorskip("timm")
pytest.importorskip("torchvision")


def _zoo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("zoo", ROOT / "bench" / "zoo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["zoo"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


zoo = _zoo()


def test_quick_sweep_runs_every_category_through_the_cli(tmp_path: Path) -> None:
    out, work = tmp_path / "results", tmp_path / "work"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "zoo.py"),
            "--quick",
            "--out",
            str(out),
            "--workdir",
            str(work),
            "--timeout",
            "240",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = (out / "zoo_quick.md").read_text()
    assert "Traceback" not in text
    for category in zoo.CATEGORIES:
        data = json.loads((out / f"zoo_{category}_quick.json").read_text())
        rows = data["rows"]
        assert rows, category
        for row in rows:
            assert row["ops"]["inspect"]["status"] == "ok", row
            assert row["ops"]["reinit"]["status"] == "ok", row
        assert f"### {category}" in text
    # The quick subset holds BatchNorm networks of three kinds: fold-bn ran and folded them all.
    timm_row = json.loads((out / "zoo_timm_quick.json").read_text())["rows"][0]
    assert timm_row["job"]["name"] == "regnetx_002"
    assert timm_row["ops"]["fold-bn"] == {"status": "ok", "reason": "44/44 folded"}
    onnx_row = json.loads((out / "zoo_onnx_quick.json").read_text())["rows"][0]
    assert onnx_row["ops"]["fold-bn"]["status"] == "ok"


def test_outcomes_are_classified_from_exit_codes_and_crashes() -> None:
    assert zoo._outcome(0, "", None).status == "ok"
    declined = zoo._outcome(2, "error: no BatchNorm here\nhint: pass --x\n", None)
    assert (declined.status, declined.reason) == ("declined", "no BatchNorm here")
    failed = zoo._outcome(1, "error: verification failed\n", None)
    assert failed.status == "failed" and "exit 1" in failed.reason
    crash = zoo._outcome(1, "", RuntimeError("boom\nmore"))
    assert crash.status == "failed" and crash.reason == "crash: RuntimeError: boom"


def test_fold_outcome_counts_folds_from_the_json_report() -> None:
    report = {"entries": [{"folded": True}, {"folded": False, "reason": "residual"}]}
    ok = zoo._fold_outcome(0, json.dumps(report), "", None)
    assert ok.status == "ok" and ok.reason.startswith("1/2 folded (skipped: residual")
    none = {"entries": [{"folded": False, "reason": "no producer"}]}
    assert zoo._fold_outcome(0, json.dumps(none), "", None).status == "declined"


def test_benchmarks_section_is_replaced_between_markers(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nintro\n")
    zoo.update_benchmarks("first", path)
    zoo.update_benchmarks("second", path)
    text = path.read_text()
    assert text.count(zoo.MARK_START) == 1 and "second" in text and "first" not in text
    assert text.startswith("# Benchmarks\n\nintro\n")


def test_timm_families_pick_the_smallest_variant() -> None:
    families = zoo.timm_families()
    assert len(families) > 150
    jobs = {job.detail: job.name for job in zoo.timm_jobs(quick=False)}
    assert jobs["efficientnet/efficientnet"] == "efficientnet_b0"
    assert jobs["regnet/regnetx"] == "regnetx_002"
    assert jobs["convnext/convnext"] == "convnext_atto"
    assert sorted(["vit_base", "vit_tiny", "vit_small"], key=zoo._size_key)[0] == "vit_tiny"
