"""Every rule fires on a model built to trigger it and stays silent on a healthy He ReLU MLP.

Expected values come from docs/theory.md, not from running the implementation: orthogonal layers
scale the variance by exactly gain² each, a bias of -1e3 kills every unit, N(0, 1) weights are
fan_in/2 times what He prescribes, and so on.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradcheck_cli.errors import ConfigError
from gradcheck_cli.gate.rules import RULES, configure, resolve
from gradcheck_cli.options import LossKind, RuleOverride
from gradcheck_cli.records import Report, Severity
from tests._check_models import (
    IN_FEATURES,
    WIDTH,
    codes,
    he_relu_mlp,
    linear_stack,
    run,
    sigmoid_mlp,
    with_dead_layer,
)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "rules.md"


def findings(report: Report, code: str) -> list[tuple[str | None, float | None]]:
    return [(f.layer, f.value) for f in report.findings if f.code == code]


# --- the catalogue ------------------------------------------------------------------------------


def test_codes_and_names_are_unique_kebab_case_and_documented() -> None:
    assert len({r.code for r in RULES}) == len(RULES)
    assert len({r.name for r in RULES}) == len(RULES)
    text = DOCS.read_text(encoding="utf-8")
    for rule in RULES:
        assert re.fullmatch(r"GC\d{3}", rule.code)
        assert re.fullmatch(r"[a-z]+(-[a-z]+)*", rule.name)
        assert f"{rule.code}" in text and f"`{rule.name}`" in text, rule.code


def test_existing_codes_keep_their_meaning() -> None:
    # Codes are a contract with users' configs: these were released with `inspect`.
    assert {r.code: r.name for r in RULES if r.code in {"GC001", "GC101", "GC102", "GC201", "GC202"}} == {
        "GC001": "non-finite",
        "GC101": "dead-relu",
        "GC102": "saturated-activation",
        "GC201": "vanishing-gradient",
        "GC202": "exploding-gradient",
    }


# --- silent on the healthy model ----------------------------------------------------------------


@pytest.mark.parametrize("depth", [2, 4, 8])
def test_healthy_he_relu_mlp_has_no_findings(depth: int) -> None:
    assert run(he_relu_mlp(depth)).findings == ()


# --- each rule fires --------------------------------------------------------------------------


def test_dead_relu_names_the_relu_after_the_dead_layer() -> None:
    report = run(with_dead_layer(he_relu_mlp(4), 4))  # Linear #3 is index 4, its ReLU index 5
    assert ("5", 1.0) in findings(report, "GC101")
    assert all(layer in {"5", "7"} for layer, _ in findings(report, "GC101"))


def test_saturated_sigmoid_fires() -> None:
    # N(0, 9) weights on 64 inputs: |z| is ~20 on average, far past sigmoid's |z| > 4.4 cut-off.
    report = run(sigmoid_mlp(3, std=3.0))
    saturated = findings(report, "GC102")
    assert {layer for layer, _ in saturated} >= {"3", "5"}
    assert all(value is not None and value > 0.5 for _, value in saturated)


def test_vanishing_gradient_caught_by_ratio_without_any_absolute_bound() -> None:
    # sigmoid' <= 1/4: ten Glorot sigmoid layers shrink the gradient geometrically
    # (docs/theory.md#vanishing-and-exploding-gradients), yet no single layer's gradient is below the absolute bound.
    report = run(sigmoid_mlp(10))
    vanishing = findings(report, "GC201")
    assert len(vanishing) == 1 and vanishing[0][0] == "0"
    assert vanishing[0][1] is not None and vanishing[0][1] < 1e-3
    assert "GC203" not in codes(report)


def test_exploding_gradient_ratio_and_clipping_advice() -> None:
    model = he_relu_mlp(4)
    with torch.no_grad():
        model[0].weight.mul_(1e-3)  # |dL/dW|/|W| of the first layer grows as 1/scale²
    report = run(model, loss=LossKind.MSE)
    exploding = [f for f in report.findings if f.code == "GC202"]
    assert len(exploding) == 1 and exploding[0].layer == "0"
    assert exploding[0].value is not None and exploding[0].value > 1e3
    assert "max_norm=" in exploding[0].advice


def test_small_layer_gradient_is_exactly_zero_before_a_dead_layer() -> None:
    report = run(with_dead_layer(he_relu_mlp(4), 4))
    small = dict(findings(report, "GC203"))
    # Every path from layers 0 and 2 to the loss goes through the dead ReLU: the gradient is 0.
    assert small["0"] == 0.0 and small["2"] == 0.0
    assert "8" not in small  # the head still learns from its (constant) input


def test_large_layer_gradient_fires_on_a_growing_linear_stack() -> None:
    report = run(linear_stack(8, gain=2.0), loss=LossKind.MSE)
    large = findings(report, "GC204")
    assert len(large) == 8 and all(v is not None and v > 1e3 for _, v in large)
    assert all("max_norm=" in f.advice for f in report.findings if f.code == "GC204")


@pytest.mark.parametrize(("gain", "code"), [(0.5, "GC103"), (2.0, "GC104")])
def test_activation_variance_ratio_is_gain_squared_per_layer(gain: float, code: str) -> None:
    # Orthogonal weights scale the norm by exactly `gain`, so over the 7 layers between the first
    # and the last output the variance ratio is gain**14.
    report = run(linear_stack(8, gain=gain), loss=LossKind.MSE)
    ((layer, value),) = findings(report, code)
    assert layer == "7"
    assert value == pytest.approx(gain**14, rel=0.02)


# --- non-finite: the first producer -------------------------------------------------------------


def test_non_finite_names_the_first_producer_in_the_middle_of_a_deep_net() -> None:
    model = he_relu_mlp(8)
    with torch.no_grad():
        model[8].weight.fill_(1e38)  # finite weights whose output overflows float32 to inf
    report = run(model)
    non_finite = [f for f in report.findings if f.code == "GC001"]
    assert [f.layer for f in non_finite] == ["8"]
    assert "later row(s) pass it on" in non_finite[0].message
    assert non_finite[0].severity is Severity.ERROR


def test_nan_weight_is_named_by_tensor_not_by_its_consumers() -> None:
    model = he_relu_mlp(4)
    with torch.no_grad():
        model[4].weight[3, 7] = float("nan")
        model[4].bias[0] = float("inf")
    report = run(model)
    non_finite = [(f.layer, f.value) for f in report.findings if f.code == "GC001"]
    assert non_finite == [("4.weight", 1.0), ("4.bias", 1.0)]


class _NaNBackwardLinear(nn.Linear):
    """Finite forward, NaN backward: d/dz sqrt(z) at z = 0 is inf, and 0 * inf = NaN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y + 0.0 * torch.sqrt(y - y)


