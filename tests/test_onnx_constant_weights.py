"""Weights wherever an exporter keeps them: Paddle2ONNX-style graphs, plumbing, module paths.

The Paddle-style graph is written by hand with ``onnx.helper`` from a PyTorch module's weights,
the way Paddle2ONNX writes its files: every weight in a ``Constant`` node, a ``-1`` batch dim, conv
biases as ``Reshape`` + ``Add`` after a bias-less Conv, fully connected weights stored (in, out)
and fed to MatMul (one through a Transpose), ReLU6 as Clip with Constant bounds. The independent
answer is the PyTorch probe of the module the weights came from: the two must give the same
rows, statistics and gradient norms.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from gradcheck_cli import api
from gradcheck_cli.errors import LoadError
from gradcheck_cli.onnx.params import parameter_map
from gradcheck_cli.onnx.plan import legacy_module_path, plan_rows
from gradcheck_cli.options import InputOptions, ProbeOptions
from gradcheck_cli.records import RowKind
from tests.conftest import one_line_error, validate_report
from tests.test_onnx_probe import assert_rows_match, close, export

OPTIONS = ProbeOptions(inputs=InputOptions(input_shape=((8, 3, 16, 16),), batch_size=4, batches=2))


class PaddleLikeNet(nn.Module):
    """Conv+BN+ReLU, Conv(bias)+BN+ReLU6, pool, Linear+ReLU, Linear: what the ONNX graph reimplements."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2)
        self.bn2 = nn.BatchNorm2d(8)
        self.act2 = nn.ReLU6()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc1 = nn.Linear(8, 16)
        self.act3 = nn.ReLU()
        self.fc2 = nn.Linear(16, 4)
        with torch.no_grad():  # running statistics a trained model would have, not 0/1
            for bn in (self.bn1, self.bn2):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.2, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        out: torch.Tensor = self.fc2(self.act3(self.fc1(self.flat(self.pool(x)))))
        return out


def const(name: str, value: Any) -> onnx.NodeProto:
    array = np.asarray(value)
    return helper.make_node("Constant", [], [name], name=f"{name}.const", value=numpy_helper.from_array(array, name))


def f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().astype(np.float32)


