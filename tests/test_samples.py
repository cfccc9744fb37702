"""The commands in samples/README.md run, and each report shows what the README says."""

from __future__ import annotations

import itertools
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import ROOT, SAMPLES, validate_report

COMMANDS = [
    line.strip() for line in (SAMPLES / "README.md").read_text().splitlines() if line.strip().startswith("gradcheck ")
]


def run_json(cli: Any, command: str) -> dict[str, Any]:
    args = shlex.split(command)[1:]
    code, out, err = cli(*args, "--format", "json")
    assert code == 0, err
    data = json.loads(out)
    validate_report(data)
    return data


@pytest.fixture(autouse=True)
def _from_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)


def test_readme_lists_every_sample() -> None:
    assert len(COMMANDS) == 7
    shipped = {p.name for p in SAMPLES.iterdir() if p.suffix in {".pt", ".pt2", ".ckpt", ".safetensors"}}
    mentioned = {Path(shlex.split(c)[2]).name for c in COMMANDS}
    assert shipped == mentioned
    assert all((SAMPLES / name).stat().st_size < 1_000_000 for name in shipped)


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_runs(cli: Any, command: str) -> None:
    code, out, err = cli(*shlex.split(command)[1:])
    assert code == 0, err
    assert "layer" in out


def _command(fragment: str) -> str:
    return next(c for c in COMMANDS if fragment in c)


def test_sigmoid_sample_is_saturated(cli: Any) -> None:
    data = run_json(cli, _command("sigmoid_saturated"))
    saturations = [r["saturation"]["fraction"] for r in data["layers"] if r["fn"] == "sigmoid"]
    assert len(saturations) == 8
    assert all(s > 0.5 for s in saturations[1:])
    assert {f["rule"] for f in data["findings"]} >= {"saturated-activation"}


def test_tanh_sample_variance_shrinks_by_a_third(cli: Any) -> None:
    data = run_json(cli, _command("tanh_old_init"))
    variances = [r["output"]["var"] for r in data["layers"] if r["type"] == "Linear"][:-1]
    ratios = [b / a for a, b in itertools.pairwise(variances)]
    assert len(ratios) == 7
    # The probe batch is 8 samples, so allow for sampling noise around 1/3.
    assert all(0.2 < r < 0.45 for r in ratios), ratios


def test_dead_sample_counts_the_killed_units(cli: Any) -> None:
    data = run_json(cli, _command("relu_dead"))
    dead = [r["dead"]["units"] for r in data["layers"] if r["fn"] == "relu"]
    assert [d >= k for d, k in zip(dead, (24, 40, 16), strict=False)] == [True, True, True]
    assert data["findings"][0]["rule"] == "dead-relu"


def test_cnn_sample_same_numbers_through_hooks_and_graph(cli: Any) -> None:
    eager, graph = (run_json(cli, c) for c in COMMANDS if "cnn_batchnorm" in c)
    assert eager["probe"]["method"] == "hooks" and graph["probe"]["method"] == "graph"
    assert [r["name"] for r in eager["layers"]] == [r["name"] for r in graph["layers"]]
    for a, b in zip(eager["layers"], graph["layers"], strict=True):
        assert a["output"]["var"] == pytest.approx(b["output"]["var"], rel=1e-4)
        assert a["output_grad_norm"] == pytest.approx(b["output_grad_norm"], rel=1e-4)


def test_healthy_sample_has_no_findings(cli: Any) -> None:
    for command in COMMANDS:
        if "relu_healthy" in command:
            assert run_json(cli, command)["findings"] == []


def test_make_samples_regenerates_the_shipped_weights(tmp_path: Path) -> None:
    import make_samples  # samples/ is on sys.path (conftest)

    make_samples.main(tmp_path)
    for path in tmp_path.iterdir():
        shipped = SAMPLES / path.name
        if path.suffix == ".pt2":
            new = torch.export.load(str(path)).state_dict
            old = torch.export.load(str(shipped)).state_dict
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            new, old = load_file(str(path)), load_file(str(shipped))
        elif re.search(r"torchscript", path.name):
            new = torch.jit.load(str(path)).state_dict()
            old = torch.jit.load(str(shipped)).state_dict()
        else:
            new, old = torch.load(path), torch.load(shipped)
            new, old = new.get("model_state_dict", new), old.get("model_state_dict", old)
        assert new.keys() == old.keys(), path.name
        for key in new:
            assert torch.equal(new[key], old[key]), (path.name, key)
