"""Zero-initialised branches: which zero parameters gate a branch, and which layers sit behind them.

timm's ``zero_init_last`` and torchvision's ``zero_init_residual`` set a residual branch's last
BatchNorm gamma to 0 (Goyal et al. 2017), ReZero/SkipInit a scalar alpha, DiT its adaLN
modulation, LoRA its B matrix. Each branch then starts as the identity (or as the base layer),
and every parameter inside it gets exactly zero gradient at step 0 by design: the gate itself
gets a gradient and opens the branch after one step.

A zero parameter is a *candidate* (:func:`gradcheck_cli.gate.scan.zero_parameters`: a norm's gamma,
a weight matrix, any non-bias parameter at exactly 0). Whether it gates something is decided from
the gradients, not from its name or spelling (module or functional): the probe runs once more
with every candidate opened, and a layer whose gradient was below the bound with the gates
closed and is above it with them open sits behind a gate. The model is restored afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from gradcheck_cli.gate.scan import GateKind, ZeroParameter
from gradcheck_cli.records import Report, RowKind

if TYPE_CHECKING:
    import torch

    from gradcheck_cli.model.handle import LoadedModel
    from gradcheck_cli.options import ProbeOptions


@dataclass(frozen=True)
class ZeroInitBranches:
    """The zero parameters that gate a branch, and the rows whose gradient they hold at 0."""

    gates: tuple[ZeroParameter, ...] = ()
    gated: frozenset[str] = frozenset()  # row names
    behind: dict[str, tuple[str, ...]] | None = None  # gate name -> the rows it holds at 0

    @property
    def modules(self) -> frozenset[str]:
        """Module paths of the gates (their own rows output zeros by design)."""
        return frozenset(g.module for g in self.gates)


def find_branches(
    loaded: LoadedModel,
    probe: ProbeOptions,
    report: Report,
    candidates: tuple[ZeroParameter, ...],
    *,
    bound: float,
) -> ZeroInitBranches:
    """The gates among ``candidates`` and the rows behind them, from one more probe run with
    every candidate opened. No run when nothing is at zero or no row's gradient is below
    ``bound`` (then nothing can be gated)."""
    small = {
        row.name: row.module
        for row in report.layers
        if row.kind is RowKind.PARAM and row.grad is not None and row.grad.norm is not None and row.grad.norm < bound
    }
    if not candidates or not small:
        return ZeroInitBranches()
    opened = _opened_report(loaded, probe, candidates)
    reopened = {
        row.name
        for row in opened.layers
        if row.name in small and row.grad is not None and row.grad.norm is not None and row.grad.norm >= bound
    }
    behind: dict[str, list[str]] = {}
    for name in sorted(reopened, key=lambda n: next(r.index for r in report.layers if r.name == n)):
        gate = _nearest(candidates, small[name])
        behind.setdefault(gate.name, []).append(name)
    gates = tuple(c for c in candidates if c.name in behind)
    # Activations fed only by a closed branch output zeros by design (a squeeze-excitation block
    # at the end of an NF-ResNet branch whose last conv starts at 0): their units revive once the
    # gates open, so their "dead" units are the gate's doing, not a fault.
    dead_before = {r.name: r.dead.units for r in report.layers if r.dead is not None and r.dead.units}
    revived = {
        r.name
        for r in opened.layers
        if r.name in dead_before and r.dead is not None and r.dead.units <= dead_before[r.name] // 2
    }
    return ZeroInitBranches(
        gates=gates,
        gated=frozenset(reopened | (revived if gates else set())),
        behind={k: tuple(v) for k, v in behind.items()},
    )


def _nearest(candidates: tuple[ZeroParameter, ...], module: str) -> ZeroParameter:
    """The candidate whose module shares the longest module path with ``module``: a gated layer
    lies in the branch its gate closes (layer1.0.conv1 behind layer1.0.bn2)."""
    parts = module.split(".") if module else []

    def shared(candidate: ZeroParameter) -> int:
        other = candidate.module.split(".") if candidate.module else []
        count = 0
        for a, b in zip(parts, other, strict=False):
            if a != b:
                break
            count += 1
        return count

    return max(candidates, key=shared)  # max keeps the first of equals: execution order


def _opened_report(loaded: LoadedModel, probe: ProbeOptions, candidates: tuple[ZeroParameter, ...]) -> Report:
    import torch

    from gradcheck_cli.probe.entry import inspect_loaded

    parameters = dict(loaded.module.named_parameters())
    saved: dict[str, torch.Tensor] = {}
    generator = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            for candidate in candidates:
                tensor = parameters.get(candidate.name)
                if tensor is None:
                    continue
                saved[candidate.name] = tensor.detach().clone()
                tensor.copy_(_open_value(tensor, candidate.kind, generator))
        return inspect_loaded(loaded, probe)
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                parameters[name].copy_(value)


def _open_value(tensor: torch.Tensor, kind: GateKind, generator: torch.Generator) -> torch.Tensor:
    """A value that lets the signal through: gamma 1, a scale 1, a matrix at LeCun scale."""
    import torch

    if kind is GateKind.NORM_SCALE or tensor.dim() < 2:
        return torch.ones_like(tensor)
    fan_in = tensor.numel() // tensor.shape[0]
    draw = torch.randn(tensor.shape, generator=generator, dtype=torch.float64) * (1.0 / max(fan_in, 1) ** 0.5)
    opened: torch.Tensor = draw.to(dtype=tensor.dtype, device=tensor.device)
    return opened
