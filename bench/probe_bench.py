"""Probe overhead against the bare training step, CLI start-up, and scaling (issue 9).

    python bench/probe_bench.py                 # every benchmark, results to bench/results/
    python bench/probe_bench.py --quick         # a small smoke version
    python bench/probe_bench.py --no-cli --name scaling --models mlp:512:4:64 ...  # -> results/scaling.*

bench/run_all.py runs this (twice: overhead, then scaling) with the other benchmarks and
summarises the results against issue 9's targets.

Ratios are measured side by side in one process, interleaved (bare, probe, bare, probe, ...), and
reported as the median of the per-pair ratios, so drifting machine load hits both alike. Peak
memory is measured in fresh subprocesses (one per measurement) as the growth of the peak resident
set over the process's resident set just before the step, so the model's own weights and the
Python/torch baseline cancel out: once with glibc's defaults, and once with glibc handing freed
memory back at once (RETURNED_HEAP), where the resident set follows the bytes each step holds.
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

        kind, batch, seq = [*name.split(":"), "8", "128"][:3]
        if kind == "bert-tiny":  # the smoke run's stand-in: 2 layers, 64 wide, same code path
            config = transformers.BertConfig(
                hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128
            )
        else:
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


# The probe's `statistics_pass` (auto, compiled or eager), set by --statistics-pass; memory children
# get it on their command line.
STATISTICS_PASS = "auto"


def step_functions(
    name: str, statistics_pass: str | None = None
) -> tuple[Callable[[], None], Callable[[], None], Callable[[Callable[[], None]], float], int]:
    from gradcheck_cli import api
    from gradcheck_cli.options import InputOptions, LossKind, ProbeOptions, StatisticsPass

    model, spec, loss_of = build(name)
    x = make_input(name, spec)

    def bare() -> None:
        model.zero_grad(set_to_none=True)
        loss_of(model, x).backward()

    chosen = StatisticsPass(statistics_pass or STATISTICS_PASS)
    if name.startswith("bert"):
        inputs = InputOptions(batch_size=spec["shape"][0], seq_len=spec["seq"])
        options = ProbeOptions(inputs=inputs, loss=LossKind.MSE, statistics_pass=chosen)
    else:
        options = ProbeOptions(inputs=InputOptions(input_shape=(spec["shape"],)), statistics_pass=chosen)

    def probe() -> None:
        api.inspect_module(model, options)

    def timed(step: Callable[[], None]) -> float:
        # Every timed step starts from a model without .grad, as a loaded checkpoint is: gradients
        # left by the previous step would be freed inside the bare step's zero_grad, and held by the
        # probe (which restores them afterwards) while it allocates its own, which cost the 1B MLP
        # 0.7 s of memory traffic that no real run of the probe has.
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        step()
        return time.perf_counter() - start

    return bare, probe, timed, sum(p.numel() for p in model.parameters())


# ---- measurements -----------------------------------------------------------------------------


def interleaved(name: str, repeats: int, compare_compiled: bool = False) -> dict[str, Any]:
    """Bare steps and probes, alternated; with ``compare_compiled``, a probe with the compiled
    statistics pass (on a second copy of the model, built from the same seed) after each pair,
    so that all three see the same state of a shared machine."""
    bare, probe, timed, params = step_functions(name)
    bare()
    probe()  # warm-up: allocator, thread pools, lazy imports
    compiled: tuple[Callable[[], None], Callable[[Callable[[], None]], float]] | None = None
    if compare_compiled:
        _, compiled_probe, compiled_timed, _ = step_functions(name, "compiled")
        compiled_probe()  # compiles here, outside the timing
        compiled = (compiled_probe, compiled_timed)
    bare_times, probe_times, ratios, compiled_times, compiled_ratios = [], [], [], [], []
    for _ in range(repeats):
        bare_times.append(timed(bare))
        probe_times.append(timed(probe))
        ratios.append(probe_times[-1] / bare_times[-1])
        if compiled is not None:
            compiled_times.append(compiled[1](compiled[0]))
            compiled_ratios.append(compiled_times[-1] / bare_times[-1])
    extra: dict[str, Any] = {}
    if compiled_times:
        extra = {
            "compiled_probe_median_s": statistics.median(compiled_times),
            "compiled_time_ratio_median": statistics.median(compiled_ratios),
            "compiled_time_ratio_range": [min(compiled_ratios), max(compiled_ratios)],
        }
    return {
        **extra,
        "model": name,
        "parameters": params,
        "repeats": repeats,
        "bare_median_s": statistics.median(bare_times),
        "probe_median_s": statistics.median(probe_times),
        "bare_range_s": [min(bare_times), max(bare_times)],
        "probe_range_s": [min(probe_times), max(probe_times)],
        "time_ratio_median": statistics.median(ratios),
        "time_ratio_range": [min(ratios), max(ratios)],
    }


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


_MALLINFO2_FIELDS = [
    "arena",
    "ordblks",
    "smblks",
    "hblks",
    "hblkhd",
    "usmblks",
    "fsmblks",
    "uordblks",
    "fordblks",
    "keepcost",
]


def _allocator_in_use() -> Callable[[], int] | None:
    """Bytes the C allocator has handed out and not taken back (glibc's ``mallinfo2``: heap chunks
    in use plus mmapped blocks), or None off glibc.

    Peak RSS also counts freed memory the allocator keeps: glibc's heap holds on to freed chunks
    below its (adaptive, up to 32 MB) mmap threshold, so the same step's RSS growth moved by
    150 MB between runs here, while its bytes in use did not move at all. Both are reported.
    """
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(field, ctypes.c_size_t) for field in _MALLINFO2_FIELDS]

    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = MallInfo2

    def in_use() -> int:
        info = mallinfo2()
        return int(info.uordblks + info.hblkhd)

    return in_use


def memory_child(name: str, which: str) -> None:
    """Run in a subprocess: print the peak-RSS growth of one bare step or one probe, and the growth
    of the allocator's peak bytes in use.

    The process's lifetime peak (ru_maxrss) may come from building the model, so a thread samples
    the resident set every millisecond during the step instead.
    """
    import threading

    bare, probe, _, _ = step_functions(name)
    # Both children first probe a tiny model of the same family, so that neither step is charged
    # for the modules the probe imports on first use or for the library code it touches first
    # (file-backed pages in the resident set): on BERT-base that was 3.2 MB of code and a few MB of
    # Python modules, which a second probe in the same process would not pay again.
    _, warm_up, _, _ = step_functions(warm_up_model(name))
    warm_up()
    in_use = _allocator_in_use()
    before = _rss_bytes()
    peak = before
    used_before = used_peak = in_use() if in_use else 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak, used_peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            if in_use:
                used_peak = max(used_peak, in_use())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    (bare if which == "bare" else probe)()
    done.set()
    sampler.join()
    peak = max(peak, _rss_bytes())
    print(
        json.dumps(
            {
                "growth": peak - before,
                "in_use_growth": used_peak - used_before if in_use else None,
                "peak": peak,
                "lifetime_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            }
        )
    )


def warm_up_model(name: str) -> str:
    """The tiny model of ``name``'s family (as :func:`build` tells them apart) that each memory
    child probes before it measures (see memory_child)."""
    if name.startswith("bert"):
        return "bert-tiny:2:16"
    if name.startswith("resnet"):
        return "resnet18:2:32"
    return "mlp:16:2:4"


# glibc told to hand freed memory back at once: every allocation of 64 KB or more gets its own
# mapping, unmapped when freed (a fixed threshold, not the adaptive one), and the heap's top is
# trimmed on every free. The resident set then follows the bytes held, to the megabyte from one
# process to the next, where by default the same bare step's growth moved by 150 MB.
RETURNED_HEAP = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def peak_memory(name: str, repeats: int, heap: dict[str, str] | None = None) -> dict[str, Any]:
    results: dict[str, list[int]] = {"bare": [], "probe": []}
    in_use: dict[str, list[int]] = {"bare": [], "probe": []}
    for _ in range(repeats):
        for which in ("bare", "probe"):
            out = subprocess.run(
                [sys.executable, __file__, "--statistics-pass", STATISTICS_PASS, "--memory-child", name, which],
                capture_output=True,
                text=True,
                check=True,
                cwd=ROOT,
                env={**os.environ, **(heap or {})},
            )
            child = json.loads(out.stdout.strip().splitlines()[-1])
            results[which].append(child["growth"])
            if child.get("in_use_growth") is not None:
                in_use[which].append(child["in_use_growth"])
    bare, probe = statistics.median(results["bare"]), statistics.median(results["probe"])
    used = {k: statistics.median(v) if v else None for k, v in in_use.items()}
    # Per-round ratios give the spread; a round whose bare step grew nothing has no ratio.
    ratios = [p / b for b, p in zip(results["bare"], results["probe"], strict=True) if b]
    return {
        "model": name,
        "repeats": repeats,
        "heap": "returned" if heap else "default",
        "bare_growth_mb": bare / 2**20,
        "probe_growth_mb": probe / 2**20,
        "bare_growth_range_mb": [min(results["bare"]) / 2**20, max(results["bare"]) / 2**20],
        "probe_growth_range_mb": [min(results["probe"]) / 2**20, max(results["probe"]) / 2**20],
        "memory_ratio": probe / bare if bare else None,
        "memory_ratio_range": [min(ratios), max(ratios)] if ratios else None,
        "bare_in_use_growth_mb": used["bare"] / 2**20 if used["bare"] is not None else None,
        "probe_in_use_growth_mb": used["probe"] / 2**20 if used["probe"] is not None else None,
        "in_use_ratio": used["probe"] / used["bare"] if used["bare"] and used["probe"] is not None else None,
    }


def command_times(argv: list[str], repeats: int) -> list[float]:
    return [run_timed(argv)[0] for _ in range(repeats)]


def run_timed(argv: list[str], *, check: bool = False) -> tuple[float, float]:
    """(wall, CPU) seconds of one run of ``argv`` from the repository root. CPU is the child's user +
    system time: on a shared machine it moves less with the load than wall time does. ``check``:
    a command that fails is an error, not a (fast) timing."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=ROOT)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {done.returncode}: {done.stderr.strip()[-500:]}")
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def sample_commands() -> list[list[str]]:
    """The argument lists of the ``gradcheck inspect`` commands in samples/README.md, in order."""
    import shlex

    text = (ROOT / "samples" / "README.md").read_text()
    return [
        shlex.split(line.strip())[1:] for line in text.splitlines() if line.strip().startswith("gradcheck inspect ")
    ]


