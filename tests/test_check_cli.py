"""``gradcheck check`` end to end: exit codes 0/1/2, --exit-zero, globs, config precedence,
baseline, several formats at once. Models are built here and saved as state_dicts."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.conftest import one_line_error, validate_report

ARCH = textwrap.dedent("""
    from torch import nn

    def mlp(depth=3, width=32):
        layers = []
        for i in range(depth):
            layers += [nn.Linear(16 if i == 0 else width, width), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(width, 4))
""")
ARCH_ARGS = ("--arch", "arch.py:mlp", "--input-shape", "16,16")


def he_mlp(seed: int = 0) -> nn.Sequential:
    namespace: dict[str, Any] = {}
    exec(ARCH, namespace)
    torch.manual_seed(seed)
    model: nn.Sequential = namespace["mlp"]()
    for module in model:
        if isinstance(module, nn.Linear):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            nn.init.zeros_(module.bias)
    nn.init.xavier_normal_(model[-1].weight)
    return model


def save(model: nn.Module, path: Path) -> Path:
    torch.save(model.state_dict(), path)
    return path


def kill_units(model: nn.Sequential, layer: int, units: int) -> nn.Sequential:
    """Bias -1e3 on ``units`` outputs of Linear ``layer``: exactly those ReLU units die."""
    with torch.no_grad():
        model[layer].bias[:units] = -1e3
    return model


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # relative model paths; no pyproject.toml above a tmp dir
    (tmp_path / "arch.py").write_text(ARCH)
    save(he_mlp(), tmp_path / "healthy.pt")
    save(kill_units(he_mlp(), 2, 24), tmp_path / "dead.pt")  # 24 of 32 = 75% > 50%
    return tmp_path


def test_healthy_model_exits_0_with_one_summary_line(cli: Any, workdir: Path) -> None:
    code, out, err = cli("check", "healthy.pt", *ARCH_ARGS)
    assert code == 0, err
    assert "healthy.pt: no findings" in out
    assert err.strip().splitlines()[-1] == "gradcheck: 1 model, 0 errors, 0 warnings, 0 info: passed"


def test_findings_exit_1_and_exit_zero_reports_them(cli: Any, workdir: Path) -> None:
    code, out, err = cli("check", "dead.pt", *ARCH_ARGS)
    assert code == 1
    assert "GC101 dead-relu" in out and "24 of 32 relu units are dead" in out
    assert "failed" in err.splitlines()[-1]
    code, out, _ = cli("check", "dead.pt", *ARCH_ARGS, "--exit-zero")
    assert code == 0 and "GC101 dead-relu" in out


def test_fail_on_warning_and_severity_override(cli: Any, workdir: Path) -> None:
    model = he_mlp()
    with torch.no_grad():
        model[2].weight.normal_()  # N(0, 1): init-scale, a warning by default
    save(model, workdir / "normal.pt")
    assert cli("check", "normal.pt", *ARCH_ARGS)[0] == 0
    assert cli("check", "normal.pt", *ARCH_ARGS, "--fail-on", "warning")[0] == 1
    assert cli("check", "normal.pt", *ARCH_ARGS, "--severity", "init-scale=error")[0] == 1
    assert cli("check", "dead.pt", *ARCH_ARGS, "--severity", "dead-relu=warning")[0] == 0


def test_nan_weights_are_a_finding_not_a_load_error(cli: Any, workdir: Path) -> None:
    model = he_mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    save(model, workdir / "nan.pt")
    code, out, _ = cli("check", "nan.pt", *ARCH_ARGS, "--format", "json")
    assert code == 1
    report = json.loads(out)
    validate_report(report)
    assert [(f["code"], f["layer"]) for f in report["findings"] if f["code"] == "GC001"] == [("GC001", "2.weight")]


def test_several_models_and_globs_one_summary(cli: Any, workdir: Path) -> None:
    code, out, err = cli("check", "*.pt", *ARCH_ARGS)
    assert code == 1
    assert out.index("dead.pt") < out.index("healthy.pt")  # sorted glob expansion
    summary = [line for line in err.splitlines() if line.startswith("gradcheck:")]
    assert summary == ["gradcheck: 2 models, 1 error, 0 warnings, 0 info: failed (1 finding(s) at or above error)"]


@pytest.mark.parametrize(
    "args",
    [
        ("missing.pt",),  # load error
        ("nothing-*.pt",),  # a glob that matches nothing
        ("healthy.pt", "--select", "GC999"),
        ("healthy.pt", "--ignore", "non-finite"),
        ("healthy.pt", "--threshold", "dead-relu=2"),
        ("healthy.pt", "--threshold", "dead-relu"),
        ("healthy.pt", "--format", "pdf"),
        ("healthy.pt", "--format", "json", "--format", "table"),  # two formats on stdout
        ("healthy.pt", "--format", "junit=no/such/dir/x.xml"),
        ("healthy.pt", "--config", "absent.toml"),
        ("healthy.pt", "--baseline", "absent.json"),
    ],
)
def test_usage_config_and_load_errors_exit_2(cli: Any, workdir: Path, args: tuple[str, ...]) -> None:
    code, _, err = cli("check", *args, *ARCH_ARGS)
    assert code == 2, err
    assert "Traceback" not in err
    assert "error" in err


def test_config_error_is_one_line_naming_the_key(cli: Any, workdir: Path) -> None:
    (workdir / "pyproject.toml").write_text("[tool.gradcheck]\nfail-onn = 'error'\n")
    code, _, err = cli("check", "healthy.pt", *ARCH_ARGS)
    assert code == 2
    one_line_error(err)
    assert "tool.gradcheck.fail-onn" in err


def test_one_broken_model_does_not_hide_the_others(cli: Any, workdir: Path) -> None:
    code, out, err = cli("check", "dead.pt", "missing.pt", *ARCH_ARGS)
    assert code == 2  # a load error wins over findings
    assert "GC101 dead-relu" in out and "missing.pt: could not be checked" in out
    assert "1 model(s) could not be checked" in err


def test_config_file_supplies_probe_options_and_cli_overrides_it(cli: Any, workdir: Path) -> None:
    (workdir / "pyproject.toml").write_text(
        textwrap.dedent("""
        [tool.gradcheck]
        arch = "arch.py:mlp"
        input-shape = "16,16"

        [tool.gradcheck.rules.dead-relu]
        threshold = 0.8
    """)
    )
    # The file alone is enough for a CI line; its threshold (0.8 > 75% dead) lets dead.pt pass.
    assert cli("check", "dead.pt")[0] == 0
    # A CLI flag beats the file.
    assert cli("check", "dead.pt", "--threshold", "dead-relu=0.5")[0] == 1
    # --isolated ignores the file: then there is no --arch and the state_dict cannot load.
    assert cli("check", "dead.pt", "--isolated")[0] == 2
    # The file is found from a subdirectory too, and its relative arch path still resolves.
    sub = workdir / "sub"
    sub.mkdir()
    assert cli("check", str(workdir / "dead.pt"), "--config", str(workdir / "pyproject.toml"))[0] == 0


def test_ignore_layer_glob_from_config(cli: Any, workdir: Path) -> None:
    (workdir / "gradcheck.toml").write_text('[rules.dead-relu]\nignore-layers = ["3*"]\n')
    assert cli("check", "dead.pt", *ARCH_ARGS, "--config", "gradcheck.toml")[0] == 0


def test_baseline_passes_unchanged_and_fails_worsened_or_new(cli: Any, workdir: Path) -> None:
    code, _, _ = cli("check", "dead.pt", *ARCH_ARGS, "--exit-zero", "--format", "json=baseline.json")
    assert code == 0
    baseline = json.loads((workdir / "baseline.json").read_text())
    validate_report(baseline)
    assert [f["code"] for f in baseline["findings"]] == ["GC101"]

    code, out, err = cli("check", "dead.pt", *ARCH_ARGS, "--baseline", "baseline.json")
    assert code == 0, out + err
    assert "unchanged" in out and "1 unchanged from the baseline" in err

    save(kill_units(he_mlp(), 2, 30), workdir / "dead.pt")  # 30 of 32 dead: worse than 24
    code, out, _ = cli("check", "dead.pt", *ARCH_ARGS, "--baseline", "baseline.json")
    assert code == 1 and "worsened" in out

    # same + a new layer: 28 of 32 dead, past GC101's 0.5 by more than two binomial sd (sqrt(32/4)*2)
    save(kill_units(kill_units(he_mlp(), 2, 24), 4, 28), workdir / "dead.pt")
    code, out, _ = cli("check", "dead.pt", *ARCH_ARGS, "--baseline", "baseline.json", "--format", "json")
    assert code == 1
    statuses = {(f["layer"], f["baseline"]) for f in json.loads(out)["findings"] if f["code"] == "GC101"}
    assert statuses == {("3", "unchanged"), ("5", "new")}


def test_several_formats_at_once(cli: Any, workdir: Path) -> None:
    code, out, _ = cli(
        "check",
        "dead.pt",
        *ARCH_ARGS,
        "--format",
        "github",
        "--format",
        "table",
        "--format",
        "junit=out.xml",
        "--format",
        "markdown=summary.md",
        "-f",
        "json=r.json",
    )
    assert code == 1
    assert out.startswith("::error file=dead.pt,title=GC101 dead-relu::3: 24 of 32 relu units")
    assert "GC101 dead-relu" in out.split("\n", 1)[1]  # the table follows the annotations
    assert (workdir / "out.xml").read_text().startswith('<?xml version="1.0"')
    assert "| ❌ | error | GC101 `dead-relu` | `3` |" in (workdir / "summary.md").read_text()
    assert json.loads((workdir / "r.json").read_text())["findings"][0]["code"] == "GC101"


def test_help_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from gradcheck_cli.cli.app import main; sys.argv=['gradcheck','check','--help'];\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--fail-on" in done.stdout


def test_library_api_check_matches_the_cli(workdir: Path) -> None:
    from gradcheck_cli import api

    report = api.check(
        workdir / "dead.pt",
        load=api.LoadOptions(arch="arch.py:mlp"),
        probe=api.ProbeOptions(inputs=api.InputOptions(input_shape=((16, 16),))),
    )
    assert [(f.code, f.layer, f.value) for f in report.findings] == [("GC101", "3", 0.75)]
    assert all(row.init is not None for row in report.layers if row.kind == "param")
