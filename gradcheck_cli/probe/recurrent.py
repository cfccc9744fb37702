"""Gradient through time for nn.RNN / nn.LSTM / nn.GRU (docs/theory.md#gradient-through-time).

The fused kernels expose neither the hidden state of every step nor the gates, so the probe
re-runs the layer's own equations step by step from its own weights, checks that the unrolled
output reproduces the fused output (on every micro-batch), and then lets the *unrolled* output
flow on through the model. Backward then passes through every h_t, and a hook on each h_t reads
dL/dh_t: the total gradient reaching step t, through the output and through time.

Equations (PyTorch's, weights laid out gate by gate):
  RNN   h = act(x W_ih^T + b_ih + h W_hh^T + b_hh)
  LSTM  i, f, g, o = split(x W_ih^T + b_ih + h W_hh^T + b_hh); c = s(f) c + s(i) tanh(g); h = s(o) tanh(c)
  GRU   r, z, n: r = s(.), z = s(.), n = tanh(x W_in^T + b_in + r (h W_hn^T + b_hn)); h = (1 - z) n + z h
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gradcheck_cli.probe.activations import saturated_mask
from gradcheck_cli.probe.recorder import sum_of_squares

if TYPE_CHECKING:
    import torch
    from torch import nn

# The horizon is the number of steps back from the last step over which |dL/dh_t| stays at or
# above this fraction of its value at the last step.
HORIZON_FRACTION = 0.01
GATE_NAMES = {"LSTM": ("input", "forget", "cell", "output"), "GRU": ("reset", "update", "new"), "RNN": ("hidden",)}
RECURRENT_TYPES = frozenset(GATE_NAMES)


@dataclass
class _Direction:
    """Accumulators for one (layer, direction) over every micro-batch."""

    layer: int
    direction: str
    steps: int = 0
    grad_sumsq: list[torch.Tensor] = field(default_factory=list)  # per step, device scalars
    gate_saturated: dict[str, float] = field(default_factory=dict)
    gate_sum: dict[str, float] = field(default_factory=dict)
    gate_count: dict[str, float] = field(default_factory=dict)
    pending: list[tuple[str, torch.Tensor, torch.Tensor, int]] = field(default_factory=list)


@dataclass
class RecurrentTrace:
    """What the probe learned about one recurrent module."""

    kind: str
    directions: list[_Direction] = field(default_factory=list)
    max_abs_error: float = 0.0
    tolerance: float = 0.0
    declined: str | None = None


def _tolerance(reference: torch.Tensor) -> float:
    scale = float(reference.detach().abs().max()) if reference.numel() else 0.0
    eps = 1e-6 if reference.dtype == reference.new_zeros(()).double().dtype else 2e-5
    return eps * max(1.0, scale) * 10


class RecurrentUnroller:
    """A forward hook (registered before the statistics hooks) that swaps in the unrolled output."""

    def __init__(self, module: nn.Module, kind: str, cutoff: float) -> None:
        self.module = module
        self.kind = kind
        self.cutoff = cutoff
        self.trace = RecurrentTrace(kind=kind)

    def declined_reason(self) -> str | None:
        m = self.module
        if getattr(m, "proj_size", 0):
            return "LSTM with proj_size is not unrolled"
        if m.training and getattr(m, "dropout", 0.0) > 0 and getattr(m, "num_layers", 1) > 1:
            return "inter-layer dropout in train mode makes the fused and unrolled outputs differ"
        return None

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        import torch
        from torch.nn.utils.rnn import PackedSequence

        reason = self.declined_reason()
        if reason is not None:
            self.trace.declined = reason
            return None
        inputs = args[0]
        hx = args[1] if len(args) > 1 else None
        packed = isinstance(inputs, PackedSequence)
        if packed:
            padded, lengths = torch.nn.utils.rnn.pad_packed_sequence(inputs, batch_first=False)
            sequence = padded  # (T, B, F), batch in the caller's original order
        else:
            sequence = inputs.transpose(0, 1) if module.batch_first and inputs.dim() == 3 else inputs
            lengths = None
        unbatched = sequence.dim() == 2
        if unbatched:
            sequence = sequence.unsqueeze(1)
        out_seq, finals = self._unroll(sequence, hx, lengths, unbatched)
        fused = output[0]
        if packed:
            rebuilt = _repack(out_seq, fused)
        else:
            rebuilt = out_seq.squeeze(1) if unbatched else out_seq
            if module.batch_first and not unbatched:
                rebuilt = rebuilt.transpose(0, 1)
        reference = fused.data if packed else fused
        candidate = rebuilt.data if packed else rebuilt
        error = float((candidate.detach() - reference.detach()).abs().max()) if reference.numel() else 0.0
        self.trace.max_abs_error = max(self.trace.max_abs_error, error)
        self.trace.tolerance = _tolerance(reference)
        if not error <= self.trace.tolerance:
            self.trace.declined = (
                f"the unrolled equations differ from the fused layer by {error:.3g} "
                f"(tolerance {self.trace.tolerance:.3g}); through-time data withheld"
            )
            for direction in self.trace.directions:
                direction.pending.clear()
            return None
        self._commit()
        return (rebuilt, finals)

    def _unroll(
        self, sequence: torch.Tensor, hx: Any, lengths: torch.Tensor | None, unbatched: bool
    ) -> tuple[torch.Tensor, Any]:
        import torch

        m = self.module
        assert isinstance(m, torch.nn.RNNBase)
        layers, hidden = int(m.num_layers), int(m.hidden_size)
        dirs = 2 if m.bidirectional else 1
        steps, batch = sequence.shape[0], sequence.shape[1]
        if hx is None:
            zeros = sequence.new_zeros(layers * dirs, batch, hidden)
            h0, c0 = zeros, zeros
        elif self.kind == "LSTM":
            h0, c0 = hx
            h0, c0 = (h0.unsqueeze(1), c0.unsqueeze(1)) if unbatched else (h0, c0)
        else:
            h0 = hx.unsqueeze(1) if unbatched else hx
            c0 = h0
        mask = None
        if lengths is not None:
            steps_index = torch.arange(steps, device=sequence.device).unsqueeze(1)
            mask = (steps_index < lengths.to(sequence.device).unsqueeze(0)).unsqueeze(-1)  # (T, B, 1)
        layer_input = sequence
        final_h, final_c = [], []
        if not self.trace.directions:
            self.trace.directions = [
                _Direction(layer=index, direction="forward" if d == 0 else "reverse")
                for index in range(layers)
                for d in range(dirs)
            ]
        for layer in range(layers):
            outputs = []
            for d in range(dirs):
                suffix = f"_l{layer}" + ("_reverse" if d else "")
                w_ih, w_hh = getattr(m, "weight_ih" + suffix), getattr(m, "weight_hh" + suffix)
                b_ih = getattr(m, "bias_ih" + suffix, None) if m.bias else None
                b_hh = getattr(m, "bias_hh" + suffix, None) if m.bias else None
                index = layer * dirs + d
                record = self.trace.directions[index]
                hs, h_last, c_last = self._run_direction(
                    layer_input, w_ih, w_hh, b_ih, b_hh, h0[index], c0[index], mask, reverse=d == 1, record=record
                )
                outputs.append(hs)
                final_h.append(h_last)
                final_c.append(c_last)
            layer_input = torch.cat(outputs, dim=2) if dirs == 2 else outputs[0]
        h_n = torch.stack(final_h)
        c_n = torch.stack(final_c)
        if unbatched:
            h_n, c_n = h_n.squeeze(1), c_n.squeeze(1)
        if mask is not None:
            layer_input = layer_input * mask
        return layer_input, ((h_n, c_n) if self.kind == "LSTM" else h_n)

    def _run_direction(
        self,
        xs: torch.Tensor,
        w_ih: torch.Tensor,
        w_hh: torch.Tensor,
        b_ih: torch.Tensor | None,
        b_hh: torch.Tensor | None,
        h: torch.Tensor,
        c: torch.Tensor,
        mask: torch.Tensor | None,
        *,
        reverse: bool,
        record: _Direction,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        import torch
        import torch.nn.functional as F

        steps = xs.shape[0]
        projected = F.linear(xs, w_ih, b_ih)  # all steps at once: (T, B, G*H)
        order = range(steps - 1, -1, -1) if reverse else range(steps)
        hs: list[torch.Tensor | None] = [None] * steps
        nonlinearity = getattr(self.module, "nonlinearity", "tanh")
        record.steps = steps
        for t in order:
            recurrent = F.linear(h, w_hh, b_hh)
            if self.kind == "LSTM":
                gates = projected[t] + recurrent
                i, f, g, o = gates.chunk(4, dim=-1)
                i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
                c_new = f * c + i * g
                h_new = o * torch.tanh(c_new)
                self._gates(
                    record,
                    {"input": (i, "sigmoid"), "forget": (f, "sigmoid"), "cell": (g, "tanh"), "output": (o, "sigmoid")},
                )
            elif self.kind == "GRU":
                x_r, x_z, x_n = projected[t].chunk(3, dim=-1)
                h_r, h_z, h_n = recurrent.chunk(3, dim=-1)
                r = torch.sigmoid(x_r + h_r)
                z = torch.sigmoid(x_z + h_z)
                n = torch.tanh(x_n + r * h_n)
                h_new = (1 - z) * n + z * h
                c_new = c
                self._gates(record, {"reset": (r, "sigmoid"), "update": (z, "sigmoid"), "new": (n, "tanh")})
            else:
                pre = projected[t] + recurrent
                h_new = torch.tanh(pre) if nonlinearity == "tanh" else torch.relu(pre)
                c_new = c
                self._gates(record, {"hidden": (h_new, "tanh" if nonlinearity == "tanh" else "relu")})
            if mask is not None:
                h_new = torch.where(mask[t], h_new, h)
                c_new = torch.where(mask[t], c_new, c)
            if h_new.requires_grad:
                h_new.register_hook(self._step_hook(record, t))
            hs[t] = h_new
            h, c = h_new, c_new
        stacked = torch.stack([step for step in hs if step is not None])
        return stacked, h, c

    def _gates(self, record: _Direction, gates: dict[str, tuple[torch.Tensor, str]]) -> None:
        import torch

        with torch.no_grad():
            for name, (value, fn) in gates.items():
                # A ReLU RNN's hidden units 'saturate' where they are zero: no gradient passes.
                saturated = (value <= 0).sum() if fn == "relu" else saturated_mask(fn, value, self.cutoff, {}).sum()
                record.pending.append((name, saturated, value.sum(), value.numel()))

    def _commit(self) -> None:
        for record in self.trace.directions:
            for name, saturated, total, count in record.pending:
                record.gate_saturated[name] = record.gate_saturated.get(name, 0.0) + float(saturated)
                record.gate_sum[name] = record.gate_sum.get(name, 0.0) + float(total)
                record.gate_count[name] = record.gate_count.get(name, 0.0) + count
            record.pending.clear()

    def _step_hook(self, record: _Direction, t: int) -> Any:
        import torch

        def hook(grad: torch.Tensor) -> None:
            with torch.no_grad():
                value = sum_of_squares(grad.detach())
                while len(record.grad_sumsq) <= t:
                    record.grad_sumsq.append(torch.zeros((), dtype=torch.float64, device=grad.device))
                record.grad_sumsq[t] = record.grad_sumsq[t] + value

        return hook


def _repack(out_seq: torch.Tensor, like: Any) -> Any:
    """Lay a padded (T, B, H) output out as ``like``'s PackedSequence (same order, same sizes)."""
    import torch
    from torch.nn.utils.rnn import PackedSequence

    ordered = out_seq if like.sorted_indices is None else out_seq.index_select(1, like.sorted_indices)
    chunks = [ordered[t, : int(size)] for t, size in enumerate(like.batch_sizes)]
    return PackedSequence(torch.cat(chunks), like.batch_sizes, like.sorted_indices, like.unsorted_indices)


