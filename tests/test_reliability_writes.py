"""Writes: the input is never modified; an output appears whole or not at all (SIGKILL mid-write,
a full disk, a permission error); an existing output needs --force; concurrent writers never
produce a corrupt file.

The trial counts are constants that RELIABILITY.md quotes (tests/test_reliability_doc.py checks).
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from tests._mutate import SAMPLES, onnx_mlp_bytes
from tests.conftest import ROOT, one_line_error

KILL_TRIALS = 20  # SIGKILL during a large streamed write (atomic_path, no torch: fast to start)
KILL_TRIALS_TORCH = 3  # SIGKILL during torch.save of a ~256 MB checkpoint through save_model
CONCURRENT_TRIALS = 10  # two processes writing different 32 MB files to one output name
MODELS = str(SAMPLES / "models.py")

# (command, sample, extra arguments, output suffix): every rewrite command on every format it writes.
REWRITES = [
    ("reinit", "relu_healthy.pt2", (), ".pt2"),
    ("reinit", "relu_healthy.ckpt", ("--arch", f"{MODELS}:relu_mlp"), ".ckpt"),
    ("reinit", "sigmoid_saturated.pt", ("--arch", f"{MODELS}:sigmoid_mlp"), ".pt"),
    ("reinit", "relu_dead.torchscript.pt", (), ".pt"),
    ("reinit", "mlp.onnx", (), ".onnx"),
    ("fold-bn", "cnn_batchnorm.pt2", (), ".pt2"),
    ("fold-bn", "cnn_batchnorm.safetensors", ("--arch", f"{MODELS}:small_cnn"), ".safetensors"),
]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _input_copy(tmp_path: Path, sample: str) -> Path:
    src = tmp_path / "in" / sample
    src.parent.mkdir()
    if sample == "mlp.onnx":
        src.write_bytes(onnx_mlp_bytes())
    else:
        shutil.copyfile(SAMPLES / sample, src)
    return src


def _leftovers(directory: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name not in keep)


@pytest.mark.parametrize(
    ("command", "sample", "extra", "suffix"), REWRITES, ids=[f"{c}-{s}" for c, s, _, _ in REWRITES]
)
def test_input_never_modified(
    cli: Any, tmp_path: Path, command: str, sample: str, extra: tuple[str, ...], suffix: str
) -> None:
    src = _input_copy(tmp_path, sample)
    before, mtime = _digest(src), src.stat().st_mtime_ns
    out = tmp_path / f"out{suffix}"
    code, _, stderr = cli(command, str(src), "-o", str(out), *extra)
    assert code == 0, stderr
    assert out.is_file()
    # Refused: the output is the input (also through a symlink), even with --force.
    link = tmp_path / f"link{suffix}"
    link.symlink_to(src)
    for target in (src, link):
        code, _, stderr = cli(command, str(src), "-o", str(target), "--force", *extra)
        assert code == 2
        one_line_error(stderr)
    # A hard link to the input as the output: the rename replaces the name, not the input's inode.
    hard = tmp_path / f"hard{suffix}"
    os.link(src, hard)
    code, _, stderr = cli(command, str(src), "-o", str(hard), "--force", *extra)
    assert code in (0, 2), stderr
    code, _, stderr = cli(command, str(src), "--dry-run", *extra)
    assert code == 0, stderr
    assert _digest(src) == before
    assert src.stat().st_mtime_ns == mtime
    assert _leftovers(src.parent, {src.name}) == []


@pytest.mark.parametrize("command", ["reinit", "fold-bn"])
def test_existing_output_needs_force(cli: Any, tmp_path: Path, command: str) -> None:
    src = _input_copy(tmp_path, "cnn_batchnorm.pt2")
    out = tmp_path / "out.pt2"
    out.write_bytes(b"precious")
    code, _, stderr = cli(command, str(src), "-o", str(out))
    assert code == 2
    one_line_error(stderr)
    assert "--force" in stderr
    assert out.read_bytes() == b"precious"
    code, _, stderr = cli(command, str(src), "-o", str(out), "--force")
    assert code == 0, stderr
    assert out.read_bytes() != b"precious"
    assert _leftovers(tmp_path, {"in", "out.pt2"}) == []


def _raise(err: int) -> Any:
    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(err, os.strerror(err))

    return fail


# Where a write can fail: creating the scratch directory that holds the temporary file (every
# writer makes one beside the output, so that the file carries its final name: fsutil.atomic_path),
# flushing the file, or renaming it into place.
FAULTS = [
    ("tempfile.mkdtemp", errno.EACCES),
    ("os.fsync", errno.ENOSPC),
    ("os.replace", errno.ENOSPC),
    ("os.replace", errno.EACCES),
]


FAULT_CASES = [(*rewrite, where, err) for rewrite in REWRITES for where, err in FAULTS]


@pytest.mark.parametrize(
    ("command", "sample", "extra", "suffix", "where", "err"),
    FAULT_CASES,
    ids=[f"{c}-{s}-{w}-{errno.errorcode[e]}" for c, s, _, _, w, e in FAULT_CASES],
)
def test_failed_write_leaves_nothing(
    cli: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    command: str,
    sample: str,
    extra: tuple[str, ...],
    suffix: str,
    where: str,
    err: int,
) -> None:
    src = _input_copy(tmp_path, sample)
    before = _digest(src)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / f"model{suffix}"
    module, name = where.split(".")
    import tempfile

    monkeypatch.setattr({"os": os, "tempfile": tempfile}[module], name, _raise(err))
    code, _, stderr = cli(command, str(src), "-o", str(out), *extra)
    monkeypatch.undo()
    assert code == 2, stderr
    one_line_error(stderr)
    assert os.strerror(err) in stderr
    assert _leftovers(out_dir, set()) == [], "a failed write left files behind"
    assert _digest(src) == before


# --- SIGKILL in the middle of a write ------------------------------------------------------------

STREAM_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from gradcheck_cli.fsutil import atomic_write_with

    def write(tmp):
        with open(tmp, "wb") as handle:
            for _ in range(512):  # 512 MiB in 1 MiB chunks, flushed: slow enough to be caught
                handle.write(b"x" * (1 << 20))
                handle.flush()
                time.sleep(0.001)

    atomic_write_with(Path(sys.argv[1]), write)
""")

