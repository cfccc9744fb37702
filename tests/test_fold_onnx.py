"""The ONNX pass on graphs built with onnx.helper and graphs exported from torch.

Every folded graph must pass onnx.checker (full check) and compute the same outputs in
onnxruntime with its own graph optimisations disabled.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from gradcheck_cli.errors import LoadError
from gradcheck_cli.model.onnx_load import onnx_model_from_path, onnx_model_to_path
from gradcheck_cli.rewrite.fold_records import Pattern
from gradcheck_cli.rewrite.onnx_fold import count_batchnorms, fold_onnx_model

RNG = np.random.default_rng(0)


def f32(*shape: int, positive: bool = False) -> np.ndarray:
    value = RNG.standard_normal(shape).astype(np.float32)
    return np.abs(value) + 0.3 if positive else value


def bn_initializers(prefix: str, channels: int) -> list[TensorProto]:
    return [
        numpy_helper.from_array(f32(channels, positive=True), f"{prefix}_scale"),
        numpy_helper.from_array(f32(channels), f"{prefix}_bias"),
        numpy_helper.from_array(f32(channels) * 0.5, f"{prefix}_mean"),
        numpy_helper.from_array(f32(channels, positive=True), f"{prefix}_var"),
    ]


def bn_node(prefix: str, x: str, y: str, eps: float = 1e-5) -> onnx.NodeProto:
    return helper.make_node(
        "BatchNormalization",
        [x, f"{prefix}_scale", f"{prefix}_bias", f"{prefix}_mean", f"{prefix}_var"],
        [y],
        name=prefix,
        epsilon=eps,
    )


def make_model(
    nodes: list[onnx.NodeProto],
    initializers: list[TensorProto],
    x_shape: list[int],
    y_shape: list[int] | None = None,
    opset: int = 17,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    model.producer_name = "gradcheck-test"
    helper.set_model_props(model, {"author": "tests"})
    if y_shape is None:  # the full checker wants a declared output shape: take it from a real run
        shape = run(model, np.zeros(x_shape, dtype=np.float32)).shape
        model.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape)))
    return model


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


def check_folded(model: onnx.ModelProto, x: np.ndarray, *, expect_left: int = 0, affine: bool = False) -> Any:
    result = fold_onnx_model(model, affine_standalone=affine)
    onnx.checker.check_model(result.model, full_check=True)
    assert count_batchnorms(result.model) == expect_left
    expected, got = run(model, x), run(result.model, x)
    assert np.abs(expected - got).max() <= 1.2e-4 * max(float(np.abs(expected).max()), 1e-6)
    # Interface and metadata untouched.
    assert [i.name for i in result.model.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in result.model.graph.output] == [o.name for o in model.graph.output]
    assert result.model.opset_import == model.opset_import
    assert result.model.metadata_props == model.metadata_props
    assert result.model.producer_name == model.producer_name
    return result


def test_conv_and_grouped_conv_transpose_then_bn() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1], group=2),
        bn_node("bn1", "c1", "b1"),
        helper.make_node("Relu", ["b1"], ["r1"]),
        helper.make_node("ConvTranspose", ["r1", "w2", "cb2"], ["c2"], name="up", group=3, strides=[2, 2]),
        bn_node("bn2", "c2", "y"),
    ]
    inits = [
        numpy_helper.from_array(f32(6, 2, 3, 3), "w1"),
        numpy_helper.from_array(f32(6, 3, 2, 2), "w2"),
        numpy_helper.from_array(f32(9), "cb2"),
        *bn_initializers("bn1", 6),
        *bn_initializers("bn2", 9),
    ]
    model = make_model(nodes, inits, [2, 4, 7, 7])
    result = check_folded(model, f32(2, 4, 7, 7))
    assert [(e.batchnorm, e.pattern, e.layer) for e in result.entries] == [
        ("bn1", Pattern.CONV_BN, "conv1"),
        ("bn2", Pattern.CONV_TRANSPOSE_BN, "up"),
    ]
    # The producer took over the BatchNorm's output name: the graph output is still 'y'.
    assert result.model.graph.node[-1].output[0] == "y"
    # Initializers the BatchNorms used are gone; nothing unused is left behind.
    used = {name for node in result.model.graph.node for name in node.input}
    assert {t.name for t in result.model.graph.initializer} <= used


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("with_c", [False, True])
def test_gemm_then_bn_any_transpose_alpha_beta(trans_a: int, trans_b: int, with_c: bool) -> None:
    a_shape = [5, 3] if trans_a else [3, 5]  # A' is (3, 5): batch 3, 5 features in
    b = f32(4, 5) if trans_b else f32(5, 4)
    inputs = ["x", "b"] + (["c"] if with_c else [])
    nodes = [
        helper.make_node("Gemm", inputs, ["g"], name="gemm", transA=trans_a, transB=trans_b, alpha=0.7, beta=1.9),
        bn_node("bn", "g", "y"),
    ]
    inits = [numpy_helper.from_array(b, "b"), *bn_initializers("bn", 4)]
    if with_c:
        inits.append(numpy_helper.from_array(f32(1, 4), "c"))
    result = check_folded(make_model(nodes, inits, a_shape), f32(*a_shape))
    assert result.entries[0].pattern is Pattern.LINEAR_BN


@pytest.mark.parametrize("with_add", [False, True])
def test_matmul_with_constant_weight_then_bn(with_add: bool) -> None:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm")]
    inits = [numpy_helper.from_array(f32(6, 4), "w"), *bn_initializers("bn", 4)]
    if with_add:
        nodes.append(helper.make_node("Add", ["m", "bias"], ["a"], name="add"))
        inits.append(numpy_helper.from_array(f32(4), "bias"))
    nodes.append(bn_node("bn", "a" if with_add else "m", "y"))
    result = check_folded(make_model(nodes, inits, [3, 6]), f32(3, 6))
    assert result.entries[0].folded and result.entries[0].pattern is Pattern.MATMUL_BN


def test_matmul_on_rank3_input_is_declined() -> None:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"), bn_node("bn", "m", "y")]
    inits = [numpy_helper.from_array(f32(4, 4), "w"), *bn_initializers("bn", 2)]
    result = check_folded(make_model(nodes, inits, [3, 2, 4]), f32(3, 2, 4), expect_left=1)
    assert "rank 3" in (result.entries[0].reason or "")


def test_bn_before_conv_gemm_matmul() -> None:
    conv = make_model(
        [bn_node("bn", "x", "n"), helper.make_node("Conv", ["n", "w"], ["y"], name="conv", group=2)],
        [numpy_helper.from_array(f32(4, 2, 3, 3), "w"), *bn_initializers("bn", 4)],
        [2, 4, 6, 6],
    )
    (entry,) = check_folded(conv, f32(2, 4, 6, 6)).entries
    assert entry.pattern is Pattern.BN_CONV
    gemm = make_model(
        [
            bn_node("bn", "x", "n"),
            helper.make_node("Gemm", ["n", "w", "c"], ["y"], name="gemm", transB=1, alpha=1.5, beta=0.5),
        ],
        [numpy_helper.from_array(f32(3, 5), "w"), numpy_helper.from_array(f32(3), "c"), *bn_initializers("bn", 5)],
        [4, 5],
    )
    assert check_folded(gemm, f32(4, 5)).entries[0].pattern is Pattern.BN_LINEAR
    matmul = make_model(
        [bn_node("bn", "x", "n"), helper.make_node("MatMul", ["n", "w"], ["y"], name="mm")],
        [numpy_helper.from_array(f32(5, 3), "w"), *bn_initializers("bn", 5)],
        [4, 5],
    )
    assert check_folded(matmul, f32(4, 5)).entries[0].pattern is Pattern.BN_LINEAR


def test_bn_before_padded_conv_is_declined_and_affine_standalone_applies() -> None:
    model = make_model(
        [bn_node("bn", "x", "n"), helper.make_node("Conv", ["n", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])],
        [numpy_helper.from_array(f32(3, 4, 3, 3), "w"), *bn_initializers("bn", 4)],
        [2, 4, 6, 6],
    )
    (entry,) = check_folded(model, f32(2, 4, 6, 6), expect_left=1).entries
    assert not entry.folded and "zeros" in (entry.reason or "")
    (entry,) = check_folded(model, f32(2, 4, 6, 6), expect_left=0, affine=True).entries
    assert entry.folded and entry.pattern is Pattern.AFFINE


def test_producer_with_two_consumers_is_not_folded_and_shared_weights_are_copied() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c1"], name="conv1"),
        bn_node("bn1", "c1", "b1"),
        helper.make_node("Add", ["b1", "c1"], ["s"]),  # c1 has two readers
        helper.make_node("Conv", ["x", "w"], ["c2"], name="conv2"),  # w is shared with conv1
        bn_node("bn2", "c2", "b2"),
        helper.make_node("Add", ["s", "b2"], ["y"]),
    ]
    w = f32(4, 3, 1, 1)
    inits = [numpy_helper.from_array(w, "w"), *bn_initializers("bn1", 4), *bn_initializers("bn2", 4)]
    result = check_folded(make_model(nodes, inits, [2, 3, 5, 5]), f32(2, 3, 5, 5), expect_left=1)
    entries = {e.batchnorm: e for e in result.entries}
    assert not entries["bn1"].folded and "other nodes" in (entries["bn1"].reason or "")
    assert entries["bn2"].folded
    kept = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    assert np.array_equal(kept["w"], w)  # conv1 still reads the original, unchanged weight
    conv1 = next(n for n in result.model.graph.node if n.name == "conv1")
    assert conv1.input[1] == "w"


def test_training_mode_and_runtime_parameters_are_skipped() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node(
            "BatchNormalization", ["c", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["y"], name="bn", training_mode=1
        ),
    ]
    model = make_model(
        nodes, [numpy_helper.from_array(f32(4, 3, 1, 1), "w"), *bn_initializers("bn", 4)], [2, 3, 4, 4], [2, 4, 4, 4]
    )
    (entry,) = fold_onnx_model(model).entries
    assert not entry.folded and "training_mode" in (entry.reason or "")


def test_folding_twice_changes_nothing() -> None:
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("bn", "c", "y")]
    model = make_model(nodes, [numpy_helper.from_array(f32(4, 3, 3, 3), "w"), *bn_initializers("bn", 4)], [1, 3, 6, 6])
    once = fold_onnx_model(model).model
    twice = fold_onnx_model(once)
    assert twice.entries == [] and twice.model.SerializeToString() == once.SerializeToString()


# ---------------------------------------------------------------------------------------------
# Property test: random Conv / ConvTranspose + BN graphs


@settings(max_examples=20, deadline=None)
@given(
    st.fixed_dictionaries(
        {
            "dims": st.integers(1, 3),
            "groups": st.sampled_from([1, 2]),
            "per_group": st.integers(1, 3),
            "kernel": st.integers(1, 3),
            "stride": st.integers(1, 2),
            "dilation": st.integers(1, 2),
            "pad": st.integers(0, 1),
            "bias": st.booleans(),
            "transpose": st.booleans(),
            "seed": st.integers(0, 9999),
        }
    )
)
def test_random_onnx_conv_bn_graphs(cfg: dict[str, Any]) -> None:
    rng = np.random.default_rng(cfg["seed"])
    dims, groups = cfg["dims"], cfg["groups"]
    c_in = cfg["per_group"] * groups
    c_out = 2 * c_in
    kernel = [cfg["kernel"]] * dims
    if cfg["transpose"]:
        weight = rng.standard_normal((c_in, c_out // groups, *kernel)).astype(np.float32)
        op, attrs = "ConvTranspose", {}
    else:
        weight = rng.standard_normal((c_out, c_in // groups, *kernel)).astype(np.float32)
        op, attrs = "Conv", {"pads": [cfg["pad"]] * (2 * dims)}
    inputs = ["x", "w"] + (["b"] if cfg["bias"] else [])
    nodes = [
        helper.make_node(
            op,
            inputs,
            ["c"],
            name="layer",
            group=groups,
            strides=[cfg["stride"]] * dims,
            dilations=[cfg["dilation"]] * dims,
            **attrs,
        ),
        bn_node("bn", "c", "y", eps=1e-3),
    ]
    inits = [numpy_helper.from_array(weight, "w"), *bn_initializers("bn", c_out)]
    if cfg["bias"]:
        inits.append(numpy_helper.from_array(rng.standard_normal(c_out).astype(np.float32), "b"))
    shape = [2, c_in, *([5] * dims)]
    check_folded(make_model(nodes, inits, shape), rng.standard_normal(shape).astype(np.float32))


# ---------------------------------------------------------------------------------------------
# Torch and ONNX paths agree on the same weights


def test_torch_and_onnx_fold_the_same_weights_identically() -> None:
    from torch import fx, nn

    from gradcheck_cli.rewrite.torch_fold import fold_torch_module

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.ConvTranspose2d(4, 6, 3, groups=2, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 25, 5),
        nn.BatchNorm1d(5),
    ).eval()
    for bn in (model[1], model[5]):
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.normal_()
    x = torch.randn(2, 4, 3, 3)
    folded = fold_torch_module(model, example_args=(x,)).module
    assert isinstance(folded, fx.GraphModule)
    torch_tensors = {k: v.detach().numpy() for k, v in folded.state_dict().items()}

    nodes = [
        helper.make_node("ConvTranspose", ["x", "w0"], ["c"], name="up", group=2),
        bn_node("bn1", "c", "b"),
        helper.make_node("Relu", ["b"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "w4", "b4"], ["g"], name="fc", transB=1),
        bn_node("bn5", "g", "y", eps=model[5].eps),
    ]

    def bn_inits(prefix: str, bn: nn.BatchNorm1d | nn.BatchNorm2d) -> list[TensorProto]:
        return [
            numpy_helper.from_array(t.detach().numpy(), f"{prefix}_{name}")
            for name, t in (("scale", bn.weight), ("bias", bn.bias), ("mean", bn.running_mean), ("var", bn.running_var))
        ]

    inits = [
        numpy_helper.from_array(model[0].weight.detach().numpy(), "w0"),
        numpy_helper.from_array(model[4].weight.detach().numpy(), "w4"),
        numpy_helper.from_array(model[4].bias.detach().numpy(), "b4"),
        *bn_inits("bn1", model[1]),
        *bn_inits("bn5", model[5]),
    ]
    onnx_model = fold_onnx_model(make_model(nodes, inits, [2, 4, 3, 3])).model
    onnx_tensors = {t.name: numpy_helper.to_array(t) for t in onnx_model.graph.initializer}
    conv = next(n for n in onnx_model.graph.node if n.name == "up")
    gemm = next(n for n in onnx_model.graph.node if n.name == "fc")
    assert np.array_equal(onnx_tensors[conv.input[1]], torch_tensors["0.weight"])
    assert np.array_equal(onnx_tensors[conv.input[2]], torch_tensors["0.bias"])
    assert np.array_equal(onnx_tensors[gemm.input[1]], torch_tensors["4.weight"])
    assert np.array_equal(onnx_tensors[gemm.input[2]], torch_tensors["4.bias"])


# ---------------------------------------------------------------------------------------------
# Exported graphs, external data


def export_with_bn(model: torch.nn.Module, x: torch.Tensor, path: Path) -> onnx.ModelProto:
    with warnings.catch_warnings():  # the TorchScript-based exporter is deprecated, and says so
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x,),
            str(path),
            dynamo=False,
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
            input_names=["x"],
            output_names=["y"],
        )
    return onnx.load(str(path))


def test_torch_exported_graph_with_bn_preserved(tmp_path: Path) -> None:
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, groups=8),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.ConvTranspose2d(8, 4, 2, stride=2),
        nn.BatchNorm2d(4),
    ).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.3, 2)
    exported = export_with_bn(model, torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
    assert count_batchnorms(exported) == 3
    check_folded(exported, np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32))


def test_external_data_is_kept_next_to_the_output(tmp_path: Path) -> None:
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("bn", "c", "y")]
    model = make_model(
        nodes, [numpy_helper.from_array(f32(64, 3, 3, 3), "w"), *bn_initializers("bn", 64)], [1, 3, 6, 6]
    )
    source = tmp_path / "in" / "model.onnx"
    source.parent.mkdir()
    x = f32(1, 3, 6, 6)
    expected = run(model, x)  # before saving: onnx.save_model converts `model` to external data in place
    onnx.save_model(model, str(source), save_as_external_data=True, location="weights.bin", size_threshold=0)
    loaded = onnx_model_from_path(source)
    out = tmp_path / "out" / "folded.onnx"
    out.parent.mkdir()
    onnx_model_to_path(fold_onnx_model(loaded).model, out, external_data=True)
    assert (tmp_path / "out" / "folded.onnx.data").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["folded.onnx", "folded.onnx.data"]
    reread = onnx_model_from_path(out)
    onnx.checker.check_model(reread, full_check=True)
    assert np.allclose(run(reread, x), expected, rtol=1e-4, atol=1e-5)


def test_external_data_outside_the_model_directory_is_refused(tmp_path: Path) -> None:
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    model = make_model(nodes, [numpy_helper.from_array(f32(4, 3, 1, 1), "w")], [1, 3, 2, 2])
    (tmp_path / "secret.bin").write_bytes(f32(4, 3, 1, 1).tobytes())
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="../secret.bin")
    sub = tmp_path / "models"
    sub.mkdir()
    (sub / "evil.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(LoadError, match="outside the model's directory"):
        onnx_model_from_path(sub / "evil.onnx")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0"])
def test_torchvision_exported_with_bn_preserved(tmp_path: Path, name: str) -> None:
    torchvision = pytest.importorskip("torchvision")
    from torch import nn

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.3)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.3)
    exported = export_with_bn(model, torch.randn(1, 3, 64, 64), tmp_path / "m.onnx")
    batchnorms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert count_batchnorms(exported) == batchnorms
    # Every BatchNorm in these networks follows a Conv whose output has no other reader.
    result = check_folded(exported, np.random.default_rng(2).standard_normal((1, 3, 64, 64)).astype(np.float32))
    assert all(e.folded for e in result.entries) and len(result.entries) == batchnorms


def test_onnx_fold_command_never_imports_torch(tmp_path: Path) -> None:
    # The maths is numpy's on the ONNX path: `import torch` alone costs seconds on a small machine.
    import subprocess
    import sys

    conv = helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1])
    model = make_model(
        [conv, bn_node("bn", "c", "y")],
        [numpy_helper.from_array(f32(4, 3, 3, 3), "w"), *bn_initializers("bn", 4)],
        [1, 3, 6, 6],
        [1, 4, 6, 6],
    )
    source, out = tmp_path / "m.onnx", tmp_path / "folded.onnx"
    onnx.save(model, str(source))
    script = (
        "import sys\nfrom pathlib import Path\nfrom gradcheck_cli.rewrite.fold import fold_batchnorm\n"
        f"report = fold_batchnorm(Path({str(source)!r}), out=Path({str(out)!r}))\n"
        "assert report.verification.passed and report.written, report\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
    assert count_batchnorms(onnx_model_from_path(out)) == 0


def test_shape_inference_runs_only_for_folds_that_need_ranks() -> None:
    from gradcheck_cli.rewrite.onnx_fold import _GraphFolder

    conv = helper.make_node("Conv", ["x", "w"], ["c"], name="conv")
    model = make_model(
        [conv, bn_node("bn", "c", "y")],
        [numpy_helper.from_array(f32(4, 3, 3, 3), "w"), *bn_initializers("bn", 4)],
        [1, 3, 6, 6],
        [1, 4, 4, 4],
    )
    folder = _GraphFolder(model)
    entries = folder.run(affine_standalone=False)
    assert [e.folded for e in entries] == [True]
    assert folder._rank_cache is None  # a Conv fold never asks for ranks
    assert folder.ranks["x"] == 4 and folder._rank_cache is not None  # ...and computed on first ask
