"""Gradient through time (docs/theory.md#gradient-through-time): known answers for RNN, LSTM, GRU and IRNN."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gradcheck_cli import api
from gradcheck_cli.gate.rules import evaluate
from gradcheck_cli.options import InputOptions, LossKind, ProbeOptions
from gradcheck_cli.probe.recurrent import fit_decay
from gradcheck_cli.records import DirectionTrace, Report, ThroughTime
from tests.conftest import validate_report

STEPS = 40


class ManyToOne(nn.Module):
    """The loss sees only the last step, so dL/dh_t reaches early steps through time alone."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        self.rnn = rnn
        width = rnn.hidden_size * (2 if rnn.bidirectional else 1)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1] if self.rnn.batch_first else out[-1])


def probe(model: nn.Module, shape: tuple[int, ...], **kwargs: object) -> Report:
    report = api.inspect_module(model, ProbeOptions(inputs=InputOptions(input_shape=(shape,)), **kwargs))  # type: ignore[arg-type]
    validate_report(report.to_dict())
    return report


def trace_of(report: Report, name: str = "rnn") -> ThroughTime:
    row = next(r for r in report.layers if r.name == name)
    assert row.through_time is not None
    return row.through_time


def forward_trace(report: Report) -> DirectionTrace:
    tt = trace_of(report)
    assert tt.ok, tt.reason
    return tt.directions[0]


def tanh_rnn(radius: float, input_scale: float = 0.05, hidden: int = 64) -> nn.RNN:
    torch.manual_seed(0)
    rnn = nn.RNN(8, hidden)
    with torch.no_grad():
        q, _ = torch.linalg.qr(torch.randn(hidden, hidden))
        rnn.weight_hh_l0.copy_(radius * q)  # every eigenvalue has modulus `radius`
        rnn.weight_ih_l0.mul_(input_scale)
        rnn.bias_ih_l0.zero_()
        rnn.bias_hh_l0.zero_()
    return rnn


def test_fit_decay_on_a_geometric_sequence() -> None:
    rate, horizon = fit_decay([0.7**k for k in range(30)])
    assert rate == pytest.approx(0.7, rel=1e-9)
    assert horizon == 1 + int(math.log(0.01) / math.log(0.7))  # 0.7^k >= 0.01 for k <= 12


