"""Seed files for every loader, the mutations applied to them, and a per-case time bound.

A *seed* is a small valid file plus the command line that reads it; ``{file}`` in the command
is replaced by the (mutated) file. Mutations are deterministic functions of the seed bytes and
an integer, so a failing case is reproduced from its name alone.
"""

from __future__ import annotations

import contextlib
import faulthandler
import random
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
# Wall-clock bound for one case (one in-process CLI run). Generous: the CI box is shared.
CASE_TIMEOUT_S = 60


@dataclass(frozen=True)
class Seed:
    name: str
    loader: str  # which loader the file exercises (RELIABILITY.md lists these)
    suffix: str
    build: Callable[[Path], bytes]  # writes nothing; returns the valid file's bytes
    argv: tuple[str, ...]  # '{file}' is the mutated file


def _sample(name: str) -> Callable[[Path], bytes]:
    return lambda _: (SAMPLES / name).read_bytes()


def _legacy_state_dict(_: Path) -> bytes:
    import io

    import torch
    from models import relu_mlp  # type: ignore[import-not-found]  # samples/ is on sys.path (conftest)

    torch.manual_seed(0)
    buffer = io.BytesIO()
    torch.save(relu_mlp().state_dict(), buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


def _safetensors_mlp(_: Path) -> bytes:
    import torch
    from models import relu_mlp  # type: ignore[import-not-found]
    from safetensors.torch import save

    torch.manual_seed(0)
    return bytes(save({k: v.contiguous() for k, v in relu_mlp().state_dict().items()}))


def _onnx_mlp(_: Path) -> bytes:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32) * 0.2, "w1"),
        numpy_helper.from_array(np.zeros(16, np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((4, 16)).astype(np.float32) * 0.3, "w2"),
        numpy_helper.from_array(np.zeros(4, np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["a"], name="relu1"),
        helper.make_node("Gemm", ["a", "w2", "b2"], ["y"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def onnx_mlp_bytes() -> bytes:
    return _onnx_mlp(Path("."))


def _input_pt(_: Path) -> bytes:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(torch.randn(8, 32, generator=torch.Generator().manual_seed(0)), buffer)
    return buffer.getvalue()


def _target_pt(_: Path) -> bytes:
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(0)), buffer)
    return buffer.getvalue()


def _input_npy(_: Path) -> bytes:
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, np.random.default_rng(0).standard_normal((8, 32)).astype(np.float32))
    return buffer.getvalue()


def _input_npz(_: Path) -> bytes:
    import io

    import numpy as np

    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    np.savez(buffer, rng.standard_normal((8, 32)).astype(np.float32))
    return buffer.getvalue()


def _config(_: Path) -> bytes:
    return (
        b'[tool.gradcheck]\nfail-on = "error"\nselect = ["GC1", "GC2"]\nignore = ["GC203"]\n\n'
        b'[tool.gradcheck.rules]\ndead-relu = { threshold = 0.5, severity = "warning" }\n'
    )


PT2 = str(SAMPLES / "relu_healthy.pt2")
SEEDS: tuple[Seed, ...] = (
    Seed(
        "torch_zip_state_dict",
        "torch zip",
        ".pt",
        _sample("sigmoid_saturated.pt"),
        ("inspect", "{file}", "--arch", str(SAMPLES / "models.py") + ":sigmoid_mlp"),
    ),
    Seed(
        "torch_zip_checkpoint",
        "torch zip",
        ".ckpt",
        _sample("relu_healthy.ckpt"),
        ("inspect", "{file}", "--arch", str(SAMPLES / "models.py") + ":relu_mlp"),
    ),
    Seed(
        "torch_legacy_state_dict",
        "torch legacy",
        ".pt",
        _legacy_state_dict,
        ("inspect", "{file}", "--arch", str(SAMPLES / "models.py") + ":relu_mlp"),
    ),
    Seed("torchscript", "TorchScript", ".pt", _sample("relu_dead.torchscript.pt"), ("inspect", "{file}")),
    Seed("exported_program", ".pt2", ".pt2", _sample("relu_healthy.pt2"), ("inspect", "{file}")),
    Seed(
        "safetensors",
        "safetensors",
        ".safetensors",
        _safetensors_mlp,
        ("inspect", "{file}", "--arch", str(SAMPLES / "models.py") + ":relu_mlp"),
    ),
    Seed("onnx", "ONNX", ".onnx", _onnx_mlp, ("inspect", "{file}")),
    Seed("input_pt", "probe input .pt", ".pt", _input_pt, ("inspect", PT2, "--input", "{file}")),
    Seed("input_npy", "probe input .npy", ".npy", _input_npy, ("inspect", PT2, "--input", "{file}")),
    Seed("input_npz", "probe input .npz", ".npz", _input_npz, ("inspect", PT2, "--input", "{file}")),
    Seed("target_pt", "probe target .pt", ".pt", _target_pt, ("inspect", PT2, "--target", "{file}")),
    Seed("config_toml", "config file", ".toml", _config, ("check", PT2, "--config", "{file}")),
)
SEEDS_BY_NAME = {seed.name: seed for seed in SEEDS}


# --- mutations: (seed bytes, n) -> bytes ------------------------------------------------------


def truncate(data: bytes, n: int) -> bytes:
    """Cut at one of a few fractions of the length (n picks which), never the whole file."""
    fractions = (0.01, 0.1, 0.33, 0.5, 0.9, 0.99)
    return data[: min(len(data) - 1, int(len(data) * fractions[n % len(fractions)]))]


def flip_bytes(data: bytes, n: int) -> bytes:
    rng = random.Random(n)
    out = bytearray(data)
    for _ in range(rng.choice((1, 2, 8))):
        position = rng.randrange(len(out))
        out[position] ^= 1 << rng.randrange(8)
    return bytes(out)


def random_bytes(data: bytes, n: int) -> bytes:
    rng = random.Random(n)
    return bytes(rng.randrange(256) for _ in range(rng.choice((1, 7, 64, 4096))))


def wrong_magic(data: bytes, n: int) -> bytes:
    magic = (b"\x00\x00\x00\x00", b"GIF89a", b"\x7fELF", b'{"a":')[n % 4]
    return magic + data[len(magic) :]


def empty(data: bytes, n: int) -> bytes:
    return b""


MUTATIONS: dict[str, Callable[[bytes, int], bytes]] = {
    "truncate": truncate,
    "flip": flip_bytes,
    "random": random_bytes,
    "wrong_magic": wrong_magic,
    "empty": empty,
}


class Hang(BaseException):
    """A case ran past its time bound. A BaseException, so that a loader's ``except Exception``
    cannot turn a hang into an ordinary load error and hide it."""


@contextlib.contextmanager
def time_bound(seconds: int = CASE_TIMEOUT_S) -> Iterator[None]:
    """Raise :class:`Hang` in the main thread after ``seconds`` (SIGALRM; POSIX only)."""

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"the case ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    # Backstop for a hang inside C code, where no Python signal handler runs: dump every
    # thread's stack and end the test process (the run fails loudly instead of never ending).
    faulthandler.dump_traceback_later(seconds * 3, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
