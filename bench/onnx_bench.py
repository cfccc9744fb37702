"""Benchmark the ONNX probe against its baselines: statistics pass vs plain onnxruntime inference,
and gradient lowering vs the PyTorch probe of the source model (issue 9's targets: <= 2.0x, <= 1.5x).

For each torchvision model (``weights=None``, exported with the legacy exporter at opset 17,
BatchNorm kept so every Conv, BatchNormalization and Relu is a row), several children run, each
in a fresh subprocess:

- memory children, one configuration each, so that peak RSS is that configuration's alone
  (both the process's ``ru_maxrss`` and the peak during the pass itself, VmHWM reset just
  before it, session creation included): ``plain`` (one onnxruntime inference of the unmodified graph),
  ``in-graph`` (gradcheck's statistics pass: reduction nodes added to the graph, one session,
  one run), ``exposed`` (the old path: every row value exposed as an output, in groups under the
  byte budget, each reduced by the probe's Recorder);
- ``time``: plain inference and the in-graph statistics pass interleaved, ``--repeats`` times,
  in one process (medians; ratios are of medians from the same run), compared two ways: warm
  runs of sessions created beforehand, and cold (a new session and its first run: plain
  inference as a one-off command does it, against gradcheck's whole statistics pass, which
  builds the reduced graph and its session each time);
- ``grad``: the PyTorch probe of the source module (``api.inspect_module``: forward statistics,
  backward, gradient norms) and the ONNX probe's lowering part (``run._lowered_gradients``:
  lowering the graph to torch, forward with gradient hooks, backward, cross-check against
  onnxruntime's outputs) interleaved on the same batch, ``--repeats`` times.

    nice -n 10 python -u bench/onnx_bench.py --models resnet50 --batch-size 8 --size 224 --repeats 5
    python bench/onnx_bench.py --quick --json onnx.json     # smoke: resnet18, batch 2, 32x32, 1 repeat

``--json PATH`` also writes the children's results as ``{"models": {model: {mode: result}},
"failures": {model: {mode: stderr tail}}, "machine": ..., "load_average": {"start", "end"}, ...}``
(bench/run_all.py reads it and renders the same tables with ``report_lines``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

MODES = ("plain", "in-graph", "exposed", "time", "grad")


def reset_peak() -> float:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS and return that, in MiB, so
    the peak read later belongs to what ran in between (ru_maxrss would also hold the peak of
    loading torch and shape-inferring the model, which hides what the pass itself costs)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return _status("VmRSS")


def _status(key: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def source_module(name: str) -> Any:
    import torch
    import torchvision

    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None).eval()


def export(name: str, path: Path, size: int) -> None:
    import torch

    model = source_module(name)
    torch.save(model.state_dict(), path.with_suffix(".pt"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.randn(1, 3, size, size),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            dynamic_axes={"x": {0: "batch"}},
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
        )


def _plain_session(model: Any) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _in_graph(
    model: Any, values: list[str], wants: dict[str, Any], types: dict[str, Any], feeds: list[dict[str, Any]]
) -> Any:
    from gradcheck_cli.probe.onnx_stats import reduced_statistics_pass

    return reduced_statistics_pass(model, values, wants, types, feeds, opset=17, cutoff=0.05)


def _requests(plan: Any, types: dict[str, Any]) -> dict[str, Any]:
    from gradcheck_cli.probe.activations import RELU_FAMILY
    from gradcheck_cli.probe.onnx_stats import ValueRequest

    wants: dict[str, Any] = {}
    for p in plan.rows:
        request = wants.setdefault(p.output, ValueRequest(p.output))
        dims = types[p.output].dims
        if p.fn in RELU_FAMILY and dims:
            request.unit_axes.add(1 if len(dims) > 2 else len(dims) - 1)
    return wants


def child(path: Path, mode: str, name: str, batch: int, size: int, repeats: int, budget: int) -> dict[str, Any]:
    import numpy as np
    import onnx
    import torch

    from gradcheck_cli.onnx.ort_stats import sizes_of, statistics_pass, value_types
    from gradcheck_cli.onnx.plan import plan_rows
    from gradcheck_cli.probe.recorder import Recorder

    torch.set_num_threads(os.cpu_count() or 1)
    model = onnx.load(str(path))
    shape = (batch, 3, size, size)
    feeds = [{"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}]
    plan = plan_rows(model.graph)
    values = list(dict.fromkeys(p.output for p in plan.rows))
    types = value_types(model, {"x": shape})
    sizes = sizes_of(types)
    wants = _requests(plan, types)
    result: dict[str, Any] = {
        "mode": mode,
        "nodes": len(model.graph.node),
        "rows": len(plan.rows),
        "row_output_mib": sum(sizes.get(v, 0) for v in values) / 2**20,
    }
    times: dict[str, list[float]] = {}

    def timed(key: str, fn: Any) -> Any:
        start = time.perf_counter()
        out = fn()
        times.setdefault(key, []).append(time.perf_counter() - start)
        return out

    result["rss_before_run_mib"] = reset_peak() if mode in ("plain", "in-graph", "exposed") else None
    if mode == "plain":
        session = _plain_session(model)
        for _ in range(repeats):
            timed("run", lambda: session.run(None, feeds[0]))
    elif mode == "in-graph":
        for _ in range(repeats):
            reduced = timed("run", lambda: _in_graph(model, values, wants, types, feeds))
            assert not reduced.exposed, reduced.exposed
    elif mode == "exposed":
        for _ in range(repeats):
            recorder = Recorder(saturation_cutoff=0.05)
            rows = {p.output: recorder.row(p.name, type=p.type, kind=p.kind, module="", fn=p.fn) for p in plan.rows}

            def record(
                name: str, tensor: torch.Tensor, rows: dict[str, Any] = rows, recorder: Recorder = recorder
            ) -> None:
                recorder.record_output(rows[name], tensor)

            end_batch = recorder.end_batch
            out = timed(
                "run",
                lambda: statistics_pass(model, values, feeds, record, sizes=sizes, budget=budget, end_batch=end_batch),  # noqa: B023 (called at once)
            )
            result["groups"] = out.groups
    elif mode == "time":
        session = timed("plain_session", lambda: _plain_session(model))
        session.run(None, feeds[0])  # warm-up
        _in_graph(model, values, wants, types, feeds)
        import onnxruntime as ort

        from gradcheck_cli.probe.onnx_stats import reduced_model, session_options

        reduced, _ = reduced_model(model, list(wants.values()), types, opset=17, cutoff=0.05)
        stats_session = ort.InferenceSession(
            reduced.SerializeToString(), session_options(ort), providers=["CPUExecutionProvider"]
        )
        names = [o.name for o in reduced.graph.output]
        for _ in range(repeats):
            timed("plain", lambda: session.run(None, feeds[0]))
            timed("plain_cold", lambda: _plain_session(model).run(None, feeds[0]))
            timed("in_graph", lambda: _in_graph(model, values, wants, types, feeds))
            timed("in_graph_run", lambda: stats_session.run(names, feeds[0]))
    elif mode == "grad":
        grad_times(path, name, model, plan, batch, size, repeats, timed)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["run_peak_rss_mib"] = _status("VmHWM")
    result["median_s"] = {key: statistics.median(values) for key, values in times.items()}
    result["times_s"] = times
    return result


def grad_times(path: Path, name: str, model: Any, plan: Any, batch: int, size: int, repeats: int, timed: Any) -> None:
    import torch

    from gradcheck_cli import api
    from gradcheck_cli.onnx.ort_stats import value_sizes
    from gradcheck_cli.options import InputOptions, ProbeOptions
    from gradcheck_cli.probe.onnx_probe import _feeds, _lowered_gradients, onnx_probe_inputs
    from gradcheck_cli.probe.recorder import Recorder

    module = source_module(name)
    module.load_state_dict(torch.load(path.with_suffix(".pt")))
    options = ProbeOptions(inputs=InputOptions(batch_size=batch, input_shape=((batch, 3, size, size),)))
    inputs, _ = onnx_probe_inputs(model, options, torch.device("cpu"))
    sizes = value_sizes(model, {"x": (batch, 3, size, size)})
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = [
        {o.name: torch.from_numpy(a) for o, a in zip(model.graph.output, session.run(None, f), strict=True)}
        for f in _feeds(inputs)
    ]

    def lowering() -> Any:
        recorder = Recorder(saturation_cutoff=options.saturation_cutoff)
        by_value: dict[str, list[Any]] = {}
        for p in plan.rows:
            by_value.setdefault(p.output, []).append(recorder.row(p.name, type=p.type, kind=p.kind, module="", fn=p.fn))
        check, _ = _lowered_gradients(
            model,
            17,
            plan,
            inputs,
            reference,
            options,
            torch.device("cpu"),
            recorder,
            by_value,
            lambda: None,
            sizes,
            None,
        )
        assert check.ok, check.reason
        return check

    api.inspect_module(module, options)  # warm-up (allocator, lazy imports)
    lowering()
    for _ in range(repeats):
        timed("torch_probe", lambda: api.inspect_module(module, options))
        timed("lowering", lowering)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget-mib", type=int, default=256)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: resnet18, batch 2, 32x32, one repeat (overrides those options)"
    )
    parser.add_argument("--json", type=Path, help="also write every child's result to this file")
    parser.add_argument("--child", nargs=3, metavar=("PATH", "MODE", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.models, args.batch_size, args.size, args.repeats = ["resnet18"], 2, 32, 1
    budget = args.budget_mib * 2**20
    if args.child:
        path, mode, name = args.child
        repeats = 1 if mode in ("plain", "in-graph", "exposed") else args.repeats
        print(json.dumps(child(Path(path), mode, name, args.batch_size, args.size, repeats, budget)))
        return
    load_start = os.getloadavg()[0]
    print(
        f"batch {args.batch_size}x3x{args.size}x{args.size}, medians of {args.repeats} interleaved repeats, "
        f"load average {load_start:.1f}",
        flush=True,
    )
    every: dict[str, dict[str, dict[str, Any]]] = {}
    failures: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models:
            path = Path(scratch) / f"{name}.onnx"
            export(name, path, args.size)
            results = every.setdefault(name, {})
            for mode in args.modes:
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        str(path),
                        mode,
                        name,
                        "--batch-size",
                        str(args.batch_size),
                        "--size",
                        str(args.size),
                        "--repeats",
                        str(args.repeats),
                        "--budget-mib",
                        str(args.budget_mib),
                    ],
                    capture_output=True,
                    text=True,
                )
                if out.returncode:
                    print(f"{name} {mode} failed:\n{out.stderr[-2000:]}", flush=True)
                    failures.setdefault(name, {})[mode] = out.stderr[-2000:]
                    continue
                results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"{name} {mode}: {json.dumps(results[mode])}", flush=True)
            lines = report_lines(name, results)
            if lines:
                print("\n".join(lines), flush=True)
        load_end = os.getloadavg()[0]
        print(f"load average at end {load_end:.1f}")
    if args.json:
        import onnxruntime
        import torch

        summary = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
            f"Python {platform.python_version()}",
            "load_average": {"start": load_start, "end": load_end},
            "batch_size": args.batch_size,
            "size": args.size,
            "repeats": args.repeats,
            "budget_mib": args.budget_mib,
            "modes": args.modes,
            "models": every,
            "failures": failures,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


def report_lines(name: str, results: dict[str, dict[str, Any]]) -> list[str]:
    """The Markdown tables of one model's results (printed by this script, embedded by run_all.py)."""
    lines = []
    if any(mode in results for mode in ("plain", "in-graph", "exposed")):
        lines += memory_table(name, results)
    return lines + time_tables(name, results)


