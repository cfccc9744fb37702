"""Code execution: a checkpoint whose pickle runs code is refused by every command, unless the user
passes --trust-pickle; the payload never runs; the message says why and what to do instead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests._hostile import SAMPLES, Payload, _torch_bytes, hostile_files
from tests.conftest import one_line_error

COMMANDS = ("inspect", "check", "fold-bn", "reinit")
KINDS = (
    "top_level_zip.pt",
    "nested_in_dict_zip.pt",
    "nested_state_dict_zip.ckpt",
    "top_level_legacy.pt",
    "nested_in_dict_legacy.pt",
    "bare_pickle.pkl",
    "bare_pickle_protocol5.pkl",
    "pt2_sample_inputs.pt2",
    "pt2_pickled_weight.pt2",
    "torchscript_data_pkl.pt",
)
SAFE_ALTERNATIVES = ("state_dict", "safetensors", ".pt2")


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], Path]:
    directory = tmp_path_factory.mktemp("hostile")
    marker = directory / "MARKER"
    return hostile_files(directory, marker), marker


def _argv(command: str, model: Path, tmp_path: Path, *extra: str) -> list[str]:
    args = [command, str(model), *extra]
    if command in ("fold-bn", "reinit"):
        args += ["-o", str(tmp_path / f"out{model.suffix}")]
    return args


def _assert_refused(command: str, result: tuple[int, str, str], tmp_path: Path) -> str:
    code, stdout, stderr = result
    assert code == 2, (stdout, stderr)
    assert "Traceback" not in stdout + stderr
    if command == "check":
        # check reports a broken model in its table and keeps going; one summary line on stderr.
        assert "could not be checked" in stderr, stderr
        return stdout + stderr
    one_line_error(stderr)
    assert not list(tmp_path.glob("out*")), "a refused rewrite wrote an output"
    return stderr


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("command", COMMANDS)
def test_payload_model_refused_by_every_command(
    cli: Any, hostile: tuple[dict[str, Path], Path], kind: str, command: str, tmp_path: Path
) -> None:
    files, marker = hostile
    text = _assert_refused(command, cli(*_argv(command, files[kind], tmp_path)), tmp_path)
    assert not marker.exists(), f"{kind}: the payload ran under `gradcheck {command}`"
    if kind.startswith("torchscript"):
        # TorchScript's own unpickler resolves no Python globals: a damaged archive, no code run.
        assert "could not be loaded" in text or "would run code" in text, text
        return
    flat = " ".join(text.split())
    assert "would run code" in flat, text
    assert "--trust-pickle" in flat, text
    for alternative in SAFE_ALTERNATIVES:
        assert alternative in flat, f"the hint does not mention {alternative}: {text}"


# fold-bn and reinit take no --target (they have no loss).
PROBE_FLAGS = [(c, "--input") for c in COMMANDS] + [("inspect", "--target"), ("check", "--target")]


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize(("command", "flag"), PROBE_FLAGS)
def test_payload_probe_file_refused(cli: Any, tmp_path: Path, flag: str, legacy: bool, command: str) -> None:
    import torch

    marker = tmp_path / "MARKER"
    probe_file = tmp_path / "probe.pt"
    # A real tensor next to the payload: a loader that only looked at the first value would be fooled.
    probe_file.write_bytes(_torch_bytes({"x": torch.zeros(8, 64), "y": Payload(marker)}, legacy=legacy))
    model = SAMPLES / ("cnn_batchnorm.pt2" if command == "fold-bn" else "relu_healthy.pt2")
    # Even with --trust-pickle: it covers the model file, never probe inputs.
    text = _assert_refused(
        command, cli(*_argv(command, model, tmp_path, flag, str(probe_file), "--trust-pickle")), tmp_path
    )
    assert not marker.exists()
    assert "would run code" in " ".join(text.split()), text


@pytest.mark.parametrize(
    "kind", ["nested_in_dict_zip.pt", "top_level_legacy.pt", "pt2_sample_inputs.pt2", "pt2_pickled_weight.pt2"]
)
def test_payload_is_live_with_trust_flag(cli: Any, tmp_path: Path, kind: str) -> None:
    """The control: with --trust-pickle the same file does run its payload, so the refusals above
    are what kept the marker away (not a payload that never worked)."""
    marker = tmp_path / "MARKER"
    files = hostile_files(tmp_path, marker)
    cli("inspect", str(files[kind]), "--trust-pickle")
    assert marker.exists()


def test_pt2_refusal_happens_before_torch_export_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The .pt2 payload table is read as JSON first: torch.export.load is never reached."""
    import torch

    from gradcheck_cli.errors import UntrustedPickleError
    from gradcheck_cli.model.torch_load import model_from_path

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.export.load ran on a pickled .pt2")

    monkeypatch.setattr(torch.export, "load", fail)
    files = hostile_files(tmp_path, tmp_path / "MARKER")
    with pytest.raises(UntrustedPickleError):
        model_from_path(files["pt2_pickled_weight.pt2"])


def test_forced_weights_only_is_restored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from gradcheck_cli.model.torch_load import model_from_path

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    model_from_path(SAMPLES / "relu_healthy.pt2")
    assert os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD") == "1"
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_arch_file_documented_as_running_code(cli: Any) -> None:
    for command in COMMANDS:
        code, stdout, _ = cli(command, "--help")
        assert code == 0
        flat = " ".join(stdout.split())
        assert "runs that file" in flat, f"{command} --help does not say --arch FILE.py runs it"
        assert "Unpickling runs code" in flat
