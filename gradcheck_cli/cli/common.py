"""What every command does around its one library call: errors, exit codes, stderr, settings."""

from __future__ import annotations

import re
import sys
import traceback
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import typer

from gradcheck_cli.errors import GradcheckError, UsageError

if TYPE_CHECKING:
    from rich.console import Console

    from gradcheck_cli.cli.command import Given
    from gradcheck_cli.config import Settings
    from gradcheck_cli.options import ReportFormat, ReportTarget

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_USAGE = 2

_FIELD = re.compile(r"`([a-z][a-z0-9_]*)`")


def flag_text(text: str) -> str:
    """A library message with its option fields (`batch_size`) spelled as flags (--batch-size)."""
    from gradcheck_cli.cli.options import FLAG_OF_FIELD

    return _FIELD.sub(lambda match: FLAG_OF_FIELD.get(match.group(1), match.group(0)), text)


def fail(message: str, hint: str | None = None) -> typer.Exit:
    """Print a one-line error (and a hint) on stderr; return the Exit(2) to raise."""
    sys.stderr.write(f"error: {flag_text(message)}\n")
    if hint:
        sys.stderr.write(f"hint: {flag_text(hint)}\n")
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
        raise fail("out of memory while running the model", "use a smaller --batch-size with more --batches") from None


def settings(given: Given) -> Settings:
    """The config file's settings (none with ``isolated``) with the command line's over them."""
    from gradcheck_cli.config import Settings, load_settings, option_fields, settings_of

    configurable = option_fields()
    file_settings = Settings() if given.get("isolated") else load_settings(given.get("config"))
    return file_settings.merged(settings_of(**{k: v for k, v in given.values.items() if k in configurable}))


def report_targets(
    given: Given,
    output: Path | None,
    *,
    allowed: tuple[ReportFormat, ...],
    configured: tuple[ReportTarget, ...] | None = None,
) -> tuple[ReportTarget, ...]:
    """Where each report goes: ``--format FMT[=PATH]`` (or the config's list), table on stdout when
    neither names one, plus the JSON report in ``-o``. Refused before any model runs: a document
    format on stdout beside another format there (it would garble both)."""
    from gradcheck_cli.config import parse_report_target
    from gradcheck_cli.options import ReportFormat, ReportTarget

    texts: list[str] = given.get("format", [])
    if texts:
        targets = tuple(parse_report_target(text, where="--format", allowed=allowed) for text in texts)
        # A directory named on the command line must exist (a typo should not scatter folders);
        # the config file's directories are created when the report is written.
        for target in targets:
            parent = target.path.parent if target.path is not None else None
            if parent is not None and str(parent) and not parent.is_dir():
                raise UsageError(
                    f"cannot write {target.path}: the directory {parent} does not exist", hint="create it first"
                )
    else:
        targets = configured if configured else (ReportTarget(ReportFormat.TABLE),)
    if output is not None:
        targets = (*targets, ReportTarget(ReportFormat.JSON, output))
    to_stdout = [t.format for t in targets if t.path is None]
    documents = [f for f in to_stdout if f is not ReportFormat.TABLE and f is not ReportFormat.GITHUB]
    if documents and len(to_stdout) > 1:
        raise UsageError(
            f"{documents[0]} on stdout cannot share it with {len(to_stdout) - 1} other format(s)",
            hint=f"write it to a file: --format {documents[0]}=PATH",
        )
    return targets


def write_text(text: str, output: Path | None) -> None:
    """Data goes to stdout, or to a file (written whole, then renamed into place; its directory
    is created)."""
    if output is None:
        sys.stdout.write(text)
        return
    from gradcheck_cli.fsutil import atomic_write_text

    if str(output.parent):
        output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output, text)


def write_reports(
    targets: tuple[ReportTarget, ...],
    *,
    table: Callable[[Console], None],
    documents: Mapping[ReportFormat, Callable[[], str]],
) -> None:
    """Render each target: the table to a console (stdout's, or one writing the file), every other
    format as text (``documents`` holds a renderer for each format the command allows)."""
    from io import StringIO

    from gradcheck_cli.options import ReportFormat
    from gradcheck_cli.render.console import FILE_WIDTH, make_console

    for target in targets:
        if target.format is ReportFormat.TABLE:
            if target.path is None:
                table(make_console())
            else:
                buffer = StringIO()
                table(make_console(buffer, width=FILE_WIDTH))
                write_text(buffer.getvalue(), target.path)
        else:
            write_text(documents[target.format](), target.path)


R = TypeVar("R")


def with_flag_notes(report: R) -> R:
    """A report (probe, fold or reinit) whose notes and findings spell options as flags, as the user
    types them (the library names them by field)."""
    notes: tuple[str, ...] = getattr(report, "notes")  # noqa: B009 - every report record has notes
    typed = replace(report, notes=tuple(flag_text(note) for note in notes))  # type: ignore[type-var]
    findings = getattr(typed, "findings", None)
    if findings:
        typed = replace(
            typed,
            findings=tuple(  # type: ignore[type-var]
                replace(f, message=flag_text(f.message), advice=flag_text(f.advice) if f.advice else f.advice)
                for f in findings
            ),
        )
    return typed
