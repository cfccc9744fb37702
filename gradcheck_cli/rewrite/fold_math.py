"""BatchNorm folding as plain tensor functions (THEORY.md section 7). No modules, no graphs.

In eval mode a BatchNorm is a fixed per-channel affine map ``BN(z) = scale·z + shift`` with

    scale = gamma / sqrt(var + eps),    shift = beta - mean·scale

Folding it into a neighbouring linear layer ``z = W·x + b`` changes only W and b:

- after the layer:  W'[c] = W[c]·scale[c],  b' = b·scale + shift       (c = output channel)
- before the layer: W'[.., i] = W[.., i]·scale[i],  b' = b + W·shift    (i = input channel)

The channel axis of the weight depends on the layer type, never on a flag: Conv weights are
(C_out, C_in/groups, k...), ConvTranspose weights are (C_in, C_out/groups, k...), Linear (and
ONNX Gemm with transB=1) weights are (out, in). Both the torch and the ONNX passes call these
functions, so the two paths cannot disagree on the maths.

Everything is computed in float64 and rounded once to the layer's dtype at the end: the folded
weights are then the correctly rounded values of the exact products, and the only differences
left against the unfolded model are from the different order of float operations at run time.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class LayerKind(str, Enum):
    """How a linear layer's weight is laid out."""

    CONV = "conv"  # (C_out, C_in/groups, *kernel)
    CONV_TRANSPOSE = "conv_transpose"  # (C_in, C_out/groups, *kernel)
    LINEAR = "linear"  # (out, in): y = x·Wᵀ + b

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class ChannelAffine:
    """A BatchNorm in eval mode as ``scale·z + shift`` per channel (float64)."""

    scale: torch.Tensor
    shift: torch.Tensor


def bn_affine(
    *,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> ChannelAffine:
    """The eval-mode BatchNorm as a per-channel affine map (None weight/bias: gamma=1, beta=0)."""
    import torch

    mean = running_mean.detach().to(torch.float64)
    var = running_var.detach().to(torch.float64)
    gamma = torch.ones_like(mean) if weight is None else weight.detach().to(torch.float64)
    beta = torch.zeros_like(mean) if bias is None else bias.detach().to(torch.float64)
    scale = gamma / torch.sqrt(var + eps)
    return ChannelAffine(scale=scale, shift=beta - mean * scale)


def fold_after(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    affine: ChannelAffine,
    *,
    kind: LayerKind,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', b') of ``BN(layer(x))`` as one layer; b' always exists (a bias-free layer gets one)."""
    import torch

    w = weight.detach().to(torch.float64)
    out_channels = _out_channels(w, kind=kind, groups=groups)
    _check_channels(affine, out_channels, "output")
    b = (
        torch.zeros(out_channels, dtype=torch.float64)
        if bias is None
        else bias.detach().to(torch.float64)
    )
    if kind is LayerKind.CONV_TRANSPOSE:
        # (C_in, C_out/g, k...) -> (g, C_in/g, C_out/g, k...): output channel = group·(C_out/g) + j.
        in_channels, per_group = w.shape[0], w.shape[1]
        grouped = w.reshape(groups, in_channels // groups, per_group, *w.shape[2:])
        factor = affine.scale.reshape(groups, 1, per_group, *([1] * (w.dim() - 2)))
        new_w = (grouped * factor).reshape(w.shape)
    else:
        new_w = w * affine.scale.reshape(-1, *([1] * (w.dim() - 1)))
    new_b = b * affine.scale + affine.shift
    return new_w.to(weight.dtype), new_b.to(weight.dtype)


def fold_before(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    affine: ChannelAffine,
    *,
    kind: LayerKind,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', b') of ``layer(BN(x))`` as one layer. Exact only when the layer sees no zero padding.

    ConvTranspose is not supported: the shift would reach each output through a number of kernel
    taps that varies with position (borders, stride), so it is not a per-channel bias.
    """
    import torch

    if kind is LayerKind.CONV_TRANSPOSE:
        raise ValueError("a BatchNorm before a ConvTranspose cannot be folded exactly")
    w = weight.detach().to(torch.float64)
    out_channels = w.shape[0]
    b = (
        torch.zeros(out_channels, dtype=torch.float64)
        if bias is None
        else bias.detach().to(torch.float64)
    )
    if kind is LayerKind.LINEAR:
        _check_channels(affine, w.shape[1], "input")
        new_w = w * affine.scale.reshape(1, -1)
        new_b = b + w @ affine.shift
        return new_w.to(weight.dtype), new_b.to(weight.dtype)
    # Conv: (C_out, C_in/g, k...). Input channel seen by weight[o, i] is group(o)·(C_in/g) + i.
    per_group_in = w.shape[1]
    _check_channels(affine, per_group_in * groups, "input")
    per_group_out = out_channels // groups
    spatial = [1] * (w.dim() - 2)
    scale = affine.scale.reshape(groups, 1, per_group_in).expand(
        groups, per_group_out, per_group_in
    )
    shift = affine.shift.reshape(groups, 1, per_group_in).expand(
        groups, per_group_out, per_group_in
    )
    scale = scale.reshape(out_channels, per_group_in, *spatial)
    shift = shift.reshape(out_channels, per_group_in, *spatial)
    new_w = w * scale
    new_b = b + (w * shift).flatten(1).sum(dim=1)
    return new_w.to(weight.dtype), new_b.to(weight.dtype)


def affine_for_rank(
    affine: ChannelAffine, *, rank: int, dtype: torch.dtype, channel_axis: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) shaped to broadcast over a rank-``rank`` tensor along ``channel_axis``."""
    shape = [1] * rank
    shape[channel_axis] = -1
    return affine.scale.reshape(shape).to(dtype), affine.shift.reshape(shape).to(dtype)


def identity_running_var(eps: float, dtype: torch.dtype) -> float:
    """A running_var v with fl(v + eps) == 1 in ``dtype``, so that BN(z) = z exactly.

    Used where a folded BatchNorm must stay in the architecture (state_dict output). The plain
    1 - eps can round so that v + eps lands one ulp away from 1; step to a neighbour when it does.
    """
    import torch

    one = torch.tensor(1.0, dtype=dtype)
    candidate = torch.tensor(1.0 - eps, dtype=dtype)
    for _ in range(8):
        total = candidate + torch.tensor(eps, dtype=dtype)
        if total == one:
            return float(candidate)
        direction = torch.tensor(-1.0 if total > one else 2.0, dtype=dtype)
        candidate = torch.nextafter(candidate, direction)
    return float(1.0 - eps)  # no exact neighbour: within one ulp, still reported by verification


def _out_channels(w: torch.Tensor, *, kind: LayerKind, groups: int) -> int:
    if kind is LayerKind.CONV_TRANSPOSE:
        return int(w.shape[1]) * groups
    return int(w.shape[0])


def _check_channels(affine: ChannelAffine, expected: int, side: str) -> None:
    if affine.scale.numel() != expected:
        raise ValueError(
            f"BatchNorm has {affine.scale.numel()} channels but the layer has {expected} "
            f"{side} channels"
        )
