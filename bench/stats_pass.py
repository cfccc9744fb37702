"""The statistics pass: the probe's eager reductions against a torch.compile'd one-loop kernel (issue 18).

    python bench/stats_pass.py                      # ResNet-50 at batch 16, results to bench/results/
    python bench/stats_pass.py --batch-size 2       # a smaller, quicker version

Every activation a ResNet-50 probe reduces (the outputs of its convolutions, BatchNorms and ReLUs,
captured by forward hooks at the given batch) is reduced two ways, in one process, interleaved:

* **eager**: what the probe runs on the CPU (`Recorder._reduce`: sum, BLAS dot for Σx², aminmax);
* **compiled**: `torch.compile(dynamic=True)` of one function returning the sum, the sum of
  squares, the minimum and the maximum of the flattened tensor, which inductor fuses into one loop.

Reported: the median over repeats of each way's total for all the tensors (one micro-batch's
forward statistics), and what compiling costs a fresh process beyond importing torch: importing `torch._dynamo`, then
the first call with an empty inductor cache (cold) and with the cache the cold run filled (warm), each
in its own subprocess. The break-even is the number of micro-batches after which the compiled pass
has saved its own cost.
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
def fused(flat):
    return flat.sum(), (flat * flat).sum(), flat.amin(), flat.amax()
kernel = torch.compile(fused, dynamic=True)
for size in (1 << 20, 3 << 19):
    kernel(torch.randn(size))
done = time.perf_counter()
print(imported - start, done - imported)
"""


def activations(batch: int) -> list[Any]:
    """The outputs a ResNet-50 probe reduces, as fresh tensors of the same shapes and values."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    captured: list[Any] = []

    def keep(_module: Any, _args: Any, output: Any) -> None:
        captured.append(output.detach().clone())

    kinds = (torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.ReLU, torch.nn.Linear)
    handles = [m.register_forward_hook(keep) for m in model.modules() if isinstance(m, kinds)]
    with torch.no_grad():
        model(torch.randn(batch, 3, 224, 224))
    for handle in handles:
        handle.remove()
    return captured


def steady_state(batch: int, repeats: int) -> dict[str, Any]:
    import torch

    from gradcheck_cli.probe.recorder import Recorder

    tensors = activations(batch)
    recorder = Recorder(saturation_cutoff=0.01)

    def fused(flat: Any) -> Any:
        return flat.sum(), (flat * flat).sum(), flat.amin(), flat.amax()

    kernel = torch.compile(fused, dynamic=True)

    def eager_all() -> None:
        for tensor in tensors:
            recorder._reduce(tensor, tensor, None)

    def compiled_all() -> None:
        for tensor in tensors:
            # Read back, as the eager path does, so both include the results' transfer to Python.
            [float(v) for v in kernel(tensor.reshape(-1))]

    eager_all()
    compiled_all()
    compiled_all()  # shapes that recompile (0/1-sized dims) do so here, outside the timing
    eager, compiled = [], []
    for _ in range(repeats):
        for runs, step in ((eager, eager_all), (compiled, compiled_all)):
            start = time.perf_counter()
            step()
            runs.append(time.perf_counter() - start)
    return {
        "tensors": len(tensors),
        "megabytes": sum(t.numel() * t.element_size() for t in tensors) / 2**20,
        "eager_s": statistics.median(eager),
        "compiled_s": statistics.median(compiled),
        "eager_range_s": [min(eager), max(eager)],
        "compiled_range_s": [min(compiled), max(compiled)],
    }


def compile_cost() -> dict[str, float]:
    """Import and first-call seconds of a fresh process, with an empty inductor cache and again with
    the cache that run filled."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        out: dict[str, float] = {}
        for label in ("cold", "warm"):
            done = subprocess.run(
                [sys.executable, "-c", _COMPILE_CHILD], capture_output=True, text=True, check=True, env=env
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
    for label in ("eager", "compiled"):
        low, high = result[f"{label}_range_s"]
        print(f"| {label} | {result[f'{label}_s'] * 1e3:.1f} ms ({low * 1e3:.1f}-{high * 1e3:.1f}) |")
    for label in ("cold", "warm"):
        even = result[f"{label}_break_even_batches"]
        print(
            f"{label} cache: import {result[f'{label}_import_s']:.2f} s + first calls "
            f"{result[f'{label}_compile_s']:.2f} s; break-even after "
            + (f"{even:.0f} micro-batches" if even is not None else "never (no saving)")
        )


if __name__ == "__main__":
    main()
