"""The CI gate as a library: scan, probe, evaluate rules, compare with a baseline. Never prints.

from gradcheck_cli import api
report = api.check(Path("model.pt"), load_options=api.LoadOptions(arch="model.py:build"))
failing = [f for f in report.findings if gates(f, Severity.ERROR)]
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from gradcheck_cli.baseline import DEFAULT_TOLERANCE, BaselineFinding, compare
from gradcheck_cli.records import BaselineStatus, Finding, Report, Severity
from gradcheck_cli.rules import RULES, Rule, evaluate

if TYPE_CHECKING:
    from torch import nn

    from gradcheck_cli.api import LoadOptions
    from gradcheck_cli.model.handle import LoadedModel
    from gradcheck_cli.probe.options import ProbeOptions
    from gradcheck_cli.probe.run import Progress


def check_path(
    path: Path,
    *,
    load_options: LoadOptions,
    probe: ProbeOptions,
    rules: Iterable[Rule] = RULES,
    baseline: tuple[BaselineFinding, ...] | None = None,
    use_baseline: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    progress: Progress | None = None,
) -> Report:
    """Load ``path`` (NaN weights allowed: they are a finding here, not a load error), scan its
    tensors, probe it, measure init scales and return the report with its findings.

    With ``use_baseline``, every finding is marked new/worsened/unchanged against ``baseline``
    (None there means the baseline has no entry for this model: everything is new).
    """
    from gradcheck_cli import api
    from gradcheck_cli.model.formats import ModelFormat, detect_format

    if detect_format(path) is ModelFormat.ONNX:
        report = _checked_onnx(path, probe, rules, progress)
    else:
        loaded = api.load(path, replace(load_options, allow_nonfinite=True), device=probe.device)
        report = _checked(loaded, probe, rules, progress)
    if use_baseline:
        report = replace(report, findings=compare(report.findings, baseline, tolerance=tolerance))
    return report


def check_module(
    module: nn.Module,
    probe: ProbeOptions,
    *,
    rules: Iterable[Rule] = RULES,
    name: str = "<module>",
    progress: Progress | None = None,
) -> Report:
    """:func:`check_path` for an in-memory module (left as it was found, as inspect does)."""
    from gradcheck_cli.model.formats import ModelFormat
    from gradcheck_cli.model.handle import LoadedModel

    loaded = LoadedModel(path=Path(name), format=ModelFormat.TORCH_ZIP, module=module)
    return _checked(loaded, probe, rules, progress)


def _checked_onnx(path: Path, probe: ProbeOptions, rules: Iterable[Rule], progress: Progress | None) -> Report:
    """ONNX: the initializers are scanned, the graph probed; init-scale is not measured (the
    weight layouts of Gemm/MatMul/Conv nodes are not mapped to layers yet)."""
    from gradcheck_cli import api
    from gradcheck_cli.scan import scan_onnx

    scan = scan_onnx(path)
    report = api.inspect_onnx(path, probe=probe, allow_nonfinite=True, progress=progress)
    return replace(report, findings=evaluate(report, rules, scan=scan))


def _checked(loaded: LoadedModel, probe: ProbeOptions, rules: Iterable[Rule], progress: Progress | None) -> Report:
    from gradcheck_cli import api
    from gradcheck_cli.init_scale import with_init_scales
    from gradcheck_cli.scan import scan_module

    scan = scan_module(loaded.module)  # before the probe runs: the checkpoint as shipped
    report = api.inspect_model(loaded, probe, progress=progress)
    report = with_init_scales(report, loaded.module)
    return replace(report, findings=evaluate(report, rules, scan=scan))


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
