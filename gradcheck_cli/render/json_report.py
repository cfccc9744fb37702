"""The JSON report: written with the json module, deterministic, NaN-free (see records.to_jsonable)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from gradcheck_cli.gate.check import ModelOutcome
from gradcheck_cli.records import SCHEMA_VERSION, Report


def dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, allow_nan=False, ensure_ascii=False) + "\n"


def render_json(report: Report) -> str:
    return dumps(report.to_dict())


def render_check_json(outcomes: Sequence[ModelOutcome]) -> str:
    """``check``'s JSON: the report (with findings) for one model, a list of them for several.

    A model that could not be loaded or probed is ``{"schema_version", "model": {"path"}, "error"}``
    so that a list keeps one entry per model given.
    """
    documents: list[dict[str, Any]] = []
    for outcome in outcomes:
        if outcome.report is not None:
            documents.append(outcome.report.to_dict())
        else:
            documents.append(
                {
                    "schema_version": SCHEMA_VERSION,
                    "model": {"path": outcome.path},
                    "error": {"message": outcome.error, "hint": outcome.hint},
                }
            )
    if len(documents) == 1:
        return dumps(documents[0])
    return json.dumps(documents, indent=2, allow_nan=False, ensure_ascii=False) + "\n"
