"""Every PyTorch format loads, detected from content; every failure is one clear line."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from gradcheck_cli.cli.common import flag_text
from gradcheck_cli.errors import GradcheckError, LoadError, UntrustedPickleError, UsageError
from gradcheck_cli.model.formats import ModelFormat, detect_format
from gradcheck_cli.model.torch_load import best_key_prefix, model_from_path


def _build(arch_file: Path) -> nn.Module:
    from gradcheck_cli.model.arch import build_arch

    return build_arch(f"{arch_file}:build", {})


def _same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize(
    "wrap", ["plain", "state_dict", "model_state_dict", "model", "lightning", "ddp", "compiled_ddp"]
)
def test_state_dict_layouts(tmp_path: Path, arch_file: Path, wrap: str) -> None:
    torch.manual_seed(1)
    model = _build(arch_file)
    sd = model.state_dict()
    payload: Any = {
        "plain": sd,
        "state_dict": {"state_dict": sd, "epoch": 3},
        "model_state_dict": {"model_state_dict": sd, "optimizer_state_dict": {"lr": 0.1}},
        "model": {"model": sd, "args": "x"},
        # Lightning prefixes keys with the LightningModule attribute holding the network.
        "lightning": {
            "state_dict": {f"model.{k}": v for k, v in sd.items()},
            "pytorch-lightning_version": "2.4",
            "epoch": 1,
            "global_step": 10,
        },
        "ddp": {f"module.{k}": v for k, v in sd.items()},
        "compiled_ddp": {f"module._orig_mod.{k}": v for k, v in sd.items()},
    }[wrap]
    path = tmp_path / "ckpt.bin"  # the extension says nothing; the content does
    torch.save(payload, path)
    loaded = model_from_path(path, arch=f"{arch_file}:build")
    assert loaded.format is ModelFormat.TORCH_ZIP
    _same_weights(loaded.module, model)


def test_legacy_serialization(tmp_path: Path, arch_file: Path) -> None:
    model = _build(arch_file)
    path = tmp_path / "legacy.pt"
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)
    assert detect_format(path) is ModelFormat.TORCH_LEGACY
    _same_weights(model_from_path(path, arch=f"{arch_file}:build").module, model)


def test_safetensors(tmp_path: Path, arch_file: Path) -> None:
    from safetensors.torch import save_file

    model = _build(arch_file)
    path = tmp_path / "weights.pt"  # misleading extension on purpose
    save_file(model.state_dict(), str(path))
    assert detect_format(path) is ModelFormat.SAFETENSORS
    _same_weights(model_from_path(path, arch=f"{arch_file}:build").module, model)


def test_exported_program_with_example_inputs(tmp_path: Path, arch_file: Path) -> None:
    model = _build(arch_file).eval()
    path = tmp_path / "model.bin"
    torch.export.save(torch.export.export(model, (torch.randn(3, 8),)), str(path))
    loaded = model_from_path(path)
    assert loaded.format is ModelFormat.EXPORTED_PROGRAM
    assert loaded.example_args is not None and tuple(loaded.example_args[0].shape) == (3, 8)
    x = torch.randn(3, 8)
    torch.testing.assert_close(loaded.module(x), model(x))


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript(tmp_path: Path, arch_file: Path, how: str) -> None:
    model = _build(arch_file).eval()
    path = tmp_path / "model.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(model) if how == "script" else torch.jit.trace(model, torch.randn(2, 8))
    scripted.save(str(path))
    loaded = model_from_path(path)
    assert loaded.format is ModelFormat.TORCHSCRIPT
    x = torch.randn(2, 8)
    torch.testing.assert_close(loaded.module(x), model(x))


def test_pickled_module_needs_trust(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.raises(UntrustedPickleError) as info:
        model_from_path(path)
    assert "torch.nn.modules.container.Sequential" in info.value.message
    assert "--trust-pickle" in flag_text(info.value.hint or "")  # as the CLI prints the library's field
    loaded = model_from_path(path, trust_pickle=True)
    assert loaded.trusted_pickle
    _same_weights(loaded.module, model)


def test_malicious_pickle_payload_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": Payload()}, path)
    with pytest.raises(UntrustedPickleError):
        model_from_path(path, arch="torch.nn:Identity")
    assert not marker.exists()


def test_strict_key_mismatch_is_reported(tmp_path: Path, arch_file: Path) -> None:
    sd = _build(arch_file).state_dict()
    sd.pop("head.bias")
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pt"
    torch.save(sd, path)
    with pytest.raises(LoadError) as info:
        model_from_path(path, arch=f"{arch_file}:build")
    assert "1 missing (head.bias)" in info.value.message and "1 unexpected (extra.weight)" in info.value.message
    loaded = model_from_path(path, arch=f"{arch_file}:build", strict=False)
    assert any("missing" in note for note in loaded.notes)


def test_shape_mismatch_names_the_tensor(tmp_path: Path, arch_file: Path) -> None:
    path = tmp_path / "wide.pt"
    from gradcheck_cli.model.arch import build_arch

    torch.save(build_arch(f"{arch_file}:build", {"width": 32}).state_dict(), path)
    with pytest.raises(LoadError) as info:
        model_from_path(path, arch=f"{arch_file}:build")
    assert "fc1.weight" in info.value.message


def test_state_dict_without_arch_says_what_to_pass(mlp_state_dict: Path) -> None:
    with pytest.raises(UsageError) as info:
        model_from_path(mlp_state_dict)
    assert "--arch" in flag_text(info.value.hint or "")  # as the CLI prints the library's field


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "is empty"),
        (b"\x00\x01garbage that is no model at all", "unrecognised file format"),
        (b"PK\x03\x04broken zip", "damaged"),
    ],
)
def test_bad_files(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(GradcheckError) as info:
        model_from_path(path)
    assert expected in info.value.message


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="no such file"):
        model_from_path(tmp_path / "nope.pt")
    with pytest.raises(LoadError, match="directory"):
        model_from_path(tmp_path)


def test_torchvision_arch_shortcut(tmp_path: Path) -> None:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.get_model("resnet18", weights=None, num_classes=10)
    path = tmp_path / "r18.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    loaded = model_from_path(path, arch="torchvision:resnet18", arch_kwargs={"num_classes": 10})
    _same_weights(loaded.module, model)


def test_arch_spec_errors(tmp_path: Path, mlp_state_dict: Path) -> None:
    with pytest.raises(UsageError):
        model_from_path(mlp_state_dict, arch="no_colon")
    with pytest.raises(LoadError, match="no such file"):
        model_from_path(mlp_state_dict, arch=f"{tmp_path}/missing.py:build")
    with pytest.raises(LoadError, match="has no attribute"):
        model_from_path(mlp_state_dict, arch="torch.nn:NoSuchLayer")


def test_best_key_prefix_prefers_the_match() -> None:
    expected = {"fc.weight", "fc.bias"}
    assert best_key_prefix({"fc.weight": 0, "fc.bias": 0}, expected) == ""
    assert best_key_prefix({"module.fc.weight": 0, "module.fc.bias": 0}, expected) == "module."
    assert best_key_prefix({"net.model.fc.weight": 0, "net.model.fc.bias": 0}, expected) == "net.model."


RANDOM_BUFFER_ARCH = """
import torch
from torch import nn

