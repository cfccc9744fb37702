"""What the probe's time over the bare training step is made of (issue 18).

    python bench/overhead_parts.py                               # ResNet-50 and BERT-base, 7 pairs
    python bench/overhead_parts.py --models bert:8:128 --repeats 11
    python bench/overhead_parts.py --kernels                     # also: the kernels the parts are made of

The models and steps are bench/probe_bench.py's. Bare steps and probes alternate, as there; during
each probe, the probe's own functions are timed from outside (wrapped for this run only), so the
probe's extra time splits into:

* ``output statistics``: `Recorder.record_output`, the forward pass's reductions of each row;
* ``attention scores``: the recomputed scores of fused attention calls (probe/attention.py);
* ``activation-gradient hooks``: Σg² of each hooked output's gradient, during backward;
* ``parameter gradients``: the lean reducer's Σg² of each parameter's gradient, during backward;
* ``weight norms and the table``: `parameter_gradients` after the last backward;
* ``the rest``: the probe's time minus the bare step's minus the parts above: module and function
  hooks, the function mode's dispatch, building the report, and whatever the parts cost the
  model's own kernels (caches, threads).

The wrappers add a little time of their own; the parts are for finding what to work on, the
ratios that count are bench/probe_bench.py's. ``--kernels`` adds what the parts are made of, each
the median of many calls:

* one statistics pass (extremes, sum, Σx² as a BLAS dot) over a ResNet-50 output of 16x256x56x56;
* the attention scores of one BERT-base sample (12 heads, 128 x 128, width 64), in GFLOP/s;
* a small operation (a 768-element dot product, and 50 additions in Python) straight after a
  1024x3072 @ 3072x768 matrix product and after nothing: what a hook after a layer's kernel pays;
* an embedding's backward and gradient reduction (a 30522 x 768 table, 8 x 128 tokens), dense and
  with the sparse gradient the probe asks for.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

PARTS = (
    "output statistics",
    "attention scores",
    "activation-gradient hooks",
    "parameter gradients",
    "weight norms and the table",
)


def _wrap(owner: Any, attribute: str, part: str, spent: dict[str, float], *, when_found: bool = False) -> None:
    """Time ``owner.attribute`` into ``spent[part]``; with ``when_found``, only the calls that
    return something (attention_rows is asked about every function call and answers None for
    all but attention)."""
    original = getattr(owner, attribute)

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = original(*args, **kwargs)
        if result is not None or not when_found:
            spent[part] += time.perf_counter() - start
        return result

    setattr(owner, attribute, timed)


def _instrument(spent: dict[str, float]) -> None:
    from gradcheck_cli.probe import instrument, lean, recorder, run

    _wrap(recorder.Recorder, "record_output", "output statistics", spent)
    _wrap(instrument, "attention_rows", "attention scores", spent, when_found=True)
    _wrap(lean.GradientReducer, "_reduce", "parameter gradients", spent)
    _wrap(run, "parameter_gradients", "weight norms and the table", spent)
    hook_for = recorder.Recorder._grad_hook_for

    def timed_hook_for(self: Any, rows: Any) -> Any:
        hook = hook_for(self, rows)

        def timed(grad: Any) -> None:
            start = time.perf_counter()
            hook(grad)
            spent["activation-gradient hooks"] += time.perf_counter() - start

        return timed

    recorder.Recorder._grad_hook_for = timed_hook_for  # type: ignore[method-assign]


def parts(name: str, repeats: int) -> dict[str, Any]:
    import probe_bench

    spent = dict.fromkeys(PARTS, 0.0)
    _instrument(spent)
    bare, probe, timed, _ = probe_bench.step_functions(name)
    bare()
    probe()
    bare_times: list[float] = []
    probe_times: list[float] = []
    per_part: dict[str, list[float]] = {part: [] for part in PARTS}
    for _ in range(repeats):
        bare_times.append(timed(bare))
        for part in PARTS:
            spent[part] = 0.0
        probe_times.append(timed(probe))
        for part in PARTS:
            per_part[part].append(spent[part])
    extra = [p - b for p, b in zip(probe_times, bare_times, strict=True)]
    rest = [e - sum(per_part[part][i] for part in PARTS) for i, e in enumerate(extra)]
    return {
        "model": name,
        "repeats": repeats,
        "bare_median_s": statistics.median(bare_times),
        "probe_median_s": statistics.median(probe_times),
        "ratio_median": statistics.median(p / b for p, b in zip(probe_times, bare_times, strict=True)),
        "extra_median_ms": statistics.median(extra) * 1e3,
        "parts_median_ms": {part: statistics.median(per_part[part]) * 1e3 for part in PARTS},
        "rest_median_ms": statistics.median(rest) * 1e3,
    }


def _median_us(call: Callable[[], object], repeats: int, before: Callable[[], object] | None = None) -> float:
    call()
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def kernels() -> dict[str, float]:
    import torch

    torch.manual_seed(0)
    output = torch.randn(16, 256, 56, 56)
    flat = output.reshape(-1)
    gigabytes = output.numel() * 4 / 1e9
    passes = {
        "extremes": lambda: torch.aminmax(output),
        "sum": lambda: output.sum(),
        "sum of squares": lambda: torch.dot(flat, flat),
    }
    result: dict[str, float] = {}
    for name, call in passes.items():
        us = _median_us(call, 30)
        result[f"{name} pass, ms"] = us / 1e3
        result[f"{name} pass, GB/s"] = gigabytes / (us / 1e6)
    query, keys = torch.randn(12, 128, 64), torch.randn(12, 64, 128)
    scores = torch.empty(12, 128, 128)
    us = _median_us(lambda: torch.baddbmm(scores, query, keys, beta=0.0, alpha=0.125, out=scores), 200)
    result["attention scores of one sample, ms"] = us / 1e3
    result["attention scores, GFLOP/s"] = 2 * 12 * 128 * 128 * 64 / (us / 1e6) / 1e9

    x, w, b = torch.randn(1024, 3072), torch.randn(3072, 768), torch.randn(768)
    result["dot after nothing, us"] = _median_us(lambda: torch.dot(b, b), 200, before=lambda: None)
    result["dot after a matrix product, us"] = _median_us(lambda: torch.dot(b, b), 200, before=lambda: x @ w)
    result["python after nothing, us"] = _median_us(lambda: sum(range(50)), 200, before=lambda: None)
    result["python after a matrix product, us"] = _median_us(lambda: sum(range(50)), 200, before=lambda: x @ w)

    table = torch.nn.Embedding(30522, 768)
    tokens = torch.randint(0, 30522, (8, 128))
    upstream = torch.randn(8, 128, 768)

    def embedding_step(sparse: bool) -> None:
        table.sparse = sparse
        table.weight.grad = None
        table(tokens).backward(upstream)
        grad = table.weight.grad
        assert grad is not None
        values = grad.coalesce().values() if grad.is_sparse else grad
        torch.dot(values.reshape(-1), values.reshape(-1))

    result["embedding backward and reduction, dense, ms"] = _median_us(lambda: embedding_step(False), 15) / 1e3
    result["embedding backward and reduction, sparse, ms"] = _median_us(lambda: embedding_step(True), 15) / 1e3
    return result


def markdown(results: list[dict[str, Any]], speeds: dict[str, float] | None) -> str:
    lines = [
        "| model | pairs | bare step | probe | ratio | extra (median) | " + " | ".join(PARTS) + " | the rest |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * (len(PARTS) + 1),
    ]
    for r in results:
        cells = " | ".join(f"{r['parts_median_ms'][part]:.0f} ms" for part in PARTS)
        lines.append(
            f"| {r['model']} | {r['repeats']} | {r['bare_median_s']:.3f} s | {r['probe_median_s']:.3f} s | "
            f"{r['ratio_median']:.3f} | {r['extra_median_ms']:.0f} ms | {cells} | {r['rest_median_ms']:.0f} ms |"
        )
    if speeds is not None:
        lines += ["", "| kernel | median |", "|---|---:|"]
        lines += [f"| {name} | {value:.3g} |" for name, value in speeds.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50:16:224", "bert:8:128"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--kernels", action="store_true", help="also time the kernels the parts are made of")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = [parts(name, args.repeats) for name in args.models]
    speeds = kernels() if args.kernels else None
    print(markdown(results, speeds))
    if args.json is not None:
        args.json.write_text(json.dumps({"parts": results, "kernels": speeds}, indent=2))


if __name__ == "__main__":
    main()
