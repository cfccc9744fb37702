"""Every flag, declared once, in groups that the commands list (Polygraphy's argument groups).

A flag is ``--`` and the field it sets in one of the records of :mod:`gradcheck_cli.options`
(``--input-shape`` sets ``InputOptions.input_shape``): the same name as the ``[tool.gradcheck]`` key,
so that one name means one thing in every command, in the config file and in the library.
:func:`gradcheck_cli.cli.command.command` adds a command's groups to its signature and hands it
the values given on the command line, keyed by field.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from gradcheck_cli.errors import UsageError
from gradcheck_cli.options import (
    Distribution,
    FanMode,
    FoldOptions,
    GateOptions,
    InputOptions,
    LossKind,
    Mode,
    ProbeOptions,
    RecurrentInit,
    ReinitOptions,
    RuleOverride,
    Scheme,
    StatisticsPass,
    WriteFormat,
    flag_of,
)
from gradcheck_cli.records import Severity


@dataclass(frozen=True)
class Flag:
    """One command-line option: the field it sets, how typer parses it, and how the parsed value
    becomes the field's value."""

    field: str
    kind: Any  # the type typer parses: str, int, float, Path, an enum, list[str] or bool
    help: str
    metavar: str | None = None
    convert: Callable[[Any], Any] | None = None  # the parsed value -> the field's value
    minimum: float | None = None
    record: type[Any] | None = None  # the record whose default the help shows
    short: str | None = None

    @property
    def name(self) -> str:
        return flag_of(self.field)

    @property
    def is_flag(self) -> bool:
        return self.kind is bool

    def help_text(self) -> str:
        default = _default(self.record, self.field) if self.record is not None else None
        if default is None or self.is_flag:
            return self.help
        return f"{self.help} [default: {default}]"


@dataclass(frozen=True)
class Group:
    title: str
    flags: tuple[Flag, ...]
    # Turns the group's given values into fields (several flags may set one field).
    finish: Callable[[dict[str, Any]], dict[str, Any]] | None = None


def _default(record: type[Any], name: str) -> str | None:
    for item in fields(record):
        if item.name == name:
            if item.default is not MISSING and item.default is not None and item.default != ():
                value = item.default
                return str(value.value) if hasattr(value, "value") else str(value)
            return None
    raise AssertionError(f"{record.__name__} has no field {name}")


def parse_range(text: str) -> tuple[float, float]:
    from gradcheck_cli.config import parse_input_range

    return parse_input_range(text, "--input-range")


def _arch_kwargs(text: str) -> dict[str, Any]:
    from gradcheck_cli.model.arch import parse_arch_kwargs

    return parse_arch_kwargs(text)


def _shapes(texts: list[str]) -> tuple[tuple[int, ...], ...]:
    from gradcheck_cli.probe.batch import parse_shape

    return tuple(parse_shape(text) for text in texts)


def _cutoff(value: float) -> float:
    if not 0 < value < 1:
        raise UsageError(
            f"--saturation-cutoff {value} must be between 0 and 1",
            hint="e.g. 0.01: saturated means a derivative below 1% of its maximum",
        )
    return value


def _memory(text: str) -> int:
    from gradcheck_cli.probe.budget import parse_memory_budget

    return parse_memory_budget(text)


def split_list(values: list[str]) -> tuple[str, ...]:
    """Repeated and comma-separated values: ['GC1,GC2', 'GC3'] -> ('GC1', 'GC2', 'GC3')."""
    return tuple(part.strip() for value in values for part in value.split(",") if part.strip())


def _rule_assignment(text: str, flag: str) -> tuple[str, str]:
    rule, sep, value = text.partition("=")
    if not sep or not rule.strip() or not value.strip():
        raise UsageError(f"{flag} {text!r} is not RULE=VALUE", hint=f"e.g. {flag} dead-relu=0.3")
    return rule.strip(), value.strip()


