"""``gradcheck fold-bn`` end to end: formats, exit codes, files written (or not)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from torch import nn

ARCH = """
from torch import nn

def build(width=6):
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, width, 3, groups=width), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.ConvTranspose2d(width, 4, 2, stride=2), nn.BatchNorm2d(4))
"""


def build_model(width: int = 6) -> nn.Module:
    namespace: dict[str, Any] = {}
    exec(ARCH, namespace)
    torch.manual_seed(0)  # the same conv weights every time: the tests compare against a rebuild
    model: nn.Module = namespace["build"](width)
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.3)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    model = build_model()
    x = torch.randn(2, 3, 8, 8)
    arch = tmp_path / "arch.py"
    arch.write_text(ARCH)
    paths = {
        "arch": arch,
        "state_dict": tmp_path / "weights.pt",
        "pt2": tmp_path / "model.pt2",
        "onnx": tmp_path / "model.onnx",
        "pickle": tmp_path / "pickled.pt",
    }
    torch.save(
        {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, paths["state_dict"]
    )
    torch.export.save(torch.export.export(model, (x,)), str(paths["pt2"]))
    torch.save(model, paths["pickle"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x,),
            str(paths["onnx"]),
            dynamo=False,
            input_names=["x"],
            output_names=["y"],
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        )
    return paths


def test_onnx_fold_writes_verified_model_and_json_report(cli: Any, models: dict[str, Path], tmp_path: Path) -> None:
    source = models["onnx"]
    before = digest(source)
    out = tmp_path / "folded.onnx"
    code, stdout, _ = cli("fold-bn", source, "-o", out, "--format", "json")
    assert code == 0, stdout
    report = json.loads(stdout)
    assert report["command"] == "fold-bn" and report["schema_version"]
    assert report["summary"] == {"folded": 3, "skipped": 0, "verified": True}
    assert report["before"]["batchnorms"] == 3 and report["after"]["batchnorms"] == 0
    (check,) = report["verification"]["outputs"]
    assert check["max_abs_error"] <= check["tolerance"] and "onnxruntime" in report["verification"]["backend"]
    assert digest(source) == before
    folded = onnx.load(str(out))
    onnx.checker.check_model(folded, full_check=True)
    assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)
    assert [i.name for i in folded.graph.input] == ["x"] and [o.name for o in folded.graph.output] == ["y"]


def test_refuses_to_overwrite_without_force(cli: Any, models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "exists.onnx"
    out.write_bytes(b"keep me")
    code, _, stderr = cli("fold-bn", models["onnx"], "-o", out)
    assert code == 2 and "already exists" in stderr and "--force" in stderr
    assert out.read_bytes() == b"keep me"
    code, _, _ = cli("fold-bn", models["onnx"], "-o", out, "--force")
    assert code == 0 and out.read_bytes() != b"keep me"


def test_refuses_to_write_over_the_input(cli: Any, models: dict[str, Path]) -> None:
    before = digest(models["onnx"])
    code, _, stderr = cli("fold-bn", models["onnx"], "-o", models["onnx"], "--force")
    assert code == 2 and "input" in stderr
    assert digest(models["onnx"]) == before


def test_dry_run_writes_nothing(cli: Any, models: dict[str, Path], tmp_path: Path) -> None:
    before = set(tmp_path.iterdir())
    code, stdout, _ = cli("fold-bn", models["pt2"], "--dry-run")
    assert code == 0 and "nothing written" in stdout
    assert set(tmp_path.iterdir()) == before


def test_failed_verification_exits_1_and_writes_nothing(
    cli: Any, models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gradcheck_cli.rewrite import onnx_fold

    real = onnx_fold.fold_after

    def off_by_a_little(*args: Any, **kwargs: Any) -> Any:
        weight, bias = real(*args, **kwargs)
        return weight * 1.001, bias  # 0.1 %: far above float rounding, far below a gross bug

    monkeypatch.setattr(onnx_fold, "fold_after", off_by_a_little)
    out = tmp_path / "bad.onnx"
    code, stdout, _ = cli("fold-bn", models["onnx"], "-o", out)
    assert code == 1, stdout
    assert "ABOVE TOLERANCE" in stdout and "nothing written" in stdout
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_pt2_roundtrip_in_its_own_format(cli: Any, models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "folded.pt2"
    before = digest(models["pt2"])
    code, stdout, _ = cli("fold-bn", models["pt2"], "-o", out, "--format", "json")
    assert code == 0, stdout
    report = json.loads(stdout)
    assert report["method"] == "exported program graph" and report["after"]["batchnorms"] == 0
    assert digest(models["pt2"]) == before
    program = torch.export.load(str(out))
    assert not any("batch_norm" in str(n.target) for n in program.graph.nodes)
    x = torch.randn(2, 3, 8, 8)  # the program was exported with a static batch of 2
    torch.testing.assert_close(program.module()(x), build_model()(x), rtol=1e-4, atol=1e-4)


def test_state_dict_output_still_loads_into_the_architecture(cli: Any, models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "folded.pt"
    code, stdout, _ = cli("fold-bn", models["state_dict"], "--arch", f"{models['arch']}:build", "-o", out)
    assert code == 0, stdout
    checkpoint = torch.load(out, weights_only=True)
    assert checkpoint["epoch"] == 3  # the rest of the checkpoint is kept
    state = checkpoint["state_dict"]
    assert all(k.startswith("module.") for k in state)  # and the key prefix
    model = build_model()
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()}, strict=True)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model(x), build_model()(x), rtol=1e-4, atol=1e-4)
    # The BatchNorm after the conv with a bias (the ConvTranspose) is now an exact identity.
    z = torch.randn(4, 4, 3, 3)
    assert torch.equal(model[7](z), z)


@pytest.mark.parametrize("target", ["torchscript", "onnx", "safetensors"])
def test_other_output_formats(cli: Any, models: dict[str, Path], tmp_path: Path, target: str) -> None:
    out = tmp_path / f"folded.{target}"
    code, stdout, _ = cli(
        "fold-bn",
        models["state_dict"],
        "--arch",
        f"{models['arch']}:build",
        "-o",
        out,
        "--to",
        target,
        "--format",
        "json",
    )
    assert code == 0, stdout
    report = json.loads(stdout)
    assert report["verification"]["outputs"][0]["max_abs_error"] <= report["verification"]["outputs"][0]["tolerance"]
    assert out.is_file()
    if target == "onnx":
        folded = onnx.load(str(out))
        assert not any(n.op_type == "BatchNormalization" for n in folded.graph.node)


def test_pickled_module_needs_trust_and_keeps_its_format(cli: Any, models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "folded_pickle.pt"
    code, _, stderr = cli("fold-bn", models["pickle"], "-o", out)
    assert code == 2 and "--trust-pickle" in stderr and not out.exists()
    code, stdout, _ = cli("fold-bn", models["pickle"], "-o", out, "--trust-pickle")
    assert code == 0, stdout
    loaded = torch.load(out, weights_only=False)
    assert isinstance(loaded, nn.Module)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(loaded(x), build_model()(x), rtol=1e-4, atol=1e-4)


def test_pickle_output_refused_for_untrusted_input(cli: Any, models: dict[str, Path], tmp_path: Path) -> None:
    code, _, stderr = cli("fold-bn", models["pt2"], "-o", tmp_path / "x.pt", "--to", "pickle")
    assert code == 2 and "pickle" in stderr


def test_onnx_input_cannot_become_torch(cli: Any, models: dict[str, Path], tmp_path: Path) -> None:
    code, _, stderr = cli("fold-bn", models["onnx"], "-o", tmp_path / "x.pt2", "--to", "pt2")
    assert code == 2 and "ONNX" in stderr


def test_benchmark_reports_latency(cli: Any, models: dict[str, Path]) -> None:
    code, stdout, _ = cli("fold-bn", models["onnx"], "--dry-run", "--benchmark", "3", "--format", "json")
    assert code == 0
    (latency,) = json.loads(stdout)["latency"]
    assert latency["runs"] == 3 and latency["before_ms"] > 0 and latency["after_ms"] > 0
    assert latency["speedup"] == pytest.approx(latency["before_ms"] / latency["after_ms"])


def test_fold_help_imports_no_framework() -> None:
    probe = (
        "import sys\nfrom gradcheck_cli.cli.app import main\nsys.argv=['gradcheck','fold-bn','--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('HEAVY=' + ','.join(m for m in ('torch','onnx','onnxruntime','numpy') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert "HEAVY=\n" in result.stdout, result.stdout + result.stderr
    assert "--to" in result.stdout and "--affine-standalone" in result.stdout


def test_numbers_in_report_are_independent_of_the_tool(models: dict[str, Path]) -> None:
    """The reported max error equals one computed here from the written file."""
    import onnxruntime as ort

    from gradcheck_cli.options import InputOptions, ProbeOptions
    from gradcheck_cli.rewrite.fold import fold_batchnorm

    out = models["onnx"].with_name("independent.onnx")
    report = fold_batchnorm(models["onnx"], out=out, probe=ProbeOptions(inputs=InputOptions(batch_size=4, seed=5)))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    x = np.random.default_rng(5).standard_normal((4, 3, 8, 8)).astype(np.float32)
    ref = ort.InferenceSession(str(models["onnx"]), options).run(None, {"x": x})[0]
    new = ort.InferenceSession(str(out), options).run(None, {"x": x})[0]
    assert report.verification.outputs[0].max_abs_error == pytest.approx(float(np.abs(ref - new).max()), rel=1e-6)


def test_table_rendering_shows_reasons_and_failures() -> None:
    from io import StringIO

    from rich.console import Console

    from gradcheck_cli.render.fold import fold_json, render_fold
    from gradcheck_cli.rewrite.fold_records import (
        Counts,
        FoldEntry,
        FoldReport,
        OutputCheck,
        Pattern,
        Verification,
    )

    report = FoldReport(
        model="m.onnx",
        input_format="onnx",
        output_format="onnx",
        method="onnx graph",
        entries=(
            FoldEntry("bn1", True, Pattern.CONV_BN, "conv1", note="the layer got a bias"),
            FoldEntry("bn2", False, reason="the output of Conv 'c2' also feeds other nodes"),
        ),
        before=Counts(100, 2, 10),
        after=Counts(96, 1, 9),
        verification=Verification(
            "onnxruntime (graph optimisations disabled)",
            8,
            (OutputCheck("y", "float32", 0.5, 0.25, 2.0, 2.4e-4, passed=False),),
        ),
        written=None,
    )
    buffer = StringIO()
    render_fold(report, Console(file=buffer, width=200, color_system=None))
    text = buffer.getvalue()
    for expected in (
        "bn1",
        "conv-bn",
        "conv1",
        "the layer got a bias",
        "also feeds other nodes",
        "ABOVE TOLERANCE",
        "1 folded, 1 skipped; verification failed: nothing written",
    ):
        assert expected in text, expected
    data = json.loads(fold_json(report))
    assert data["summary"] == {"folded": 1, "skipped": 1, "verified": False}
    assert data["entries"][1]["reason"].startswith("the output of Conv")
    assert data["written"] is None


@pytest.mark.parametrize("extra, samples", [((), 2), (("--batch-size", "3"), 3)])
def test_verification_batch_defaults_to_two_samples(
    cli: Any, models: dict[str, Path], extra: tuple[str, ...], samples: int
) -> None:
    # Without --batch-size, fold-bn verifies on VERIFY_BATCH_SIZE samples (not the probe's 8);
    # an explicit size wins. The .pt2 keeps its own example batch (an export may fix it).
    from gradcheck_cli.rewrite.fold import VERIFY_BATCH_SIZE

    assert VERIFY_BATCH_SIZE == 2
    for source, args in ((models["onnx"], ()), (models["state_dict"], ("--arch", f"{models['arch']}:build"))):
        code, stdout, _ = cli("fold-bn", source, "--dry-run", "--format", "json", *args, *extra)
        assert code == 0, stdout
        assert json.loads(stdout)["verification"]["samples"] == samples, source
    if not extra:  # a .pt2 keeps its own example batch (3 here), whatever the default
        pt2 = models["pt2"].with_name("batch3.pt2")
        torch.export.save(torch.export.export(build_model().eval(), (torch.randn(3, 3, 8, 8),)), str(pt2))
        code, stdout, _ = cli("fold-bn", pt2, "--dry-run", "--format", "json")
        assert code == 0 and json.loads(stdout)["verification"]["samples"] == 3
