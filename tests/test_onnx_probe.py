"""The ONNX probe on whole models, against independent answers.

The main reference is the PyTorch probe: the same module probed as PyTorch
(``api.inspect_module``) and as its ONNX export must give the same rows — activation
statistics, dead units, saturation, output-gradient and parameter-gradient norms — within
float32 tolerance. Both exporters (legacy TorchScript-based and dynamo) and several opsets are
covered; BatchNorm is kept in the graph with TrainingMode.PRESERVE.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from gradcheck_cli import api
from gradcheck_cli.errors import LoadError, UsageError
from gradcheck_cli.onnx.ort_stats import output_groups
from gradcheck_cli.options import InputOptions, ProbeOptions
from gradcheck_cli.probe.onnx_probe import run_onnx_probe
from gradcheck_cli.records import LayerStats, Report, RowKind
from tests.conftest import one_line_error, validate_report

os.environ.setdefault("HF_HUB_OFFLINE", "1")
NEWEST_LEGACY_OPSET = 20  # the legacy exporter's newest
NEWEST_DYNAMO_OPSET = 23


def export(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    *,
    dynamo: bool,
    opset: int,
    preserve_bn: bool = False,
    names: list[str] | None = None,
) -> Path:
    """Export with the batch dimension dynamic, as users are told to."""
    names = names or [f"input_{i}" for i in range(len(args))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            batch = torch.export.Dim("batch")
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                opset_version=opset,
                input_names=names,
                dynamic_shapes=tuple({0: batch} for _ in args),
                verbose=False,
            )
            assert program is not None
            program.save(str(path))
        else:
            extra: dict[str, Any] = {}
            if preserve_bn:
                extra = {"training": torch.onnx.TrainingMode.PRESERVE, "do_constant_folding": False}
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=names,
                dynamic_axes={n: {0: "batch"} for n in names},
                **extra,
            )
    return path


def probe_both(module: nn.Module, path: Path, options: ProbeOptions) -> tuple[Report, Report]:
    onnx_report = api.inspect(path, probe=options)
    validate_report(onnx_report.to_dict())
    torch_report = api.inspect_module(module, options)
    return onnx_report, torch_report


def close(a: float | None, b: float | None, rel: float = 1e-4, abs_: float = 1e-6) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=rel, abs_tol=abs_)


def assert_rows_match(onnx_rows: list[LayerStats], torch_rows: list[LayerStats], *, grads: bool = True) -> None:
    assert [r.kind for r in onnx_rows] == [r.kind for r in torch_rows], (
        [r.type for r in onnx_rows],
        [r.type for r in torch_rows],
    )
    assert [r.fn for r in onnx_rows] == [r.fn for r in torch_rows]
    for a, b in zip(onnx_rows, torch_rows, strict=True):
        where = f"{a.name} vs {b.name}"
        assert a.shape == b.shape, where
        assert a.output.count == b.output.count, where
        for key in ("mean", "var", "min", "max"):
            assert close(getattr(a.output, key), getattr(b.output, key)), (where, key)
        assert (a.dead is None) == (b.dead is None), where
        if a.dead is not None and b.dead is not None:
            assert (a.dead.units, a.dead.total) == (b.dead.units, b.dead.total), where
        if b.input is not None:  # norm rows: what they normalise
            assert a.input is not None, where
            for key in ("mean", "var", "min", "max"):
                assert close(getattr(a.input, key), getattr(b.input, key)), (where, "input", key)
        assert (a.saturation is None) == (b.saturation is None), where
        if a.saturation is not None and b.saturation is not None:
            assert abs(a.saturation.fraction - b.saturation.fraction) <= 1 / a.output.count, where
        if grads:
            assert close(a.output_grad_norm, b.output_grad_norm, abs_=1e-9), where
            assert a.params == b.params, where
            assert (a.grad is None) == (b.grad is None), where
            if a.grad is not None and b.grad is not None:
                assert close(a.grad.norm, b.grad.norm, abs_=1e-9), where
                assert close(a.grad.weight_norm, b.grad.weight_norm), where


# ---- models ---------------------------------------------------------------------------------


class ActivationMLP(nn.Module):
    """Every activation the probe classifies, with known trouble: 5 dead ReLU units (bias -1e3)
    and a saturated tanh (weights x4)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 32), nn.Linear(32, 32), nn.Linear(32, 16)
        self.fc4, self.fc5, self.fc6 = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)
        self.acts = nn.ModuleList([nn.ReLU(), nn.Tanh(), nn.SiLU(), nn.GELU(), nn.Hardswish(), nn.ReLU6()])
        self.leaky = nn.LeakyReLU(0.1)
        with torch.no_grad():
            self.fc1.bias[:5] = -1e3
            self.fc2.weight.mul_(20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, act in zip((self.fc1, self.fc2, self.fc3, self.fc4, self.fc5, self.fc6), self.acts, strict=False):
            x = act(layer(x))
        return self.head(self.leaky(x))


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2),
            nn.BatchNorm2d(8),
            nn.LeakyReLU(0.1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 5),
        )
        with torch.no_grad():  # running statistics a trained model would have, not 0/1
            for module in self.body:
                if isinstance(module, nn.BatchNorm2d):
                    module.running_mean.uniform_(-0.5, 0.5)
                    module.running_var.uniform_(0.5, 2.0)
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.uniform_(-0.2, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.body(x)
        return out


MLP_OPTIONS = ProbeOptions(inputs=InputOptions(input_shape=((32, 8),), batch_size=16, batches=2))
CNN_OPTIONS = ProbeOptions(inputs=InputOptions(input_shape=((8, 3, 16, 16),), batch_size=4, batches=2))


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Export each (model, exporter, opset) once per module run."""
    cache: dict[tuple[Any, ...], Path] = {}
    root = tmp_path_factory.mktemp("onnx")

    def get(name: str, module: nn.Module, args: tuple[torch.Tensor, ...], **kwargs: Any) -> Path:
        key = (name, *sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()))
        if key not in cache:
            path = root / ("_".join(str(k) for k in key).replace("/", "-") + ".onnx")
            cache[key] = export(module.eval(), args, path, **kwargs)
        return cache[key]

    return get


# ---- cross-checks against the PyTorch probe -------------------------------------------------


@pytest.mark.parametrize(
    "dynamo, opset", [(False, 13), (False, NEWEST_LEGACY_OPSET), (True, 18), (True, NEWEST_DYNAMO_OPSET)]
)
def test_mlp_rows_match_the_pytorch_probe(exports: Callable[..., Path], dynamo: bool, opset: int) -> None:
    model = ActivationMLP().eval()
    path = exports("mlp", model, (torch.randn(2, 8),), dynamo=dynamo, opset=opset)
    onnx_report, torch_report = probe_both(model, path, MLP_OPTIONS)
    lowering = onnx_report.probe.lowering
    assert lowering is not None and lowering.ok, lowering
    assert lowering.max_abs_error is not None and lowering.tolerance is not None
    assert lowering.max_abs_error <= lowering.tolerance
    assert_rows_match(list(onnx_report.layers), list(torch_report.layers))
    relu = onnx_report.layers[1]
    assert relu.dead is not None and relu.dead.units >= 5  # the 5 killed units, not just agreement
    tanh = onnx_report.layers[3]
    assert tanh.saturation is not None and tanh.saturation.fraction > 0.3
    assert [r.fn for r in onnx_report.layers if r.kind is RowKind.ACTIVATION] == [
        "relu",
        "tanh",
        "silu",
        "gelu",
        "hardswish",
        "relu6",
        "leaky_relu",
    ]
    assert close(onnx_report.probe.loss_value, torch_report.probe.loss_value)
    assert onnx_report.probe.method == "onnxruntime" and onnx_report.model.format == "onnx"
    assert onnx_report.model.parameters == torch_report.model.parameters


@pytest.mark.parametrize("opset", [13, NEWEST_LEGACY_OPSET])
def test_cnn_with_batchnorm_preserved_matches_the_pytorch_probe(exports: Callable[..., Path], opset: int) -> None:
    model = SmallCNN().eval()
    path = exports("cnn", model, (torch.randn(2, 3, 16, 16),), dynamo=False, opset=opset, preserve_bn=True)
    assert any(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)
    onnx_report, torch_report = probe_both(model, path, CNN_OPTIONS)
    assert onnx_report.probe.lowering is not None and onnx_report.probe.lowering.ok
    assert [r.type for r in onnx_report.layers][:3] == ["Conv", "BatchNormalization", "Relu"]
    assert_rows_match(list(onnx_report.layers), list(torch_report.layers))


def test_folded_batchnorm_export_matches_on_activation_rows(exports: Callable[..., Path]) -> None:
    """The dynamo exporter folds BN into the conv: the activations (and their gradients) are
    still those of the source model."""
    model = SmallCNN().eval()
    path = exports("cnn", model, (torch.randn(2, 3, 16, 16),), dynamo=True, opset=18)
    onnx_report, torch_report = probe_both(model, path, CNN_OPTIONS)
    assert onnx_report.probe.lowering is not None and onnx_report.probe.lowering.ok
    pick = [r for r in onnx_report.layers if r.kind is RowKind.ACTIVATION]
    ref = [r for r in torch_report.layers if r.kind is RowKind.ACTIVATION]
    assert_rows_match(pick, ref, grads=False)
    for a, b in zip(pick, ref, strict=False):
        assert close(a.output_grad_norm, b.output_grad_norm, abs_=1e-9)


def resnet18() -> nn.Module:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model: nn.Module = torchvision.models.resnet18(num_classes=10)
    return model.eval()


RESNET_OPTIONS = ProbeOptions(inputs=InputOptions(input_shape=((2, 3, 32, 32),)))


def test_torchvision_resnet18_with_batchnorm_matches_the_pytorch_probe(exports: Callable[..., Path]) -> None:
    model = resnet18()
    path = exports("resnet18", model, (torch.randn(1, 3, 32, 32),), dynamo=False, opset=17, preserve_bn=True)
    onnx_report, torch_report = probe_both(model, path, RESNET_OPTIONS)
    assert onnx_report.probe.lowering is not None and onnx_report.probe.lowering.ok
    assert len(onnx_report.layers) == len(torch_report.layers) == 58
    assert_rows_match(list(onnx_report.layers), list(torch_report.layers))


@pytest.mark.slow
def test_torchvision_resnet18_dynamo_export(exports: Callable[..., Path]) -> None:
    model = resnet18()
    path = exports("resnet18", model, (torch.randn(1, 3, 32, 32),), dynamo=True, opset=18)
    onnx_report, torch_report = probe_both(model, path, RESNET_OPTIONS)
    assert onnx_report.probe.lowering is not None and onnx_report.probe.lowering.ok
    pick = [r for r in onnx_report.layers if r.kind is RowKind.ACTIVATION]
    ref = [r for r in torch_report.layers if r.kind is RowKind.ACTIVATION]
    assert_rows_match(pick, ref, grads=False)


TORCHVISION_ZOO = [
    "mobilenet_v3_small",
    "efficientnet_b0",
    "convnext_tiny",
    "shufflenet_v2_x0_5",
    "googlenet",
    "regnet_y_400mf",
    "densenet121",
    "squeezenet1_0",
]


@pytest.mark.slow
@pytest.mark.parametrize("name", TORCHVISION_ZOO)
def test_torchvision_classifiers_match_on_activation_rows(exports: Callable[..., Path], name: str) -> None:
    """HardSwish/SiLU/GELU blocks, channel shuffles, squeeze-excitation, layer scale, concat
    branches: every activation row and its output gradient agree with the PyTorch probe."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    extra = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    model = getattr(torchvision.models, name)(weights=None, **extra).eval()
    path = exports(name, model, (torch.randn(1, 3, 64, 64),), dynamo=False, opset=17)
    options = ProbeOptions(inputs=InputOptions(input_shape=((2, 3, 64, 64),)))
    onnx_report, torch_report = probe_both(model, path, options)
    assert onnx_report.probe.lowering is not None and onnx_report.probe.lowering.ok, onnx_report.probe.lowering
    pick = [r for r in onnx_report.layers if r.kind is RowKind.ACTIVATION]
    ref = [r for r in torch_report.layers if r.kind is RowKind.ACTIVATION]
    assert_rows_match(pick, ref, grads=False)
    for a, b in zip(pick, ref, strict=True):
        assert close(a.output_grad_norm, b.output_grad_norm, abs_=1e-9), a.name


class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.rnn = cell(6, 10, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(20, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.rnn(x)[0][:, -1])
        return out


@pytest.mark.parametrize(
    "cell, dynamo",
    [
        (nn.LSTM, False),
        (nn.GRU, False),
        (nn.RNN, False),
        (nn.LSTM, True),
        pytest.param(nn.GRU, True, marks=pytest.mark.slow),
        pytest.param(nn.RNN, True, marks=pytest.mark.slow),
    ],
)
def test_recurrent_gradients_match_the_pytorch_probe(
    exports: Callable[..., Path], cell: type[nn.Module], dynamo: bool
) -> None:
    model = Recurrent(cell).eval()
    path = exports(cell.__name__, model, (torch.randn(2, 7, 6),), dynamo=dynamo, opset=14 if not dynamo else 18)
    options = ProbeOptions(inputs=InputOptions(input_shape=((4, 7, 6),)))
    onnx_report, torch_report = probe_both(model, path, options)
    assert onnx_report.probe.lowering is not None and onnx_report.probe.lowering.ok
    onnx_rnn = [r for r in onnx_report.layers if r.type == cell.__name__]
    torch_rnn = [r for r in torch_report.layers if r.type == cell.__name__]
    assert len(torch_rnn) == 1
    if onnx_rnn:  # one ONNX node per layer; PyTorch has one row for the stack: compare the total
        assert len(onnx_rnn) == 2
        total = math.sqrt(sum((r.grad.norm or 0.0) ** 2 for r in onnx_rnn if r.grad is not None))
        assert torch_rnn[0].grad is not None and close(total, torch_rnn[0].grad.norm)
        assert sum(r.params for r in onnx_rnn) == torch_rnn[0].params
    else:  # the dynamo exporter unrolls nn.RNN into MatMul/Add/Tanh steps
        assert cell is nn.RNN and dynamo
    assert close(total_grad_norm(onnx_report), total_grad_norm(torch_report))
    assert onnx_report.model.parameters == torch_report.model.parameters
    assert_rows_match([onnx_report.layers[-1]], [torch_report.layers[-1]])


# ---- transformers, built offline from configs with random weights -------------------------------


class Logits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, first: torch.Tensor, second: torch.Tensor | None = None) -> torch.Tensor:
        args = (first,) if second is None else (first, second)  # named arguments: torch.export wants them
        out: torch.Tensor = self.model(*args, return_dict=False)[0]
        return out


def randomised(model: nn.Module) -> nn.Module:
    """Distinct random values everywhere (zero biases would be merged by the legacy exporter into
    one shared initializer, which the per-layer comparison cannot follow)."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.eval()


def tiny_vit() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        num_labels=3,
    )
    return randomised(Logits(transformers.ViTForImageClassification(config)))


def tiny_bert() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        num_labels=3,
    )
    return randomised(Logits(transformers.BertForSequenceClassification(config)))


def tiny_gpt2() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    # Untied output projection: the dynamo exporter folds lm_head's W^T into an initializer of its
    # own, which breaks the tie in the graph (see docs/onnx.md), so a tied model's total gradient
    # norm legitimately differs.
    config = transformers.GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64, use_cache=False, tie_word_embeddings=False
    )
    return randomised(Logits(transformers.GPT2LMHeadModel(config)))


def total_grad_norm(report: Report) -> float:
    return math.sqrt(sum((r.grad.norm or 0.0) ** 2 for r in report.layers if r.grad is not None))


def test_vit_rows_and_gradients_match_the_pytorch_probe(exports: Callable[..., Path]) -> None:
    model = tiny_vit()
    path = exports("vit", model, (torch.randn(2, 3, 32, 32),), dynamo=False, opset=17)
    options = ProbeOptions(inputs=InputOptions(input_shape=((4, 3, 32, 32),)))
    onnx_report, torch_report = probe_both(model, path, options)
    assert onnx_report.probe.lowering is not None and onnx_report.probe.lowering.ok
    assert "decomposed activations recognised: gelu x2" in onnx_report.notes
    assert close(total_grad_norm(onnx_report), total_grad_norm(torch_report))
    assert close(onnx_report.probe.loss_value, torch_report.probe.loss_value)
    pick = [r for r in onnx_report.layers if r.kind in (RowKind.ACTIVATION, RowKind.NORM) and r.fn != "attention"]
    ref = [r for r in torch_report.layers if r.kind in (RowKind.ACTIVATION, RowKind.NORM) and r.fn != "attention"]
    assert_rows_match(pick, ref, grads=False)
    for a, b in zip(pick, ref, strict=True):  # what each LayerNorm normalises
        if b.input is not None:
            assert a.input is not None and close(a.input.var, b.input.var) and close(a.input.mean, b.input.mean)
    # Attention: the ONNX row is the softmax (the probabilities), the PyTorch row the fused
    # attention call; the attention statistics themselves must agree.
    onnx_attention = [r.attention for r in onnx_report.layers if r.fn == "attention"]
    torch_attention = [r.attention for r in torch_report.layers if r.fn == "attention"]
    assert len(onnx_attention) == len(torch_attention) == 2
    for a, b in zip(onnx_attention, torch_attention, strict=True):
        assert a is not None and b is not None and a.heads == b.heads
        assert all(close(x, y) for x, y in zip(a.entropy, b.entropy, strict=True))


def test_bert_token_inputs_get_the_vocabulary_range_and_gradients(exports: Callable[..., Path]) -> None:
    model = tiny_bert()
    ids, mask = torch.randint(0, 100, (2, 16)), torch.ones(2, 16, dtype=torch.long)
    path = exports("bert", model, (ids, mask), dynamo=False, opset=17, names=["input_ids", "attention_mask"])
    report = api.inspect(path, probe=ProbeOptions(inputs=InputOptions(batch_size=4)))
    validate_report(report.to_dict())
    specs = {s.name: s for s in report.probe.inputs}
    assert (specs["input_ids"].low, specs["input_ids"].high, specs["input_ids"].shape) == (0, 100, (4, 16))
    assert (specs["attention_mask"].low, specs["attention_mask"].high) == (1, 2)
    assert report.probe.lowering is not None and report.probe.lowering.ok
    params = [r for r in report.layers if r.kind is RowKind.PARAM]
    assert params and all(r.grad is not None and r.grad.norm for r in params)
    # The same probe batch through PyTorch (same draws: --input-range applies to every input).
    options = ProbeOptions(inputs=InputOptions(input_shape=((4, 16), (4, 16)), input_dtype="int64", input_range=(0, 2)))
    onnx_report, torch_report = probe_both(model, path, options)
    assert close(onnx_report.probe.loss_value, torch_report.probe.loss_value)
    assert close(total_grad_norm(onnx_report), total_grad_norm(torch_report))


@pytest.mark.slow
def test_gpt2_dynamo_export_with_tanh_gelu(exports: Callable[..., Path]) -> None:
    model = tiny_gpt2()  # the legacy exporter cannot export transformers' GPT-2 (aten::diff)
    path = exports("gpt2", model, (torch.randint(0, 100, (2, 16)),), dynamo=True, opset=18, names=["input_ids"])
    options = ProbeOptions(
        inputs=InputOptions(input_shape=((4, 16),), input_dtype="int64", input_range=(0, 100)), loss="sum"
    )  # type: ignore[arg-type]
    onnx_report, torch_report = probe_both(model, path, options)
    assert onnx_report.probe.lowering is not None and onnx_report.probe.lowering.ok
    assert "decomposed activations recognised: gelu x2" in onnx_report.notes
    assert not [r for r in onnx_report.layers if r.fn == "tanh"]  # gelu_new's tanh is not a row
    assert close(onnx_report.probe.loss_value, torch_report.probe.loss_value)
    assert close(total_grad_norm(onnx_report), total_grad_norm(torch_report))


# ---- graph-level behaviour -----------------------------------------------------------------


def tiny_graph(
    *nodes: onnx.NodeProto, inits: list[onnx.TensorProto], opset: int = 13, input_shape: list[Any] | None = None
) -> onnx.ModelProto:
    graph = helper.make_graph(
        list(nodes),
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape or ["N", 4])],
        [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def weights(name: str, *shape: int, seed: int = 0) -> onnx.TensorProto:
    values = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return onnx.numpy_helper.from_array(values, name)


@pytest.fixture
def unsupported_model(tmp_path: Path) -> Path:
    model = tiny_graph(
        helper.make_node("Gemm", ["x", "w1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["a"], name="act"),
        helper.make_node("Hardmax", ["a"], ["m"], name="hard", axis=-1),  # onnxruntime runs it; we do not
        helper.make_node("Mul", ["a", "m"], ["y0"], name="gate"),
        helper.make_node("Gemm", ["y0", "w2"], ["y"], name="fc2", transB=1),
        inits=[weights("w1", 4, 4), weights("w2", 3, 4, seed=1)],
    )
    model.opset_import[0].version = 13
    path = tmp_path / "unsupported.onnx"
    onnx.save(model, str(path))
    return path


def test_unsupported_op_gives_forward_statistics_and_null_gradients(
    unsupported_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gradcheck_cli.onnx import ops

    monkeypatch.setitem(ops._REGISTRY, "Hardmax", [])  # as if the registry had no Hardmax
    report = api.inspect(unsupported_model, probe=ProbeOptions(inputs=InputOptions(batch_size=4)))
    validate_report(report.to_dict())
    lowering = report.probe.lowering
    assert lowering is not None and not lowering.ok and lowering.unsupported_ops == ("Hardmax",)
    assert any("Hardmax" in note for note in report.notes)
    assert [r.name for r in report.layers] == ["fc1", "act", "fc2"]
    for row in report.layers:
        assert row.output.count > 0 and row.output.mean is not None  # forward statistics given
        assert row.output_grad_norm is None
        if row.grad is not None:
            assert row.grad.norm is None and row.grad.ratio is None and row.grad.weight_norm > 0


def test_unsupported_op_through_the_cli_is_a_report_not_an_error(
    cli: Any, unsupported_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gradcheck_cli.onnx import ops

    monkeypatch.setitem(ops._REGISTRY, "Hardmax", [])
    code, out, _ = cli("inspect", str(unsupported_model), "--format", "json")
    assert code == 0
    data = json.loads(out)
    validate_report(data)
    assert data["probe"]["lowering"]["unsupported_ops"] == ["Hardmax"]
    assert all(row["output_grad_norm"] is None for row in data["layers"])


def test_a_lowering_that_disagrees_with_onnxruntime_nulls_gradients_and_names_the_op(
    unsupported_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gradcheck_cli.onnx import ops

    relu = ops.lookup("Relu", 13)
    assert relu is not None
    broken = ops.OpEntry("Relu", 1, lambda call: [torch.relu(call.required(0)) * 1.5], True)
    monkeypatch.setitem(ops._REGISTRY, "Relu", [broken])
    report = api.inspect(unsupported_model, probe=ProbeOptions(inputs=InputOptions(batch_size=4)))
    lowering = report.probe.lowering
    assert lowering is not None and not lowering.ok and lowering.reason is not None
    assert "differs from onnxruntime" in lowering.reason and "'act' (Relu)" in lowering.reason
    assert lowering.max_abs_error is not None and lowering.tolerance is not None
    assert lowering.max_abs_error > lowering.tolerance
    assert all(r.output_grad_norm is None for r in report.layers)


def test_external_data_outside_the_model_directory_is_refused(cli: Any, tmp_path: Path) -> None:
    model = tiny_graph(helper.make_node("Gemm", ["x", "w1"], ["y"], transB=1), inits=[weights("w1", 4, 4)])
    inside = tmp_path / "models"
    inside.mkdir()
    onnx.save(model, str(inside / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    # Point the tensor at a file one directory up, as a crafted model would.
    crafted = onnx.load(str(inside / "m.onnx"), load_external_data=False)
    for entry in crafted.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../secret.bin"
    (tmp_path / "secret.bin").write_bytes((inside / "m.data").read_bytes())
    onnx.save(crafted, str(inside / "crafted.onnx"))
    with pytest.raises(LoadError, match="outside the model's directory"):
        api.inspect(inside / "crafted.onnx")
    code, _, err = cli("inspect", str(inside / "crafted.onnx"))
    assert code == 2
    one_line_error(err)
    assert "outside the model's directory" in err
    # The same model with its data next to it loads fine.
    report = api.inspect(inside / "m.onnx", probe=ProbeOptions(inputs=InputOptions(batch_size=2)))
    assert report.probe.lowering is not None and report.probe.lowering.ok


def test_grouped_statistics_equal_single_pass_statistics(exports: Callable[..., Path]) -> None:
    model = SmallCNN().eval()
    path = exports("cnn", model, (torch.randn(2, 3, 16, 16),), dynamo=False, opset=13, preserve_bn=True)
    one = run_onnx_probe(path, CNN_OPTIONS, group_budget=0, in_graph=False)  # 0: every value in one group
    many = run_onnx_probe(path, CNN_OPTIONS, group_budget=1, in_graph=False)  # 1 byte: one value per group
    assert any("groups of outputs" in note for note in many.notes)
    # onnxruntime fuses differently when fewer values are outputs (Conv+BN), so the same
    # statistics agree to float32 rounding, not bit for bit.
    for a, b in zip(one.layers, many.layers, strict=True):
        assert a.output.count == b.output.count
        for key in ("mean", "var", "min", "max"):
            assert close(getattr(a.output, key), getattr(b.output, key), rel=1e-5), (a.name, key)
    assert [r.dead for r in one.layers] == [r.dead for r in many.layers]
    assert [r.output_grad_norm for r in one.layers] == [r.output_grad_norm for r in many.layers]


def test_output_groups_respect_the_budget() -> None:
    sizes = {"a": 40, "b": 40, "c": 100, "d": 10}
    assert output_groups(["a", "b", "c", "d"], sizes, 100) == [["a", "b"], ["c"], ["d"]]
    assert output_groups(["a", "b", "c", "d"], sizes, None) == [["a", "b", "c", "d"]]
    assert output_groups(["a", "x"], sizes, 50) == [["a"], ["x"]]  # unknown size: the largest known


def test_symbolic_dimensions_and_input_shape_errors(cli: Any, tmp_path: Path) -> None:
    model = tiny_graph(
        helper.make_node("MatMul", ["x", "w"], ["y"], name="proj"),
        inits=[weights("w", 4, 3)],
        input_shape=["batch", "seq", 4],
    )
    path = tmp_path / "seq.onnx"
    onnx.save(model, str(path))
    report = api.inspect(path, probe=ProbeOptions(inputs=InputOptions(batch_size=3)))
    assert report.probe.inputs[0].shape == (3, 16, 4)
    assert any("symbolic dimension(s) [1] set to 16" in note for note in report.notes)
    report = api.inspect(path, probe=ProbeOptions(inputs=InputOptions(input_shape=((2, 5, 4),))))
    assert report.layers[0].shape == (2, 5, 3)
    with pytest.raises(UsageError, match="does not fit graph input 'x'"):
        api.inspect(path, probe=ProbeOptions(inputs=InputOptions(input_shape=((2, 5, 7),))))
    code, _, err = cli("inspect", str(path), "--input-shape", "2,5,7")
    assert code == 2
    one_line_error(err)


def test_nonfinite_initializers_are_refused_unless_allowed(tmp_path: Path) -> None:
    bad = weights("w", 4, 4)
    values = onnx.numpy_helper.to_array(bad).copy()
    values[0, 0] = np.nan
    model = tiny_graph(
        helper.make_node("Gemm", ["x", "w"], ["y"], transB=1), inits=[onnx.numpy_helper.from_array(values, "w")]
    )
    path = tmp_path / "nan.onnx"
    onnx.save(model, str(path))
    with pytest.raises(LoadError, match="NaN/Inf"):
        api.inspect(path)
    report = api.inspect(
        path, load=api.LoadOptions(allow_nonfinite=True), probe=ProbeOptions(inputs=InputOptions(batch_size=2))
    )
    assert report.layers[0].output.nan > 0 and report.layers[0].output.mean is None


def test_check_command_gates_an_onnx_model(cli: Any, exports: Callable[..., Path]) -> None:
    model = ActivationMLP().eval()
    path = exports("mlp", model, (torch.randn(2, 8),), dynamo=False, opset=13)
    code, out, err = cli("check", str(path), "--format", "json", "--batch-size", "16")
    assert code in (0, 1), err
    data = json.loads(out)
    rows: Iterator[dict[str, Any]] = (
        iter(data["models"][0]["report"]["layers"]) if "models" in data else iter(data["layers"])
    )
    assert any(row["fn"] == "relu" for row in rows)


def test_input_file_feeds_the_graph_by_position_or_name(tmp_path: Path) -> None:
    w = weights("w", 3, 4)
    model = tiny_graph(
        helper.make_node("Gemm", ["x", "w"], ["h"], name="fc", transB=1),
        helper.make_node("Relu", ["h"], ["y"], name="act"),
        inits=[w],
    )
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    x = torch.randn(6, 4)
    expected = torch.relu(x @ torch.from_numpy(onnx.numpy_helper.to_array(w)).T)  # independent answer
    torch.save((x,), tmp_path / "positional.pt")
    np.savez(tmp_path / "named.npz", x=x.numpy())
    for name in ("positional.pt", "named.npz"):
        report = api.inspect(path, probe=ProbeOptions(inputs=InputOptions(input=tmp_path / name, batch_size=4)))
        assert [(s.name, s.source) for s in report.probe.inputs] == [("x", "file")]
        assert report.probe.batches == 2  # 6 samples in micro-batches of 4 and 2
        act = report.layers[1]
        assert act.output.count == expected.numel()
        assert close(act.output.mean, float(expected.mean()), rel=1e-5)
        assert close(act.output.max, float(expected.max()), rel=1e-6)