def _named(flag: str) -> Callable[[str], str]:
    """Every setting named as the one flag it came from."""
    return lambda _key: flag


def _rule_overrides(given: dict[str, Any]) -> dict[str, Any]:
    """--threshold RULE=VALUE and --severity RULE=LEVEL into the gate's ``rules`` field, each
    checked against its rule here so that an error names the flag as it was typed."""
    from gradcheck_cli.gate.rules import configure

    overrides: dict[str, RuleOverride] = {}
    for text in given.pop("threshold", ()):
        rule, value = _rule_assignment(text, "--threshold")
        try:
            number = float(value)
        except ValueError:
            raise UsageError(f"--threshold {text}: {value!r} is not a number") from None
        override = RuleOverride(threshold=number)
        configure(overrides={rule: override}, name_of=_named(f"--threshold {text}"))
        current = overrides.get(rule, RuleOverride())
        overrides[rule] = RuleOverride(threshold=number, severity=current.severity)
    for text in given.pop("severity", ()):
        rule, value = _rule_assignment(text, "--severity")
        try:
            level = Severity(value.lower())
        except ValueError:
            raise UsageError(f"--severity {text}: {value!r} is not error, warning or info") from None
        configure(overrides={rule: RuleOverride(severity=level)}, name_of=_named(f"--severity {text}"))
        current = overrides.get(rule, RuleOverride())
        overrides[rule] = RuleOverride(threshold=current.threshold, severity=level)
    if overrides:
        given["rules"] = overrides
    return given


LOAD = Group(
    "Loading",
    (
        Flag(
            "arch",
            str,
            "Architecture for a state_dict or safetensors file: pkg.module:callable, "
            "path/file.py:callable (runs that file), torchvision:<name>, timm:<name>, transformers:<Class>.",
            metavar="SPEC",
        ),
        Flag(
            "arch_kwargs",
            str,
            "JSON object of keyword arguments for --arch.",
            metavar="JSON",
            convert=_arch_kwargs,
        ),
        Flag("non_strict", bool, "Load a state_dict even if keys are missing or unexpected."),
        Flag(
            "trust_pickle",
            bool,
            "Allow full unpickling (a pickled nn.Module). Unpickling runs code from the "
            "file: only for files you trust.",
        ),
        Flag("allow_nonfinite", bool, "Probe a model whose weights hold NaN/Inf instead of refusing it."),
    ),
)

INPUTS = Group(
    "Probe inputs",
    (
        Flag("input", Path, "Probe inputs: .pt (tensor, tuple or dict of tensors), .npy or .npz.", metavar="FILE"),
        Flag(
            "input_shape",
            list[str],
            "Shape of a synthesised input, batch first, e.g. 8,3,224,224. Repeat for several inputs.",
            metavar="SHAPE",
            convert=_shapes,
        ),
        Flag("input_dtype", str, "dtype of synthesised inputs (float32, int64, ...).", metavar="DTYPE"),
        Flag(
            "input_range",
            str,
            "LOW,HIGH of synthesised inputs (integers: HIGH exclusive, e.g. token ids 0,30522).",
            metavar="LOW,HIGH",
            convert=parse_range,
        ),
        Flag("batch_size", int, "Samples per micro-batch (default 8, or the inputs' own).", metavar="N", minimum=1),
        Flag(
            "batches",
            int,
            "Number of micro-batches; statistics are merged exactly.",
            metavar="N",
            minimum=1,
            record=InputOptions,
        ),
        Flag("seed", int, "Seed for inputs, targets, dropout and new weights.", metavar="N", record=InputOptions),
        Flag(
            "seq_len",
            int,
            "Sequence length of synthesised token inputs (transformers models; default 16).",
            metavar="N",
            minimum=1,
        ),
    ),
)

DEVICE = Group(
    "Device",
    (
        Flag(
            "device",
            str,
            "cpu, cuda, cuda:N or auto (a model too big for one GPU is placed across the visible GPUs).",
            metavar="DEVICE",
            record=ProbeOptions,
        ),
    ),
)

