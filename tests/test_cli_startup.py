"""`gradcheck --help` and argument errors must not import torch (they must stay instant)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import sys
from gradcheck_cli.cli.app import main
sys.argv = ["gradcheck", *{args!r}]
try:
    main()
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in ("torch", "onnx", "onnxruntime", "numpy", "matplotlib") if m in sys.modules)
print("HEAVY=" + ",".join(heavy))
print("CODE=" + str(code))
"""


@pytest.mark.parametrize("args, code", [
    (["--help"], 0),
    (["inspect", "--help"], 0),
    (["--version"], 0),
    (["inspect"], 2),  # missing argument
    (["inspect", "m.pt", "--batches", "0"], 2),  # out-of-range option
    (["inspect", "m.pt", "--plot", "flow.pdf"], 2),  # refused before anything loads
    (["no-such-command"], 2),
])
def test_help_and_usage_errors_import_no_heavy_framework(args: list[str], code: int) -> None:
    result = subprocess.run([sys.executable, "-c", PROBE.format(args=args)], capture_output=True, text=True,
                            timeout=60)
    assert "HEAVY=\n" in result.stdout, result.stdout + result.stderr
    assert f"CODE={code}" in result.stdout


def test_python_dash_m_entry_point() -> None:
    result = subprocess.run([sys.executable, "-m", "gradcheck_cli", "--version"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0
    assert result.stdout.startswith("gradcheck ")
