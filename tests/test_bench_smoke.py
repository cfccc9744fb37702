"""The benchmark harness runs (a tiny version), so it cannot rot between benchmark runs.

``bench/run_all.py --quick`` runs every benchmark script with small stand-in models; the tests
below check each script's output through it rather than running each script again.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.conftest import ROOT

# One per target of issue 9: adding or dropping a target must show up here.
TARGET_IDS = [
    "probe-time-resnet50",
    "probe-time-bert",
    "probe-memory-resnet50",
    "probe-memory-bert",
    "gpu-time-ratio",
    "onnx-stats-warm",
    "onnx-stats-cold",
    "onnx-lowering",
    "cli-help",
    "cli-usage-error",
    "cli-inspect-first-sample",
    "fold-bn-state_dict",
    "fold-bn-pt2",
    "fold-bn-onnx",
    "reinit-resnet50",
]


def _bench_module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _probe_bench() -> ModuleType:
    return _bench_module("probe_bench")


def test_cli_times_cover_every_sample_and_run() -> None:
    bench = _probe_bench()
    commands = bench.sample_commands()
    timed_files = {Path(args[1]).name for args in commands}
    shipped = {p.name for p in (ROOT / "samples").iterdir() if p.suffix in {".pt", ".pt2", ".ckpt", ".safetensors"}}
    assert commands and all(args[0] == "inspect" for args in commands)
    assert timed_files == shipped
    cheapest = next(args for args in commands if args[1].endswith(".pt"))
    result = bench.cli_times(1, samples=[cheapest])
    (row,) = result["samples"]
    assert row["command"] == "gradcheck " + " ".join(cheapest) and row["wall_s"] > 0 and row["cpu_s"] > 0
    assert "import torch +" in "\n".join(bench.cli_markdown(result))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torchvision")
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("bench")
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run_all.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def test_run_all_quick_summarises_every_target(quick_run: Path) -> None:
    summary = json.loads((quick_run / "summary.json").read_text())
    assert summary["quick"] and summary["schema_version"] == 1
    assert summary["machine"]["cores"] and summary["machine"]["versions"]["torch"]
    assert len(summary["machine"]["load_average_start"]) == 3 and summary["machine"]["load_average_end"]
    assert {part["returncode"] for part in summary["parts"].values()} == {0}
    rows = {row["id"]: row for row in summary["targets"]}
    assert list(rows) == TARGET_IDS
    for target_id, row in rows.items():
        if target_id == "gpu-time-ratio":
            # Honest about what it cannot measure: no GPU run exists, whether or not CUDA is present.
            assert row["status"] == "not measured" and row["median"] is None and row["note"]
            continue
        assert row["status"] in {"met", "missed"}, (target_id, row)
        values = [row["median"], row["low"], row["high"]]
        assert all(isinstance(v, float) and math.isfinite(v) for v in values), (target_id, row)
        assert row["low"] <= row["median"] <= row["high"]
        if row["unit"] != "s over import torch":  # a difference of two times can be negative
            assert row["low"] > 0, (target_id, row)
        assert row["count"] == 1 and row["on"]
    assert rows["cli-inspect-first-sample"]["on"].startswith("`gradcheck inspect samples/")

    text = (quick_run / "summary.md").read_text()
    assert "Quick smoke run" in text and "## Targets" in text
    assert "| target | measured on | n | measured: median (min-max) | target | status | notes |" in text
    for row in rows.values():
        assert f"| {row['what']} |" in text
    for heading in ("## Scaling", "## Probe overhead", "## ONNX probe", "## fold-bn and reinit", "## Parts"):
        assert heading in text


def test_run_all_quick_scaling(quick_run: Path) -> None:
    scaling = json.loads((quick_run / "summary.json").read_text())["scaling"]
    by_model = {row["model"]: row for row in scaling["rows"]}
    assert by_model["mlp:64:2:8"]["parameters"] == 2 * (64 * 64 + 64) + 64 * 10 + 10
    assert by_model["mlp:64:2:32"]["batch"] == 32
    assert [fit["batch"] for fit in scaling["fits"]["parameters"]] == [8]
    assert [fit["shape"] for fit in scaling["fits"]["batch"]] == ["mlp:64:2"]
    assert scaling["largest"]["model"] == "mlp:128:2:8"
    assert scaling["statements"][-1].startswith("Largest model probed: 34,314 parameters")


def test_run_all_quick_keeps_each_benchmarks_output(quick_run: Path) -> None:
    probe = json.loads((quick_run / "probe_bench.json").read_text())
    assert [row["model"] for row in probe["time"]] == ["resnet18:2:64", "bert-tiny:2:16"]
    assert all(row["bare_median_s"] > 0 and row["probe_median_s"] > 0 for row in probe["time"])
    assert all(row["probe_growth_mb"] >= 0 for row in probe["memory"])
    assert "| resnet18:2:64 |" in (quick_run / "probe_bench.md").read_text()

    onnx = json.loads((quick_run / "onnx_bench.json").read_text())
    assert set(onnx["models"]["resnet18"]) == {"plain", "in-graph", "exposed", "time", "grad"}
    assert not onnx["failures"]

    rewrite = json.loads((quick_run / "rewrite_bench.json").read_text())
    rows: dict[str, Any] = {row["case"]: row for row in rewrite["rows"]}
    assert set(rows) == {"import torch", "fold-state_dict", "fold-pt2", "fold-onnx", "reinit-auto"}
    assert rows["fold-onnx"]["command"].startswith("gradcheck fold-bn resnet18.onnx -o")
    assert (
        rows["fold-onnx"]["median_minus_import_torch_s"]
        == rows["fold-onnx"]["median_s"] - rows["import torch"]["median_s"]
    )
    assert "| fold-onnx | `gradcheck fold-bn resnet18.onnx" in (quick_run / "rewrite_bench.md").read_text()


def test_summary_without_results_is_not_measured() -> None:
    # A part that crashed leaves no JSON: its rows say so instead of failing the summary.
    run_all = _bench_module("run_all")
    machine = {"cuda_available": False, "cuda_device": None}
    rows = run_all.measure_targets({"probe": None, "onnx": None, "rewrite": None}, run_all.FULL, machine)
    assert [row["id"] for row in rows] == TARGET_IDS
    assert {row["status"] for row in rows} == {"not measured"} and all(row["note"] for row in rows)
    assert run_all.scaling_summary(None) is None


def test_scaling_linearity_fit() -> None:
    run_all = _bench_module("run_all")
    # Probe time exactly proportional to parameters at batch 64, and to the batch at width 100.
    time_rows = [
        {
            "model": f"mlp:{w}:2:{b}",
            "parameters": p,
            "probe_median_s": s,
            "bare_median_s": s / 2,
            "probe_range_s": [s, s],
            "bare_range_s": [s / 2, s / 2],
            "time_ratio_median": 2.0,
            "repeats": 1,
        }
        for w, b, p, s in [(100, 64, 10**6, 1.0), (1000, 64, 10**8, 100.0), (100, 256, 10**6, 4.0)]
    ]
    summary = run_all.scaling_summary({"time": time_rows, "memory": []})
    (sizes,), (batches,) = summary["fits"]["parameters"], summary["fits"]["batch"]
    assert sizes["batch"] == 64 and sizes["exponent"] == pytest.approx(1.0)
    assert sizes["probe_s_per_million_parameters"] == pytest.approx([1.0, 1.0])
    assert batches["shape"] == "mlp:100:2" and batches["exponent"] == pytest.approx(1.0)
    assert "no worse than linear" in summary["statements"][0]
    assert summary["largest"] == {"model": "mlp:1000:2:64", "parameters": 10**8, "probe_s": 100.0}
    assert "| mlp:100:2:256 | 1,000,000 | 256 |" in "\n".join(run_all.scaling_markdown(summary))


def test_overhead_parts_catches_every_part_it_names(tmp_path: Path) -> None:
    """The wrappers reach the probe's functions (a renamed one would read 0 ms; attention_rows
    counts only the calls that are attention), and every kernel figure comes back."""
    out = tmp_path / "parts.json"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "overhead_parts.py"),
            "--models",
            "mlp:64:3:8",
            "--repeats",
            "3",
            "--kernels",
            "--json",
            str(out),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (result,) = json.loads(out.read_text())["parts"]
    parts = result["parts_median_ms"]
    for part in ("output statistics", "activation-gradient hooks", "parameter gradients", "weight norms and the table"):
        assert parts[part] > 0, part
    assert parts["attention scores"] == 0  # an MLP has no attention
    assert result["probe_median_s"] > 0 and result["bare_median_s"] > 0
    speeds = json.loads(out.read_text())["kernels"]
    assert len(speeds) == 14 and all(value > 0 for value in speeds.values())
