"""Small torch helpers shared by the loaders, the probe and the rewrites. torch is never imported
at module level here: these functions only touch modules they are given."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn


def type_name(module: nn.Module) -> str:
    """The layer's class name, also for TorchScript modules (which all share one Python class) and
    for modules FSDP2 has sharded (it swaps the class for ``FSDP<Class>(FSDPModule, Class)``)."""
    original = getattr(module, "original_name", None)
    if isinstance(original, str):
        return original
    cls = type(module)
    if cls.__name__.startswith("FSDP") and len(cls.__bases__) == 2 and cls.__bases__[0].__name__ == "FSDPModule":
        return cls.__bases__[1].__name__
    return cls.__name__


def set_training(module: nn.Module, training: bool) -> bool:
    """``module.train(training)``; False where the module refuses (a torch.export program's module
    keeps the mode it was exported in, and says so by raising)."""
    try:
        module.train(training)
    except NotImplementedError:
        return False
    return True


def open_bound(owner: nn.Module, leaf: str) -> bool:
    """Whether ``owner``'s buffer ``leaf``, found not finite, is a setting rather than damage: a
    buffer made only of +inf or only of -inf is an open bound (Gemma 4's clippable linear layers
    keep ``input_min = -inf`` and ``input_max = +inf`` when they do not clip). A normalisation's
    running statistics never are, and NaN never is; parameters never are either. Asked only of
    tensors that failed the finite check, so a healthy model pays nothing for it."""
    import torch
    from torch.nn.modules.batchnorm import _NormBase

    buffer = owner._buffers.get(leaf)
    if buffer is None or isinstance(owner, _NormBase) or not buffer.dtype.is_floating_point or not buffer.numel():
        return False
    with torch.no_grad():
        return bool(torch.isposinf(buffer).all()) or bool(torch.isneginf(buffer).all())


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value of ``tensor`` is finite, in one vectorised pass: NaN propagates through
    min and max, so finite extremes mean finite values (``isfinite().all()`` writes a boolean copy
    first and took 36x as long on bfloat16 weights). Complex tensors, which have no order, take
    the elementwise test."""
    import torch

    if tensor.numel() == 0:
        return True
    values = tensor.detach()
    if values.dtype.is_complex:
        return bool(torch.isfinite(values).all())
    if not values.dtype.is_floating_point:
        return True
    low, high = torch.aminmax(values)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def all_zero(tensor: torch.Tensor) -> bool:
    """Whether every value of ``tensor`` is exactly 0 (NaN is not), from its extremes in one
    ``aminmax`` pass: ``any()`` took four times as long on a 1B Llama's bfloat16 weights."""
    import torch

    if tensor.numel() == 0:
        return True
    values = tensor.detach()
    if not values.dtype.is_floating_point:
        return not bool(values.any())
    low, high = torch.aminmax(values)
    return bool((low == 0) & (high == 0))


# Elements per block: a float64 block of 2 MB. Whole-tensor conversions allocate fresh pages that
# the kernel must fault in and zero: converting 16M bfloat16 values to float64 took 42 ms at once
# and 7 ms in blocks of this size, which the allocator reuses.
_BLOCK_ELEMENTS = 1 << 18


def float64_row_blocks(matrix: torch.Tensor) -> Iterator[torch.Tensor]:
    """Consecutive row blocks of a 2-D tensor, each converted to float64: whole-tensor statistics
    in float64 without ever holding a float64 copy of the tensor."""
    import torch

    rows, cols = matrix.shape
    step = max(1, _BLOCK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        yield matrix[start : start + step].to(torch.float64)
