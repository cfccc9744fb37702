"""The benchmark harness runs (a tiny version), so it cannot rot between benchmark runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def test_probe_bench_quick(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "probe_bench.py"), "--quick", "--models", "mlp:32:3:4",
         "--no-cli", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "probe_bench.json").read_text())
    (timing,) = data["time"]
    assert timing["model"] == "mlp:32:3:4" and timing["parameters"] == 3 * (32 * 32 + 32) + 32 * 10 + 10
    assert timing["bare_median_s"] > 0 and timing["probe_median_s"] > 0
    (memory,) = data["memory"]
    assert memory["probe_growth_mb"] >= 0
    assert "| mlp:32:3:4 |" in (tmp_path / "probe_bench.md").read_text()
