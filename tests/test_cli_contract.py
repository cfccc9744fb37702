"""The contract between the library and the CLI (issue 17): one name per option everywhere, a
layering without import circles, help text printed whole, and errors that read as typed.

Regenerate the help goldens after an intended change with
``GRADCHECK_REGEN_GOLDEN=1 pytest tests/test_cli_contract.py``.
"""

from __future__ import annotations

import ast
import os
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from gradcheck_cli import options as records
from gradcheck_cli.cli.app import app
from gradcheck_cli.cli.options import ALL_GROUPS, FLAG_OF_FIELD
from gradcheck_cli.config import option_fields
from tests.test_check_cli import ARCH, ARCH_ARGS, he_mlp, kill_units, save

PACKAGE = Path(__file__).parent.parent / "gradcheck_cli"
GOLDEN = Path(__file__).parent / "golden"
COMMANDS = ("inspect", "check", "fold-bn", "reinit")


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """check's own test models: a He-initialised MLP and the same with 75% of one layer's units dead."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "arch.py").write_text(ARCH)
    save(he_mlp(), tmp_path / "healthy.pt")
    save(kill_units(he_mlp(), 2, 24), tmp_path / "dead.pt")
    return tmp_path


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every gradcheck_cli module ``path`` imports, at module level or inside a function, type-only
    imports excluded (they never run)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    type_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            type_only.update(id(child) for child in ast.walk(node))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("gradcheck_cli"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gradcheck_cli"):
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
    return {name for name in found if name in modules}


def _import_graph() -> dict[str, set[str]]:
    paths = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    modules = set(paths)
    return {name: _imports(path, modules) - {name} for name, path in paths.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == 1:
                return [*stack[stack.index(child) :], child]
            if child not in state and (found := visit(child)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_the_import_graph_has_no_circle() -> None:
    graph = _import_graph()
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_a_circle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_nothing_beneath_the_facade_imports_it() -> None:
    graph = _import_graph()
    importers = sorted(
        name
        for name, imported in graph.items()
        if "gradcheck_cli.api" in imported and not name.startswith("gradcheck_cli.cli")
    )
    assert importers == []


def _flags() -> set[str]:
    """Every flag gradcheck's commands take, as spelled on the command line."""
    spelled = {flag.name for group in ALL_GROUPS for flag in group.flags}
    return spelled | {"--output", "--help", "--version", "--report", "--trust-pickle"}


def test_no_module_outside_cli_spells_a_flag() -> None:
    flag = re.compile(
        r"(?<![\w-])(" + "|".join(sorted(map(re.escape, _flags()), key=len, reverse=True)) + r")(?![\w-])"
    )
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.relative_to(PACKAGE).parts[0] != "cli"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if flag.search(line)
    ]
    assert offenders == [], "\n".join(offenders)


def test_every_option_field_has_one_flag_and_one_config_key() -> None:
    internal = {"inputs", "rules", "lsuv_tolerance", "lsuv_max_iterations"}
    for record in (
        records.LoadOptions,
        records.InputOptions,
        records.ProbeOptions,
        records.GateOptions,
        records.WriteOptions,
        records.FoldOptions,
        records.ReinitOptions,
    ):
        for item in fields(record):
            if item.name not in internal:
                assert FLAG_OF_FIELD[item.name] == "--" + item.name.replace("_", "-"), item.name
    declared = [flag.field for group in ALL_GROUPS for flag in group.flags]
    shared = {flag.field for group in ALL_GROUPS for flag in group.flags if group.title == "Pictures"}
    assert len([name for name in declared if name not in shared]) == len(set(declared) - shared)
    assert set(option_fields()) <= set(FLAG_OF_FIELD)


def _help(command: str) -> str:
    result = CliRunner().invoke(app, [command, "--help"], terminal_width=100, prog_name="gradcheck")
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_help_matches_its_golden(command: str) -> None:
    text = _help(command)
    path = GOLDEN / f"help_{command}.txt"
    if os.environ.get("GRADCHECK_REGEN_GOLDEN"):
        path.write_text(text, encoding="utf-8")
    assert path.is_file(), f"golden {path.name} is missing: run with GRADCHECK_REGEN_GOLDEN=1"
    assert text == path.read_text(encoding="utf-8"), f"gradcheck {command} --help differs from its golden"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_is_whole(command: str) -> None:
    """No markup eaten, every default shown, readable metavars, no word split at a hyphen."""
    text = _help(command)
    flat = " ".join(text.split())
    assert "{" not in text and "<bool>" not in text and "list[" not in text
    if command != "fold-bn":
        assert "gradcheck-cli[plot]" in flat
    assert "[tool.gradcheck]" in flat
    for group in ALL_GROUPS:
        for flag in group.flags:
            if flag.name in text and flag.record is not None:
                default = flag.help_text().rsplit("[default: ", 1)[1]
                assert f"[default: {default}" in flat, (command, flag.name)
    assert not re.search(r"\w-\n", text), "a word was split at its hyphen"


