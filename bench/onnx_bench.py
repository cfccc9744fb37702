"""Benchmark the ONNX probe's onnxruntime statistics pass: peak memory and time.

For each model (torchvision ResNets exported with the legacy exporter, BatchNorm kept, so there
are many nodes), three configurations each run in a fresh subprocess so that peak RSS
(ru_maxrss) belongs to that configuration alone:

- ``plain``: one onnxruntime inference of the probe batch (the baseline);
- ``grouped``: gradcheck's statistics pass, row outputs exposed in groups under the byte budget;
- ``all``: the same pass with every row output exposed at once (no budget).

Times are medians of ``--repeats`` runs inside the child (session creation included for the
statistics pass, excluded for plain inference, which is what a user compares against).

    python bench/onnx_bench.py --models resnet18 resnet50 resnet101 --batch-size 8 --size 160
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any


def export(name: str, path: Path, size: int) -> None:
    import torch
    import torchvision

    model = getattr(torchvision.models, name)(weights=None).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, size, size),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], dynamic_axes={"x": {0: "batch"}},
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)


def child(path: Path, mode: str, batch: int, size: int, repeats: int, budget: int | None) -> dict[str, Any]:
    import numpy as np
    import onnx
    import onnxruntime as ort

    from gradcheck_cli.onnx.ort_stats import statistics_pass, value_sizes
    from gradcheck_cli.onnx.plan import plan_rows
    from gradcheck_cli.probe.recorder import Recorder

    model = onnx.load(str(path))
    feeds = [{"x": np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)}]
    plan = plan_rows(model.graph)
    values = list(dict.fromkeys(p.output for p in plan.rows))
    sizes = value_sizes(model, {"x": (batch, 3, size, size)})
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    groups = 1
    if mode == "plain":
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        session.run(None, feeds[0])  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            session.run(None, feeds[0])
            times.append(time.perf_counter() - start)
    else:
        import torch

        for _ in range(repeats):
            recorder = Recorder(saturation_cutoff=0.05)
            rows = {p.output: recorder.row(p.name, type=p.type, kind=p.kind, module="", fn=p.fn) for p in plan.rows}

            def record(name: str, tensor: torch.Tensor, rows: dict[str, Any] = rows,
                       recorder: Recorder = recorder) -> None:
                recorder.record_output(rows[name], tensor)

            start = time.perf_counter()
            result = statistics_pass(model, values, feeds, record, sizes=sizes, budget=budget,
                                     end_batch=recorder.end_batch)
            times.append(time.perf_counter() - start)
            groups = result.groups
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "nodes": len(model.graph.node), "rows": len(plan.rows), "groups": groups,
            "row_output_mib": sum(sizes.get(v, 0) for v in values) / 2**20,
            "peak_rss_mib": peak / 1024, "rss_before_mib": rss_before / 1024,
            "median_s": statistics.median(times), "times_s": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "resnet101"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget-mib", type=int, default=256)
    parser.add_argument("--child", nargs=2, metavar=("PATH", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    budget = args.budget_mib * 2**20
    if args.child:
        path, mode = args.child
        result = child(Path(path), mode, args.batch_size, args.size, args.repeats,
                       None if mode == "all" else budget)
        print(json.dumps(result))
        return
    print(f"batch {args.batch_size}x3x{args.size}x{args.size}, budget {args.budget_mib} MiB, "
          f"median of {args.repeats}")
    print("| model | nodes | rows | row outputs (MiB) | mode | groups | peak RSS (MiB) | median time (s) | x plain |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models:
            path = Path(scratch) / f"{name}.onnx"
            export(name, path, args.size)
            results = {}
            for mode in ("plain", "grouped", "all"):
                out = subprocess.run(
                    [sys.executable, __file__, "--child", str(path), mode, "--batch-size", str(args.batch_size),
                     "--size", str(args.size), "--repeats", str(args.repeats), "--budget-mib", str(args.budget_mib)],
                    capture_output=True, text=True, check=True)
                results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
            plain = results["plain"]["median_s"]
            for mode, r in results.items():
                print(f"| {name} | {r['nodes']} | {r['rows']} | {r['row_output_mib']:.0f} | {mode} | "
                      f"{r['groups'] if mode != 'plain' else '-'} | {r['peak_rss_mib']:.0f} | {r['median_s']:.2f} | "
                      f"{r['median_s'] / plain:.2f} |", flush=True)


if __name__ == "__main__":
    main()
