"""Malformed input: every loader, fed truncated, random, bit-flipped, wrong-magic and empty files,
directories, unreadable files, symlink loops and special files, answers exit 2 with a one-line
message, never an uncaught exception, never a hang. Plus a hypothesis fuzz over mutated seeds.

The figures RELIABILITY.md publishes are the constants below (tests/test_reliability_doc.py
checks that the document states them):

    pytest tests/test_reliability_malformed.py -p no:logging              # default CI run
    pytest tests/test_reliability_malformed.py -m slow -p no:logging      # nightly (long fuzz)
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests._mutate import MUTATIONS, SEEDS, SEEDS_BY_NAME, Seed, time_bound
from tests.conftest import one_line_error

# Deterministic matrix: how many variants of each mutation every seed gets.
VARIANTS = {"empty": 1, "truncate": 6, "random": 4, "wrong_magic": 4, "flip": 4}
# Mutations after which the file may still be valid (a flipped bit inside a weight is a
# different, valid checkpoint; a TOML file cut between two keys is a shorter, valid file).
MAY_STAY_VALID = {("*", "flip"), ("config_toml", "truncate")}
# hypothesis fuzz: examples per default run, and per nightly (-m slow) run. Override with
# GRADCHECK_FUZZ_EXAMPLES (e.g. for a one-off long session).
FUZZ_LOADER_EXAMPLES = 500
FUZZ_CLI_EXAMPLES = 100
FUZZ_NIGHTLY_FACTOR = 10
SPECIAL_FILES = (
    "directory",
    "symlink_loop",
    "dangling_symlink",
    "fifo",
    "socket",
    "dev_zero",
    "dev_null",
    "unreadable_simulated",
    "unreadable_chmod",
)

MATRIX = [(seed.name, mutation, n) for seed in SEEDS for mutation, count in VARIANTS.items() for n in range(count)]


def _argv(seed: Seed, path: Path) -> list[str]:
    return [arg.replace("{file}", str(path)) for arg in seed.argv]


def _assert_clean(seed: Seed, result: tuple[int, str, str], *, strict: bool) -> None:
    """Exit 2 with one line (strict); or, for a file that may still be valid, 0/1 or that."""
    code, stdout, stderr = result
    assert "Traceback" not in stdout + stderr
    if not strict and code in (0, 1):
        return
    assert code == 2, (code, stdout[-2000:], stderr)
    if seed.argv[0] == "check":
        if "could not be checked" in stderr:  # a model that failed: its error is in the table
            assert stderr.strip().count("\n") == 0, stderr
        else:  # a usage/config error before any model ran
            one_line_error(stderr)
    else:
        one_line_error(stderr)


@pytest.fixture(scope="module")
def seed_bytes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    directory = tmp_path_factory.mktemp("seeds")
    return {seed.name: seed.build(directory) for seed in SEEDS}


@pytest.mark.parametrize("seed_name", [seed.name for seed in SEEDS])
def test_seed_is_valid(cli: Any, seed_bytes: dict[str, bytes], seed_name: str, tmp_path: Path) -> None:
    """Each seed loads and runs: what the mutations break is the mutation's doing."""
    seed = SEEDS_BY_NAME[seed_name]
    path = tmp_path / f"seed{seed.suffix}"
    path.write_bytes(seed_bytes[seed_name])
    code, _, stderr = cli(*_argv(seed, path))
    assert code in (0, 1), stderr


@pytest.mark.parametrize(("seed_name", "mutation", "n"), MATRIX)
def test_mutated_file(
    cli: Any, seed_bytes: dict[str, bytes], seed_name: str, mutation: str, n: int, tmp_path: Path
) -> None:
    seed = SEEDS_BY_NAME[seed_name]
    path = tmp_path / f"mutated{seed.suffix}"
    path.write_bytes(MUTATIONS[mutation](seed_bytes[seed_name], n))
    strict = ("*", mutation) not in MAY_STAY_VALID and (seed_name, mutation) not in MAY_STAY_VALID
    with time_bound():
        result = cli(*_argv(seed, path))
    _assert_clean(seed, result, strict=strict)


