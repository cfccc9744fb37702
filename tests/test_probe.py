"""Known answers for the probe: each number checked against an independent computation."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradcheck_cli import api
from gradcheck_cli.options import InputOptions, LossKind, Mode, ProbeOptions
from gradcheck_cli.records import LayerStats, Report, RowKind
from tests.conftest import validate_report


def probe(module: nn.Module, shape: tuple[int, ...], **kwargs: Any) -> Report:
    inputs = InputOptions(
        input_shape=(shape,),
        batch_size=kwargs.pop("batch_size", None),
        batches=kwargs.pop("batches", 1),
        seed=kwargs.pop("seed", 0),
    )
    report = api.inspect_module(module, ProbeOptions(inputs=inputs, **kwargs))
    validate_report(report.to_dict())
    return report


def rows(report: Report, kind: RowKind | None = None) -> list[LayerStats]:
    return [r for r in report.layers if kind is None or r.kind is kind]


# ---- dead ReLU units -----------------------------------------------------------------------


class KilledMLP(nn.Module):
    """Units killed by construction: bias -1e3 keeps them negative for any N(0,1) input."""

    def __init__(self, style: str, killed: int = 5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)
        self.act = nn.ReLU()
        self.style = style
        with torch.no_grad():
            self.fc1.bias[:killed] = -1e3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc1(x)
        if self.style == "module":
            h = self.act(z)
        elif self.style == "torch":
            h = torch.relu(z)
        elif self.style == "functional":
            h = F.relu(z)
        elif self.style == "method":
            h = z.relu()
        else:
            h = F.relu(z.clone(), inplace=True)
        return self.fc2(h)


@pytest.mark.parametrize("style", ["module", "torch", "functional", "method", "inplace"])
def test_dead_units_counted_exactly_however_relu_is_written(style: str) -> None:
    report = probe(KilledMLP(style), (64, 8))
    (act,) = rows(report, RowKind.ACTIVATION)
    assert act.fn == "relu"
    assert act.dead is not None and (act.dead.units, act.dead.total) == (5, 16)


def test_functional_and_module_relu_give_identical_rows() -> None:
    a = probe(KilledMLP("module"), (32, 8)).to_dict()["layers"]
    b = probe(KilledMLP("torch"), (32, 8)).to_dict()["layers"]
    for row_a, row_b in zip(a, b, strict=True):
        for key in ("output", "output_grad_norm", "dead", "saturation", "grad", "fn", "kind"):
            assert row_a[key] == row_b[key], key
    assert [r["name"] for r in a] == ["fc1", "act", "fc2"]
    assert [r["name"] for r in b] == ["fc1", "relu()", "fc2"]


def test_conv_units_are_channels() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 2))
    with torch.no_grad():
        model[0].bias[:3] = -1e3
    act = rows(probe(model, (16, 3, 6, 6)), RowKind.ACTIVATION)[0]
    assert act.dead is not None and (act.dead.units, act.dead.total, act.dead.axis) == (3, 8, 1)


def test_sequence_units_are_last_dim() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 2))
    with torch.no_grad():
        model[0].bias[:4] = -1e3
    act = rows(probe(model, (4, 7, 6), loss=LossKind.MSE), RowKind.ACTIVATION)[0]
    assert act.dead is not None and (act.dead.units, act.dead.total, act.dead.axis) == (4, 10, -1)


# ---- saturation ------------------------------------------------------------------------------


class Scaled(nn.Module):
    def __init__(self, fn: str, scale: float) -> None:
        super().__init__()
        self.lin = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.lin.weight.fill_(scale)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(torch, self.fn)(self.lin(x))


@pytest.mark.parametrize("fn", ["sigmoid", "tanh"])
@pytest.mark.parametrize("scale", [0.5, 3.0, 10.0])
def test_saturation_fraction_matches_the_derivative_formula(tmp_path: Path, fn: str, scale: float) -> None:
    z = torch.linspace(-4, 4, 4001).reshape(-1, 1)
    inputs = tmp_path / "z.pt"
    torch.save(z, inputs)
    cutoff = 0.05
    report = api.inspect_module(
        Scaled(fn, scale), ProbeOptions(inputs=InputOptions(input=inputs), saturation_cutoff=cutoff, loss=LossKind.MSE)
    )
    act = rows(report, RowKind.ACTIVATION)[0]
    pre = scale * z.double()
    # Independent: derivative from the pre-activation, relative to the function's maximum.
    derivative = torch.sigmoid(pre) * (1 - torch.sigmoid(pre)) / 0.25 if fn == "sigmoid" else 1 - torch.tanh(pre) ** 2
    expected = float((derivative < cutoff).double().mean())
    assert act.saturation is not None
    assert act.saturation.fraction == pytest.approx(expected, abs=2 / 4001)


# ---- variance through depth (docs/theory.md#variance-through-a-layer) -----------------------


def deep_mlp(init: str, act: str, depth: int = 10, width: int = 512) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        lin = nn.Linear(width, width)
        if init == "old":
            bound = 1 / math.sqrt(width)
            nn.init.uniform_(lin.weight, -bound, bound)
        else:
            nn.init.xavier_uniform_(lin.weight)
        nn.init.zeros_(lin.bias)
        layers += [lin] + ([nn.Tanh()] if act == "tanh" else [])
    return nn.Sequential(*layers)


def linear_variances(report: Report) -> list[float]:
    return [r.output.var for r in rows(report, RowKind.PARAM) if r.output.var is not None]


def test_old_init_shrinks_variance_by_a_third_per_linear_layer() -> None:
    variances = linear_variances(probe(deep_mlp("old", "none"), (256, 512), loss=LossKind.MSE))
    ratios = [b / a for a, b in itertools.pairwise(variances)]
    # n_in * Var(w) = n * (1/sqrt(n))^2 / 3 = 1/3 exactly in expectation.
    assert all(0.28 < r < 0.39 for r in ratios), ratios
    assert variances[0] == pytest.approx(1 / 3, rel=0.15)


def test_glorot_holds_linear_variance_near_one() -> None:
    variances = linear_variances(probe(deep_mlp("glorot", "none"), (256, 512), loss=LossKind.MSE))
    assert all(0.8 < v < 1.25 for v in variances), variances


def test_tanh_old_init_collapses_and_glorot_does_not() -> None:
    old = linear_variances(probe(deep_mlp("old", "tanh"), (256, 512), loss=LossKind.MSE))
    glorot = linear_variances(probe(deep_mlp("glorot", "tanh"), (256, 512), loss=LossKind.MSE))
    assert old[-1] < 1e-4  # about (1/3)^10: geometric decay
    assert 0.28 < old[-1] / old[-2] < 0.39
    # Glorot: tanh's curvature still costs variance, but the per-layer factor tends to 1, not 1/3.
    assert glorot[-1] / glorot[-2] > 0.8
    assert glorot[-1] > 1000 * old[-1]


# ---- gradient norms against an independent autograd computation -----------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.fc1 = nn.Linear(6, 12)
        self.bn = nn.BatchNorm1d(12)
        self.fc2 = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


def test_gradient_norms_match_independent_autograd(tmp_path: Path) -> None:
    model = Net()
    x = torch.randn(20, 6, generator=torch.Generator().manual_seed(9))
    y = torch.randint(0, 5, (20,), generator=torch.Generator().manual_seed(10))
    torch.save(x, tmp_path / "x.pt")
    torch.save(y, tmp_path / "y.pt")
    report = api.inspect_module(
        model, ProbeOptions(inputs=InputOptions(input=tmp_path / "x.pt", batch_size=5), target=tmp_path / "y.pt")
    )
    # Independent computation: one batch, mean cross-entropy, retain_grad on every row output.
    reference = Net().eval()
    z1 = reference.fc1(x)
    z2 = reference.bn(z1)
    z3 = torch.tanh(z2)
    out = reference.fc2(z3)
    for t in (z1, z2, z3, out):
        t.retain_grad()
    loss = F.cross_entropy(out, y)
    loss.backward()
    by_name = {r.name: r for r in report.layers}
    expected_out = {"fc1": z1, "bn": z2, "tanh()": z3, "fc2": out}
    for name, tensor in expected_out.items():
        assert tensor.grad is not None
        assert by_name[name].output_grad_norm == pytest.approx(float(tensor.grad.norm()), rel=1e-5), name
        assert by_name[name].output.mean == pytest.approx(float(tensor.detach().mean()), rel=1e-4, abs=1e-6)
        assert by_name[name].output.var == pytest.approx(float(tensor.detach().var(unbiased=False)), rel=1e-4)
    for name in ("fc1", "bn", "fc2"):
        module = getattr(reference, name)
        grad = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in module.parameters()))
        weight = math.sqrt(sum(float(p.detach().pow(2).sum()) for p in module.parameters()))
        stats = by_name[name].grad
        assert stats is not None and stats.norm == pytest.approx(grad, rel=1e-5)
        assert stats.weight_norm == pytest.approx(weight, rel=1e-6)
    assert report.probe.loss_value == pytest.approx(float(loss), rel=1e-5)


# ---- micro-batching, determinism, state restoration -----------------------------------------


def test_micro_batches_merge_exactly() -> None:
    one = probe(KilledMLP("torch"), (32, 8)).to_dict()["layers"]
    four = probe(KilledMLP("torch"), (8, 8), batches=4).to_dict()["layers"]
    assert [r["name"] for r in one] == [r["name"] for r in four]
    for a, b in zip(one, four, strict=True):
        for key in ("mean", "var", "min", "max"):
            assert b["output"][key] == pytest.approx(a["output"][key], rel=1e-5, abs=1e-7), (a["name"], key)
        assert a["output"]["count"] == b["output"]["count"]
        assert a["dead"] == b["dead"]
        assert b["output_grad_norm"] == pytest.approx(a["output_grad_norm"], rel=1e-5)
        if a["grad"]:
            assert b["grad"]["norm"] == pytest.approx(a["grad"]["norm"], rel=1e-5)


def test_same_seed_same_report_other_seed_other_report() -> None:
    first = probe(Net(), (16, 6), seed=5).to_dict()
    again = probe(Net(), (16, 6), seed=5).to_dict()
    other = probe(Net(), (16, 6), seed=6).to_dict()
    assert first == again
    assert first["layers"] != other["layers"]


def test_model_state_is_restored() -> None:
    model = Net()
    model.train()
    model.fc1.weight.requires_grad_(False)
    model.fc2.weight.grad = torch.ones_like(model.fc2.weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = probe(model, (16, 6), mode=Mode.TRAIN)
    assert report.probe.mode == "train"
    assert model.training and model.bn.training
    assert not model.fc1.weight.requires_grad
    assert model.fc1.weight.grad is None
    assert torch.equal(model.fc2.weight.grad, torch.ones_like(model.fc2.weight))
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key  # BatchNorm running stats untouched in train mode too


class MultiOutput(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.body = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> Any:
        logits = self.body(x)
        if self.kind == "tuple":
            return (torch.argmax(logits, 1), logits)
        return {"hidden": x, "logits": logits}


@pytest.mark.parametrize("kind, label", [("tuple", "output[1]"), ("dict", "output['logits']")])
def test_models_returning_tuples_and_dicts(kind: str, label: str) -> None:
    report = probe(MultiOutput(kind), (4, 4), model_output="1" if kind == "tuple" else None)
    assert report.probe.output == label
    assert report.probe.loss == "cross_entropy"


def test_graph_and_eager_paths_agree(tmp_path: Path) -> None:
    model = Net().eval()
    path = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(16, 6),)), str(path))
    graph = api.inspect(path).to_dict()["layers"]
    eager = probe(Net(), (16, 6)).to_dict()["layers"]
    assert [r["name"] for r in graph] == [r["name"] for r in eager]
    for a, b in zip(graph, eager, strict=True):
        assert a["output"]["var"] == pytest.approx(b["output"]["var"], rel=1e-5)
        assert a["output_grad_norm"] == pytest.approx(b["output_grad_norm"], rel=1e-5)
        assert (a["grad"] is None) == (b["grad"] is None)
        if a["grad"] is not None:
            assert a["grad"]["norm"] == pytest.approx(b["grad"]["norm"], rel=1e-5)


def test_forward_failure_names_the_layer() -> None:
    from gradcheck_cli.errors import ProbeError

    with pytest.raises(ProbeError) as info:
        probe(Net(), (4, 7))
    assert "'fc1' (Linear)" in info.value.message
    assert "input_0 (4, 7)" in (info.value.hint or "")


def test_input_shape_inferred_from_first_layer() -> None:
    report = api.inspect_module(Net(), ProbeOptions())
    assert report.probe.inputs[0].shape == (8, 6)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 2))
    assert api.inspect_module(conv, ProbeOptions()).probe.inputs[0].shape == (8, 3, 28, 28)
    emb = nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 2))
    spec = api.inspect_module(emb, ProbeOptions(loss=LossKind.MSE)).probe.inputs[0]
    assert (spec.dtype, spec.low, spec.high) == ("int64", 0.0, 50.0)


def test_histograms_merge_exactly_and_count_every_value() -> None:
    from gradcheck_cli.stats import histogram_edges

    one = probe(KilledMLP("torch"), (32, 8), histograms=True)
    four = probe(KilledMLP("torch"), (8, 8), batches=4, histograms=True)
    assert one.histogram_edges == tuple(histogram_edges())
    for a, b in zip(one.layers, four.layers, strict=True):
        assert a.histograms is not None and b.histograms is not None
        assert a.histograms == b.histograms  # integer counts: exactly equal
        assert a.histograms.output is not None and sum(a.histograms.output) == a.output.count
        assert a.histograms.output_grad is not None and sum(a.histograms.output_grad) == a.output.count
    # Independent check against numpy on the first row (fc1's output).
    import numpy as np

    model = KilledMLP("torch").eval()
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
    values = model.fc1(x).detach().numpy().ravel()
    edges = np.array(histogram_edges(), dtype=np.float32)
    expected = np.bincount(np.searchsorted(edges, values.astype(np.float32), side="left"), minlength=len(edges) + 1)
    assert one.layers[0].histograms is not None
    assert list(one.layers[0].histograms.output or ()) == expected.tolist()


def test_memory_budget_splits_into_micro_batches_that_fit() -> None:
    from gradcheck_cli.probe.budget import estimate_probe_memory

    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 4))
    x = torch.randn(512, 64)
    estimate = estimate_probe_memory(model, (x,))
    # Independent: weights + the largest gradient (the lean probe frees each as it is reduced), and
    # per sample the input row and 2x every module output (kept for backward, and its gradient), the
    # model's output counted once more as such: the estimate errs high.
    params = sum(p.numel() for p in model.parameters()) * 4
    assert estimate.fixed == params + 64 * 256 * 4
    assert estimate.per_sample == 64 * 4 + 2 * (256 + 256 + 4 + 4) * 4
    # Several micro-batches hold every gradient (the norm of their sum needs the sum).
    several = estimate_probe_memory(model, (x,), micro_batches=2)
    assert several.fixed == 2 * params
    budget = several.fixed + 100 * estimate.per_sample
    split = probe(model, (512, 64), memory_budget=budget)
    assert (split.probe.batches, split.probe.batch_size) == (6, 100)  # 5 x 100 + 12
    assert any("split into 6 micro-batches of at most 100 samples" in note for note in split.notes)
    # The same samples in one batch (no budget) give the same statistics: the split merges exactly.
    whole = probe(model, (512, 64))
    assert whole.probe.batches == 1
    for a, b in zip(whole.layers, split.layers, strict=True):
        assert a.output.count == b.output.count == 512 * (b.shape[-1])
        assert b.output.mean == pytest.approx(a.output.mean, rel=1e-5, abs=1e-7)
        assert b.output.var == pytest.approx(a.output.var, rel=1e-5)
        assert b.output_grad_norm == pytest.approx(a.output_grad_norm, rel=1e-5)
        assert a.dead == b.dead


def test_memory_budget_says_when_even_one_sample_does_not_fit() -> None:
    from gradcheck_cli.errors import ProbeError

    model = nn.Sequential(nn.Linear(64, 4096), nn.ReLU(), nn.Linear(4096, 4))
    weights = sum(p.numel() for p in model.parameters()) * 4
    with pytest.raises(ProbeError) as info:
        probe(model, (8, 64), memory_budget=2 * weights + 1000)
    assert "even a micro-batch of 1" in info.value.message


class IgnoresInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, 3))
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bias.expand(x.shape[0], 3))


def test_a_model_that_ignores_its_input_is_reported() -> None:
    report = probe(IgnoresInput(), (4, 5))
    assert any("does not depend on the model's inputs" in note for note in report.notes)
    assert not any("does not depend" in note for note in probe(Net(), (4, 6)).notes)


def test_in_place_ops_on_the_input_still_work() -> None:
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.relu_())

    report = probe(InPlace(), (8, 4))
    assert [r.name for r in report.layers] == ["relu()", "fc"]


class PartlyUnused(nn.Module):
    """An auxiliary branch the loss never sees, and a layer with an integer output."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 3)
        self.unused = nn.Linear(4, 3)
        self.bucket = Bucketize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.unused(x)
        self.bucket(x)
        return self.used(x)


