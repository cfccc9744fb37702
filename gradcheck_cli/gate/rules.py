"""Rules: stable codes, kebab-case names, default severities and thresholds, and advice.

A rule reads the evidence of one model (the finished probe :class:`Report` and, for ``check``,
the checkpoint scan) and returns findings; it never re-runs the model. Defaults are chosen from
docs/theory.md (docs/rules.md gives the reason for each), and changing one is a user-visible change
that goes in the CHANGELOG's "Rules" subsection.

Codes are grouped by what they look at: GC0xx the checkpoint's numbers, GC1xx activations,
GC2xx gradients, GC3xx initialisation. Codes never change meaning; retired codes are not reused.
"""

from __future__ import annotations

import fnmatch
import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from gradcheck_cli.choice import Choice
from gradcheck_cli.errors import ConfigError
from gradcheck_cli.gate.init_scale import following_activation, following_norm, model_trained_evidence, pooled
from gradcheck_cli.gate.scan import CheckpointScan, GateKind
from gradcheck_cli.gate.zero_init import ZeroInitBranches
from gradcheck_cli.options import RuleOverride, flag_of
from gradcheck_cli.records import DirectionTrace, Finding, LayerStats, Report, RowKind, Severity

if TYPE_CHECKING:
    from gradcheck_cli.gate.init_scale import InitJudgement


class Worse(Choice):
    """Which direction of a finding's value is worse (used by `baseline`)."""

    ABOVE = "above"
    BELOW = "below"
    AWAY = "away"  # further from 1 on a log scale (a ratio that should be ~1)


@dataclass(frozen=True)
class Evidence:
    """What the rules read about one model."""

    report: Report
    scan: CheckpointScan | None = None  # None: the checkpoint was not scanned (inspect)
    # Row name -> why its weights were judged as an init (rows GC301 measured).
    init: Mapping[str, InitJudgement] = field(default_factory=dict)
    branches: ZeroInitBranches = field(default_factory=ZeroInitBranches)
    # Rows the loss depends on that received no gradient (gradcheck_cli.detached).
    detached: frozenset[str] = frozenset()

    def by_design(self, row: LayerStats) -> bool:
        """A row whose zero output or zero gradient is a zero-initialised branch (GC302): the
        gate itself (with what it owns: timm's BatchNormAct2d applies its activation to the
        gated zeros), or a layer behind it."""
        if row.name in self.branches.gated:
            return True
        return any(row.module == m or row.module.startswith(m + ".") for m in self.branches.modules)


@dataclass(frozen=True)
class Rule:
    code: str
    name: str
    severity: Severity
    threshold: float | None
    summary: str
    advice: str
    evaluate: Callable[[Evidence, Rule], Iterable[Finding]]
    worse: Worse = Worse.ABOVE
    # Open interval a configured threshold must lie in (None: the rule takes no threshold).
    threshold_range: tuple[float, float] | None = None
    # Findings on layers matching these globs (fnmatch, against the row/tensor name) are dropped.
    ignore_layers: tuple[str, ...] = ()
    # A rule the user may neither deselect nor downgrade (non-finite values are always an error).
    mandatory: bool = False


def _median(values: Sequence[float]) -> float:
    # Not statistics.median: importing statistics costs ~20 ms of every start of the CLI.
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _finding(
    rule: Rule,
    layer: str | None,
    value: float | None,
    message: str,
    advice: str | None = None,
    *,
    severity: Severity | None = None,
) -> Finding:
    return Finding(
        code=rule.code,
        rule=rule.name,
        severity=severity or rule.severity,
        layer=layer,
        value=value,
        threshold=rule.threshold,
        message=message,
        advice=advice or rule.advice,
    )


def _bound(rule: Rule) -> float:
    assert rule.threshold is not None, f"{rule.code} needs a threshold"
    return rule.threshold


def _nonfinite_float(value: float | None) -> bool:
    return value is not None and not math.isfinite(value)


# --- GC0xx: the checkpoint's numbers ----------------------------------------------------------


def _non_finite(evidence: Evidence, rule: Rule) -> Iterable[Finding]:
    """Name the producer, not the layers that pass a NaN on: a corrupt tensor first; otherwise the
    first row (execution order) whose output is non-finite; otherwise, since backward runs in
    reverse, the *last* row whose output gradient or weight gradient is non-finite."""
    report = evidence.report
    tensors = evidence.scan.nonfinite if evidence.scan is not None else ()
    for tensor in tensors:
        yield _finding(
            rule,
            tensor.name,
            float(tensor.nan + tensor.inf),
            f"checkpoint tensor '{tensor.name}' holds {tensor.nan} NaN and {tensor.inf} Inf of {tensor.count} values",
            advice="restore a checkpoint from before training diverged; lower the learning "
            "rate and clip gradients by norm when training resumes",
        )
    if tensors:
        return  # every non-finite activation downstream is a consequence of these tensors
    bad = [row for row in report.layers if row.output.nan or row.output.inf]
    if bad:
        first = bad[0]
        downstream = len(bad) - 1
        tail = f"; {downstream} later row(s) pass it on" if downstream else ""
        yield _finding(
            rule,
            first.name,
            float(first.output.nan + first.output.inf),
            f"first produces NaN/Inf: {first.output.nan} NaN and {first.output.inf} Inf of "
            f"{first.output.count} outputs{tail}",
        )
        return
    rows = report.layers
    bad_grad = [
        index
        for index, row in enumerate(rows)
        if _nonfinite_float(row.output_grad_norm) or (row.grad is not None and _nonfinite_float(row.grad.norm))
    ]
    if bad_grad:
        # Backward runs in reverse execution order, so the last bad row is where the NaN enters.
        # If its own output gradient is already bad, that gradient came out of the backward of
        # the row executed after it: that row (or the loss, when there is none) produced it.
        last = bad_grad[-1]
        received = _nonfinite_float(rows[last].output_grad_norm)
        producer = rows[last + 1] if received and last + 1 < len(rows) else rows[last]
        where = "" if producer is rows[last] else f" and passes it to {rows[last].name}"
        yield _finding(
            rule,
            producer.name,
            None,
            "the backward pass first produces a NaN/Inf gradient here (forward values are "
            f"finite){where}; {len(bad_grad)} row(s) get a non-finite gradient",
        )
        return
    if report.probe.loss_value is None and report.layers:
        yield _finding(
            rule,
            None,
            None,
            "the probe loss is NaN/Inf although every layer output is finite",
            advice="check the model's final output and the loss (e.g. use log_softmax "
            f"rather than log(softmax), or pass {flag_of('loss')} sum)",
        )


