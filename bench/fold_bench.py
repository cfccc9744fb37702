"""Benchmark ``gradcheck fold-bn`` against torch.fx's fuse, onnxsim and OnnxSlim.

    python bench/fold_bench.py [--runs 20] [--models resnet50,mobilenet_v3_large] [--json out.json]

Measures, on torchvision models with randomised BatchNorm statistics (weights=None, seed 0, so no
download), in one process and one run:

- fold time of each tool, BatchNorms left, max |error| against the unfolded model;
- inference latency before and after (median of --runs, timed round-robin across the tools so
  that load on a shared machine hits all alike; batch 1, 3x224x224), PyTorch eager and
  ONNX Runtime (default optimisations, and with optimisations disabled, where ORT's own Conv+BN
  fusion cannot hide the difference);
- a table of which BatchNorm patterns each tool folds correctly, on small synthetic models.

onnxsim and onnxslim are benchmark-only dependencies (``pip install onnxsim onnxslim``); a
missing one is reported as such. Results go to stdout as Markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from gradcheck_cli.rewrite.onnx_fold import fold_onnx_model
from gradcheck_cli.rewrite.torch_fold import fold_torch_module

warnings.simplefilter("ignore")
torch.set_num_threads(2)


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, (time.perf_counter() - start) * 1e3


def torch_bn_count(module: nn.Module) -> int:
    if isinstance(module, torch.fx.GraphModule):
        return sum(
            1
            for n in module.graph.nodes
            if (n.op == "call_module" and isinstance(module.get_submodule(n.target), nn.modules.batchnorm._BatchNorm))
            or "batch_norm" in str(n.target)
        )
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def onnx_bn_count(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "BatchNormalization" for n in model.graph.node)


def session(model: onnx.ModelProto, optimise: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if not optimise:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def run_onnx(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    return np.asarray(session(model, optimise=False).run(None, feed)[0])


def onnxsim_fold(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxsim

    simplified, ok = onnxsim.simplify(copy.deepcopy(model))
    assert ok
    return simplified


def onnxslim_fold(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    return onnxslim.slim(copy.deepcopy(model))


def onnx_tools() -> dict[str, Callable[[onnx.ModelProto], onnx.ModelProto] | str]:
    tools: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto] | str] = {
        "gradcheck": lambda m: fold_onnx_model(m).model
    }
    for name, fn in (("onnxsim", onnxsim_fold), ("onnxslim", onnxslim_fold)):
        try:
            __import__(name)
            tools[name] = fn
        except ImportError:
            tools[name] = "not installed"
    return tools


def versions() -> str:
    parts = [f"torch {torch.__version__}", f"onnx {onnx.__version__}", f"onnxruntime {ort.__version__}"]
    for name in ("onnxsim", "onnxslim"):
        try:
            parts.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            parts.append(f"{name} not installed")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# Whole models


def interleaved_ms(candidates: dict[str, Callable[[], Any]], runs: int, warmup: int = 3) -> dict[str, float]:
    """Median per candidate, timed round-robin so that load drifting on a shared machine hits all alike."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(runs):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def bench_model(name: str, runs: int) -> list[dict[str, Any]]:
    import torchvision

    torch.manual_seed(0)
    model = randomise_bn(torchvision.models.get_model(name, weights=None))
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        reference = model(x)
    rows: list[dict[str, Any]] = []

    torch_candidates: dict[str, tuple[nn.Module, float | None]] = {"none (unfolded)": (model, None)}
    result, ms = timed(lambda: fold_torch_module(model, example_args=(x,)))
    torch_candidates["gradcheck"] = (result.module, ms)
    try:
        from torch.fx.experimental.optimization import fuse

        fused, ms = timed(lambda: fuse(copy.deepcopy(model)))
        torch_candidates["torch.fx fuse"] = (fused, ms)
    except Exception as exc:  # report, do not hide
        rows.append(
            {"model": name, "backend": "torch eager", "tool": "torch.fx fuse", "error": str(exc).splitlines()[0]}
        )
    with torch.inference_mode():
        latency = interleaved_ms(
            {tool: (lambda m=module: m(x)) for tool, (module, _) in torch_candidates.items()}, runs
        )
        for tool, (module, fold_ms) in torch_candidates.items():
            rows.append(
                {
                    "model": name,
                    "backend": "torch eager",
                    "tool": tool,
                    "fold_ms": fold_ms,
                    "bn_left": torch_bn_count(module),
                    "max_abs_err": float((module(x) - reference).abs().max()),
                    "output_scale": float(reference.abs().max()),
                    "latency_ms": latency[tool],
                }
            )

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "m.onnx"
        torch.onnx.export(
            model,
            (x,),
            str(path),
            dynamo=False,
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
            input_names=["x"],
        )
        original = onnx.load(str(path))
    feed = {"x": x.numpy()}
    onnx_reference = run_onnx(original, feed)
    onnx_candidates: dict[str, tuple[onnx.ModelProto, float | None]] = {"none (unfolded)": (original, None)}
    for tool, fn in onnx_tools().items():
        if isinstance(fn, str):
            rows.append({"model": name, "backend": "onnxruntime", "tool": tool, "error": fn})
            continue
        try:
            onnx_candidates[tool] = timed(lambda f=fn: f(original))
        except Exception as exc:
            rows.append({"model": name, "backend": "onnxruntime", "tool": tool, "error": str(exc).splitlines()[0]})
    optimised = {tool: session(m, optimise=True) for tool, (m, _) in onnx_candidates.items()}
    plain = {tool: session(m, optimise=False) for tool, (m, _) in onnx_candidates.items()}
    latency = interleaved_ms({tool: (lambda s=sess: s.run(None, feed)) for tool, sess in optimised.items()}, runs)
    latency_plain = interleaved_ms({tool: (lambda s=sess: s.run(None, feed)) for tool, sess in plain.items()}, runs)
    for tool, (folded_onnx, fold_ms) in onnx_candidates.items():
        rows.append(
            {
                "model": name,
                "backend": "onnxruntime",
                "tool": tool,
                "fold_ms": fold_ms,
                "bn_left": onnx_bn_count(folded_onnx),
                "max_abs_err": float(np.abs(run_onnx(folded_onnx, feed) - onnx_reference).max()),
                "output_scale": float(np.abs(onnx_reference).max()),
                "latency_ms": latency[tool],
                "latency_noopt_ms": latency_plain[tool],
            }
        )
    return rows