class WithProjection(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)
        # Drawn in the constructor and never saved: skipping its fill would leave it unset.
        self.register_buffer("proj", torch.empty(6, 6).normal_(), persistent=False)

    def forward(self, x):
        return self.fc(x @ self.proj)

def build():
    return WithProjection()

def build_plain():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 36, 3))
"""


def test_arch_for_weights_skips_the_random_init_the_state_dict_replaces(tmp_path: Path) -> None:
    from gradcheck_cli.model.arch import build_arch, build_arch_for_weights

    arch = tmp_path / "random_arch.py"
    arch.write_text(RANDOM_BUFFER_ARCH)
    torch.manual_seed(0)
    reference = build_arch(f"{arch}:build_plain", {})
    state = torch.random.get_rng_state()
    skipped = build_arch_for_weights(f"{arch}:build_plain", {})
    # Known answer: no random number was drawn (every fill was skipped) ...
    assert torch.equal(torch.random.get_rng_state(), state)
    # ... and after a strict load the module is exactly the reference.
    skipped.load_state_dict(reference.state_dict(), strict=True)
    for key, value in reference.state_dict().items():
        assert torch.equal(skipped.state_dict()[key], value), key


def test_arch_for_weights_builds_normally_when_a_fill_is_not_in_the_state_dict(tmp_path: Path) -> None:
    from gradcheck_cli.model.arch import build_arch, build_arch_for_weights

    arch = tmp_path / "random_arch.py"
    arch.write_text(RANDOM_BUFFER_ARCH)
    torch.manual_seed(1)
    reference = build_arch(f"{arch}:build", {})
    torch.manual_seed(1)
    module = build_arch_for_weights(f"{arch}:build", {})
    assert torch.equal(module.proj, reference.proj)  # the non-persistent draw is the ordinary one
    assert torch.equal(module.fc.weight, reference.fc.weight)


def test_strict_state_dict_load_matches_the_file_bit_for_bit(tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pt"
    torch.save(model.state_dict(), path)
    loaded = model_from_path(path, arch="torchvision:resnet18")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value), key
