"""``gradcheck reinit`` end to end: files, formats, refusals, the report and the after-probe."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SAMPLES, one_line_error

torch = pytest.importorskip("torch")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def dead_units(rows: list[dict[str, Any]]) -> int:
    return sum(row["dead"]["units"] for row in rows if row.get("dead"))


def test_writes_a_reinitialised_state_dict_and_never_touches_the_input(
    cli: Any, mlp_state_dict: Path, arch_file: Path, tmp_path: Path
) -> None:
    before = digest(mlp_state_dict)
    out = tmp_path / "fresh.pt"
    code, stdout, stderr = cli("reinit", mlp_state_dict, "--arch", f"{arch_file}:build", "-o", out)
    assert code == 0, stderr
    assert digest(mlp_state_dict) == before
    assert "unsafe" in stderr
    assert "probe before → after" in stdout
    old = torch.load(mlp_state_dict, weights_only=True)
    new = torch.load(out, weights_only=True)
    assert old.keys() == new.keys()
    for key in old:
        assert new[key].shape == old[key].shape and new[key].dtype == old[key].dtype
        assert not torch.equal(new[key], old[key]), key  # every layer is selected
    assert not new["fc1.bias"].any()


def test_refuses_to_overwrite_without_force(cli: Any, mlp_state_dict: Path, arch_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "exists.pt"
    out.write_bytes(b"keep me")
    code, _, stderr = cli("reinit", mlp_state_dict, "--arch", f"{arch_file}:build", "-o", out)
    assert code == 2
    one_line_error(stderr)
    assert out.read_bytes() == b"keep me"
    code, _, stderr = cli("reinit", mlp_state_dict, "--arch", f"{arch_file}:build", "-o", out, "--force")
    assert code == 0, stderr
    assert out.read_bytes() != b"keep me"


def test_refuses_to_write_over_its_input(cli: Any, mlp_state_dict: Path, arch_file: Path) -> None:
    before = digest(mlp_state_dict)
    code, _, stderr = cli("reinit", mlp_state_dict, "--arch", f"{arch_file}:build", "-o", mlp_state_dict, "--force")
    assert code == 2 and "never modifies its input" in stderr
    assert digest(mlp_state_dict) == before


def test_dry_run_writes_nothing_and_reports_json(
    cli: Any, mlp_state_dict: Path, arch_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "never.pt"
    code, stdout, stderr = cli(
        "reinit",
        mlp_state_dict,
        "--arch",
        f"{arch_file}:build",
        "-o",
        out,
        "--dry-run",
        "--format",
        "json",
        "--layers",
        "fc*",
    )
    assert code == 0, stderr
    assert not out.exists()
    data = json.loads(stdout)
    assert data["command"] == "reinit" and data["schema_version"]
    assert data["written"] is False and data["safe"] is False
    assert [layer["name"] for layer in data["layers"]] == ["fc1", "fc2"]
    assert {layer["scheme"] for layer in data["layers"]} == {"he"}  # torch.relu / F.relu follow
    assert data["before"] and data["after"]


@pytest.mark.parametrize(
    "args",
    [
        ("--scheme", "orthogonal", "--distribution", "uniform"),
        ("--layers", "no_such_layer*"),
        ("--scheme", "bogus"),
    ],
)
def test_usage_errors_exit_2(
    cli: Any, mlp_state_dict: Path, arch_file: Path, tmp_path: Path, args: tuple[str, ...]
) -> None:
    out = tmp_path / "o.pt"
    code, _, _ = cli("reinit", mlp_state_dict, "--arch", f"{arch_file}:build", "-o", out, *args)
    assert code == 2
    assert not out.exists()


def test_needs_an_output_unless_dry_run(cli: Any, mlp_state_dict: Path, arch_file: Path) -> None:
    code, _, stderr = cli("reinit", mlp_state_dict, "--arch", f"{arch_file}:build")
    assert code == 2 and "-o OUT" in stderr


def test_reinit_revives_the_dead_relu_sample(cli: Any, tmp_path: Path) -> None:
    sample = SAMPLES / "relu_dead.torchscript.pt"
    if not sample.exists():
        pytest.skip("samples/relu_dead.torchscript.pt is missing (run samples/make_samples.py)")
    before_hash = digest(sample)
    out = tmp_path / "revived.pt"
    code, stdout, stderr = cli("reinit", sample, "-o", out, "--format", "json", "--batch-size", "64")
    assert code == 0, stderr
    assert digest(sample) == before_hash
    data = json.loads(stdout)
    assert {layer["scheme"] for layer in data["layers"][:-1]} == {"he"}
    assert data["layers"][-1]["scheme"] == "glorot"  # the head: nothing follows it
    assert dead_units(data["after"]) < dead_units(data["before"])
    assert dead_units(data["before"]) >= 80  # 24 + 40 + 16 killed by construction
    reloaded = torch.jit.load(str(out))  # written in the input's format
    assert reloaded(torch.randn(2, 32)).shape == (2, 10)


def test_lsuv_through_the_cli(cli: Any, mlp_state_dict: Path, arch_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "lsuv.pt"
    code, stdout, stderr = cli(
        "reinit",
        mlp_state_dict,
        "--arch",
        f"{arch_file}:build",
        "-o",
        out,
        "--scheme",
        "lsuv",
        "--format",
        "json",
        "--batch-size",
        "32",
    )
    assert code == 0, stderr
    data = json.loads(stdout)
    for layer in data["layers"]:
        assert layer["lsuv"]["converged"] is True
        assert abs(layer["lsuv"]["variance"] - 1.0) <= 0.1


def test_onnx_model(cli: Any, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from tests.test_reinit_onnx import mlp_graph

    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_graph(), str(path))
    before = digest(path)
    out = tmp_path / "fresh.onnx"
    code, stdout, stderr = cli("reinit", path, "-o", out, "--format", "json")
    assert code == 0, stderr
    assert digest(path) == before
    data = json.loads(stdout)
    assert data["format"] == "onnx" and data["written"] is True
    schemes = {layer["name"]: layer["scheme"] for layer in data["layers"]}
    assert schemes["relu_fc"] == "he" and schemes["tanh_fc"] == "glorot" and schemes["selu_fc"] == "lecun"
    assert onnx.load(str(out)).graph.node  # a readable model
    assert data["before"] and data["after"], data["notes"]  # the written file was probed
    var_before = {row["name"]: row["output"]["var"] for row in data["before"]}
    var_after = {row["name"]: row["output"]["var"] for row in data["after"]}
    assert var_before.keys() == var_after.keys() and var_before != var_after


def test_table_report_lists_scheme_std_and_reason(cli: Any, mlp_state_dict: Path, arch_file: Path) -> None:
    code, stdout, stderr = cli("reinit", mlp_state_dict, "--arch", f"{arch_file}:build", "--dry-run")
    assert code == 0, stderr
    assert "followed by relu" in stdout and "he" in stdout and "no activation follows" in stdout


def test_reinit_help_imports_neither_torch_nor_onnx() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from gradcheck_cli.cli.app import app\n"
        "result = CliRunner().invoke(app, ['reinit', '--help'])\n"
        "assert result.exit_code == 0, result.output\n"
        "assert '--scheme' in result.output and '--recurrent' in result.output\n"
        "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'numpy') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_safetensors_in_safetensors_out_with_untouched_tensors_bit_identical(cli: Any, tmp_path: Path) -> None:
    safetensors = pytest.importorskip("safetensors.torch")
    sample = SAMPLES / "cnn_batchnorm.safetensors"
    if not sample.exists():
        pytest.skip("samples/cnn_batchnorm.safetensors is missing (run samples/make_samples.py)")
    out = tmp_path / "cnn.safetensors"
    code, stdout, stderr = cli(
        "reinit",
        sample,
        "--arch",
        f"{SAMPLES / 'models.py'}:small_cnn",
        "-o",
        out,
        "--layers",
        "conv2",
        "--format",
        "json",
    )
    assert code == 0, stderr
    old, new = safetensors.load_file(str(sample)), safetensors.load_file(str(out))
    assert old.keys() == new.keys()
    changed = {
        key for key in old if not torch.equal(old[key].view(-1).view(torch.uint8), new[key].view(-1).view(torch.uint8))
    }
    assert changed == {"conv2.weight"} | (
        {"conv2.bias"} if old.get("conv2.bias") is not None and old["conv2.bias"].any() else set()
    )
    data = json.loads(stdout)
    assert any("running statistics of bn2" in note for note in data["notes"])


def test_exported_program_in_exported_program_out(cli: Any, tmp_path: Path) -> None:
    sample = SAMPLES / "tanh_old_init.pt2"
    if not sample.exists():
        pytest.skip("samples/tanh_old_init.pt2 is missing (run samples/make_samples.py)")
    out = tmp_path / "tanh.pt2"
    code, stdout, stderr = cli("reinit", sample, "-o", out, "--format", "json")
    assert code == 0, stderr
    data = json.loads(stdout)
    assert {layer["scheme"] for layer in data["layers"][:-1]} == {"glorot"}
    assert {layer["activation"] for layer in data["layers"][:-1]} == {"tanh"}
    before = [row["output"]["var"] for row in data["before"] if row["fn"] == "tanh"]
    after = [row["output"]["var"] for row in data["after"] if row["fn"] == "tanh"]
    assert before[-1] < 1e-2 * before[0]  # the old init collapses the variance with depth
    assert min(after) > 0.25 * after[0]  # re-initialised: it holds
    import torch as torch_module

    program = torch_module.export.load(str(out))
    assert program.module()(torch_module.randn(8, 32)).shape[0] == 8  # exported with a static batch of 8
