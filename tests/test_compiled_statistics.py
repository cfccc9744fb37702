"""The compiled one-pass statistics (probe/compiled.py) against float64 references computed
independently, against the eager passes, and through a whole probe: the same rows and extremes,
with the eager path taking over where the kernel cannot answer."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from gradcheck_cli import api  # noqa: E402
from gradcheck_cli.options import InputOptions, ProbeOptions, StatisticsPass  # noqa: E402
from gradcheck_cli.probe import compiled as compiled_module  # noqa: E402
from gradcheck_cli.probe.compiled import CompiledStatistics, pays  # noqa: E402
from gradcheck_cli.probe.recorder import Recorder, Row  # noqa: E402
from gradcheck_cli.records import RowKind  # noqa: E402

SMALL = 64  # tests lower the size threshold, so small tensors take the compiled pass


@pytest.fixture(scope="module")
def kernels() -> Iterator[CompiledStatistics]:
    """One kernel for the module (compiling costs seconds), skipped where this machine cannot
    compile one: the probe then runs the eager passes, which test_a_compiler_that_fails covers."""
    compiled = CompiledStatistics(min_elements=SMALL)
    if compiled.reduce(torch.arange(100.0)) is None:
        pytest.skip(f"torch.compile cannot build the kernel here: {compiled.failure}")
    yield compiled


def _record(values: torch.Tensor, fn: str | None, channel_first: bool, compiled: CompiledStatistics | None) -> Row:
    recorder = Recorder(saturation_cutoff=0.01)
    recorder.compiled = compiled
    kind = RowKind.ACTIVATION if fn else RowKind.PARAM
    row = recorder.row("r", type="r", kind=kind, module="r", fn=fn, channel_first=channel_first)
    recorder.record_output(row, values, gradient=False)
    recorder.end_batch()
    return row


@pytest.mark.parametrize("shape", [(6, 5, 7, 3), (40, 12), (5000,)])
def test_compiled_moments_match_float64(kernels: CompiledStatistics, shape: tuple[int, ...]) -> None:
    generator = torch.Generator().manual_seed(3)
    # A mean of 1000 against a spread of 2: Σx² - (Σx)²/n in float32 would keep no digit of the
    # variance; the shifted sums keep them.
    values = torch.randn(shape, generator=generator) * 2 + 1000
    before = kernels.tensors
    row = _record(values, None, False, kernels)
    assert kernels.tensors == before + 1, "the compiled pass did not answer"
    exact = values.double()
    assert row.moments.count == values.numel()
    assert row.moments.mean == pytest.approx(float(exact.mean()), rel=1e-7)
    assert row.moments.variance == pytest.approx(float(exact.var(correction=0)), rel=1e-5)
    assert (row.moments.minimum, row.moments.maximum) == (float(values.min()), float(values.max()))


def test_relu_family_rows_keep_the_eager_unit_sums(kernels: CompiledStatistics) -> None:
    """A ReLU-family row needs per-unit sums, which the eager passes take; its dead units and
    moments are the eager path's, and the kernel is not called."""
    values = torch.randn(8, 10, 3, 3).relu()
    values[:, [0, 7]] = 0.0
    before = kernels.tensors
    compiled = _record(values, "relu", True, kernels)
    eager = _record(values, "relu", True, None)
    assert kernels.tensors == before
    assert compiled.alive is not None and eager.alive is not None
    assert torch.equal(compiled.alive, eager.alive)
    assert (~compiled.alive).nonzero().flatten().tolist() == [0, 7]
    assert compiled.moments == eager.moments


def test_nan_and_inf_fall_back_to_the_eager_counts(kernels: CompiledStatistics) -> None:
    values = torch.randn(10, 10)
    values[2, 3] = math.nan
    values[5, 5] = math.inf
    row = _record(values, None, False, kernels)
    assert (row.nan, row.inf) == (1, 1)
    assert row.moments.count == 98


def test_shifted_sums_that_cancel_fall_back_to_welford(kernels: CompiledStatistics) -> None:
    """The shift is the mean of the first 4096 values: when those sit far from the rest, the
    shifted sums cancel, and the eager path (Welford) answers instead."""
    values = torch.full((1024, 4096), 5.0) + torch.randn(1024, 4096) * 1e-3
    values[0] += 10.0  # the first 4096 values: the shift sits 10 from a mean of 5.01 (sd 0.3)
    before = kernels.tensors
    row = _record(values, None, False, kernels)
    assert kernels.tensors == before, "the compiled pass answered from cancelled sums"
    exact = values.double()
    assert row.moments.variance == pytest.approx(float(exact.var(correction=0)), rel=1e-4)