TORCH_WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch
    from gradcheck_cli.model.formats import ModelFormat
    from gradcheck_cli.model.handle import LoadedModel
    from gradcheck_cli.model.torch_save import save_model

    module = torch.nn.Linear(8192, 8192)  # 256 MiB of float32 weights
    out = Path(sys.argv[1])
    print("ready", flush=True)
    save_model(LoadedModel(path=out, format=ModelFormat.TORCH_ZIP, module=module), module, out)
""")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _kill_mid_write(script: str, out: Path, rng: random.Random, *, wait_ready: bool) -> bool:
    """Start a writer, SIGKILL it at a random moment after its temporary file appeared; return
    whether the kill landed mid-write (no output yet). The output must never be partial."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(out)],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        if wait_ready:
            assert proc.stdout is not None
            proc.stdout.readline()
        deadline = time.monotonic() + 120
        while not any(out.parent.glob(f".{out.name}.*")) and proc.poll() is None:
            assert time.monotonic() < deadline, "the writer never started writing"
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.3))
        mid_write = not out.exists() and proc.poll() is None
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    if out.exists():
        # Killed after the rename: then the file must be the whole file.
        assert not mid_write
    return mid_write


def test_sigkill_during_streamed_write_leaves_no_partial_output(tmp_path: Path) -> None:
    rng = random.Random(0)
    landed = 0
    for trial in range(KILL_TRIALS):
        out = tmp_path / f"trial{trial}" / "model.bin"
        out.parent.mkdir()
        landed += _kill_mid_write(STREAM_WRITER, out, rng, wait_ready=False)
        if out.exists():
            assert out.stat().st_size == 512 << 20
    # The test means something only if most kills hit a write in progress.
    assert landed >= KILL_TRIALS // 2, f"only {landed} of {KILL_TRIALS} kills landed mid-write"


def test_sigkill_during_torch_save_leaves_no_partial_output(tmp_path: Path) -> None:
    import torch

    rng = random.Random(1)
    landed = 0
    for trial in range(KILL_TRIALS_TORCH):
        out = tmp_path / f"trial{trial}" / "model.pt"
        out.parent.mkdir()
        landed += _kill_mid_write(TORCH_WRITER, out, rng, wait_ready=True)
        if out.exists():
            state = torch.load(out, weights_only=True)
            assert state["weight"].shape == (8192, 8192)
    assert landed >= 1


# --- concurrent writers ---------------------------------------------------------------------------

CONCURRENT_WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from gradcheck_cli.fsutil import atomic_write_bytes

    fill = sys.argv[2].encode()
    atomic_write_bytes(Path(sys.argv[1]), fill * (32 << 20))
""")


def test_concurrent_writers_never_corrupt(tmp_path: Path) -> None:
    size = 32 << 20
    whole = {hashlib.sha256(c * size).hexdigest() for c in (b"a", b"b")}
    for trial in range(CONCURRENT_TRIALS):
        out = tmp_path / f"trial{trial}" / "model.bin"
        out.parent.mkdir()
        procs = [
            subprocess.Popen([sys.executable, "-c", CONCURRENT_WRITER, str(out), fill], env=_env())
            for fill in ("a", "b")
        ]
        assert [p.wait(timeout=120) for p in procs] == [0, 0]
        assert _digest(out) in whole, "two writers interleaved into one file"
        assert _leftovers(out.parent, {"model.bin"}) == []


def test_concurrent_reinit_commands_leave_a_loadable_file(tmp_path: Path) -> None:
    src = _input_copy(tmp_path, "relu_healthy.pt2")
    out = tmp_path / "out.pt2"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "gradcheck_cli", "reinit", str(src), "-o", str(out), "--force", "--seed", str(seed)],
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    from gradcheck_cli.model.torch_load import model_from_path

    model_from_path(out)  # whole, loadable
    assert _leftovers(tmp_path, {"in", "out.pt2"}) == []
