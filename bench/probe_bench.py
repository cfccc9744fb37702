"""Probe overhead against the bare training step, CLI start-up, and scaling (issue 9).

    python bench/probe_bench.py                 # every benchmark, results to bench/results/
    python bench/probe_bench.py --quick         # a small smoke version (what the test suite runs)

Ratios are measured side by side in one process, interleaved (bare, probe, bare, probe, ...), and
reported as the median of the per-pair ratios, so drifting machine load hits both alike. Peak
memory is measured in fresh subprocesses (one per measurement) as the growth of the peak resident
set over the process's resident set just before the step, so the model's own weights and the
Python/torch baseline cancel out.
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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))


# ---- models -----------------------------------------------------------------------------------


def build(name: str) -> tuple[Any, dict[str, Any], Callable[[Any, Any], Any]]:
    """(model, probe inputs as kwargs for ProbeOptions, bare loss function(model, batch))."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    if name.startswith("resnet"):
        import torchvision

        arch, batch, side = [*name.split(":"), "16", "224"][:3]
        model = torchvision.models.get_model(arch, weights=None).eval()
        shape = (int(batch), 3, int(side), int(side))

        def bare(m: Any, x: Any) -> Any:
            out = m(x)
            labels = torch.randint(0, out.shape[1], (out.shape[0],))
            return F.cross_entropy(out, labels)

        return model, {"shape": shape}, bare
    if name.startswith("bert"):
        import transformers

        _, batch, seq = [*name.split(":"), "8", "128"][:3]
        config = transformers.BertConfig()  # BERT-base: 12 layers, 768 wide, 110M parameters
        model = transformers.BertModel(config).eval()
        shape = (int(batch), int(seq))

        def bare(m: Any, x: Any) -> Any:
            out = m(input_ids=x, attention_mask=torch.ones_like(x)).last_hidden_state
            return (out - torch.randn_like(out)).pow(2).mean()

        return model, {"shape": shape, "seq": int(seq)}, bare
    if name.startswith("mlp"):
        _, width, depth, batch = name.split(":")
        w, d = int(width), int(depth)
        layers: list[Any] = []
        for _ in range(d):
            layers += [torch.nn.Linear(w, w), torch.nn.ReLU()]
        model = torch.nn.Sequential(*layers, torch.nn.Linear(w, 10)).eval()
        shape = (int(batch), w)

        def bare(m: Any, x: Any) -> Any:
            out = m(x)
            return F.cross_entropy(out, torch.randint(0, 10, (out.shape[0],)))

        return model, {"shape": shape}, bare
    raise SystemExit(f"unknown model {name}")


def make_input(name: str, spec: dict[str, Any]) -> Any:
    import torch

    generator = torch.Generator().manual_seed(0)
    if name.startswith("bert"):
        return torch.randint(0, 30522, spec["shape"], generator=generator)
    return torch.randn(spec["shape"], generator=generator)


def step_functions(name: str) -> tuple[Callable[[], None], Callable[[], None], int]:
    from gradcheck_cli import api
    from gradcheck_cli.probe.batch import InputOptions
    from gradcheck_cli.probe.options import LossKind, ProbeOptions

    model, spec, loss_of = build(name)
    x = make_input(name, spec)

    def bare() -> None:
        model.zero_grad(set_to_none=True)
        loss_of(model, x).backward()

    if name.startswith("bert"):
        options = ProbeOptions(inputs=InputOptions(batch_size=spec["shape"][0], seq_len=spec["seq"]),
                               loss=LossKind.MSE)
    else:
        options = ProbeOptions(inputs=InputOptions(input_shapes=(spec["shape"],)))

    def probe() -> None:
        api.inspect_module(model, options)

    return bare, probe, sum(p.numel() for p in model.parameters())


# ---- measurements -----------------------------------------------------------------------------


