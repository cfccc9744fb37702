"""What every command does around its one library call: errors, exit codes, stderr."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import typer

from gradcheck_cli.errors import GradcheckError

T = TypeVar("T")

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_USAGE = 2


def fail(message: str, hint: str | None = None) -> typer.Exit:
    """Print a one-line error (and a hint) on stderr; return the Exit(2) to raise."""
    sys.stderr.write(f"error: {message}\n")
    if hint:
        sys.stderr.write(f"hint: {hint}\n")
    return typer.Exit(EXIT_USAGE)


@contextmanager
def user_errors(debug: bool) -> Iterator[None]:
    """Turn GradcheckError (and Ctrl-C) into exit 2 with one line; keep tracebacks for --debug."""
    try:
        yield
    except GradcheckError as exc:
        if debug:
            traceback.print_exc()
        raise fail(exc.message, exc.hint) from None
    except KeyboardInterrupt:
        raise fail("interrupted", "nothing was written") from None
    except OSError as exc:
        # A file system error no loader or writer turned into a GradcheckError (a disk that
        # filled up, a permission denied): still one line, never a traceback without --debug.
        if debug:
            traceback.print_exc()
        where = f" ({exc.filename})" if exc.filename else ""
        raise fail(f"{exc.strerror or exc}{where}", "check free disk space, permissions and paths") from None
    except MemoryError:
        if debug:
            traceback.print_exc()
        raise fail("out of memory while running the model",
                   "use a smaller --batch-size with more --batches") from None


def call(debug: bool, fn: Callable[[], T]) -> T:
    with user_errors(debug):
        return fn()


def parse_range(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    parts = text.split(",")
    try:
        low, high = (float(p) for p in parts)
    except ValueError:
        raise fail(f"--input-range {text!r} is not LOW,HIGH", "e.g. --input-range 0,30522") from None
    return low, high


def write_text(text: str, output: Path | None) -> None:
    """Data goes to stdout, or to --output (written whole, then renamed into place)."""
    if output is None:
        sys.stdout.write(text)
        return
    from gradcheck_cli.fsutil import atomic_write_text

    atomic_write_text(output, text)