def cli_times(repeats: int, samples: list[list[str]] | None = None) -> dict[str, Any]:
    """`--help`, a usage error, and every sample's README command, each paired with a
    ``python -c "import torch"`` run just before it in the same round (rounds repeat the whole
    list), so that ``import torch + X`` is the median of per-pair differences and drifting load
    hits both members of a pair alike."""
    gradcheck = [sys.executable, "-m", "gradcheck_cli"]
    import_torch = [sys.executable, "-c", "import torch"]
    samples = sample_commands() if samples is None else samples
    help_times = command_times([*gradcheck, "--help"], repeats)
    usage_times = command_times([*gradcheck, "inspect"], repeats)
    torch_runs: list[tuple[float, float]] = []
    runs: dict[int, list[tuple[float, float, float, float]]] = {i: [] for i in range(len(samples))}
    for _ in range(repeats):
        for index, args in enumerate(samples):
            torch_wall, torch_cpu = run_timed(import_torch, check=True)
            wall, cpu = run_timed([*gradcheck, *args], check=True)
            torch_runs.append((torch_wall, torch_cpu))
            runs[index].append((wall, cpu, wall - torch_wall, cpu - torch_cpu))
    rows = []
    for index, args in enumerate(samples):
        wall, cpu, extra_wall, extra_cpu = (statistics.median(column) for column in zip(*runs[index], strict=True))
        walls, extras = [r[0] for r in runs[index]], [r[2] for r in runs[index]]
        rows.append(
            {
                "command": "gradcheck " + " ".join(args),
                "wall_s": wall,
                "cpu_s": cpu,
                "minus_import_torch_s": extra_wall,
                "cpu_minus_import_torch_s": extra_cpu,
                "wall_range_s": [min(walls), max(walls)],
                "minus_import_torch_range_s": [min(extras), max(extras)],
            }
        )
    return {
        "help_s": statistics.median(help_times),
        "help_range_s": [min(help_times), max(help_times)],
        "usage_error_s": statistics.median(usage_times),
        "usage_error_range_s": [min(usage_times), max(usage_times)],
        "repeats": repeats,
        "import_torch_s": statistics.median(w for w, _ in torch_runs),
        "import_torch_cpu_s": statistics.median(c for _, c in torch_runs),
        "load_average_after": os.getloadavg()[0],
        "samples": rows,
    }