PROBE = Group(
    "Probe",
    (
        Flag(
            "loss",
            LossKind,
            "Scalar to differentiate: auto = the model's own loss where it has one, "
            "cross_entropy for (N, C) logits against seeded random labels, bce for an output that comes "
            "straight from a sigmoid (targets in [0, 1]), else mse against a seeded N(0,1) target.",
            record=ProbeOptions,
        ),
        Flag("target", Path, "Real targets (labels or tensors) for the loss, one per probe sample.", metavar="FILE"),
        Flag(
            "mode",
            Mode,
            "eval (exact micro-batching, no dropout noise, BatchNorm running stats as deployed), "
            "train (batch statistics and dropout, as training sees them) or batch-stats (eval, "
            "but BatchNorm uses batch statistics: a never-trained model without dropout noise).",
            record=ProbeOptions,
        ),
        Flag(
            "model_output",
            str,
            "Which output the loss uses when the model returns several: an index or a key "
            "(default: 'logits' if present, else the first tensor).",
            metavar="KEY",
        ),
        Flag(
            "saturation_cutoff",
            float,
            "Saturated = local derivative below this fraction of its maximum.",
            metavar="FRACTION",
            convert=_cutoff,
            record=ProbeOptions,
        ),
        Flag("histograms", bool, "Add fixed-bin histograms of every row's output and output gradient to the JSON."),
        Flag(
            "memory_budget",
            str,
            "Keep the probe within this much memory (e.g. 4GiB): a batch estimated to need "
            "more runs in micro-batches that fit (statistics merge exactly).",
            metavar="SIZE",
            convert=_memory,
        ),
        Flag(
            "activation_checkpointing",
            bool,
            "transformers models: recompute each block's activations during "
            "backward (the model's own gradient checkpointing) instead of keeping them, for long sequences.",
        ),
        Flag(
            "statistics_pass",
            StatisticsPass,
            "eager (three passes over each output), compiled (one torch.compile pass over each CPU "
            "output of 1M elements or more, ReLU rows aside: seconds to compile, then faster) or auto "
            "(compiled when enough micro-batches of large outputs are left to win the compiling back).",
            record=ProbeOptions,
        ),
    ),
)

RULES = Group(
    "Rules",
    (
        Flag(
            "select",
            list[str],
            "Rules to run: codes, code prefixes (GC2) or names, comma-separated or repeated. "
            "Replaces the config's list. GC001 non-finite always runs.",
            metavar="RULES",
            convert=split_list,
        ),
        Flag("ignore", list[str], "Rules to skip (added to the config's list).", metavar="RULES", convert=split_list),
        Flag("threshold", list[str], "RULE=VALUE, e.g. dead-relu=0.3. Repeatable.", metavar="RULE=VALUE"),
        Flag("severity", list[str], "RULE=LEVEL, e.g. init-scale=error. Repeatable.", metavar="RULE=LEVEL"),
    ),
    finish=_rule_overrides,
)

GATE = Group(
    "Gate",
    (
        Flag("fail_on", Severity, "Exit 1 when a finding at or above this severity is found.", record=GateOptions),
        Flag("exit_zero", bool, "Report findings but exit 0 (errors loading a model still exit 2)."),
        Flag(
            "baseline",
            Path,
            "JSON report of an earlier run (--format json=FILE): fail only on findings that "
            "are new or worse than there.",
            metavar="FILE",
        ),
        Flag(
            "baseline_tolerance",
            float,
            "Relative change a baseline finding's value may make before it counts as worsened.",
            metavar="FRACTION",
            minimum=0.0,
            record=GateOptions,
        ),
    ),
)

