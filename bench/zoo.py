"""The model-zoo sweep: gradcheck's commands on models nobody on this project wrote.

    python bench/zoo.py                       # everything (about an hour or more on 2 cores)
    python bench/zoo.py --quick               # a handful of models per category (the test suite)
    python bench/zoo.py --only timm           # one category: torchvision, timm, transformers, onnx

For every model: ``inspect``, then ``fold-bn --dry-run`` when the model has a BatchNorm, then
``reinit --scheme auto --dry-run``, each through the real CLI (``gradcheck_cli.cli.app``), the way a
user runs them: torchvision and timm models are saved as state_dicts into the work directory and
loaded with ``--arch torchvision:<name>`` / ``--arch timm:<name>``; transformers directories come
from ``bench/hf_sources.py`` and ONNX files from ``bench/onnx_sources.py``.

Each model runs in its own subprocess with a timeout (``--timeout``, per model), so a crash or a
hang costs one row. Every outcome is one of

- ``ok``: exit 0 (for fold-bn with the count folded);
- ``declined``: gradcheck refused with its one-line error (exit 2) -- a legitimate model refused is
  still a bug to look at, and the reason is listed;
- ``failed``: a verification failure (exit 1), a crash (what would have been a traceback), or the
  timeout; the one-line reason is listed.

Results: ``bench/results/zoo_<category>.json`` per category (so ``--only`` runs add up),
``bench/results/zoo.md`` with a table per category, and, for runs that are not ``--quick``, the
section between the zoo markers of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CATEGORIES = ("torchvision", "timm", "transformers", "onnx")
# Coverage targets of issue 15: the share of a category's models that `inspect` probes.
TARGETS = {"torchvision": 1.0, "timm": 0.98, "transformers": 0.95, "onnx": 1.0}
MARK_START = "<!-- zoo:start (written by bench/zoo.py) -->"
MARK_END = "<!-- zoo:end -->"
BATCH = 2
SMALL_SIDE = 64
QUICK = {
    "torchvision": ["mobilenet_v3_small"],
    "timm": ["regnetx"],  # families
}
# torchvision models whose input size is fixed by their weights, or that need a larger image.
TORCHVISION_SIDES = {"inception_v3": 96, "googlenet": 64}
TORCHVISION_FIXED = ("vit_", "maxvit_")


# --------------------------------------------------------------------------------------------
# What is run


@dataclass
class Job:
    category: str
    name: str  # model name (torchvision/timm), architecture (transformers), file name (onnx)
    detail: str = ""  # timm family, transformers modality, ONNX exporter
    path: str = ""  # transformers directory or ONNX file

    @property
    def key(self) -> str:
        # Two ONNX files of one model differ by exporter only.
        return f"{self.name} [{self.detail}]"


@dataclass
class Outcome:
    status: str  # ok | declined | failed | n/a
    reason: str = ""

    def cell(self) -> str:
        if self.status in ("n/a", "not run"):
            return self.status
        return self.status + (f": {self.reason}" if self.reason else "")


# An operation after a failed one in the same model (the failure is counted once, where it was).
NOT_RUN = Outcome("not run")


@dataclass
class Row:
    job: Job
    ops: dict[str, Outcome] = field(default_factory=dict)
    seconds: float = 0.0
    note: str = ""


def torchvision_jobs(quick: bool) -> list[Job]:
    import torchvision

    def size(name: str) -> float:
        # The weights' metadata knows the parameter count without building the model.
        try:
            return float(torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"])
        except Exception:
            return float("inf")

    # Smallest first: an interrupted sweep has covered as many models as it could.
    names = sorted(torchvision.models.list_models(module=torchvision.models), key=lambda n: (size(n), n))
    if quick:
        names = [n for n in names if n in QUICK["torchvision"]]
    return [Job("torchvision", n) for n in names]


_SIZE_WORDS = [
    "atto",
    "femto",
    "pico",
    "nano",
    "xxs",
    "xxsmall",
    "tiny",
    "xs",
    "xsmall",
    "mini",
    "small",
    "s",
    "lite",
    "b0",
    "medium",
    "m",
    "base",
    "b",
    "large",
    "l",
    "huge",
    "h",
    "giant",
    "g",
    "gigantic",
]


def _size_key(name: str) -> tuple[int, float, int, str]:
    """Smaller variants first: size words (nano < tiny < small ...), then the first number."""
    tokens = re.split(r"[_\-.]", name)
    word = min((_SIZE_WORDS.index(t) for t in tokens if t in _SIZE_WORDS), default=len(_SIZE_WORDS))
    numbers = [float(n) for n in re.findall(r"\d+(?:\.\d+)?", name)]
    return word, numbers[0] if numbers else 1e9, len(name), name


def timm_families() -> dict[str, list[str]]:
    """timm models grouped by family: the module defining them and the name's leading word."""
    import timm

    families: dict[str, list[str]] = {}
    for module in timm.list_modules():
        for name in timm.list_models(module=module):
            stem = name.removeprefix("tf_").removeprefix("test_")
            prefix = re.split(r"[_\d]", stem, maxsplit=1)[0] or stem
            families.setdefault(f"{module}/{prefix}", []).append(name)
    return families


