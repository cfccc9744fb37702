"""Parameter gradients reduced to their sum of squares as autograd accumulates them, then freed.

A diagnosis needs each parameter's gradient *norm*, not the gradient. A hook registered with
``Tensor.register_post_accumulate_grad_hook`` runs right after autograd (or FSDP2, after its
reduce-scatter) has written a parameter's ``.grad``; it reduces the gradient to one float64
number on the gradient's device and drops it. The probe's peak is then the weights, the
activations kept for backward and the largest single gradient, never the weights plus all
gradients, which is what the training step it diagnoses holds.

Which statistics reduce per micro-batch and which accumulate (the probe's loss is a sum over
micro-batches, so the gradient of the probe batch is the *sum* of the micro-batches' gradients):

* a row's output statistics (count, moments, extremes, non-finite counts, saturation, dead-unit
  masks, output-gradient Σg²) are of disjoint samples and merge exactly per micro-batch;
* a parameter's gradient norm is the norm of a sum, which no per-micro-batch number gives:
  with several micro-batches, ``.grad`` accumulates as in training (one buffer per parameter,
  in the parameter's dtype) and is reduced and freed after the last micro-batch's backward.
  Only a single micro-batch reaches the "largest single gradient" peak.

An ``nn.Embedding`` runs with sparse gradients during the probe (:func:`sparse_embedding_gradients`):
its gradient is then the rows the probe batch looked up, not a table-sized tensor of zeros with
those rows added in. Summed per row (``coalesce``), the rows' Σg² is the dense gradient's, and
neither the table-sized buffer nor the pass that zeroes it and the one that reduces it are paid:
on BERT-base's 30522-word table (94 MB in float32) the embedding's backward and reduction took
0.38 ms against 32.5 ms (bench/overhead_parts.py --kernels).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this process holds: a DTensor's local shard, else the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor  # type: ignore[no-any-return]


# Devices where the sparse embedding backward and coalesce are tested (CUDA by torch's own suite;
# the CPU here); elsewhere (MPS, XLA) the tables keep their dense gradients.
SPARSE_DEVICES = ("cpu", "cuda")


class GradientReducer:
    """Σg² per parameter, taken when the gradient of the probe batch is complete, then freed.

    ``batches`` is the number of micro-batches: the gradient is complete after the last one's
    backward. Tied parameters (one tensor under several names) have one accumulation and are
    reduced once. Under FSDP2 each process sees its shard's gradient; the shards' sums of
    squares add up to the whole gradient's (probe/distributed.py sums them).
    """

    def __init__(self, parameters: Iterable[torch.Tensor], *, batches: int) -> None:
        unique: dict[int, torch.Tensor] = {}
        for p in parameters:
            if p.requires_grad and p.dtype.is_floating_point:
                unique.setdefault(id(p), p)
        self.parameters = list(unique.values())
        self.remaining = batches
        self.sum_squares: dict[int, torch.Tensor] = {}
        self.largest_gradient = 0  # bytes of the largest gradient reduced: the lean probe's peak term

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        handles: list[Any] = []
        try:
            for p in self.parameters:
                handles.append(p.register_post_accumulate_grad_hook(self._reduce))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def end_backward(self) -> None:
        """Call after each micro-batch's backward: the next one may be the last."""
        self.remaining -= 1

    def _reduce(self, parameter: torch.Tensor) -> None:
        import torch

        from gradcheck_cli.probe.recorder import sum_of_squares

        if self.remaining > 1 or parameter.grad is None:
            return  # later micro-batches still add to this gradient
        with torch.no_grad():
            grad = local_tensor(parameter.grad.detach())
            if grad.is_sparse:
                grad = looked_up_rows(grad)
            self.sum_squares[id(parameter)] = (
                sum_of_squares(grad) if grad.numel() else torch.zeros((), dtype=torch.float64, device=grad.device)
            )
            self.largest_gradient = max(self.largest_gradient, grad.numel() * grad.element_size())
        parameter.grad = None

    def gradient_sum_squares(self, parameter: torch.Tensor) -> torch.Tensor | None:
        """Σg² of ``parameter``'s gradient (float64), or None when it received none."""
        return self.sum_squares.get(id(parameter))


def looked_up_rows(grad: torch.Tensor) -> torch.Tensor:
    """The values of a sparse embedding gradient with each row's repeats summed (a token seen
    twice is one row of the dense gradient), in at least float32 as the dense path accumulates."""
    if grad.dtype.itemsize < 4:
        grad = grad.float()
    return grad.coalesce().values()


@contextlib.contextmanager
def sparse_embedding_gradients(module: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """``nn.Embedding`` layers (and subclasses that call its forward) give sparse gradients while
    the probe runs. Off under FSDP2, whose sharded gradients are dense, and for graph programs,
    which were traced with the flag as it was."""
    from torch import nn

    switched = [
        m
        for m in module.modules()
        if enabled
        and isinstance(m, nn.Embedding)
        and not m.sparse
        and m.weight.requires_grad
        and m.weight.device.type in SPARSE_DEVICES
    ]
    try:
        for embedding in switched:
            embedding.sparse = True
        yield
    finally:
        for embedding in switched:
            embedding.sparse = False
