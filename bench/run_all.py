"""Every benchmark of issue 9 from one command, summarised against the issue's targets.

    python bench/run_all.py                          # the full run, results in bench/results/
    python bench/run_all.py --quick --out DIR        # smoke run: tiny stand-in models, one repeat,
                                                     # two parts at a time (tests/test_bench_smoke.py)

Each part runs as its own subprocess, so one that crashes loses only its own figures (its rows
say "not measured" and this script exits 1). A part's output goes to OUT/<part>.log and, with
the part's name in front, to stderr as it comes:

- ``probe``: bench/probe_bench.py on ResNet-50 (batch 16, 224x224) and BERT-base (batch 8,
  sequence 128): probe against bare training step, time and peak RSS; CLI start-up of
  ``--help``, a usage error and every samples/README.md command (-> probe_bench.json, .md);
- ``scaling``: bench/probe_bench.py on ReLU MLPs from 1 M to 1 B parameters and a batch sweep,
  no CLI (-> scaling.json, .md);
- ``onnx``: bench/onnx_bench.py on ResNet-50, every mode: statistics pass against plain
  onnxruntime, memory, gradient lowering against the PyTorch probe (-> onnx_bench.json);
- ``rewrite``: bench/rewrite_bench.py: ``gradcheck fold-bn`` (state_dict, .pt2, .onnx) and
  ``gradcheck reinit`` of ResNet-50 as whole commands (-> rewrite_bench.json, .md).

Then OUT/summary.json and OUT/summary.md: the machine, one row per target of the issue (median,
min-max, target, met / missed / not measured), the scaling table with a linearity statement,
and each part's own tables. ``--repeats`` is each part's count of timed repetitions (probe/bare
pairs, CLI rounds, ONNX repeats, rewrite runs); the ~1 B-parameter MLP takes about 20 s a step,
so the scaling part has its own, smaller counts.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCHEMA_VERSION = 1
PARTS = ("probe", "scaling", "onnx", "rewrite")
ONNX_MODES = ("plain", "in-graph", "exposed", "time", "grad")  # onnx_bench.MODES: every mode


@dataclass(frozen=True)
class Plan:
    """The models one run measures: the issue's own, or the smoke run's small stand-ins, which run
    the same code paths so that the harness and the summary cannot rot."""

    resnet: str  # probe_bench model specs
    bert: str
    scaling: tuple[str, ...]


FULL = Plan(
    resnet="resnet50:16:224",
    bert="bert:8:128",
    scaling=("mlp:512:4:64", "mlp:1600:4:64", "mlp:4096:6:64", "mlp:8192:15:16", "mlp:1600:4:16", "mlp:1600:4:256"),
)
# Two widths at one batch and two batches at one width: the least that gives both linearity fits.
QUICK = Plan(resnet="resnet18:2:64", bert="bert-tiny:2:16", scaling=("mlp:64:2:8", "mlp:128:2:8", "mlp:64:2:32"))


@dataclass(frozen=True)
class Target:
    id: str
    what: str
    limit: float
    unit: Literal["ratio", "s", "s over import torch"]
    inclusive: bool  # <= (True) or < (False)

    def text(self) -> str:
        if self.unit == "s over import torch":
            return f"import torch + {self.limit:g} s"
        sign = "≤" if self.inclusive else "<"
        return f"{sign} {self.limit:.2f}" if self.unit == "ratio" else f"{sign} {self.limit:g} s"


TARGETS = (
    Target(
        "probe-time-resnet50", "probe wall time / bare training step, ResNet-50 batch 16, 224x224", 1.10, "ratio", True
    ),
    Target(
        "probe-time-bert", "probe wall time / bare training step, BERT-base batch 8, sequence 128", 1.10, "ratio", True
    ),
    Target(
        "probe-memory-resnet50",
        "probe peak RSS / bare training step peak RSS, ResNet-50 batch 16, 224x224",
        1.10,
        "ratio",
        True,
    ),
    Target(
        "probe-memory-bert",
        "probe peak RSS / bare training step peak RSS, BERT-base batch 8, sequence 128",
        1.10,
        "ratio",
        True,
    ),
    Target("gpu-time-ratio", "probe wall time / bare training step on a GPU", 1.10, "ratio", True),
    Target(
        "onnx-stats-warm",
        "ONNX statistics pass / plain onnxruntime inference, sessions created beforehand",
        2.0,
        "ratio",
        True,
    ),
    Target(
        "onnx-stats-cold",
        "ONNX statistics pass / plain onnxruntime inference, new session + first run",
        2.0,
        "ratio",
        True,
    ),
    Target("onnx-lowering", "ONNX gradient lowering / PyTorch probe of the source model", 1.5, "ratio", True),
    Target("cli-help", "`gradcheck --help`, wall time", 0.5, "s", False),
    Target("cli-usage-error", "`gradcheck inspect` with no model (usage error), wall time", 0.5, "s", False),
    Target(
        "cli-inspect-first-sample",
        "`gradcheck inspect` of the README's first sample, wall time",
        1.5,
        "s over import torch",
        False,
    ),
    Target(
        "fold-bn-state_dict",
        "`gradcheck fold-bn` ResNet-50 state_dict + --arch, verification included, whole command",
        3.0,
        "s",
        False,
    ),
    Target("fold-bn-pt2", "`gradcheck fold-bn` ResNet-50 .pt2, verification included, whole command", 3.0, "s", False),
    Target(
        "fold-bn-onnx", "`gradcheck fold-bn` ResNet-50 .onnx, verification included, whole command", 3.0, "s", False
    ),
    Target("reinit-resnet50", "`gradcheck reinit` ResNet-50 (default scheme: auto), whole command", 3.0, "s", False),
)


@dataclass(frozen=True)
class Measurement:
    """One target's figure: ``median`` is None when it was not measured, and ``note`` says why."""

    median: float | None
    low: float | None = None
    high: float | None = None
    count: int | None = None  # how many values the median is of
    on: str = ""  # what was measured (the stand-in model of a quick run, the command)
    note: str = ""