def _bn_bad_variance(evidence: Evidence, rule: Rule) -> Iterable[Finding]:
    for bn in evidence.scan.batchnorms if evidence.scan is not None else ():
        if bn.nonpositive_var:
            yield _finding(
                rule,
                bn.module,
                float(bn.nonpositive_var),
                f"{bn.nonpositive_var} of {bn.channels} channels of running_var are zero, "
                f"negative or NaN (smallest finite: {bn.min_var}); eval-mode BatchNorm divides "
                "by sqrt(running_var + eps)",
            )


def _bn_never_updated(evidence: Evidence, rule: Rule) -> Iterable[Finding]:
    """Statistics at their defaults are a bug only when the affine parameters were trained: a
    BatchNorm whose gamma, beta and statistics are all at their defaults belongs to a model that
    was never trained, which is information (once per model), not a fault."""
    scan = evidence.scan
    if scan is None:
        return
    # gamma/beta away from their defaults prove training only when the weights were trained too:
    # RepVGG draws its BatchNorms' gamma and beta at random at init, beside init-draw weights.
    fresh = scan.never_trained
    fresh_modules = {bn.module for bn in fresh}
    for bn in scan.batchnorms:
        if bn.never_updated and bn.module not in fresh_modules:
            yield _finding(
                rule,
                bn.module,
                0.0,
                "gamma/beta were trained but the running statistics are still the defaults "
                "(mean 0, var 1; num_batches_tracked "
                f"{bn.num_batches_tracked if bn.num_batches_tracked is not None else 'absent'}): "
                "the model was trained with the statistics frozen or in eval mode, so eval mode "
                "does not normalise with the data's statistics",
            )
    if fresh:
        names = ", ".join(bn.module for bn in fresh[:3]) + (", ..." if len(fresh) > 3 else "")
        yield _finding(
            rule,
            fresh[0].module,
            float(len(fresh)),
            f"{len(fresh)} BatchNorm layer(s) ({names}) hold the defaults of a fresh module "
            "(gamma constant, beta 0, running mean 0, var 1, no batch tracked): the model has "
            "not been trained yet"
            + (
                f" (gamma/beta were drawn at init: {scan.init_draws[0]} of {scan.init_draws[1]} sampled "
                "layers' weights pass the init-draw test)"
                if scan.init_draws is not None and any(not bn.default_affine for bn in fresh)
                else ""
            ),
            advice="nothing to fix before training; after training, save the state_dict with its running statistics",
            severity=Severity.INFO,
        )


# --- GC1xx: activations -----------------------------------------------------------------------


def _dead(evidence: Evidence, rule: Rule) -> Iterable[Finding]:
    """More than the threshold's share of units dead, beyond chance: at init a unit fed positive
    inputs (after a ReLU, or a pooled squeeze-excitation input) is on or off for every sample by
    the sign of w·E[x], a coin flip per unit, so about half of a small layer's units can be
    "dead" on a small probe by chance. The count must exceed threshold·n by two binomial
    standard deviations (sqrt(n/4)), four on pooled inputs (:func:`_chance_margin`); a layer
    whose units all died always does once n > 4 (n > 16 on pooled inputs)."""
    bound = _bound(rule)
    silent = _silent_on_noise(evidence)
    for row in _dead_rows(evidence, bound):
        dead = row.dead
        assert dead is not None
        message = (
            f"{dead.units} of {dead.total} {row.fn} units are dead ({dead.fraction:.0%}): zero for every probe sample"
        )
        if silent is None:
            yield _finding(rule, row.name, dead.fraction, message)
        else:
            yield _finding(
                rule,
                row.name,
                dead.fraction,
                f"{message}; {silent}",
                advice=f"probe with real samples ({flag_of('input')} FILE) before changing anything",
                severity=Severity.INFO,
            )


# GC101's and GC102's default shares: the dead units and saturated gates GC203 looks behind.
_DEAD_SHARE = 0.5
_SATURATED_SHARE = 0.5


def _dead_rows(evidence: Evidence, bound: float) -> list[LayerStats]:
    """Rows with more than ``bound`` of their units dead, beyond chance (see :func:`_dead`)."""
    return [
        row
        for row in evidence.report.layers
        if row.dead is not None
        and row.dead.total
        and not evidence.by_design(row)
        and row.dead.units > bound * row.dead.total + math.sqrt(row.dead.total / 4.0) * _chance_margin(row)
    ]


def _chance_margin(row: LayerStats) -> float:
    """Binomial standard deviations a dead count must clear: 2, or 4 for units on pooled inputs
    (output (N, C, 1, ...): squeeze-excitation). Those see one vector per sample, nearly the same
    for every sample of a small probe, so each unit's sign is one coin flip for the whole probe; a
    model has dozens of such layers, and a 2-sigma bound would fire on one of them by chance in
    a third of the models (7 of 8 units of one of RegNetY-128GF's did)."""
    return 4.0 if pooled(row.shape) else 2.0


