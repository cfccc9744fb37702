"""Big models (issue 18): the lean probe against the bare training step on Llama-architecture checkpoints.

    python bench/big.py --sizes 1b 3b 7b --workdir /tmp/gradcheck-big     # generate, then measure
    python bench/big.py --sizes 7b --batch-size 1 --seq-len 16              # one size, a smaller batch
    python bench/big.py --quick                                              # a tiny smoke version

For each size the script writes (once, into ``--workdir``; never into the repository) a Llama
directory with random bf16 weights: ``config.json``, sharded ``model-0000k-of-0000n.safetensors`` and
``model.safetensors.index.json``, the layout ``save_pretrained`` writes. Sizes up to ``--save-pretrained-
max`` are built whole and saved with ``save_pretrained`` itself; larger ones are written tensor by
tensor in the same layout, because building a 7B model whole takes the 14 GB the benchmark wants to
show is not needed.

Then, each in a fresh process, one after another:

* **bare step**: ``AutoModelForCausalLM.from_pretrained(dir, dtype=bfloat16)``, one forward with
  ``labels`` and ``loss.backward()``, holding every gradient as training does;
* **probe**: ``gradcheck inspect dir --batch-size B --seq-len S --format json``.

Reported: each process's peak resident set (``ru_maxrss``, read by a wrapper process that runs only
that child), its wall time, and the step's own time: the bare script times its step itself; for the
probe, the wall time of a load-only process (``api.load``, the loader the CLI uses) is subtracted.
A size whose bare step needs more memory than is available (weights + gradients alone) is not run:
it is reported as not fitting, with the figure, rather than pushing a shared machine into the OOM
killer.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# Llama-architecture configurations: TinyLlama-1.1B, OpenLLaMA-3B and Llama-2-7B shapes.
CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 172,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1000,
    },
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
    },
    "3b": {
        "hidden_size": 3200,
        "intermediate_size": 8640,
        "num_hidden_layers": 26,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
    },
    "7b": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
    },
}
SHARD_BYTES = 2 * 1024**3


def _config(size: str) -> Any:
    import transformers

    return transformers.LlamaConfig(
        **CONFIGS[size],
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    )


def generate(size: str, directory: Path, *, whole_max: float) -> Path:
    """Write the checkpoint unless it is already there (the index or single file names it done)."""
    target = directory / f"llama-{size}"
    if (target / "model.safetensors.index.json").is_file() or (target / "model.safetensors").is_file():
        return target
    import torch
    import transformers

    config = _config(size)
    with torch.device("meta"):
        parameters = sum(p.numel() for p in transformers.LlamaForCausalLM(config).parameters())
    target.mkdir(parents=True, exist_ok=True)
    if parameters <= whole_max * 1e9:
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(str(target), max_shard_size="2GB")
        return target
    _write_streamed(config, target)
    return target


def _write_streamed(config: Any, target: Path) -> None:
    """save_pretrained's layout, written one shard at a time: N(0, 0.02) weights, unit norm weights."""
    import torch
    import transformers
    from safetensors.torch import save_file

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    shapes = [(name, tuple(p.shape)) for name, p in model.state_dict().items()]
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in shapes:
        size = 2 * int(torch.Size(shape).numel())
        if groups[-1] and used + size > SHARD_BYTES:
            groups.append([])
            used = 0
        groups[-1].append((name, shape))
        used += size
    generator = torch.Generator().manual_seed(0)
    # Drawing 6.7e9 normal values took minutes per shard on the shared machine: each tensor is cut
    # from one block of 2^24 N(0, 0.02) values at a random offset instead (tiled when larger). The
    # benchmark measures memory and time, which do not depend on the values being independent.
    block = (torch.randn(1 << 24, generator=generator) * 0.02).to(torch.bfloat16)
    weight_map: dict[str, str] = {}
    total = 0
    for index, group in enumerate(groups, start=1):
        shard = f"model-{index:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in group:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:
                count = int(torch.Size(shape).numel())
                start = int(torch.randint(0, block.numel(), (1,), generator=generator))
                tiled = block.roll(-start).repeat(count // block.numel() + 1)[:count]
                tensors[name] = tiled.reshape(shape).clone()
            weight_map[name] = shard
            total += 2 * tensors[name].numel()
        save_file(tensors, str(target / shard), metadata={"format": "pt"})
        del tensors
    (target / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    config.save_pretrained(str(target))


BARE = """
import sys, time, json, resource
import torch, transformers
t0 = time.perf_counter()
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
t1 = time.perf_counter()
batch, seq = int(sys.argv[2]), int(sys.argv[3])
ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
model.train(False)
loss = model(input_ids=ids, labels=ids).loss
loss.backward()
t2 = time.perf_counter()
held = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
print(json.dumps({"load_s": t1 - t0, "step_s": t2 - t1, "gradient_bytes": held}))
"""

LOAD_ONLY = """
import sys, time, json
t0 = time.perf_counter()
from gradcheck_cli import api
loaded = api.load(__import__("pathlib").Path(sys.argv[1]))
print(json.dumps({"load_s": time.perf_counter() - t0,
                  "dtypes": sorted({str(p.dtype) for p in loaded.module.parameters()})}))
"""


# Runs one command and reports that command's own peak resident set: RUSAGE_CHILDREN of a fresh
# wrapper covers that child alone (in this script it would be the largest child so far).
WRAP = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:])
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)
sys.exit(done.returncode)
"""


def _child(argv: list[str], env: dict[str, str]) -> tuple[dict[str, Any] | None, float, int, int, str]:
    """(the last JSON line the child printed, wall seconds, peak RSS bytes, exit code, stderr tail)."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", WRAP, *argv], capture_output=True, text=True, env=env, cwd=ROOT, check=False
    )
    wall = time.perf_counter() - start
    peak = 0
    for line in done.stderr.splitlines():
        if line.startswith("PEAK_RSS_KB "):
            peak = int(line.split()[1]) * 1024
    result = None
    for line in reversed(done.stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                result = json.loads(line)
            except ValueError:
                continue
            break
    return result, wall, peak, done.returncode, done.stderr[-1500:]


def _available() -> int:
    text = Path("/proc/meminfo").read_text()
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(size: str, directory: Path, batch: int, seq: int, threads: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    weights = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    row: dict[str, Any] = {"size": size, "weights_bytes": weights, "batch": batch, "seq_len": seq}
    available = _available()
    row["available_bytes"] = available
    load, wall, _, code, err = _child([sys.executable, "-c", LOAD_ONLY, str(directory)], env)
    row["load"] = {"ok": code == 0, "wall_s": wall, **(load or {}), "stderr": None if code == 0 else err}
    if available < weights:
        row["probe"] = {"ok": False, "stderr": "less memory available than the weights take"}
        row["bare"] = {"ok": False, "skipped": "not run"}
        return row
    report = directory.parent / f"probe-{size}.json"
    probe_argv = [
        sys.executable,
        "-m",
        "gradcheck_cli",
        "inspect",
        str(directory),
        "--batch-size",
        str(batch),
        "--seq-len",
        str(seq),
        "--format",
        "json",
        "-o",
        str(report),
    ]
    _, wall, peak, code, err = _child(probe_argv, env)
    row["probe"] = {"ok": code == 0, "wall_s": wall, "peak_rss_bytes": peak, "stderr": None if code == 0 else err}
    if code == 0:
        data = json.loads(report.read_text())
        row["probe"]["notes"] = data["notes"]
        row["probe"]["rows"] = len(data["layers"])
    need = 2 * weights  # weights + every gradient, before any activation
    if need > available:
        row["bare"] = {
            "ok": False,
            "skipped": f"needs at least {need / 1e9:.1f} GB (weights + gradients) "
            f"of the {available / 1e9:.1f} GB available: not run",
        }
    else:
        bare, wall, peak, code, err = _child([sys.executable, "-c", BARE, str(directory), str(batch), str(seq)], env)
        row["bare"] = {
            "ok": code == 0,
            "wall_s": wall,
            "peak_rss_bytes": peak,
            **(bare or {}),
            "stderr": None if code == 0 else err,
        }
    return row


def render(rows: list[dict[str, Any]], header: str) -> str:
    lines = [
        header,
        "",
        "| model | weights (bf16) | batch x seq | bare step: peak RSS | bare step: wall (step) | "
        "probe: peak RSS | probe: wall (probe only) | RSS ratio | time ratio: wall (step) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        bare, probe, load = row["bare"], row["probe"], row["load"]
        if bare.get("ok"):
            bare_rss = f"{bare['peak_rss_bytes'] / 1e9:.2f} GB"
            bare_time = f"{bare['wall_s']:.0f} s ({bare['step_s']:.0f} s)"
        else:
            bare_rss, bare_time = "does not fit", bare.get("skipped") or "failed"
        if probe["ok"]:
            probe_rss = f"{probe['peak_rss_bytes'] / 1e9:.2f} GB"
            probe_time = f"{probe['wall_s']:.0f} s ({probe['wall_s'] - load.get('wall_s', 0.0):.0f} s)"
        else:
            probe_rss, probe_time = "failed", (probe.get("stderr") or "").strip().splitlines()[-1:] or ["failed"]
            probe_time = str(probe_time[0]) if isinstance(probe_time, list) else probe_time
        rss_ratio = time_ratio = "—"
        if bare.get("ok") and probe["ok"]:
            rss_ratio = f"{probe['peak_rss_bytes'] / bare['peak_rss_bytes']:.2f}"
            probe_step = probe["wall_s"] - load.get("wall_s", 0.0)
            time_ratio = f"{probe['wall_s'] / bare['wall_s']:.2f} ({probe_step / bare['step_s']:.2f})"
        lines.append(
            f"| llama-{row['size']} | {row['weights_bytes'] / 1e9:.2f} GB | {row['batch']}x{row['seq_len']} | "
            f"{bare_rss} | {bare_time} | {probe_rss} | {probe_time} | {rss_ratio} | {time_ratio} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="*", default=["1b", "3b", "7b"], choices=sorted(CONFIGS))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/gradcheck-big"))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--save-pretrained-max",
        type=float,
        default=1.5,
        help="largest size (billions of parameters) built whole and saved with save_pretrained",
    )
    parser.add_argument("--generate-only", action="store_true")
    parser.add_argument("--quick", action="store_true", help="the tiny configuration only: a smoke test")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    sizes = ["tiny"] if args.quick else args.sizes
    rows = []
    for size in sizes:
        started = time.perf_counter()
        directory = generate(size, args.workdir, whole_max=args.save_pretrained_max)
        print(
            f"llama-{size}: checkpoint ready in {time.perf_counter() - started:.0f} s at {directory}", file=sys.stderr
        )
        if args.generate_only:
            continue
        row = measure(size, directory, args.batch_size, args.seq_len, args.threads)
        print(json.dumps(row), file=sys.stderr)
        rows.append(row)
    if args.generate_only:
        return 0
    import torch

    header = (
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{_available() / 1e9:.1f} GB available at the end; torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}; load average {os.getloadavg()[0]:.1f}"
    )
    text = render(rows, header)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "big_quick" if args.quick else "big"
    (args.out / f"{stem}.json").write_text(json.dumps(rows, indent=2))
    (args.out / f"{stem}.md").write_text(text + "\n")
    print(text)
    return 0 if all(r["probe"]["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
