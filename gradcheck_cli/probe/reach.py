"""The probe's backward pass without the input gradient it does not need.

The probe makes its float inputs require a gradient for one question: does the loss depend on
them at all (a model that ignores its input trains on nothing)? The autograd graph answers that
before anything runs: the inputs' leaves are reachable from the loss or they are not. Computing
the input gradient itself costs the first layer another product: on ResNet-50 at batch 16 the
stem convolution's input gradient (3 channels at 224x224) took 0.12 s, 3-4% of the step.

So the backward pass runs with ``inputs=`` the parameters, which prunes every node that leads
only to the inputs, unless something on such a node would be lost: a row's gradient hook (an
activation applied to the input before any parameter), or a custom autograd function (a reentrant
checkpoint of the first block accumulates that block's parameter gradients inside its own
backward, out of the graph's sight). Then the whole graph runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Reach:
    inputs_reached: bool  # a path leads from some watched input to the loss
    prunable: bool  # no hook and no custom function sits on a node that leads to no parameter


def graph_reach(
    loss: torch.Tensor, inputs: Sequence[torch.Tensor], parameters: Sequence[torch.Tensor], hooked: Iterable[Any]
) -> Reach:
    """Walk the graph behind ``loss`` once (depth first, each node once)."""
    from torch.autograd.function import BackwardCFunction

    root = loss.grad_fn
    if root is None:
        return Reach(inputs_reached=False, prunable=True)
    input_ids = {id(t) for t in inputs}
    parameter_ids = {id(p) for p in parameters}
    leads: dict[Any, bool] = {}  # node -> a parameter's gradient is accumulated below it
    custom: list[Any] = []
    inputs_reached = False
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        if children_done:
            leads[node] = any(leads[child] for child in _children(node))
            continue
        if node in leads:
            continue  # reached again through another parent
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf
        if variable is not None:
            inputs_reached = inputs_reached or id(variable) in input_ids
            leads[node] = id(variable) in parameter_ids
            continue
        if isinstance(node, BackwardCFunction):
            custom.append(node)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if child not in leads)
    kept = [*hooked, *custom]
    return Reach(inputs_reached=inputs_reached, prunable=all(leads.get(node, True) for node in kept))


def _children(node: Any) -> list[Any]:
    return [child for child, _ in node.next_functions if child is not None]
