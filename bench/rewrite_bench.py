"""End-to-end wall time of ``gradcheck fold-bn`` and ``gradcheck reinit`` as users run them (issue 9).

    python bench/rewrite_bench.py [--runs 3] [--model resnet50] [--cases fold-state_dict fold-onnx ...]
                                  [--out bench/results]
    python bench/rewrite_bench.py --quick --out DIR   # smoke: resnet18 at 32x32, one run, QUICK_CASES

Builds torchvision's model (``weights=None``, BatchNorm statistics randomised with seed 0, so the
folds are not identities) and saves it three ways: a state_dict (loaded with ``--arch
torchvision:<model>``), a ``.pt2`` program (``torch.export`` at 1x3x224x224) and an ``.onnx`` file
exported with BatchNorm kept (legacy exporter, ``TrainingMode.PRESERVE``, no constant folding,
dynamic batch). Then each case runs as a fresh ``gradcheck`` subprocess, ``--runs`` times,
round-robin across the cases (so that changing load on a shared machine hits every case alike),
next to ``python -c "import torch"`` timed in the same rounds: the fixed cost every torch case
pays before gradcheck does anything. Writes ``rewrite_bench.json`` and ``rewrite_bench.md``
(medians, min-max, median minus the import-torch median, load average) under ``--out``.
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
import warnings
from pathlib import Path
from typing import Any

IMPORT_TORCH = "import torch"

# name -> (arguments after `gradcheck`, with {sd} {pt2} {onnx} {arch} {out} placeholders)
CASES: dict[str, list[str]] = {
    "fold-state_dict": ["fold-bn", "{sd}", "--arch", "{arch}", "-o", "{out}/folded_sd.pt", "--force"],
    "fold-pt2": ["fold-bn", "{pt2}", "-o", "{out}/folded.pt2", "--force"],
    "fold-onnx": ["fold-bn", "{onnx}", "-o", "{out}/folded.onnx", "--force"],
    "reinit-auto": ["reinit", "{sd}", "--arch", "{arch}", "-o", "{out}/reinit_auto.pt", "--force"],
    "reinit-orthogonal": [
        "reinit",
        "{sd}",
        "--arch",
        "{arch}",
        "-o",
        "{out}/reinit_orth.pt",
        "--force",
        "--scheme",
        "orthogonal",
    ],
    "reinit-lsuv": ["reinit", "{sd}", "--arch", "{arch}", "-o", "{out}/reinit_lsuv.pt", "--force", "--scheme", "lsuv"],
}

# The smoke run's cases: every fold format and the default reinit scheme (the ones issue 9 sets a
# target for); orthogonal and LSUV add minutes of QR on resnet50 and nothing new to the harness.
QUICK_CASES = ["fold-state_dict", "fold-pt2", "fold-onnx", "reinit-auto"]


def make_models(model_name: str, directory: Path, *, size: int = 224) -> dict[str, Path]:
    """The model as a state_dict, a .pt2 program and an .onnx file with BatchNorm kept."""
    import torch
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(model_name, weights=None).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                channels = module.num_features
                module.running_mean.copy_(torch.randn(channels, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(channels, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(channels, generator=generator) * 0.1)
    paths = {
        "sd": directory / f"{model_name}_state_dict.pt",
        "pt2": directory / f"{model_name}.pt2",
        "onnx": directory / f"{model_name}.onnx",
    }
    torch.save(model.state_dict(), paths["sd"])
    example = torch.randn(1, 3, size, size, generator=generator)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.save(torch.export.export(model, (example,)), str(paths["pt2"]))
        torch.onnx.export(
            model,
            (example,),
            str(paths["onnx"]),
            dynamo=False,
            opset_version=17,
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    return paths


def case_command(case: str, paths: dict[str, Path], arch: str, out: Path) -> list[str]:
    values = {
        "sd": str(paths["sd"]),
        "pt2": str(paths["pt2"]),
        "onnx": str(paths["onnx"]),
        "arch": arch,
        "out": str(out),
    }
    return [sys.executable, "-m", "gradcheck_cli", *(part.format(**values) for part in CASES[case])]


def timed(command: list[str]) -> float:
    """Wall seconds of one subprocess; a failure stops the benchmark (a crash is not a time)."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return elapsed


def run(cases: list[str], paths: dict[str, Path], *, arch: str, runs: int, out: Path) -> dict[str, Any]:
    names = [IMPORT_TORCH, *cases]
    commands = {IMPORT_TORCH: [sys.executable, "-c", "import torch"]}
    commands.update({case: case_command(case, paths, arch, out) for case in cases})
    times: dict[str, list[float]] = {name: [] for name in names}
    loads: list[float] = [os.getloadavg()[0]]
    for round_index in range(runs):
        for name in names:
            times[name].append(timed(commands[name]))
            loads.append(os.getloadavg()[0])
            print(
                f"round {round_index + 1}/{runs} {name}: {times[name][-1]:.2f} s (load {loads[-1]:.2f})",
                file=sys.stderr,
                flush=True,
            )
    base = statistics.median(times[IMPORT_TORCH])
    rows = []
    for name in names:
        median = statistics.median(times[name])
        rows.append(
            {
                "case": name,
                "command": _display(commands[name]),
                "runs": times[name],
                "median_s": median,
                "min_s": min(times[name]),
                "max_s": max(times[name]),
                "median_minus_import_torch_s": None if name == IMPORT_TORCH else median - base,
            }
        )
    return {"rows": rows, "load_average": {"min": min(loads), "max": max(loads), "samples": loads}}


def _display(command: list[str]) -> str:
    parts = ["python" if part == sys.executable else part for part in command]
    if parts[:3] == ["python", "-m", "gradcheck_cli"]:
        parts = ["gradcheck", *parts[3:]]
    return " ".join(Path(p).name if "/" in p else p for p in parts)


def markdown(result: dict[str, Any], meta: dict[str, Any]) -> str:
    load = result["load_average"]
    lines = [
        f"{meta['model']}, {meta['runs']} runs per case (round-robin), {meta['machine']}; "
        f"torch {meta['torch']}; load average {load['min']:.2f}-{load['max']:.2f} during the runs.",
        "",
        "| case | command | median (s) | min-max (s) | median - import torch (s) |",
        "|---|---|---:|---:|---:|",
    ]
    for row in result["rows"]:
        extra = "" if row["median_minus_import_torch_s"] is None else f"{row['median_minus_import_torch_s']:.2f}"
        lines.append(
            f"| {row['case']} | `{row['command']}` | {row['median_s']:.2f} | "
            f"{row['min_s']:.2f}-{row['max_s']:.2f} | {extra} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", default="resnet50", help="a torchvision model name")
    parser.add_argument("--size", type=int, default=224, help="image side of the .pt2/.onnx example input")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: resnet18 at 32x32, one run, the fold "
        "cases and reinit-auto (overrides --runs, --model, --size, --cases)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.model, args.size, args.cases = 1, "resnet18", 32, QUICK_CASES
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rewrite-bench-") as scratch:
        work = Path(scratch)
        paths = make_models(args.model, work, size=args.size)
        result = run(args.cases, paths, arch=f"torchvision:{args.model}", runs=args.runs, out=work)
    meta = {
        "model": args.model,
        "size": args.size,
        "runs": args.runs,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()})",
        "torch_threads": torch.get_num_threads(),
    }
    (args.out / "rewrite_bench.json").write_text(json.dumps({"meta": meta, **result}, indent=2) + "\n")
    text = markdown(result, meta)
    (args.out / "rewrite_bench.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
