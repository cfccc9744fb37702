"""In-graph statistics (gradcheck_cli/probe/onnx_stats.py) against independent numpy float64 answers.

Each graph is built with onnx.helper; the reference values are read from onnxruntime the old way
(exposed as outputs of a cut graph, :func:`ort_stats.session_for`) and reduced in numpy float64,
so a wrong axis, a lost digit or a miscounted unit shows as a mismatch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from gradcheck_cli.onnx.ort_stats import session_for, value_types
from gradcheck_cli.options import InputOptions, ProbeOptions
from gradcheck_cli.probe.activations import saturated_mask
from gradcheck_cli.probe.onnx_probe import run_onnx_probe
from gradcheck_cli.probe.onnx_stats import ValueRequest, reduced_statistics_pass, saturation_spec

SHAPE = (8, 4, 5, 6)
CUTOFF = 0.05


def _graph(opset: int) -> onnx.ModelProto:
    """Values of every rank and float type the reduction handles, plus an integer one."""
    f, f16, f64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE
    inits = [
        numpy_helper.from_array(np.array(1e4, np.float32), "big"),
        numpy_helper.from_array(np.array([0, 0, 100, 0], np.float32).reshape(1, 4, 1, 1), "shift"),
        numpy_helper.from_array(np.array(5, np.float32), "five"),
        numpy_helper.from_array(np.array(3, np.float32), "three"),
        numpy_helper.from_array(np.array([8, 4, 30], np.int64), "shape3"),
    ]
    nodes = [
        helper.make_node("Add", ["x", "big"], ["large"]),  # mean 1e4, spread 1: E[x^2]-E[x]^2 fails here
        helper.make_node("Sub", ["x", "shift"], ["shifted"]),
        helper.make_node("Relu", ["shifted"], ["relu"]),  # channel 2 dead
        helper.make_node("Mul", ["x", "five"], ["x5"]),
        helper.make_node("Sigmoid", ["x5"], ["sigmoid"]),
        helper.make_node("Mul", ["x", "three"], ["x3"]),
        helper.make_node("Tanh", ["x3"], ["tanh"]),
        helper.make_node("Cast", ["shifted"], ["half"], to=f16),
        helper.make_node("Relu", ["half"], ["relu16"]),
        helper.make_node("Cast", ["x3"], ["double"], to=f64),
        helper.make_node("Tanh", ["double"], ["tanh64"]),
        helper.make_node("Flatten", ["relu"], ["flat"], axis=1),
        helper.make_node("Relu", ["flat"], ["relu2d"]),
        helper.make_node("Reshape", ["relu", "shape3"], ["relu3d"]),
        helper.make_node("Shape", ["x"], ["ints"]),
    ]
    outputs = [
        helper.make_tensor_value_info("tanh64", f64, ["batch", 4, 5, 6]),
        helper.make_tensor_value_info("ints", 7, [4]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", f, ["batch", 4, 5, 6])], outputs, initializer=inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.checker.check_model(model)
    return model


def _requests() -> dict[str, ValueRequest]:
    tanh, sigmoid = saturation_spec("tanh", {}), saturation_spec("sigmoid", {})
    return {
        "large": ValueRequest("large"),
        "relu": ValueRequest("relu", unit_axes={1}),
        "sigmoid": ValueRequest("sigmoid", saturation={sigmoid}),
        "tanh": ValueRequest("tanh", saturation={tanh}),
        "relu16": ValueRequest("relu16", unit_axes={1}),
        "tanh64": ValueRequest("tanh64", saturation={tanh}),
        "relu2d": ValueRequest("relu2d", unit_axes={1}),
        "relu3d": ValueRequest("relu3d", unit_axes={1, 2}),
        "ints": ValueRequest("ints"),
    }


def _exposed(model: onnx.ModelProto, names: list[str], feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = session_for(model, names)
    return dict(zip(names, session.run(names, feed), strict=True))


def _batch(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {"x": (np.random.default_rng(seed).standard_normal(SHAPE) * scale).astype(np.float32)}


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_in_graph_statistics_equal_numpy_float64(opset: int) -> None:
    model = _graph(opset)
    feeds = [_batch(0), _batch(1, scale=2.0)]
    wants = _requests()
    types = value_types(model, {"x": SHAPE})
    values = list(wants)
    reduced = reduced_statistics_pass(model, values, wants, types, feeds, opset=opset, cutoff=CUTOFF)
    assert reduced.exposed == []
    assert reduced.skipped == {"ints": "the output is int64, not floating point"}
    assert set(reduced.stats) == set(values) - {"ints"}
    # The graph's own outputs come back unchanged with the statistics.
    assert float(reduced.outputs[0]["tanh64"].reshape(-1)[0]) == pytest.approx(
        math.tanh(3 * float(feeds[0]["x"].reshape(-1)[0]))
    )
    for batch, feed in enumerate(feeds):
        exposed = _exposed(model, [v for v in values if v != "ints"], feed)
        for name, array in exposed.items():
            got = reduced.stats[name][batch]
            want = array.astype(np.float64)
            assert got.shape == array.shape
            assert got.count == want.size
            # onnxruntime's CPU provider runs float16 ops in float32 and drops the rounding
            # between them when the float16 value is not a graph output, as in the reduced
            # graph: those statistics agree to float16 precision, every other to float32's.
            rel = 2e-3 if array.dtype == np.float16 else 1e-6
            assert got.mean == pytest.approx(want.mean(), rel=rel, abs=1e-7), name
            assert got.m2 / got.count == pytest.approx(want.var(), rel=10 * rel, abs=1e-9), name
            assert (got.minimum, got.maximum) == pytest.approx((want.min(), want.max()), rel=rel / 2), name
            for axis in wants[name].unit_axes:
                others = tuple(a for a in range(array.ndim) if a != axis)
                low, high = got.unit_extremes[axis]
                np.testing.assert_allclose(low, want.min(axis=others), rtol=rel / 2)
                np.testing.assert_allclose(high, want.max(axis=others), rtol=rel / 2)
                assert list(low == 0) == list(want.min(axis=others) == 0), name  # dead units exactly
            for spec in wants[name].saturation:
                mask = saturated_mask(spec[0], torch.from_numpy(array), CUTOFF, dict(spec[1]))
                assert got.saturated[spec] == int(mask.sum()), name
    # The cases the test is for actually happened.
    dead = reduced.stats["relu"][0].unit_extremes[1][1]
    assert list(dead == 0) == [False, False, True, False]
    assert reduced.stats["sigmoid"][0].saturated[saturation_spec("sigmoid", {})] > 0
    large = reduced.stats["large"][0]
    assert large.mean == pytest.approx(1e4, rel=1e-3) and large.m2 / large.count == pytest.approx(1.0, rel=0.1)


def test_large_mean_variance_survives_float32_summation() -> None:
    """One long row (rank 1): float32 summation loses the mean's last digits; the corrected
    two-pass formula must still give the variance to float32 accuracy."""
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node("Add", ["x", "big"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1 << 20])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1 << 20])],
            initializer=[numpy_helper.from_array(np.array(3e4, np.float32), "big")],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    x = np.random.default_rng(0).uniform(-1, 1, 1 << 20).astype(np.float32)
    types = value_types(model, {"x": x.shape})
    reduced = reduced_statistics_pass(
        model, ["y"], {"y": ValueRequest("y")}, types, [{"x": x}], opset=17, cutoff=CUTOFF
    )
    y = (x + np.float32(3e4)).astype(np.float64)
    got = reduced.stats["y"][0]
    assert got.mean == pytest.approx(y.mean(), rel=1e-9)
    assert got.m2 / got.count == pytest.approx(y.var(), rel=1e-4)  # naive float32 E[x^2]-E[x]^2: ~100% off


def test_nan_and_inf_values_go_the_exposed_way() -> None:
    model = helper.make_model(
        helper.make_graph(
            [
                helper.make_node("Sqrt", ["x"], ["root"]),
                helper.make_node("Reciprocal", ["x"], ["inverse"]),
                helper.make_node("Relu", ["x"], ["fine"]),
            ],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3])],
            [helper.make_tensor_value_info("fine", TensorProto.FLOAT, [4, 3])],
        ),
        opset_imports=[helper.make_opsetid("", 13)],
    )
    model.ir_version = 7
    x = np.abs(np.random.default_rng(0).standard_normal((4, 3))).astype(np.float32)
    clean = {"x": x}
    dirty = {"x": x.copy()}
    dirty["x"][0, 0] = -1.0  # NaN in root, nothing infinite
    dirty["x"][1, 1] = 0.0  # Inf in inverse
    wants = {name: ValueRequest(name) for name in ("root", "inverse", "fine")}
    types = value_types(model, {"x": x.shape})
    reduced = reduced_statistics_pass(model, list(wants), wants, types, [clean, dirty], opset=13, cutoff=CUTOFF)
    # Non-finite in the second micro-batch only: the whole value goes the old way (no batch twice).
    assert sorted(reduced.exposed) == ["inverse", "root"]
    assert list(reduced.stats) == ["fine"] and len(reduced.stats["fine"]) == 2


def _probe_model(tmp_path: Path, *, poison: bool) -> Path:
    """x -> MatMul(W) -> Relu -> MatMul(V) -> Sigmoid, with an optional Sqrt making NaN up front."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((6, 5)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.standard_normal((5,)).astype(np.float32), "b"),
        numpy_helper.from_array((rng.standard_normal((5, 3)) * 4).astype(np.float32), "V"),
    ]
    first = "root" if poison else "x"
    nodes = ([helper.make_node("Sqrt", ["x"], ["root"])] if poison else []) + [
        helper.make_node("MatMul", [first, "W"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["r"]),
        helper.make_node("MatMul", ["r", "V"], ["o"]),
        helper.make_node("Sigmoid", ["o"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    path = tmp_path / f"m{int(poison)}.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("poison", [False, True])
def test_probe_reports_are_the_same_by_either_path(tmp_path: Path, poison: bool) -> None:
    options = ProbeOptions(inputs=InputOptions(batch_size=16, batches=2))
    path = _probe_model(tmp_path, poison=poison)
    fast = run_onnx_probe(path, options)
    # The exposing path reduces in torch with float32 E[x^2] - E[x]^2 (rel. error ~1e-6): the
    # paths agree to that, not bit for bit.
    slow = run_onnx_probe(path, options, in_graph=False)
    assert [r.name for r in fast.layers] == [r.name for r in slow.layers]
    for a, b in zip(fast.layers, slow.layers, strict=True):
        assert (a.output.count, a.output.nan, a.output.inf) == (b.output.count, b.output.nan, b.output.inf)
        for key in ("mean", "var", "min", "max"):
            x, y = getattr(a.output, key), getattr(b.output, key)
            assert (x is None) == (y is None) and (x is None or y is None or x == pytest.approx(y, rel=1e-5)), (
                a.name,
                key,
            )
        assert a.dead == b.dead and a.saturation == b.saturation and a.shape == b.shape
        assert a.reasons == b.reasons
    if poison:
        nan_rows = [r for r in fast.layers if r.output.nan]
        assert nan_rows and all(r.output.mean is None for r in nan_rows)
    else:
        assert any(r.saturation is not None and r.saturation.fraction > 0 for r in fast.layers)


def test_in_graph_counts_nan_like_numpy(tmp_path: Path) -> None:
    from gradcheck_cli.onnx.plan import plan_rows
    from gradcheck_cli.probe.onnx_probe import _feeds, onnx_probe_inputs

    path = _probe_model(tmp_path, poison=True)
    options = ProbeOptions(inputs=InputOptions(batch_size=16))
    report = run_onnx_probe(path, options)
    model = onnx.load(str(path))
    inputs, _ = onnx_probe_inputs(model, options, torch.device("cpu"))
    feed: dict[str, Any] = _feeds(inputs)[0]
    outputs = {p.name: p.output for p in plan_rows(model.graph).rows}
    values = _exposed(model, sorted(set(outputs.values())), feed)
    assert len(report.layers) == len(outputs) >= 3
    for row in report.layers:
        want = values[outputs[row.name]]
        assert (row.output.nan, row.output.inf) == (int(np.isnan(want).sum()), int(np.isinf(want).sum())), row.name
    assert sum(r.output.nan for r in report.layers) > 0


def test_reductions_are_ordered_so_each_value_is_freed_early() -> None:
    """onnxruntime's execution order is a depth-first search from the last leaf node: the first
    value's reductions must be the last nodes, or every value stays alive to the end of the run
    (memory growing with depth)."""
    from gradcheck_cli.probe.onnx_stats import reduced_model

    model = _graph(17)
    wants = _requests()
    del wants["ints"]
    types = value_types(model, {"x": SHAPE})
    reduced, _ = reduced_model(model, list(wants.values()), types, opset=17, cutoff=CUTOFF)
    added = list(reduced.graph.node)[len(model.graph.node) :]
    consumed = [next(v for v in wants if v in node.input) for node in added if any(v in node.input for v in wants)]
    producers = {name: i for i, node in enumerate(model.graph.node) for name in node.output}
    order = [producers[v] for v in dict.fromkeys(consumed)]
    assert order == sorted(order, reverse=True)