# ---------------------------------------------------------------------------------------------
# Pattern coverage


def torch_patterns() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 6, 3)
            self.bn = nn.BatchNorm2d(6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            bn = self.bn
            return F.batch_norm(self.conv(x), bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.1, bn.eps)

    x4, x2 = torch.randn(2, 4, 8, 8), torch.randn(4, 4)
    return {
        "Conv2d -> BN": (nn.Sequential(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6)), x4),
        "Conv3d depthwise -> BN": (
            nn.Sequential(nn.Conv3d(4, 4, 3, groups=4), nn.BatchNorm3d(4)),
            torch.randn(2, 4, 5, 5, 5),
        ),
        "ConvTranspose2d -> BN": (nn.Sequential(nn.ConvTranspose2d(4, 6, 2, stride=2), nn.BatchNorm2d(6)), x4),
        "ConvTranspose2d grouped -> BN": (
            nn.Sequential(nn.ConvTranspose2d(4, 6, 2, stride=2, groups=2), nn.BatchNorm2d(6)),
            x4,
        ),
        "Linear -> BN1d": (nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5)), x2),
        "BN -> Conv2d (no padding)": (nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 6, 3)), x4),
        "BN1d -> Linear": (nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 5)), x2),
        "F.batch_norm after Conv": (Functional(), x4),
    }


