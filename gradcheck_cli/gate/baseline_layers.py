"""The per-layer rows of a `baseline` report, read back so that `plot`/`html` can draw
the earlier run under this one.

``baseline.py`` keeps only the findings of a baseline (all the gate needs); this module reads the
rows' numbers that the pictures use, from the same JSON (schema ``report.schema.json``), and
matches a model the way ``Baseline.for_model`` does: the same path, else the one report with the
same file name. Fields the pictures do not use get neutral defaults; a row that cannot be read
is an error naming the report, not a silent gap.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gradcheck_cli.errors import LoadError
from gradcheck_cli.records import DeadUnits, LayerStats, OutputStats, RowKind, Saturation


def baseline_layers(path: Path, model_path: str) -> tuple[LayerStats, ...] | None:
    """The rows ``model_path`` had in the baseline report at ``path``; None if it is not there."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoadError(f"baseline {path} is not a JSON report: {exc}") from None
    reports = [r for r in (data if isinstance(data, list) else [data]) if isinstance(r, dict) and "layers" in r]
    paths = [str(r.get("model", {}).get("path")) for r in reports]
    chosen = None
    if model_path in paths:
        chosen = reports[paths.index(model_path)]
    else:
        same_name = [r for r, p in zip(reports, paths, strict=True) if Path(p).name == Path(model_path).name]
        chosen = same_name[0] if len(same_name) == 1 else None
    if chosen is None:
        return None
    try:
        return tuple(_layer(row) for row in chosen["layers"])
    except (KeyError, TypeError, ValueError) as exc:
        raise LoadError(
            f"baseline {path}: a layer row of {model_path} cannot be read ({exc!r})",
            hint="write the baseline with this gradcheck version: gradcheck check MODEL `format` json=FILE",
        ) from None


def _layer(row: dict[str, Any]) -> LayerStats:
    output = row["output"]
    dead = row.get("dead")
    saturation = row.get("saturation")
    return LayerStats(
        index=int(row["index"]),
        name=str(row["name"]),
        type=str(row["type"]),
        kind=RowKind(row["kind"]),
        module=str(row.get("module", "")),
        shape=tuple(int(d) for d in row.get("shape", ())),
        output=OutputStats(
            count=int(output.get("count", 0)),
            mean=_number(output.get("mean")),
            var=_number(output.get("var")),
            min=_number(output.get("min")),
            max=_number(output.get("max")),
            nan=int(output.get("nan", 0)),
            inf=int(output.get("inf", 0)),
        ),
        output_grad_norm=_number(row.get("output_grad_norm")),
        fn=row.get("fn"),
        dead=DeadUnits(units=int(dead["units"]), total=int(dead["total"]), axis=int(dead.get("axis", 1)))
        if dead
        else None,
        saturation=Saturation(fraction=float(saturation["fraction"]), cutoff=float(saturation["cutoff"]))
        if saturation
        else None,
    )


def _number(value: Any) -> float | None:
    return None if value is None else float(value)