def _silent_on_noise(evidence: Evidence) -> str | None:
    """Why dead units are information rather than a fault: a trained model probed on synthetic
    inputs. Its units answer to features of its data, which noise may never show (a text
    detector's head stays off on noise, where there is no text); at init the same units are on
    or off by their random weights alone, so there a dead unit is a fault whatever the input.
    None when the finding stands."""
    trained = model_trained_evidence(evidence.scan)
    inputs = evidence.report.probe.inputs
    if trained is None or not inputs or any(spec.source != "synthesized" for spec in inputs):
        return None
    return (
        f"the model is trained ({trained}) and the probe's inputs are synthetic: a trained unit may "
        f"answer only to its data; pass {flag_of('input')} with real samples to judge it"
    )


def _spread_attention(row: LayerStats) -> bool:
    """Attention whose mean entropy is at least half the uniform one: its rows are spread over the
    keys, not peaked. Its top probability is then small (1/keys for uniform attention over more
    than ~80 keys falls below the saturation cutoff) without any row being saturated."""
    attention = row.attention
    if attention is None or not attention.entropy:
        return False
    if attention.max_entropy <= 0:
        return True  # one key: the softmax is 1 by construction, nothing to saturate
    return sum(attention.entropy) / len(attention.entropy) >= 0.5 * attention.max_entropy


# One-sided activations: their flat side is a unit near zero (a softened dead unit), not a squashed
# signal, and Mamba-style models parameterise a positive step size with softplus on that side by
# design (dt initialised in [0.001, 0.1]). Their saturation is measured and reported, not judged.
_ONE_SIDED = frozenset({"softplus", "logsigmoid"})


def _channel_gate(row: LayerStats) -> bool:
    """A sigmoid/hardsigmoid with one value per channel (output (N, C, 1, ...)): a channel gate
    (squeeze-excitation) that multiplies the signal. The signal's gradient passes through the
    multiplication, not through the gate's derivative, so a saturated gate (a channel fully on or
    off, as trained SE blocks often are) does not block it; only the gate's own layers stop
    learning."""
    return row.fn in _GATE_FUNCTIONS and pooled(row.shape) and row.shape[1] > 1


_GATE_FUNCTIONS = frozenset({"sigmoid", "hardsigmoid"})


def _in_saturated_gate(rows: tuple[LayerStats, ...], index: int) -> bool:
    """Row ``index`` is a layer of a channel gate's branch (pooled, one value per channel, up to
    the gate) and the gate is saturated for most of its outputs."""
    for row in rows[index:]:
        if not pooled(row.shape):
            return False
        if _channel_gate(row):
            return row.saturation is not None and row.saturation.fraction > _SATURATED_SHARE
    return False


def _output_under_bce(report: Report) -> str | None:
    """The row whose sigmoid output the probe's binary cross-entropy reads: its gradient at the
    sigmoid's input is p - y, so the output's saturation does not shrink it."""
    if report.probe.loss != "bce":
        return None
    last = next((r for r in reversed(report.layers) if r.kind is not RowKind.OTHER), None)
    return last.name if last is not None and last.fn == "sigmoid" else None


def _saturated(evidence: Evidence, rule: Rule) -> Iterable[Finding]:
    bound = _bound(rule)
    read_by_bce = _output_under_bce(evidence.report)
    for row in evidence.report.layers:
        if _spread_attention(row) or row.fn in _ONE_SIDED or _channel_gate(row) or row.name == read_by_bce:
            continue
        if row.saturation is not None and row.saturation.fraction > bound:
            yield _finding(
                rule,
                row.name,
                row.saturation.fraction,
                f"{row.saturation.fraction:.0%} of {row.fn} outputs are saturated "
                f"(derivative below {row.saturation.cutoff:g} of its maximum)",
            )


def _variance_rows(evidence: Evidence) -> list[LayerStats]:
    """Outputs of the linear maps (the pre-activations z_i of docs/theory.md#variance-through-a-layer), whose variance
    a good init keeps constant with depth; rows that are not finite are skipped, and so are
    embeddings (a lookup, whose output variance is its init convention, not a gain applied to the
    input) and zero-initialised branches (zero output by design)."""
    return [
        r
        for r in evidence.report.layers
        if r.kind is RowKind.PARAM
        and r.output.var is not None
        and not r.type.startswith("Embedding")
        and not evidence.by_design(r)
    ]


def _variance_ratio(evidence: Evidence) -> tuple[LayerStats, LayerStats, float] | None:
    """Last over first linear output variance, in a network without normalisation layers: a norm
    resets the forward variance, so there the ratio measures the head's chosen output scale, not
    a factor compounding with depth (GC301 judges each un-normalised layer's scale instead)."""
    if any(r.kind is RowKind.NORM for r in evidence.report.layers):
        return None
    rows = _variance_rows(evidence)
    if len(rows) < 2:
        return None
    first, last = rows[0], rows[-1]
    assert first.output.var is not None and last.output.var is not None
    if first.output.var <= 0:
        return None
    return first, last, last.output.var / first.output.var


def _variance_collapse(evidence: Evidence, rule: Rule) -> Iterable[Finding]:
    found = _variance_ratio(evidence)
    if found is not None and found[2] < _bound(rule):
        first, last, ratio = found
        yield _finding(
            rule,
            last.name,
            ratio,
            f"output variance of the last layer is {ratio:.2e} times that of the first "
            f"({first.name}): the signal shrinks with depth",
        )


def _variance_explosion(evidence: Evidence, rule: Rule) -> Iterable[Finding]:
    found = _variance_ratio(evidence)
    if found is not None and found[2] > _bound(rule):
        first, last, ratio = found
        yield _finding(
            rule,
            last.name,
            ratio,
            f"output variance of the last layer is {ratio:.2e} times that of the first "
            f"({first.name}): the signal grows with depth",
        )


