"""How a command gets its flags: the groups it lists are added to its signature for typer, and the
values given on the command line reach it as one :class:`Given`, keyed by field."""

from __future__ import annotations

import functools
import inspect
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, get_type_hints

import typer

from gradcheck_cli.cli.common import user_errors
from gradcheck_cli.cli.options import Flag, Group

ModelArg = Annotated[
    Path,
    typer.Argument(
        help="Model file: .pt2, TorchScript, torch.save checkpoint, safetensors, ONNX, or a transformers "
        "model directory (detected from the content).",
        show_default=False,
        metavar="MODEL",
    ),
]

ReportOutput = Annotated[
    Path | None,
    typer.Option(
        "--output",
        "-o",
        help="Also write the JSON report to this file (as --format json=FILE).",
        metavar="FILE",
        show_default=False,
        rich_help_panel="Report",
    ),
]
ModelOutput = Annotated[
    Path | None,
    typer.Option(
        "--output",
        "-o",
        help="Where to write the rewritten model; its extension chooses the format unless --to does.",
        metavar="FILE",
        show_default=False,
        rich_help_panel="Writing",
    ),
]


@dataclass(frozen=True)
class Given:
    """The options set on the command line (a flag left out is absent, so that the config file
    or the default applies), by field name."""

    values: dict[str, Any] = field(default_factory=dict)

    def get(self, name: str, default: Any = None) -> Any:
        return self.values.get(name, default)


def _parameter(flag: Flag, group: Group) -> inspect.Parameter:
    names = (flag.name, flag.short) if flag.short else (flag.name,)
    info = typer.Option(
        *names,
        help=flag.help_text(),
        metavar=flag.metavar,
        show_default=False,
        rich_help_panel=group.title,
        min=flag.minimum,
    )
    if flag.is_flag:
        return inspect.Parameter(
            flag.field, inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[bool, info]
        )
    return inspect.Parameter(
        flag.field, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[flag.kind | None, info]
    )


# Libraries that talk through logging; gradcheck's own messages are findings, notes and errors.
_CHATTY_LOGGERS = ("transformers", "torch", "torchvision", "timm", "onnxscript", "accelerate", "huggingface_hub")


@contextmanager
def third_party_quiet(quiet: bool) -> Iterator[None]:
    """Silence the warnings and log lines of the libraries a command runs (gradcheck itself warns
    through its reports, never through ``warnings``); ``--debug`` keeps them."""
    if not quiet:
        yield
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def command(*groups: Group) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give the decorated function (which takes ``given: Given`` after its own parameters) every
    flag of ``groups``; a flag's value reaches it converted, under the flag's field name."""

    def decorate(function: Callable[..., None]) -> Callable[..., None]:
        own = [p for p in inspect.signature(function, eval_str=True).parameters.values() if p.name != "given"]
        hints = get_type_hints(function, include_extras=True)
        added = [_parameter(flag, group) for group in groups for flag in group.flags]
        taken = {p.name for p in own}
        clash = [p.name for p in added if p.name in taken]
        assert not clash, f"{function.__name__} declares {clash} itself and through a group"

        @functools.wraps(function)
        def run(**kwargs: Any) -> None:
            debug = bool(kwargs.get("debug"))
            # Converting a flag can fail (a bad shape): that is a usage error like any other.
            with user_errors(debug), third_party_quiet(not debug):
                values: dict[str, Any] = {}
                for group in groups:
                    given: dict[str, Any] = {}
                    for flag in group.flags:
                        value = kwargs.pop(flag.field)
                        if value is None or value is False or value == []:
                            continue  # not given: the config file or the default decides
                        given[flag.field] = flag.convert(value) if flag.convert is not None else value
                    values.update(group.finish(given) if group.finish is not None else given)
                function(**kwargs, given=Given(values))

        parameters = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in own] + added
        run.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
        run.__annotations__ = {p.name: p.annotation for p in parameters}
        del run.__wrapped__  # typer must read the signature above, not the function's own
        return run

    return decorate