def timm_jobs(quick: bool) -> list[Job]:
    jobs = []
    for family, names in sorted(timm_families().items()):
        if quick and family.split("/")[-1] not in QUICK["timm"]:
            continue
        candidates = [n for n in names if not n.startswith("test_")] or names
        jobs.append(Job("timm", min(candidates, key=_size_key), detail=family))
    if quick:  # one model per quick family, whichever module defines it
        kept: dict[str, Job] = {}
        for job in jobs:
            kept.setdefault(job.detail.split("/")[-1], job)
        jobs = list(kept.values())
    return jobs


def transformers_jobs(workdir: Path, quick: bool) -> list[Job]:
    sys.path.insert(0, str(ROOT / "bench"))
    from hf_sources import hf_directories

    return [
        Job("transformers", arch, detail=modality, path=str(directory))
        for arch, modality, directory in hf_directories(workdir, quick=quick)
    ]


def onnx_jobs(workdir: Path, quick: bool) -> list[Job]:
    sys.path.insert(0, str(ROOT / "bench"))
    from onnx_sources import onnx_sources

    return [
        Job("onnx", name, detail=exporter, path=str(path))
        for name, exporter, path in onnx_sources(workdir, quick=quick)
    ]


# --------------------------------------------------------------------------------------------
# The worker: one process, one or more models, one JSON line per model on stdout


def _cli(*args: str) -> tuple[int, str, str, BaseException | None]:
    from typer.testing import CliRunner

    from gradcheck_cli.cli.app import app

    result = CliRunner().invoke(app, list(args), catch_exceptions=True)
    exception = result.exception if not isinstance(result.exception, SystemExit) else None
    return result.exit_code, result.stdout, result.stderr, exception


def _first_error(stderr: str) -> str:
    for line in stderr.splitlines():
        if line.startswith("error: "):
            return line.removeprefix("error: ").strip()[:300]
    lines = [line for line in stderr.splitlines() if line.strip()]
    return (lines[-1] if lines else "no message")[:300]


def _outcome(code: int, stderr: str, exception: BaseException | None) -> Outcome:
    if exception is not None:
        text = (str(exception).strip().splitlines() or [""])[0][:240]
        return Outcome("failed", f"crash: {type(exception).__name__}: {text}")
    if code == 0:
        return Outcome("ok")
    if code == 2:
        return Outcome("declined", _first_error(stderr))
    return Outcome("failed", f"exit {code}: {_first_error(stderr)}")


