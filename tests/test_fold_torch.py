"""The PyTorch pass: patterns folded, patterns declined with reasons, outputs unchanged."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn

from gradcheck_cli.rewrite.fold_records import Pattern
from gradcheck_cli.rewrite.torch_fold import (
    METHOD_EXPORT,
    METHOD_FX,
    METHOD_PROGRAM,
    METHOD_STRUCTURE,
    fold_torch_module,
)


def randomise_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics far from (0, 1), so that a wrong fold cannot hide."""
    g = torch.Generator().manual_seed(seed)
    for sub in module.modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.running_mean is not None:
            n = sub.num_features
            sub.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            sub.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
            if sub.affine:
                sub.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                sub.bias.data.copy_(torch.randn(n, generator=g) * 0.3)
    return module.eval()


def outputs(module: nn.Module, *args: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        result = module(*args)
    assert isinstance(result, torch.Tensor)
    return result


def assert_same_function(original: nn.Module, folded: nn.Module, *args: torch.Tensor) -> None:
    expected, got = outputs(original, *args), outputs(folded, *args)
    scale = float(expected.abs().max())
    assert float((expected - got).abs().max()) <= 1.2e-4 * max(scale, 1e-6)


def batchnorm_nodes(module: nn.Module) -> int:
    """BatchNorms left in a folded module, counted independently of gradcheck's own counter."""
    if isinstance(module, fx.GraphModule):
        count = 0
        for node in module.graph.nodes:
            target = module.get_submodule(node.target) if node.op == "call_module" else None
            if isinstance(target, nn.modules.batchnorm._BatchNorm):
                count += 1
            if node.op == "call_function" and "batch_norm" in str(node.target):
                count += 1
        return count
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def state_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# Property test over random layer configurations

BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


@settings(max_examples=25, deadline=None)
@given(
    st.fixed_dictionaries(
        {
            "dims": st.integers(1, 3),
            "groups": st.sampled_from([1, 2]),
            "per_group": st.integers(1, 3),
            "kernel": st.integers(1, 3),
            "stride": st.integers(1, 2),
            "dilation": st.integers(1, 2),
            "padding": st.integers(0, 1),
            "bias": st.booleans(),
            "affine": st.booleans(),
            "transpose": st.booleans(),
            "keep_structure": st.booleans(),
            "seed": st.integers(0, 10_000),
        }
    )
)
def test_random_conv_bn_configurations_fold_exactly(cfg: dict[str, Any]) -> None:
    torch.manual_seed(cfg["seed"])
    dims, groups = cfg["dims"], cfg["groups"]
    channels = cfg["per_group"] * groups
    layer_cls = CONV_T[dims] if cfg["transpose"] else CONV[dims]
    layer = layer_cls(
        channels,
        channels * 2,
        cfg["kernel"],
        stride=cfg["stride"],
        dilation=cfg["dilation"],
        padding=cfg["padding"] if not cfg["transpose"] else 0,
        groups=groups,
        bias=cfg["bias"],
    )
    model = randomise_bn(nn.Sequential(layer, BN[dims](channels * 2, affine=cfg["affine"]), nn.ReLU()), cfg["seed"])
    x = torch.randn(2, channels, *([6] * dims))
    result = fold_torch_module(model, example_args=(x,), keep_structure=cfg["keep_structure"])
    assert_same_function(model, result.module, x)
    (entry,) = result.entries
    shift_needs_a_home = cfg["keep_structure"] and not cfg["bias"] and not cfg["affine"]
    assert entry.folded is not shift_needs_a_home
    if entry.folded:
        assert entry.pattern is (Pattern.CONV_TRANSPOSE_BN if cfg["transpose"] else Pattern.CONV_BN)
    if not cfg["keep_structure"]:
        assert batchnorm_nodes(result.module) == 0
    else:
        assert set(result.module.state_dict()) == set(model.state_dict())


# ---------------------------------------------------------------------------------------------
# Patterns


class ConvBnFunctional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.register_buffer("mean", torch.randn(4))
        self.register_buffer("var", torch.rand(4) + 0.5)
        self.gamma = nn.Parameter(torch.rand(4) + 0.5)
        self.beta = nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(self.conv(x), self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-3)


def test_functional_batch_norm_is_folded() -> None:
    model = ConvBnFunctional().eval()
    x = torch.randn(2, 3, 8, 8)
    result = fold_torch_module(model, example_args=(x,))
    assert result.method == METHOD_FX
    assert [e.folded for e in result.entries] == [True]
    assert batchnorm_nodes(result.module) == 0
    assert_same_function(model, result.module, x)


class Residual(nn.Module):
    """conv1's output feeds bn1 and the residual add: two consumers, so bn1 must stay."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        return self.bn2(self.conv2(torch.relu(self.bn1(y)))) + y


def test_producer_with_two_consumers_is_not_folded() -> None:
    model = randomise_bn(Residual())
    x = torch.randn(2, 4, 8, 8)
    result = fold_torch_module(model, example_args=(x,))
    entries = {e.batchnorm: e for e in result.entries}
    assert not entries["bn1"].folded and "other node" in (entries["bn1"].reason or "")
    assert entries["bn2"].folded and entries["bn2"].layer == "conv2"
    assert batchnorm_nodes(result.module) == 1
    assert_same_function(model, result.module, x)


def test_bn_before_conv_without_padding_is_folded_and_with_padding_declined() -> None:
    unpadded = randomise_bn(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 5, 3, groups=1)))
    padded = randomise_bn(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 5, 3, padding=1)))
    reflect = randomise_bn(
        nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 6, 3, padding=1, groups=3, padding_mode="reflect"))
    )
    x = torch.randn(2, 3, 9, 9)
    for model, folded in ((unpadded, True), (padded, False), (reflect, True)):
        result = fold_torch_module(model, example_args=(x,))
        (entry,) = result.entries
        assert entry.folded is folded, entry
        if folded:
            assert entry.pattern is Pattern.BN_CONV
        else:
            assert "zeros" in (entry.reason or "")
        assert_same_function(model, result.module, x)


def test_linear_patterns_depend_on_rank() -> None:
    x2 = torch.randn(6, 8)
    after = randomise_bn(nn.Sequential(nn.Linear(8, 5), nn.BatchNorm1d(5)))
    before = randomise_bn(nn.Sequential(nn.BatchNorm1d(8), nn.Linear(8, 5, bias=False)))
    for model, pattern in ((after, Pattern.LINEAR_BN), (before, Pattern.BN_LINEAR)):
        result = fold_torch_module(model, example_args=(x2,))
        (entry,) = result.entries
        assert entry.folded and entry.pattern is pattern
        assert_same_function(model, result.module, x2)
    # (N, C, L): BatchNorm1d normalises C, the Linear's features are L: not foldable.
    x3 = torch.randn(6, 5, 5)
    rank3 = randomise_bn(nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(5)))
    (entry,) = fold_torch_module(rank3, example_args=(x3,)).entries
    assert not entry.folded and "rank-3" in (entry.reason or "")


def test_batchnorm_without_running_statistics_is_skipped() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    (entry,) = fold_torch_module(model, example_args=(torch.randn(2, 3, 8, 8),)).entries
    assert not entry.folded and "running statistics" in (entry.reason or "")


def test_affine_standalone_rewrites_unfoldable_batchnorm() -> None:
    model = randomise_bn(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3), nn.ReLU()))
    x = torch.randn(2, 3, 5, 5)
    plain = fold_torch_module(model, example_args=(x,))
    assert not plain.entries[0].folded
    affine = fold_torch_module(model, example_args=(x,), affine_standalone=True)
    assert affine.entries[0].folded and affine.entries[0].pattern is Pattern.AFFINE
    assert batchnorm_nodes(affine.module) == 0
    assert_same_function(model, affine.module, x)


def test_folding_twice_changes_nothing_and_input_is_untouched() -> None:
    model = randomise_bn(
        nn.Sequential(
            nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        )
    )
    before = state_of(model)
    x = torch.randn(2, 3, 8, 8)
    once = fold_torch_module(model, example_args=(x,))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    twice = fold_torch_module(once.module, example_args=(x,))
    assert twice.entries == []
    assert torch.equal(outputs(once.module, x), outputs(twice.module, x))
    assert {k: v for k, v in once.module.state_dict().items()}.keys() == twice.module.state_dict().keys()


class DataDependent(nn.Module):
    """Python control flow on tensor values: neither torch.fx nor torch.export can trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.side = nn.Conv2d(3, 4, 3)
        self.side_bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if float(x.mean()) > 100:  # never true; still untraceable
            y = y * 2
        s = self.side(x)
        return self.bn(y) + self.side_bn(s) + s  # `s` has two readers: side_bn must stay


def test_untraceable_model_falls_back_to_module_structure() -> None:
    model = randomise_bn(DataDependent())
    x = torch.randn(2, 3, 8, 8)
    result = fold_torch_module(model, example_args=(x,))
    assert result.method == METHOD_STRUCTURE
    entries = {e.batchnorm: e for e in result.entries}
    assert entries["bn"].folded and entries["bn"].layer == "conv"
    assert not entries["side_bn"].folded and "other operation" in (entries["side_bn"].reason or "")
    assert_same_function(model, result.module, x)


class FxHostile(nn.Module):
    """torch.fx cannot trace len() of a tensor-derived list; torch.export can."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(x.shape[1] - 2):
            x = x + 0
        return self.bn(self.conv(x))


def test_torch_export_is_used_when_fx_fails() -> None:
    model = randomise_bn(FxHostile())
    x = torch.randn(2, 3, 8, 8)
    result = fold_torch_module(model, example_args=(x,))
    assert result.method == METHOD_EXPORT
    assert result.entries[0].folded
    assert_same_function(model, result.module, x)
    # The exported graph keeps its batch dynamic: the folded model runs at another batch size
    # (transformers' ResNet and MobileNetV2 take this path).
    other = torch.randn(5, 3, 8, 8)
    assert_same_function(model, result.module, other)


class BatchFixer(FxHostile):
    """Code that fixes the batch size: torch.export cannot keep it dynamic."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).reshape(2, -1)


def test_a_model_that_fixes_its_batch_is_exported_at_that_batch_with_a_note() -> None:
    model = randomise_bn(BatchFixer())
    x = torch.randn(2, 3, 8, 8)
    result = fold_torch_module(model, example_args=(x,))
    assert result.method == METHOD_EXPORT and result.entries[0].folded
    assert any("fixed the batch at 2" in note for note in result.notes)
    assert_same_function(model, result.module, x)


def test_exported_program_graph_is_folded() -> None:
    model = randomise_bn(
        nn.Sequential(
            nn.Conv2d(3, 4, 3),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.ConvTranspose2d(4, 4, 2, stride=2, groups=2),
            nn.BatchNorm2d(4),
        )
    )
    x = torch.randn(2, 3, 8, 8)
    program_module = torch.export.export(model, (x,)).module()
    result = fold_torch_module(program_module, example_args=(x,))
    assert result.method == METHOD_PROGRAM
    assert all(e.folded for e in result.entries) and len(result.entries) == 2
    assert batchnorm_nodes(result.module) == 0
    assert_same_function(model, result.module, x)


def test_torchscript_module_is_folded_on_structure() -> None:
    model = randomise_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()))
    scripted = torch.jit.script(copy.deepcopy(model))
    x = torch.randn(2, 3, 8, 8)
    result = fold_torch_module(scripted, example_args=(x,))
    assert result.method == METHOD_STRUCTURE
    assert result.entries[0].folded
    assert_same_function(model, result.module, x)


