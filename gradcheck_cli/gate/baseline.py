"""`baseline`: compare findings with an earlier JSON report and mark each new, worsened or
unchanged, so a team can adopt the gate on a model that already has findings.

A finding is matched to a baseline finding by (rule code, layer); repeated keys are matched in
order. It is *worsened* when its severity went up, or its value moved further past the
threshold by more than ``tolerance`` (relative; the probe is seeded, so the tolerance only has
to absorb float differences between machines and library versions).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gradcheck_cli.errors import LoadError
from gradcheck_cli.gate.rules import RULES_BY_CODE, Worse
from gradcheck_cli.options import DEFAULT_BASELINE_TOLERANCE
from gradcheck_cli.records import BaselineStatus, Finding, Severity


@dataclass(frozen=True)
class BaselineFinding:
    code: str
    layer: str | None
    severity: Severity
    value: float | None


@dataclass(frozen=True)
class Baseline:
    """Findings of an earlier run, per model path as it was written in the report."""

    models: dict[str, tuple[BaselineFinding, ...]]

    def for_model(self, path: str) -> tuple[BaselineFinding, ...] | None:
        """The baseline of ``path``: the same path, else the one entry with the same file name
        (a checkout in another directory). None: the model is not in the baseline (all new)."""
        if path in self.models:
            return self.models[path]
        name = Path(path).name
        by_name = [found for key, found in self.models.items() if Path(key).name == name]
        return by_name[0] if len(by_name) == 1 else None


def load_baseline(path: Path) -> Baseline:
    """Read a report written by ``gradcheck check`` as JSON (one report or a list)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoadError(
            f"baseline {path} does not exist",
            hint="write one with: gradcheck check MODEL `format` json=" + str(path),
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoadError(f"baseline {path} is not a JSON report: {exc}") from None
    reports = data if isinstance(data, list) else [data]
    models: dict[str, tuple[BaselineFinding, ...]] = {}
    for index, report in enumerate(reports):
        if isinstance(report, dict) and "error" in report:
            continue  # a model that could not be checked then has no accepted findings
        try:
            model_path = str(report["model"]["path"])
            models[model_path] = tuple(_finding(f) for f in report["findings"])
        except (KeyError, TypeError, ValueError) as exc:
            raise LoadError(
                f"baseline {path}: report {index} is not a gradcheck report ({exc})",
                hint="write one with: gradcheck check MODEL `format` json=FILE",
            ) from None
    return Baseline(models=models)


def _finding(data: Any) -> BaselineFinding:
    value = data["value"]
    return BaselineFinding(
        code=str(data["code"]),
        layer=data["layer"],
        severity=Severity(data["severity"]),
        value=float(value) if value is not None else None,
    )


def compare(
    findings: tuple[Finding, ...],
    baseline: tuple[BaselineFinding, ...] | None,
    *,
    tolerance: float = DEFAULT_BASELINE_TOLERANCE,
) -> tuple[Finding, ...]:
    """``findings`` with ``baseline`` set on each (everything is new when there is no baseline)."""
    pool: dict[tuple[str, str | None], list[BaselineFinding]] = defaultdict(list)
    for old in baseline or ():
        pool[(old.code, old.layer)].append(old)
    out: list[Finding] = []
    for finding in findings:
        candidates = pool.get((finding.code, finding.layer))
        if not candidates:
            status = BaselineStatus.NEW
        else:
            old = candidates.pop(0)
            status = BaselineStatus.WORSENED if _worse(finding, old, tolerance) else BaselineStatus.UNCHANGED
        out.append(replace(finding, baseline=status))
    return tuple(out)


def _worse(new: Finding, old: BaselineFinding, tolerance: float) -> bool:
    if new.severity.rank > old.severity.rank:
        return True
    if new.value is None or old.value is None:
        return False  # nothing measurable to compare (e.g. a non-finite gradient): same finding
    rule = RULES_BY_CODE.get(new.code)
    direction = rule.worse if rule is not None else Worse.ABOVE
    a, b = new.value, old.value
    if direction is Worse.ABOVE:
        return a > b + abs(b) * tolerance
    if direction is Worse.BELOW:
        return a < b - abs(b) * tolerance
    if a <= 0 or b <= 0:
        return a != b
    return abs(math.log(a)) > abs(math.log(b)) + math.log1p(tolerance)