def torch_coverage() -> dict[str, dict[str, str]]:
    from torch.fx.experimental.optimization import fuse

    tools: dict[str, Callable[[nn.Module, torch.Tensor], nn.Module]] = {
        "gradcheck": lambda m, x: fold_torch_module(m, example_args=(x,)).module,
        "torch.fx fuse": lambda m, x: fuse(copy.deepcopy(m)),
    }
    table: dict[str, dict[str, str]] = {}
    for pattern, (model, x) in torch_patterns().items():
        randomise_bn(model, seed=1)
        with torch.no_grad():
            expected = model(x)
        table[pattern] = {}
        for tool, fn in tools.items():
            try:
                folded = fn(model, x)
                with torch.no_grad():
                    ok = bool(torch.allclose(folded(x), expected, rtol=1e-4, atol=1e-5))
                left = torch_bn_count(folded)
                table[pattern][tool] = "folded" if left == 0 and ok else ("WRONG" if not ok else "left")
            except Exception as exc:
                table[pattern][tool] = f"error ({type(exc).__name__})"
    return table


def onnx_pattern_models() -> dict[str, onnx.ModelProto]:
    rng = np.random.default_rng(0)

    def arr(*shape: int, positive: bool = False) -> np.ndarray:
        v = rng.standard_normal(shape).astype(np.float32)
        return np.abs(v) + 0.3 if positive else v

    def bn(prefix: str, x: str, y: str, c: int) -> tuple[onnx.NodeProto, list[TensorProto]]:
        names = [f"{prefix}_{k}" for k in ("s", "b", "m", "v")]
        values = [arr(c, positive=True), arr(c), arr(c), arr(c, positive=True)]
        return (
            helper.make_node("BatchNormalization", [x, *names], [y]),
            [numpy_helper.from_array(v, n) for v, n in zip(values, names, strict=True)],
        )

    def model(nodes: list[onnx.NodeProto], inits: list[TensorProto], x_shape: list[int]) -> onnx.ModelProto:
        graph = helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            inits,
        )
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        return onnx.shape_inference.infer_shapes(m)

    def after(op: str, weight: np.ndarray, c: int, x_shape: list[int], **attrs: Any) -> onnx.ModelProto:
        bn_node, bn_inits = bn("bn", "h", "y", c)
        return model(
            [helper.make_node(op, ["x", "w"], ["h"], **attrs), bn_node],
            [numpy_helper.from_array(weight, "w"), *bn_inits],
            x_shape,
        )

    def before(op: str, weight: np.ndarray, c: int, x_shape: list[int], **attrs: Any) -> onnx.ModelProto:
        bn_node, bn_inits = bn("bn", "x", "h", c)
        return model(
            [bn_node, helper.make_node(op, ["h", "w"], ["y"], **attrs)],
            [numpy_helper.from_array(weight, "w"), *bn_inits],
            x_shape,
        )

    bn_node, bn_inits = bn("bn", "a", "y", 5)
    matmul_add = model(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["a"]), bn_node],
        [numpy_helper.from_array(arr(4, 5), "w"), numpy_helper.from_array(arr(5), "b"), *bn_inits],
        [3, 4],
    )
    return {
        "Conv -> BN": after("Conv", arr(6, 4, 3, 3), 6, [2, 4, 8, 8]),
        "ConvTranspose -> BN": after("ConvTranspose", arr(4, 6, 2, 2), 6, [2, 4, 8, 8], strides=[2, 2]),
        "ConvTranspose grouped -> BN": after(
            "ConvTranspose", arr(4, 3, 2, 2), 6, [2, 4, 8, 8], group=2, strides=[2, 2]
        ),
        "Gemm (transB=1) -> BN": after("Gemm", arr(5, 4), 5, [3, 4], transB=1),
        "Gemm (transA=1, alpha, beta) -> BN": after("Gemm", arr(4, 5), 5, [4, 3], transA=1, alpha=0.5, beta=2.0),
        "MatMul const -> BN": after("MatMul", arr(4, 5), 5, [3, 4]),
        "MatMul const -> Add -> BN": matmul_add,
        "BN -> Conv (no padding)": before("Conv", arr(6, 4, 3, 3), 4, [2, 4, 8, 8]),
        "BN -> Gemm": before("Gemm", arr(5, 4), 4, [3, 4], transB=1),
        "BN -> MatMul const": before("MatMul", arr(4, 5), 4, [3, 4]),
    }