# --- GC2xx: gradients -------------------------------------------------------------------------


def _param_rows(evidence: Evidence) -> list[LayerStats]:
    """Parameter rows with a gradient, less the zero-initialised branches (their gradients are
    zero at step 0 by design, GC302)."""
    return [
        r
        for r in evidence.report.layers
        if r.kind is RowKind.PARAM
        and not evidence.by_design(r)
        and r.grad is not None
        and r.grad.norm is not None
        and r.grad.ratio is not None
    ]


def _attention_projections(report: Report) -> set[str]:
    """Parameter rows that feed a spread-out attention (see :func:`_spread_attention`) through
    linear maps only: its query, key and value projections. While the attention is spread over
    the keys, the query and key projections receive a gradient of second order in the init scale
    (dL/dWq sums the keys' deviations times the values' deviations from their means, both small
    at a small init); it grows once the values differ. That is by design, not a layer that does
    not learn."""
    found: set[str] = set()
    pending: list[str] = []
    for row in report.layers:
        if row.kind is RowKind.PARAM:
            pending.append(row.name)
        elif row.attention is not None:
            if _spread_attention(row):
                found.update(pending)
            pending = []
        elif row.kind in (RowKind.ACTIVATION, RowKind.NORM):
            pending = []
    return found


def _gradient_ratio(evidence: Evidence) -> tuple[LayerStats, LayerStats, float] | None:
    """Relative gradient size (|grad W|/|W|) of the first parameter layer over the last; the
    first is the first layer outside a spread-out attention's projections (their gradient is
    second order at init, see :func:`_attention_projections`)."""
    projections = _attention_projections(evidence.report)
    rows = [r for r in _param_rows(evidence) if r.name not in projections] or _param_rows(evidence)
    if len(rows) < 2:
        return None
    # The last layer of the body, not the head: a head's weights are small by choice (std 0.01
    # classifiers, a language model's head tied to its std-0.02 embedding), which inflates its
    # relative gradient |dL/dW|/|W| by the same factor without the body's gradient vanishing.
    # With fewer than two body layers outside the zero-initialised branches (BEiT's LayerScale
    # gates every block), there is no depth to compare across: no ratio.
    head = _head(evidence.report)
    body = [r for r in rows if r.module not in head]
    if len(body) < 2:
        return None
    first, last = body[0], body[-1]
    assert first.grad is not None and last.grad is not None
    if first.grad.ratio is None or not last.grad.ratio:
        return None
    return first, last, first.grad.ratio / last.grad.ratio


def _global_norm(rows: Iterable[LayerStats]) -> float:
    norms = [r.grad.norm for r in rows if r.grad is not None and r.grad.norm is not None and math.isfinite(r.grad.norm)]
    return math.sqrt(sum(n * n for n in norms))


def _clip_advice(max_norm: float) -> str:
    return (
        f"clip gradients by global norm, e.g. torch.nn.utils.clip_grad_norm_(model.parameters(), "
        f"max_norm={max_norm:.3g}) (Pascanu et al. 2013); use a smaller init scale, normalisation "
        "layers or residual connections"
    )


def _vanishing(evidence: Evidence, rule: Rule) -> Iterable[Finding]:
    found = _gradient_ratio(evidence)
    if found is None:
        return
    first, last, ratio = found
    if ratio < _bound(rule):
        yield _finding(
            rule,
            first.name,
            ratio,
            f"relative gradient |dL/dW|/|W| of the first layer is {ratio:.2e} times that of "
            f"the last ({last.name}): the gradient vanishes with depth",
        )


def _exploding(evidence: Evidence, rule: Rule) -> Iterable[Finding]:
    found = _gradient_ratio(evidence)
    if found is None:
        return
    first, last, ratio = found
    # A first layer that feeds a normalisation is scale-invariant: a large relative step only
    # grows |W| and so shrinks the next ones (Arora, Li & Lyu 2018), as for GC204.
    layers = evidence.report.layers
    first_index = next(i for i, r in enumerate(layers) if r is first)
    if following_norm(layers, first_index, batch=evidence.report.probe.batch_size) is not None:
        return
    if ratio > _bound(rule):
        total = _global_norm(_param_rows(evidence))
        # A tenth of the measured global norm: the first layer's share then comes back to the
        # scale of the others while the direction of the step is kept.
        yield _finding(
            rule,
            first.name,
            ratio,
            f"relative gradient of the first layer is {ratio:.2e} times that of the last "
            f"({last.name}): the gradient grows with depth",
            advice=_clip_advice(total / 10),
        )


def _small_gradient(evidence: Evidence, rule: Rule) -> Iterable[Finding]:
    bound = _bound(rule)
    for row in evidence.report.layers:
        if row.name in evidence.detached:
            yield _finding(
                rule,
                row.name,
                None,
                "no gradient reaches this layer although the loss depends on it (changing its "
                "weights moves the loss): it is detached from the graph and never learns",
                advice="remove the .detach() / torch.no_grad() / .data on the path from this layer to the loss",
            )
    projections = _attention_projections(evidence.report)
    # Behind units a trained model keeps silent on synthetic inputs, and in the branch of a channel
    # gate it holds fully open or shut there, no gradient arrives (GC101 says why that is
    # information about the inputs, not a fault of the model).
    on_noise = _silent_on_noise(evidence) is not None
    beyond_chance = {r.name for r in _dead_rows(evidence, _DEAD_SHARE)}
    silenced = beyond_chance if on_noise else set()
    # Units on pooled inputs all off within GC101's chance margin: the layer feeding them gets no
    # gradient on this probe for the same coin flip, not because it cannot learn.
    chance_dead = {
        r.name
        for r in evidence.report.layers
        if r.dead is not None and r.dead.units and _chance_margin(r) > 2.0 and r.name not in beyond_chance
    }
    rows = evidence.report.layers
    index = {id(r): i for i, r in enumerate(rows)}
    for row in _param_rows(evidence):
        assert row.grad is not None and row.grad.norm is not None
        after = following_activation(rows, index[id(row)])
        if on_noise and ((after is not None and after.name in silenced) or _in_saturated_gate(rows, index[id(row)])):
            continue
        if after is not None and after.name in chance_dead:
            continue  # its units are off by a coin flip on this probe (GC101's chance margin)
        if row.grad.norm < bound and row.name not in projections:
            yield _finding(
                rule,
                row.name,
                row.grad.norm,
                f"|dL/dW| = {row.grad.norm:.2e}: a step of this size is below float32 "
                "resolution for weights of order 1, so the layer does not learn",
            )


