"""bench/gate_corpus.py in the default suite: its synthetic part (healthy references and every
injected fault) scores 100% recall and localisation with no false alarm, and the scorecard and
--diff machinery works on real outcomes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from torch import nn

from bench.gate_corpus import (
    SECTION,
    Case,
    Outcome,
    diff,
    findings_json,
    main,
    outcomes_from_json,
    replace_section,
    residual_mlp,
    run_corpus,
    score,
    scorecard,
    synthetic_cases,
)
from gradcheck_cli.records import Severity
from tests._check_models import run


@pytest.fixture(scope="module")
def outcomes() -> list[Outcome]:
    done, left = run_corpus(synthetic_cases())
    assert left == []
    return done


def test_synthetic_corpus_meets_the_targets(outcomes: list[Outcome]) -> None:
    s = score(outcomes)
    assert s.failed == 0 and s.healthy >= 5 and s.faulty >= 12
    assert s.healthy_warned == 0, [(o.case.name, o.loud) for o in outcomes if o.case.fault is None and o.loud]
    assert s.detected == s.faulty, [o.case.name for o in outcomes if o.case.fault and not o.detected]
    assert s.localised == s.faulty, [(o.case.name, o.loud[:3]) for o in outcomes if o.case.fault and not o.localised]


def test_every_fault_kind_of_the_issue_is_in_the_corpus() -> None:
    faults = " ".join(c.fault or "" for c in synthetic_cases())
    for kind in (
        "dead units",
        "before tanh",
        "before sigmoid",
        "before hardsigmoid",
        "NAN",
        "INF",
        "exploding",
        "vanishing",
        "old-style",
        "detached",
    ):
        assert kind in faults, kind


def test_localisation_is_judged_on_the_right_rule(outcomes: list[Outcome]) -> None:
    by_name = {o.case.name: o for o in outcomes}
    dead = by_name["fault/dead-units@4"]
    # Upstream layers get zero gradient (GC203) and the ReLUs after it die too (their input is a
    # constant 0), but the first finding of the right rule names the dead layer's own ReLU.
    assert dead.localised and next(f["layer"] for f in dead.loud if f["code"] == "GC101") == "5"
    moved = Outcome(dead.case, [dict(f, layer="0") if f["code"] == "GC101" else f for f in dead.findings])
    assert moved.detected and not moved.localised


def test_detached_branch_is_found_and_an_unused_head_is_not() -> None:
    report = run(residual_mlp(True))
    assert [(f.code, f.layer) for f in report.findings if f.severity is not Severity.INFO] == [("GC203", "2.branch")]
    assert "detached" in report.findings[0].message
    assert run(residual_mlp(False)).findings == ()

    class TwoHeads(nn.Module):  # the probe's loss reads the first output only
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(16, 64)
            self.used = nn.Linear(64, 10)
            self.unused = nn.Linear(64, 4)

        def forward(self, x):  # type: ignore[no-untyped-def]
            h = self.body(x).relu()
            return self.used(h), self.unused(h)

    heads = run(TwoHeads())
    assert [f for f in heads.findings if f.code == "GC203"] == []


def test_scorecard_diff_and_resume(outcomes: list[Outcome], tmp_path: Path) -> None:
    data = findings_json(outcomes)
    card = scorecard(outcomes, "python bench/gate_corpus.py --quick", 60.0)
    assert card.startswith(SECTION) and "| faulty, flagged by the right rule (recall) |" in card
    bench = tmp_path / "BENCHMARKS.md"
    bench.write_text("# Benchmarks\n\n## Other\n\nkept\n", encoding="utf-8")
    replace_section(bench, card)
    replace_section(bench, card)  # replaced in place, not appended twice
    text = bench.read_text(encoding="utf-8")
    assert text.count(SECTION) == 1 and "kept" in text
    # A rule change that drops one finding and adds another shows as '-' and '+'.
    changed = json.loads(json.dumps(data))
    first = changed["models"]["fault/nan-weight@4"]["findings"]
    removed = first.pop(0)
    first.append({"code": "GC999", "layer": "x", "severity": "warning"})
    lines = diff(data, changed)
    assert f"- fault/nan-weight@4: {removed['code']}@{removed['layer']} ({removed['severity']})" in lines
    assert "+ fault/nan-weight@4: GC999@x (warning)" in lines
    cases: list[Case] = [o.case for o in outcomes]
    again = outcomes_from_json(data, cases)
    assert set(again) == {c.name for c in cases} and again["fault/nan-weight@4"].detected


def test_command_line_writes_json_and_diffs_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "findings.json"
    assert main(["--quick", "--only", "^synthetic/he|^fault/nan", "--json", str(out)]) == 0
    assert set(json.loads(out.read_text())["models"]) == {"synthetic/he-relu-mlp", "fault/nan-weight@4"}
    capsys.readouterr()
    main(["--quick", "--only", "^synthetic/he|^fault/nan", "--diff", str(out)])
    assert "no change" in capsys.readouterr().out


def test_faults_injected_into_a_real_architecture_are_found_at_their_layer() -> None:
    pytest.importorskip("torchvision")
    from bench.gate_corpus import _nan_in_middle, _negative_running_var, run_case, torchvision_cases

    (resnet,) = [c for c in torchvision_cases(quick=True) if c.name == "torchvision/resnet18"]
    for inject in (_nan_in_middle(float("nan")), _negative_running_var):
        rules = frozenset({"GC001", "GC002"})
        case = Case(f"fault/{resnet.name}", "torchvision", resnet.build, resnet.probe, "injected", rules, None, inject)
        outcome = run_case(case)
        assert outcome.error is None and outcome.injected_at
        assert outcome.detected and outcome.localised, (outcome.injected_at, outcome.loud[:3])
        # Located by the chosen layer, not by a fixed list: the same findings elsewhere do not count.
        assert not Outcome(case, outcome.findings, injected_at="fc").localised
