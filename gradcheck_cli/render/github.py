"""GitHub Actions workflow commands: one annotation per finding, shown on the run and the PR.

    ::error file=models/net.pt,title=GC101 dead-relu::body.1: 48 of 64 relu units are dead ...

Severity maps to the command (error, warning, notice); a finding that does not fail the gate
because it is unchanged from the baseline is a notice, so the annotations match the exit code.
"""

from __future__ import annotations

from gradcheck_cli.gate.check import GateResult
from gradcheck_cli.records import BaselineStatus, Finding, Severity

_COMMAND = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.INFO: "notice"}


def escape_data(text: str) -> str:
    # The escapes of the runner's workflow-command parser (actions/toolkit, command.ts).
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def escape_property(text: str) -> str:
    return escape_data(text).replace(":", "%3A").replace(",", "%2C")


def _annotation(path: str, finding: Finding) -> str:
    command = _COMMAND[finding.severity]
    suffix = ""
    if finding.baseline is BaselineStatus.UNCHANGED:
        command, suffix = "notice", " (unchanged from the baseline)"
    title = escape_property(f"{finding.code} {finding.rule}")
    where = f"{finding.layer}: " if finding.layer else ""
    message = escape_data(f"{where}{finding.message}{suffix}. Fix: {finding.advice}")
    return f"::{command} file={escape_property(path)},title={title}::{message}"


def render_github(result: GateResult) -> str:
    lines: list[str] = []
    for outcome in result.outcomes:
        if outcome.error is not None:
            hint = f" ({outcome.hint})" if outcome.hint else ""
            lines.append(
                f"::error file={escape_property(outcome.path)},title=gradcheck::{escape_data(outcome.error + hint)}"
            )
        lines += [_annotation(outcome.path, f) for f in outcome.findings]
    return "".join(line + "\n" for line in lines)