def memory_table(name: str, results: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "",
        f"{name}: peak RSS per configuration (separate processes)",
        "",
        "| model | nodes | rows | row values (MiB) | configuration | groups | process peak RSS (MiB) | "
        "RSS before the pass (MiB) | peak during the pass (MiB) | added by the pass (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in ("plain", "in-graph", "exposed"):
        r = results.get(mode)
        if r:
            before, during = r["rss_before_run_mib"], r["run_peak_rss_mib"]
            lines.append(
                f"| {name} | {r['nodes']} | {r['rows']} | {r['row_output_mib']:.0f} | {mode} | "
                f"{r.get('groups', 1)} | {r['peak_rss_mib']:.0f} | {before:.0f} | {during:.0f} | "
                f"{during - before:.0f} |"
            )
    return lines


def time_tables(name: str, results: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    t = results.get("time")
    if t:
        m = t["median_s"]
        lines += [
            "",
            "| model | plain run (s) | pass run only (s) | x plain run | "
            "plain, new session + first run (s) | statistics pass, new session + first run (s) | x plain |",
            "|---|---|---|---|---|---|---|",
            f"| {name} | {m['plain']:.3f} | {m['in_graph_run']:.3f} | {m['in_graph_run'] / m['plain']:.2f} | "
            f"{m['plain_cold']:.3f} | {m['in_graph']:.3f} | {m['in_graph'] / m['plain_cold']:.2f} |",
        ]
    g = results.get("grad")
    if g:
        m = g["median_s"]
        lines += [
            "",
            "| model | PyTorch probe (s) | ONNX lowering (s) | x PyTorch probe |",
            "|---|---|---|---|",
            f"| {name} | {m['torch_probe']:.3f} | {m['lowering']:.3f} | {m['lowering'] / m['torch_probe']:.2f} |",
        ]
    return lines


if __name__ == "__main__":
    main()
