"""One compiled pass over a large output: its sum, sum of squares, minimum and maximum together.

The eager path reads each output three times (extremes, sum, squares: probe/recorder.py). For an
output that no longer fits in cache, each reading is a trip to memory; ``torch.compile`` fuses
the four reductions into one loop that reads each element once. In a ResNet-50 probe at batch 16,
its 74 whole-tensor rows of 1M elements or more took 61 ms compiled against 112 ms eager on a
2-core AVX2 machine. Outputs that fit in cache gain nothing (their second and third readings are
cheap), so only outputs of :data:`MIN_ELEMENTS` or more take the compiled pass. ReLU-family rows,
which also need per-unit sums, keep the eager passes: per-unit compiled kernels were slower than
them on ResNet-50's ReLU outputs (27 against 24 ms), faster on some shapes and slower on others.

Compiling costs seconds (importing the compiler, then seconds the first time on a machine; later
processes read the kernel from torch's on-disk cache), which a one-batch probe never wins back:
see :func:`pays`. A kernel that fails to compile (no C++ compiler) leaves the eager path in
place, and the report says why.

Sums are taken around a shift c, the mean of the first 4096 values: ``Σ(x - c)`` and
``Σ(x - c)²`` give the mean and M2 without the cancellation of ``Σx² - (Σx)²/n`` when the mean
dwarfs the spread (docs/theory.md, "Merging statistics").
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gradcheck_cli.errors import first_line
from gradcheck_cli.stats import CANCELLATION_GUARD

if TYPE_CHECKING:
    import torch

# Below this many elements (4 MB of float32), an output's eager passes run from cache and the
# compiled pass loses: in a ResNet-50 probe at batch 16, 33 smaller whole-tensor rows took 8.1 ms
# compiled against 5.9 ms eager, its 74 larger ones 61 against 112 ms (bench/stats_pass.py).
MIN_ELEMENTS = 1 << 20

# What compiling costs a process, and what the compiled pass saves per byte of large outputs,
# from the same benchmark (BENCHMARKS.md, "The statistics pass"; 2-core AVX2 machine): the first
# compile took 10.6 s and the compiler's import 1.1 s (1.9 s and 1.0 s from torch's on-disk
# cache), and the 74 outputs of MIN_ELEMENTS or more (1336 MB) saved 52.1 ms. `auto` compiles
# only when the micro-batches still to run are expected to save more than a first compile costs:
# 308 GB of large outputs.
COMPILE_SECONDS = 12.0
SAVED_SECONDS_PER_BYTE = 52.1e-3 / 1336e6


def pays(large_bytes_per_batch: int, batches_left: int) -> bool:
    """Whether compiling is expected to save more time than it costs: ``large_bytes_per_batch``
    bytes of outputs of :data:`MIN_ELEMENTS` or more per micro-batch, over ``batches_left``
    micro-batches. Decided on sizes alone, never on timings, so a seed gives the same path (and
    the same bits) on every run."""
    return large_bytes_per_batch * batches_left * SAVED_SECONDS_PER_BYTE > COMPILE_SECONDS


def fits(y: torch.Tensor, min_elements: int | None = None) -> bool:
    """Whether the compiled pass can reduce ``y``: a contiguous float32 CPU tensor of at least
    ``min_elements`` (default :data:`MIN_ELEMENTS`). Large bfloat16 outputs are reduced in their
    own dtype by the eager path (recorder._measured); on an accelerator the eager path counts
    NaN/Inf without waiting for the device, which a fused pass would have to do in the kernel: not
    built, as no accelerator was at hand to measure."""
    import torch

    return (
        y.device.type == "cpu"
        and y.dtype == torch.float32
        and y.numel() >= (MIN_ELEMENTS if min_elements is None else min_elements)
        and y.is_contiguous()
    )


def _one_pass(x: Any) -> tuple[Any, ...]:
    """The function torch.compile fuses: a flat float32 tensor's shift, shifted sums and extremes."""
    shift = x[:4096].mean()
    d = x - shift
    return shift, d.sum(), (d * d).sum(), x.amin(), x.amax()


