"""The ONNX operator registry, op by op, against two independent references:

- forward: onnxruntime running the same single-node graph (built with onnx.helper) on the same
  random inputs (onnx's reference evaluator where onnxruntime has no kernel);
- backward: finite differences (torch.autograd.gradcheck in float64) for differentiable ops.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from gradcheck_cli.onnx.lower import LoweredGraph, decode_attributes, unsupported_ops
from gradcheck_cli.onnx.ops import OpCall, lookup, supported_ops

RNG = np.random.default_rng(0)


def randn(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def positive(*shape: int) -> np.ndarray:
    return (np.abs(RNG.standard_normal(shape)) + 0.5).astype(np.float32)


def i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


class Case:
    def __init__(
        self,
        op: str,
        inputs: list[np.ndarray | None],
        attrs: dict[str, Any] | None = None,
        *,
        opset: int = 13,
        outputs: int = 1,
        grad: bool = True,
        id: str = "",
        grad_inputs: tuple[int, ...] | None = None,
        atol: float = 1e-5,
        reference: str = "onnxruntime",
    ) -> None:
        self.op, self.inputs, self.attrs, self.opset = op, inputs, attrs or {}, opset
        self.reference = reference  # 'onnx': onnx's reference evaluator, where onnxruntime lacks the op
        self.outputs, self.grad, self.grad_inputs, self.atol = outputs, grad, grad_inputs, atol
        self.id = id or f"{op}-{opset}"


def single_node_model(case: Case) -> onnx.ModelProto:
    names = [f"in{i}" if value is not None else "" for i, value in enumerate(case.inputs)]
    node = helper.make_node(case.op, names, [f"out{i}" for i in range(case.outputs)], **case.attrs)
    graph_inputs = [
        helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
        for n, v in zip(names, case.inputs, strict=False)
        if v is not None
    ]
    graph_outputs = [onnx.ValueInfoProto(name=f"out{i}") for i in range(case.outputs)]
    graph = helper.make_graph([node], "case", graph_inputs, graph_outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", case.opset)])


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray], reference: str = "onnxruntime") -> list[np.ndarray]:
    if reference == "onnx":
        from onnx.reference import ReferenceEvaluator

        return list(ReferenceEvaluator(model).run(None, feeds))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return list(session.run(None, feeds))


def run_lowered(model: onnx.ModelProto, feeds: dict[str, np.ndarray], opset: int) -> list[torch.Tensor]:
    lowered = LoweredGraph(model, opset=opset, trainable=set(), device=torch.device("cpu"))
    outputs = lowered.run({k: torch.from_numpy(v) for k, v in feeds.items()})
    return [outputs[o.name] for o in model.graph.output]


x234 = randn(2, 3, 4)
img = randn(2, 4, 7, 6)
seq = randn(5, 2, 3)  # [seq, batch, input]

CASES = [
    # arithmetic, with multidirectional broadcasting
    Case("Add", [x234, randn(3, 1)]),
    Case("Sub", [x234, randn(4)]),
    Case("Mul", [x234, randn(2, 1, 4)]),
    Case("Div", [x234, positive(3, 4)]),
    Case("Pow", [positive(2, 3), np.array(2.5, np.float32)]),
    Case("Div", [i64(7, -7, 9), i64(2, 2, 4)], id="Div-int-truncates", grad=False),
    Case("Sqrt", [positive(3, 4)]),
    Case("Exp", [x234]),
    Case("Log", [positive(3, 4)]),
    Case("Neg", [x234]),
    Case("Abs", [x234]),
    Case("Reciprocal", [positive(3, 4)]),
    Case("Erf", [x234]),
    Case("Max", [x234, randn(4), randn(3, 1)]),
    Case("Min", [x234, randn(4)]),
    Case("Sum", [x234, randn(4), randn(3, 4)]),
    Case("Mean", [x234, randn(4)]),
    Case("Where", [x234 > 0, x234, randn(4)], grad_inputs=(1, 2)),
    Case("Equal", [i64(1, 2, 3), i64(1, 0, 3)], grad=False),
    Case("Less", [x234, randn(4)], grad=False),
    # activations
    Case("Relu", [x234]),
    Case("Tanh", [x234]),
    Case("Sigmoid", [x234]),
    Case("LeakyRelu", [x234], {"alpha": 0.2}),
    Case("PRelu", [x234, randn(4)]),
    Case("PRelu", [img, randn(4, 1, 1)], id="PRelu-channel"),
    Case("Elu", [x234], {"alpha": 0.7}),
    Case("Selu", [x234]),
    Case("Celu", [x234], {"alpha": 1.3}),
    Case("HardSigmoid", [x234 * 3], {"alpha": 0.3, "beta": 0.4}),
    Case("HardSwish", [x234 * 3], opset=14),
    Case("Softsign", [x234]),
    Case("Softplus", [x234]),
    Case("Mish", [x234], opset=18),
    Case("Gelu", [x234], opset=20),
    Case("Gelu", [x234], {"approximate": "tanh"}, opset=20, id="Gelu-tanh"),
    Case("Clip", [x234, np.array(-0.5, np.float32), np.array(0.7, np.float32)]),
    Case("Clip", [x234, None, np.array(0.2, np.float32)], id="Clip-max-only"),
    Case("Clip", [x234], {"min": -0.3, "max": 0.4}, opset=6, id="Clip-6-attributes"),
    Case("ThresholdedRelu", [x234], {"alpha": 0.3}, opset=10),
    Case("Softmax", [x234], {"axis": 1}, opset=11, id="Softmax-11-coerced-2d"),
    Case("Softmax", [x234], {"axis": 1}),
    Case("LogSoftmax", [x234], {"axis": -1}),
    Case("LogSoftmax", [x234], {"axis": 1}, opset=11, id="LogSoftmax-11"),
    # linear algebra
    Case("MatMul", [x234, randn(4, 5)]),
    Case("MatMul", [randn(4), randn(2, 4, 3)], id="MatMul-1d"),
    Case("Gemm", [randn(4, 3), randn(5, 4), randn(5)], {"transA": 1, "transB": 1, "alpha": 0.5, "beta": 2.0}),
    Case("Gemm", [randn(3, 4), randn(4, 5)], id="Gemm-no-C"),
    Case("Einsum", [randn(2, 3, 4), randn(2, 4, 5)], {"equation": "bij,bjk->bik"}, opset=12),
    # convolution and pooling
    Case(
        "Conv",
        [img, randn(6, 2, 3, 3), randn(6)],
        {"pads": [0, 1, 1, 0], "strides": [2, 1], "dilations": [1, 2], "group": 2},
        id="Conv-asym-group",
    ),
    Case("Conv", [img, randn(3, 4, 3, 2)], {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, id="Conv-same-upper"),
    Case("Conv", [img, randn(3, 4, 2, 2)], {"auto_pad": "SAME_LOWER"}, id="Conv-same-lower"),
    Case("Conv", [randn(2, 3, 9), randn(4, 3, 3), randn(4)], {"pads": [1, 1], "strides": [2]}, id="Conv-1d"),
    Case("Conv", [randn(1, 2, 4, 4, 4), randn(2, 2, 2, 2, 2)], id="Conv-3d"),
    Case(
        "ConvTranspose",
        [img, randn(4, 3, 3, 3), randn(6)],
        {"strides": [2, 2], "pads": [1, 0, 0, 1], "output_padding": [1, 1], "group": 2},
        id="ConvTranspose-group",
    ),
    Case(
        "ConvTranspose",
        [img, randn(4, 2, 3, 3)],
        {"strides": [2, 2], "output_shape": [14, 13]},
        id="ConvTranspose-output-shape",
    ),
    Case(
        "ConvTranspose",
        [img, randn(4, 2, 2, 2)],
        {"strides": [2, 2], "auto_pad": "SAME_UPPER"},
        id="ConvTranspose-same-upper",
    ),
    Case("ConvTranspose", [img, randn(4, 2, 3, 3)], {"dilations": [2, 1]}, id="ConvTranspose-dilated"),
    Case("MaxPool", [img], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    Case("MaxPool", [img], {"kernel_shape": [2, 3], "pads": [0, 1, 1, 0]}, id="MaxPool-asym"),
    Case("MaxPool", [img], {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}, id="MaxPool-ceil"),
    Case("MaxPool", [img], {"kernel_shape": [2, 2], "dilations": [2, 2]}, id="MaxPool-dilated"),
    Case(
        "AveragePool",
        [img],
        {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
        id="AveragePool-exclude-pad",
    ),
    Case(
        "AveragePool",
        [img],
        {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1},
        id="AveragePool-include-pad",
    ),
    Case("AveragePool", [img], {"kernel_shape": [2, 2], "pads": [0, 1, 1, 0]}, id="AveragePool-asym"),
    Case("AveragePool", [img], {"kernel_shape": [2, 2], "strides": [2, 2]}, id="AveragePool-plain"),
    Case("GlobalAveragePool", [img]),
    Case("GlobalMaxPool", [img]),
    # normalisation
    Case("BatchNormalization", [img, randn(4), randn(4), randn(4), positive(4)], {"epsilon": 1e-3}, opset=15),
    Case("BatchNormalization", [img, randn(4), randn(4), randn(4), positive(4)], opset=9, id="BatchNorm-9"),
    Case(
        "BatchNormalization",
        [img, randn(4), randn(4), randn(4), positive(4)],
        {"training_mode": 1},
        opset=15,
        outputs=3,
        id="BatchNorm-training",
    ),
    Case("LayerNormalization", [x234, randn(4), randn(4)], opset=17),
    Case(
        "LayerNormalization",
        [x234, randn(3, 4), randn(3, 4)],
        {"axis": 1, "epsilon": 1e-3},
        opset=17,
        id="LayerNorm-axis1",
    ),
    Case("InstanceNormalization", [img, randn(4), randn(4)]),
    Case("GroupNormalization", [img, randn(4), randn(4)], {"num_groups": 2}, opset=21),
    Case("Dropout", [x234], opset=13),
    Case("Identity", [x234]),
    # shapes and indexing
    Case("Reshape", [x234, i64(0, -1)], grad_inputs=(0,)),
    Case("Reshape", [x234, i64(4, 0, 2)], grad_inputs=(0,), id="Reshape-copy-dim"),
    Case("Flatten", [img], {"axis": 2}),
    Case("Flatten", [img], {"axis": -1}, opset=13, id="Flatten-negative"),
    Case("Squeeze", [randn(2, 1, 3, 1)], {"axes": [1, -1]}, opset=11, id="Squeeze-11"),
    Case("Squeeze", [randn(2, 1, 3, 1), i64(-1)], grad_inputs=(0,)),
    Case("Unsqueeze", [x234], {"axes": [0, -1]}, opset=11, id="Unsqueeze-11"),
    Case("Unsqueeze", [x234, i64(1, -1)], grad_inputs=(0,)),
    Case("Transpose", [x234], {"perm": [2, 0, 1]}),
    Case("Transpose", [x234], id="Transpose-default"),
    Case("Concat", [x234, randn(2, 3, 2)], {"axis": -1}),
    Case("Split", [randn(2, 6)], {"axis": 1, "split": [2, 4]}, opset=11, outputs=2, id="Split-11"),
    Case("Split", [randn(2, 6), i64(1, 5)], {"axis": 1}, outputs=2, grad_inputs=(0,), id="Split-13"),
    Case("Split", [randn(7, 2)], {"num_outputs": 3}, opset=18, outputs=3, id="Split-18-uneven"),
    Case("Slice", [x234, i64(1, -1), i64(100, 0), i64(2, 1), i64(1, -1)], grad_inputs=(0,)),
    Case("Slice", [x234, i64(-1), i64(-100), i64(2), i64(-2)], grad_inputs=(0,), id="Slice-negative-step"),
    Case("Gather", [x234, i64(2, -1, 0)], {"axis": 2}, grad_inputs=(0,)),
    Case("Gather", [x234, np.array(-1, np.int64)], {"axis": 1}, grad_inputs=(0,), id="Gather-scalar"),
    Case("GatherElements", [x234, RNG.integers(-3, 3, (2, 3, 2)).astype(np.int64)], {"axis": 2}, grad_inputs=(0,)),
    Case("Expand", [randn(3, 1), i64(2, 1, 4)], grad_inputs=(0,)),
    Case("Tile", [randn(2, 3), i64(2, 1)], grad_inputs=(0,)),
    Case("Pad", [img, i64(0, 0, 1, 2, 0, 0, 2, 1), np.array(0.5, np.float32)], grad_inputs=(0,)),
    Case("Pad", [img, i64(0, 0, 1, 2, 0, 0, 2, 1)], {"mode": "reflect"}, grad_inputs=(0,), id="Pad-reflect"),
    Case("Pad", [img, i64(0, 0, 1, 2, 0, 0, 2, 1)], {"mode": "edge"}, grad_inputs=(0,), id="Pad-edge"),
    Case("Cast", [x234], {"to": TensorProto.DOUBLE}),
    Case("Cast", [x234 * 3], {"to": TensorProto.INT64}, grad=False, id="Cast-int"),
    Case("Shape", [x234], grad=False),
    Case("Shape", [x234], {"start": 1, "end": -1}, opset=15, grad=False, id="Shape-15-slice"),
    Case("Size", [x234], grad=False),
    Case("ConstantOfShape", [i64(2, 3)], {"value": helper.make_tensor("v", TensorProto.FLOAT, [1], [0.5])}, grad=False),
    Case("Range", [np.array(1, np.int64), np.array(10, np.int64), np.array(3, np.int64)], opset=11, grad=False),
    Case("Trilu", [x234, np.array(1, np.int64)], {"upper": 0}, opset=14, grad_inputs=(0,)),
    Case("CumSum", [x234, np.array(2, np.int64)], {"exclusive": 1, "reverse": 1}, opset=14, grad_inputs=(0,)),
    Case("ReduceMean", [x234], {"axes": [1, -1], "keepdims": 0}, opset=13, id="ReduceMean-13"),
    Case("ReduceMean", [x234, i64(1)], opset=18, grad_inputs=(0,), id="ReduceMean-18"),
    Case("ReduceSum", [x234, i64(0, 2)], {"keepdims": 0}, grad_inputs=(0,)),
    Case("ReduceSum", [x234, i64()], {"noop_with_empty_axes": 1}, grad_inputs=(0,), id="ReduceSum-noop"),
    Case("ReduceMax", [x234], {"axes": [2]}),
    Case("ReduceL2", [x234], {"axes": [1]}),
    Case("ReduceSumSquare", [x234], {"axes": [0]}),
    Case("ReduceLogSumExp", [x234], {"axes": [2]}),
    Case("ArgMax", [x234], {"axis": 1, "keepdims": 0}, grad=False),
    Case("TopK", [x234, i64(2)], {"axis": -1}, opset=11, outputs=2, grad_inputs=(0,)),
    # resampling and rearrangement
    Case(
        "Resize",
        [img, None, np.array([1, 1, 2, 2], np.float32)],
        {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
        opset=13,
        grad_inputs=(0,),
        id="Resize-nearest",
    ),
    Case(
        "Resize",
        [img, None, np.array([1, 1, 1.5, 2], np.float32)],
        {"mode": "linear", "coordinate_transformation_mode": "half_pixel"},
        opset=13,
        grad_inputs=(0,),
        id="Resize-linear-half-pixel",
    ),
    Case(
        "Resize",
        [img, None, None, i64(2, 4, 9, 11)],
        {"mode": "linear", "coordinate_transformation_mode": "align_corners"},
        opset=13,
        grad_inputs=(0,),
        id="Resize-linear-align-corners-sizes",
    ),
    Case(
        "Resize",
        [img, None, np.array([1, 1, 2, 2], np.float32)],
        {"mode": "cubic", "coordinate_transformation_mode": "half_pixel"},
        opset=13,
        grad_inputs=(0,),
        id="Resize-cubic",
        atol=1e-4,
    ),
    Case("DepthToSpace", [randn(2, 8, 3, 2)], {"blocksize": 2}, id="DepthToSpace-DCR"),
    Case("DepthToSpace", [randn(2, 8, 3, 2)], {"blocksize": 2, "mode": "CRD"}, id="DepthToSpace-CRD"),
    Case("SpaceToDepth", [randn(2, 2, 4, 6)], {"blocksize": 2}),
    Case("LRN", [img], {"size": 3, "alpha": 1e-2, "beta": 0.6, "bias": 1.5}),
    # recurrent layers (ONNX gate orders: LSTM iofc, GRU zrh)
    Case(
        "LSTM",
        [seq, randn(2, 16, 3), randn(2, 16, 4), randn(2, 32), None, randn(2, 2, 4), randn(2, 2, 4)],
        {"hidden_size": 4, "direction": "bidirectional"},
        opset=14,
        outputs=3,
    ),
    Case(
        "LSTM",
        [seq, randn(1, 16, 3), randn(1, 16, 4), randn(1, 32), None, None, None, randn(1, 12)],
        {"hidden_size": 4},
        opset=14,
        outputs=3,
        id="LSTM-peepholes",
    ),
    Case("GRU", [seq, randn(1, 12, 3), randn(1, 12, 4), randn(1, 24)], {"hidden_size": 4}, opset=14, outputs=2),
    Case(
        "GRU",
        [seq, randn(2, 12, 3), randn(2, 12, 4), randn(2, 24)],
        {"hidden_size": 4, "linear_before_reset": 1, "direction": "bidirectional"},
        opset=14,
        outputs=2,
        id="GRU-linear-before-reset",
    ),
    Case(
        "GRU",
        [randn(2, 5, 3), randn(1, 12, 3), randn(1, 12, 4)],
        {"hidden_size": 4, "layout": 1},
        opset=14,
        outputs=2,
        id="GRU-layout1",
        reference="onnx",
    ),  # onnxruntime has no layout=1 kernels
    Case(
        "RNN",
        [seq, randn(1, 4, 3), randn(1, 4, 4), randn(1, 8)],
        {"hidden_size": 4, "direction": "reverse"},
        opset=14,
        outputs=2,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_forward_matches_onnxruntime(case: Case) -> None:
    model = single_node_model(case)
    feeds = {f"in{i}": v for i, v in enumerate(case.inputs) if v is not None}
    expected = run_ort(model, feeds, case.reference)
    got = run_lowered(model, feeds, case.opset)
    assert len(got) == len(expected)
    for want, have in zip(expected, got, strict=False):
        assert tuple(have.shape) == want.shape, (have.shape, want.shape)
        np.testing.assert_allclose(have.detach().numpy().astype(want.dtype), want, rtol=1e-4, atol=case.atol)


GRAD_CASES = [c for c in CASES if c.grad]


@pytest.mark.parametrize("case", GRAD_CASES, ids=[c.id for c in GRAD_CASES])
def test_backward_matches_finite_differences(case: Case) -> None:
    entry = lookup(case.op, case.opset)
    assert entry is not None and entry.differentiable
    node = single_node_model(case).graph.node[0]
    attrs = decode_attributes(node)
    floats = [i for i, v in enumerate(case.inputs) if v is not None and v.dtype.kind == "f"]
    wrt = list(case.grad_inputs) if case.grad_inputs is not None else floats
    base = [
        None if v is None else torch.from_numpy(v.astype(np.float64) if v.dtype.kind == "f" else v) for v in case.inputs
    ]

    def fn(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = list(base)
        for i, t in zip(wrt, tensors, strict=False):
            inputs[i] = t
        outputs = entry.impl(OpCall(case.op, inputs, attrs, case.opset, case.outputs))
        return tuple(o for o in outputs if o is not None and o.dtype.is_floating_point)

    leaves = [base[i].clone().requires_grad_(True) for i in wrt]  # type: ignore[union-attr]
    # fast_mode checks random projections of the Jacobian: as strict, and independent of its size.
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def control_flow_model(condition: bool) -> onnx.ModelProto:
    then_graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)],
    )
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Mul", ["acc_in", "w"], ["acc_out"]),
            helper.make_node("Identity", ["acc_out"], ["scan_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("scan_out", TensorProto.FLOAT, None),
        ],
    )
    nodes = [
        helper.make_node("If", ["c"], ["branch"], then_branch=then_graph, else_branch=else_graph),
        helper.make_node("Loop", ["trips", "", "branch"], ["final", "scans"], body=body),
    ]
    graph = helper.make_graph(
        nodes,
        "control",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [
            helper.make_tensor_value_info("final", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("scans", TensorProto.FLOAT, None),
        ],
        initializer=[
            helper.make_tensor("c", TensorProto.BOOL, [], [condition]),
            helper.make_tensor("trips", TensorProto.INT64, [], [3]),
            helper.make_tensor("w", TensorProto.FLOAT, [3], [0.5, -1.0, 2.0]),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("condition", [True, False])
def test_if_and_loop_run_the_branch_and_trips_onnxruntime_runs(condition: bool) -> None:
    model = control_flow_model(condition)
    x = randn(2, 3)
    expected = run_ort(model, {"x": x})
    lowered = LoweredGraph(model, opset=13, trainable={"w"}, device=torch.device("cpu"))
    out = lowered.run({"x": torch.from_numpy(x)})
    np.testing.assert_allclose(out["final"].detach().numpy(), expected[0], rtol=1e-6)
    np.testing.assert_allclose(out["scans"].detach().numpy(), expected[1], rtol=1e-6)
    out["final"].sum().backward()  # the loop-carried product differentiates through every trip
    w = lowered.parameters["w"]
    branch = np.maximum(x, 0) if condition else -x
    np.testing.assert_allclose(w.grad.numpy(), (branch * 3 * w.detach().numpy() ** 2).sum(0), rtol=1e-5)


def test_registry_covers_the_ops_both_exporters_emit() -> None:
    ops = supported_ops()
    for name in (
        "Conv",
        "ConvTranspose",
        "Gemm",
        "MatMul",
        "BatchNormalization",
        "LayerNormalization",
        "Softmax",
        "Reshape",
        "Slice",
        "Gather",
        "Split",
        "ReduceMean",
        "Where",
        "Expand",
        "Erf",
        "LSTM",
        "GRU",
        "RNN",
        "If",
        "Loop",
        "Gelu",
        "HardSwish",
        "Clip",
    ):
        assert name in ops, name
    assert ops["Softmax"] == [1, 13] and ops["Split"] == [1, 13, 18]


def test_unsupported_ops_are_named_with_their_domain() -> None:
    graph = helper.make_graph(
        [
            helper.make_node("Hardmax", ["x"], ["y"], axis=-1),
            helper.make_node("Det", ["y"], ["z"]),
            helper.make_node("FusedGemm", ["z", "z"], ["w"], domain="com.microsoft"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("w", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    assert unsupported_ops(model, 13) == ["Det", "com.microsoft::FusedGemm"]


def test_opset_versions_select_the_spec_semantics() -> None:
    # Softmax over axis 1 of a 3-D tensor: opset 11 normalises over dims 1..end, 13 over dim 1 only.
    x = torch.from_numpy(x234)
    old = lookup("Softmax", 11).impl(OpCall("Softmax", [x], {"axis": 1}, 11))[0]  # type: ignore[union-attr]
    new = lookup("Softmax", 13).impl(OpCall("Softmax", [x], {"axis": 1}, 13))[0]  # type: ignore[union-attr]
    assert old is not None and new is not None
    assert math.isclose(float(old[0].sum()), 1.0, rel_tol=1e-5)
    assert torch.allclose(new.sum(dim=1), torch.ones(2, 4))


def test_importing_the_onnx_probe_imports_no_framework() -> None:
    """torch, onnx and onnxruntime are imported inside functions, so `gradcheck --help` stays fast."""
    import subprocess
    import sys

    code = (
        "import sys, gradcheck_cli.probe.onnx_probe, gradcheck_cli.onnx.ops, gradcheck_cli.onnx.ort_stats, "
        "gradcheck_cli.onnx.plan, gradcheck_cli.onnx.lower, gradcheck_cli.api; "
        "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'numpy') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr
