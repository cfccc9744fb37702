"""Reading a baseline report's rows back (gradcheck_cli/baseline_layers.py) for the overlay pictures."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from gradcheck_cli.errors import LoadError
from gradcheck_cli.gate.baseline_layers import baseline_layers
from tests._reports import mixed_report


def test_rows_round_trip_through_the_json_report(tmp_path: Path) -> None:
    report = mixed_report(histograms=True)
    other = replace(report, model=replace(report.model, path="elsewhere/other.pt"))
    target = tmp_path / "baseline.json"
    target.write_text(json.dumps([other.to_dict(), report.to_dict()]))
    rows = baseline_layers(target, "model.pt")
    assert rows is not None
    drawn = [(r.index, r.name, r.type, r.kind, r.output, r.output_grad_norm, r.dead, r.saturation) for r in rows]
    assert drawn == [
        (r.index, r.name, r.type, r.kind, r.output, r.output_grad_norm, r.dead, r.saturation) for r in report.layers
    ]
    # Matched by file name when the checkout moved; absent models have no rows to draw.
    assert baseline_layers(target, "/ci/checkout/other.pt") is not None
    assert baseline_layers(target, "missing.pt") is None


def test_unreadable_baseline_is_a_load_error(tmp_path: Path) -> None:
    target = tmp_path / "baseline.json"
    target.write_text('{"model": {"path": "m.pt"}, "layers": [{"name": "x"}]}')
    with pytest.raises(LoadError, match="cannot be read"):
        baseline_layers(target, "m.pt")
    target.write_text("not json")
    with pytest.raises(LoadError, match="not a JSON report"):
        baseline_layers(target, "m.pt")
