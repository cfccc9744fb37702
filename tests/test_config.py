"""Configuration: discovery, precedence (defaults < file < CLI), and errors that name the key."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gradcheck_cli.config import Settings, find_pyproject, load_settings, parse_report_target, settings_of
from gradcheck_cli.errors import ConfigError
from gradcheck_cli.options import (
    InputOptions,
    LoadOptions,
    LossKind,
    Mode,
    ProbeOptions,
    ReportFormat,
    ReportTarget,
    RuleOverride,
)
from gradcheck_cli.records import Severity


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


FULL = """
    [project]
    name = "demo"

    [tool.gradcheck]
    fail-on = "warning"
    select = ["GC1", "vanishing-gradient"]
    ignore = ["init-scale"]
    baseline = "reports/baseline.json"
    baseline-tolerance = 0.1
    format = ["table", "junit=reports/gradcheck.xml"]
    arch = "models.py:build"
    arch-kwargs = { width = 32 }
    input-shape = ["8,16"]
    input_dtype = "float32"
    input-range = [0, 1]
    batch-size = 4
    batches = 2
    seed = 7
    loss = "mse"
    mode = "train"
    model-output = 0
    saturation-cutoff = 0.1
    non-strict = true

    [tool.gradcheck.rules.dead-relu]
    threshold = 0.3
    severity = "warning"
    ignore-layers = ["head.*"]

    [tool.gradcheck.rules.GC201]
    threshold = 1e-4
"""


def test_every_key_is_read_and_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    config = write(tmp_path / "proj" / "pyproject.toml", FULL)
    settings = load_settings(config)
    base = config.parent
    gate = settings.gate
    assert gate.fail_on is Severity.WARNING
    assert gate.select == ("GC1", "vanishing-gradient")
    assert gate.ignore == ("init-scale",)
    assert gate.baseline == base / "reports" / "baseline.json"
    assert gate.baseline_tolerance == 0.1
    assert settings.format == (
        ReportTarget(ReportFormat.TABLE),
        ReportTarget(ReportFormat.JUNIT, base / "reports" / "gradcheck.xml"),
    )
    assert settings.load == LoadOptions(arch=f"{base / 'models.py'}:build", arch_kwargs={"width": 32}, non_strict=True)
    assert settings.probe == ProbeOptions(
        inputs=InputOptions(
            input_shape=((8, 16),), input_dtype="float32", input_range=(0.0, 1.0), batch_size=4, batches=2, seed=7
        ),
        loss=LossKind.MSE,
        mode=Mode.TRAIN,
        model_output="0",
        saturation_cutoff=0.1,
    )
    assert gate.rules == {
        "dead-relu": RuleOverride(threshold=0.3, severity=Severity.WARNING, ignore_layers=("head.*",)),
        "GC201": RuleOverride(threshold=1e-4),
    }


def test_nearest_pyproject_with_the_table_wins_searching_upward(tmp_path: Path) -> None:
    write(tmp_path / "pyproject.toml", "[tool.gradcheck]\nseed = 1\n")
    write(tmp_path / "pkg" / "pyproject.toml", "[project]\nname = 'no-table-here'\n")
    nested = tmp_path / "pkg" / "sub"
    nested.mkdir()
    assert find_pyproject(nested) == tmp_path / "pyproject.toml"  # the table-less one is passed over
    write(nested / "pyproject.toml", "[tool.gradcheck]\nseed = 2\n")
    assert load_settings(cwd=nested).inputs.seed == 2
    assert load_settings(cwd=tmp_path / "pkg").inputs.seed == 1


def test_no_config_anywhere_gives_defaults(tmp_path: Path) -> None:
    assert load_settings(cwd=tmp_path) == Settings()


def test_dedicated_file_may_hold_the_keys_at_top_level(tmp_path: Path) -> None:
    config = write(tmp_path / "gradcheck.toml", 'fail-on = "info"\n[rules.init-scale]\nthreshold = 2\n')
    settings = load_settings(config)
    assert settings.gate.fail_on is Severity.INFO
    assert settings.gate.rules["init-scale"].threshold == 2.0


def test_cli_overrides_file_and_ignore_lists_add_up(tmp_path: Path) -> None:
    file = load_settings(write(tmp_path / "pyproject.toml", FULL))
    cli = settings_of(
        fail_on=Severity.ERROR,
        ignore=("GC203",),
        seed=99,
        batches=None,
        rules={"dead-relu": RuleOverride(threshold=0.9)},
    )
    merged = file.merged(cli)
    assert merged.gate.fail_on is Severity.ERROR  # CLI wins
    assert merged.inputs.seed == 99  # CLI wins
    assert merged.inputs.batches == 2  # not given on the CLI: the file's value stays
    assert merged.gate.select == ("GC1", "vanishing-gradient")
    assert merged.gate.ignore == ("init-scale", "GC203")
    assert merged.gate.rules["dead-relu"] == RuleOverride(threshold=0.9)
    assert merged.gate.rules["GC201"].threshold == 1e-4


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ("[tool.gradcheck]\nfail_onn = 'error'\n", "tool.gradcheck.fail_onn"),
        ("[tool.gradcheck]\nfail-on = 'fatal'\n", "tool.gradcheck.fail-on"),
        ("[tool.gradcheck]\nseed = 'zero'\n", "tool.gradcheck.seed"),
        ("[tool.gradcheck]\nbatch-size = 0\n", "tool.gradcheck.batch-size"),
        ("[tool.gradcheck]\nbatches = true\n", "tool.gradcheck.batches"),
        ("[tool.gradcheck]\nsaturation-cutoff = 1.5\n", "tool.gradcheck.saturation-cutoff"),
        ("[tool.gradcheck]\nselect = ['GC999']\n", "tool.gradcheck.select: unknown rule 'GC999'"),
        ("[tool.gradcheck]\nformat = ['pdf']\n", "tool.gradcheck.format"),
        ("[tool.gradcheck]\nloss = 'hinge'\n", "tool.gradcheck.loss"),
        ("[tool.gradcheck.rules.dead-relu]\nthreshold = 2.0\n", "tool.gradcheck.rules.dead-relu.threshold"),
        ("[tool.gradcheck.rules.dead-relu]\nthreshhold = 0.2\n", "tool.gradcheck.rules.dead-relu.threshhold"),
        ("[tool.gradcheck.rules.no-such-rule]\nthreshold = 0.2\n", "tool.gradcheck.rules.no-such-rule"),
        ("[tool.gradcheck.rules.dead-relu]\nseverity = 'fatal'\n", "tool.gradcheck.rules.dead-relu.severity"),
        ("[tool.gradcheck]\nignore = ['non-finite']\n", "tool.gradcheck.ignore"),
        ("[tool.gradcheck\n", "not valid TOML"),
    ],
)
def test_bad_keys_and_values_are_config_errors_naming_the_key(tmp_path: Path, body: str, key: str) -> None:
    config = write(tmp_path / "pyproject.toml", body)
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    assert key in info.value.message


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_output_targets(tmp_path: Path) -> None:
    assert parse_report_target("JSON") == ReportTarget(ReportFormat.JSON)
    assert parse_report_target("junit=out/x.xml", base=tmp_path) == ReportTarget(
        ReportFormat.JUNIT, tmp_path / "out" / "x.xml"
    )
    for bad in ("xml", "junit="):
        with pytest.raises(ConfigError):
            parse_report_target(bad)
