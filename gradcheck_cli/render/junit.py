"""JUnit XML: one ``<testsuite>`` per model, one ``<testcase>`` per active rule.

Follows the common (Jenkins/Ant) JUnit schema that GitHub, GitLab, Jenkins and Azure render:
``testsuites > testsuite[name, tests, failures, errors, skipped] > testcase[name, classname]``
with ``failure[message, type]`` or ``error[message, type]`` children and ``system-out``. A rule
fails its test case when one of its findings fails the gate; findings below `fail_on` (or
unchanged from the baseline) are listed in ``system-out`` of a passing case. No timings are
written, so the output is reproducible.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from gradcheck_cli.gate.check import GateResult, ModelOutcome
from gradcheck_cli.records import Finding
from gradcheck_cli.render.table import fmt


def _line(finding: Finding) -> str:
    status = f" [{finding.baseline}]" if finding.baseline is not None else ""
    where = finding.layer or "(model)"
    return (
        f"{finding.severity.value}{status} {finding.code} {finding.rule} at {where}: "
        f"{finding.message} (value {fmt(finding.value)}, threshold {fmt(finding.threshold)}); "
        f"fix: {finding.advice}"
    )


def _suite(result: GateResult, outcome: ModelOutcome) -> ET.Element:
    suite = ET.Element("testsuite", name=outcome.path)
    cases: list[ET.Element] = []
    failures = errors = 0
    if outcome.error is not None:
        case = ET.Element("testcase", name="load and probe", classname=outcome.path)
        error = ET.SubElement(case, "error", message=outcome.error, type="GradcheckError")
        error.text = outcome.error + (f"\nhint: {outcome.hint}" if outcome.hint else "")
        cases.append(case)
        errors = 1
    else:
        failing = set(map(id, result.failing(outcome)))
        for rule in result.rules:
            case = ET.Element("testcase", name=f"{rule.code} {rule.name}", classname=outcome.path)
            mine = [f for f in outcome.findings if f.code == rule.code]
            gating = [f for f in mine if id(f) in failing]
            if gating:
                failures += 1
                first = gating[0]
                more = f" (and {len(gating) - 1} more)" if len(gating) > 1 else ""
                failure = ET.SubElement(
                    case,
                    "failure",
                    type=rule.code,
                    message=f"{first.layer or '(model)'}: {first.message}{more}",
                )
                failure.text = "\n".join(_line(f) for f in gating)
            quiet = [f for f in mine if id(f) not in failing]
            if quiet:
                ET.SubElement(case, "system-out").text = "\n".join(_line(f) for f in quiet)
            cases.append(case)
    suite.set("tests", str(len(cases)))
    suite.set("failures", str(failures))
    suite.set("errors", str(errors))
    suite.set("skipped", "0")
    suite.extend(cases)
    return suite


def render_junit(result: GateResult) -> str:
    root = ET.Element("testsuites", name="gradcheck")
    suites = [_suite(result, outcome) for outcome in result.outcomes]
    for attribute in ("tests", "failures", "errors"):
        root.set(attribute, str(sum(int(s.get(attribute, "0")) for s in suites)))
    root.extend(suites)
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
