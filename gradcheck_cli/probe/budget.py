"""The probe's memory, estimated before it runs: a probe that exceeds the memory available or the
user's `memory_budget` is split into micro-batches that fit (statistics merge exactly), and
refused, saying so, when even one sample does not fit.

The estimate is deliberately simple and errs high:

* parameters and buffers, plus the gradients the lean probe holds at once (probe/lean.py): the
  largest single parameter's for one micro-batch, every trainable parameter's for several
  (the norm of the summed gradient needs the sum);
* one micro-batch of inputs;
* activations: every leaf module's output measured on a *one-sample* forward (under no_grad,
  so it is cheap), times the micro-batch size, times two (the activation kept for backward and
  its gradient during backward).

torch is imported inside the functions; the records are plain.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradcheck_cli.errors import ProbeError, UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_memory_budget(text: str) -> int:
    """'4GiB', '512MB', '2g', '1.5GiB' or plain bytes, to bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise UsageError(f"`memory_budget` {text!r} is not a size", hint="e.g. `memory_budget` 4GiB or 512MB")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise UsageError(f"`memory_budget` {text!r} must be positive", hint="e.g. `memory_budget` 4GiB")
    return value


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes the probe needs for one micro-batch of ``batch_size`` samples."""

    parameters: int  # parameters and buffers
    gradients: int  # the gradients held at once (the largest alone for one micro-batch, else all)
    inputs_per_sample: int
    activations_per_sample: int  # activation + its gradient, per sample (0 when not measured)
    batch_size: int
    measured: bool  # whether activations come from a forward pass (False: not measurable)
    micro_batches: int = 1
    # Parameters and buffers already on the device the probe runs on: they count against a
    # `memory_budget` (the probe's whole footprint) but not against the memory still available,
    # which they have already been taken from.
    resident: int = 0

    @property
    def fixed(self) -> int:
        return self.parameters + self.gradients

    @property
    def per_sample(self) -> int:
        return self.inputs_per_sample + self.activations_per_sample

    @property
    def total(self) -> int:
        return self.fixed + self.per_sample * self.batch_size


def _nbytes(value: Any) -> int:
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 0


def estimate_probe_memory(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    kwargs: dict[str, torch.Tensor] | None = None,
    *,
    measure: bool = True,
    micro_batches: int = 1,
) -> MemoryEstimate:
    """Estimate the probe of ``module`` on one micro-batch ``args``/``kwargs`` (batch first), run as
    one of ``micro_batches``.

    With ``measure``, a one-sample forward (no_grad, eval mode restored afterwards) sizes the
    activations; a model that cannot be hooked or run on one sample is estimated without them.
    """
    kwargs = kwargs or {}
    tensors = list(args) + list(kwargs.values())
    batch_size = int(tensors[0].shape[0]) if tensors and tensors[0].dim() else 1
    params = list(module.parameters())
    parameters = sum(_nbytes(p) for p in params) + sum(_nbytes(b) for b in module.buffers())
    gradients = gradient_bytes(module, micro_batches)
    inputs_per_sample = math.ceil(sum(_nbytes(t) for t in tensors) / max(batch_size, 1))
    activations = 0
    measured = False
    if measure and batch_size >= 1:
        try:
            activations = _activation_bytes_one_sample(module, args, kwargs)
            measured = True
        except Exception:  # the estimate is advisory: an unhookable model is estimated without it
            activations = 0
    return MemoryEstimate(
        parameters=parameters,
        gradients=gradients,
        inputs_per_sample=inputs_per_sample,
        activations_per_sample=2 * activations,
        batch_size=batch_size,
        measured=measured,
        micro_batches=micro_batches,
    )


def gradient_bytes(module: nn.Module, micro_batches: int) -> int:
    """Bytes of gradients the lean probe holds at once (counted for every floating parameter: the
    probe makes each one require a gradient)."""
    sizes = {id(p): _nbytes(p) for p in module.parameters() if p.dtype.is_floating_point}
    if not sizes:
        return 0
    return max(sizes.values()) if micro_batches <= 1 else sum(sizes.values())


def _activation_bytes_one_sample(
    module: nn.Module, args: tuple[torch.Tensor, ...], kwargs: dict[str, torch.Tensor]
) -> int:
    import torch

    total = 0

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        nonlocal total
        total += _nbytes(output)

    handles = [
        sub.register_forward_hook(hook)
        for sub in module.modules()
        if not any(True for _ in sub.children()) and not isinstance(sub, torch.jit.ScriptModule)
    ]
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad():
            output = module(*(a[:1] for a in args), **{k: v[:1] for k, v in kwargs.items()})
        total += _nbytes(output)
    finally:
        for handle in handles:
            handle.remove()
        module.train(was_training)
    return total


def available_memory(device: str = "cpu") -> int | None:
    """Bytes the probe may use on ``device``: free GPU memory, or the smaller of the host's available
    memory and this process's cgroup limit. None when it cannot be told."""
    if device.startswith("cuda"):
        import torch

        try:
            free, _ = torch.cuda.mem_get_info(torch.device(device))
        except Exception:
            return None
        return int(free)
    candidates = [v for v in (_meminfo_available(), _cgroup_headroom()) if v is not None]
    return min(candidates) if candidates else None