class Bucketize(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.edges = nn.Parameter(torch.tensor([-1.0, 0.0, 1.0]), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.bucketize(x, self.edges)


def test_uncomputed_values_say_why_and_the_summary_counts_them() -> None:
    report = probe(PartlyUnused(), (8, 4))
    by_name = {r.name: r for r in report.layers}
    assert by_name["used"].reasons == {}
    unused = by_name["unused"]
    assert unused.output_grad_norm is None and "the loss does not depend on it" in unused.reasons["output_grad_norm"]
    assert unused.grad is not None and unused.grad.norm is None and "grad" in unused.reasons
    bucket = by_name["bucket"]
    assert bucket.output.mean is None and bucket.reasons["output"] == "the output is int64, not floating point"
    assert f"2 of {len(report.layers)} rows have values that could not be computed" in " ".join(report.notes)


# ---- one reduction per tensor ------------------------------------------------------------------


class SharedTensors(nn.Module):
    """fc's output is bn's input; ``scale_in_place`` doubles it in place in between. The block
    returns its norm's output, so a block row (when the model is a ModuleList stack) shares it."""

    def __init__(self, scale_in_place: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 3)
        self.scale_in_place = scale_in_place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.fc(x)
        if self.scale_in_place:
            z.mul_(2)
        return self.out(self.bn(z))


@pytest.mark.parametrize("scale_in_place", [False, True])
def test_a_tensor_reaching_two_rows_gives_each_its_own_values(scale_in_place: bool) -> None:
    """The probe reduces a tensor once when it reaches several rows; a tensor modified in place
    in between must be reduced again. Checked against values recomputed independently."""
    torch.manual_seed(0)
    model = SharedTensors(scale_in_place)
    report = probe(model, (32, 6))
    by_name = {r.name: r for r in report.layers}
    fc_row, bn_input = by_name["fc"].output, by_name["bn"].input
    assert bn_input is not None
    factor = 2.0 if scale_in_place else 1.0
    # fc's own row is measured before the in-place scaling; bn sees the scaled tensor.
    assert bn_input.mean == pytest.approx(factor * fc_row.mean, rel=1e-5, abs=1e-7)
    assert bn_input.var == pytest.approx(factor**2 * fc_row.var, rel=1e-5)
    assert bn_input.max == pytest.approx(factor * fc_row.max, rel=1e-6)


@pytest.mark.parametrize("layout", ["aligned", "offset", "strided", "float64", "bfloat16"])
def test_sum_of_squares_matches_a_float64_reference_on_every_path(layout: str) -> None:
    from gradcheck_cli.probe.recorder import sum_of_squares

    generator = torch.Generator().manual_seed(3)
    base = torch.randn(300_001, generator=generator) * 3 + 0.5
    if layout == "aligned":
        values = base
    elif layout == "offset":  # a view 4 bytes past an aligned allocation: the vector_norm path
        values = torch.cat([base.new_zeros(1), base])[1:]
    elif layout == "strided":
        values = torch.stack([base, base]).t()[:, 0]
    elif layout == "float64":
        values = base.double()
    else:
        values = base.bfloat16()
    reference = float((values.double() ** 2).sum())  # independent: float64 squares summed by torch
    got = sum_of_squares(values)
    assert got.dtype == torch.float64 and got.dim() == 0
    # float32 accumulation of 300k terms; vector_norm's is looser than BLAS's (see sum_of_squares)
    assert float(got) == pytest.approx(reference, rel=1e-4 if layout == "bfloat16" else 1e-5)
    assert float(sum_of_squares(values)) == float(got)  # same input, same bits


@pytest.mark.parametrize("enabled", [True, False])
def test_the_garbage_collector_setting_is_restored_even_when_the_probe_fails(enabled: bool) -> None:
    import gc

    class Fails(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("boom")

    was = gc.isenabled()
    try:
        gc.enable() if enabled else gc.disable()
        probe(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (2, 4))
        assert gc.isenabled() is enabled
        with pytest.raises(Exception, match="boom"):
            probe(Fails(), (2, 4))
        assert gc.isenabled() is enabled
    finally:
        gc.enable() if was else gc.disable()
