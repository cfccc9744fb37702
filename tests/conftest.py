"""Shared fixtures: small models built in code, CLI runner, schema validation."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
SCHEMA_PATH = ROOT / "gradcheck_cli" / "schema" / "report.schema.json"


@pytest.fixture
def cli() -> Any:
    """Run the CLI in-process; returns (exit_code, stdout, stderr)."""
    from gradcheck_cli.cli.app import app

    runner = CliRunner()

    def run(*args: str) -> tuple[int, str, str]:
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        return result.exit_code, result.stdout, result.stderr

    return run


@pytest.fixture(scope="session")
def report_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def validate_report(data: dict[str, Any]) -> None:
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator(schema).validate(data)


ARCH_SOURCE = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class MLP(nn.Module):
        def __init__(self, width=16, classes=4):
            super().__init__()
            self.fc1 = nn.Linear(8, width)
            self.fc2 = nn.Linear(width, width)
            self.head = nn.Linear(width, classes)

        def forward(self, x):
            x = torch.relu(self.fc1(x))
            x = F.relu(self.fc2(x))
            return self.head(x)

    def build(width=16, classes=4):
        return MLP(width, classes)
""")


@pytest.fixture
def arch_file(tmp_path: Path) -> Path:
    path = tmp_path / "arch.py"
    path.write_text(ARCH_SOURCE)
    return path


@pytest.fixture
def mlp_state_dict(tmp_path: Path, arch_file: Path) -> Path:
    import torch

    namespace: dict[str, Any] = {}
    exec(compile(ARCH_SOURCE, str(arch_file), "exec"), namespace)
    torch.manual_seed(0)
    model = namespace["build"]()
    path = tmp_path / "mlp.pt"
    torch.save(model.state_dict(), path)
    return path


def one_line_error(stderr: str) -> None:
    """A user error: an 'error:' line (plus an optional 'hint:' line) and no traceback."""
    lines = [line for line in stderr.strip().splitlines() if line]
    assert lines and lines[0].startswith("error: "), stderr
    assert all(line.startswith(("error: ", "hint: ")) for line in lines), stderr
    assert len(lines) <= 2, stderr
    assert "Traceback" not in stderr


sys.path.insert(0, str(SAMPLES))
