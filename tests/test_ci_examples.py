"""The shipped CI examples run: the GitHub workflow's command and the pre-commit hook's entry,
against sample models, with the exit codes and outputs a CI system relies on."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_check_cli import ARCH, he_mlp, kill_units, save

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "gradcheck-example.yml"
HOOKS = ROOT / ".pre-commit-hooks.yaml"


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A repository as the examples expect it: models/ and a [tool.gradcheck] table."""
    (tmp_path / "models").mkdir()
    (tmp_path / "arch.py").write_text(ARCH)
    (tmp_path / "pyproject.toml").write_text(
        textwrap.dedent("""
        [tool.gradcheck]
        arch = "arch.py:mlp"
        input-shape = "16,16"
    """)
    )
    save(he_mlp(), tmp_path / "models" / "healthy.pt")
    return tmp_path


def _gradcheck_steps(workflow: dict[str, Any]) -> list[str]:
    return [
        step["run"]
        for job in workflow["jobs"].values()
        for step in job["steps"]
        if "gradcheck check" in step.get("run", "")
    ]


def test_workflow_command_runs_and_gates(project: Path) -> None:
    workflow = yaml.safe_load(WORKFLOW.read_text())
    assert "on" in workflow or True in workflow  # YAML 1.1 reads the key `on` as True
    (command,) = _gradcheck_steps(workflow)
    summary = project / "step-summary.md"
    env = {**os.environ, "GITHUB_STEP_SUMMARY": str(summary)}
    bin_dir = Path(sys.executable).parent  # the gradcheck console script of this environment
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"

    save(kill_units(he_mlp(), 2, 30), project / "models" / "dead.pt")
    # One run (a subprocess costs a torch import); the passing case is the pre-commit test's.
    done = subprocess.run(["bash", "-ec", command], cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    annotations = [line for line in done.stdout.splitlines() if line.startswith("::")]
    assert annotations and annotations[0].startswith("::error file=models/dead.pt,title=GC101 dead-relu::")
    assert "| ❌ | error | GC101 `dead-relu` |" in summary.read_text()
    suites = ET.parse(project / "gradcheck-junit.xml").getroot()
    assert [s.get("name") for s in suites] == ["models/dead.pt", "models/healthy.pt"]
    assert re.search(r"gradcheck: 2 models, 1 error, .*: failed", done.stderr)


def test_pre_commit_hook_entry_gates_staged_models(cli: Any, project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (hook,) = yaml.safe_load(HOOKS.read_text())
    assert hook["id"] == "gradcheck-check" and hook["language"] == "python" and hook["pass_filenames"]
    entry = shlex.split(hook["entry"])
    assert entry[0] == "gradcheck"  # the console script declared in pyproject.toml
    files = re.compile(hook["files"])
    assert files.search("models/healthy.pt") and files.search("m.onnx") and not files.search("arch.py")
    monkeypatch.chdir(project)
    save(kill_units(he_mlp(), 2, 30), project / "models" / "dead.pt")
    # pre-commit appends the staged file names matching `files` to the entry.
    assert cli(*entry[1:], *hook.get("args", []), "models/healthy.pt")[0] == 0
    assert cli(*entry[1:], *hook.get("args", []), "models/healthy.pt", "models/dead.pt")[0] == 1