def paddle_style(model: PaddleLikeNet, *, opset: int = 11) -> onnx.ModelProto:
    nodes = [
        const("conv1_weights", f32(model.conv1.weight)),
        helper.make_node(
            "Conv",
            ["x", "conv1_weights"],
            ["conv2d_0.tmp_0"],
            name="Conv@0",
            pads=[1, 1, 1, 1],
            kernel_shape=[3, 3],
            strides=[1, 1],
            group=1,
            dilations=[1, 1],
        ),
    ]
    for i, bn, x in ((1, model.bn1, "conv2d_0.tmp_0"), (2, model.bn2, "conv2d_1.tmp_1")):
        parts = {"scale": bn.weight, "offset": bn.bias, "mean": bn.running_mean, "variance": bn.running_var}
        nodes += [const(f"bn{i}_{k}", f32(v)) for k, v in parts.items()]
        nodes.append(
            helper.make_node(
                "BatchNormalization",
                [x] + [f"bn{i}_{k}" for k in parts],
                [f"batch_norm_{i}.tmp_2"],
                name=f"BatchNormalization@{i}",
                epsilon=1e-5,
                momentum=0.9,
            )
        )
        if i == 1:
            nodes += [
                helper.make_node("Relu", ["batch_norm_1.tmp_2"], ["relu_0.tmp_0"], name="Relu@0"),
                const("conv2_weights", f32(model.conv2.weight)),
                helper.make_node(
                    "Conv",
                    ["relu_0.tmp_0", "conv2_weights"],
                    ["conv2d_1.tmp_0"],
                    name="Conv@1",
                    pads=[1, 1, 1, 1],
                    kernel_shape=[3, 3],
                    strides=[2, 2],
                    group=2,
                    dilations=[1, 1],
                ),
                const("conv2_offset", f32(model.conv2.bias)),
                const("Constant@shape", np.array([1, -1, 1, 1], dtype=np.int64)),
                helper.make_node("Reshape", ["conv2_offset", "Constant@shape"], ["conv2_offset.r"], name="Reshape@0"),
                helper.make_node("Add", ["conv2d_1.tmp_0", "conv2_offset.r"], ["conv2d_1.tmp_1"], name="Add@0"),
            ]
    nodes += [
        const("Constant@min", np.array(0.0, dtype=np.float32)),
        const("Constant@max", np.array(6.0, dtype=np.float32)),
        helper.make_node(
            "Clip", ["batch_norm_2.tmp_2", "Constant@min", "Constant@max"], ["relu6_0.tmp_0"], name="Clip@0"
        ),
        helper.make_node("GlobalAveragePool", ["relu6_0.tmp_0"], ["pool_0.tmp_0"], name="GlobalAveragePool@0"),
        helper.make_node("Flatten", ["pool_0.tmp_0"], ["flatten_0.tmp_0"], name="Flatten@0", axis=1),
        const("fc_0.w_0", f32(model.fc1.weight.T)),  # Paddle stores fc weights (in, out)
        helper.make_node("MatMul", ["flatten_0.tmp_0", "fc_0.w_0"], ["fc_0.tmp_0"], name="MatMul@0"),
        const("fc_0.b_0", f32(model.fc1.bias)),
        helper.make_node("Add", ["fc_0.tmp_0", "fc_0.b_0"], ["fc_0.tmp_1"], name="Add@1"),
        helper.make_node("Relu", ["fc_0.tmp_1"], ["relu_1.tmp_0"], name="Relu@1"),
        const("fc_1.w_0", f32(model.fc2.weight)),  # (out, in), transposed in the graph
        helper.make_node("Transpose", ["fc_1.w_0"], ["fc_1.w_0.t"], name="Transpose@0", perm=[1, 0]),
        helper.make_node("MatMul", ["relu_1.tmp_0", "fc_1.w_0.t"], ["fc_1.tmp_0"], name="MatMul@1"),
        const("fc_1.b_0", f32(model.fc2.bias)),
        helper.make_node("Add", ["fc_1.tmp_0", "fc_1.b_0"], ["save_infer_model/scale_0.tmp_0"], name="Add@2"),
    ]
    graph = helper.make_graph(
        nodes,
        "paddle",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, "h", "w"])],
        [helper.make_tensor_value_info("save_infer_model/scale_0.tmp_0", TensorProto.FLOAT, [-1, 4])],
    )
    model_proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="PaddlePaddle")
    model_proto.ir_version = 7
    onnx.checker.check_model(model_proto)
    return model_proto


@pytest.fixture(scope="module")
def paddle(tmp_path_factory: pytest.TempPathFactory) -> tuple[PaddleLikeNet, Path]:
    model = PaddleLikeNet().eval()
    path = tmp_path_factory.mktemp("paddle") / "paddle_style.onnx"
    onnx.save(paddle_style(model), str(path))
    return model, path


def test_the_hand_written_graph_computes_the_module(paddle: tuple[PaddleLikeNet, Path]) -> None:
    """The fixture itself: onnxruntime on the graph equals the module (else the cross-checks below
    would compare two different models)."""
    model, path = paddle
    x = torch.randn(2, 3, 16, 16)
    got = ort.InferenceSession(str(path)).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_constant_held_weights_are_parameters_with_the_pytorch_probe_gradients(
    paddle: tuple[PaddleLikeNet, Path],
) -> None:
    model, path = paddle
    onnx_report = api.inspect(path, probe=OPTIONS)
    validate_report(onnx_report.to_dict())
    torch_report = api.inspect_module(model, OPTIONS)
    lowering = onnx_report.probe.lowering
    assert lowering is not None and lowering.ok, lowering
    assert [r.type for r in onnx_report.layers] == [
        "Conv",
        "BatchNormalization",
        "Relu",
        "Conv",
        "BatchNormalization",
        "ReLU6",
        "MatMul",
        "Relu",
        "MatMul",
    ]
    assert_rows_match(list(onnx_report.layers), list(torch_report.layers))
    conv_rows = [r for r in onnx_report.layers if r.type == "Conv"]
    assert all(r.grad is not None and r.grad.norm is not None and r.grad.norm > 0 for r in conv_rows)
    assert conv_rows[1].params == 8 * 4 * 9 + 8  # the Reshape+Add bias belongs to its Conv
    assert onnx_report.model.parameters == torch_report.model.parameters == sum(p.numel() for p in model.parameters())
    assert not any("does not depend on any parameter" in note for note in onnx_report.notes)


