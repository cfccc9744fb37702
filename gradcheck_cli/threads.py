"""How many CPU threads torch may use while probing a small model.

A probe of a small model is a few hundred tiny kernels (a forward, a backward and the per-layer
reductions on micro-batches of 8). Split over an OpenMP pool, each kernel ends in a barrier that
waits for every worker; on a machine whose cores are busy with other processes (a shared CI runner,
a developer box running a build) a worker that is not scheduled holds the barrier for a scheduler
time slice. On the shared 2-core development machine the probe of the samples (8k-121k parameters)
took 0.2-1.3 s on two threads against 0.02-0.06 s on one (BENCHMARKS.md, start-up); kernels this
small leave a pool nothing to gain on an idle machine either. So up to ``SMALL_MODEL_PARAMETERS``
the probe runs on one intra-op thread, and the caller's setting is restored afterwards.

Parameters are a proxy for work, and a wrong guess costs at most the pool's speed-up: a
MobileNet-style net of a million parameters on 224x224 images does about 10 GFLOP for 8 samples
forward and backward, well under a second on one core; a net with all its weights in
full-resolution convolutions does more. Results agree to float32 rounding either way (reductions
split differently across threads, as they already do between machines with different core counts).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

SMALL_MODEL_PARAMETERS = 1_000_000


def probe_thread_count(parameters: int, current: int, *, device_type: str) -> int:
    """The intra-op thread count for probing a model of ``parameters`` on ``device_type``."""
    if device_type != "cpu" or parameters > SMALL_MODEL_PARAMETERS:
        return current
    return min(current, 1)


@contextlib.contextmanager
def probe_threads(module: nn.Module, device_type: str) -> Iterator[None]:
    """Run the block with :func:`probe_thread_count` torch threads, then restore the caller's count.

    ``torch.set_num_threads`` is process-wide: a caller probing from several threads at once sees
    the lower count in the others while a probe runs (it only changes speed, never results).
    """
    import torch

    saved = torch.get_num_threads()
    wanted = probe_thread_count(sum(p.numel() for p in module.parameters()), saved, device_type=device_type)
    if wanted == saved:
        yield
        return
    torch.set_num_threads(wanted)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