@dataclass
class CompiledStatistics:
    """One probe's compiled kernel, compiled on first use, and what it cost."""

    min_elements: int = field(default_factory=lambda: MIN_ELEMENTS)
    compile_seconds: float = 0.0
    tensors: int = 0  # outputs whose statistics came from a compiled kernel
    failure: str | None = None  # why the compiled pass was given up, if it was
    _kernel: _Timed | None = None

    def eligible(self, y: torch.Tensor) -> bool:
        """Whether ``y`` takes this probe's compiled pass: one that :func:`fits`, while compiling
        has not failed."""
        return self.failure is None and fits(y, self.min_elements)

    def reduce(self, y: torch.Tensor) -> list[float] | None:
        """``y``'s (count, mean, M2, min, max, NaN, Inf) from one pass; None where the eager passes
        must answer instead: ``y`` is not eligible, compiling failed, it holds NaN or Inf (whose
        counts the kernel does not take), or its shifted sums cancelled."""
        if not self.eligible(y):
            return None
        kernel = self._compiled()
        if kernel is None:
            return None
        try:
            partials = kernel(y.reshape(-1))
        except Exception as exc:  # the compiler's errors have no common base class
            self.failure = f"the compiled statistics pass failed ({first_line(exc)}); the eager passes ran instead"
            return None
        shift, shifted_sum, squares, low, high = (float(value) for value in partials)
        summed = _summed(shift, shifted_sum, squares, low, high, y.numel())
        if summed is not None:
            self.tensors += 1
        return summed

    def _compiled(self) -> _Timed | None:
        if self._kernel is not None:
            return self._kernel
        started = time.perf_counter()
        try:
            import torch

            compiled = torch.compile(_one_pass, dynamic=True, fullgraph=True)
        except Exception as exc:
            self.failure = f"torch.compile is not available ({first_line(exc)}); the eager passes ran instead"
            return None
        finally:
            self.compile_seconds += time.perf_counter() - started
        self._kernel = _Timed(compiled, self)
        return self._kernel

    def note(self) -> str:
        """What the report says about the pass: which ran, or why the compiled one did not. (Not
        what compiling cost: a report is the same bits for the same seed; `compile_seconds` is
        for benchmarks.)"""
        if self.failure is not None:
            return self.failure
        if not self.tensors:
            return (
                f"no output took the compiled statistics pass (float32 CPU outputs of {self.min_elements:,} "
                "elements or more, ReLU-family rows aside); the eager passes ran"
            )
        return f"large outputs reduced in one compiled pass each (torch.compile): {self.tensors}"


@dataclass
class _Timed:
    """A compiled kernel, called outside the probe's torch-function mode, whose first call (where
    the compiling happens) is charged to its owner."""

    kernel: Any
    owner: CompiledStatistics
    called: bool = False

    def __call__(self, view: torch.Tensor) -> Any:
        if self.called:
            with _without_function_modes():
                return self.kernel(view)
        started = time.perf_counter()
        # Compiling imports torch.utils.cpp_extension, which warns on a machine without CUDA that
        # it found none: true, and nothing to do with this kernel.
        quiet = logging.getLogger("torch.utils.cpp_extension")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            self.called = True
            return self(view)
        finally:
            quiet.setLevel(level)
            self.owner.compile_seconds += time.perf_counter() - started


@contextlib.contextmanager
def _without_function_modes() -> Iterator[None]:
    """No torch-function mode on the stack while a kernel runs. The probe's activation mode is on
    the stack in module hooks and off inside its own handler; a compiled function is guarded on
    the stack, so the two states alternated between compiled copies until torch.compile's
    recompile limit (8) sent the kernel back to eager."""
    import torch
    from torch.overrides import _pop_mode_temporarily

    with contextlib.ExitStack() as popped:
        for _ in range(torch._C._len_torch_function_stack()):
            popped.enter_context(_pop_mode_temporarily())
        yield


def _summed(
    shift: float, shifted_sum: float, squares: float, low: float, high: float, count: int
) -> list[float] | None:
    """(count, mean, M2, min, max, NaN, Inf) from the kernel's shift c, ``S = Σ(x-c)``,
    ``Q = Σ(x-c)²`` and extremes, or None when they cannot answer (non-finite values, cancelled
    sums): ``mean = c + S/n`` and ``M2 = Q - S²/n``."""
    if not all(math.isfinite(v) for v in (low, high, squares)):
        return None
    m2 = squares - shifted_sum * shifted_sum / count
    if m2 < CANCELLATION_GUARD * squares:
        return None  # the shift sat far from the mean
    return [float(count), shift + shifted_sum / count, m2, low, high, 0.0, 0.0]
