"""A ReLU-family row's dead units and moments, as the recorder computes them from per-unit sums,
against an independent float64 reference: 'dead' is every element exactly zero."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from gradcheck_cli.probe.recorder import Recorder, Row  # noqa: E402
from gradcheck_cli.records import RowKind  # noqa: E402


def _record(values: torch.Tensor, fn: str, *, channel_first: bool) -> Row:
    recorder = Recorder(saturation_cutoff=0.01)
    row = recorder.row("act", type="act", kind=RowKind.ACTIVATION, module="act", fn=fn, channel_first=channel_first)
    recorder.record_output(row, values, gradient=False)
    recorder.end_batch()
    return row


def _reference_alive(values: torch.Tensor, axis: int) -> torch.Tensor:
    moved = values.movedim(axis, 0).reshape(values.shape[axis], -1)
    return (moved != 0).any(dim=1)


# (shape, channel_first, unit axis): NCHW with large and small images, features of (N, F),
# sequences (N, T, F), one sample (leading block of 1) and a 1-d output.
LAYOUTS = [
    ((4, 6, 5, 7), True, 1),
    ((3, 10, 2, 2), True, 1),
    ((9, 12), False, 1),
    ((3, 5, 8), False, 2),
    ((1, 6, 4, 4), True, 1),
    ((11,), False, 0),
]


@pytest.mark.parametrize(("shape", "channel_first", "axis"), LAYOUTS)
def test_relu_dead_units_and_moments_match_float64(shape: tuple[int, ...], channel_first: bool, axis: int) -> None:
    generator = torch.Generator().manual_seed(7)
    values = torch.randn(shape, generator=generator).relu()
    dead = [0, shape[axis] - 1] if shape[axis] > 2 else [0]
    index = [slice(None)] * len(shape)
    for unit in dead:
        index[axis] = unit
        values[tuple(index)] = 0.0
    row = _record(values, "relu", channel_first=channel_first)
    assert row.alive is not None
    assert torch.equal(row.alive, _reference_alive(values, axis))
    assert not row.alive[dead].any()
    assert row.alive.any()
    exact = values.double()
    assert row.moments.mean == pytest.approx(float(exact.mean()), rel=1e-6)
    assert row.moments.variance == pytest.approx(float(exact.var(correction=0)), rel=1e-5)
    assert (row.moments.minimum, row.moments.maximum) == (float(values.min()), float(values.max()))


def test_a_unit_whose_values_cancel_to_a_zero_sum_is_alive() -> None:
    """GELU outputs can be negative: a unit of +x and -x sums to exactly 0 and is not dead."""
    values = torch.full((4, 3, 2, 2), 0.25)
    values[:, 1] = torch.tensor([[0.5, -0.5], [-0.5, 0.5]])  # sums to 0, every element non-zero
    values[:, 2] = 0.0  # dead
    row = _record(values, "gelu", channel_first=True)
    assert row.alive is not None
    assert row.alive.tolist() == [True, True, False]


def test_a_unit_of_subnormal_values_is_alive() -> None:
    """A sum of non-negative floats is at least its largest term, even below float32's normal range."""
    values = torch.zeros(8, 4)
    values[3, 2] = 1e-44  # a float32 subnormal
    row = _record(values, "relu", channel_first=False)
    assert row.alive is not None
    assert row.alive.tolist() == [False, False, True, False]


def test_nan_counts_as_alive_and_is_counted() -> None:
    values = torch.zeros(5, 3)
    values[2, 1] = float("nan")
    values[:, 0] = 1.0
    row = _record(values, "relu", channel_first=False)
    assert row.alive is not None
    assert row.alive.tolist() == [True, True, False]
    assert row.nan == 1


def test_large_bfloat16_unit_sums_accumulate_in_float32() -> None:
    """A large bfloat16 output is reduced in its own dtype (no float32 copy). Each live unit holds
    1025 ones among 2049 values: its sum is 1025 only when accumulated wider (bfloat16 rounds it to
    1024), and the mean of 0.5 keeps the variance well clear of the cancellation fallback."""
    values = torch.zeros(2049, 2048, dtype=torch.bfloat16)
    values[:1025, 1:] = 1
    row = _record(values, "relu", channel_first=False)
    assert row.alive is not None
    assert not bool(row.alive[0]) and bool(row.alive[1:].all())
    share = 1025 * 2047 / (2049 * 2048)
    assert row.moments.mean == pytest.approx(share, rel=1e-6)
    assert row.moments.variance == pytest.approx(share * (1 - share), rel=2**-8)  # squares: row norms in bfloat16
