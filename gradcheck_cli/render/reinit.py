"""``gradcheck reinit`` output: what each layer got and why, then the probe before and after."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from gradcheck_cli.records import LayerStats, to_jsonable
from gradcheck_cli.render.json_report import dumps
from gradcheck_cli.render.table import fmt
from gradcheck_cli.rewrite.reinit_records import ReinitReport


def reinit_json(report: ReinitReport) -> str:
    data: dict[str, Any] = to_jsonable(report)
    ordered = {"schema_version": data.pop("schema_version"), "command": "reinit"}
    ordered.update(data)
    return dumps(ordered)


def changes_table(report: ReinitReport) -> Table:
    target = report.output if report.written else "(dry run: nothing written)"
    title = f"reinit {report.model} → {target} · scheme {report.scheme} · seed {report.seed}"
    table = Table(title=title, title_justify="left", header_style="bold", pad_edge=False)
    table.add_column("layer", overflow="fold")
    table.add_column("type")
    table.add_column("followed by")
    table.add_column("scheme")
    table.add_column("weight std", justify="right")
    table.add_column("fans in/out", justify="right")
    table.add_column("LSUV", justify="right")
    table.add_column("why", overflow="fold")
    for layer in report.layers:
        weight = layer.tensors[0] if layer.tensors else None
        fans = f"{weight.fan_in}/{weight.fan_out}" if weight and weight.fan_in is not None else ""
        lsuv = ""
        if layer.lsuv is not None:
            lsuv = f"{layer.lsuv.iterations} it, var {fmt(layer.lsuv.variance)}"
            if not layer.lsuv.converged:
                lsuv += " (not converged)"
        source = (
            ""
            if layer.activation_source.value in ("execution", "graph")
            else f" ({layer.activation_source.value.replace('_', ' ')})"
        )
        table.add_row(
            layer.name or "(root)",
            layer.type,
            (layer.activation or "—") + source,
            layer.scheme,
            fmt(weight.measured_std) if weight else "",
            fans,
            lsuv,
            layer.reason,
        )
    return table


def comparison_table(before: tuple[LayerStats, ...], after: tuple[LayerStats, ...]) -> Table:
    """Row by row (same model structure, same probe batch): old → new."""
    table = Table(title="probe before → after", title_justify="left", header_style="bold", pad_edge=False)
    table.add_column("layer", overflow="fold")
    table.add_column("type")
    table.add_column("var", justify="right")
    table.add_column("|dL/dy|", justify="right")
    table.add_column("dead", justify="right")
    table.add_column("saturated", justify="right")
    later = {(row.name, row.type): row for row in after}
    for row in before:
        new = later.get((row.name, row.type))
        if new is None:
            continue
        table.add_row(
            row.name,
            row.type if row.fn is None or row.fn == row.type else f"{row.type} ({row.fn})",
            _pair(row.output.var, new.output.var),
            _pair(row.output_grad_norm, new.output_grad_norm),
            _pair_text(_dead(row), _dead(new)),
            _pair_text(_saturated(row), _saturated(new)),
        )
    return table


def _pair(old: float | None, new: float | None) -> str:
    return f"{fmt(old)} → {fmt(new)}"


def _pair_text(old: str, new: str) -> str:
    return "" if not old and not new else f"{old or '—'} → {new or '—'}"


def _dead(row: LayerStats) -> str:
    return "" if row.dead is None else f"{row.dead.units}/{row.dead.total}"


def _saturated(row: LayerStats) -> str:
    return "" if row.saturation is None else f"{row.saturation.fraction:.0%}"


def render_reinit(report: ReinitReport, console: Console) -> None:
    console.print(changes_table(report))
    declined = report.declined
    if declined:
        console.print(Text("Declined", style="bold"))
        for change in declined:
            console.print(Text(f"  {change.target} ({change.detail}): {change.reason}", style="yellow"))
    if report.before is not None and report.after is not None:
        console.print(comparison_table(report.before, report.after))
    for note in report.notes:
        console.print(Text(f"note: {note}", style="dim"))
