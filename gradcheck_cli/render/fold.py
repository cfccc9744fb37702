"""``gradcheck fold-bn`` output: each BatchNorm and what happened to it, counts, verification."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from gradcheck_cli.records import to_jsonable
from gradcheck_cli.render.json_report import dumps
from gradcheck_cli.rewrite.fold_records import FoldReport


def fold_json(report: FoldReport) -> str:
    data: dict[str, Any] = to_jsonable(report)
    ordered: dict[str, Any] = {"schema_version": data.pop("schema_version"), "command": "fold-bn"}
    ordered.update(data)
    data_latency = ordered.get("latency") or []
    for row, latency in zip(data_latency, report.latency, strict=True):
        row["speedup"] = to_jsonable(latency.speedup)
    ordered["verification"]["passed"] = report.verification.passed
    ordered["summary"] = {
        "folded": report.folded,
        "skipped": report.skipped,
        "verified": report.verification.passed,
    }
    return dumps(ordered)


def _sci(value: float) -> str:
    return "0" if value == 0 else f"{value:.2e}"


def render_fold(report: FoldReport, console: Console) -> None:
    console.print(
        Text.assemble(
            ("fold-bn ", "bold"),
            report.model,
            f"  ({report.input_format} -> {report.output_format}, BatchNorms found by {report.method})",
        )
    )
    entries = Table(title="BatchNorms", title_justify="left", show_lines=False)
    entries.add_column("BatchNorm", overflow="fold")
    entries.add_column("result")
    entries.add_column("pattern")
    entries.add_column("into", overflow="fold")
    entries.add_column("why / note", overflow="fold")
    for entry in report.entries:
        result = Text("folded", style="green") if entry.folded else Text("skipped", style="yellow")
        entries.add_row(
            entry.batchnorm,
            result,
            str(entry.pattern or ""),
            entry.layer or "",
            (entry.reason if not entry.folded else entry.note) or "",
        )
    if report.entries:
        console.print(entries)
    else:
        console.print("no BatchNorm found")

    counts = Table(title="Model", title_justify="left")
    counts.add_column("")
    counts.add_column("before", justify="right")
    counts.add_column("after", justify="right")
    counts.add_row("parameters", f"{report.before.parameters:,}", f"{report.after.parameters:,}")
    counts.add_row("BatchNorms", str(report.before.batchnorms), str(report.after.batchnorms))
    counts.add_row(
        "nodes" if report.method != "module structure" else "modules",
        str(report.before.nodes),
        str(report.after.nodes),
    )
    for latency in report.latency:
        counts.add_row(
            f"latency, {latency.backend} (median of {latency.runs})",
            f"{latency.before_ms:.3f} ms",
            f"{latency.after_ms:.3f} ms ({latency.speedup:.2f}x)",
        )
    console.print(counts)

    verification = report.verification
    checks = Table(
        title=f"Verification: {verification.backend}, {verification.samples} samples"
        + (
            f", at batch sizes {' and '.join(map(str, verification.batch_sizes))}"
            if len(verification.batch_sizes) > 1
            else ""
        ),
        title_justify="left",
    )
    for column in ("output", "dtype", "max abs error", "max rel error", "tolerance (abs)", ""):
        checks.add_column(column, justify="left" if column in ("output", "dtype", "") else "right")
    for check in verification.outputs:
        checks.add_row(
            check.name,
            check.dtype,
            _sci(check.max_abs_error),
            _sci(check.max_rel_error),
            _sci(check.tolerance),
            Text("ok", style="green") if check.passed else Text("ABOVE TOLERANCE", style="bold red"),
        )
    console.print(checks)
    for note in report.notes:
        console.print(f"note: {note}")
    summary = f"{report.folded} folded, {report.skipped} skipped"
    if not verification.passed:
        console.print(Text(f"{summary}; verification failed: nothing written", style="bold red"))
    elif report.written:
        console.print(Text(f"{summary}; verified; written to {report.written}", style="green"))
    else:
        console.print(f"{summary}; verified; nothing written (dry run)")
