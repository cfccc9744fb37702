"""Rules: stable codes, kebab-case names, default severities and thresholds, and advice.

A rule reads a finished :class:`Report` and returns findings; it never re-runs the model.
Defaults are chosen from THEORY.md (the reasons are in the README's rule table), and changing
one is a user-visible change that goes in the CHANGELOG's "Rules" subsection.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from gradcheck_cli.records import Finding, LayerStats, Report, RowKind, Severity


@dataclass(frozen=True)
class Rule:
    code: str
    name: str
    severity: Severity
    threshold: float | None
    summary: str
    advice: str
    evaluate: Callable[[Report, Rule], Iterable[Finding]]


def _finding(rule: Rule, layer: str | None, value: float | None, message: str,
             advice: str | None = None) -> Finding:
    return Finding(code=rule.code, rule=rule.name, severity=rule.severity, layer=layer, value=value,
                   threshold=rule.threshold, message=message, advice=advice or rule.advice)


def _non_finite(report: Report, rule: Rule) -> Iterable[Finding]:
    bad = [row for row in report.layers if row.output.nan or row.output.inf]
    if not bad:
        return
    first = bad[0]
    downstream = len(bad) - 1
    tail = f"; {downstream} later row(s) pass it on" if downstream else ""
    yield _finding(rule, first.name, float(first.output.nan + first.output.inf),
                   f"first produces NaN/Inf: {first.output.nan} NaN and {first.output.inf} Inf of "
                   f"{first.output.count} outputs{tail}")


def _dead(report: Report, rule: Rule) -> Iterable[Finding]:
    assert rule.threshold is not None
    for row in report.layers:
        if row.dead is not None and row.dead.total and row.dead.fraction > rule.threshold:
            yield _finding(rule, row.name, row.dead.fraction,
                           f"{row.dead.units} of {row.dead.total} {row.fn} units are dead "
                           f"({row.dead.fraction:.0%}): zero for every probe sample")


def _saturated(report: Report, rule: Rule) -> Iterable[Finding]:
    assert rule.threshold is not None
    for row in report.layers:
        if row.saturation is not None and row.saturation.fraction > rule.threshold:
            yield _finding(rule, row.name, row.saturation.fraction,
                           f"{row.saturation.fraction:.0%} of {row.fn} outputs are saturated "
                           f"(derivative below {row.saturation.cutoff:g} of its maximum)")


def _param_rows(report: Report) -> list[LayerStats]:
    return [r for r in report.layers if r.kind is RowKind.PARAM and r.grad is not None
            and r.grad.norm is not None and r.grad.ratio is not None]


def _gradient_ratio(report: Report) -> tuple[LayerStats, LayerStats, float] | None:
    """Relative gradient size (|grad W|/|W|) of the first parameter layer over the last."""
    rows = _param_rows(report)
    if len(rows) < 2:
        return None
    first, last = rows[0], rows[-1]
    assert first.grad is not None and last.grad is not None
    if first.grad.ratio is None or not last.grad.ratio:
        return None
    return first, last, first.grad.ratio / last.grad.ratio


def _vanishing(report: Report, rule: Rule) -> Iterable[Finding]:
    assert rule.threshold is not None
    found = _gradient_ratio(report)
    if found is None:
        return
    first, last, ratio = found
    if ratio < rule.threshold:
        yield _finding(rule, first.name, ratio,
                       f"relative gradient |dL/dW|/|W| of the first layer is {ratio:.2e} times that of "
                       f"the last ({last.name}): the gradient vanishes with depth")


def _exploding(report: Report, rule: Rule) -> Iterable[Finding]:
    assert rule.threshold is not None
    found = _gradient_ratio(report)
    if found is None:
        return
    first, last, ratio = found
    if ratio > rule.threshold:
        norms = [r.grad.norm for r in _param_rows(report) if r.grad is not None and r.grad.norm is not None]
        total = math.sqrt(sum(n * n for n in norms))
        yield _finding(rule, first.name, ratio,
                       f"relative gradient of the first layer is {ratio:.2e} times that of the last "
                       f"({last.name}): the gradient grows with depth",
                       advice=f"clip gradients by global norm (e.g. max_norm={total / 10:.3g}, a tenth of the "
                       "measured norm); use a smaller init scale, normalisation layers or residual connections")


RULES: tuple[Rule, ...] = (
    Rule("GC001", "non-finite", Severity.ERROR, None,
         "NaN or Inf in a layer's output",
         "find the first producer: check its weights and inputs, lower the learning rate, clip gradients, "
         "or use a numerically safe formulation (e.g. log_softmax instead of log(softmax))",
         _non_finite),
    Rule("GC101", "dead-relu", Severity.ERROR, 0.5,
         "share of a ReLU-family layer's units that are zero for every probe sample",
         "re-initialise with He init (gradcheck reinit --scheme he), lower the learning rate, or use "
         "Leaky ReLU (slope ~0.01), PReLU or ELU so negative units still get a gradient",
         _dead),
    Rule("GC102", "saturated-activation", Severity.ERROR, 0.5,
         "share of a sigmoid/tanh-family layer's outputs whose derivative has all but vanished",
         "use Glorot init for tanh/sigmoid layers (gradcheck reinit --scheme glorot), add normalisation "
         "before the activation, or switch to a non-saturating activation (ReLU family, GELU)",
         _saturated),
    Rule("GC201", "vanishing-gradient", Severity.ERROR, 1e-3,
         "first-to-last ratio of the relative gradient |dL/dW|/|W| below the threshold",
         "use non-saturating activations and He/Glorot init, add batch/layer normalisation or residual "
         "connections to shorten the gradient path",
         _vanishing),
    Rule("GC202", "exploding-gradient", Severity.ERROR, 1e3,
         "first-to-last ratio of the relative gradient |dL/dW|/|W| above the threshold",
         "clip gradients by norm, use a smaller init scale, add normalisation layers or residual connections",
         _exploding),
)


def evaluate(report: Report, rules: Iterable[Rule] = RULES) -> tuple[Finding, ...]:
    """Every finding of every rule, in rule order then execution order."""
    findings: list[Finding] = []
    for rule in rules:
        findings.extend(rule.evaluate(report, rule))
    return tuple(findings)


def with_findings(report: Report, rules: Iterable[Rule] = RULES) -> Report:
    return replace(report, findings=evaluate(report, rules))