def test_gradient_norms_equal_torch_autograd_on_the_same_loss(paddle: tuple[PaddleLikeNet, Path]) -> None:
    """A second, probe-free answer: the summed squared gradient norm of every parameter, from
    torch autograd on the module with the probe's own loss and batches."""
    from gradcheck_cli.probe.loss import LossFunction
    from gradcheck_cli.probe.onnx_probe import onnx_probe_inputs

    model, path = paddle
    report = api.inspect(path, probe=OPTIONS)
    inputs, _ = onnx_probe_inputs(onnx.load(str(path)), OPTIONS, torch.device("cpu"))
    loss_fn = LossFunction(kind=OPTIONS.loss, total=inputs.total, seed=OPTIONS.inputs.seed, target_file=OPTIONS.target)
    model.zero_grad()
    for batch in inputs.batches:
        loss_fn(model(batch.kwargs["x"])).backward()
    expected = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in model.parameters() if p.grad is not None))
    got = math.sqrt(sum(r.grad.norm**2 for r in report.layers if r.grad is not None and r.grad.norm is not None))
    assert got == pytest.approx(expected, rel=1e-4)
    model.zero_grad()


def test_fold_bn_folds_the_constant_held_batchnorms_and_verifies(
    paddle: tuple[PaddleLikeNet, Path], tmp_path: Path
) -> None:
    from gradcheck_cli.rewrite.fold import fold_batchnorm

    _, path = paddle
    before = path.read_bytes()
    out = tmp_path / "folded.onnx"
    report = fold_batchnorm(path, out=out, probe=ProbeOptions(inputs=InputOptions(input_shape=((2, 3, 16, 16),))))
    assert path.read_bytes() == before
    assert (report.folded, report.skipped) == (2, 0), report.entries
    assert report.verification.passed and report.written is not None
    assert any("bias Add" in (e.note or "") for e in report.entries)  # Conv + Add(b) + BN
    folded = onnx.load(str(out))
    assert not [n for n in folded.graph.node if n.op_type == "BatchNormalization"]
    assert not [n for n in folded.graph.node if n.name == "Add@0"]  # the bias went into the Conv
    x = np.random.default_rng(0).standard_normal((3, 3, 20, 12)).astype(np.float32)  # another shape
    want = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out)).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_fold_bn_folds_at_least_what_onnxslim_folds(paddle: tuple[PaddleLikeNet, Path]) -> None:
    onnxslim = pytest.importorskip("onnxslim", reason="onnxslim is not installed (pip install onnxslim)")
    from gradcheck_cli.rewrite.onnx_fold import count_batchnorms, fold_onnx_model

    _, path = paddle
    model = onnx.load(str(path))
    slim_left = count_batchnorms(onnxslim.slim(onnx.load(str(path))))
    ours = fold_onnx_model(model)
    assert count_batchnorms(model) - ours.batchnorms_after >= count_batchnorms(model) - slim_left
    assert ours.batchnorms_after == 0


def test_reinit_sees_constant_and_transposed_weights(paddle: tuple[PaddleLikeNet, Path]) -> None:
    from gradcheck_cli.options import ReinitOptions
    from gradcheck_cli.rewrite.onnx_reinit import reinit_onnx_model

    _, path = paddle
    model = onnx.load(str(path))
    result = reinit_onnx_model(model, options=ReinitOptions())
    assert [layer.name for layer in result.layers] == ["Conv@0", "Conv@1", "MatMul@0", "MatMul@1"]
    assert not [c for c in result.changes if not c.applied]
    stored = {
        n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in result.model.graph.node if n.op_type == "Constant"
    }
    original = {
        n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node if n.op_type == "Constant"
    }
    for record in result.layers:
        for tensor in record.tensors:
            assert stored[tensor.parameter].shape == original[tensor.parameter].shape
            assert not np.array_equal(stored[tensor.parameter], original[tensor.parameter]) or tensor.std == 0
    # fc_1.w_0 is stored (out, in) and transposed in the graph: its fans are the MatMul's (in=16).
    fc2 = next(r for r in result.layers if r.name == "MatMul@1")
    weight = next(t for t in fc2.tensors if t.parameter == "fc_1.w_0")
    assert (weight.fan_in, weight.fan_out) == (16, 4)
    conv2 = next(r for r in result.layers if r.name == "Conv@1")
    assert [t.parameter for t in conv2.tensors] == ["conv2_weights", "conv2_offset"]  # the Reshape+Add bias
    assert not stored["conv2_offset"].any()
    for name in ("bn1_mean", "bn1_variance", "Constant@shape", "Constant@max"):  # untouched
        assert np.array_equal(stored[name], original[name])
    ort.InferenceSession(result.model.SerializeToString()).run(None, {"x": np.zeros((1, 3, 8, 8), dtype=np.float32)})


