"""The statistics pass: the probe's eager reductions against its compiled one-pass kernels (issue 18).

    python bench/stats_pass.py                      # ResNet-50 at batch 16, results to bench/results/
    python bench/stats_pass.py --batch-size 2       # a smaller, quicker version

Every activation a ResNet-50 probe reduces (the outputs of its convolutions, BatchNorms and ReLUs,
captured by forward hooks at the given batch) is reduced two ways, in one process, interleaved,
by the recorder's own code (`Recorder._reduce`, ReLU outputs per channel as the probe does):

* **eager**: `statistics_pass` eager (extremes, a sum or the units' sums, a BLAS dot for Σx²);
* **compiled**: `statistics_pass` compiled (probe/compiled.py: one torch.compile'd loop per
  whole-tensor output; ReLU outputs keep the eager unit sums), once with no size threshold and
  once with the shipped `MIN_ELEMENTS`.

Reported: the median over repeats of each way's total for all the tensors (one micro-batch's
forward statistics), the same split by tensor size (which sets `MIN_ELEMENTS`), and what compiling
costs a fresh process beyond importing torch: importing `torch._dynamo`, then the first calls with
an empty inductor cache (cold) and with the cache the cold run filled (warm), each in its own
subprocess. The break-even is the number of micro-batches after which the compiled pass has
saved its own cost.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

_COMPILE_CHILD = """
import sys, time
import torch
start = time.perf_counter()
import torch._dynamo
imported = time.perf_counter()
from gradcheck_cli.probe.compiled import CompiledStatistics
kernels = CompiledStatistics(min_elements=0)
kernels.reduce(torch.randn(1 << 20))
kernels.reduce(torch.randn(3 << 19))  # a second size: the kernel is compiled for any length
done = time.perf_counter()
assert kernels.tensors == 2, kernels.note()
print(imported - start, done - imported)
"""

# Size buckets (elements) for the split that sets MIN_ELEMENTS.
_BUCKETS = ((0, 1 << 20), (1 << 20, 2 << 20), (2 << 20, 4 << 20), (4 << 20, 1 << 62))


def activations(batch: int) -> list[tuple[Any, int | None]]:
    """The outputs a ResNet-50 probe reduces, as fresh tensors of the same shapes and values, each
    with the unit axis the probe reduces it along (channels, for a ReLU's)."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    captured: list[tuple[Any, int | None]] = []

    def keep(module: Any, _args: Any, output: Any) -> None:
        captured.append((output.detach().clone(), 1 if isinstance(module, torch.nn.ReLU) else None))

    kinds = (torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.ReLU, torch.nn.Linear)
    handles = [m.register_forward_hook(keep) for m in model.modules() if isinstance(m, kinds)]
    with torch.no_grad():
        model(torch.randn(batch, 3, 224, 224))
    for handle in handles:
        handle.remove()
    return captured


def steady_state(batch: int, repeats: int) -> dict[str, Any]:
    from gradcheck_cli.probe import compiled as compiled_pass
    from gradcheck_cli.probe.compiled import CompiledStatistics
    from gradcheck_cli.probe.recorder import Recorder

    tensors = activations(batch)
    ways = {
        "eager": None,
        "compiled_all": CompiledStatistics(min_elements=0),
        "compiled": CompiledStatistics(),
    }
    recorders = {}
    for label, kernels in ways.items():
        recorders[label] = Recorder(saturation_cutoff=0.01)
        recorders[label].compiled = kernels

    def reduce_all(label: str, times: list[float] | None = None) -> None:
        recorder = recorders[label]
        for tensor, axis in tensors:
            start = time.perf_counter()
            recorder._reduce(tensor, tensor, axis)
            if times is not None:
                times.append(time.perf_counter() - start)

    for label in ways:
        reduce_all(label)
        reduce_all(label)  # shapes that recompile do so here, outside the timing
    totals: dict[str, list[float]] = {label: [] for label in ways}
    per_tensor: dict[str, list[list[float]]] = {label: [] for label in ways}
    for _ in range(repeats):
        for label in ways:
            times: list[float] = []
            start = time.perf_counter()
            reduce_all(label, times)
            totals[label].append(time.perf_counter() - start)
            per_tensor[label].append(times)
    buckets = []
    for low, high in _BUCKETS:
        # Whole-tensor rows only: ReLU outputs take the eager passes either way.
        chosen = [i for i, (t, axis) in enumerate(tensors) if axis is None and low <= t.numel() < high]
        row: dict[str, Any] = {"from_elements": low, "tensors": len(chosen)}
        for label in ("eager", "compiled_all"):
            row[f"{label}_s"] = statistics.median(sum(run[i] for i in chosen) for run in per_tensor[label])
        buckets.append(row)
    large = [t for t, axis in tensors if axis is None and t.numel() >= compiled_pass.MIN_ELEMENTS]
    result: dict[str, Any] = {
        "tensors": len(tensors),
        "megabytes": sum(t.numel() * t.element_size() for t, _ in tensors) / 2**20,
        "min_elements": compiled_pass.MIN_ELEMENTS,
        "large_tensors": len(large),
        "large_bytes": sum(t.numel() * t.element_size() for t in large),
        "buckets": buckets,
    }
    for label in ways:
        result[f"{label}_s"] = statistics.median(totals[label])
        result[f"{label}_range_s"] = [min(totals[label]), max(totals[label])]
    return result


def compile_cost() -> dict[str, float]:
    """Import and first-call seconds of a fresh process, with an empty inductor cache and again with
    the cache that run filled."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        out: dict[str, float] = {}
        for label in ("cold", "warm"):
            done = subprocess.run(
                [sys.executable, "-c", _COMPILE_CHILD], capture_output=True, text=True, check=True, env=env, cwd=ROOT
            )
            imported, compiled = (float(v) for v in done.stdout.split())
            out[f"{label}_import_s"] = imported
            out[f"{label}_compile_s"] = compiled
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()

    import torch

    result: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), load average at start {os.getloadavg()[0]:.1f}",
        "batch": args.batch_size,
        **steady_state(args.batch_size, args.repeats),
        **compile_cost(),
    }
    saved = result["eager_s"] - result["compiled_s"]
    for label in ("cold", "warm"):
        cost = result[f"{label}_import_s"] + result[f"{label}_compile_s"]
        result[f"{label}_break_even_batches"] = cost / saved if saved > 0 else None
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stats_pass.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"Machine: {result['machine']}")
    print(f"ResNet-50, batch {args.batch_size}: {result['tensors']} activations, {result['megabytes']:.0f} MB")
    print("| pass | median for all activations (min-max) |")
    print("|---|---:|")
    names = {
        "eager": "eager",
        "compiled_all": "compiled, every tensor",
        "compiled": f"compiled from {result['min_elements']:,} elements (shipped)",
    }
    for label, name in names.items():
        low, high = result[f"{label}_range_s"]
        print(f"| {name} | {result[f'{label}_s'] * 1e3:.1f} ms ({low * 1e3:.1f}-{high * 1e3:.1f}) |")
    print("\n| whole-tensor rows of | tensors | eager | compiled |")
    print("|---|---:|---:|---:|")
    for row in result["buckets"]:
        print(
            f"| from {row['from_elements']:,} | {row['tensors']} | {row['eager_s'] * 1e3:.1f} ms "
            f"| {row['compiled_all_s'] * 1e3:.1f} ms |"
        )
    print(
        f"\nshipped threshold: {result['large_tensors']} whole-tensor rows, {result['large_bytes'] / 1e6:.0f} MB; "
        f"saved {saved * 1e3:.1f} ms per micro-batch ({saved / result['large_bytes']:.3g} s per byte)"
    )
    for label in ("cold", "warm"):
        even = result[f"{label}_break_even_batches"]
        print(
            f"{label} cache: import {result[f'{label}_import_s']:.2f} s + first calls "
            f"{result[f'{label}_compile_s']:.2f} s; break-even after "
            + (f"{even:.0f} micro-batches" if even is not None else "never (no saving)")
        )


if __name__ == "__main__":
    main()