def test_tanh_rnn_decays_at_radius_times_mean_derivative() -> None:
    radius = 0.5
    rnn = tanh_rnn(radius)
    report = probe(ManyToOne(rnn), (STEPS, 16, 8))
    trace = forward_trace(report)
    assert trace.spectral_radius["hidden"] == pytest.approx(radius, rel=1e-6)
    # Independent: the mean tanh derivative along the actual hidden states.
    x = torch.randn(STEPS, 16, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden, _ = rnn(x)
    mean_derivative = float((1 - hidden**2).mean())
    assert trace.decay_rate == pytest.approx(radius * mean_derivative, rel=0.1)
    # Many-to-one: the gradient is largest at the last step and falls geometrically before it.
    assert trace.grad_norms[-1] == max(trace.grad_norms)
    assert trace.horizon < 10  # 0.5^k >= 0.01 only for k <= 6
    assert {f.rule for f in evaluate(report)} >= {"short-gradient-horizon"}


def test_lstm_with_forget_bias_one_keeps_a_longer_horizon() -> None:
    rnn_report = probe(ManyToOne(tanh_rnn(0.6)), (STEPS, 16, 8))
    torch.manual_seed(0)
    lstm = nn.LSTM(8, 64)
    with torch.no_grad():
        lstm.weight_ih_l0.mul_(0.05)
        lstm.bias_ih_l0.zero_()
        lstm.bias_hh_l0.zero_()
        lstm.bias_ih_l0[64:128] = 1.0  # forget gate (PyTorch order i, f, g, o)
    lstm_report = probe(ManyToOne(lstm), (STEPS, 16, 8))
    lstm_trace = forward_trace(lstm_report)
    assert lstm_trace.gates["forget"].mean > 0.7  # sigmoid(1) = 0.73 before recurrent input
    assert lstm_trace.horizon > forward_trace(rnn_report).horizon
    assert lstm_trace.decay_rate is not None and lstm_trace.decay_rate > forward_trace(rnn_report).decay_rate  # type: ignore[operator]


def test_identity_relu_rnn_keeps_the_norm() -> None:
    torch.manual_seed(0)
    irnn = nn.RNN(8, 32, nonlinearity="relu")
    with torch.no_grad():
        irnn.weight_hh_l0.copy_(torch.eye(32))  # IRNN (Le, Jaitly & Hinton 2015)
        irnn.weight_ih_l0.mul_(0.01)
        irnn.bias_hh_l0.zero_()
        irnn.bias_ih_l0.fill_(0.1)  # keeps every unit active, so relu' = 1 along the way
    trace = forward_trace(probe(ManyToOne(irnn), (STEPS, 8, 8)))
    assert trace.decay_rate == pytest.approx(1.0, abs=0.02)
    assert trace.horizon == STEPS
    assert max(trace.grad_norms) / min(trace.grad_norms) < 1.5


def test_bidirectional_multilayer_attribution() -> None:
    torch.manual_seed(0)
    lstm = nn.LSTM(8, 16, num_layers=2, bidirectional=True, batch_first=True)
    scales = {"_l0": 0.1, "_l0_reverse": 0.2, "_l1": 0.3, "_l1_reverse": 0.4}
    with torch.no_grad():
        for suffix, scale in scales.items():
            q, _ = torch.linalg.qr(torch.randn(64, 16))
            getattr(lstm, "weight_hh" + suffix).copy_(scale * q)
        lstm.bias_ih_l1_reverse[16:32] = 20.0  # only this direction's forget gate is pinned open
    report = probe(ManyToOne(lstm), (8, 12, 8))
    assert [r.name for r in report.layers] == ["rnn", "head"]  # the unroll's gates are no rows
    tt = trace_of(report)
    assert tt.ok and tt.max_abs_error is not None and tt.tolerance is not None
    assert tt.max_abs_error <= tt.tolerance
    by_key = {(d.layer, d.direction): d for d in tt.directions}
    assert set(by_key) == {(0, "forward"), (0, "reverse"), (1, "forward"), (1, "reverse")}
    for (layer, direction), trace in by_key.items():
        suffix = f"_l{layer}" + ("_reverse" if direction == "reverse" else "")
        weight = getattr(lstm, "weight_hh" + suffix).detach().double()
        forget_block = weight[16:32]
        expected = float(torch.linalg.eigvals(forget_block).abs().max())
        assert trace.spectral_radius["forget"] == pytest.approx(expected, rel=1e-6)
    assert by_key[(1, "reverse")].gates["forget"].mean > 0.99
    assert all(by_key[k].gates["forget"].mean < 0.8 for k in by_key if k != (1, "reverse"))


@pytest.mark.parametrize("kind", ["RNN", "LSTM", "GRU"])
def test_unrolled_model_gives_the_fused_numbers(kind: str) -> None:
    """The probe swaps in the unrolled output: the loss and every other row must not change."""
    torch.manual_seed(1)
    model = ManyToOne(getattr(nn, kind)(8, 16, num_layers=2))
    report = probe(model, (10, 4, 8), loss=LossKind.MSE)
    x = torch.randn(10, 4, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected_head = model(x)
    head = next(r for r in report.layers if r.name == "head")
    assert head.output.mean == pytest.approx(float(expected_head.mean()), rel=1e-5, abs=1e-7)
    assert trace_of(report).ok


class Packed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(8, 16, batch_first=True)
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lengths = torch.tensor([x.shape[1] - (i % 4) for i in range(x.shape[0])])
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, h = self.rnn(packed)
        return self.head(h[-1])


def test_packed_sequences_are_unrolled_exactly() -> None:
    torch.manual_seed(0)
    report = probe(Packed(), (6, 9, 8))
    tt = trace_of(report)
    assert tt.ok, tt.reason
    assert tt.directions[0].steps == 9


def test_exploding_recurrence_is_a_finding() -> None:
    rnn = tanh_rnn(1.0, input_scale=0.001)
    with torch.no_grad():
        rnn.weight_hh_l0.mul_(3.0)  # radius 3, small states: tanh' ~ 1, growth ~x3 per step back
    report = probe(ManyToOne(rnn), (20, 4, 8))
    trace = forward_trace(report)
    assert trace.decay_rate is not None and trace.decay_rate > 1.05
    assert "exploding-through-time" in {f.rule for f in evaluate(report)}


class CellLoop(nn.Module):
    def __init__(self, radius: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.cell = nn.RNNCell(8, 32)
        self.head = nn.Linear(32, 3)
        with torch.no_grad():
            q, _ = torch.linalg.qr(torch.randn(32, 32))
            self.cell.weight_hh.copy_(radius * q)
            self.cell.weight_ih.mul_(0.05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.new_zeros(x.shape[1], 32)
        for step in x:
            h = self.cell(step, h)
        return self.head(h)


def test_cell_loops_get_gradient_through_time() -> None:
    report = probe(CellLoop(0.5), (STEPS, 8, 8))
    first = report.layers[0]
    assert first.name == "cell" and first.through_time is not None
    (trace,) = first.through_time.directions
    assert trace.steps == STEPS
    assert trace.grad_norms == tuple(r.output_grad_norm for r in report.layers if r.type == "RNNCell")
    assert trace.spectral_radius["hidden"] == pytest.approx(0.5, rel=1e-6)
    assert trace.decay_rate is not None and 0.3 < trace.decay_rate < 0.55