class UpDecoder(nn.Module):
    """A segmentation-style decoder: ConvTranspose (grouped too) followed by BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.up1 = nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1, groups=4, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.up2 = nn.ConvTranspose2d(8, 4, 3, stride=1, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.up3 = nn.ConvTranspose3d(1, 2, 3)
        self.bn3 = nn.BatchNorm3d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.up1(self.encoder(x))))
        y = self.bn2(self.up2(y))
        z = self.bn3(self.up3(y[:, :1].unsqueeze(1)))
        return y.sum() + z.mean(dim=(1, 2))


def test_conv_transpose_decoder_with_random_statistics() -> None:
    model = randomise_bn(UpDecoder(), seed=3)
    x = torch.randn(2, 3, 16, 16)
    result = fold_torch_module(model, example_args=(x,))
    assert [e.folded for e in result.entries] == [True] * 4
    assert {e.pattern for e in result.entries} == {Pattern.CONV_BN, Pattern.CONV_TRANSPOSE_BN}
    assert batchnorm_nodes(result.module) == 0
    assert_same_function(model, result.module, x)


# ---------------------------------------------------------------------------------------------
# torchvision


def foldable_after(module: nn.Module) -> set[str]:
    """BatchNorms whose input is a conv/linear call with no other reader (independent of the pass)."""
    traced = fx.symbolic_trace(module)
    found = set()
    for node in traced.graph.nodes:
        if node.op == "call_module" and isinstance(traced.get_submodule(node.target), nn.modules.batchnorm._BatchNorm):
            producer = node.args[0]
            if (
                producer.op == "call_module"
                and len(producer.users) == 1
                and isinstance(traced.get_submodule(producer.target), (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))
            ):
                found.add(node.target)
    return found


def check_torchvision(name: str, size: int) -> None:
    torchvision = pytest.importorskip("torchvision")
    model = randomise_bn(torchvision.models.get_model(name, weights=None), seed=7)
    x = torch.randn(2, 3, size, size)
    result = fold_torch_module(model, example_args=(x,))
    folded = {e.batchnorm for e in result.entries if e.folded}
    assert foldable_after(model) <= folded
    skipped = [e for e in result.entries if not e.folded]
    assert all(e.reason for e in skipped)
    assert batchnorm_nodes(result.module) == len(skipped)
    assert_same_function(model, result.module, x)


def test_torchvision_mobilenet_v3_small() -> None:
    check_torchvision("mobilenet_v3_small", 64)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "densenet121", "resnet50", "mobilenet_v3_large"])
def test_torchvision_architectures(name: str) -> None:
    check_torchvision(name, 64)


def test_tied_weights_and_shared_layers_are_not_folded() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 3, 1)
            self.b = nn.Conv2d(3, 3, 1)
            self.b.weight = self.a.weight  # tied: folding into one would change the other
            self.bn = nn.BatchNorm2d(3)
            self.shared = nn.Conv2d(3, 3, 1)
            self.bn2 = nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.a(x)) + self.b(x) + self.bn2(self.shared(x)) + self.shared(x * 2)

    model = randomise_bn(Tied())
    x = torch.randn(2, 3, 4, 4)
    result = fold_torch_module(model, example_args=(x,))
    entries = {e.batchnorm: e for e in result.entries}
    assert not entries["bn"].folded and "tied" in (entries["bn"].reason or "")
    assert not entries["bn2"].folded and "called 2 times" in (entries["bn2"].reason or "")
    assert_same_function(model, result.module, x)


def test_structure_folding_twice_reports_already_folded_and_changes_nothing() -> None:
    model = randomise_bn(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, bias=False), nn.BatchNorm2d(4))
    )
    x = torch.randn(2, 3, 8, 8)
    once = fold_torch_module(model, example_args=(x,), keep_structure=True)
    assert all(e.folded for e in once.entries)
    twice = fold_torch_module(once.module, example_args=(x,), keep_structure=True)
    assert [e.folded for e in twice.entries] == [False, False]
    assert all("already folded" in (e.reason or "") for e in twice.entries)
    first, second = once.module.state_dict(), twice.module.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_graph_fold_shares_only_the_unchanged_parameters_with_the_input() -> None:
    # The graph pass copies the module but not its parameters: folded layers get new tensors,
    # the rest are the input's own objects, and the input keeps every value.
    model = randomise_bn(
        nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5))
    )
    before = state_of(model)
    x = torch.randn(2, 3, 8, 8)
    result = fold_torch_module(model, example_args=(x,))
    folded = dict(result.module.named_parameters())
    assert folded["4.weight"] is model[4].weight and folded["4.bias"] is model[4].bias
    assert folded["0.weight"] is not model[0].weight
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert_same_function(model, result.module, x)
    # Structure output writes in place, so it works on copies of everything.
    kept = fold_torch_module(model, example_args=(x,), keep_structure=True)
    assert all(p is not q for p, q in zip(kept.module.parameters(), model.parameters(), strict=True))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
