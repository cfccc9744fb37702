"""The JSON report: written with the json module, deterministic, NaN-free (see records.to_jsonable)."""

from __future__ import annotations

import json
from typing import Any

from gradcheck_cli.records import Report


def dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, allow_nan=False, ensure_ascii=False) + "\n"


def render_json(report: Report) -> str:
    return dumps(report.to_dict())
