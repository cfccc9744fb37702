"""BatchNorm folding as plain tensor functions (docs/theory.md#folding-batchnorm). No modules, no graphs.

In eval mode a BatchNorm is a fixed per-channel affine map ``BN(z) = scale·z + shift`` with

    scale = gamma / sqrt(var + eps),    shift = beta - mean·scale

Folding it into a neighbouring linear layer ``z = W·x + b`` changes only W and b:

- after the layer:  W'[c] = W[c]·scale[c],  b' = b·scale + shift       (c = output channel)
- before the layer: W'[.., i] = W[.., i]·scale[i],  b' = b + W·shift    (i = input channel)

The channel axis of the weight depends on the layer type, never on a flag: Conv weights are
(C_out, C_in/groups, k...), ConvTranspose weights are (C_in, C_out/groups, k...), Linear (and
ONNX Gemm with transB=1) weights are (out, in). Both the torch and the ONNX passes call these
functions, and the maths runs in numpy for both (torch tensors are viewed, not copied, on the
CPU), so the two paths perform the very same float operations and the ONNX pass never needs torch.

Everything is computed in float64 and rounded once to the layer's dtype at the end: the folded
weights are then the correctly rounded values of the exact products, and the only differences
left against the unfolded model are from the different order of float operations at run time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gradcheck_cli.choice import Choice

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    import torch

# A numpy array or a torch tensor. The maths always runs in numpy (so that the torch and the ONNX
# passes share not only the formulas but the very same float operations, and the ONNX pass never
# imports torch); each function hands its results back as the kind of array its weight came in,
# on the weight's device.
Array = Any


class LayerKind(Choice):
    """How a linear layer's weight is laid out."""

    CONV = "conv"  # (C_out, C_in/groups, *kernel)
    CONV_TRANSPOSE = "conv_transpose"  # (C_in, C_out/groups, *kernel)
    LINEAR = "linear"  # (out, in): y = x·Wᵀ + b


@dataclass(frozen=True)
class ChannelAffine:
    """A BatchNorm in eval mode as ``scale·z + shift`` per channel (numpy float64 vectors)."""

    scale: npt.NDArray[np.float64]
    shift: npt.NDArray[np.float64]


def bn_affine(
    *,
    running_mean: Array,
    running_var: Array,
    eps: float,
    weight: Array | None = None,
    bias: Array | None = None,
) -> ChannelAffine:
    """The eval-mode BatchNorm as a per-channel affine map (None weight/bias: gamma=1, beta=0)."""
    import numpy as np

    mean = _float64(running_mean)
    var = _float64(running_var)
    gamma = np.ones_like(mean) if weight is None else _float64(weight)
    beta = np.zeros_like(mean) if bias is None else _float64(bias)
    scale = gamma / np.sqrt(var + eps)
    return ChannelAffine(scale=scale, shift=beta - mean * scale)


