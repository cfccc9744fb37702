"""The base of every closed set of choices (formats, modes, schemes, severities)."""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """A string enum that prints as its value, so that a choice reads the same in messages, JSON
    and help text (Python 3.10 has no ``enum.StrEnum``)."""

    def __str__(self) -> str:
        return str(self.value)