def _fold_outcome(code: int, stdout: str, stderr: str, exception: BaseException | None) -> Outcome:
    outcome = _outcome(code, stderr, exception)
    if outcome.status != "ok":
        return outcome
    try:
        report = json.loads(stdout)
    except json.JSONDecodeError:
        return Outcome("failed", "fold-bn --format json printed no JSON")
    entries = report.get("entries", [])
    folded = sum(1 for e in entries if e.get("folded"))
    if entries and folded == 0:
        reasons = Counter(str(e.get("reason")) for e in entries if not e.get("folded"))
        return Outcome("declined", f"0/{len(entries)} folded: {reasons.most_common(1)[0][0][:200]}")
    skipped = Counter(str(e.get("reason")) for e in entries if not e.get("folded"))
    text = f"{folded}/{len(entries)} folded"
    if skipped:
        text += f" (skipped: {skipped.most_common(1)[0][0][:160]})"
    return Outcome("ok", text)


def _has_batchnorm_module(module: Any) -> bool:
    from gradcheck_cli.rewrite.torch_fold import is_batchnorm_module

    return any(is_batchnorm_module(sub) for sub in module.modules())


def _eager_model(job: Job, workdir: Path) -> tuple[list[str], bool, str]:
    """Save the model's state_dict; the CLI arguments that load it, whether it has a BatchNorm."""
    import torch

    torch.manual_seed(0)
    note = ""
    kwargs: dict[str, Any] = {}
    if job.category == "torchvision":
        import torchvision

        model = torchvision.models.get_model(job.name)
        fixed = job.name.startswith(TORCHVISION_FIXED)
        side = 224 if fixed else TORCHVISION_SIDES.get(job.name, SMALL_SIDE)
        channels = 3
        shape: tuple[int, ...] = (BATCH, channels, side, side)
        arch = f"torchvision:{job.name}"
    else:
        model, shape, note, kwargs = _timm_model(job.name)
        arch = f"timm:{job.name}"
    model.eval()
    path = workdir / "weights" / f"{job.category}__{job.name}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    args = [str(path), "--arch", arch, "--input-shape", ",".join(str(d) for d in shape)]
    if kwargs:
        args += ["--arch-kwargs", json.dumps(kwargs)]
    has_bn = _has_batchnorm_module(model)
    del model
    return args, has_bn, note


def _timm_model(name: str) -> tuple[Any, tuple[int, ...], str, dict[str, Any]]:
    """A timm model at a small input where it allows one, else at its configured size."""
    import timm
    import torch

    try:
        model = timm.create_model(name, pretrained=False, img_size=SMALL_SIDE)
        shape: tuple[int, ...] = (BATCH, int(model.pretrained_cfg.get("input_size", (3,))[0]), SMALL_SIDE, SMALL_SIDE)
        with torch.no_grad():
            model.eval()(torch.randn(1, *shape[1:]))
        return model, shape, "", {"img_size": SMALL_SIDE}
    except Exception:
        pass
    model = timm.create_model(name, pretrained=False)
    cfg_size = tuple(int(d) for d in model.pretrained_cfg.get("input_size", (3, 224, 224)))
    fixed = bool(model.pretrained_cfg.get("fixed_input_size", False))
    side_shape = cfg_size
    if not fixed:
        small = (cfg_size[0], SMALL_SIDE, SMALL_SIDE)
        try:
            with torch.no_grad():
                model.eval()(torch.randn(1, *small))
            side_shape = small
        except Exception:
            side_shape = cfg_size
    return model, (BATCH, *side_shape), "", {}


def _file_model(job: Job) -> tuple[list[str], bool]:
    path = Path(job.path)
    if job.category == "onnx":
        import onnx
        from onnx_sources import INPUT_SHAPES

        graph = onnx.load(str(path), load_external_data=False).graph
        # A real model runs at the input size its own package uses (PaddleOCR's detector needs
        # sides that are multiples of 32, its recogniser a height of 48).
        shape = INPUT_SHAPES.get(job.name)
        args = [str(path)] + (["--input-shape", ",".join(map(str, shape))] if shape else [])
        return args, any(node.op_type == "BatchNormalization" for node in graph.node)
    from safetensors import safe_open

    has_bn = False
    for weights in path.glob("*.safetensors"):
        with safe_open(str(weights), "pt") as handle:
            has_bn = has_bn or any(k.endswith("running_mean") for k in handle.keys())  # noqa: SIM118 (not iterable)
    return [str(path)], has_bn


