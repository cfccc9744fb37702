"""The terminal's depth sparklines under the layer table (render/table.py: DepthSparklines)."""

from __future__ import annotations

import re
from io import StringIO

import pytest
from rich.console import Console

from gradcheck_cli.records import RowKind
from gradcheck_cli.render.table import SPARK_LEVELS, DepthSparklines, render_inspect
from tests._reports import mixed_report, report, row


def _render(renderable: object, width: int, **console: object) -> str:
    out = Console(file=StringIO(), width=width, color_system=None, **console)  # type: ignore[arg-type]
    out.print(renderable)
    text = out.file.getvalue()  # type: ignore[attr-defined]
    assert isinstance(text, str)
    return text


def _line(text: str, label: str) -> str:
    (line,) = [line for line in text.splitlines() if line.startswith(label)]
    return line


def test_one_character_per_row_with_marks_for_nan_zero_and_findings() -> None:
    text = _render(DepthSparklines(mixed_report()), width=60)
    assert all(len(line) <= 60 for line in text.splitlines())
    variance = _line(text, "var ")
    start = variance.index(" ", 18) + 1  # label (8) + space + low value (9) + space
    cells = variance[start : start + 6]
    # Rows: fc1 4.0, relu() 1.5, fc2 0.04, relu()#1 exactly 0, fc3 NaN, sigmoid() 0.2.
    assert cells[3] == "·" and cells[4] == "!"
    assert cells[0] == SPARK_LEVELS[-1] and cells[2] == SPARK_LEVELS[0]
    assert SPARK_LEVELS.index(cells[0]) > SPARK_LEVELS.index(cells[1]) > SPARK_LEVELS.index(cells[5])
    assert variance.rstrip().endswith("4") and "0.04" in variance  # the range, at either end
    findings = _line(text, "findings")
    assert findings[start : start + 6] == " E E W"  # the model-level finding has no column


def test_a_deep_model_is_folded_into_the_width() -> None:
    deep = report(tuple(row(i, f"block.{i}", var=10.0 ** (-i / 100)) for i in range(500)))
    text = _render(DepthSparklines(deep), width=60)
    assert all(len(line) <= 60 for line in text.splitlines())
    assert "17 rows/char" in text
    cells = [c for c in _line(text, "var ") if c in SPARK_LEVELS]
    assert cells == sorted(cells, key=SPARK_LEVELS.index, reverse=True)  # variance falls with depth


def test_too_narrow_a_terminal_gets_no_sparkline() -> None:
    assert _render(DepthSparklines(mixed_report()), width=30) == ""


@pytest.mark.parametrize("no_color", [False, True])
def test_no_color_is_respected(monkeypatch: pytest.MonkeyPatch, no_color: bool) -> None:
    if no_color:
        monkeypatch.setenv("NO_COLOR", "1")
    else:
        monkeypatch.delenv("NO_COLOR", raising=False)
    out = Console(file=StringIO(), width=100, force_terminal=True, color_system="standard")
    out.print(DepthSparklines(mixed_report()))
    colour_codes = re.findall(r"\x1b\[[0-9;]*(?:3[0-7]|9[0-7])m", out.file.getvalue())  # type: ignore[attr-defined]
    assert bool(colour_codes) is not no_color


def test_inspect_output_has_the_sparklines_between_table_and_diagnosis() -> None:
    console = Console(file=StringIO(), width=160, color_system=None)
    render_inspect(mixed_report(), console)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert text.index("│ fc1") < text.index("depth: rows 0–5") < text.index("Diagnosis")


def test_activation_rows_are_in_the_same_line() -> None:
    # Layers and activation calls share one line, in execution order, as in the table's # column.
    rows = (row(0, "fc", var=1.0), row(1, "relu()", kind=RowKind.ACTIVATION, var=0.01))
    text = _render(DepthSparklines(report(rows)), width=80)
    assert SPARK_LEVELS[-1] + SPARK_LEVELS[0] in _line(text, "var ")