def cli_markdown(c: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"| command | median wall time ({c['repeats']} runs) | import torch + | CPU time | import torch + (CPU) |",
        "|---|---:|---:|---:|---:|",
        f"| `gradcheck --help` | {c['help_s']:.3f} s | | | |",
        f"| `gradcheck inspect` (usage error) | {c['usage_error_s']:.3f} s | | | |",
        f"| `python -c 'import torch'` | {c['import_torch_s']:.3f} s | | {c['import_torch_cpu_s']:.3f} s | |",
    ]
    for row in c["samples"]:
        lines.append(
            f"| `{row['command']}` | {row['wall_s']:.3f} s | {row['minus_import_torch_s']:+.2f} s | "
            f"{row['cpu_s']:.3f} s | {row['cpu_minus_import_torch_s']:+.2f} s |"
        )
    lines.append(f"\nLoad average at the end of the CLI timings: {c['load_average_after']:.1f}.")
    return lines


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0]
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"Python {platform.python_version()}, load average at start {load:.1f}"
    )


def markdown(results: dict[str, Any]) -> str:
    lines = [f"Machine: {results['machine']}", f"Statistics pass: {results.get('statistics_pass', 'auto')}", ""]
    lines += [
        "| model | parameters | bare step (median) | probe (median) | time ratio (median, min-max) |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in results["time"]:
        lo, hi = row["time_ratio_range"]
        lines.append(
            f"| {row['model']} | {row['parameters']:,} | {row['bare_median_s']:.3f} s | "
            f"{row['probe_median_s']:.3f} s | {row['time_ratio_median']:.3f} ({lo:.3f}-{hi:.3f}) |"
        )
    compared = [row for row in results["time"] if "compiled_time_ratio_median" in row]
    if compared:
        lines += ["", "| model | probe, compiled pass (median) | time ratio (median, min-max) |", "|---|---:|---:|"]
        for row in compared:
            lo, hi = row["compiled_time_ratio_range"]
            lines.append(
                f"| {row['model']} | {row['compiled_probe_median_s']:.3f} s | "
                f"{row['compiled_time_ratio_median']:.3f} ({lo:.3f}-{hi:.3f}) |"
            )
    if results.get("memory"):
        lines += [
            "",
            "| model | glibc heap | bare step peak-RSS growth | probe peak-RSS growth | ratio (min-max) "
            "| bare step peak bytes in use | probe peak bytes in use | ratio |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in results["memory"]:
            ratio = f"{row['memory_ratio']:.3f}" if row["memory_ratio"] else "—"
            spread = row.get("memory_ratio_range")
            if spread:
                ratio += f" ({spread[0]:.3f}-{spread[1]:.3f})"
            used = [row.get(k) for k in ("bare_in_use_growth_mb", "probe_in_use_growth_mb", "in_use_ratio")]
            used_cells = f"{used[0]:.0f} MB | {used[1]:.0f} MB | {used[2]:.3f}" if None not in used else "— | — | —"
            lines.append(
                f"| {row['model']} | {row.get('heap', 'default')} | {row['bare_growth_mb']:.0f} MB "
                f"| {row['probe_growth_mb']:.0f} MB | {ratio} "
                f"| {used_cells} |"
            )
    if results.get("cli"):
        lines += cli_markdown(results["cli"])
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models, one repeat: a smoke test")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--models",
        nargs="*",
        help="override the model list (resnet50:16:224, bert:8:128, bert-tiny:BATCH:SEQ, mlp:WIDTH:DEPTH:BATCH)",
    )
    parser.add_argument(
        "--memory-repeats",
        type=int,
        help="fresh-process peak-memory measurements per model and step kind (default 3, 1 with --quick)",
    )
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-cli", action="store_true")
    parser.add_argument("--cli-repeats", type=int, help="rounds of CLI timings (default 5, 1 with --quick)")
    parser.add_argument(
        "--cli-samples",
        choices=("all", "first"),
        default="all",
        help="time every samples/README.md command, or only the first",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--name", default="probe_bench", help="file stem of the results: OUT/NAME.json, OUT/NAME.md")
    parser.add_argument(
        "--statistics-pass",
        choices=("auto", "compiled", "eager"),
        default="auto",
        help="the probe's statistics_pass (compiled: its compiling happens in the warm-up step)",
    )
    parser.add_argument(
        "--compare-compiled",
        action="store_true",
        help="also time a probe with the compiled statistics pass after each bare/probe pair",
    )
    parser.add_argument("--memory-child", nargs=2, metavar=("MODEL", "WHICH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    global STATISTICS_PASS
    STATISTICS_PASS = args.statistics_pass
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    if args.quick:
        models, repeats = args.models or ["mlp:64:4:8", "resnet18:2:64"], 1
    else:
        models, repeats = args.models or ["resnet50:16:224", "bert:8:128"], args.repeats
    memory_repeats = args.memory_repeats if args.memory_repeats is not None else 1 if args.quick else 3
    cli_repeats = args.cli_repeats if args.cli_repeats is not None else 1 if args.quick else 5
    if min(repeats, memory_repeats, cli_repeats) < 1:
        parser.error("repeat counts must be at least 1 (--no-memory and --no-cli skip those parts)")
    results: dict[str, Any] = {"machine": machine(), "statistics_pass": STATISTICS_PASS, "time": [], "memory": []}
    for name in models:
        print(f"timing {name} ...", file=sys.stderr, flush=True)
        results["time"].append(interleaved(name, repeats, args.compare_compiled))
        if not args.no_memory:
            print(f"memory {name} ...", file=sys.stderr, flush=True)
            results["memory"].append(peak_memory(name, memory_repeats))
            results["memory"].append(peak_memory(name, memory_repeats, RETURNED_HEAP))
    if not args.no_cli:
        samples = sample_commands()
        results["cli"] = cli_times(cli_repeats, samples[:1] if args.cli_samples == "first" else samples)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (args.out / f"{args.name}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
