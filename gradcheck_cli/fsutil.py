"""Writing files so that a reader never sees half of one."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from gradcheck_cli.errors import GradcheckError


def check_writable_output(path: Path, *, force: bool, source: Path | None = None) -> None:
    """Refuse to overwrite without `force`, and never overwrite the input itself."""
    if source is not None and path.exists() and source.exists() and path.resolve() == source.resolve():
        raise GradcheckError(
            f"the output {path} is the input file; gradcheck never modifies its input",
            hint="choose another output path",
        )
    if path.exists() and not force:
        raise GradcheckError(f"{path} already exists", hint="pass `force` to overwrite it")
    if path.exists() and path.is_dir():
        raise GradcheckError(f"{path} is a directory", hint="give a file path for the output")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise GradcheckError(f"cannot write {path}: the directory {parent} does not exist", hint="create it first")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path with ``path``'s own name, in a private scratch directory beside it.

    Renamed onto ``path`` only if the block succeeds. The scratch directory lives in the
    destination directory so that the final rename is atomic (same filesystem); a crash or an
    exception leaves at most a hidden scratch directory, never a partial file under the output
    name. The temporary file carries the final name because writers record it: torch.save and
    torch.jit.save name the archive's root folder after the file, and torch.export.save picks
    its layout from the suffix. The file gets the mode a plain ``open()`` would give it (the
    umask's), whatever mode the writer created it with.
    """
    parent = path.parent if str(path.parent) else Path(".")
    try:
        scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=parent))
    except OSError as exc:
        raise write_error(path, exc) from exc
    tmp = scratch / path.name
    try:
        yield tmp
        publish(tmp, path)
    except OSError as exc:
        raise write_error(path, exc) from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _fsync_directory(parent)


def publish(tmp: Path, path: Path) -> None:
    """Flush ``tmp`` to disk, give it the umask's mode, and rename it onto ``path``."""
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.chmod(tmp, 0o666 & ~_current_umask())
    os.replace(tmp, path)


def write_error(path: Path, exc: OSError) -> GradcheckError:
    """The one-line error for a failed write (disk full, permission denied, ...)."""
    return GradcheckError(
        f"could not write {path}: {exc.strerror or exc}",
        hint="check free disk space and permissions; nothing was written",
    )


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (best effort: not every filesystem lets a directory be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_with(path: Path, writer: Callable[[Path], None]) -> None:
    """Let ``writer`` produce the file at a temporary path, then move it into place."""
    with atomic_path(path) as tmp:
        writer(tmp)