def test_non_finite_gradient_names_the_layer_whose_backward_produced_it() -> None:
    model = he_relu_mlp(4)
    bad = _NaNBackwardLinear(WIDTH, WIDTH)
    bad.load_state_dict(model[4].state_dict())
    model[4] = bad
    report = run(model)
    non_finite = [f for f in report.findings if f.code == "GC001"]
    assert [f.layer for f in non_finite] == ["4"]
    assert "backward" in non_finite[0].message


# --- checkpoint scan: BatchNorm -----------------------------------------------------------------


def _bn_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN_FEATURES, WIDTH), nn.BatchNorm1d(WIDTH), nn.ReLU(), nn.Linear(WIDTH, 10))
    return model


def _trained_stats(model: nn.Sequential) -> nn.Sequential:
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(64, IN_FEATURES))
    return model.eval()


def test_batchnorm_with_negative_running_var() -> None:
    model = _trained_stats(_bn_mlp())
    with torch.no_grad():
        model[1].running_var[:3] = -1.0
    report = run(model)
    assert findings(report, "GC002") == [("1", 3.0)]
    # sqrt(-1 + eps) is NaN: the BatchNorm row is where the NaN is first produced.
    assert [f.layer for f in report.findings if f.code == "GC001"] == ["1"]
    assert "GC003" not in codes(report)


def test_batchnorm_never_updated() -> None:
    # Fresh: num_batches_tracked == 0, mean 0, var 1 and gamma 1, beta 0: never trained, which is
    # information (tests/test_gate_truth.py has the trained-with-frozen-statistics warning).
    report = run(_bn_mlp().eval())
    assert findings(report, "GC003") == [("1", 1.0)]
    assert [f.severity for f in report.findings if f.code == "GC003"] == [Severity.INFO]
    assert "GC002" not in codes(report)


def test_batchnorm_with_trained_statistics_is_silent() -> None:
    report = run(_trained_stats(_bn_mlp()))
    assert not codes(report) & {"GC001", "GC002", "GC003"}


# --- init-scale -------------------------------------------------------------------------------


