"""`gradcheck inspect` end to end: exit codes, one-line errors, JSON contract, determinism."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import one_line_error, validate_report


def test_table_output(cli: Any, mlp_state_dict: Path, arch_file: Path) -> None:
    code, out, err = cli("inspect", mlp_state_dict, "--arch", f"{arch_file}:build")
    assert code == 0, err
    for name in ("fc1", "relu()", "fc2", "relu()#1", "head"):
        assert name in out
    assert "Diagnosis" in out or "No findings" in out


def test_json_is_valid_and_byte_identical_for_a_seed(
    cli: Any, mlp_state_dict: Path, arch_file: Path, tmp_path: Path
) -> None:
    args = ("inspect", mlp_state_dict, "--arch", f"{arch_file}:build", "--format", "json", "--seed", "7")
    code, first, _ = cli(*args)
    code2, second, _ = cli(*args)
    assert code == code2 == 0
    assert first == second
    data = json.loads(first)
    validate_report(data)
    assert data["probe"]["seed"] == 7
    # --output writes the same report to a file while the table goes to stdout.
    target = tmp_path / "report.json"
    code, out, _ = cli(*args[:-4], "--seed", "7", "--output", target)
    assert code == 0 and "fc1" in out
    assert json.loads(target.read_text()) == data


def test_functional_rows_are_named_after_the_calling_module(cli: Any, mlp_state_dict: Path, arch_file: Path) -> None:
    _, out, _ = cli("inspect", mlp_state_dict, "--arch", f"{arch_file}:build", "-f", "json")
    names = [layer["name"] for layer in json.loads(out)["layers"]]
    # Both relus are called from the root module's forward: the second call gets '#1'.
    assert names == ["fc1", "relu()", "fc2", "relu()#1", "head"]


def test_micro_batches_in_the_cli(cli: Any, mlp_state_dict: Path, arch_file: Path) -> None:
    base = ("inspect", mlp_state_dict, "--arch", f"{arch_file}:build", "-f", "json")
    _, whole, _ = cli(*base, "--batch-size", "24")
    _, split, _ = cli(*base, "--batch-size", "6", "--batches", "4")
    a, b = json.loads(whole), json.loads(split)
    assert b["probe"]["batches"] == 4
    for row_a, row_b in zip(a["layers"], b["layers"], strict=True):
        assert row_b["output"]["var"] == pytest.approx(row_a["output"]["var"], rel=1e-5)
        assert row_b["output_grad_norm"] == pytest.approx(row_a["output_grad_norm"], rel=1e-5)


def test_input_file_npy_and_npz(cli: Any, mlp_state_dict: Path, arch_file: Path, tmp_path: Path) -> None:
    import numpy as np

    x = np.random.default_rng(0).standard_normal((10, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "x.npz", x)
    torch.save(torch.from_numpy(x), tmp_path / "x.pt")
    outputs = []
    for name in ("x.npy", "x.npz", "x.pt"):
        code, out, err = cli(
            "inspect", mlp_state_dict, "--arch", f"{arch_file}:build", "-f", "json", "--input", tmp_path / name
        )
        assert code == 0, err
        data = json.loads(out)
        assert data["probe"]["inputs"][0]["shape"] == [10, 8]
        outputs.append(data["layers"])
    assert outputs[0] == outputs[1] == outputs[2]


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "random_bytes",
        "wrong_shape",
        "nan_weights",
        "no_arch",
        "bad_kwargs",
        "pickle",
        "bad_device",
        "bad_shape_text",
    ],
)
def test_bad_inputs_exit_2_with_one_line(
    cli: Any, mlp_state_dict: Path, arch_file: Path, tmp_path: Path, case: str
) -> None:
    arch = ("--arch", f"{arch_file}:build")
    if case == "missing":
        args: tuple[Any, ...] = (tmp_path / "absent.pt", *arch)
    elif case == "random_bytes":
        path = tmp_path / "noise.pt"
        path.write_bytes(bytes(range(7, 250)) * 3)
        args = (path, *arch)
    elif case == "wrong_shape":
        args = (mlp_state_dict, *arch, "--input-shape", "4,9")
    elif case == "nan_weights":
        sd = torch.load(mlp_state_dict)
        sd["fc2.weight"][0, 0] = float("nan")
        path = tmp_path / "nan.pt"
        torch.save(sd, path)
        args = (path, *arch)
    elif case == "no_arch":
        args = (mlp_state_dict,)
    elif case == "bad_kwargs":
        args = (mlp_state_dict, *arch, "--arch-kwargs", "{not json")
    elif case == "pickle":
        path = tmp_path / "whole.pt"
        torch.save(torch.nn.Linear(8, 2), path)
        args = (path,)
    elif case == "bad_device":
        args = (mlp_state_dict, *arch, "--device", "tpu")
    else:
        args = (mlp_state_dict, *arch, "--input-shape", "4,x,y")
    code, out, err = cli("inspect", *args)
    assert code == 2
    assert out == ""
    one_line_error(err)


def test_nan_weights_can_be_probed_on_request(cli: Any, mlp_state_dict: Path, arch_file: Path, tmp_path: Path) -> None:
    sd = torch.load(mlp_state_dict)
    sd["fc2.weight"][:] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(sd, path)
    code, out, _ = cli("inspect", path, "--arch", f"{arch_file}:build", "--allow-nonfinite", "-f", "json")
    assert code == 0
    data = json.loads(out)
    validate_report(data)
    by_name = {layer["name"]: layer for layer in data["layers"]}
    assert by_name["fc1"]["output"]["nan"] == 0
    assert by_name["fc2"]["output"]["nan"] > 0 and by_name["fc2"]["output"]["mean"] is None
    # inspect diagnoses as check does (issue 16): the checkpoint scan names the corrupt tensor itself.
    assert data["findings"][0]["rule"] == "non-finite" and data["findings"][0]["layer"] == "fc2.weight"


def test_debug_shows_the_traceback(cli: Any, tmp_path: Path) -> None:
    code, _, err = cli("inspect", tmp_path / "absent.pt", "--debug")
    assert code == 2
    assert "Traceback" in err and "error: " in err


def test_input_file_is_never_modified(cli: Any, mlp_state_dict: Path, arch_file: Path) -> None:
    import hashlib

    before = hashlib.sha256(mlp_state_dict.read_bytes()).hexdigest()
    cli("inspect", mlp_state_dict, "--arch", f"{arch_file}:build", "--mode", "train")
    assert hashlib.sha256(mlp_state_dict.read_bytes()).hexdigest() == before