def _meminfo_available(path: Path = Path("/proc/meminfo")) -> int | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    match = re.search(r"^MemAvailable:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def _cgroup_headroom(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """cgroup v2 memory.max - memory.current, or v1 limit - usage; None when unlimited or unknown."""
    for limit_name, usage_name in (
        ("memory.max", "memory.current"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes"),
    ):
        try:
            limit_text = (root / limit_name).read_text().strip()
            usage = int((root / usage_name).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit_text == "max" or not limit_text.isdigit() or int(limit_text) >= 2**60:
            return None
        return max(int(limit_text) - usage, 0)
    return None


def _limits(estimate: MemoryEstimate, budget: int | None, available: int | None) -> list[tuple[int, str, int, int]]:
    """(limit, its name, what the probe needs against it, the part of that independent of the batch)."""
    checks = [(budget, "`memory_budget`", 0), (available, "available memory", estimate.resident)]
    return [
        (limit, what, estimate.total - resident, estimate.fixed - resident)
        for limit, what, resident in checks
        if limit is not None
    ]


def micro_batch_that_fits(
    estimate: MemoryEstimate, *, budget: int | None = None, available: int | None = None
) -> int | None:
    """None when the estimate fits ``budget`` (the user's) and ``available`` (the machine's);
    else the largest micro-batch size that does. Raises :class:`ProbeError` when not even one
    sample fits. None for either limit means no limit."""
    smallest: int | None = None
    for limit, what, need, fixed in _limits(estimate, budget, available):
        if need <= limit:
            continue
        needs = f"the probe needs about {_human(need)} for a micro-batch of {estimate.batch_size}"
        if fixed >= limit:
            held = "the largest gradient" if estimate.micro_batches <= 1 else "their gradients"
            raise ProbeError(
                f"{needs}; the weights and {held} alone take {_human(fixed)}, more than the {_human(limit)} of {what}",
                hint="run on a device with more memory, or shard the weights across processes "
                "(torchrun --nproc-per-node N: each holds 1/N of them), or raise `memory_budget`",
            )
        fits = (limit - fixed) // max(estimate.per_sample, 1)
        if fits < 1:
            raise ProbeError(
                f"{needs}; even a micro-batch of 1 needs about "
                f"{_human(fixed + estimate.per_sample)}, more than the {_human(limit)} of {what}",
                hint="shorten the sequences (`seq_len`: activations grow with it), turn on "
                "`activation_checkpointing` (transformers models), run on a device with more "
                "memory, or raise `memory_budget`",
            )
        smallest = int(fits) if smallest is None else min(smallest, int(fits))
    return smallest


def over_limit(estimate: MemoryEstimate, *, budget: int | None = None, available: int | None = None) -> str:
    """Which limit the estimate exceeds (the tightest), in words, for the note that says why the
    probe split."""
    limit, what, need, _ = max(_limits(estimate, budget, available), key=lambda check: check[2] - check[0])
    return f"about {_human(need)} for a micro-batch of {estimate.batch_size}, more than the {_human(limit)} of {what}"


def check_memory_budget(
    estimate: MemoryEstimate,
    *,
    budget: int | None = None,
    available: int | None = None,
    total_samples: int | None = None,
) -> None:
    """Raise :class:`ProbeError` when the estimate exceeds ``budget`` or ``available``, with the
    micro-batch split that would fit (for callers that cannot split by themselves)."""
    fits = micro_batch_that_fits(estimate, budget=budget, available=available)
    if fits is None:
        return
    samples = total_samples or estimate.batch_size
    raise ProbeError(
        f"the probe needs {over_limit(estimate, budget=budget, available=available)}",
        hint=f"micro-batch it: `batch_size` {fits} `batches` {math.ceil(samples / fits)} "
        "(statistics are merged exactly)",
    )


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns
