"""The CI gate as a library: scan, probe, evaluate rules, compare with a baseline. Never prints.

``inspect`` and ``check`` both diagnose a model here, with the same rules and settings, so that they
never disagree about one file; only their exit codes differ.

    from gradcheck_cli import api
    report = api.check(Path("model.pt"), load=api.LoadOptions(arch="model.py:build"))
    failing = [f for f in report.findings if gates(f, Severity.ERROR)]
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from gradcheck_cli.gate.baseline import BaselineFinding, compare
from gradcheck_cli.gate.rules import RULES, RULES_BY_CODE, Rule, evaluate
from gradcheck_cli.options import DEFAULT_BASELINE_TOLERANCE, LoadOptions, ProbeOptions
from gradcheck_cli.records import BaselineStatus, Finding, Report, Severity

if TYPE_CHECKING:
    from torch import nn

    from gradcheck_cli.gate.scan import CheckpointScan
    from gradcheck_cli.model.handle import LoadedModel
    from gradcheck_cli.probe.run import Progress


def diagnose(
    path: Path,
    *,
    load: LoadOptions | None = None,
    probe: ProbeOptions | None = None,
    rules: Iterable[Rule] = RULES,
    baseline: tuple[BaselineFinding, ...] | None = None,
    use_baseline: bool = False,
    tolerance: float = DEFAULT_BASELINE_TOLERANCE,
    progress: Progress | None = None,
) -> Report:
    """Load ``path``, scan its tensors, probe it, measure init scales and return the report with
    its findings. NaN/Inf weights are refused unless ``load.allow_nonfinite`` (then they are a
    finding of the scan).

    With ``use_baseline``, every finding is marked new/worsened/unchanged against ``baseline``
    (None there means the baseline has no entry for this model: everything is new).
    """
    from gradcheck_cli.model.formats import is_onnx
    from gradcheck_cli.model.load import load_model

    load = load or LoadOptions()
    probe = probe or ProbeOptions()
    if is_onnx(path):
        report = _checked_onnx(path, probe, rules, progress, allow_nonfinite=load.allow_nonfinite)
    else:
        report = _checked(load_model(path, load, device=probe.device), probe, rules, progress)
    if use_baseline:
        report = replace(report, findings=compare(report.findings, baseline, tolerance=tolerance))
    return report


def check_path(
    path: Path,
    *,
    load: LoadOptions | None = None,
    probe: ProbeOptions | None = None,
    rules: Iterable[Rule] = RULES,
    baseline: tuple[BaselineFinding, ...] | None = None,
    use_baseline: bool = False,
    tolerance: float = DEFAULT_BASELINE_TOLERANCE,
    progress: Progress | None = None,
) -> Report:
    """What ``gradcheck check`` computes for one model: :func:`diagnose` with NaN/Inf weights
    allowed (they are a finding here, not a load error)."""
    return diagnose(
        path,
        load=replace(load or LoadOptions(), allow_nonfinite=True),
        probe=probe,
        rules=rules,
        baseline=baseline,
        use_baseline=use_baseline,
        tolerance=tolerance,
        progress=progress,
    )


def check_module(
    module: nn.Module,
    probe: ProbeOptions | None = None,
    *,
    rules: Iterable[Rule] = RULES,
    name: str = "<module>",
    progress: Progress | None = None,
) -> Report:
    """:func:`check_path` for an in-memory module (left as it was found, as inspect does)."""
    from gradcheck_cli.probe.entry import loaded_module

    return _checked(loaded_module(module, name=name), probe or ProbeOptions(), rules, progress)


def _checked_onnx(
    path: Path, probe: ProbeOptions, rules: Iterable[Rule], progress: Progress | None, *, allow_nonfinite: bool
) -> Report:
    """ONNX: the initializers are scanned, the graph probed; init-scale is not measured (the
    weight layouts of Gemm/MatMul/Conv nodes are not mapped to layers yet)."""
    from gradcheck_cli.gate.scan import scan_onnx
    from gradcheck_cli.probe.entry import inspect_onnx

    scan = scan_onnx(path)
    report = inspect_onnx(path, probe=probe, allow_nonfinite=allow_nonfinite, progress=progress)
    return replace(report, findings=evaluate(report, rules, scan=scan))


def _checked(loaded: LoadedModel, probe: ProbeOptions, rules: Iterable[Rule], progress: Progress | None) -> Report:
    """The one place a torch model's findings are computed: the checkpoint scan, the probe, the
    init-scale judgement and the zero-initialised branches are all evidence for the rules."""
    from gradcheck_cli.gate.detached import find_detached
    from gradcheck_cli.gate.init_scale import with_init_scales
    from gradcheck_cli.gate.scan import scan_module
    from gradcheck_cli.gate.zero_init import find_branches
    from gradcheck_cli.probe.distributed import world_size
    from gradcheck_cli.probe.entry import inspect_loaded

    active = tuple(rules)
    # Before the probe runs: the checkpoint as shipped.
    scan = scan_module(loaded.module, checkpoint=loaded.checkpoint, floating_finite=loaded.weights_finite)
    probe, note = _probe_for(scan, probe)
    report = inspect_loaded(loaded, probe, progress=progress)
    if note:
        report = replace(report, notes=(*report.notes, note))
    if world_size() > 1:
        # Under torchrun the probe left the weights sharded across the processes: the evidence that
        # reads whole weights or runs the model again is not gathered, and the report says so.
        unsharded = (
            "under torchrun, the init-scale, zero-initialised-branch and detached-branch evidence is not gathered"
        )
        report = replace(report, notes=(*report.notes, unsharded))
        return replace(report, findings=evaluate(report, active, scan=scan))
    report, judged = with_init_scales(report, loaded.module, scan=scan)
    branches = find_branches(loaded, probe, report, scan.zero_parameters, bound=_small_gradient_bound(active))
    detached = find_detached(loaded, probe, report)
    findings = evaluate(report, active, scan=scan, init=judged, branches=branches, detached=detached)
    return replace(report, findings=findings)


def _probe_for(scan: CheckpointScan, probe: ProbeOptions) -> tuple[ProbeOptions, str | None]:
    """Batch statistics for a model that was never trained: eval-mode BatchNorm with fresh
    statistics (mean 0, var 1) is the identity, so an eval probe would measure an unnormalised
    network that nobody trains or deploys (the gradients of a depthwise MobileNet vanish there);
    training normalises with batch statistics, and that is what the gradients must be judged on.
    Dropout and stochastic depth stay off: on a small probe batch they can drop a whole block."""
    from gradcheck_cli.options import Mode

    fresh = scan.batchnorms and len(scan.never_trained) == len(scan.batchnorms)
    if probe.mode is not Mode.EVAL or not fresh:
        return probe, None
    return replace(probe, mode=Mode.BATCH_STATS), (
        "probed with batch statistics (`mode` batch-stats): every BatchNorm holds a fresh module's defaults "
        "(the model was never trained), and eval-mode BatchNorm with default statistics is the identity, "
        "which no one trains; dropout and stochastic depth stay off, as in eval"
    )


def _small_gradient_bound(rules: tuple[Rule, ...]) -> float:
    """The gradient norm below which a layer counts as not learning: GC203's configured
    threshold, or its default when GC203 is not active (the other gradient rules still need to
    know which zero gradients are by design)."""
    for rule in rules:
        if rule.code == "GC203" and rule.threshold is not None:
            return rule.threshold
    default = RULES_BY_CODE["GC203"].threshold
    assert default is not None
    return default


def gates(finding: Finding, fail_on: Severity) -> bool:
    """Whether ``finding`` fails the gate: at or above ``fail_on``, and not already accepted in a
    baseline (new or worsened)."""
    return finding.severity.rank >= fail_on.rank and finding.baseline in (
        None,
        BaselineStatus.NEW,
        BaselineStatus.WORSENED,
    )


@dataclass(frozen=True)
class ModelOutcome:
    """One model's result: a report, or the error that stopped it (load or probe: exit 2)."""

    path: str
    report: Report | None = None
    error: str | None = None
    hint: str | None = None

    @property
    def findings(self) -> tuple[Finding, ...]:
        return self.report.findings if self.report is not None else ()


@dataclass(frozen=True)
class GateResult:
    outcomes: tuple[ModelOutcome, ...]
    fail_on: Severity
    rules: tuple[Rule, ...] = RULES  # the active rules (JUnit writes one test case per rule)
    baseline: bool = False  # whether findings were compared with a baseline

    def failing(self, outcome: ModelOutcome) -> tuple[Finding, ...]:
        return tuple(f for f in outcome.findings if gates(f, self.fail_on))

    @property
    def failed(self) -> bool:
        return any(self.failing(o) for o in self.outcomes)

    @property
    def errored(self) -> bool:
        return any(o.error is not None for o in self.outcomes)

    def count(self, severity: Severity) -> int:
        return sum(1 for o in self.outcomes for f in o.findings if f.severity is severity)

    def summary(self) -> str:
        """The one line printed at the end, e.g. 'gradcheck: 2 models, 1 error, 0 warnings, 0 info:
        failed (1 finding(s) at or above error)'."""
        models = len(self.outcomes)
        counts = ", ".join(_counted(self.count(s), s) for s in (Severity.ERROR, Severity.WARNING, Severity.INFO))
        gating = sum(len(self.failing(o)) for o in self.outcomes)
        accepted = ""
        if self.baseline:
            known = sum(1 for o in self.outcomes for f in o.findings if f.baseline is BaselineStatus.UNCHANGED)
            accepted = f", {known} unchanged from the baseline"
        broken = sum(1 for o in self.outcomes if o.error is not None)
        if broken:
            verdict = f"{broken} model(s) could not be checked"
        elif gating:
            verdict = f"failed ({gating} finding(s) at or above {self.fail_on.value})"
        else:
            verdict = "passed"
        noun = "model" if models == 1 else "models"
        return f"gradcheck: {models} {noun}, {counts}{accepted}: {verdict}"


def _counted(count: int, severity: Severity) -> str:
    plural = "" if count == 1 or severity is Severity.INFO else "s"
    return f"{count} {severity.value}{plural}"