class _InitZoo(nn.Module):
    """One layer per scheme, each initialised with torch.nn.init as its activation requires."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.relu_in = nn.Linear(IN_FEATURES, 256)
        self.relu = nn.Linear(256, 256)
        self.leaky = nn.Linear(256, 256)
        self.act_leaky = nn.LeakyReLU(0.2)
        self.tanh = nn.Linear(256, 256)
        self.sigmoid = nn.Linear(256, 256)
        self.selu = nn.Linear(256, 256)
        self.conv = nn.Conv2d(1, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.head = nn.Linear(256, 10)
        nn.init.kaiming_normal_(self.relu_in.weight, nonlinearity="relu")
        nn.init.kaiming_uniform_(self.relu.weight, nonlinearity="relu")
        nn.init.kaiming_normal_(self.leaky.weight, a=0.2, nonlinearity="leaky_relu")
        nn.init.xavier_normal_(self.tanh.weight, gain=nn.init.calculate_gain("tanh"))
        nn.init.xavier_uniform_(self.sigmoid.weight)
        nn.init.kaiming_normal_(self.selu.weight, nonlinearity="linear")  # LeCun normal
        nn.init.kaiming_normal_(self.conv.weight, nonlinearity="relu")
        nn.init.xavier_normal_(self.head.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.relu_in(x))
        x = torch.relu(self.relu(x))
        x = self.act_leaky(self.leaky(x))
        x = torch.tanh(self.tanh(x))
        x = torch.sigmoid(self.sigmoid(x))
        x = F.selu(self.selu(x))
        image = x.reshape(x.shape[0], 1, 16, 16)
        image = F.relu(self.bn(self.conv(image)))  # BN between conv and ReLU: still He
        return self.head(image.mean(dim=1).flatten(1))


def test_init_scale_is_one_for_torch_init_with_the_following_activation() -> None:
    report = run(_InitZoo())
    scales = {row.name: row.init for row in report.layers if row.init is not None}
    expected = {
        "relu_in": ("he", "relu"),
        "relu": ("he", "relu"),
        "leaky": ("he", "leaky_relu"),
        "tanh": ("glorot", "tanh"),
        "sigmoid": ("glorot", "sigmoid"),
        "selu": ("lecun", "selu"),
        "head": ("glorot", None),
    }
    assert set(scales) == set(expected)
    for name, (scheme, activation) in expected.items():
        scale = scales[name]
        assert scale is not None
        assert (scale.scheme, scale.activation) == (scheme, activation), name
        assert scale.ratio == pytest.approx(1.0, abs=0.1), name
    # conv -> BN: the norm resets the conv's output scale, so it is not judged, and says why.
    conv = next(row for row in report.layers if row.name == "conv")
    assert conv.init is None and "'bn'" in conv.reasons["init"]
    assert "GC301" not in codes(report)


def test_init_scale_flags_standard_normal_weights() -> None:
    model = he_relu_mlp(3)
    with torch.no_grad():
        model[2].weight.normal_(0.0, 1.0)
    report = run(model)
    ((layer, value),) = findings(report, "GC301")
    # He prescribes Var(w) = 2/fan_in = 2/64; N(0, 1) has variance 1: ratio fan_in/2 = 32.
    assert layer == "2"
    assert value == pytest.approx(WIDTH / 2, rel=0.1)


def test_init_scale_flags_the_old_uniform_default_before_relu() -> None:
    # docs/theory.md#variance-through-a-layer: U[-1/sqrt(n), 1/sqrt(n)] has n·Var(w) = 1/3, i.e. 1/6 of He's 2/n.
    model = he_relu_mlp(3)
    bound = 1 / math.sqrt(WIDTH)
    with torch.no_grad():
        model[2].weight.uniform_(-bound, bound)
    # One small layer scales the signal once (by 1/6 in variance): it does not compound.
    assert findings(run(model), "GC301") == []
    with torch.no_grad():
        model[4].weight.uniform_(-bound, bound)
    # Two in a row shrink it by 1/36: both are flagged.
    flagged = findings(run(model), "GC301")
    assert [layer for layer, _ in flagged] == ["2", "4"]
    assert all(value == pytest.approx(1 / 6, rel=0.15) for _, value in flagged)


# --- configuration of rules -------------------------------------------------------------------


def test_ignore_layer_globs_are_per_rule() -> None:
    rules = configure(overrides={"dead-relu": RuleOverride(ignore_layers=("5",))})
    report = run(with_dead_layer(he_relu_mlp(4), 4), rules=rules)
    assert [layer for layer, _ in findings(report, "GC101")] == ["7"]
    assert findings(report, "GC203")  # other rules still see layer 5's consequences


def test_threshold_and_severity_overrides_change_findings() -> None:
    rules = configure(overrides={"GC301": RuleOverride(threshold=1.5, severity=Severity.ERROR)})
    model = he_relu_mlp(2)
    with torch.no_grad():
        model[2].weight.mul_(math.sqrt(2.0))  # ratio 2: outside [1/1.5, 1.5], inside [1/3, 3]
    assert "GC301" not in codes(run(model))
    flagged = [f for f in run(model, rules=rules).findings if f.code == "GC301"]
    assert len(flagged) == 1 and flagged[0].severity is Severity.ERROR and flagged[0].threshold == 1.5


def test_select_by_prefix_and_name_keeps_non_finite() -> None:
    active = {r.code for r in configure(select=["GC2", "dead-relu"])}
    assert active == {"GC001", "GC101", "GC201", "GC202", "GC203", "GC204"}
    assert {r.code for r in resolve("gc10")} == {"GC101", "GC102", "GC103", "GC104"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ignore": ["non-finite"]}, "cannot be ignored"),
        ({"select": ["no-such-rule"]}, "unknown rule"),
        ({"overrides": {"dead-relu": RuleOverride(threshold=1.5)}}, "outside (0, 1)"),
        ({"overrides": {"GC001": RuleOverride(severity=Severity.WARNING)}}, "always an error"),
        ({"overrides": {"GC002": RuleOverride(threshold=1.0)}}, "takes no threshold"),
        ({"overrides": {"GC1": RuleOverride(threshold=0.1)}}, "one rule"),
    ],
)
def test_bad_rule_configuration_is_a_config_error(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        configure(**kwargs)  # type: ignore[arg-type]
