"""Fused norm-act and frozen BatchNorms: the BatchNorm part folds, the activation stays."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from gradcheck_cli.rewrite.torch_fold import METHOD_FX, METHOD_STRUCTURE, fold_torch_module
from tests.test_fold_torch import assert_same_function, batchnorm_nodes, randomise_bn

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")


def randomise_frozen(module: nn.Module, seed: int = 0) -> nn.Module:
    """Frozen BatchNorms keep their statistics in buffers: randomise those, far from (0, 1)."""
    g = torch.Generator().manual_seed(seed)
    for sub in module.modules():
        if type(sub).__name__.startswith("FrozenBatchNorm"):
            n = sub.weight.numel()
            sub.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
            sub.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
            sub.weight.copy_(torch.rand(n, generator=g) + 0.5)
            sub.bias.copy_(torch.randn(n, generator=g) * 0.3)
    return module.eval()


def norm_act_modules(module: nn.Module) -> dict[str, str]:
    """BatchNormAct path -> class name of its activation, read from the unfolded model."""
    from timm.layers import BatchNormAct2d

    return {name: type(sub.act).__name__ for name, sub in module.named_modules() if isinstance(sub, BatchNormAct2d)}


def called_modules(graph_module: fx.GraphModule) -> set[str]:
    return {str(n.target) for n in graph_module.graph.nodes if n.op == "call_module"}


# The counts are those of timm's own definitions: every BatchNorm in these three networks
# follows a bias-free Conv whose output nothing else reads, so every one folds exactly.
@pytest.mark.parametrize(
    ("name", "expected"),
    [("efficientnet_b0", 49), ("mobilenetv3_large_100", 46), ("regnetx_002", 44)],
)
def test_timm_norm_act_networks_fold_every_batchnorm_and_keep_activations(name: str, expected: int) -> None:
    model = randomise_bn(timm.create_model(name, pretrained=False))
    batchnorms = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert batchnorms == expected  # independent count: the model is what the test assumes
    activations = norm_act_modules(model)
    x = torch.randn(2, 3, 64, 64)
    result = fold_torch_module(model, example_args=(x,))
    assert result.method == METHOD_FX
    assert [e.reason for e in result.entries if not e.folded] == []
    assert sum(e.folded for e in result.entries) == expected
    assert result.batchnorms_before == expected and result.batchnorms_after == 0
    folded = result.module
    assert isinstance(folded, fx.GraphModule)
    assert batchnorm_nodes(folded) == 0
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    calls = called_modules(folded)
    for path, act_type in activations.items():
        assert type(folded.get_submodule(f"{path}.act")).__name__ == act_type
        assert f"{path}.act" in calls, f"{path}.act is no longer called"
    assert_same_function(model, folded, x)


def test_norm_act_structure_output_keeps_class_and_activation() -> None:
    model = randomise_bn(timm.create_model("mobilenetv3_large_100", pretrained=False))
    x = torch.randn(2, 3, 64, 64)
    result = fold_torch_module(model, example_args=(x,), keep_structure=True)
    assert sum(e.folded for e in result.entries) == 46
    assert set(result.module.state_dict()) == set(model.state_dict())
    assert norm_act_modules(result.module) == norm_act_modules(model)
    assert_same_function(model, result.module, x)


def test_norm_act_with_a_second_reader_of_the_conv_output_is_declined() -> None:
    from timm.layers import BatchNormAct2d

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.bn = BatchNormAct2d(4, act_layer=nn.SiLU)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn(y) + y

    model = randomise_bn(Block())
    x = torch.randn(2, 3, 8, 8)
    result = fold_torch_module(model, example_args=(x,))
    (entry,) = result.entries
    assert not entry.folded and "also feeds 1 other node" in (entry.reason or "")
    assert_same_function(model, result.module, x)


def test_norm_act_never_folds_into_the_next_layer_across_its_activation() -> None:
    from timm.layers import BatchNormAct2d

    # BN-act first, then a conv without padding: a plain BatchNorm would fold forward (bn-conv);
    # with the ReLU in between it must not.
    model = randomise_bn(nn.Sequential(BatchNormAct2d(3, act_layer=nn.ReLU), nn.Conv2d(3, 4, 1)))
    x = torch.randn(2, 3, 8, 8)
    result = fold_torch_module(model, example_args=(x,))
    (entry,) = result.entries
    assert not entry.folded
    assert_same_function(model, result.module, x)


def test_group_norm_act_is_not_a_batchnorm() -> None:
    from timm.layers import GroupNormAct

    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), GroupNormAct(4, 2)).eval()
    x = torch.randn(2, 3, 8, 8)
    result = fold_torch_module(model, example_args=(x,))
    assert result.entries == [] and result.batchnorms_before == 0
    assert_same_function(model, result.module, x)


@pytest.mark.parametrize("keep_structure", [False, True])
def test_torchvision_frozen_batchnorm_folds(keep_structure: bool) -> None:
    from torchvision.ops.misc import FrozenBatchNorm2d

    model = randomise_frozen(torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d))
    frozen = sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert frozen == 20
    x = torch.randn(2, 3, 64, 64)
    result = fold_torch_module(model, example_args=(x,), keep_structure=keep_structure)
    folded = [e for e in result.entries if e.folded]
    # Each BasicBlock's bn1/bn2 and the stem bn follow a conv read by nothing else; the
    # downsample BatchNorms follow their own 1x1 conv: all 20 fold.
    assert len(folded) == frozen, [e.reason for e in result.entries if not e.folded]
    assert_same_function(model, result.module, x)
    if keep_structure:
        assert set(result.module.state_dict()) == set(model.state_dict())
    else:
        assert not any(isinstance(m, FrozenBatchNorm2d) for m in result.module.modules())


def test_frozen_batchnorm_eps_is_its_own() -> None:
    from torchvision.ops.misc import FrozenBatchNorm2d

    # A large eps makes a fold with the wrong eps visibly wrong.
    model = randomise_frozen(nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4, eps=0.5)))
    x = torch.randn(2, 3, 8, 8)
    result = fold_torch_module(model, example_args=(x,))
    assert [e.folded for e in result.entries] == [True]
    assert_same_function(model, result.module, x)


def test_timm_frozen_norm_act_folds_and_keeps_activation() -> None:
    from timm.layers import FrozenBatchNormAct2d
    from timm.utils.model import freeze_batch_norm_2d

    model = freeze_batch_norm_2d(randomise_bn(timm.create_model("regnetx_002")))
    model = randomise_frozen(model, seed=3)
    frozen = {n: type(m.act).__name__ for n, m in model.named_modules() if isinstance(m, FrozenBatchNormAct2d)}
    assert len(frozen) == 44
    x = torch.randn(2, 3, 64, 64)
    result = fold_torch_module(model, example_args=(x,))
    assert sum(e.folded for e in result.entries) == 44
    calls = called_modules(result.module)
    for path, act_type in frozen.items():
        assert type(result.module.get_submodule(f"{path}.act")).__name__ == act_type
        assert f"{path}.act" in calls
    assert_same_function(model, result.module, x)


def test_shape_reads_do_not_block_a_fold() -> None:
    class Checked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, bias=False)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            torch._assert(y.ndim == 4, "4D")
            return self.bn(y).reshape(y.size(0), -1)

    model = randomise_bn(Checked())
    x = torch.randn(2, 3, 8, 8)
    result = fold_torch_module(model, example_args=(x,))
    assert [e.folded for e in result.entries] == [True]
    assert_same_function(model, result.module, x)


def test_scripted_norm_act_folds_on_structure() -> None:
    from timm.layers import BatchNormAct2d

    model = randomise_bn(nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), BatchNormAct2d(4, act_layer=nn.ReLU)))
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 8, 8)
    result = fold_torch_module(scripted, example_args=(x,))
    assert result.method == METHOD_STRUCTURE
    assert [e.folded for e in result.entries] == [True]
    assert result.batchnorms_after == 0
    assert_same_function(model, result.module, x)


def test_frozen_batchnorm_in_an_untraceable_model_is_named_in_a_note() -> None:
    from torchvision.ops.misc import FrozenBatchNorm2d

    class DataDependent(nn.Module):
        """Python control flow on a tensor value: fx cannot trace it, torch.export can."""

        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = FrozenBatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(self.conv(x))
            return y * 2 if x.shape[0] > 1 else y

    model = randomise_frozen(DataDependent())
    x = torch.randn(2, 3, 8, 8)
    result = fold_torch_module(model, example_args=(x,))
    if result.method == METHOD_FX:
        pytest.skip("torch.fx traced the shape condition; nothing to check here")
    assert any("frozen BatchNorm" in note for note in result.notes)
    assert_same_function(model, result.module, x)


def test_exported_graph_keeps_a_declined_norm_act_and_folds_the_other() -> None:
    from timm.layers import BatchNormAct2d

    class Mixed(nn.Module):
        """fx cannot trace it (a branch on a shape), so the graph comes from torch.export."""

        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.bn1 = BatchNormAct2d(4, act_layer=nn.SiLU)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.bn2 = BatchNormAct2d(4, act_layer=nn.ReLU)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn1(self.conv1(x))
            z = self.conv2(y)
            out = self.bn2(z) + z  # z has a second reader: bn2 must stay
            return out * 2 if x.shape[0] > 1 else out

    model = randomise_bn(Mixed())
    x = torch.randn(2, 3, 8, 8)
    result = fold_torch_module(model, example_args=(x,))
    assert result.method != METHOD_FX
    assert {e.batchnorm.split(".")[0]: e.folded for e in result.entries} == {"bn1": True, "bn2": False}
    assert_same_function(model, result.module, x)