def test_the_gate_scan_reads_constant_held_weights(tmp_path: Path) -> None:
    from gradcheck_cli.gate.scan import scan_onnx

    model = PaddleLikeNet().eval()
    with torch.no_grad():
        model.fc1.weight[0, 0] = float("nan")
        model.bn2.running_var[3] = -1.0
    path = tmp_path / "bad.onnx"
    onnx.save(paddle_style(model), str(path))
    scan = scan_onnx(path)
    assert [(t.name, t.nan) for t in scan.nonfinite] == [("fc_0.w_0", 1)]
    assert [(b.module, b.nonpositive_var) for b in scan.batchnorms] == [
        ("BatchNormalization@1", 0),
        ("BatchNormalization@2", 1),
    ]
    with pytest.raises(LoadError, match=r"Constant 'fc_0\.w_0' holds 1 NaN"):
        api.inspect(path, probe=OPTIONS)


def test_a_negative_input_dim_is_dynamic_as_in_onnxruntime(
    paddle: tuple[PaddleLikeNet, Path], tmp_path: Path, cli: Any
) -> None:
    _, path = paddle
    model = onnx.load(str(path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == -1
    report = api.inspect(path, probe=ProbeOptions(inputs=InputOptions(batch_size=2)))
    assert report.probe.inputs[0].shape[0] == 2
    assert ort.InferenceSession(str(path)).get_inputs()[0].shape[0] is None  # onnxruntime agrees
    # Zero is a fixed empty dimension to onnxruntime (it refuses any other size): one line, exit 2.
    dims[0].dim_value = 0
    zero = tmp_path / "zero.onnx"
    onnx.save(model, str(zero))
    assert ort.InferenceSession(str(zero)).get_inputs()[0].shape[0] == 0
    code, _, err = cli("inspect", str(zero))
    assert code == 2 and "size 0" in err and "Traceback" not in err
    one_line_error(err)


# ---- the parameter map on its own -----------------------------------------------------------


def test_parameter_map_follows_plumbing_and_skips_configuration() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 1, 1)).astype(np.float32)
    nodes = [
        const("w_flat", w.reshape(4, 3)),  # stored 2-D, reshaped and cast on its way to the Conv
        const("shape", np.array([4, 3, 1, 1], dtype=np.int64)),
        helper.make_node("Reshape", ["w_flat", "shape"], ["w_r"]),
        helper.make_node("Cast", ["w_r"], ["w_c"], to=TensorProto.FLOAT),
        helper.make_node("Conv", ["x", "w_c"], ["y"]),
        const("gain", np.full((1, 4, 1, 1), 0.5, dtype=np.float32)),  # a learned per-channel scale
        helper.make_node("Mul", ["y", "gain"], ["z"]),
        const("scales", np.array([1, 1, 2, 2], dtype=np.float32)),  # configuration, not a weight
        helper.make_node("Resize", ["z", "", "scales"], ["u"], mode="nearest"),
        const("half", np.array(0.5, dtype=np.float32)),  # a scalar constant
        helper.make_node("Mul", ["u", "half"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
    )
    pmap = parameter_map(graph)
    assert pmap.parameters == ["w_flat", "gain"]
    use = pmap.uses["w_flat"][0]
    assert graph.node[use.owner].op_type == "Conv" and use.owner_slot == 1 and len(use.path) == 2
    np.testing.assert_array_equal(pmap.value("w_c"), w)
    source, path = pmap.trace("w_c")  # type: ignore[misc]
    back = pmap.to_source(w * 2, source, path)
    np.testing.assert_array_equal(back, w.reshape(4, 3) * 2)
    assert pmap.value("y") is None  # computed from the input, not a constant
    plan = plan_rows(graph)
    assert [(r.type, r.params) for r in plan.rows] == [("Conv", ["w_flat"]), ("Mul", ["gain"])]


def test_transpose_plumbing_maps_back_to_the_stored_layout() -> None:
    w = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    nodes = [
        const("w", w),
        helper.make_node("Transpose", ["w"], ["wt"], perm=[2, 0, 1]),
        helper.make_node("Unsqueeze", ["wt"], ["wu"], axes=[0]),
        helper.make_node("Squeeze", ["wu"], ["ws"], axes=[0]),
        helper.make_node("MatMul", ["x", "ws"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 5, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    pmap = parameter_map(graph)
    seen = pmap.value("ws")
    assert seen is not None and seen.shape == (4, 2, 3)
    source, path = pmap.trace("ws")  # type: ignore[misc]
    np.testing.assert_array_equal(pmap.to_source(seen, source, path), w)


# ---- module paths ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "module"),
    [
        ("/layer1/layer1.0/conv1/Conv", "layer1.0.conv1"),
        ("/layer1/layer1.0/downsample/downsample.0/Conv", "layer1.0.downsample.0"),
        ("/features/features.0/features.0.0/Conv", "features.0.0"),
        ("/fc/Gemm", "fc"),
        ("/Flatten", ""),
    ],
)
def test_legacy_names_give_module_paths(name: str, module: str) -> None:
    assert legacy_module_path(name) == module


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
        self.stage = nn.Sequential(nn.Sequential(nn.Conv2d(4, 4, 3), nn.Tanh()))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.stage(self.stem(x)))
        return out


@pytest.mark.parametrize("dynamo", [False, True])
def test_rows_take_the_module_paths_of_the_source_model(tmp_path: Path, dynamo: bool) -> None:
    model = Nested().eval()
    path = export(model, (torch.randn(2, 3, 8, 8),), tmp_path / "nested.onnx", dynamo=dynamo, opset=18)
    options = ProbeOptions(inputs=InputOptions(input_shape=((2, 3, 8, 8),)))
    onnx_rows = api.inspect(path, probe=options).layers
    torch_rows = api.inspect_module(model, options).layers
    assert (
        [r.module for r in onnx_rows]
        == [r.module for r in torch_rows]
        == ["stem.0", "stem.1", "stage.0.0", "stage.0.1", "head.1"]
    )
    assert all(r.kind is not RowKind.OTHER for r in onnx_rows)
    assert close(onnx_rows[0].output.mean, torch_rows[0].output.mean)


def test_a_layer_the_dynamo_exporter_fused_with_its_batchnorm_keeps_its_own_path(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())).eval()
    path = export(model, (torch.randn(2, 3, 8, 8),), tmp_path / "fused.onnx", dynamo=True, opset=18)
    assert not [n for n in onnx.load(str(path)).graph.node if n.op_type == "BatchNormalization"]
    rows = api.inspect(path, probe=ProbeOptions(inputs=InputOptions(input_shape=((2, 3, 8, 8),)))).layers
    assert [(r.type, r.module) for r in rows] == [("Conv", "0.0"), ("Relu", "0.2")]


def test_an_onnxruntime_failure_on_a_filled_free_dimension_names_it(tmp_path: Path, cli: Any) -> None:
    """A graph that runs only at 32x32 (an Add of a fixed-size map): with its free dimensions set
    to gradcheck's default, onnxruntime fails, and the hint says which sizes gradcheck chose."""
    nodes = [
        const("bias_map", np.zeros((1, 3, 32, 32), dtype=np.float32)),
        helper.make_node("Add", ["x", "bias_map"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    path = tmp_path / "fixed_map.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    code, _, err = cli("inspect", str(path))
    assert code == 2 and "onnxruntime failed" in err
    one_line_error(err)
    assert "symbolic dimension(s) [2, 3] set to 16" in err and "--input-shape" in err
    code, _, err = cli("inspect", str(path), "--input-shape", "2,3,32,32")
    assert code == 0, err