def run_worker(jobs: list[Job], workdir: Path) -> None:
    import warnings

    warnings.simplefilter("ignore")
    for job in jobs:
        print(json.dumps({"start": job.key}), flush=True)
        started = time.perf_counter()
        row = Row(job)
        try:
            if job.category in ("torchvision", "timm"):
                args, has_bn, row.note = _eager_model(job, workdir)
            else:
                args, has_bn = _file_model(job)
        except Exception as exc:
            text = (str(exc).strip().splitlines() or [""])[0][:200]
            row.ops["inspect"] = Outcome("failed", f"building the model for the sweep: {type(exc).__name__}: {text}")
            row.seconds = time.perf_counter() - started
            print(json.dumps({"row": _row_dict(row)}), flush=True)
            continue
        code, _, err, exc = _cli("inspect", *args, "--format", "json")
        row.ops["inspect"] = _outcome(code, err, exc)
        if has_bn:
            code, out, err, exc = _cli("fold-bn", *args, "--dry-run", "--format", "json")
            row.ops["fold-bn"] = _fold_outcome(code, out, err, exc)
        else:
            row.ops["fold-bn"] = Outcome("n/a")
        code, _, err, exc = _cli("reinit", *args, "--scheme", "auto", "--dry-run", "--format", "json")
        row.ops["reinit"] = _outcome(code, err, exc)
        row.seconds = time.perf_counter() - started
        print(json.dumps({"row": _row_dict(row)}), flush=True)


def _row_dict(row: Row) -> dict[str, Any]:
    return asdict(row)


def _row_from(data: dict[str, Any]) -> Row:
    return Row(
        Job(**data["job"]), {k: Outcome(**v) for k, v in data["ops"].items()}, data["seconds"], data.get("note", "")
    )


# --------------------------------------------------------------------------------------------
# The driver


def run_jobs(
    jobs: list[Job], workdir: Path, *, timeout: float, chunk: int, log: Any = None, on_rows: Any = None
) -> list[Row]:
    rows: list[Row] = []
    for start in range(0, len(jobs), chunk):
        part = jobs[start : start + chunk]
        rows.extend(_run_chunk(part, workdir, timeout * len(part), log))
        if on_rows is not None:
            on_rows(rows)
    return rows


def _run_chunk(jobs: list[Job], workdir: Path, timeout: float, log: Any) -> list[Row]:
    payload = json.dumps([asdict(j) for j in jobs])
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", payload, "--workdir", str(workdir)]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
        stdout, stderr, code = done.stdout, done.stderr, done.returncode
        timed_out = False
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        stderr = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        code, timed_out = -1, True
    rows: dict[str, Row] = {}
    current: str | None = None
    for line in stdout.splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            data = json.loads(line)
            if "start" in data:
                current = data["start"]
            elif "row" in data:
                row = _row_from(data["row"])
                rows[row.job.key] = row
                current = None
    result = []
    for job in jobs:
        if job.key in rows:
            result.append(rows[job.key])
            continue
        if job.key == current and timed_out:
            reason = f"timeout after {timeout:.0f} s"
        elif job.key == current:
            tail = [line for line in stderr.splitlines() if line.strip()]
            reason = f"the worker died (exit {code}): {(tail[-1] if tail else '')[:200]}"
        else:
            reason = "not run: an earlier model of the same worker timed out or crashed"
        result.append(Row(job, {"inspect": Outcome("failed", reason)}, time.perf_counter() - started))
    if log is not None:
        for row in result:
            cells = ", ".join(f"{op} {o.status}" for op, o in row.ops.items())
            print(f"[{row.job.category}] {row.job.name}: {cells} ({row.seconds:.0f} s)", file=log, flush=True)
    return result


# --------------------------------------------------------------------------------------------
# Reports