def not_measured(why: str) -> Measurement:
    return Measurement(None, note=why)


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


# ---- running the parts ------------------------------------------------------------------------


def part_commands(args: argparse.Namespace, plan: Plan, out: Path) -> dict[str, list[str]]:
    python = [sys.executable, "-u"]
    repeats = str(args.repeats)
    probe = [
        *python,
        str(HERE / "probe_bench.py"),
        "--models",
        plan.resnet,
        plan.bert,
        "--repeats",
        repeats,
        "--memory-repeats",
        str(args.memory_repeats),
        "--cli-repeats",
        repeats,
        "--out",
        str(out),
    ]
    if args.quick:
        probe += ["--cli-samples", "first"]  # the README's first sample: the one with a target
    memory = ["--memory-repeats", str(args.scaling_memory_repeats)] if args.scaling_memory_repeats else ["--no-memory"]
    scaling = [
        *python,
        str(HERE / "probe_bench.py"),
        "--no-cli",
        "--name",
        "scaling",
        "--models",
        *plan.scaling,
        "--repeats",
        str(args.scaling_repeats),
        *memory,
        "--out",
        str(out),
    ]
    onnx = [*python, str(HERE / "onnx_bench.py"), "--modes", *ONNX_MODES, "--json", str(out / "onnx_bench.json")]
    onnx += (
        ["--quick"]
        if args.quick
        else ["--models", "resnet50", "--batch-size", "8", "--size", "224", "--repeats", repeats]
    )
    rewrite = [*python, str(HERE / "rewrite_bench.py"), "--out", str(out)]
    rewrite += ["--quick"] if args.quick else ["--runs", repeats]
    return {"probe": probe, "scaling": scaling, "onnx": onnx, "rewrite": rewrite}


RESULT_FILES = {
    "probe": "probe_bench.json",
    "scaling": "scaling.json",
    "onnx": "onnx_bench.json",
    "rewrite": "rewrite_bench.json",
}
MARKDOWN_FILES = {"probe": "probe_bench.md", "scaling": "scaling.md", "rewrite": "rewrite_bench.md"}


