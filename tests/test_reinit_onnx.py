"""The ONNX reinit pass on graphs built by hand, so every op, attribute and layout is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from gradcheck_cli.options import (  # noqa: E402
    RecurrentInit,
    ReinitOptions,
    Scheme,
)
from gradcheck_cli.rewrite.onnx_reinit import reinit_onnx_model  # noqa: E402
from gradcheck_cli.rewrite.reinit_records import ActivationSource, LayerInit  # noqa: E402

RNG = np.random.default_rng(0)


def init(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name=name)


def mlp_graph() -> onnx.ModelProto:
    """x(4,64) -> Gemm+Relu -> Gemm+BN-free Tanh -> MatMul+Add+Selu -> MatMul+LeakyRelu(0.2)
    -> Gemm (transB=0) + Sigmoid -> Gemm head (tied to the first Gemm's weight? no: own weight)."""
    nodes = [
        helper.make_node("Gemm", ["x", "w_relu", "b_relu"], ["g1"], name="relu_fc", transB=1),
        helper.make_node("Relu", ["g1"], ["a1"]),
        helper.make_node("Gemm", ["a1", "w_tanh", "b_tanh"], ["g2"], name="tanh_fc", transB=1),
        helper.make_node("Tanh", ["g2"], ["a2"]),
        helper.make_node("MatMul", ["a2", "w_selu"], ["m3"], name="selu_fc"),
        helper.make_node("Add", ["m3", "b_selu"], ["g3"]),
        helper.make_node("Selu", ["g3"], ["a3"]),
        helper.make_node("MatMul", ["a3", "w_leaky"], ["g4"], name="leaky_fc"),
        helper.make_node("Reshape", ["g4", "shape"], ["r4"]),  # shape ops in between are walked through
        helper.make_node("LeakyRelu", ["r4"], ["a4"], alpha=0.2),
        helper.make_node("Gemm", ["a4", "w_sig", "b_sig"], ["g5"], name="sigmoid_fc", transB=0),
        helper.make_node("Sigmoid", ["g5"], ["a5"]),
        helper.make_node("Gemm", ["a5", "w_head"], ["y"], name="head", transB=1, alpha=2.0),
    ]
    initializers = [
        init("w_relu", 64, 64),
        init("b_relu", 64),
        init("w_tanh", 64, 64),
        init("b_tanh", 64),
        init("w_selu", 64, 64),
        init("b_selu", 64),
        init("w_leaky", 64, 64),
        numpy_helper.from_array(np.array([4, 64], dtype=np.int64), name="shape"),
        init("w_sig", 64, 64),
        init("b_sig", 64),
        init("w_head", 8, 64),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])],
        initializers,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def by_name(layers: list[LayerInit]) -> dict[str, LayerInit]:
    return {layer.name: layer for layer in layers}


def arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return list(session.run(None, feeds))


def test_auto_reads_the_following_activation_from_the_graph() -> None:
    model = mlp_graph()
    original = model.SerializeToString()
    result = reinit_onnx_model(model, options=ReinitOptions())
    assert model.SerializeToString() == original  # the input proto is not modified
    found = by_name(result.layers)
    expected = {
        "relu_fc": ("he", "relu", math.sqrt(2 / 64)),
        "tanh_fc": ("glorot", "tanh", 5 / 3 / 8),
        "selu_fc": ("lecun", "selu", 1 / 8),
        "leaky_fc": ("he", "leaky_relu", math.sqrt(2 / 1.04 / 64)),
        "sigmoid_fc": ("glorot", "sigmoid", 1 / 8),
        "head": ("glorot", None, math.sqrt(2 / 72)),
    }
    for name, (scheme, activation, std) in expected.items():
        layer = found[name]
        assert (layer.scheme, layer.activation) == (scheme, activation), name
        assert layer.activation_source is ActivationSource.GRAPH
        assert layer.tensors[0].std == pytest.approx(std, rel=1e-6), name
    new = arrays(result.model)
    for bias in ("b_relu", "b_tanh", "b_selu", "b_sig"):  # MatMul's bias is the following Add
        assert not new[bias].any(), bias
    # Gemm alpha=2 computes 2·B: the stored weight is halved so the effective std is the formula's.
    assert float(np.sqrt(np.mean((2.0 * new["w_head"]) ** 2))) == pytest.approx(math.sqrt(2 / 72), rel=0.1)
    outputs = run(result.model, {"x": RNG.standard_normal((4, 64)).astype(np.float32)})
    assert outputs[0].shape == (4, 8) and np.isfinite(outputs[0]).all()


def test_only_selected_initializers_change_bit_for_bit() -> None:
    model = mlp_graph()
    before = {t.name: t.SerializeToString() for t in model.graph.initializer}
    result = reinit_onnx_model(model, options=ReinitOptions(layers=("tanh_*",)))
    assert [layer.name for layer in result.layers] == ["tanh_fc"]
    for tensor in result.model.graph.initializer:
        if tensor.name in ("w_tanh", "b_tanh"):
            assert tensor.SerializeToString() != before[tensor.name]
        else:
            assert tensor.SerializeToString() == before[tensor.name], tensor.name


