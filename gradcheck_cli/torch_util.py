"""Small torch helpers shared by the loaders, the probe and the rewrites. torch is never imported
at module level here: these functions only touch modules they are given."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
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