def onnx_coverage() -> dict[str, dict[str, str]]:
    tools = onnx_tools()
    table: dict[str, dict[str, str]] = {}
    for pattern, model in onnx_pattern_models().items():
        shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        feed = {"x": np.random.default_rng(1).standard_normal(shape).astype(np.float32)}
        expected = run_onnx(model, feed)
        table[pattern] = {}
        for tool, fn in tools.items():
            if isinstance(fn, str):
                table[pattern][tool] = fn
                continue
            try:
                folded = fn(model)
                ok = bool(np.allclose(run_onnx(folded, feed), expected, rtol=1e-4, atol=1e-5))
                left = onnx_bn_count(folded)
                table[pattern][tool] = "folded" if left == 0 and ok else ("WRONG" if not ok else "left")
            except Exception as exc:
                table[pattern][tool] = f"error ({type(exc).__name__})"
    return table


# ---------------------------------------------------------------------------------------------
# Output


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.2e}" if abs(value) < 1e-2 and value != 0 else f"{value:.{digits}f}"
    return str(value)


def markdown_models(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | backend | tool | fold time (ms) | BN left | max abs err | max rel err | "
        "latency ms (median) | speed-up | ORT no-opt latency ms |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    baseline: dict[tuple[str, str], float] = {}
    for row in rows:
        if row["tool"] == "none (unfolded)":
            baseline[(row["model"], row["backend"])] = row["latency_ms"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['backend']} | {row['tool']} | {row['error']} |||||||")
            continue
        base = baseline.get((row["model"], row["backend"]))
        speedup = base / row["latency_ms"] if base else None
        lines.append(
            f"| {row['model']} | {row['backend']} | {row['tool']} | {fmt(row['fold_ms'], 0)} | "
            f"{row['bn_left']} | {fmt(row['max_abs_err'])} | "
            f"{fmt(row['max_abs_err'] / row['output_scale'] if row['output_scale'] else None)} | "
            f"{fmt(row['latency_ms'])} | "
            f"{fmt(speedup)}x | {fmt(row.get('latency_noopt_ms'))} |"
        )
    return "\n".join(lines)


def markdown_coverage(table: dict[str, dict[str, str]]) -> str:
    tools = list(next(iter(table.values())))
    lines = ["| pattern | " + " | ".join(tools) + " |", "|---|" + "---|" * len(tools)]
    for pattern, cells in table.items():
        lines.append(f"| {pattern} | " + " | ".join(cells[t] for t in tools) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20, help="timed runs per latency median")
    parser.add_argument("--models", default="resnet50,mobilenet_v3_large")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    args = parser.parse_args()
    print(f"versions: {versions()}; torch threads {torch.get_num_threads()}, ORT intra-op threads 2\n")
    rows = [row for name in args.models.split(",") for row in bench_model(name, args.runs)]
    print(markdown_models(rows))
    print("\nPyTorch patterns (folded = no BatchNorm left and outputs equal; left = BatchNorm kept)\n")
    torch_table = torch_coverage()
    print(markdown_coverage(torch_table))
    print("\nONNX patterns\n")
    onnx_table = onnx_coverage()
    print(markdown_coverage(onnx_table))
    if args.json:
        args.json.write_text(
            json.dumps({"rows": rows, "torch_patterns": torch_table, "onnx_patterns": onnx_table}, indent=2)
        )


if __name__ == "__main__":
    main()