def interleaved(name: str, repeats: int) -> dict[str, Any]:
    bare, probe, params = step_functions(name)
    bare()
    probe()  # warm-up: allocator, thread pools, lazy imports
    bare_times, probe_times, ratios = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        bare()
        bare_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        probe()
        probe_times.append(time.perf_counter() - start)
        ratios.append(probe_times[-1] / bare_times[-1])
    return {"model": name, "parameters": params, "repeats": repeats,
            "bare_median_s": statistics.median(bare_times), "probe_median_s": statistics.median(probe_times),
            "bare_range_s": [min(bare_times), max(bare_times)], "probe_range_s": [min(probe_times), max(probe_times)],
            "time_ratio_median": statistics.median(ratios), "time_ratio_range": [min(ratios), max(ratios)]}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(name: str, which: str) -> None:
    """Run in a subprocess: print the peak-RSS growth of one bare step or one probe.

    The process's lifetime peak (ru_maxrss) may come from building the model, so a thread samples
    the resident set every millisecond during the step instead.
    """
    import threading

    bare, probe, _ = step_functions(name)
    before = _rss_bytes()
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    (bare if which == "bare" else probe)()
    done.set()
    sampler.join()
    peak = max(peak, _rss_bytes())
    print(json.dumps({"growth": peak - before, "peak": peak,
                      "lifetime_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def peak_memory(name: str, repeats: int) -> dict[str, Any]:
    results: dict[str, list[int]] = {"bare": [], "probe": []}
    for _ in range(repeats):
        for which in ("bare", "probe"):
            out = subprocess.run([sys.executable, __file__, "--memory-child", name, which], capture_output=True,
                                 text=True, check=True, cwd=ROOT)
            results[which].append(json.loads(out.stdout.strip().splitlines()[-1])["growth"])
    bare, probe = statistics.median(results["bare"]), statistics.median(results["probe"])
    return {"model": name, "bare_growth_mb": bare / 2**20, "probe_growth_mb": probe / 2**20,
            "memory_ratio": probe / bare if bare else None}


def command_time(argv: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=False, cwd=ROOT)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cli_times(repeats: int) -> dict[str, Any]:
    gradcheck = [sys.executable, "-m", "gradcheck_cli"]
    help_time = command_time([*gradcheck, "--help"], repeats)
    usage_time = command_time([*gradcheck, "inspect"], repeats)
    import_torch = command_time([sys.executable, "-c", "import torch"], repeats)
    inspect_time = command_time([*gradcheck, "inspect", "samples/relu_healthy.pt2"], repeats)
    return {"help_s": help_time, "usage_error_s": usage_time, "import_torch_s": import_torch,
            "inspect_sample_s": inspect_time, "inspect_minus_import_torch_s": inspect_time - import_torch}


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0]
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}, load average at start {load:.1f}")


def markdown(results: dict[str, Any]) -> str:
    lines = [f"Machine: {results['machine']}", ""]
    lines += ["| model | parameters | bare step (median) | probe (median) | time ratio (median, min-max) |",
              "|---|---:|---:|---:|---:|"]
    for row in results["time"]:
        lo, hi = row["time_ratio_range"]
        lines.append(f"| {row['model']} | {row['parameters']:,} | {row['bare_median_s']:.3f} s | "
                     f"{row['probe_median_s']:.3f} s | {row['time_ratio_median']:.3f} ({lo:.3f}-{hi:.3f}) |")
    if results.get("memory"):
        lines += ["", "| model | bare step peak-RSS growth | probe peak-RSS growth | ratio |", "|---|---:|---:|---:|"]
        for row in results["memory"]:
            ratio = f"{row['memory_ratio']:.3f}" if row["memory_ratio"] else "—"
            lines.append(f"| {row['model']} | {row['bare_growth_mb']:.0f} MB | "
                         f"{row['probe_growth_mb']:.0f} MB | {ratio} |")
    if results.get("cli"):
        c = results["cli"]
        lines += ["", "| command | median wall time |", "|---|---:|",
                  f"| `gradcheck --help` | {c['help_s']:.3f} s |",
                  f"| `gradcheck inspect` (usage error) | {c['usage_error_s']:.3f} s |",
                  f"| `python -c 'import torch'` | {c['import_torch_s']:.3f} s |",
                  f"| `gradcheck inspect samples/relu_healthy.pt2` | {c['inspect_sample_s']:.3f} s "
                  f"(import torch + {c['inspect_minus_import_torch_s']:.3f} s) |"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models, one repeat: a smoke test")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--models", nargs="*", help="override the model list (resnet50:16:224, bert:8:128, "
                        "mlp:WIDTH:DEPTH:BATCH)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-cli", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--memory-child", nargs=2, metavar=("MODEL", "WHICH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    if args.quick:
        models, repeats = args.models or ["mlp:64:4:8", "resnet18:2:64"], 1
    else:
        models, repeats = args.models or ["resnet50:16:224", "bert:8:128"], args.repeats
    results: dict[str, Any] = {"machine": machine(), "time": [], "memory": []}
    for name in models:
        print(f"timing {name} ...", file=sys.stderr, flush=True)
        results["time"].append(interleaved(name, repeats))
        if not args.no_memory:
            print(f"memory {name} ...", file=sys.stderr, flush=True)
            results["memory"].append(peak_memory(name, 1 if args.quick else 3))
    if not args.no_cli:
        results["cli"] = cli_times(1 if args.quick else 5)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "probe_bench.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (args.out / "probe_bench.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
