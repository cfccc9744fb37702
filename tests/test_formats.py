"""Every ``check`` output format, golden-tested on hand-made records (fixed numbers, no paths,
no timings), plus structural checks: JUnit follows the common schema, Markdown is a table,
GitHub annotations are one well-formed command per line.

Regenerate the goldens after an intended change with ``GRADCHECK_REGEN_GOLDEN=1 pytest tests/test_formats.py``
and review the diff.
"""

from __future__ import annotations

import json
import os
import re
import xml.etree.ElementTree as ET
from io import StringIO
from pathlib import Path

import pytest
from rich.console import Console

from gradcheck_cli.gate.check import GateResult, ModelOutcome
from gradcheck_cli.gate.rules import RULES_BY_CODE, configure
from gradcheck_cli.records import (
    BaselineStatus,
    Finding,
    InputSpec,
    ModelInfo,
    ProbeInfo,
    Report,
    Severity,
    ToolInfo,
)
from gradcheck_cli.render.check_table import render_check
from gradcheck_cli.render.github import render_github
from gradcheck_cli.render.json_report import render_check_json
from gradcheck_cli.render.junit import render_junit
from gradcheck_cli.render.markdown import render_markdown
from tests.conftest import validate_report

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("GRADCHECK_REGEN_GOLDEN") == "1"


def golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if REGEN or not path.exists():
        if not REGEN:
            pytest.fail(f"golden {path.name} is missing: run with GRADCHECK_REGEN_GOLDEN=1")
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8"), f"{name} differs from its golden"


def finding(
    code: str,
    layer: str | None,
    value: float | None,
    message: str,
    *,
    severity: Severity | None = None,
    baseline: BaselineStatus | None = None,
) -> Finding:
    rule = RULES_BY_CODE[code]
    return Finding(
        code=code,
        rule=rule.name,
        severity=severity or rule.severity,
        layer=layer,
        value=value,
        threshold=rule.threshold,
        message=message,
        advice=rule.advice,
        baseline=baseline,
    )


def report(path: str, findings: tuple[Finding, ...]) -> Report:
    probe = ProbeInfo(
        inputs=(InputSpec(name="x", shape=(8, 16), dtype="float32", source="synthesized"),),
        batch_size=8,
        batches=1,
        seed=0,
        loss="cross_entropy",
        loss_value=2.5,
        mode="eval",
        device="cpu",
        output="output",
        saturation_cutoff=0.05,
        method="hooks",
    )
    return Report(
        tool=ToolInfo(name="gradcheck", version="0.0.0-test"),
        model=ModelInfo(path=path, format="torch_zip", parameters=1234),
        probe=probe,
        layers=(),
        findings=findings,
    )


DEAD = finding("GC101", "body.1", 0.75, "48 of 64 relu units are dead (75%): zero for every probe sample")
INIT = finding("GC301", "body.0", 32.5, "weight variance 1 is 32.5 times what he init prescribes (0.0308)")
PIPE = finding("GC001", "odd|name", 3.0, "a message with a | pipe, a 100% sign,\na newline and a comma")


def scenario(name: str) -> GateResult:
    rules = configure()
    if name == "mixed":
        outcomes = (
            ModelOutcome("models/dead.pt", report("models/dead.pt", (DEAD, INIT))),
            ModelOutcome("models/ok.pt", report("models/ok.pt", ())),
            ModelOutcome(
                "models/broken.pt", error="models/broken.pt is not a model file", hint="pass --arch for a state_dict"
            ),
        )
        return GateResult(outcomes=outcomes, fail_on=Severity.ERROR, rules=rules)
    if name == "baseline":
        found = (
            finding("GC101", "body.1", 0.75, DEAD.message, baseline=BaselineStatus.UNCHANGED),
            finding("GC101", "body.3", 0.9, "58 of 64 relu units are dead (90%)", baseline=BaselineStatus.NEW),
            finding("GC301", "body.0", 40.0, INIT.message, baseline=BaselineStatus.WORSENED),
        )
        return GateResult(
            outcomes=(ModelOutcome("dead.pt", report("dead.pt", found)),),
            fail_on=Severity.WARNING,
            rules=rules,
            baseline=True,
        )
    if name == "escaping":
        return GateResult(
            outcomes=(ModelOutcome("a,b:c.pt", report("a,b:c.pt", (PIPE,))),), fail_on=Severity.ERROR, rules=rules
        )
    raise AssertionError(name)