def _large_gradient(evidence: Evidence, rule: Rule) -> Iterable[Finding]:
    bound = _bound(rule)
    rows = _param_rows(evidence)
    # A layer whose output feeds a normalisation is scale-invariant: its gradient is orthogonal to
    # W, so a large step only grows |W|, which shrinks the next steps (Arora, Li & Lyu 2018); it
    # cannot blow the layer up. (The gradient of a conv stem sums over every position, so it is
    # large on any image net.)
    index = {id(r): i for i, r in enumerate(evidence.report.layers)}
    large = [
        r
        for r in rows
        if r.grad is not None
        and r.grad.norm is not None
        and r.grad.norm > bound
        and following_norm(evidence.report.layers, index[id(r)], batch=evidence.report.probe.batch_size) is None
    ]
    if not large:
        return
    # Suggest clipping at the scale the healthy layers already have: sqrt(L) times their median
    # per-layer norm is the global norm L such layers would give; fall back to the bound itself.
    healthy = [r.grad.norm for r in rows if r not in large and r.grad is not None and r.grad.norm]
    max_norm = _median(healthy) * math.sqrt(len(rows)) if healthy else bound
    for row in large:
        assert row.grad is not None and row.grad.norm is not None
        yield _finding(
            rule,
            row.name,
            row.grad.norm,
            f"|dL/dW| = {row.grad.norm:.2e} on the probe batch: one step at a usual learning "
            "rate moves this layer's weights by more than their own scale",
            advice=_clip_advice(max_norm),
        )


# --- GC3xx: initialisation --------------------------------------------------------------------

_DENSE = ("Linear", "Conv1D")


def _head(report: Report) -> set[str]:
    """Modules of the classifier head: the output layer, and the layers after the body's last
    normalisation (or, in a network without one, after its last conv, embedding or attention
    row). A head is initialised small on purpose (torchvision's std 0.01, timm's std 0.02 and
    head_init_scale) so that predictions start near uniform, or large (torchvision's Inception v3
    draws its classifier with std 0.1) so that they start confident; either way the scale sets
    the output's spread and does not compound into the body's signal. A network that is dense all
    the way has no head but its output layer: its layers' scales compound."""
    rows = report.layers
    params = [r for r in rows if r.kind is RowKind.PARAM]
    if not params:
        return set()
    norms = [i for i, r in enumerate(rows) if r.kind is RowKind.NORM]
    body_end = (
        norms[-1]
        if norms
        else max(
            (
                i
                for i, r in enumerate(rows)
                if (r.kind is RowKind.PARAM and r.type not in _DENSE)
                or (r.kind is RowKind.ACTIVATION and r.attention is not None)
            ),
            default=None,
        )
    )
    head = {params[-1].module}
    if body_end is not None:
        head.update(r.module for r in rows[body_end + 1 :] if r.kind is RowKind.PARAM)
    return head


_SCHEME_ADVICE = {
    "he": "torch.nn.init.kaiming_normal_(w, nonlinearity='relu') (or 'leaky_relu' with a=slope)",
    "glorot": "torch.nn.init.xavier_normal_(w, gain=torch.nn.init.calculate_gain(<activation>))",
    "lecun": "torch.nn.init.kaiming_normal_(w, nonlinearity='linear') (LeCun normal, for SELU)",
}


def _compounding_small(report: Report, k: float) -> set[str]:
    """Rows judged smaller than prescribed whose shortfalls compound: two or more of them in one
    un-normalised run (the rows between two normalisations), across which the measured signal
    does shrink (the last one's output variance is below 1/k of the first one's) and reaches the
    normalisation that closes the run that small (its input variance is not k times the last
    one's output variance, as it is where a skip connection adds the branch to a larger signal).

    A single small layer scales the signal once and sets the next layers' input scale (WavLM's
    gated position bias, a state-space model's projection before its softplus). Small layers
    inside a residual branch (PyTorch's default init on GCViT's MBConv blocks, the std-0.02
    focal modulation of FocalNet) only shrink what the branch adds: the skip connection carries
    the signal past them at its size. Before a saturating activation a small layer is the
    unsaturated side."""
    runs: list[tuple[list[LayerStats], LayerStats | None]] = []
    current: list[LayerStats] = []
    for row in report.layers:
        if row.kind is RowKind.NORM:
            runs.append((current, row))
            current = []
        elif row.init is not None and math.isfinite(row.init.measured_var) and row.init.ratio < 1.0 / k:
            current.append(row)
    runs.append((current, None))
    compounding: set[str] = set()
    for run, closing in runs:
        if len(run) < 2:
            continue
        first, last = run[0].output.var, run[-1].output.var
        arriving = closing.input.var if closing is not None and closing.input is not None else None
        if arriving is not None and last is not None and arriving > k * last:
            continue  # added to a larger signal on the way to the norm: a residual branch
        if first is None or last is None or not first > 0 or last < first / k:
            compounding.update(row.name for row in run)
    return compounding


