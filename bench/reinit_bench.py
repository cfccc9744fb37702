"""Time ``reinit_module`` on torchvision's ResNet-50 (random weights, CPU).

    python bench/reinit_bench.py [--batch-size 2] [--size 224] [--threads 2] [--schemes auto lsuv]

Prints one line per scheme: wall time of the whole pass (tracing the data flow on the probe batch,
drawing every tensor, writing it into a deep copy, verifying untouched tensors bit for bit, and for
LSUV the per-layer rescaling forwards), and the number of layers re-initialised.
"""

from __future__ import annotations

import argparse
import time

import torch
import torchvision

from gradcheck_cli.options import ReinitOptions, Scheme
from gradcheck_cli.probe.batch import ProbeBatch
from gradcheck_cli.rewrite.torch_reinit import reinit_module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--schemes", nargs="+", default=["auto", "orthogonal", "lsuv"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = torchvision.models.resnet50(weights=None).eval()
    x = torch.randn(args.batch_size, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    batches = [ProbeBatch((x,))]
    with torch.no_grad():
        start = time.perf_counter()
        model(x)
        forward = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    print(
        f"resnet50: {params:,} parameters; input {tuple(x.shape)}; {args.threads} threads; "
        f"one plain forward {forward:.2f} s"
    )
    for name in args.schemes:
        options = ReinitOptions(scheme=Scheme(name))
        times = []
        result = None
        for _ in range(args.repeats if name != "lsuv" else 1):
            start = time.perf_counter()
            result = reinit_module(model, batches, options=options)
            times.append(time.perf_counter() - start)
        assert result is not None
        schemes = sorted({layer.scheme for layer in result.layers})
        print(
            f"{name:>10}: best {min(times):.2f} s of {len(times)}; {len(result.layers)} layers "
            f"({', '.join(schemes)}); {len(result.notes)} note(s)"
        )


if __name__ == "__main__":
    main()