def display(argv: Sequence[str]) -> str:
    """The command as a person would type it from the repository root."""
    parts = ["python" if a == sys.executable else a for a in argv if a != "-u"]
    return shlex.join(os.path.relpath(a, ROOT) if a.startswith(str(ROOT)) else a for a in parts)


def run_part(name: str, argv: list[str], log: Path) -> dict[str, Any]:
    """Run one part, its output teed to ``log`` and (prefixed) to stderr; never raises for the
    part's own failure, which is recorded instead."""
    print(f"[run_all] {name}: {display(argv)}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    tail: list[str] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with (
        log.open("w") as sink,
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env) as child,
    ):
        assert child.stdout is not None  # stdout=PIPE
        for line in child.stdout:
            sink.write(line)
            sys.stderr.write(f"[{name}] {line}")
            tail = [*tail[-19:], line.rstrip()]
        returncode = child.wait()
    seconds = time.perf_counter() - start
    print(f"[run_all] {name}: exit {returncode} after {seconds:.0f} s", file=sys.stderr, flush=True)
    return {
        "command": display(argv),
        "returncode": returncode,
        "seconds": seconds,
        "log": log.name,
        "error": "\n".join(tail) if returncode else None,
    }


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data


# ---- the machine ------------------------------------------------------------------------------


