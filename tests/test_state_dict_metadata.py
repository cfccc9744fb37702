"""A state_dict keeps the module versions torch.save recorded, through prefixes and nesting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from gradcheck_cli.model.torch_load import model_from_path

torchvision = pytest.importorskip("torchvision")


@pytest.mark.parametrize("wrap", ["plain", "prefixed", "nested"])
def test_mnasnet_state_dict_loads_with_its_versions(tmp_path: Path, wrap: str) -> None:
    # MNASNet refuses a state_dict without its version ("version should be set to 1 or 2").
    model = torchvision.models.mnasnet0_5()
    state: Any = model.state_dict()
    if wrap == "prefixed":  # as DataParallel saves it
        state = torch.nn.DataParallel(model).state_dict()
    elif wrap == "nested":
        state = {"state_dict": state, "epoch": 3}
    path = tmp_path / "mnasnet.pt"
    torch.save(state, path)
    loaded = model_from_path(path, arch="torchvision:mnasnet0_5")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value), key


def test_mnasnet_in_the_cli_probes(cli: Any, tmp_path: Path) -> None:
    path = tmp_path / "mnasnet.pt"
    torch.save(torchvision.models.mnasnet0_5().state_dict(), path)
    code, _, err = cli("inspect", path, "--arch", "torchvision:mnasnet0_5", "--input-shape", "2,3,64,64")
    assert code == 0, err