def _init_scale(evidence: Evidence, rule: Rule) -> Iterable[Finding]:
    k = _bound(rule)
    head = _head(evidence.report)
    compounding = _compounding_small(evidence.report, k)
    for row in evidence.report.layers:
        init = row.init
        if init is None or not math.isfinite(init.measured_var):
            continue
        ratio = init.ratio
        if 1.0 / k <= ratio <= k:
            continue
        if row.module in head or (ratio < 1.0 / k and row.name not in compounding):
            continue
        judged = evidence.init.get(row.name)
        if judged is not None and judged.between:
            continue
        after = f"followed by {init.activation}" if init.activation else "with no activation after it"
        mode = f" with {judged.mode}" if judged is not None else ""
        fan = f"fan_in={init.fan_in}, fan_out={init.fan_out}"
        why = f"; at init because {judged.evidence}" if judged is not None else ""
        yield _finding(
            rule,
            row.name,
            ratio,
            f"weight variance {init.measured_var:.3g} is {ratio:.3g} times what {init.scheme} "
            f"init{mode} (the closest fan) prescribes ({init.expected_var:.3g}; {after}, {fan}){why}",
            advice=f"re-initialise with {init.scheme}: {_SCHEME_ADVICE.get(init.scheme, '')} "
            f"or gradcheck reinit {flag_of('scheme')} {init.scheme}",
        )


_GATE_DESIGNS = {
    GateKind.NORM_SCALE: "a norm's gamma at 0, as timm's zero_init_last and torchvision's "
    "zero_init_residual set the last BatchNorm of a residual branch (Goyal et al. 2017)",
    GateKind.SCALE: "a scale parameter at 0 or at a tiny constant, as ReZero/SkipInit set the "
    "residual branch's alpha to 0 and LayerScale (CaiT, ConvNeXt, EdgeNeXt) to 1e-5 or 1e-6",
    GateKind.ZERO_MATRIX: "a weight matrix at 0, as LoRA sets B and DiT its adaLN-zero modulation",
}


def _zero_init_branch(evidence: Evidence, rule: Rule) -> Iterable[Finding]:
    """One finding per kind of gate: what (the gates), where (the first few), why by design."""
    branches = evidence.branches
    behind = branches.behind or {}
    for kind in GateKind:
        gates = [g for g in branches.gates if g.kind is kind]
        if not gates:
            continue
        layers = sum(len(behind.get(g.name, ())) for g in gates)
        names = ", ".join(g.name for g in gates[:3]) + (", ..." if len(gates) > 3 else "")
        yield _finding(
            rule,
            gates[0].name,
            float(len(gates)),
            f"{len(gates)} zero-initialised branch gate(s) ({names}): {_GATE_DESIGNS[kind]}. "
            f"Each branch starts as the identity; the {layers} layer(s) behind them get exactly "
            "zero gradient at step 0 by design, and the gate's own gradient opens them after one "
            "step",
        )


# --- GC4xx: recurrent layers (docs/theory.md#gradient-through-time) ------------------------------


def _recurrent(report: Report) -> Iterable[tuple[LayerStats, DirectionTrace]]:
    for row in report.layers:
        if row.through_time is not None and row.through_time.ok:
            for trace in row.through_time.directions:
                yield row, trace


def _where(row: LayerStats, trace: DirectionTrace) -> str:
    return f"{row.name} (layer {trace.layer}, {trace.direction})"


def _short_horizon(evidence: Evidence, rule: Rule) -> Iterable[Finding]:
    bound = _bound(rule)
    for row, trace in _recurrent(evidence.report):
        fraction = row.through_time.horizon_fraction if row.through_time else 0.01
        # A sequence shorter than the bound cannot show a longer horizon; judge only longer ones.
        last = trace.grad_norms[-1 if trace.direction == "forward" else 0] if trace.grad_norms else 0.0
        if trace.steps > bound and last > 0 and trace.horizon < bound:
            yield _finding(
                rule,
                _where(row, trace),
                float(trace.horizon),
                f"|dL/dh_t| falls below {fraction:g} of its last-step value within {trace.horizon} of "
                f"{trace.steps} steps (per-step rate {trace.decay_rate or 0:.3g})",
            )


def _exploding_in_time(evidence: Evidence, rule: Rule) -> Iterable[Finding]:
    bound = _bound(rule)
    for row, trace in _recurrent(evidence.report):
        if trace.decay_rate is not None and trace.decay_rate > bound:
            radius = max(trace.spectral_radius.values(), default=0.0)
            yield _finding(
                rule,
                _where(row, trace),
                trace.decay_rate,
                f"|dL/dh_t| grows by x{trace.decay_rate:.3g} per step back in time "
                f"(largest recurrent spectral radius {radius:.3g})",
            )


def _saturated_gates(evidence: Evidence, rule: Rule) -> Iterable[Finding]:
    bound = _bound(rule)
    for row, trace in _recurrent(evidence.report):
        for gate, stats in trace.gates.items():
            if stats.saturation > bound:
                yield _finding(
                    rule,
                    f"{_where(row, trace)} {gate} gate",
                    stats.saturation,
                    f"{stats.saturation:.0%} of the {gate} gate's values are saturated (mean {stats.mean:.3g})",
                )


_UNIT = (0.0, 1.0)
_POSITIVE = (0.0, math.inf)

