"""Markdown for a pull-request comment or ``$GITHUB_STEP_SUMMARY``: one table per model."""

from __future__ import annotations

from gradcheck_cli.gate.check import GateResult, ModelOutcome
from gradcheck_cli.render.table import fmt

_ICON = {True: "❌", False: "⚠️"}


def cell(text: str) -> str:
    """A table cell: pipes escaped and line breaks flattened, or the row would break the table."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _model(result: GateResult, outcome: ModelOutcome) -> list[str]:
    if outcome.error is not None:
        hint = f" ({cell(outcome.hint)})" if outcome.hint else ""
        return [
            f"### ❌ `{outcome.path}`",
            "",
            f"Could not be checked: {cell(outcome.error)}{hint}",
            "",
        ]
    failing = set(map(id, result.failing(outcome)))
    if not outcome.findings:
        return [f"### ✅ `{outcome.path}`", "", "No findings.", ""]
    icon = "❌" if failing else "⚠️"
    lines = [f"### {icon} `{outcome.path}`", ""]
    header = (
        ["", "Severity"]
        + (["Baseline"] if result.baseline else [])
        + ["Rule", "Layer", "Value", "Threshold", "Message"]
    )
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for finding in outcome.findings:
        row = [_ICON[id(finding) in failing], finding.severity.value]
        if result.baseline:
            row.append(str(finding.baseline or ""))
        row += [
            f"{finding.code} `{finding.rule}`",
            f"`{cell(finding.layer)}`" if finding.layer else "(model)",
            fmt(finding.value),
            fmt(finding.threshold),
            cell(finding.message),
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    advice: dict[str, str] = {}
    for finding in outcome.findings:
        advice.setdefault(f"{finding.code} `{finding.rule}`", finding.advice)
    lines.append("<details><summary>How to fix</summary>")
    lines.append("")
    lines += [f"- **{rule}**: {cell(text)}" for rule, text in advice.items()]
    lines.append("")
    lines.append("</details>")
    lines.append("")
    return lines


def render_markdown(result: GateResult) -> str:
    lines = [f"## {result.summary()}", ""]
    for outcome in result.outcomes:
        lines += _model(result, outcome)
    return "\n".join(lines).rstrip("\n") + "\n"