def fold_after(
    weight: Array,
    bias: Array | None,
    affine: ChannelAffine,
    *,
    kind: LayerKind,
    groups: int = 1,
) -> tuple[Array, Array]:
    """(W', b') of ``BN(layer(x))`` as one layer; b' always exists (a bias-free layer gets one).

    Only the per-channel vectors are float64 arrays of their own; the weight is multiplied by
    them in one broadcast operation that reads it in its own dtype and writes float64 (numpy
    promotes on the fly), which is then rounded once to the weight's dtype.
    """
    import numpy as np

    w = _readable(weight)
    out_channels = _out_channels(w, kind=kind, groups=groups)
    _check_channels(affine, out_channels, "output")
    b = np.zeros(out_channels, dtype=np.float64) if bias is None else _float64(bias)
    if kind is LayerKind.CONV_TRANSPOSE:
        # (C_in, C_out/g, k...) -> (g, C_in/g, C_out/g, k...): output channel = group·(C_out/g) + j.
        in_channels, per_group = w.shape[0], w.shape[1]
        grouped = w.reshape(groups, in_channels // groups, per_group, *w.shape[2:])
        factor = affine.scale.reshape(groups, 1, per_group, *([1] * (w.ndim - 2)))
        new_w = np.multiply(grouped, factor, dtype=np.float64).reshape(w.shape)
    else:
        new_w = np.multiply(w, affine.scale.reshape(-1, *([1] * (w.ndim - 1))), dtype=np.float64)
    new_b = b * affine.scale + affine.shift
    return _like(new_w, weight), _like(new_b, weight)


def fold_before(
    weight: Array,
    bias: Array | None,
    affine: ChannelAffine,
    *,
    kind: LayerKind,
    groups: int = 1,
) -> tuple[Array, Array]:
    """(W', b') of ``layer(BN(x))`` as one layer. Exact only when the layer sees no zero padding.

    ConvTranspose is not supported: the shift would reach each output through a number of kernel
    taps that varies with position (borders, stride), so it is not a per-channel bias.
    """
    import numpy as np

    if kind is LayerKind.CONV_TRANSPOSE:
        raise ValueError("a BatchNorm before a ConvTranspose cannot be folded exactly")
    w = _float64(weight)
    out_channels = w.shape[0]
    b = np.zeros(out_channels, dtype=np.float64) if bias is None else _float64(bias)
    if kind is LayerKind.LINEAR:
        _check_channels(affine, w.shape[1], "input")
        new_w = w * affine.scale.reshape(1, -1)
        new_b = b + w @ affine.shift
        return _like(new_w, weight), _like(new_b, weight)
    # Conv: (C_out, C_in/g, k...). Input channel seen by weight[o, i] is group(o)·(C_in/g) + i.
    per_group_in = w.shape[1]
    _check_channels(affine, per_group_in * groups, "input")
    per_group_out = out_channels // groups
    spatial = [1] * (w.ndim - 2)
    scale = np.broadcast_to(affine.scale.reshape(groups, 1, per_group_in), (groups, per_group_out, per_group_in))
    shift = np.broadcast_to(affine.shift.reshape(groups, 1, per_group_in), (groups, per_group_out, per_group_in))
    scale = scale.reshape(out_channels, per_group_in, *spatial)
    shift = shift.reshape(out_channels, per_group_in, *spatial)
    new_w = w * scale
    new_b = b + (w * shift).reshape(out_channels, -1).sum(axis=1)
    return _like(new_w, weight), _like(new_b, weight)


def affine_for_rank(affine: ChannelAffine, *, rank: int, dtype: Any, channel_axis: int = 1) -> tuple[Array, Array]:
    """(scale, shift) shaped to broadcast over a rank-``rank`` tensor along ``channel_axis``.

    ``dtype`` is a numpy dtype (numpy arrays back) or a torch dtype (CPU tensors back).
    """
    shape = [1] * rank
    shape[channel_axis] = -1
    scale, shift = affine.scale.reshape(shape), affine.shift.reshape(shape)
    if _is_torch_dtype(dtype):
        import torch

        return torch.from_numpy(scale).to(dtype), torch.from_numpy(shift).to(dtype)
    return scale.astype(dtype), shift.astype(dtype)


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


def _out_channels(w: Array, *, kind: LayerKind, groups: int) -> int:
    if kind is LayerKind.CONV_TRANSPOSE:
        return int(w.shape[1]) * groups
    return int(w.shape[0])


def _check_channels(affine: ChannelAffine, expected: int, side: str) -> None:
    if affine.scale.size != expected:
        raise ValueError(f"BatchNorm has {affine.scale.size} channels but the layer has {expected} {side} channels")


# numpy has no bfloat16: such tensors are widened to float32 (exactly) before the maths.
_NUMPY_TORCH_DTYPES = ("torch.float16", "torch.float32", "torch.float64")


def _is_torch_dtype(dtype: Any) -> bool:
    return type(dtype).__module__.startswith("torch")


def _readable(value: Array) -> Any:
    """A numpy view of ``value`` in a dtype numpy has (no copy for CPU float16/32/64 tensors)."""
    import numpy as np

    if isinstance(value, np.ndarray):
        return value
    tensor = value.detach()
    if str(tensor.dtype) not in _NUMPY_TORCH_DTYPES:
        tensor = tensor.float()
    return tensor.cpu().numpy()


def _float64(value: Array) -> npt.NDArray[np.float64]:
    import numpy as np

    return np.asarray(_readable(value), dtype=np.float64)


def _like(values: npt.NDArray[np.float64], reference: Array) -> Array:
    """``values`` rounded once to ``reference``'s dtype, as the same kind of array (and device)."""
    import numpy as np

    if isinstance(reference, np.ndarray):
        return values.astype(reference.dtype)
    import torch

    if str(reference.dtype) in _NUMPY_TORCH_DTYPES:
        rounded = torch.from_numpy(values.astype(str(reference.dtype).removeprefix("torch.")))
    else:  # bfloat16 and the like: torch rounds float64 to them directly, once
        rounded = torch.from_numpy(values).to(reference.dtype)
    return rounded.to(reference.device)