RULES: tuple[Rule, ...] = (
    Rule(
        "GC001",
        "non-finite",
        Severity.ERROR,
        None,
        "NaN or Inf in a weight, buffer, activation or gradient; the first producer is named",
        "find the first producer: check its weights and inputs, lower the learning rate, clip "
        "gradients, "
        "or use a numerically safe formulation (e.g. log_softmax instead of log(softmax))",
        _non_finite,
        mandatory=True,
    ),
    Rule(
        "GC002",
        "batchnorm-bad-variance",
        Severity.ERROR,
        None,
        "a BatchNorm running_var that is zero, negative or NaN",
        "restore the statistics from a healthy checkpoint, or recompute them: run the model in "
        "train "
        "mode with torch.no_grad() over a few hundred training batches (momentum=None averages "
        "them)",
        _bn_bad_variance,
    ),
    Rule(
        "GC003",
        "batchnorm-never-updated",
        Severity.WARNING,
        None,
        "a BatchNorm whose running statistics were never updated (num_batches_tracked == 0, defaults)",
        "the model was never trained in train mode, or the statistics were not saved: recompute "
        "them "
        "in train mode under torch.no_grad() over training batches, then save the state_dict again",
        _bn_never_updated,
    ),
    Rule(
        "GC101",
        "dead-relu",
        Severity.ERROR,
        _DEAD_SHARE,
        "share of a ReLU-family layer's units that are zero for every probe sample",
        f"re-initialise with He init (gradcheck reinit {flag_of('scheme')} he), lower the learning rate, or "
        "use "
        "Leaky ReLU (slope ~0.01), PReLU or ELU so negative units still get a gradient",
        _dead,
        threshold_range=_UNIT,
    ),
    Rule(
        "GC102",
        "saturated-activation",
        Severity.ERROR,
        _SATURATED_SHARE,
        "share of a sigmoid/tanh-family layer's outputs whose derivative has all but vanished",
        f"use Glorot init for tanh/sigmoid layers (gradcheck reinit {flag_of('scheme')} glorot), add "
        "normalisation "
        "before the activation, or switch to a non-saturating activation (ReLU family, GELU)",
        _saturated,
        threshold_range=_UNIT,
    ),
    Rule(
        "GC103",
        "activation-variance-collapse",
        Severity.WARNING,
        1e-2,
        "output variance of the last linear layer over that of the first below the threshold",
        "initialise each layer for the activation after it (He for ReLU, Glorot for tanh/sigmoid: "
        f"gradcheck reinit {flag_of('scheme')} auto), or add batch/layer normalisation",
        _variance_collapse,
        worse=Worse.BELOW,
        threshold_range=(0.0, 1.0),
    ),
    Rule(
        "GC104",
        "activation-variance-explosion",
        Severity.WARNING,
        1e2,
        "output variance of the last linear layer over that of the first above the threshold",
        "use a smaller init scale (He/Glorot for the activation that follows: gradcheck reinit "
        f"{flag_of('scheme')} auto), or add batch/layer normalisation",
        _variance_explosion,
        threshold_range=(1.0, math.inf),
    ),
    Rule(
        "GC201",
        "vanishing-gradient",
        Severity.ERROR,
        1e-3,
        "first-to-last ratio of the relative gradient |dL/dW|/|W| below the threshold",
        "use non-saturating activations and He/Glorot init, add batch/layer normalisation or "
        "residual "
        "connections to shorten the gradient path",
        _vanishing,
        worse=Worse.BELOW,
        threshold_range=(0.0, 1.0),
    ),
    Rule(
        "GC202",
        "exploding-gradient",
        Severity.ERROR,
        1e3,
        "first-to-last ratio of the relative gradient |dL/dW|/|W| above the threshold",
        "clip gradients by norm, use a smaller init scale, add normalisation layers or residual connections",
        _exploding,
        threshold_range=(1.0, math.inf),
    ),
    Rule(
        "GC203",
        "small-layer-gradient",
        Severity.WARNING,
        1e-7,
        "a layer's gradient norm |dL/dW| below an absolute bound",
        "look upstream of this layer for dead or saturated activations; use non-saturating "
        "activations, "
        "He/Glorot init, normalisation or residual connections",
        _small_gradient,
        worse=Worse.BELOW,
        threshold_range=_POSITIVE,
    ),
    Rule(
        "GC204",
        "large-layer-gradient",
        Severity.WARNING,
        1e3,
        "a layer's gradient norm |dL/dW| above an absolute bound",
        "clip gradients by norm, lower the init scale or the learning rate, add normalisation",
        _large_gradient,
        threshold_range=_POSITIVE,
    ),
    Rule(
        "GC301",
        "init-scale",
        Severity.WARNING,
        3.0,
        "weight variance over what He/Glorot/LeCun prescribes for the activation that follows, outside [1/k, k]",
        f"re-initialise the layer for the activation that follows it (gradcheck reinit {flag_of('scheme')} auto)",
        _init_scale,
        worse=Worse.AWAY,
        threshold_range=(1.0, math.inf),
    ),
    Rule(
        "GC302",
        "zero-init-branch",
        Severity.INFO,
        None,
        "a zero-initialised residual branch (gamma, alpha, adaLN or LoRA B at 0) and the layers "
        "whose gradient it holds at zero at step 0, by design",
        "nothing to fix: the gate's gradient is non-zero and opens the branch after the first "
        "optimizer step (check that the gate's parameter is not frozen)",
        _zero_init_branch,
    ),
    Rule(
        "GC401",
        "short-gradient-horizon",
        Severity.WARNING,
        10.0,
        "steps back over which |dL/dh_t| stays above 1% of its last-step value, below the threshold",
        f"use LSTM/GRU (forget-gate bias 1: gradcheck reinit {flag_of('forget_bias')}), orthogonal or identity "
        f"recurrent init (gradcheck reinit {flag_of('recurrent')} orthogonal|identity), or truncated BPTT sized "
        "to the horizon",
        _short_horizon,
        worse=Worse.BELOW,
        threshold_range=(1.0, math.inf),
    ),
    Rule(
        "GC402",
        "exploding-through-time",
        Severity.ERROR,
        1.05,
        "per-step growth of |dL/dh_t| going back in time above the threshold",
        "clip gradients by norm, re-initialise the recurrent weights orthogonally (spectral radius 1), "
        "or use truncated BPTT",
        _exploding_in_time,
        threshold_range=(1.0, math.inf),
    ),
    Rule(
        "GC403",
        "saturated-gates",
        Severity.WARNING,
        0.5,
        "share of a recurrent gate's values whose derivative has all but vanished",
        f"re-initialise the layer (gradcheck reinit {flag_of('scheme')} glorot {flag_of('recurrent')} "
        "orthogonal), normalise its inputs, or lower the learning rate",
        _saturated_gates,
        threshold_range=_UNIT,
    ),
)

