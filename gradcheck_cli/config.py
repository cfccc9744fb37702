"""Configuration for ``gradcheck check``: defaults < ``[tool.gradcheck]`` < CLI flags.

The file is ``--config FILE`` (a pyproject.toml, or a gradcheck.toml whose top level is the
``[tool.gradcheck]`` table), else the nearest pyproject.toml with a ``[tool.gradcheck]`` table,
searched upward from the working directory (as ruff does: a pyproject.toml without the table
is passed over). Keys are kebab-case (snake_case is accepted too). Every unknown key and every
bad value is a :class:`ConfigError` naming the key, so a typo never silently turns a rule off.

    [tool.gradcheck]
    fail-on = "error"
    ignore = ["init-scale"]
    arch = "models.py:build"          # relative paths are relative to the config file
    input-shape = ["8,32"]
    seed = 0

    [tool.gradcheck.rules.dead-relu]  # or [tool.gradcheck.rules.GC101]
    threshold = 0.3
    severity = "warning"
    ignore-layers = ["head.*"]
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from gradcheck_cli.errors import ConfigError
from gradcheck_cli.probe.options import LossKind, Mode
from gradcheck_cli.records import Severity
from gradcheck_cli.rules import RuleOverride, configure

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 only
    import tomli as tomllib

T = TypeVar("T")
E = TypeVar("E", bound=Enum)

TABLE = "tool.gradcheck"


class OutputFormat(str, Enum):
    """What ``check`` writes: a closed set (docs/ci.md describes each)."""

    TABLE = "table"
    JSON = "json"
    MARKDOWN = "markdown"
    JUNIT = "junit"
    GITHUB = "github"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class OutputTarget:
    """One requested output: a format, to stdout (path None) or to a file."""

    format: OutputFormat
    path: Path | None = None


def parse_output(text: str, *, where: str = "--format", base: Path | None = None) -> OutputTarget:
    """'junit' or 'junit=reports/gradcheck.xml' (a relative path is taken from ``base``)."""
    name, sep, path_text = text.partition("=")
    try:
        fmt = OutputFormat(name.strip().lower())
    except ValueError:
        choices = ", ".join(f.value for f in OutputFormat)
        raise ConfigError(
            f"{where}: unknown format {name!r}",
            hint=f"choose from {choices}, optionally with =PATH, e.g. junit=gradcheck.xml",
        ) from None
    if sep and not path_text.strip():
        raise ConfigError(f"{where}: {text!r} has '=' but no path", hint="e.g. junit=gradcheck.xml")
    path = Path(path_text.strip()) if sep else None
    if path is not None and base is not None and not path.is_absolute():
        path = base / path
    return OutputTarget(format=fmt, path=path)


@dataclass(frozen=True)
class ProbeSettings:
    """How to load and probe each model; None means "not set here" (the default applies)."""

    arch: str | None = None
    arch_kwargs: dict[str, Any] | None = None
    non_strict: bool | None = None
    trust_pickle: bool | None = None
    device: str | None = None
    input_file: Path | None = None
    input_shape: tuple[str, ...] | None = None
    input_dtype: str | None = None
    input_range: str | None = None
    batch_size: int | None = None
    batches: int | None = None
    seed: int | None = None
    loss: LossKind | None = None
    target: Path | None = None
    mode: Mode | None = None
    model_output: str | None = None
    saturation_cutoff: float | None = None


@dataclass(frozen=True)
class Settings:
    fail_on: Severity | None = None
    select: tuple[str, ...] | None = None
    ignore: tuple[str, ...] = ()
    baseline: Path | None = None
    baseline_tolerance: float | None = None
    outputs: tuple[OutputTarget, ...] | None = None
    rules: dict[str, RuleOverride] = field(default_factory=dict)
    probe: ProbeSettings = field(default_factory=ProbeSettings)
    source: Path | None = None  # the file the settings came from

    def merged(self, cli: Settings) -> Settings:
        """``cli`` over ``self``: a value set on the command line wins; ``ignore`` lists add up
        (an --ignore on the command line should not re-enable what the file ignores)."""
        probe = replace(
            self.probe,
            **{
                f.name: getattr(cli.probe, f.name)
                for f in fields(ProbeSettings)
                if getattr(cli.probe, f.name) is not None
            },
        )
        rules = dict(self.rules)
        rules.update(cli.rules)
        return Settings(
            fail_on=cli.fail_on or self.fail_on,
            select=cli.select if cli.select is not None else self.select,
            ignore=self.ignore + cli.ignore,
            baseline=cli.baseline or self.baseline,
            baseline_tolerance=cli.baseline_tolerance
            if cli.baseline_tolerance is not None
            else self.baseline_tolerance,
            outputs=cli.outputs if cli.outputs is not None else self.outputs,
            rules=rules,
            probe=probe,
            source=self.source,
        )


# --- finding and reading the file -------------------------------------------------------------


def find_pyproject(start: Path) -> Path | None:
    """The nearest pyproject.toml at or above ``start`` that has a [tool.gradcheck] table."""
    for directory in (start.resolve(), *start.resolve().parents):
        candidate = directory / "pyproject.toml"
        if candidate.is_file() and _gradcheck_table(_read_toml(candidate), candidate) is not None:
            return candidate
    return None


def load_settings(config: Path | None = None, *, cwd: Path | None = None) -> Settings:
    """Settings from ``config`` (must exist), else the nearest pyproject.toml, else defaults."""
    if config is not None:
        if not config.is_file():
            what = "is not a file" if config.exists() else "does not exist"
            raise ConfigError(f"config file {config} {what}")
        if config.stat().st_size == 0:
            # Valid TOML, but a file named explicitly is never meant to be empty (a failed write?).
            raise ConfigError(f"config file {config} is empty",
                              hint="add a [tool.gradcheck] table, or drop --config to use the defaults")
        data = _read_toml(config)
        table = _gradcheck_table(data, config)
        if table is None:
            # A dedicated file may hold the table at its top level.
            table = data if config.name != "pyproject.toml" else {}
        return parse_settings(table, source=config)
    found = find_pyproject(cwd or Path.cwd())
    if found is None:
        return Settings()
    table = _gradcheck_table(_read_toml(found), found)
    return parse_settings(table or {}, source=found)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:  # tomllib decodes before parsing and lets this through
        raise ConfigError(f"{path} is not valid TOML: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None


def _gradcheck_table(data: dict[str, Any], path: Path) -> dict[str, Any] | None:
    tool = data.get("tool")
    if not isinstance(tool, dict) or "gradcheck" not in tool:
        return None
    table = tool["gradcheck"]
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: {TABLE} must be a table")
    return table


# --- parsing ----------------------------------------------------------------------------------


def _key(raw: str) -> str:
    return raw.replace("_", "-")


def _typed(value: Any, kind: type[T] | tuple[type, ...], key: str, what: str) -> T:
    # bool is an int subclass: reject it where a number is expected.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ConfigError(f"{key}: expected {what}, got {value!r}")
    if not isinstance(value, kind):
        raise ConfigError(f"{key}: expected {what}, got {value!r}")
    return value  # type: ignore[return-value]


def _choice(value: Any, enum: type[E], key: str) -> E:
    try:
        return enum(_typed(value, str, key, "a string"))
    except ValueError:
        choices = ", ".join(str(e.value) for e in enum)
        raise ConfigError(f"{key}: {value!r} is not one of {choices}") from None


def _strings(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    items = _typed(value, list, key, "a list of strings")
    return tuple(_typed(item, str, f"{key}[{i}]", "a string") for i, item in enumerate(items))


def _positive_int(value: Any, key: str) -> int:
    number = _typed(value, int, key, "an integer")
    if number < 1:
        raise ConfigError(f"{key}: must be at least 1, got {number}")
    return number


def _number(value: Any, key: str) -> float:
    number = float(_typed(value, (int, float), key, "a number"))
    if math.isnan(number):
        raise ConfigError(f"{key}: must be a number, got nan")
    return number


def _relative(base: Path, text: str) -> Path:
    path = Path(text)
    return path if path.is_absolute() else base / path


def _arch(value: Any, key: str, base: Path) -> str:
    """A file-based arch ('models.py:build') is taken relative to the config file."""
    text = _typed(value, str, key, "a string like 'models.py:build' or 'pkg.module:build'")
    location, sep, attr = text.rpartition(":")
    if sep and location.endswith(".py") and not Path(location).is_absolute():
        return f"{base / location}:{attr}"
    return text


def _shape_list(value: Any, key: str) -> tuple[str, ...]:
    """'8,32', ['8,32', '8,4'], [8, 32] or [[8, 32], [8, 4]]."""
    if isinstance(value, str):
        return (value,)
    items = _typed(value, list, key, "a shape like '8,32' or a list of them")
    if items and all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        return (",".join(str(i) for i in items),)
    shapes: list[str] = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            shapes.append(item)
        else:
            dims = _typed(item, list, f"{key}[{i}]", "a shape")
            shapes.append(",".join(str(_positive_int(d, f"{key}[{i}]")) for d in dims))
    return tuple(shapes)


def _input_range(value: Any, key: str) -> str:
    if isinstance(value, str):
        return value
    pair = _typed(value, list, key, "'LOW,HIGH' or [LOW, HIGH]")
    if len(pair) != 2:
        raise ConfigError(f"{key}: expected [LOW, HIGH], got {value!r}")
    low, high = (_number(v, key) for v in pair)
    return f"{low:g},{high:g}"


def _saturation(value: Any, key: str) -> float:
    number = _number(value, key)
    if not 0 < number < 1:
        raise ConfigError(f"{key}: must be between 0 and 1, got {number}")
    return number


def _probe_parsers(base: Path) -> dict[str, tuple[str, Callable[[Any, str], Any]]]:
    """Config key -> (ProbeSettings field, parser)."""
    return {
        "arch": ("arch", lambda v, k: _arch(v, k, base)),
        "arch-kwargs": ("arch_kwargs", lambda v, k: dict(_typed(v, dict, k, "a table"))),
        "non-strict": ("non_strict", lambda v, k: _typed(v, bool, k, "true or false")),
        "trust-pickle": ("trust_pickle", lambda v, k: _typed(v, bool, k, "true or false")),
        "device": ("device", lambda v, k: _typed(v, str, k, "a string (cpu, cuda, cuda:N)")),
        "input": ("input_file", lambda v, k: _relative(base, _typed(v, str, k, "a path"))),
        "input-shape": ("input_shape", _shape_list),
        "input-dtype": ("input_dtype", lambda v, k: _typed(v, str, k, "a dtype name")),
        "input-range": ("input_range", _input_range),
        "batch-size": ("batch_size", _positive_int),
        "batches": ("batches", _positive_int),
        "seed": ("seed", lambda v, k: _typed(v, int, k, "an integer")),
        "loss": ("loss", lambda v, k: _choice(v, LossKind, k)),
        "target": ("target", lambda v, k: _relative(base, _typed(v, str, k, "a path"))),
        "mode": ("mode", lambda v, k: _choice(v, Mode, k)),
        "model-output": (
            "model_output",
            lambda v, k: str(_typed(v, (str, int), k, "an index or a key")),
        ),
        "saturation-cutoff": ("saturation_cutoff", _saturation),
    }


_RULE_KEYS = ("threshold", "severity", "ignore-layers")


def parse_settings(table: dict[str, Any], *, source: Path | None = None) -> Settings:
    """Validate a ``[tool.gradcheck]`` table (already read from TOML)."""
    base = source.parent if source is not None else Path.cwd()
    probe_parsers = _probe_parsers(base)
    probe: dict[str, Any] = {}
    values: dict[str, Any] = {}
    rules: dict[str, RuleOverride] = {}
    for raw_key, value in table.items():
        key = _key(raw_key)
        where = f"{TABLE}.{raw_key}"
        if key in probe_parsers:
            name, parser = probe_parsers[key]
            probe[name] = parser(value, where)
        elif key == "fail-on":
            values["fail_on"] = _choice(value, Severity, where)
        elif key == "select":
            values["select"] = _strings(value, where)
        elif key == "ignore":
            values["ignore"] = _strings(value, where)
        elif key == "baseline":
            values["baseline"] = _relative(base, _typed(value, str, where, "a path"))
        elif key == "baseline-tolerance":
            tolerance = _number(value, where)
            if tolerance < 0:
                raise ConfigError(f"{where}: must be 0 or more, got {tolerance}")
            values["baseline_tolerance"] = tolerance
        elif key == "format":
            values["outputs"] = tuple(
                parse_output(text, where=where, base=base) for text in _strings(value, where)
            )
        elif key == "rules":
            rules = _parse_rules(_typed(value, dict, where, "a table of rule settings"), where)
        else:
            raise ConfigError(
                f"{where}: unknown key {raw_key!r}",
                hint="see docs/ci.md for the keys [tool.gradcheck] accepts",
            )
    settings = Settings(**values, rules=rules, probe=ProbeSettings(**probe), source=source)
    # Validate rule names and thresholds now, so a bad file fails before any model is loaded.
    configure(
        select=settings.select,
        ignore=settings.ignore,
        overrides=settings.rules,
        where=TABLE,
        rules_where=f"{TABLE}.rules",
    )
    return settings


def _parse_rules(table: dict[str, Any], where: str) -> dict[str, RuleOverride]:
    rules: dict[str, RuleOverride] = {}
    for rule_key, body in table.items():
        here = f"{where}.{rule_key}"
        settings = _typed(body, dict, here, "a table with threshold, severity or ignore-layers")
        threshold: float | None = None
        severity: Severity | None = None
        ignore_layers: tuple[str, ...] = ()
        for raw_key, value in settings.items():
            key = _key(raw_key)
            if key == "threshold":
                threshold = _number(value, f"{here}.{raw_key}")
            elif key == "severity":
                severity = _choice(value, Severity, f"{here}.{raw_key}")
            elif key == "ignore-layers":
                ignore_layers = _strings(value, f"{here}.{raw_key}")
            else:
                raise ConfigError(
                    f"{here}.{raw_key}: unknown key {raw_key!r}",
                    hint=f"a rule takes {', '.join(_RULE_KEYS)}",
                )
        rules[rule_key] = RuleOverride(
            threshold=threshold, severity=severity, ignore_layers=ignore_layers
        )
    return rules


def parse_rule_assignment(text: str, *, where: str) -> tuple[str, str]:
    """'dead-relu=0.3' -> ('dead-relu', '0.3') for the --threshold/--severity flags."""
    rule, sep, value = text.partition("=")
    if not sep or not rule.strip() or not value.strip():
        raise ConfigError(f"{where} {text!r} is not RULE=VALUE", hint=f"e.g. {where} dead-relu=0.3")
    return rule.strip(), value.strip()