def _command_output(argv: list[str]) -> str | None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def machine() -> dict[str, Any]:
    """What the figures depend on. Versions come from package metadata and torch's threads from a
    child, so that this process stays small and imports nothing the parts measure."""
    cpu = platform.processor() or platform.machine()
    ram_gib = None
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
        with open("/proc/meminfo") as handle:
            kib = next((int(line.split()[1]) for line in handle if line.startswith("MemTotal:")), None)
            ram_gib = None if kib is None else kib / 2**20
    except OSError:
        pass
    versions: dict[str, str | None] = {}
    for package in ("torch", "onnxruntime", "onnx", "torchvision", "transformers", "numpy", "gradcheck-cli"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    probe = _command_output(
        [
            sys.executable,
            "-c",
            "import json, torch; c = torch.cuda.is_available(); "
            "print(json.dumps({'threads': torch.get_num_threads(), 'cuda': c, "
            "'device': torch.cuda.get_device_name(0) if c else None}))",
        ]
    )
    torch_info = json.loads(probe) if probe else {"threads": None, "cuda": False, "device": None}
    commit = _command_output(["git", "rev-parse", "HEAD"])
    # --no-optional-locks: never take the index lock of a tree other people are working in.
    changes = _command_output(["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": ram_gib,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "torch_threads": torch_info["threads"],
        "thread_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
        "cuda_available": torch_info["cuda"],
        "cuda_device": torch_info["device"],
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "git_dirty": bool(changes) if changes is not None else None,
        "load_average_start": list(os.getloadavg()),
        "load_average_end": None,
    }


def machine_line(m: dict[str, Any]) -> str:
    v = m["versions"]
    ram = f"{m['ram_gib']:.0f} GiB RAM" if m["ram_gib"] else "RAM unknown"
    threads = f"{m['torch_threads']} torch threads" + (f" ({m['thread_env']})" if m["thread_env"] else "")
    gpu = f"CUDA device: {m['cuda_device']}" if m["cuda_available"] else "no CUDA device"
    commit = (m["git_commit"] or "unknown")[:12] + (" with uncommitted changes" if m["git_dirty"] else "")
    end = m["load_average_end"]
    load = f"load average (1 min) {m['load_average_start'][0]:.2f} at the start" + (
        f", {end[0]:.2f} at the end" if end else ""
    )
    return (
        f"{m['cpu']}, {m['cores']} cores, {ram}; {m['platform']}, Python {m['python']}; torch {v['torch']} "
        f"({threads}), onnxruntime {v['onnxruntime']}, onnx {v['onnx']}, torchvision {v['torchvision']}, "
        f"transformers {v['transformers']}; {gpu}.\n\n{m['date']}, commit {commit}; {load}."
    )


# ---- the targets ------------------------------------------------------------------------------


def _row(rows: list[dict[str, Any]] | None, key: str, value: str) -> dict[str, Any] | None:
    return next((row for row in rows or [] if row.get(key) == value), None)


def probe_time(probe: dict[str, Any] | None, model: str) -> Measurement:
    row = _row((probe or {}).get("time"), "model", model)
    if row is None:
        return not_measured(f"no timing of {model} (see the probe part)")
    lo, hi = row["time_ratio_range"]
    return Measurement(
        row["time_ratio_median"],
        lo,
        hi,
        row["repeats"],
        model,
        f"bare {row['bare_median_s']:.3f} s, probe {row['probe_median_s']:.3f} s (medians)",
    )


def probe_memory(probe: dict[str, Any] | None, model: str) -> Measurement:
    row = _row((probe or {}).get("memory"), "model", model)
    if row is None:
        return not_measured(f"no memory measurement of {model} (see the probe part)")
    if row["memory_ratio"] is None:
        return not_measured(f"the bare step of {model} grew the resident set by nothing: no ratio")
    lo, hi = row.get("memory_ratio_range") or (None, None)
    return Measurement(
        row["memory_ratio"],
        lo,
        hi,
        row.get("repeats"),
        model,
        f"peak-RSS growth: bare {row['bare_growth_mb']:.0f} MB, probe {row['probe_growth_mb']:.0f} MB (medians)",
    )


def gpu(m: dict[str, Any]) -> Measurement:
    if m["cuda_available"]:
        return not_measured(
            f"a CUDA device is present ({m['cuda_device']}), but this harness runs the CPU benchmarks only"
        )
    return not_measured("no CUDA device on this machine")


def _onnx_model(onnx: dict[str, Any] | None) -> tuple[str, dict[str, Any]] | None:
    models = (onnx or {}).get("models") or {}
    return next(iter(models.items()), None)


def onnx_ratio(onnx: dict[str, Any] | None, mode: str, numerator: str, denominator: str) -> Measurement:
    """The median and range of per-repeat ratios (each pair ran back to back in one process);
    onnx_bench's own table divides the medians instead, given here in the note."""
    first = _onnx_model(onnx)
    if onnx is None or first is None:
        return not_measured("no ONNX results (see the onnx part)")
    model, results = first
    if mode not in results:
        failed = (onnx.get("failures") or {}).get(model, {})
        return not_measured(f"the {mode!r} child " + ("failed (see onnx.log)" if mode in failed else "did not run"))
    times = results[mode]["times_s"]
    ratios = [a / b for a, b in zip(times[numerator], times[denominator], strict=True)]
    medians = results[mode]["median_s"]
    median, lo, hi = spread(ratios)
    on = f"{model}, batch {onnx['batch_size']}, {onnx['size']}x{onnx['size']}"
    return Measurement(
        median,
        lo,
        hi,
        len(ratios),
        on,
        f"{numerator} {medians[numerator]:.3f} s, {denominator} {medians[denominator]:.3f} s (medians; "
        f"ratio of medians {medians[numerator] / medians[denominator]:.2f})",
    )


def readme_first_inspect() -> str | None:
    """The first ``gradcheck inspect ...`` command of the top-level README (its quick start)."""
    for line in (ROOT / "README.md").read_text().splitlines():
        at = line.find("gradcheck inspect ")
        if at >= 0:
            return " ".join(shlex.split(line[at:]))
    return None


def cli_measurement(probe: dict[str, Any] | None, key: str, command: str) -> Measurement:
    cli = (probe or {}).get("cli")
    if cli is None:
        return not_measured("no CLI timings (see the probe part)")
    lo, hi = cli.get(f"{key}_range_s") or (None, None)
    return Measurement(cli[f"{key}_s"], lo, hi, cli["repeats"], f"`{command}`")


def cli_first_sample(probe: dict[str, Any] | None) -> Measurement:
    cli = (probe or {}).get("cli")
    command = readme_first_inspect()
    if cli is None or command is None:
        return not_measured(
            "no CLI timings (see the probe part)" if cli is None else "README.md has no `gradcheck inspect` command"
        )
    row = _row(cli["samples"], "command", command)
    if row is None:
        return not_measured(f"`{command}` (README.md's first) is not among the timed samples/README.md commands")
    lo, hi = row.get("minus_import_torch_range_s") or (None, None)
    return Measurement(
        row["minus_import_torch_s"],
        lo,
        hi,
        cli["repeats"],
        f"`{command}`",
        f"wall {row['wall_s']:.2f} s, import torch {cli['import_torch_s']:.2f} s (medians; the "
        "difference is the median of per-round differences)",
    )


def rewrite_case(rewrite: dict[str, Any] | None, case: str) -> Measurement:
    row = _row((rewrite or {}).get("rows"), "case", case)
    if rewrite is None or row is None:
        return not_measured(f"no {case} timing (see the rewrite part)")
    meta = rewrite["meta"]
    on = meta["model"] + (f", example input {meta['size']}x{meta['size']}" if "size" in meta else "")
    return Measurement(
        row["median_s"],
        row["min_s"],
        row["max_s"],
        len(row["runs"]),
        f"{on}: `{row['command']}`",
        f"import torch {row['median_minus_import_torch_s']:+.2f} s",
    )


def measure_targets(results: dict[str, dict[str, Any] | None], plan: Plan, m: dict[str, Any]) -> list[dict[str, Any]]:
    probe, onnx, rewrite = results.get("probe"), results.get("onnx"), results.get("rewrite")
    measure: dict[str, Callable[[], Measurement]] = {
        "probe-time-resnet50": lambda: probe_time(probe, plan.resnet),
        "probe-time-bert": lambda: probe_time(probe, plan.bert),
        "probe-memory-resnet50": lambda: probe_memory(probe, plan.resnet),
        "probe-memory-bert": lambda: probe_memory(probe, plan.bert),
        "gpu-time-ratio": lambda: gpu(m),
        "onnx-stats-warm": lambda: onnx_ratio(onnx, "time", "in_graph_run", "plain"),
        "onnx-stats-cold": lambda: onnx_ratio(onnx, "time", "in_graph", "plain_cold"),
        "onnx-lowering": lambda: onnx_ratio(onnx, "grad", "lowering", "torch_probe"),
        "cli-help": lambda: cli_measurement(probe, "help", "gradcheck --help"),
        "cli-usage-error": lambda: cli_measurement(probe, "usage_error", "gradcheck inspect"),
        "cli-inspect-first-sample": lambda: cli_first_sample(probe),
        "fold-bn-state_dict": lambda: rewrite_case(rewrite, "fold-state_dict"),
        "fold-bn-pt2": lambda: rewrite_case(rewrite, "fold-pt2"),
        "fold-bn-onnx": lambda: rewrite_case(rewrite, "fold-onnx"),
        "reinit-resnet50": lambda: rewrite_case(rewrite, "reinit-auto"),
    }
    rows = []
    for target in TARGETS:
        try:
            found = measure[target.id]()
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as error:
            # A part whose JSON lacks a field (an older or broken script) costs its row, not the summary.
            found = not_measured(f"results unreadable: {type(error).__name__}: {error}")
        if found.median is None:
            status = "not measured"
        else:
            met = found.median <= target.limit if target.inclusive else found.median < target.limit
            status = "met" if met else "missed"
        rows.append({**asdict(target), "target": target.text(), "status": status, **asdict(found)})
    return rows


def measured_text(row: dict[str, Any]) -> str:
    value, lo, hi = row["median"], row["low"], row["high"]
    if value is None:
        return "—"
    if row["unit"] == "ratio":
        text, band = f"{value:.3f}", f"{lo:.3f}-{hi:.3f}" if lo is not None else ""
    elif row["unit"] == "s":
        text, band = f"{value:.2f} s", f"{lo:.2f}-{hi:.2f}" if lo is not None else ""
    else:
        text, band = f"import torch {value:+.2f} s", f"{lo:+.2f} to {hi:+.2f}" if lo is not None else ""
    return f"{text} ({band})" if band and row["count"] != 1 else text


# ---- scaling ----------------------------------------------------------------------------------


def count_text(count: int) -> str:
    if count >= 10**9:
        return f"{count / 1e9:.3g} B"
    return f"{count / 1e6:.3g} M" if count >= 10**6 else f"{count:,}"


def exponent(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of log y against log x: 1 is linear, below 1 better than linear."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


# The fits have two or three points of noisy wall times: allow 10% before calling growth worse
# than linear.
LINEAR_TOLERANCE = 1.1


def linearity(k: float) -> str:
    return "no worse than linear" if k <= LINEAR_TOLERANCE else "worse than linear"


def scaling_summary(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    if not scaling or not scaling.get("time"):
        return None
    memory = {row["model"]: row for row in scaling.get("memory") or [] if row.get("heap", "default") == "default"}
    rows = []
    for t in scaling["time"]:
        spec = t["model"].split(":")
        m = memory.get(t["model"])
        rows.append(
            {
                "model": t["model"],
                "parameters": t["parameters"],
                "shape": ":".join(spec[:3]) if spec[0] == "mlp" else t["model"],
                "batch": int(spec[3]) if spec[0] == "mlp" and len(spec) == 4 else None,
                "probe_s": t["probe_median_s"],
                "probe_range_s": t["probe_range_s"],
                "bare_s": t["bare_median_s"],
                "bare_range_s": t["bare_range_s"],
                "time_ratio": t["time_ratio_median"],
                "repeats": t["repeats"],
                "bare_peak_growth_mb": m["bare_growth_mb"] if m else None,
                "probe_peak_growth_mb": m["probe_growth_mb"] if m else None,
            }
        )
    by_batch: dict[int, list[dict[str, Any]]] = {}
    by_shape: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["batch"] is not None:
            by_batch.setdefault(row["batch"], []).append(row)
            by_shape.setdefault(row["shape"], []).append(row)
    fits: dict[str, list[dict[str, Any]]] = {"parameters": [], "batch": []}
    statements = []
    # Every batch with two or more model sizes: time against parameters; every model shape run at
    # two or more batch sizes: time against batch.
    for fixed, groups, axis in (("batch", by_batch, "parameters"), ("shape", by_shape, "batch")):
        for key, group in sorted(groups.items(), key=lambda item: -len(item[1])):
            group = sorted(group, key=lambda r: r[axis])
            if len({r[axis] for r in group}) < 2:
                continue
            xs = [r[axis] for r in group]
            k = exponent(xs, [r["probe_s"] for r in group])
            kb = exponent(xs, [r["bare_s"] for r in group])
            fit: dict[str, Any] = {
                fixed: key,
                "models": [r["model"] for r in group],
                "exponent": k,
                "bare_exponent": kb,
            }
            if axis == "parameters":
                per_unit = [r["probe_s"] / r["parameters"] * 1e6 for r in group]
                fit["probe_s_per_million_parameters"] = per_unit
                where = (
                    f"At batch {key}, from {count_text(xs[0])} to {count_text(xs[-1])} parameters, probe time "
                    f"grows as parameters^{k:.2f}"
                )
                unit = "probe seconds per million parameters"
            else:
                per_unit = [r["probe_s"] / r["batch"] * 1e3 for r in group]
                fit["probe_ms_per_sample"] = per_unit
                where = (
                    f"For {key} ({count_text(group[0]['parameters'])} parameters), from batch {xs[0]} to "
                    f"{xs[-1]}, probe time grows as batch^{k:.2f}"
                )
                unit = "probe milliseconds per sample"
            fits[axis].append(fit)
            statements.append(
                f"{where} (bare step: ^{kb:.2f}): {linearity(k)}; {unit}: {', '.join(f'{v:.3g}' for v in per_unit)}."
            )
    largest = max(rows, key=lambda r: r["parameters"])
    statements.append(
        f"Largest model probed: {largest['parameters']:,} parameters ({largest['model']}) in "
        f"{largest['probe_s']:.3g} s (bare training step {largest['bare_s']:.3g} s)."
    )
    return {
        "rows": rows,
        "fits": fits,
        "largest": {k: largest[k] for k in ("model", "parameters", "probe_s")},
        "statements": statements,
    }


def scaling_markdown(s: dict[str, Any]) -> list[str]:
    def mb(value: float | None) -> str:
        return "—" if value is None else f"{value:.0f} MB"

    lines = [
        "| model | parameters | batch | probe (median, min-max) | bare step (median, min-max) | time ratio | "
        "bare peak-RSS growth | probe peak-RSS growth |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in s["rows"]:
        (plo, phi), (blo, bhi) = r["probe_range_s"], r["bare_range_s"]
        lines.append(
            f"| {r['model']} | {r['parameters']:,} | {r['batch'] or '—'} | {r['probe_s']:.3f} s "
            f"({plo:.3f}-{phi:.3f}) | {r['bare_s']:.3f} s ({blo:.3f}-{bhi:.3f}) | {r['time_ratio']:.2f} | "
            f"{mb(r['bare_peak_growth_mb'])} | {mb(r['probe_peak_growth_mb'])} |"
        )
    return [*lines, "", *s["statements"]]


# ---- the summary ------------------------------------------------------------------------------


def summary_markdown(summary: dict[str, Any], out: Path) -> str:
    lines = ["# Benchmark summary (issue 9)", ""]
    if summary["quick"]:
        lines += [
            "> **Quick smoke run**: small stand-in models and one repeat. These figures check that the "
            "harness works; they are not measurements of the targets.",
            "",
        ]
    if summary["jobs"] > 1:
        lines += [f"> Parts ran {summary['jobs']} at a time, slowing each other down: the times are upper bounds.", ""]
    lines += [
        f"Reproduce: `{summary['command']}`",
        "",
        "Machine: " + machine_line(summary["machine"]),
        "",
        "## Targets",
        "",
        "Status is the median against the target; min-max is over the repeats (for ratios, of the per-pair ratios).",
        "",
        "| target | measured on | n | measured: median (min-max) | target | status | notes |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for row in summary["targets"]:
        lines.append(
            f"| {row['what']} | {row['on'] or '—'} | {row['count'] or '—'} | {measured_text(row)} | "
            f"{row['target']} | **{row['status']}** | {row['note']} |"
        )
    scaling = summary["scaling"]
    lines += ["", "## Scaling", ""]
    lines += scaling_markdown(scaling) if scaling else ["Not measured (see the scaling part)."]
    sections = [
        ("Probe overhead, peak memory and CLI start-up (bench/probe_bench.py)", "probe"),
        ("Scaling, as bench/probe_bench.py reports it", "scaling"),
        ("ONNX probe (bench/onnx_bench.py)", "onnx"),
        ("fold-bn and reinit as whole commands (bench/rewrite_bench.py)", "rewrite"),
    ]
    for title, part in sections:
        lines += ["", f"## {title}", ""]
        result = summary["results"].get(part)
        if result is None:
            ran = part in summary["parts"]
            lines.append(f"Not measured ({f'see {part}.log' if ran else 'not run: see --parts'}).")
        elif part == "onnx":
            lines += onnx_markdown(result)
        elif (out / MARKDOWN_FILES[part]).is_file():  # removed before the part ran, so this run's
            lines.append((out / MARKDOWN_FILES[part]).read_text().rstrip())
        else:
            lines.append(f"No Markdown was written (see {part}.log).")
    lines += ["", "## Parts", "", "| part | command | exit | wall time |", "|---|---|---:|---:|"]
    for name, part in summary["parts"].items():
        lines.append(f"| {name} | `{part['command']}` | {part['returncode']} | {part['seconds']:.0f} s |")
    return "\n".join(lines) + "\n"


def onnx_markdown(onnx: dict[str, Any]) -> list[str]:
    import onnx_bench  # bench/ is this script's directory, hence on sys.path; imports only the stdlib

    lines = [
        f"{onnx['machine']}; batch {onnx['batch_size']}x3x{onnx['size']}x{onnx['size']}, medians of "
        f"{onnx['repeats']} interleaved repeats; load average {onnx['load_average']['start']:.2f} at the start, "
        f"{onnx['load_average']['end']:.2f} at the end."
    ]
    for model, results in onnx["models"].items():
        lines += onnx_bench.report_lines(model, results)
    for model, failed in (onnx.get("failures") or {}).items():
        lines += ["", f"Failed on {model}: {', '.join(failed)} (see onnx.log)."]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: small models, one repeat of everything")
    parser.add_argument(
        "--out", type=Path, help="results folder (default bench/results, bench/results/quick with --quick)"
    )
    parser.add_argument(
        "--repeats",
        "--runs",
        type=int,
        default=5,
        help="timed repetitions in each part: probe/bare pairs, CLI rounds, ONNX repeats, rewrite runs (default 5)",
    )
    parser.add_argument(
        "--memory-repeats",
        type=int,
        default=3,
        help="fresh-process peak-memory measurements per model of the probe part (default 3)",
    )
    parser.add_argument(
        "--scaling-repeats",
        type=int,
        default=3,
        help="probe/bare pairs per scaling model (default 3; the 1 B model takes ~20 s a step)",
    )
    parser.add_argument(
        "--scaling-memory-repeats",
        type=int,
        default=1,
        help="peak-memory measurements per scaling model, 0 for none (default 1)",
    )
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="run only these parts")
    parser.add_argument(
        "--jobs",
        type=int,
        help="parts run at once (default 1; 2 with --quick). Parts running "
        "side by side slow each other down: keep 1 for figures to publish",
    )
    args = parser.parse_args(argv)
    jobs = args.jobs or (2 if args.quick else 1)
    if args.quick:
        args.repeats = args.memory_repeats = args.scaling_repeats = 1
        # The probe part already runs the memory children; six more would add a quarter to the
        # smoke run (each imports torch) and test nothing new.
        args.scaling_memory_repeats = 0
    if min(args.repeats, args.memory_repeats, args.scaling_repeats) < 1 or args.scaling_memory_repeats < 0:
        parser.error("repeat counts must be at least 1 (--scaling-memory-repeats: at least 0)")
    if jobs < 1:
        parser.error("--jobs must be at least 1")
    out: Path = (args.out or HERE / "results" / ("quick" if args.quick else "")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    plan = QUICK if args.quick else FULL
    command = "python bench/run_all.py" + (" " + shlex.join(sys.argv[1:] if argv is None else argv)).rstrip()

    print("[run_all] describing the machine ...", file=sys.stderr, flush=True)
    described = machine()
    commands = part_commands(args, plan, out)
    parts: dict[str, dict[str, Any]] = {}
    results: dict[str, dict[str, Any] | None] = {}
    for name in args.parts:
        # Stale files from an earlier run must not pass for this run's results if the part fails.
        (out / RESULT_FILES[name]).unlink(missing_ok=True)
        if name in MARKDOWN_FILES:
            (out / MARKDOWN_FILES[name]).unlink(missing_ok=True)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        running = {name: pool.submit(run_part, name, commands[name], out / f"{name}.log") for name in args.parts}
        for name, future in running.items():
            parts[name] = future.result()
            results[name] = read_json(out / RESULT_FILES[name])
    described["load_average_end"] = list(os.getloadavg())

    summary = {
        "schema_version": SCHEMA_VERSION,
        "quick": args.quick,
        "jobs": jobs,
        "command": command,
        "machine": described,
        "plan": asdict(plan),
        "parts": parts,
        "targets": measure_targets(results, plan, described),
        "scaling": scaling_summary(results.get("scaling")),
        "results": results,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = summary_markdown(summary, out)
    (out / "summary.md").write_text(text)
    print(text)
    failed = [name for name, part in parts.items() if part["returncode"] != 0]
    if failed:
        print(f"[run_all] failed: {', '.join(failed)} (their logs are in {out})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