def summarise(category: str, rows: list[Row]) -> dict[str, Any]:
    counts: dict[str, Counter[str]] = {op: Counter() for op in ("inspect", "fold-bn", "reinit")}
    for row in rows:
        for op in counts:
            counts[op][row.ops.get(op, NOT_RUN).status] += 1
    total = len(rows)
    coverage = counts["inspect"]["ok"] / total if total else 0.0
    return {
        "category": category,
        "models": total,
        "coverage": coverage,
        "target": TARGETS[category],
        "met": total > 0 and coverage >= TARGETS[category],
        "counts": {op: dict(c) for op, c in counts.items()},
    }


def _ops_cell(counts: dict[str, int]) -> str:
    parts = [f"{counts.get(s, 0)} {s}" for s in ("ok", "declined", "failed") if counts.get(s, 0)]
    for other in ("n/a", "not run"):
        if counts.get(other):
            parts.append(f"{counts[other]} {other}")
    return ", ".join(parts) or "-"


def render(results: dict[str, dict[str, Any]], quick: bool) -> str:
    lines = [
        "| category | models | inspect | coverage (target) | fold-bn | reinit --scheme auto |",
        "|---|---:|---|---|---|---|",
    ]
    for category in CATEGORIES:
        if category not in results:
            continue
        # Recomputed from the rows: the stored summary may come from an older version of this script.
        s = summarise(category, [_row_from(r) for r in results[category]["rows"]])
        status = "met" if s["met"] else "**missed**"
        lines.append(
            f"| {category} | {s['models']} | {_ops_cell(s['counts']['inspect'])} | "
            f"{s['coverage']:.1%} ({s['target']:.0%}, {status}) | "
            f"{_ops_cell(s['counts']['fold-bn'])} | {_ops_cell(s['counts']['reinit'])} |"
        )
    out = ["\n".join(lines), ""]
    for category in CATEGORIES:
        if category not in results:
            continue
        data = results[category]
        rows = [_row_from(r) for r in data["rows"]]
        planned = data.get("planned", len(rows))
        partial = f"; interrupted: {len(rows)} of {planned} run" if planned > len(rows) else ""
        out.append(f"### {category}: {len(rows)} models ({data['when']}, {data['seconds']:.0f} s{partial})\n")
        problems = [(row, op, o) for row in rows for op, o in row.ops.items() if o.status in ("declined", "failed")]
        if problems:
            out.append("Not ok:\n")
            out.extend(f"- `{row.job.name}` {op}: {o.cell()}" for row, op, o in problems)
            out.append("")
        out.append("| model | " + ("family" if category == "timm" else "kind") + " | inspect | fold-bn | reinit | s |")
        out.append("|---|---|---|---|---|---:|")
        for row in rows:
            cells = [row.ops.get(op, NOT_RUN) for op in ("inspect", "fold-bn", "reinit")]
            out.append(
                f"| {row.job.name} | {row.job.detail} | "
                + " | ".join(_short(c) for c in cells)
                + f" | {row.seconds:.0f} |"
            )
        out.append("")
    if quick:
        out.insert(0, "(quick subset)\n")
    return "\n".join(out)


def _short(outcome: Outcome) -> str:
    # The full reasons are in the "Not ok" list; the table keeps only fold counts.
    if outcome.status == "ok" and outcome.reason:
        return "ok " + outcome.reason.split(" (", 1)[0]
    return outcome.status


def machine_line() -> str:
    import torch

    versions = []
    for package in ("torch", "torchvision", "timm", "transformers", "onnx", "onnxruntime"):
        with contextlib.suppress(Exception):
            import importlib.metadata

            versions.append(f"{package} {importlib.metadata.version(package)}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{platform.platform()}, Python {platform.python_version()}, {os.cpu_count()} CPUs "
        f"(torch threads {torch.get_num_threads()}), load average {load:.1f}; " + ", ".join(versions)
    )


