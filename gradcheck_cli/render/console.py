"""Consoles and progress, so commands never build rich objects themselves."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO

from rich.console import Console

# Width used when stdout is not a terminal (a pipe, a CI log): wide enough for the whole table.
PIPE_WIDTH = 160
# Width of a table written to a file (`format` table=PATH): a diff-friendly, fixed width.
FILE_WIDTH = 120


def make_console(file: IO[str] | None = None, *, width: int | None = None) -> Console:
    # Respects NO_COLOR and the terminal's own width (rich's detection); pipes get PIPE_WIDTH.
    target = file or sys.stdout
    if width is None and not target.isatty():
        width = PIPE_WIDTH
    return Console(file=target, width=width, highlight=False, soft_wrap=False)


@contextmanager
def progress_on_stderr(description: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr (drawn only on a terminal); yields an update(done, total) callback."""
    console = Console(file=sys.stderr)
    if not console.is_terminal:
        yield lambda done, total: None
        return
    # Only on a terminal: rich.progress pulls in live rendering and spinners, which a pipe or CI log
    # never draws.
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update
