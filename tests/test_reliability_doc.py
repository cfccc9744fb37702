"""RELIABILITY.md stays true: its figures table equals what the reliability tests actually run, and
every test it names exists."""

from __future__ import annotations

import re

from tests import (
    test_reliability_malformed as malformed,
)
from tests import (
    test_reliability_pickle as pickle_tests,
)
from tests import (
    test_reliability_resources as resources,
)
from tests import (
    test_reliability_writes as writes,
)
from tests._mutate import CASE_TIMEOUT_S, SEEDS
from tests.conftest import ROOT

DOC = ROOT / "RELIABILITY.md"


def expected_figures() -> dict[str, int]:
    return {
        "hostile model files x commands, all refused": len(pickle_tests.KINDS) * len(pickle_tests.COMMANDS),
        "hostile probe files (--input/--target, zip and legacy), all refused": 2 * len(pickle_tests.PROBE_FLAGS),
        "loaders covered (seed files)": len(SEEDS),
        "mutated files, deterministic matrix": len(malformed.MATRIX),
        "special files (directory, symlink loop, FIFO, socket, devices, unreadable) x seeds": len(
            malformed.SPECIAL_FILES
        )
        * len(SEEDS),
        "fuzz cases, loaders, default run": malformed.FUZZ_LOADER_EXAMPLES,
        "fuzz cases, CLI end to end, default run": malformed.FUZZ_CLI_EXAMPLES,
        "fuzz cases, loaders, nightly (-m slow)": malformed.FUZZ_LOADER_EXAMPLES * malformed.FUZZ_NIGHTLY_FACTOR,
        "fuzz cases, CLI end to end, nightly (-m slow)": malformed.FUZZ_CLI_EXAMPLES * malformed.FUZZ_NIGHTLY_FACTOR,
        "SIGKILL-during-write trials, streamed 512 MiB write": writes.KILL_TRIALS,
        "SIGKILL-during-write trials, torch.save of 256 MiB": writes.KILL_TRIALS_TORCH,
        "concurrent-writer trials (two processes, one output)": writes.CONCURRENT_TRIALS,
        "simulated write faults (ENOSPC/EACCES) x rewrites": len(writes.FAULT_CASES),
        "rewrites checked for an unmodified input (hash)": len(writes.REWRITES),
        "per-case time bound (seconds)": CASE_TIMEOUT_S,
    }


def stated_figures() -> dict[str, int]:
    text = DOC.read_text(encoding="utf-8")
    block = text.split("<!-- figures:begin -->", 1)[1].split("<!-- figures:end -->", 1)[0]
    rows = re.findall(r"^\|\s*([^|]+?)\s*\|\s*(\d+)\s*\|", block, flags=re.MULTILINE)
    return {label: int(value) for label, value in rows}


def test_figures_match_the_tests() -> None:
    assert stated_figures() == expected_figures()


def test_named_tests_exist() -> None:
    text = DOC.read_text(encoding="utf-8")
    modules = {
        "test_reliability_pickle": pickle_tests,
        "test_reliability_malformed": malformed,
        "test_reliability_writes": writes,
        "test_reliability_resources": resources,
    }
    named = re.findall(r"`(test_reliability_\w+)\.py::(test_\w+)`", text)
    assert named, "RELIABILITY.md names no test"
    for module, test in named:
        assert hasattr(modules[module], test), f"RELIABILITY.md names {module}.py::{test}, which does not exist"
