"""Errors that reach the user.

A :class:`GradcheckError` is a problem with what the user gave us (a file, a flag, a
config value): the CLI prints ``error: <message>`` and ``hint: <hint>`` on stderr and
exits 2, without a traceback unless `debug`. Anything else that escapes is a bug in
gradcheck and keeps its traceback.
"""

from __future__ import annotations


class GradcheckError(Exception):
    """A user-facing error: what was wrong, and how to fix it."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if self.hint is None else f"{self.message} ({self.hint})"


class UsageError(GradcheckError):
    """An option or argument that cannot be used as given."""


class LoadError(GradcheckError):
    """A model, input or target file that cannot be loaded."""


class UntrustedPickleError(LoadError):
    """The file needs full unpickling, which runs code; the user did not opt in."""


class ProbeError(GradcheckError):
    """The probe batch could not be run through the model."""


class ConfigError(GradcheckError):
    """A configuration file or value that is not valid."""


class VerificationError(GradcheckError):
    """A rewrite did not reproduce the original outputs within tolerance."""


class MissingDependencyError(GradcheckError):
    """An optional package is needed for what was asked."""

    def __init__(self, package: str, *, purpose: str, extra: str | None = None) -> None:
        install = f"pip install 'gradcheck-cli[{extra}]'" if extra else f"pip install {package}"
        super().__init__(
            f"{purpose} needs the package '{package}', which is not installed", hint=f"install it with: {install}"
        )
        self.package = package


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one line for a user-facing message: its first line, at most ``limit``
    characters, or its type's name when it has no text."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:limit]
