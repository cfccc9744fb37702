"""The ``gradcheck`` command. Commands are registered here; each lives in its own *_cmd.py.

Nothing here imports torch, onnx or rich's heavier parts: ``gradcheck --help`` must stay instant.
"""

from __future__ import annotations

from typing import Annotated

import typer

from gradcheck_cli import __version__
from gradcheck_cli.cli.help import GroupedCommand

app = typer.Typer(
    name="gradcheck",
    help="Gradient-health diagnostics for saved PyTorch and ONNX models.\n\n"
    "Exit codes: 0 success, 1 findings at or above --fail-on (check) or a failed verification, "
    "2 usage, config or load error.",
    no_args_is_help=True,
    add_completion=False,
    # Help strings are printed as written: no rich markup ([plot] and [default: ...] stay literal).
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gradcheck {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool | None, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = None,
) -> None:
    """Gradient-health diagnostics for saved PyTorch and ONNX models."""


from gradcheck_cli.cli import inspect_cmd  # noqa: E402 - commands register after the app exists

app.command("inspect", cls=GroupedCommand)(inspect_cmd.inspect)

from gradcheck_cli.cli import check_cmd  # noqa: E402

app.command("check", cls=GroupedCommand)(check_cmd.check)

from gradcheck_cli.cli import reinit_cmd  # noqa: E402

app.command("reinit", cls=GroupedCommand)(reinit_cmd.reinit)

from gradcheck_cli.cli import fold_cmd  # noqa: E402

app.command("fold-bn", cls=GroupedCommand)(fold_cmd.fold_bn)


def main() -> None:
    app()