RULES_BY_CODE = {rule.code: rule for rule in RULES}
RULES_BY_NAME = {rule.name: rule for rule in RULES}


def resolve(selector: str) -> tuple[Rule, ...]:
    """Rules named by a code ('GC101'), a code prefix ('GC1', 'GC'), or a name ('dead-relu')."""
    text = selector.strip()
    if text in RULES_BY_NAME:
        return (RULES_BY_NAME[text],)
    upper = text.upper()
    matched = tuple(rule for rule in RULES if rule.code.startswith(upper)) if upper.startswith("GC") else ()
    if not matched:
        known = ", ".join(f"{r.code} {r.name}" for r in RULES)
        raise ConfigError(f"unknown rule {selector!r}", hint=f"known rules: {known}")
    return matched


def _field(key: str) -> str:
    return f"`{key}`"


def configure(
    *,
    select: Sequence[str] | None = None,
    ignore: Sequence[str] = (),
    overrides: Mapping[str, RuleOverride] | None = None,
    name_of: Callable[[str], str] = _field,
) -> tuple[Rule, ...]:
    """The active rules: ``select`` (default all) minus ``ignore``, with overrides applied.

    ``overrides`` is keyed by code or name. Mandatory rules (non-finite) stay on and stay errors:
    a NaN makes every other number meaningless, so no configuration may hide it. ``name_of`` says,
    for error messages, where a setting came from: it is given ``select``, ``ignore``,
    ``rules.KEY``, ``rules.KEY.threshold`` or ``rules.KEY.severity`` (by default the field name).
    """
    chosen = (
        {r.code for s in select for r in _located(s, name_of("select"))}
        if select is not None
        else {r.code for r in RULES}
    )
    for selector in ignore:
        for rule in _located(selector, name_of("ignore")):
            if rule.mandatory:
                raise ConfigError(
                    f"{name_of('ignore')}: {rule.code} {rule.name} cannot be ignored",
                    hint="non-finite values are always an error",
                )
            chosen.discard(rule.code)
    configured: dict[str, Rule] = {}
    for key, override in (overrides or {}).items():
        matched = _located(key, name_of(f"rules.{key}"))
        if len(matched) != 1:
            raise ConfigError(
                f"{name_of(f'rules.{key}')}: settings need one rule, not a prefix",
                hint="use a full code (GC101) or name (dead-relu)",
            )
        rule = configured.get(matched[0].code, matched[0])
        configured[rule.code] = _apply(rule, override, functools.partial(_part, name_of, key))
    return tuple(configured.get(r.code, r) for r in RULES if r.code in chosen or r.mandatory)


def _part(name_of: Callable[[str], str], key: str, part: str) -> str:
    return name_of(f"rules.{key}.{part}")


def _located(selector: str, where: str) -> tuple[Rule, ...]:
    try:
        return resolve(selector)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc.message}", hint=exc.hint) from None


def _apply(rule: Rule, override: RuleOverride, where: Callable[[str], str]) -> Rule:
    if override.threshold is not None:
        if rule.threshold_range is None:
            raise ConfigError(f"{where('threshold')}: {rule.code} {rule.name} takes no threshold")
        low, high = rule.threshold_range
        if not (low < override.threshold < high) or math.isnan(override.threshold):
            raise ConfigError(
                f"{where('threshold')}: {override.threshold} is outside ({low:g}, {high:g})",
                hint=f"the default is {rule.threshold:g}" if rule.threshold is not None else None,
            )
        rule = replace(rule, threshold=override.threshold)
    if override.severity is not None:
        if rule.mandatory and override.severity is not Severity.ERROR:
            raise ConfigError(f"{where('severity')}: {rule.code} {rule.name} is always an error")
        rule = replace(rule, severity=override.severity)
    if override.ignore_layers:
        rule = replace(rule, ignore_layers=rule.ignore_layers + tuple(override.ignore_layers))
    return rule


def _ignored(rule: Rule, finding: Finding) -> bool:
    return finding.layer is not None and any(
        fnmatch.fnmatchcase(finding.layer, pattern) for pattern in rule.ignore_layers
    )


def evaluate(
    report: Report,
    rules: Iterable[Rule] = RULES,
    *,
    scan: CheckpointScan | None = None,
    init: Mapping[str, InitJudgement] | None = None,
    branches: ZeroInitBranches | None = None,
    detached: frozenset[str] = frozenset(),
) -> tuple[Finding, ...]:
    """Every finding of every rule, in rule order then execution order."""
    evidence = Evidence(
        report=report,
        scan=scan,
        init=init or {},
        branches=branches or ZeroInitBranches(),
        detached=detached,
    )
    findings: list[Finding] = []
    for rule in rules:
        findings.extend(f for f in rule.evaluate(evidence, rule) if not _ignored(rule, f))
    return tuple(findings)


def with_findings(report: Report, rules: Iterable[Rule] = RULES, *, scan: CheckpointScan | None = None) -> Report:
    return replace(report, findings=evaluate(report, rules, scan=scan))
