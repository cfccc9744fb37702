"""Detect what a model file holds from its bytes, never from its extension."""

from __future__ import annotations

import stat
import struct
import zipfile
from pathlib import Path

from gradcheck_cli.choice import Choice
from gradcheck_cli.errors import LoadError, first_line

# Largest safetensors header we accept before treating the file as something else.
_SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024


class ModelFormat(Choice):
    EXPORTED_PROGRAM = "exported_program"  # torch.export.save (.pt2)
    TORCHSCRIPT = "torchscript"  # torch.jit.save
    TORCH_ZIP = "torch_zip"  # torch.save, zip container: a state_dict or a pickled module
    TORCH_LEGACY = "torch_legacy"  # torch.save(_use_new_zipfile_serialization=False) or plain pickle
    SAFETENSORS = "safetensors"
    ONNX = "onnx"
    TRANSFORMERS_DIRECTORY = "transformers_directory"  # config.json + weights (safetensors, sharded too)

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self]


_DESCRIPTIONS = {
    ModelFormat.EXPORTED_PROGRAM: "a torch.export program (.pt2)",
    ModelFormat.TORCHSCRIPT: "a TorchScript archive",
    ModelFormat.TORCH_ZIP: "a torch.save checkpoint",
    ModelFormat.TORCH_LEGACY: "a legacy (non-zip) torch.save checkpoint or pickle",
    ModelFormat.SAFETENSORS: "a safetensors file",
    ModelFormat.ONNX: "an ONNX model",
    ModelFormat.TRANSFORMERS_DIRECTORY: "a transformers model directory",
}

SUPPORTED_HINT = (
    "gradcheck reads torch.export programs (.pt2), TorchScript archives, torch.save "
    "checkpoints (state_dict with `arch`, or a pickled module with `trust_pickle`), "
    "safetensors files (with `arch`) and ONNX models"
)


def is_onnx(path: Path) -> bool:
    """The one place that decides whether a model takes the ONNX path or the PyTorch path."""
    return detect_format(path) is ModelFormat.ONNX


def detect_format(path: Path) -> ModelFormat:
    """Classify ``path`` by content. Raises :class:`LoadError` when it is none of ours."""
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelFormat.TRANSFORMERS_DIRECTORY
        raise LoadError(
            f"{path} is a directory, not a model file",
            hint="pass the model file inside it (or a transformers directory with config.json)",
        )
    check_regular_file(path, what="model file")
    try:
        with path.open("rb") as handle:
            head = handle.read(16)
    except OSError as exc:
        raise LoadError(f"{path}: cannot be read ({exc.strerror})", hint="check its permissions") from exc
    if not head:
        raise LoadError(f"{path} is empty", hint="the file was probably not written completely")
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return _classify_zip(path)
    if _looks_like_safetensors(path, head):
        return ModelFormat.SAFETENSORS
    if head[:1] == b"\x80":  # pickle protocol 2+ opcode: legacy torch.save or a bare pickle
        return ModelFormat.TORCH_LEGACY
    if head[:1] == b"\x08":  # protobuf field 1 (ir_version, varint): how every ModelProto starts
        return ModelFormat.ONNX
    raise LoadError(f"{path}: unrecognised file format (starts with {head[:8]!r})", hint=SUPPORTED_HINT)


def check_regular_file(path: Path, *, what: str) -> None:
    """Refuse anything but a regular file before opening it: a FIFO would block the read forever,
    /dev/zero never ends, a symlink loop cannot be followed."""
    try:
        info = path.stat()
    except FileNotFoundError:
        dangling = " (a symbolic link to a missing file)" if path.is_symlink() else ""
        raise LoadError(f"{path}: no such file{dangling}", hint="check the path") from None
    except OSError as exc:  # ELOOP (symlink loop), ENAMETOOLONG, EACCES on a directory on the way
        raise LoadError(
            f"{path}: cannot be opened ({exc.strerror or exc})", hint="check the path and its symbolic links"
        ) from None
    if stat.S_ISDIR(info.st_mode):
        raise LoadError(f"{path} is a directory, not a {what}", hint=f"pass the {what} inside it")
    if not stat.S_ISREG(info.st_mode):
        raise LoadError(f"{path} is not a regular file (a device, pipe or socket)", hint=f"pass a {what} saved on disk")


def _classify_zip(path: Path) -> ModelFormat:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    # zipfile fails in many ways on a damaged archive: BadZipFile, EOFError, ValueError (undecodable
    # names), NotImplementedError (an unknown zip version), RuntimeError (encryption) ...
    except Exception as exc:
        raise LoadError(
            f"{path}: looks like a zip-based torch file but the archive is damaged ({first_line(exc, 200)})",
            hint="the file is probably truncated; save or download it again",
        ) from exc
    stripped = {name.split("/", 1)[1] if "/" in name else name for name in names}
    if (
        "archive_format" in stripped
        or "models/model.json" in stripped
        or any(name.startswith("models/") and name.endswith(".json") for name in stripped)
        or any(name.startswith("serialized_exported_program") for name in stripped)
    ):
        return ModelFormat.EXPORTED_PROGRAM
    if any(name.startswith("code/") for name in stripped) or "constants.pkl" in stripped:
        return ModelFormat.TORCHSCRIPT
    if "data.pkl" in stripped:
        return ModelFormat.TORCH_ZIP
    raise LoadError(f"{path}: a zip archive, but not one written by torch", hint=SUPPORTED_HINT)


def _looks_like_safetensors(path: Path, head: bytes) -> bool:
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    size = path.stat().st_size
    return 2 <= header_len <= min(size - 8, _SAFETENSORS_MAX_HEADER) and head[8:9] == b"{"