SCENARIOS = ["mixed", "baseline", "escaping"]


def table_text(result: GateResult) -> str:
    buffer = StringIO()
    render_check(result, Console(file=buffer, width=100, color_system=None))
    return buffer.getvalue()


RENDERERS = {
    "table.txt": table_text,
    "md": render_markdown,
    "junit.xml": render_junit,
    "github.txt": render_github,
    "json": lambda result: render_check_json(result.outcomes),
}


@pytest.mark.parametrize("name", SCENARIOS)
@pytest.mark.parametrize("extension", list(RENDERERS))
def test_golden(name: str, extension: str) -> None:
    golden(f"check_{name}.{extension}", RENDERERS[extension](scenario(name)))


# --- structure ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCENARIOS)
def test_junit_follows_the_common_schema(name: str) -> None:
    result = scenario(name)
    root = ET.fromstring(render_junit(result))
    assert root.tag == "testsuites"
    suites = list(root)
    assert len(suites) == len(result.outcomes)
    for suite, outcome in zip(suites, result.outcomes, strict=True):
        assert suite.tag == "testsuite" and suite.get("name") == outcome.path
        cases = list(suite)
        assert all(case.tag == "testcase" and case.get("name") and case.get("classname") for case in cases)
        for child in (c for case in cases for c in case):
            assert child.tag in {"failure", "error", "skipped", "system-out", "system-err"}
            if child.tag in {"failure", "error"}:
                assert child.get("message") is not None and child.get("type") is not None
        assert suite.get("tests") == str(len(cases))
        assert suite.get("failures") == str(sum(1 for c in cases if c.find("failure") is not None))
        assert suite.get("errors") == str(sum(1 for c in cases if c.find("error") is not None))
        assert suite.get("skipped") == "0"
        if outcome.error is None:  # one test case per active rule
            assert [c.get("name") for c in cases] == [f"{r.code} {r.name}" for r in result.rules]
            failed = {c.get("name", "").split()[0] for c in cases if c.find("failure") is not None}
            assert failed == {f.code for f in result.failing(outcome)}
    assert root.get("tests") == str(sum(int(s.get("tests", "0")) for s in suites))


def _table_rows(markdown: str) -> list[list[list[str]]]:
    """Markdown tables as rows of cells, splitting on unescaped pipes only."""
    tables: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


@pytest.mark.parametrize("name", SCENARIOS)
def test_markdown_renders_as_tables(name: str) -> None:
    result = scenario(name)
    tables = _table_rows(render_markdown(result))
    expected = [o for o in result.outcomes if o.findings]
    assert len(tables) == len(expected)
    for table, outcome in zip(tables, expected, strict=True):
        header, separator, *rows = table
        assert all(re.fullmatch(r"-{3,}", cell) for cell in separator)
        assert all(len(row) == len(header) for row in (separator, *rows))
        assert len(rows) == len(outcome.findings)


def test_github_annotations_are_one_command_per_finding() -> None:
    for name in SCENARIOS:
        result = scenario(name)
        lines = render_github(result).splitlines()
        expected = sum(len(o.findings) + (o.error is not None) for o in result.outcomes)
        assert len(lines) == expected
        for line in lines:
            assert re.fullmatch(r"::(error|warning|notice) file=[^,:]+,title=[^,:]+::[^\r\n]+", line), line
    line = render_github(scenario("escaping")).strip()
    assert line.startswith("::error file=a%2Cb%3Ac.pt,title=GC001 non-finite::odd|name: ")
    assert "100%25 sign,%0Aa newline" in line


def test_unchanged_baseline_findings_are_notices() -> None:
    lines = render_github(scenario("baseline")).splitlines()
    assert [line.split(" ", 1)[0] for line in lines] == ["::notice", "::error", "::warning"]


def test_json_is_the_report_for_one_model_and_a_list_for_several() -> None:
    single = json.loads(render_check_json(scenario("baseline").outcomes))
    validate_report(single)
    assert [f["baseline"] for f in single["findings"]] == ["unchanged", "new", "worsened"]
    several = json.loads(render_check_json(scenario("mixed").outcomes))
    assert [d["model"]["path"] for d in several] == ["models/dead.pt", "models/ok.pt", "models/broken.pt"]
    validate_report(several[0])
    assert several[2]["error"]["message"] == "models/broken.pt is not a model file"