WRITE = Group(
    "Writing",
    (
        Flag(
            "to",
            WriteFormat,
            "Format of the written model: pt2, torchscript, state_dict, safetensors, pickle or "
            "onnx (default: from the -o extension: .pt2, .onnx, .safetensors, .pt/.pth/.ckpt; else the input's "
            "format). state_dict/safetensors keep the architecture; pickle only for inputs loaded with "
            "--trust-pickle.",
            metavar="FORMAT",
        ),
        Flag("dry_run", bool, "Report what would change; write nothing."),
        Flag("force", bool, "Overwrite an existing output file."),
    ),
)

FOLD = Group(
    "Fold",
    (
        Flag(
            "affine_standalone",
            bool,
            "Rewrite a BatchNorm that has no foldable neighbour as a plain per-channel multiply-add.",
        ),
        Flag(
            "benchmark",
            int,
            "Also time inference before and after: median of N runs (0: off).",
            metavar="N",
            minimum=0,
            record=FoldOptions,
        ),
    ),
)

REINIT = Group(
    "Reinit",
    (
        Flag(
            "scheme",
            Scheme,
            "auto: per layer from the activation that follows it (He after the ReLU family, "
            "LeCun after SELU, Glorot after tanh/sigmoid/none); lsuv: orthogonal, then each layer's output "
            "variance set to 1 on the probe batch.",
            record=ReinitOptions,
        ),
        Flag(
            "distribution",
            Distribution,
            "Draw from a normal or a uniform distribution of the same variance (default: normal).",
        ),
        Flag("fan", FanMode, "Fan the variance is divided by (default: fan_avg for glorot, else fan_in)."),
        Flag(
            "layers",
            list[str],
            "Only layers whose name (module path, or ONNX node name) matches this glob; repeatable.",
            metavar="GLOB",
            convert=tuple,
        ),
        Flag(
            "recurrent",
            RecurrentInit,
            "Recurrent weights of RNN/LSTM/GRU: orthogonal, or identity (IRNN).",
            record=ReinitOptions,
        ),
        Flag("forget_bias", bool, "Set the LSTM forget-gate bias to 1."),
        Flag("reset_norm", bool, "Also reset normalisation layers: affine to (1, 0), running statistics to (0, 1)."),
    ),
)

CONFIG = Group(
    "Config",
    (
        Flag(
            "config",
            Path,
            "Config file (pyproject.toml or a file holding the [tool.gradcheck] keys). Default: "
            "the nearest pyproject.toml with [tool.gradcheck], searched upward.",
            metavar="FILE",
        ),
        Flag("isolated", bool, "Ignore every config file."),
    ),
)

REPORT = Group(
    "Report",
    (
        Flag(
            "format",
            list[str],
            "FMT or FMT=PATH; repeat for several at once. Without PATH it goes to stdout, "
            "where json (and markdown, junit) must be alone. [default: table]",
            metavar="FMT[=PATH]",
            short="-f",
        ),
    ),
)

_PLOT = Flag(
    "plot",
    Path,
    "Also draw the gradient-flow figure (variance, |dL/dy|, dead/saturated over depth) "
    "to FILE.png or FILE.svg. Needs matplotlib: pip install 'gradcheck-cli[plot]'.",
    metavar="FILE",
)
_HTML = Flag(
    "html",
    Path,
    "Also write a self-contained HTML report (summary, findings, sortable table, depth "
    "chart, per-layer histograms) to FILE; turns --histograms on.",
    metavar="FILE",
)
PICTURES = Group("Pictures", (_PLOT, _HTML))
PLOT = Group("Pictures", (_PLOT,))

DEBUG = Group("Debugging", (Flag("debug", bool, "Show tracebacks for errors."),))

ALL_GROUPS = (LOAD, INPUTS, DEVICE, PROBE, RULES, GATE, WRITE, FOLD, REINIT, CONFIG, REPORT, PICTURES, DEBUG)

# Field -> the flag that sets it, for messages from the library (which names fields, not flags).
FLAG_OF_FIELD: dict[str, str] = {
    **{flag.field: flag.name for group in ALL_GROUPS for flag in group.flags},
    "rules": "--threshold/--severity",
    "output": "-o OUT",
}