def spectral_radii(module: nn.Module, kind: str, layer: int, reverse: bool) -> dict[str, float]:
    """Spectral radius of each square recurrent block of W_hh (one per gate)."""
    suffix = f"_l{layer}" + ("_reverse" if reverse else "")
    return spectral_radii_of(getattr(module, "weight_hh" + suffix), kind)


def spectral_radii_of(weight_hh: torch.Tensor, kind: str) -> dict[str, float]:
    import torch

    weight = weight_hh.detach().double().cpu()
    names = GATE_NAMES[kind]
    blocks = weight.chunk(len(names), dim=0)
    return {name: float(torch.linalg.eigvals(block).abs().max()) for name, block in zip(names, blocks, strict=True)}


def fit_decay(norms: list[float]) -> tuple[float | None, int]:
    """(per-step rate, horizon) from |dL/dh| ordered from the last processed step backwards.

    The rate is exp of the least-squares slope of log|dL/dh| against steps back (below 1: the
    gradient decays going back in time; above 1: it grows). The horizon counts the steps back,
    from the last, while the norm stays at or above HORIZON_FRACTION of the last step's.
    """
    points = [(k, math.log(v)) for k, v in enumerate(norms) if v > 0]
    rate = None
    if len(points) >= 2:
        mean_k = sum(k for k, _ in points) / len(points)
        mean_v = sum(v for _, v in points) / len(points)
        var_k = sum((k - mean_k) ** 2 for k, _ in points)
        slope = sum((k - mean_k) * (v - mean_v) for k, v in points) / var_k
        rate = math.exp(slope)
    horizon = 0
    if norms and norms[0] > 0:
        for value in norms:
            if value < HORIZON_FRACTION * norms[0]:
                break
            horizon += 1
    return rate, horizon
