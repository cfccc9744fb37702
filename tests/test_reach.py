"""The backward pass prunes the input gradient the probe does not need (probe/reach.py): rows keep
every gradient a full backward gives, and the input-dependence note still follows the graph."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gradcheck_cli import api
from gradcheck_cli.options import InputOptions, LossKind, ProbeOptions
from gradcheck_cli.probe.reach import graph_reach
from gradcheck_cli.records import Report


class CountsItsInputGradient(nn.Module):
    """A conv stem whose input gradient, when computed, passes a hook of the model's own."""

    def __init__(self, activation_first: bool = False, reentrant: bool = False) -> None:
        super().__init__()
        self.activation_first = activation_first
        self.reentrant = reentrant
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)
        self.input_gradients = 0

    def count(self, _grad: torch.Tensor) -> None:
        self.input_gradients += 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad:
            x.register_hook(self.count)
        if self.activation_first:
            x = torch.tanh(x)  # a row before any parameter: its gradient leads only to the input
        x = checkpoint(self.stem, x, use_reentrant=True) if self.reentrant else self.stem(x)
        return self.head(F.relu(x).mean(dim=(2, 3)))


def _probe(model: nn.Module, x: torch.Tensor, tmp_path: Path) -> Report:
    torch.save(x, tmp_path / "x.pt")
    options = ProbeOptions(inputs=InputOptions(input=tmp_path / "x.pt"), loss=LossKind.SUM)
    return api.inspect_module(model, options)


def _reference(model: CountsItsInputGradient, x: torch.Tensor) -> dict[str, float]:
    """Output-gradient norms of the rows and parameter-gradient norms, by plain autograd."""
    kept: dict[str, torch.Tensor] = {}
    h = x.clone().requires_grad_(True)
    if model.activation_first:
        h = kept["tanh()"] = torch.tanh(h)
    h = kept["stem"] = model.stem(h)
    h = kept["relu()"] = F.relu(h)
    out = kept["head"] = model.head(h.mean(dim=(2, 3)))
    for tensor in kept.values():
        tensor.retain_grad()
    (out.sum() / x.shape[0]).backward()  # the probe's `sum` loss: per sample
    norms = {name: float(t.grad.norm()) for name, t in kept.items() if t.grad is not None}
    for name in ("stem", "head"):
        module = getattr(model, name)
        norms[f"{name}.params"] = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in module.parameters()))
        module.zero_grad(set_to_none=True)
    return norms


@pytest.mark.parametrize(("activation_first", "reentrant"), [(False, False), (True, False), (False, True)])
def test_rows_keep_every_gradient_and_the_input_gradient_runs_only_when_a_row_needs_it(
    tmp_path: Path, activation_first: bool, reentrant: bool
) -> None:
    torch.manual_seed(0)
    model = CountsItsInputGradient(activation_first, reentrant)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    report = _probe(model, x, tmp_path)
    # Pruned unless a row (tanh first) or a custom function (the reentrant checkpoint) sits on the
    # input's path: then the full graph runs.
    assert model.input_gradients == (1 if activation_first or reentrant else 0)
    model.input_gradients = 0
    expected = _reference(model, x)
    by_name = {row.name: row for row in report.layers}
    # A reentrant checkpoint runs its block without gradients, so the stem has no output row then.
    for name in ("relu()", "head") + (("tanh()",) if activation_first else ()) + (() if reentrant else ("stem",)):
        assert by_name[name].output_grad_norm == pytest.approx(expected[name], rel=1e-5), name
    for name in ("stem", "head"):
        grad = by_name[name].grad
        assert grad is not None and grad.norm == pytest.approx(expected[f"{name}.params"], rel=1e-5), name
    assert not any("does not depend on the model's inputs" in note for note in report.notes)


def test_graph_reach_sees_inputs_hooks_and_custom_functions() -> None:
    weight = nn.Parameter(torch.randn(3, 3))
    x = torch.randn(2, 3, requires_grad=True)
    unused = torch.randn(2, 3, requires_grad=True)
    first = torch.sigmoid(x)  # leads only to x
    loss = (first @ weight).sum()
    reach = graph_reach(loss, [x, unused], [weight], [first.grad_fn])
    assert reach.inputs_reached and not reach.prunable
    hidden = x @ weight  # leads to the weight
    reach = graph_reach(hidden.relu().sum(), [x], [weight], [hidden.grad_fn])
    assert reach.inputs_reached and reach.prunable
    reach = graph_reach((weight * 2).sum(), [x], [weight], [])
    assert not reach.inputs_reached

    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, value: torch.Tensor) -> torch.Tensor:
            return value * 2

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
            return grad * 2

    scaled = Scale.apply(x)  # a custom function on the input's path: its backward may do anything
    reach = graph_reach((scaled @ weight).sum(), [x], [weight], [])
    assert reach.inputs_reached and not reach.prunable
    scaled = Scale.apply(x @ weight)  # one that leads to a parameter is kept by the pruning itself
    assert graph_reach(scaled.sum(), [x], [weight], []).prunable


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_pruned_backward_gives_torchvision_models_the_full_backwards_rows(
    arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On real architectures (residual blocks, squeeze-excitation, in-place activations) every
    row's gradient norms are bitwise those of the full backward pass."""
    import torchvision

    from gradcheck_cli.probe import reach

    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None).eval()
    options = ProbeOptions(inputs=InputOptions(input_shape=((2, 3, 64, 64),), seed=0))
    decisions: list[bool] = []
    real = reach.graph_reach

    def spy(*args: Any) -> reach.Reach:
        found = real(*args)
        decisions.append(found.prunable)
        return found

    monkeypatch.setattr(reach, "graph_reach", spy)
    pruned = api.inspect_module(model, options)
    monkeypatch.setattr(reach, "graph_reach", lambda *args: reach.Reach(inputs_reached=True, prunable=False))
    whole = api.inspect_module(model, options)
    assert decisions == [True]

    def norms(report: Report) -> list[tuple[str, float | None, float | None]]:
        return [(r.name, r.output_grad_norm, r.grad.norm if r.grad else None) for r in report.layers]

    assert norms(pruned) == norms(whole)
