"""`gradcheck --help` and argument errors must not import torch (they must stay instant)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


@pytest.mark.parametrize(
    "args, code",
    [
        (["--help"], 0),
        (["inspect", "--help"], 0),
        (["--version"], 0),
        (["inspect"], 2),  # missing argument
        (["inspect", "m.pt", "--batches", "0"], 2),  # out-of-range option
        (["inspect", "m.pt", "--plot", "flow.pdf"], 2),  # refused before anything loads
        (["no-such-command"], 2),
    ],
)
def test_help_and_usage_errors_import_no_heavy_framework(args: list[str], code: int) -> None:
    result = subprocess.run([sys.executable, "-c", PROBE.format(args=args)], capture_output=True, text=True, timeout=60)
    assert "HEAVY=\n" in result.stdout, result.stdout + result.stderr
    assert f"CODE={code}" in result.stdout


def test_python_dash_m_entry_point() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gradcheck_cli", "--version"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert result.stdout.startswith("gradcheck ")


# What `inspect` of a checkpoint may not import: other formats' frameworks (ONNX), torch's compiler
# stack (only .pt2 and TorchScript need torch.export's deserialiser, which brings dynamo and inductor
# with it), optional extras, and rich's live display (a progress bar is drawn only on a terminal).
NOT_FOR_A_CHECKPOINT = (
    "onnx",
    "onnxruntime",
    "torch.onnx",
    "torch._dynamo",
    "torch._inductor",
    "sympy",
    "transformers",
    "matplotlib",
    "jsonschema",
    "torchvision",
    "rich.progress",
    "rich.live",
    "gradcheck_cli.onnx",
    "gradcheck_cli.rewrite.torch_fold",
    "gradcheck_cli.render.html",
)

INSPECT_PROBE = """
import contextlib, io, sys
from gradcheck_cli.cli.app import main
sys.argv = ["gradcheck", *{args!r}]
try:
    with contextlib.redirect_stdout(io.StringIO()):
        main()
except SystemExit as exc:
    code = exc.code
print("LOADED=" + ",".join(m for m in {names!r} if m in sys.modules))
print("CODE=" + str(code))
"""


@pytest.mark.parametrize(
    "args",
    [
        ["inspect", "samples/sigmoid_saturated.pt", "--arch", "samples/models.py:sigmoid_mlp"],
        ["inspect", "samples/relu_healthy.ckpt", "--arch", "samples/models.py:relu_mlp", "--format", "json"],
    ],
)
def test_inspect_of_a_checkpoint_imports_no_other_format_or_compiler(args: list[str]) -> None:
    root = Path(__file__).resolve().parent.parent
    script = INSPECT_PROBE.format(args=args, names=NOT_FOR_A_CHECKPOINT)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=root)
    assert "CODE=0" in result.stdout, result.stdout + result.stderr
    assert "LOADED=\n" in result.stdout, result.stdout
