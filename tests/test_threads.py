"""The probe of a small CPU model runs on one intra-op thread and gives the caller's count back."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradcheck_cli import api
from gradcheck_cli.threads import SMALL_MODEL_PARAMETERS, probe_thread_count


@pytest.mark.parametrize(
    "parameters, current, device_type, expected",
    [
        (100_000, 8, "cpu", 1),
        (SMALL_MODEL_PARAMETERS, 8, "cpu", 1),
        (SMALL_MODEL_PARAMETERS + 1, 8, "cpu", 8),  # a larger model keeps the pool
        (100_000, 8, "cuda", 8),  # the GPU does the work; CPU threads are left alone
        (100_000, 1, "cpu", 1),
    ],
)
def test_probe_thread_count(parameters: int, current: int, device_type: str, expected: int) -> None:
    assert probe_thread_count(parameters, current, device_type=device_type) == expected


class _ThreadsSeen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(torch.get_num_threads())
        return self.linear(x)


def test_small_model_is_probed_on_one_thread_and_the_count_is_restored() -> None:
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model = _ThreadsSeen()
        report = api.inspect_module(model, api.ProbeOptions(inputs=api.InputOptions(input_shape=((8, 4),))))
        assert report.layers
        assert model.seen and set(model.seen) == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)


def test_count_is_restored_when_the_probe_fails() -> None:
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(Exception, match="forward pass failed"):
            api.inspect_module(nn.Linear(4, 2), api.ProbeOptions(inputs=api.InputOptions(input_shape=((8, 5),))))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)