def test_shared_initializer_stays_one_tensor() -> None:
    nodes = [
        helper.make_node("Gemm", ["x", "w"], ["h"], name="first", transB=1),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("Gemm", ["a", "w"], ["y"], name="second", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tied",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16])],
        [init("w", 16, 16)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = reinit_onnx_model(model, options=ReinitOptions())
    assert [t.name for t in result.model.graph.initializer] == ["w"]
    first, second = result.layers
    assert first.tensors[0].shared_with == ("second",)
    assert "shares its weight" in second.reason and not second.tensors
    assert not np.array_equal(arrays(result.model)["w"], arrays(model)["w"])


def test_conv_and_conv_transpose_with_groups() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "wc", "bc"], ["c"], name="conv", group=2, pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "s", "o", "m", "v"], ["n"], name="bn"),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("ConvTranspose", ["r", "wt"], ["y"], name="deconv", group=4),
    ]
    # Conv 4 -> 8 channels, groups 2: W (8, 2, 3, 3). ConvTranspose 8 -> 12, groups 4: W (8, 3, 3, 3).
    inits = [init("wc", 8, 2, 3, 3), init("bc", 8), init("wt", 8, 3, 3, 3)]
    inits += [numpy_helper.from_array(np.ones(8, np.float32), name=n) for n in ("s", "v")]
    inits += [numpy_helper.from_array(np.zeros(8, np.float32), name=n) for n in ("o", "m")]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = reinit_onnx_model(model, options=ReinitOptions())
    conv, deconv = by_name(result.layers)["conv"], by_name(result.layers)["deconv"]
    assert (conv.scheme, conv.activation) == ("he", "relu")  # through the BatchNormalization
    assert (conv.tensors[0].fan_in, conv.tensors[0].fan_out) == (2 * 9, 8 * 9)
    assert (deconv.tensors[0].fan_in, deconv.tensors[0].fan_out) == (2 * 9, 12 * 9)
    assert deconv.scheme == "glorot"
    run(result.model, {"x": RNG.standard_normal((1, 4, 6, 6)).astype(np.float32)})


@pytest.mark.parametrize(("op", "gates"), [("RNN", 1), ("GRU", 3), ("LSTM", 4)])
@pytest.mark.parametrize("recurrent", [RecurrentInit.ORTHOGONAL, RecurrentInit.IDENTITY])
def test_recurrent_ops(op: str, gates: int, recurrent: RecurrentInit) -> None:
    hidden, features, dirs = 8, 5, 2
    node = helper.make_node(op, ["x", "W", "R", "B"], ["y"], name="rnn", hidden_size=hidden, direction="bidirectional")
    inits = [
        init("W", dirs, gates * hidden, features),
        init("R", dirs, gates * hidden, hidden),
        init("B", dirs, 2 * gates * hidden),
    ]
    graph = helper.make_graph(
        [node],
        "rnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 2, features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = reinit_onnx_model(model, options=ReinitOptions(recurrent=recurrent, forget_bias=True))
    new = arrays(result.model)
    for d in range(dirs):
        for g in range(gates):
            block = new["R"][d, g * hidden : (g + 1) * hidden].astype(np.float64)
            if recurrent is RecurrentInit.IDENTITY:
                assert np.array_equal(block, np.eye(hidden))
            else:
                assert np.allclose(block @ block.T, np.eye(hidden), atol=1e-5)
    expected_bias = np.zeros((dirs, 2 * gates * hidden), np.float32)
    if op == "LSTM":
        expected_bias[:, 2 * hidden : 3 * hidden] = 1.0  # ONNX gate order i, o, f, c: Wb forget block
    assert np.array_equal(new["B"], expected_bias)
    assert result.layers[0].activation_source is ActivationSource.INTERNAL
    run(result.model, {"x": RNG.standard_normal((3, 2, features)).astype(np.float32)})


def test_matmul_of_two_activations_is_not_a_layer_and_computed_weights_are_declined() -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "x_t"], ["s"], name="scores"),
        helper.make_node("Transpose", ["x"], ["x_t"]),
        helper.make_node("Conv", ["img", "computed_w"], ["c"], name="dyn_conv"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("x", "img", "computed_w")],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, None)],
    )
    result = reinit_onnx_model(helper.make_model(graph), options=ReinitOptions())
    assert result.layers == []
    assert [c.target for c in result.changes if not c.applied] == ["dyn_conv"]


def test_orthogonal_scheme_on_onnx() -> None:
    result = reinit_onnx_model(mlp_graph(), options=ReinitOptions(scheme=Scheme.ORTHOGONAL))
    w = arrays(result.model)["w_relu"].astype(np.float64) / math.sqrt(2)  # ReLU gain
    assert np.allclose(w @ w.T, np.eye(64), atol=1e-5)