def _special(kind: str, tmp_path: Path, suffix: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / f"special{suffix}"
    if kind == "directory":
        path.mkdir()
    elif kind == "symlink_loop":
        os.symlink(tmp_path / f"other{suffix}", path)
        os.symlink(path, tmp_path / f"other{suffix}")
    elif kind == "dangling_symlink":
        os.symlink(tmp_path / "nowhere", path)
    elif kind == "fifo":
        os.mkfifo(path)  # opening it for reading would block until a writer came: a hang
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()
    elif kind == "dev_zero":
        return Path("/dev/zero")  # endless: reading it whole would exhaust memory
    elif kind == "dev_null":
        return Path("/dev/null")
    elif kind == "unreadable_simulated":
        path.write_bytes(b"\x80\x02}q\x00.")  # a valid tiny pickle: only the permission stops it
        real_open = Path.open

        def denied(self: Path, *args: Any, **kwargs: Any) -> Any:
            if self == path:
                raise PermissionError(13, "Permission denied", str(self))
            return real_open(self, *args, **kwargs)

        monkeypatch.setattr(Path, "open", denied)
    elif kind == "unreadable_chmod":
        if os.geteuid() == 0:
            pytest.skip(
                "running as root: chmod 000 does not stop root from reading (unreadable_simulated covers the same path)"
            )
        path.write_bytes(b"\x80\x02}q\x00.")
        path.chmod(0)
    return path


@pytest.mark.parametrize("kind", SPECIAL_FILES)
@pytest.mark.parametrize("seed_name", [seed.name for seed in SEEDS])
def test_special_file(cli: Any, seed_name: str, kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seed = SEEDS_BY_NAME[seed_name]
    path = _special(kind, tmp_path, seed.suffix, monkeypatch)
    with time_bound():
        result = cli(*_argv(seed, path))
    _assert_clean(seed, result, strict=True)


# --- fuzz ---------------------------------------------------------------------------------------


def _examples(default: int) -> int:
    text = os.environ.get("GRADCHECK_FUZZ_EXAMPLES")
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise pytest.UsageError(f"GRADCHECK_FUZZ_EXAMPLES={text!r} is not an integer") from None
    if value < 1:
        raise pytest.UsageError(f"GRADCHECK_FUZZ_EXAMPLES={value} must be at least 1")
    return value


Mutation = tuple[str, str, float, bytes]  # (seed name, operation, position in [0, 1), chunk)
OPERATIONS = ("overwrite", "insert", "delete", "cut", "flip", "magic", "header")


def mutations(seeds: dict[str, bytes]) -> st.SearchStrategy[Mutation]:
    """A seed and how to mutate it (kept small, so that a failing case prints in a few lines)."""
    return st.tuples(
        st.sampled_from(sorted(seeds)),
        st.sampled_from(OPERATIONS),
        st.floats(0, 1, exclude_max=True),
        st.binary(min_size=1, max_size=16),
    )


def apply(case: Mutation, data: bytes) -> bytes:
    """Overwrite, insert, delete or cut at a position; or bit flips / a wrong magic (seeded by the
    chunk). 'header' overwrites within the first 64 bytes, where magic and lengths live."""
    _, op, where, chunk = case
    limit = min(len(data) - 1, 63) if op == "header" else len(data) - 1
    position = int(where * (limit + 1))
    if op in ("overwrite", "header"):
        return data[:position] + chunk + data[position + len(chunk) :]
    if op == "insert":
        return data[:position] + chunk + data[position:]
    if op == "delete":
        return data[:position] + data[position + len(chunk) :]
    if op == "cut":
        return data[:position]
    n = int.from_bytes(chunk, "little")
    return MUTATIONS["flip" if op == "flip" else "wrong_magic"](data, n)


def _load_only(seed: Seed, path: Path) -> None:
    """What the seed's command reads, through the library loader only (no probe), so that hundreds
    of cases fit in a CI minute. Returns, or raises GradcheckError; anything else is a bug."""
    from gradcheck_cli import api
    from gradcheck_cli.config import load_settings
    from gradcheck_cli.probe.batch import read_input_file

    if seed.name.startswith(("input_", "target_")):
        read_input_file(path)
    elif seed.name == "config_toml":
        load_settings(path)
    elif seed.name == "onnx":
        api.inspect_onnx(path)  # parsing alone proves little for ONNX: run its probe too
    else:
        arch = seed.argv[seed.argv.index("--arch") + 1] if "--arch" in seed.argv else None
        api.load(path, api.LoadOptions(arch=arch))


def _fuzz_loaders(seed_bytes: dict[str, bytes], tmp_path: Path, examples: int, *, fixed: bool = True) -> None:
    from gradcheck_cli.errors import GradcheckError

    ran: list[str] = []

    @settings(
        max_examples=examples, deadline=None, derandomize=fixed, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(case=mutations(seed_bytes))
    def run(case: Mutation) -> None:
        ran.append(case[1])
        seed = SEEDS_BY_NAME[case[0]]
        path = tmp_path / f"fuzz{seed.suffix}"
        path.write_bytes(apply(case, seed_bytes[case[0]]))
        try:
            with time_bound():
                _load_only(seed, path)
        except GradcheckError as exc:
            assert "\n" not in exc.message and "\n" not in (exc.hint or ""), exc.message

    run()
    # RELIABILITY.md states max_examples as the cases run: hypothesis could stop early (e.g. out of
    # distinct inputs), and then the stated figure would be false, so check it.
    assert len(ran) >= examples, f"only {len(ran)} of {examples} fuzz cases ran"


def _fuzz_cli(cli: Any, seed_bytes: dict[str, bytes], tmp_path: Path, examples: int, *, fixed: bool = True) -> None:
    ran: list[str] = []

    @settings(
        max_examples=examples, deadline=None, derandomize=fixed, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(case=mutations(seed_bytes))
    def run(case: Mutation) -> None:
        ran.append(case[1])
        seed = SEEDS_BY_NAME[case[0]]
        path = tmp_path / f"fuzz{seed.suffix}"
        path.write_bytes(apply(case, seed_bytes[case[0]]))
        with time_bound():
            result = cli(*_argv(seed, path))
        _assert_clean(seed, result, strict=False)

    run()
    # RELIABILITY.md states max_examples as the cases run: hypothesis could stop early (e.g. out of
    # distinct inputs), and then the stated figure would be false, so check it.
    assert len(ran) >= examples, f"only {len(ran)} of {examples} fuzz cases ran"


# Cases the nightly fuzz found (fixed since): each must stay a clean exit 2.
FUZZ_REGRESSIONS: list[Mutation] = [
    ("onnx", "header", 0.9375, b"\x80"),  # a node name that is not UTF-8: protobuf returned bytes
    ("torchscript", "overwrite", 0.96875, b"\x80"),  # a zip member name that is not UTF-8
    ("torchscript", "overwrite", 0.9954150000699277, b"\x00\x00@"),  # zipfile: "zip file version 6.4"
]


@pytest.mark.parametrize("case", FUZZ_REGRESSIONS, ids=[f"{c[0]}-{c[1]}" for c in FUZZ_REGRESSIONS])
def test_fuzz_regressions(cli: Any, seed_bytes: dict[str, bytes], tmp_path: Path, case: Mutation) -> None:
    seed = SEEDS_BY_NAME[case[0]]
    path = tmp_path / f"regression{seed.suffix}"
    path.write_bytes(apply(case, seed_bytes[case[0]]))
    with time_bound():
        result = cli(*_argv(seed, path))
    _assert_clean(seed, result, strict=True)


def test_fuzz_loaders(seed_bytes: dict[str, bytes], tmp_path: Path) -> None:
    _fuzz_loaders(seed_bytes, tmp_path, _examples(FUZZ_LOADER_EXAMPLES))


def test_fuzz_cli(cli: Any, seed_bytes: dict[str, bytes], tmp_path: Path) -> None:
    _fuzz_cli(cli, seed_bytes, tmp_path, _examples(FUZZ_CLI_EXAMPLES))


@pytest.mark.slow
def test_fuzz_loaders_nightly(seed_bytes: dict[str, bytes], tmp_path: Path) -> None:
    _fuzz_loaders(seed_bytes, tmp_path, _examples(FUZZ_LOADER_EXAMPLES * FUZZ_NIGHTLY_FACTOR), fixed=False)


@pytest.mark.slow
def test_fuzz_cli_nightly(cli: Any, seed_bytes: dict[str, bytes], tmp_path: Path) -> None:
    _fuzz_cli(cli, seed_bytes, tmp_path, _examples(FUZZ_CLI_EXAMPLES * FUZZ_NIGHTLY_FACTOR), fixed=False)
