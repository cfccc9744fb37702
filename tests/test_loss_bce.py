"""An output that comes straight from a sigmoid is probed with binary cross-entropy, the loss such
outputs are trained with: its gradient at the sigmoid's input is p - y whatever the saturation,
where mse's carries the factor p(1 - p). The same choice on the torch and ONNX paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from gradcheck_cli import api
from gradcheck_cli.options import InputOptions, LossKind, ProbeOptions
from gradcheck_cli.probe.loss import LossFunction
from gradcheck_cli.records import Severity

TARGET_SEED_OFFSET = 1_000_003  # LossFunction draws its targets from seed + this


def test_bce_gradient_at_the_sigmoid_input_is_p_minus_y() -> None:
    logits = torch.tensor([[-20.0, -8.0, 0.5], [12.0, 3.0, -1.0]], requires_grad=True)
    probabilities = torch.sigmoid(logits)
    loss_fn = LossFunction(kind=LossKind.AUTO, total=2, seed=7)
    loss_fn(probabilities).backward()
    assert loss_fn.kind is LossKind.BCE
    targets = torch.rand((2, 3), generator=torch.Generator().manual_seed(7 + TARGET_SEED_OFFSET))
    expected = (torch.sigmoid(logits.detach()) - targets) / 6  # mean over 2 samples x 3 outputs
    assert logits.grad is not None
    torch.testing.assert_close(logits.grad, expected, rtol=1e-4, atol=1e-7)
    # mse on the same saturated outputs: the first unit's gradient is shrunk by p(1-p) ~ 2e-9.
    logits.grad = None
    LossFunction(kind=LossKind.MSE, total=2, seed=7)(torch.sigmoid(logits)).backward()
    assert logits.grad is not None and abs(float(logits.grad[0, 0])) < 1e-8 < abs(float(expected[0, 0]))


def test_outputs_not_from_a_sigmoid_keep_their_loss() -> None:
    assert LossFunction(kind=LossKind.AUTO, total=2, seed=0)(torch.randn(2, 5, requires_grad=True)) is not None
    loss_fn = LossFunction(kind=LossKind.AUTO, total=2, seed=0)
    loss_fn(torch.randn(2, 1, 4, requires_grad=True).tanh())
    assert loss_fn.kind is LossKind.MSE
    with pytest.raises(Exception, match="probabilities in"):
        LossFunction(kind=LossKind.BCE, total=2, seed=0)(torch.randn(2, 3, requires_grad=True) * 5)


class Detector(nn.Module):
    """A detector's head: conv features, a squeeze-excitation gate and a probability map, trained
    to be confident (its output saturates on inputs without the object)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.squeeze = nn.Conv2d(8, 8, 1)
        self.mix = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 1, 1)
        with torch.no_grad():
            self.squeeze.bias.fill_(8.0)  # the gate is fully open: saturated
            self.head.bias.fill_(-12.0)  # "no object" everywhere: saturated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.conv(x))
        gate = torch.sigmoid(self.squeeze(features.mean((2, 3), keepdim=True)))
        return torch.sigmoid(self.head(torch.relu(self.mix(features * gate))))


def _findings(report: api.Report) -> list[tuple[str, str | None]]:  # type: ignore[name-defined]
    return [(f.code, f.layer) for f in report.findings if f.severity.rank >= Severity.WARNING.rank]


def test_a_confident_detector_is_not_a_saturation_fault_on_torch_and_onnx(tmp_path: Path) -> None:
    probe = ProbeOptions(inputs=InputOptions(input_shape=((2, 3, 16, 16),), seed=0))
    model = Detector().eval()
    report = api.check_module(model, probe)
    assert report.probe.loss == "bce"
    assert [code for code, _ in _findings(report)] == []
    sigmoid_rows = [r for r in report.layers if r.fn == "sigmoid"]
    assert len(sigmoid_rows) == 2 and all(
        r.saturation is not None and r.saturation.fraction > 0.9 for r in sigmoid_rows
    )
    path = tmp_path / "detector.onnx"
    torch.onnx.export(model, (torch.randn(2, 3, 16, 16),), str(path), dynamo=False, input_names=["x"])
    onnx_report = api.check(path, probe=probe)
    assert onnx_report.probe.loss == "bce"
    assert [code for code, _ in _findings(onnx_report)] == []
    # onnxruntime and torch round a saturated sigmoid differently in the last bits; log p amplifies it.
    assert onnx_report.probe.loss_value == pytest.approx(report.probe.loss_value, rel=1e-3)
    # Under mse the same model's gradient vanishes behind the saturated output.
    mse = api.check_module(model, ProbeOptions(inputs=probe.inputs, loss=LossKind.MSE))
    assert "GC102" in {code for code, _ in _findings(mse)}


@pytest.mark.parametrize("kind", [LossKind.MSE, LossKind.BCE, LossKind.CROSS_ENTROPY])
def test_targets_are_released_with_the_last_micro_batch_and_the_split_loss_is_the_whole(kind: LossKind) -> None:
    """The probe's loss over two micro-batches adds up to the loss over the whole batch (the same
    seeded targets), and the targets are dropped once the last micro-batch has taken its share, so
    they do not outlive the loss through the backward pass."""
    output = torch.rand(6, 5, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    whole = LossFunction(kind=kind, total=6, seed=0)
    expected = float(whole(output))
    assert whole._targets is None
    split = LossFunction(kind=kind, total=6, seed=0)
    first = float(split(output[:4]))
    assert split._targets is not None  # two samples still to come
    second = float(split(output[4:]))
    assert split._targets is None
    assert first + second == pytest.approx(expected, rel=1e-6)
