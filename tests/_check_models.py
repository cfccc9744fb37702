"""Small models built to trigger (or not) each rule of ``gradcheck check``, shared by its tests.

Each builder documents why the rule must fire, from docs/theory.md, so the tests assert known answers
rather than whatever the implementation happens to return.
"""

from __future__ import annotations

import torch
from torch import nn

from gradcheck_cli.gate.check import check_module
from gradcheck_cli.gate.rules import RULES, Rule
from gradcheck_cli.options import InputOptions, LossKind, ProbeOptions
from gradcheck_cli.records import Report

IN_FEATURES = 16
WIDTH = 64
CLASSES = 10


def probe(*, batch_size: int = 32, loss: LossKind = LossKind.AUTO, features: int = IN_FEATURES) -> ProbeOptions:
    return ProbeOptions(inputs=InputOptions(input_shape=((batch_size, features),), seed=0), loss=loss)


def run(model: nn.Module, *, rules: tuple[Rule, ...] = RULES, **probe_kwargs: object) -> Report:
    return check_module(model, probe(**probe_kwargs), rules=rules)  # type: ignore[arg-type]


def codes(report: Report) -> set[str]:
    return {f.code for f in report.findings}


def he_relu_mlp(depth: int = 4, *, seed: int = 0) -> nn.Sequential:
    """The healthy reference: He-initialised ReLU MLP (He et al. 2015) with a Glorot head."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(depth):
        linear = nn.Linear(IN_FEATURES if i == 0 else WIDTH, WIDTH)
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.ReLU()]
    head = nn.Linear(WIDTH, CLASSES)
    nn.init.xavier_normal_(head.weight)
    nn.init.zeros_(head.bias)
    return nn.Sequential(*layers, head)


def linear_stack(depth: int, *, gain: float, width: int = WIDTH, seed: int = 0) -> nn.Sequential:
    """Activation-free Linear layers with orthogonal weights times ``gain``: the signal's
    variance is multiplied by exactly gain² per layer (orthogonal maps keep the norm)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(depth):
        linear = nn.Linear(IN_FEATURES if i == 0 else width, width, bias=False)
        nn.init.orthogonal_(linear.weight, gain=gain)
        layers.append(linear)
    return nn.Sequential(*layers)


def sigmoid_mlp(depth: int, *, std: float | None = None, seed: int = 0) -> nn.Sequential:
    """Sigmoid MLP; Glorot init by default, N(0, std²) weights when ``std`` is given."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(depth):
        linear = nn.Linear(IN_FEATURES if i == 0 else WIDTH, WIDTH)
        if std is None:
            nn.init.xavier_normal_(linear.weight)
        else:
            nn.init.normal_(linear.weight, std=std)
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.Sigmoid()]
    head = nn.Linear(WIDTH, CLASSES)
    nn.init.xavier_normal_(head.weight)
    return nn.Sequential(*layers, head)


def with_dead_layer(model: nn.Sequential, index: int) -> nn.Sequential:
    """Bias of Linear ``index`` at -1e3: its ReLU output is 0 for every sample (docs/theory.md#dead-relus)."""
    with torch.no_grad():
        model[index].bias.fill_(-1e3)
    return model