def test_small_and_half_precision_outputs_keep_the_eager_path() -> None:
    kernels = CompiledStatistics()  # the real threshold: nothing below 1M elements compiles
    assert not kernels.eligible(torch.zeros(1000))
    assert not kernels.eligible(torch.zeros(kernels.min_elements, dtype=torch.bfloat16))
    assert not kernels.eligible(torch.zeros(2, kernels.min_elements // 2).t())  # not contiguous
    assert kernels.eligible(torch.zeros(kernels.min_elements))


def test_a_compiler_that_fails_leaves_the_eager_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_args: object, **_kwargs: object) -> object:
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", broken)
    kernels = CompiledStatistics(min_elements=SMALL)
    values = torch.randn(20, 30)
    row = _record(values, None, False, kernels)
    assert kernels.tensors == 0
    assert kernels.note().startswith("torch.compile is not available (no C++ compiler found)")
    assert row.moments.mean == pytest.approx(float(values.double().mean()), rel=1e-5, abs=1e-6)


def test_pays_weighs_the_bytes_left_against_a_compile() -> None:
    """At the measured 52.1 ms saved per 1336 MB, a 12 s compile is won back after 308 GB, whatever
    the split between micro-batches and their size."""
    break_even = compiled_module.COMPILE_SECONDS / compiled_module.SAVED_SECONDS_PER_BYTE
    assert break_even == pytest.approx(307.7e9, rel=1e-3)
    assert not pays(10**9, 307)
    assert pays(10**9, 308)
    assert pays(308 * 10**9, 1)
    assert not pays(10**12, 0)  # nothing left to run


class _Wide(nn.Module):
    """A convolution whose output (16·12·12 = 2304 elements per sample) clears SMALL, followed by
    a ReLU (per-unit: eager) and a head whose output (4 per sample) does not."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.act = nn.ReLU()
        self.head = nn.Linear(16 * 12 * 12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.conv(x)).flatten(1))


def _probe(
    statistics_pass: StatisticsPass, monkeypatch: pytest.MonkeyPatch, batches: int = 1
) -> tuple[dict[str, object], list[str]]:
    monkeypatch.setattr(compiled_module, "MIN_ELEMENTS", SMALL)
    torch.manual_seed(0)
    model = _Wide()
    options = ProbeOptions(
        inputs=InputOptions(input_shape=((8, 3, 12, 12),), batches=batches), statistics_pass=statistics_pass
    )
    report = api.inspect_module(model, options)
    rows = {layer.name: layer for layer in report.layers}
    return rows, list(report.notes)


def test_a_compiled_probe_reports_the_eager_rows(kernels: CompiledStatistics, monkeypatch: pytest.MonkeyPatch) -> None:
    compiled_rows, compiled_notes = _probe(StatisticsPass.COMPILED, monkeypatch)
    eager_rows, eager_notes = _probe(StatisticsPass.EAGER, monkeypatch)
    assert any("compiled pass" in note for note in compiled_notes)
    assert not any("compiled" in note for note in eager_notes)
    assert compiled_rows.keys() == eager_rows.keys()
    for name, layer in compiled_rows.items():
        other = eager_rows[name]
        assert layer.output is not None and other.output is not None
        assert layer.output.mean == pytest.approx(other.output.mean, rel=1e-5, abs=1e-6)
        assert layer.output.var == pytest.approx(other.output.var, rel=1e-4)
        assert (layer.output.min, layer.output.max) == (other.output.min, other.output.max)
        assert layer.dead == other.dead


def test_auto_compiles_only_when_the_batches_left_pay(
    kernels: CompiledStatistics, monkeypatch: pytest.MonkeyPatch
) -> None:
    _rows, notes = _probe(StatisticsPass.AUTO, monkeypatch, batches=2)
    assert not any("compiled" in note for note in notes), "a few small batches never pay for a compile"
    monkeypatch.setattr(compiled_module, "COMPILE_SECONDS", 0.0)
    auto_rows, notes = _probe(StatisticsPass.AUTO, monkeypatch, batches=2)
    # The first micro-batch runs eagerly and measures the sizes; the second takes the compiled pass.
    assert "large outputs reduced in one compiled pass each (torch.compile): 1" in notes
    eager_rows, _ = _probe(StatisticsPass.EAGER, monkeypatch, batches=2)
    for name, layer in auto_rows.items():
        assert layer.output is not None and eager_rows[name].output is not None
        assert layer.output.var == pytest.approx(eager_rows[name].output.var, rel=1e-4)


def test_a_compiled_probe_with_no_large_output_says_the_eager_passes_ran() -> None:
    torch.manual_seed(0)
    options = ProbeOptions(inputs=InputOptions(input_shape=((2, 3, 12, 12),)), statistics_pass=StatisticsPass.COMPILED)
    report = api.inspect_module(_Wide(), options)
    assert any(note.startswith("no output took the compiled statistics pass") for note in report.notes)


@pytest.mark.parametrize(("layout", "compiles"), [(torch.channels_last, False), (torch.contiguous_format, True)])
def test_auto_counts_only_the_outputs_the_compiled_pass_can_take(
    kernels: CompiledStatistics, monkeypatch: pytest.MonkeyPatch, layout: torch.memory_format, compiles: bool
) -> None:
    """A channels-last convolution's output is large but not contiguous, so the compiled pass would
    leave it to the eager one: `auto` does not compile for it, even when compiling is free, and the
    report has no compiled-pass note. The same output in the default layout does compile."""
    forward = nn.Conv2d.forward

    def conv_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        return forward(self, x).contiguous(memory_format=layout)

    monkeypatch.setattr(nn.Conv2d, "forward", conv_forward)
    monkeypatch.setattr(compiled_module, "COMPILE_SECONDS", 0.0)
    _rows, notes = _probe(StatisticsPass.AUTO, monkeypatch, batches=2)
    assert any("compiled" in note for note in notes) is compiles, notes