def test_one_flag_means_one_thing_in_every_command() -> None:
    spellings: dict[str, set[str]] = {}
    for command in COMMANDS:
        for match in re.finditer(r"^\s+(?:-\w, )?(--[a-z-]+)", _help(command), re.MULTILINE):
            spellings.setdefault(match.group(1), set()).add(command)
    assert "--format" in spellings and spellings["--format"] == set(COMMANDS)
    assert "--fan" in spellings and "--mode" in spellings and "--fan" not in {"--mode"}
    # Every probe option is taken by every command that probes (reinit probes before and after).
    for flag in (
        flag.name
        for group in ALL_GROUPS
        if group.title in ("Probe", "Probe inputs", "Loading", "Device")
        for flag in group.flags
    ):
        assert {"inspect", "check", "reinit"} <= spellings[flag], flag


def test_check_writes_its_json_report_with_o(cli: Any, workdir: Path) -> None:
    code, _, err = cli("check", "healthy.pt", *ARCH_ARGS, "-o", "r.json")
    assert code == 0, err
    import json

    report = json.loads((workdir / "r.json").read_text())
    assert report["model"]["path"] == "healthy.pt" and report["findings"] == []


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--threshold", "dead-relu=2"), "error: --threshold dead-relu=2: 2.0 is outside (0, 1)"),
        (("--select", "nope"), "error: --select: unknown rule 'nope'"),
        (("--severity", "dead-relu=loud"), "error: --severity dead-relu=loud: 'loud' is not error, warning or info"),
    ],
)
def test_rule_flag_errors_name_the_flag_as_typed(cli: Any, workdir: Path, args: tuple[str, ...], expected: str) -> None:
    code, _, err = cli("check", "healthy.pt", *ARCH_ARGS, *args)
    assert code == 2
    assert err.splitlines()[0] == expected


def test_check_names_a_model_it_could_not_load_whatever_the_formats(cli: Any, workdir: Path) -> None:
    code, out, err = cli(
        "check", "missing.pt", "healthy.pt", *ARCH_ARGS, "--format", "json=r.json", "--format", "junit=r.xml"
    )
    assert code == 2 and out == ""
    assert err.splitlines()[0] == "error: missing.pt: missing.pt: no such file (hint: check the path)"


def test_config_report_directories_are_created(cli: Any, workdir: Path) -> None:
    (workdir / "pyproject.toml").write_text(
        '[tool.gradcheck]\narch = "arch.py:mlp"\ninput-shape = "16,16"\n'
        'format = ["table", "junit=reports/deep/x.xml"]\n'
    )
    code, _, err = cli("check", "healthy.pt")
    assert code == 0, err
    assert (workdir / "reports" / "deep" / "x.xml").read_text().startswith("<?xml")


def test_inspect_and_check_list_the_same_findings(cli: Any, workdir: Path) -> None:
    import json

    code, out, _ = cli("inspect", "dead.pt", *ARCH_ARGS, "-f", "json")
    assert code == 0
    inspected = [(f["code"], f["layer"]) for f in json.loads(out)["findings"]]
    code, out, _ = cli("check", "dead.pt", *ARCH_ARGS, "-f", "json")
    assert code == 1
    checked = [(f["code"], f["layer"]) for f in json.loads(out)["findings"]]
    assert inspected == checked and inspected  # the dead layer is found by both


def test_third_party_warnings_stay_off_the_console(cli: Any, workdir: Path) -> None:
    (workdir / "noisy.py").write_text(
        "import warnings\nimport torch\n"
        "class Noisy(torch.nn.Linear):\n"
        "    def forward(self, x):\n"
        "        warnings.warn('a library talking', UserWarning)\n"
        "        return super().forward(x)\n"
        "def build():\n    return torch.nn.Sequential(Noisy(16, 16), torch.nn.ReLU())\n"
    )
    import torch

    torch.save(torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU()).state_dict(), workdir / "n.pt")
    code, _, err = cli("inspect", "n.pt", "--arch", "noisy.py:build", "--input-shape", "4,16")
    assert code == 0, err
    assert "a library talking" not in err


# docs/architecture.md: each layer imports only from the layers below it (or itself).
LAYERS = (
    {
        "gradcheck_cli",
        "choice",
        "errors",
        "records",
        "options",
        "stats",
        "threads",
        "fsutil",
        "parameters",
        "torch_util",
    },
    {"model"},
    {"onnx"},
    {"probe"},
    {"rewrite"},
    {"gate"},
    {"config"},
    {"api", "render"},
    {"cli", "__main__"},
)


def _layer(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "gradcheck_cli"
    return next(rank for rank, names in enumerate(LAYERS) if top in names)


def test_each_layer_imports_only_from_below() -> None:
    def top(module: str) -> str:
        return module.split(".")[1] if "." in module else "gradcheck_cli"

    upward = sorted(
        f"{a} -> {b}"
        for a, imported in _import_graph().items()
        for b in imported
        if _layer(b) > _layer(a) or {top(a), top(b)} == {"api", "render"}
    )
    assert upward == []