def update_benchmarks(text: str, path: Path) -> None:
    section = f"{MARK_START}\n{text.rstrip()}\n{MARK_END}\n"
    current = path.read_text() if path.exists() else ""
    if MARK_START in current and MARK_END in current:
        head, rest = current.split(MARK_START, 1)
        _, tail = rest.split(MARK_END, 1)
        path.write_text(head + section + tail.lstrip("\n"))
    else:
        path.write_text(current.rstrip("\n") + "\n\n## Model zoo sweep (bench/zoo.py)\n\n" + section)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a handful of models per category")
    parser.add_argument("--only", choices=CATEGORIES, action="append", help="run only these categories")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per model")
    parser.add_argument("--workdir", type=Path, default=RESULTS / "zoo_work")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where zoo.md and the JSON go")
    parser.add_argument("--no-benchmarks-md", action="store_true", help="leave BENCHMARKS.md alone")
    parser.add_argument(
        "--resume", action="store_true", help="keep the stored rows of an interrupted run and run only the rest"
    )
    parser.add_argument(
        "--render-only", action="store_true", help="only rewrite zoo.md (and BENCHMARKS.md) from the stored results"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.worker:
        run_worker([Job(**j) for j in json.loads(args.worker)], args.workdir)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    categories = args.only or list(CATEGORIES)
    suffix = "_quick" if args.quick else ""
    for category in [] if args.render_only else categories:
        started = time.perf_counter()
        jobs = _jobs(category, args.workdir, args.quick)
        stored = args.out / f"zoo_{category}{suffix}.json"
        earlier: list[Row] = []
        spent = 0.0
        if args.resume and stored.exists():
            previous = json.loads(stored.read_text())
            earlier = [_row_from(r) for r in previous["rows"]]
            spent = float(previous.get("seconds", 0.0))
        done_keys = {row.job.key for row in earlier}
        planned = len(jobs)
        jobs = [job for job in jobs if job.key not in done_keys]

        def save(
            rows: list[Row],
            category: str = category,
            started: float = started,
            stored: Path = stored,
            planned: int = planned,
            earlier: list[Row] = earlier,
            spent: float = spent,
        ) -> None:
            # Written after every model, so that an interrupted sweep still has its figures.
            every = earlier + rows
            data = {
                "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                "seconds": spent + time.perf_counter() - started,
                "planned": planned,
                "summary": summarise(category, every),
                "rows": [_row_dict(r) for r in every],
            }
            stored.write_text(json.dumps(data, indent=1))

        # Quick: one process per category (one torch import); full: one per model, so that a
        # crash or a hang costs one row.
        run_jobs(
            jobs, args.workdir, timeout=args.timeout, chunk=len(jobs) if args.quick else 1, log=sys.stderr, on_rows=save
        )
    results = {}
    for category in CATEGORIES:
        stored = args.out / f"zoo_{category}{suffix}.json"
        if stored.exists():
            results[category] = json.loads(stored.read_text())
    text = render(results, args.quick)
    header = (
        f"Reproduce: `python bench/zoo.py` (or `--only CATEGORY`). Machine: {machine_line()}. "
        "Batch 2, 64x64 images where the model allows (else its configured size); fold-bn and "
        "reinit with --dry-run.\n\n"
    )
    (args.out / ("zoo_quick.md" if args.quick else "zoo.md")).write_text(header + text + "\n")
    print(header + text)
    if not args.quick and not args.no_benchmarks_md:
        update_benchmarks(header + text, ROOT / "BENCHMARKS.md")
    met = [summarise(c, [_row_from(r) for r in results[c]["rows"]])["met"] for c in categories if c in results]
    return 0 if all(met) else 1


def _jobs(category: str, workdir: Path, quick: bool) -> list[Job]:
    if category == "torchvision":
        return torchvision_jobs(quick)
    if category == "timm":
        return timm_jobs(quick)
    if category == "transformers":
        return transformers_jobs(workdir, quick)
    return onnx_jobs(workdir, quick)


if __name__ == "__main__":
    sys.exit(main())
