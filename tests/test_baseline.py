"""Baseline comparison: which direction is worse per rule, the tolerance, and matching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gradcheck_cli.errors import LoadError
from gradcheck_cli.gate.baseline import BaselineFinding, compare, load_baseline
from gradcheck_cli.gate.rules import RULES_BY_CODE
from gradcheck_cli.records import BaselineStatus, Finding, Severity


def new(code: str, layer: str, value: float, severity: Severity | None = None) -> Finding:
    rule = RULES_BY_CODE[code]
    return Finding(
        code=code,
        rule=rule.name,
        severity=severity or rule.severity,
        layer=layer,
        value=value,
        threshold=rule.threshold,
        message="m",
        advice="a",
    )


def old(code: str, layer: str, value: float, severity: Severity | None = None) -> BaselineFinding:
    return BaselineFinding(code=code, layer=layer, severity=severity or RULES_BY_CODE[code].severity, value=value)


@pytest.mark.parametrize(
    ("code", "before", "after", "status"),
    [
        ("GC101", 0.60, 0.62, BaselineStatus.UNCHANGED),  # within 5%
        ("GC101", 0.60, 0.70, BaselineStatus.WORSENED),  # more dead units
        ("GC101", 0.60, 0.55, BaselineStatus.UNCHANGED),  # better is never worse
        ("GC201", 1e-4, 1e-5, BaselineStatus.WORSENED),  # vanishing: lower is worse
        ("GC201", 1e-4, 5e-4, BaselineStatus.UNCHANGED),
        ("GC301", 0.2, 0.1, BaselineStatus.WORSENED),  # init-scale: further from 1 on a log scale
        ("GC301", 5.0, 8.0, BaselineStatus.WORSENED),
        ("GC301", 5.0, 0.25, BaselineStatus.UNCHANGED),  # |log 0.25| < |log 5|
    ],
)
def test_direction_and_tolerance(code: str, before: float, after: float, status: BaselineStatus) -> None:
    (result,) = compare((new(code, "l", after),), (old(code, "l", before),))
    assert result.baseline is status


def test_higher_severity_is_worse_and_unknown_findings_are_new() -> None:
    found = compare(
        (new("GC301", "a", 5.0, Severity.ERROR), new("GC301", "b", 5.0)), (old("GC301", "a", 5.0, Severity.WARNING),)
    )
    assert [f.baseline for f in found] == [BaselineStatus.WORSENED, BaselineStatus.NEW]
    assert [f.baseline for f in compare((new("GC101", "x", 0.9),), None)] == [BaselineStatus.NEW]


def test_load_baseline_matches_models_by_path_then_name(tmp_path: Path) -> None:
    report = {
        "model": {"path": "models/a.pt"},
        "findings": [{"code": "GC101", "layer": "l", "severity": "error", "value": 0.6}],
    }
    path = tmp_path / "b.json"
    path.write_text(json.dumps([report, {"model": {"path": "x.pt"}, "error": {"message": "m"}}]))
    baseline = load_baseline(path)
    assert baseline.for_model("models/a.pt") == (old("GC101", "l", 0.6),)
    assert baseline.for_model("elsewhere/a.pt") == (old("GC101", "l", 0.6),)
    assert baseline.for_model("other.pt") is None
    path.write_text("{not json")
    with pytest.raises(LoadError, match="not a JSON report"):
        load_baseline(path)
