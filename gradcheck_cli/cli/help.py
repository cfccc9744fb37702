"""Plain help text, grouped by concern: no markup is interpreted (``[plot]`` and ``[default: 1]`` are
printed as written), words are never split at their hyphens, and arguments read as their names."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from typer.core import TyperArgument, TyperCommand

# typer runs on its own copy of click: extend the classes it uses, not the click package's.
_Context: Any = TyperCommand.context_class
_Formatter: Any = _Context.formatter_class

# textwrap breaks lines after hyphens ("gradcheck-" / "cli[plot]", "--batch-" / "size"); a
# non-breaking hyphen stands in for each one while the text is wrapped.
_NON_BREAKING_HYPHEN = "\u2011"


class HelpFormatter(_Formatter):  # type: ignore[misc]
    def write_dl(self, rows: Iterable[tuple[str, str]], col_max: int = 30, col_spacing: int = 2) -> None:
        start = len(self.buffer)
        super().write_dl([(term, text.replace("-", _NON_BREAKING_HYPHEN)) for term, text in rows], col_max, col_spacing)
        self.buffer[start:] = [part.replace(_NON_BREAKING_HYPHEN, "-") for part in self.buffer[start:]]


class HelpContext(_Context):  # type: ignore[misc]
    formatter_class = HelpFormatter


class NamedArgument(TyperArgument):
    """An argument shown as its metavar alone (MODEL, MODEL...), as usage lines conventionally do."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return None

    def _usage_display_name(self) -> str:
        return self.display_name_raw + ("" if self.nargs == 1 or self.display_name_raw.endswith("...") else "...")

    def _rich_display_name(self) -> str:
        return self.display_name_raw


class GroupedCommand(TyperCommand):
    """A command whose options are listed in one section per group (its ``rich_help_panel``)."""

    context_class = HelpContext

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if isinstance(param, TyperArgument):
                param.__class__ = NamedArgument

    def format_options(self, ctx: Any, formatter: Any) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                title = "Arguments"
            else:
                title = getattr(param, "rich_help_panel", None) or "Options"
            sections.setdefault(title, []).append(record)
        for title, rows in sections.items():
            with formatter.section(title):
                formatter.write_dl(rows)
