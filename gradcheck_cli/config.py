"""Configuration: defaults < ``[tool.gradcheck]`` < CLI flags, for every command.

The file is ``config`` (a pyproject.toml, or a gradcheck.toml whose top level is the
``[tool.gradcheck]`` table), else the nearest pyproject.toml with a ``[tool.gradcheck]`` table,
searched upward from the working directory (as ruff does: a pyproject.toml without the table
is passed over). A key is the name of a field of one of the option records of
:mod:`gradcheck_cli.options`, in kebab-case (snake_case is accepted too), so a config key, a flag
and a library field are one name. Every unknown key and every bad value is a :class:`ConfigError`
naming the key, so a typo never silently turns a rule off.

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

A :class:`Settings` holds what one source set, per record; merging two is a dict update, and an
option record is ``replace(Record(), **settings.load)``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from gradcheck_cli.errors import ConfigError
from gradcheck_cli.gate.rules import configure
from gradcheck_cli.options import (
    Distribution,
    FanMode,
    FoldOptions,
    GateOptions,
    InputOptions,
    LoadOptions,
    LossKind,
    Mode,
    ProbeOptions,
    RecurrentInit,
    ReinitOptions,
    ReportFormat,
    ReportTarget,
    RuleOverride,
    Scheme,
    StatisticsPass,
)
from gradcheck_cli.records import Severity

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 only
    import tomli as tomllib

T = TypeVar("T")
E = TypeVar("E", bound=Enum)

TABLE = "tool.gradcheck"

# The records a config file may set, by the name Settings keeps them under.
RECORDS: dict[str, type[Any]] = {
    "load": LoadOptions,
    "inputs": InputOptions,
    "probe": ProbeOptions,
    "gate": GateOptions,
    "fold": FoldOptions,
    "reinit": ReinitOptions,
}
# Fields no file sets: the probe's inputs are their own record; reinit draws with the inputs' seed;
# the LSUV loop's bounds are the paper's.
_NOT_CONFIGURABLE = {
    ("probe", "inputs"),
    ("reinit", "seed"),
    ("reinit", "lsuv_tolerance"),
    ("reinit", "lsuv_max_iterations"),
}


def option_fields() -> dict[str, str]:
    """Field name -> the record (as named in :data:`RECORDS`) that holds it."""
    table: dict[str, str] = {}
    for record, cls in RECORDS.items():
        for item in fields(cls):
            if (record, item.name) not in _NOT_CONFIGURABLE:
                assert item.name not in table, f"option field {item.name} is declared twice"
                table[item.name] = record
    return table


@dataclass(frozen=True)
class Settings:
    """What one source (the config file or the command line) set, per record: field -> value.
    A field that is absent was not set there, and the default (or the other source) applies."""

    values: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # The config's ``format`` list: the gate's report formats (``check`` only).
    format: tuple[ReportTarget, ...] | None = None
    source: Path | None = None  # the file the settings came from

    def merged(self, cli: Settings) -> Settings:
        """``cli`` over ``self``: a value set on the command line wins; the gate's ``ignore`` lists
        add up (an ignore on the command line should not re-enable what the file ignores), and
        per-rule settings merge rule by rule."""
        values: dict[str, dict[str, Any]] = {name: dict(self.values.get(name, {})) for name in RECORDS}
        for name, given in cli.values.items():
            values[name].update(given)
        gate_file, gate_cli = self.values.get("gate", {}), cli.values.get("gate", {})
        if "ignore" in gate_file and "ignore" in gate_cli:
            values["gate"]["ignore"] = tuple(gate_file["ignore"]) + tuple(gate_cli["ignore"])
        if "rules" in gate_file and "rules" in gate_cli:
            values["gate"]["rules"] = {**gate_file["rules"], **gate_cli["rules"]}
        return Settings(
            values={k: v for k, v in values.items() if v},
            format=cli.format if cli.format is not None else self.format,
            source=self.source,
        )

    def _record(self, name: str) -> Any:
        return replace(RECORDS[name](), **self.values.get(name, {}))

    @property
    def load(self) -> LoadOptions:
        return self._record("load")  # type: ignore[no-any-return]

    @property
    def inputs(self) -> InputOptions:
        return self._record("inputs")  # type: ignore[no-any-return]

    @property
    def probe(self) -> ProbeOptions:
        return replace(self._record("probe"), inputs=self.inputs)  # type: ignore[no-any-return]

    @property
    def gate(self) -> GateOptions:
        return self._record("gate")  # type: ignore[no-any-return]

    @property
    def fold(self) -> FoldOptions:
        return self._record("fold")  # type: ignore[no-any-return]

    @property
    def reinit(self) -> ReinitOptions:
        return replace(self._record("reinit"), seed=self.inputs.seed)  # type: ignore[no-any-return]


def settings_of(**values: Any) -> Settings:
    """Settings from field names (each placed in its record); None values are not set."""
    table = option_fields()
    grouped: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        if value is not None:
            grouped.setdefault(table[name], {})[name] = value
    return Settings(values=grouped)


def parse_report_target(
    text: str,
    *,
    where: str = "`format`",
    base: Path | None = None,
    allowed: tuple[ReportFormat, ...] = tuple(ReportFormat),
) -> ReportTarget:
    """'junit' or 'junit=reports/gradcheck.xml' (a relative path is taken from ``base``)."""
    name, sep, path_text = text.partition("=")
    try:
        fmt = ReportFormat(name.strip().lower())
    except ValueError:
        fmt = None
    if fmt is None or fmt not in allowed:
        choices = ", ".join(f.value for f in allowed)
        raise ConfigError(
            f"{where}: unknown format {name!r}",
            hint=f"choose from {choices}, optionally with =PATH, e.g. {allowed[-1].value}=report.out",
        )
    if sep and not path_text.strip():
        raise ConfigError(f"{where}: {text!r} has '=' but no path", hint=f"e.g. {fmt.value}=report.out")
    path = Path(path_text.strip()) if sep else None
    if path is not None and base is not None and not path.is_absolute():
        path = base / path
    return ReportTarget(format=fmt, path=path)


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
            raise ConfigError(
                f"config file {config} is empty",
                hint="add a [tool.gradcheck] table, or drop `config` to use the defaults",
            )
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


def _shapes(value: Any, key: str) -> tuple[tuple[int, ...], ...]:
    """'8,32', ['8,32', '8,4'], [8, 32] or [[8, 32], [8, 4]]."""
    from gradcheck_cli.probe.batch import parse_shape

    if isinstance(value, str):
        return (parse_shape(value),)
    items = _typed(value, list, key, "a shape like '8,32' or a list of them")
    if items and all(isinstance(i, int) and not isinstance(i, bool) for i in items):
        return (tuple(_positive_int(d, key) for d in items),)
    shapes: list[tuple[int, ...]] = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            shapes.append(parse_shape(item))
        else:
            dims = _typed(item, list, f"{key}[{i}]", "a shape")
            shapes.append(tuple(_positive_int(d, f"{key}[{i}]") for d in dims))
    return tuple(shapes)


def parse_input_range(value: Any, key: str) -> tuple[float, float]:
    """'LOW,HIGH' (from a flag or the file) or [LOW, HIGH] (from the file); ``key`` names where it
    came from in the error."""
    if isinstance(value, str):
        parts = value.split(",")
        try:
            if len(parts) == 2:
                return float(parts[0]), float(parts[1])
        except ValueError:
            pass
        raise ConfigError(f"{key}: expected 'LOW,HIGH', got {value!r}", hint="e.g. 0,30522 for token ids")
    pair = _typed(value, list, key, "'LOW,HIGH' or [LOW, HIGH]")
    if len(pair) != 2:
        raise ConfigError(f"{key}: expected [LOW, HIGH], got {value!r}")
    low, high = (_number(v, key) for v in pair)
    return low, high


def _fraction(value: Any, key: str) -> float:
    number = _number(value, key)
    if not 0 < number < 1:
        raise ConfigError(f"{key}: must be between 0 and 1, got {number}")
    return number


def _at_least_zero(value: Any, key: str) -> float:
    number = _number(value, key)
    if number < 0:
        raise ConfigError(f"{key}: must be 0 or more, got {number}")
    return number


def _memory(value: Any, key: str) -> int:
    from gradcheck_cli.probe.budget import parse_memory_budget

    if isinstance(value, int) and not isinstance(value, bool):
        return _positive_int(value, key)
    return parse_memory_budget(_typed(value, str, key, "a size like '4GiB'"))


def _bool(value: Any, key: str) -> bool:
    return _typed(value, bool, key, "true or false")


def _string(what: str) -> Callable[[Any, str], str]:
    return lambda value, key: _typed(value, str, key, what)


def _choice_of(enum: type[E]) -> Callable[[Any, str], E]:
    return lambda value, key: _choice(value, enum, key)


def _parsers(base: Path) -> dict[str, Callable[[Any, str], Any]]:
    """Field -> parser of its config value (every configurable field has one)."""
    return {
        "arch": lambda v, k: _arch(v, k, base),
        "arch_kwargs": lambda v, k: dict(_typed(v, dict, k, "a table")),
        "non_strict": _bool,
        "trust_pickle": _bool,
        "allow_nonfinite": _bool,
        "input": lambda v, k: _relative(base, _typed(v, str, k, "a path")),
        "input_shape": _shapes,
        "input_dtype": _string("a dtype name"),
        "input_range": parse_input_range,
        "batch_size": _positive_int,
        "batches": _positive_int,
        "seed": lambda v, k: _typed(v, int, k, "an integer"),
        "seq_len": _positive_int,
        "loss": _choice_of(LossKind),
        "target": lambda v, k: _relative(base, _typed(v, str, k, "a path")),
        "mode": _choice_of(Mode),
        "device": _string("a string (cpu, cuda, cuda:N)"),
        "model_output": lambda v, k: str(_typed(v, (str, int), k, "an index or a key")),
        "saturation_cutoff": _fraction,
        "histograms": _bool,
        "memory_budget": _memory,
        "activation_checkpointing": _bool,
        "statistics_pass": _choice_of(StatisticsPass),
        "fail_on": _choice_of(Severity),
        "select": _strings,
        "ignore": _strings,
        "rules": lambda v, k: _parse_rules(_typed(v, dict, k, "a table of rule settings"), k),
        "baseline": lambda v, k: _relative(base, _typed(v, str, k, "a path")),
        "baseline_tolerance": _at_least_zero,
        "exit_zero": _bool,
        "affine_standalone": _bool,
        "benchmark": lambda v, k: int(_at_least_zero(_typed(v, int, k, "an integer"), k)),
        "scheme": _choice_of(Scheme),
        "distribution": _choice_of(Distribution),
        "fan": _choice_of(FanMode),
        "layers": _strings,
        "recurrent": _choice_of(RecurrentInit),
        "reset_norm": _bool,
        "forget_bias": _bool,
    }


_RULE_KEYS = ("threshold", "severity", "ignore-layers")


def parse_settings(table: dict[str, Any], *, source: Path | None = None) -> Settings:
    """Validate a ``[tool.gradcheck]`` table (already read from TOML)."""
    base = source.parent if source is not None else Path.cwd()
    parsers = _parsers(base)
    records = option_fields()
    assert set(parsers) == set(records), "every configurable field needs a parser"
    values: dict[str, dict[str, Any]] = {}
    report: tuple[ReportTarget, ...] | None = None
    for raw_key, value in table.items():
        name = raw_key.replace("-", "_")
        where = f"{TABLE}.{raw_key}"
        if name == "format":
            report = tuple(parse_report_target(text, where=where, base=base) for text in _strings(value, where))
        elif name in records:
            values.setdefault(records[name], {})[name] = parsers[name](value, where)
        else:
            raise ConfigError(
                f"{where}: unknown key {raw_key!r}",
                hint="see docs/ci.md for the keys [tool.gradcheck] accepts",
            )
    settings = Settings(values=values, format=report, source=source)
    # Validate rule names and thresholds now, so a bad file fails before any model is loaded.
    gate = settings.gate
    configure(
        select=gate.select,
        ignore=gate.ignore,
        overrides=gate.rules,
        name_of=lambda key: f"{TABLE}.{key.replace('_', '-')}",
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
        rules[rule_key] = RuleOverride(threshold=threshold, severity=severity, ignore_layers=ignore_layers)
    return rules
