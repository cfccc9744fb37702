"""Every option gradcheck takes, as one frozen record per concern.

The library, the ``[tool.gradcheck]`` table and the CLI share these records and their field names:
a config key is the field name in kebab-case (``input-shape``), a flag is ``--`` and the same
(`input_shape`), so merging the config file and the command line is a ``replace()`` of the
defaults by what each of them set (:mod:`gradcheck_cli.config`). Library messages name options by
their field (in backticks); only ``cli/`` knows how a field is spelled as a flag.

Nothing here imports torch or onnx: the records are built before any model is loaded.

    load     how a checkpoint becomes a model                  LoadOptions
    inputs   the probe batch                                   InputOptions
    probe    how the probe runs (holds ``inputs``)             ProbeOptions
    gate     which rules run, with what thresholds             GateOptions
    write    where and how a rewrite is written                WriteOptions
    fold     what fold-bn folds                                FoldOptions
    reinit   how reinit draws the new weights                  ReinitOptions
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gradcheck_cli.choice import Choice
from gradcheck_cli.records import Severity

# An output counts as saturated when its local derivative is below this fraction of the
# activation's maximum derivative: sigmoid s(1-s) < 0.05 * 0.25, i.e. s outside [0.013, 0.987],
# |z| > 4.4; tanh 1 - y^2 < 0.05, i.e. |y| > 0.975, |z| > 2.2. At that point the unit passes
# at most 5% of the gradient it could (docs/theory.md#saturation).
DEFAULT_SATURATION_CUTOFF = 0.05

# A baseline finding's value may move this much (relatively) before it counts as worsened.
DEFAULT_BASELINE_TOLERANCE = 0.05

# Mishkin & Matas 2016: Tol_var = 0.1, T_max = 10.
DEFAULT_LSUV_TOLERANCE = 0.1
DEFAULT_LSUV_MAX_ITERATIONS = 10


def flag_of(field_name: str) -> str:
    """How the command line spells the option ``field_name`` (two dashes, then the name with hyphens):
    for the presentation layers, which show users what to type."""
    return "--" + field_name.replace("_", "-")


class Scheme(Choice):
    AUTO = "auto"  # per layer, from the activation that follows it
    HE = "he"
    GLOROT = "glorot"
    LECUN = "lecun"
    ORTHOGONAL = "orthogonal"
    LSUV = "lsuv"  # orthogonal, then rescaled on the probe batch (docs/theory.md#lsuv)


class Distribution(Choice):
    NORMAL = "normal"
    UNIFORM = "uniform"


class FanMode(Choice):
    FAN_IN = "fan_in"  # preserves the forward variance
    FAN_OUT = "fan_out"  # preserves the backward (gradient) variance
    FAN_AVG = "fan_avg"  # Glorot's compromise, (fan_in + fan_out) / 2


class RecurrentInit(Choice):
    ORTHOGONAL = "orthogonal"
    IDENTITY = "identity"  # IRNN (Le, Jaitly & Hinton 2015), docs/theory.md#gradient-through-time


class LossKind(Choice):
    """The scalar the probe differentiates (documented in the README)."""

    AUTO = "auto"  # model for transformers LM heads, cross_entropy for (N, C) float logits, mse otherwise
    CROSS_ENTROPY = "cross_entropy"  # against seeded random labels in [0, C)
    MSE = "mse"  # against a seeded N(0, 1) target of the output's shape
    # Binary cross-entropy on probabilities against seeded targets in [0, 1]: auto for an output
    # that comes straight from a sigmoid (a detector's map, a multi-label head), the loss such
    # outputs are trained with; its gradient at the sigmoid's input is p - y, which a confident
    # (saturated) output does not shrink, where mse's is (p - y) p (1 - p).
    BCE = "bce"
    SUM = "sum"  # the plain sum of the output: gradient 1 everywhere
    MODEL = "model"  # the model's own loss (a transformers LM head against seeded random labels)


class Mode(Choice):
    """Eval by default: samples are then independent of each other, so micro-batching is exact,
    there is no dropout noise, and BatchNorm uses the running statistics the checkpoint ships
    (which is what deployment runs). Train shows batch statistics and dropout as training sees them.
    Batch-stats is eval except that BatchNorm normalises with the batch's statistics: what a
    never-trained model needs (its running statistics are the defaults), without the randomness
    of dropout and stochastic depth, which can drop a whole block for every sample of a small
    probe batch."""

    EVAL = "eval"
    TRAIN = "train"
    BATCH_STATS = "batch-stats"

    @property
    def batch_statistics(self) -> bool:
        """Whether BatchNorm normalises with the batch's statistics (and updates its running ones)."""
        return self is not Mode.EVAL


class StatisticsPass(Choice):
    """How each large output is reduced to its statistics: three eager passes, or one pass of a
    kernel compiled with torch.compile (seconds to compile, then faster on CPU outputs larger than
    the cache; ReLU-family rows keep the eager passes). Auto compiles when the micro-batches left
    are expected to win the compiling back, judged by the sizes of the first micro-batch's
    outputs (probe/compiled.py)."""

    AUTO = "auto"
    COMPILED = "compiled"
    EAGER = "eager"


class ReportFormat(Choice):
    """What a command writes as its report: a closed set (docs/ci.md describes each). ``inspect``,
    ``fold-bn`` and ``reinit`` write table and json; ``check`` all five."""

    TABLE = "table"
    JSON = "json"
    MARKDOWN = "markdown"
    JUNIT = "junit"
    GITHUB = "github"


@dataclass(frozen=True)
class ReportTarget:
    """One requested report: a format, to stdout (path None) or to a file."""

    format: ReportFormat
    path: Path | None = None


class WriteFormat(Choice):
    """The format a rewrite writes (``to``). None means: from the output's extension."""

    PT2 = "pt2"  # torch.export program
    TORCHSCRIPT = "torchscript"
    STATE_DICT = "state_dict"  # torch.save of tensors only
    SAFETENSORS = "safetensors"
    PICKLE = "pickle"  # a pickled nn.Module: only for inputs loaded with trust_pickle
    ONNX = "onnx"


@dataclass(frozen=True)
class LoadOptions:
    """How a model file becomes a model."""

    arch: str | None = None  # pkg.module:callable, file.py:callable, torchvision:<name>, timm:<name>, ...
    arch_kwargs: Mapping[str, Any] | None = None
    non_strict: bool = False  # accept a state_dict with missing or unexpected keys
    trust_pickle: bool = False  # allow full unpickling, which runs code from the file
    # Probe a model whose weights hold NaN/Inf instead of refusing it (the report then shows
    # where the non-finite values go).
    allow_nonfinite: bool = False


@dataclass(frozen=True)
class InputOptions:
    """The probe batch; None means 'infer it from the model'."""

    input: Path | None = None  # a file of inputs: .pt (tensor, tuple or dict), .npy or .npz
    input_shape: tuple[tuple[int, ...], ...] = ()  # one shape per synthesised input, batch first
    input_dtype: str | None = None
    input_range: tuple[float, float] | None = None
    batch_size: int | None = None
    batches: int = 1
    seed: int = 0
    seq_len: int | None = None  # sequence length of synthesised token inputs (default 16)


@dataclass(frozen=True)
class ProbeOptions:
    """How the probe runs, around its batch."""

    inputs: InputOptions = field(default_factory=InputOptions)
    loss: LossKind = LossKind.AUTO
    target: Path | None = None  # real targets for the loss, one per probe sample
    mode: Mode = Mode.EVAL
    device: str = "cpu"
    # Which model output the loss is taken from: an index for tuples/lists, a key for dicts and
    # HF-style outputs. None: 'logits' if present, else the first tensor.
    model_output: str | None = None
    saturation_cutoff: float = DEFAULT_SATURATION_CUTOFF
    # Collect fixed-bin histograms of every row's output and output gradient (one more pass over
    # each tensor; off by default, on for the HTML report).
    histograms: bool = False
    # Refuse a probe estimated (weights, gradients, inputs, activations sized on one sample) to need
    # more bytes than this, with a batch_size/batches split that fits. Without it, the cheap part
    # of the estimate (weights, gradients, inputs) is still checked against available memory.
    memory_budget: int | None = None
    # transformers models: recompute each block's activations during backward (the model's own
    # gradient checkpointing) instead of keeping them, for long sequences.
    activation_checkpointing: bool = False
    statistics_pass: StatisticsPass = StatisticsPass.AUTO


@dataclass(frozen=True)
class RuleOverride:
    """What configuration may change on one rule (None: keep the default)."""

    threshold: float | None = None
    severity: Severity | None = None
    ignore_layers: tuple[str, ...] = ()


@dataclass(frozen=True)
class GateOptions:
    """Which rules run and what fails the gate."""

    fail_on: Severity = Severity.ERROR
    select: tuple[str, ...] | None = None  # codes, prefixes or names; None: every rule
    ignore: tuple[str, ...] = ()
    rules: Mapping[str, RuleOverride] = field(default_factory=dict)  # keyed by code or name
    baseline: Path | None = None  # an earlier JSON report: fail only on new or worse findings
    baseline_tolerance: float = DEFAULT_BASELINE_TOLERANCE
    exit_zero: bool = False  # report findings but never fail on them


@dataclass(frozen=True)
class WriteOptions:
    """Where and how a rewrite is written."""

    to: WriteFormat | None = None  # None: from the output's extension, else the input's format
    dry_run: bool = False
    force: bool = False  # overwrite an existing output


@dataclass(frozen=True)
class FoldOptions:
    """What fold-bn does beyond folding into a neighbour."""

    # Rewrite a BatchNorm with no foldable neighbour as a plain per-channel multiply-add.
    affine_standalone: bool = False
    benchmark: int = 0  # time inference before and after: the median of this many runs (0: off)


@dataclass(frozen=True)
class ReinitOptions:
    """None means 'the scheme's default' (normal; fan_in, or fan_avg for Glorot)."""

    scheme: Scheme = Scheme.AUTO
    distribution: Distribution | None = None
    fan: FanMode | None = None
    layers: tuple[str, ...] = ()  # globs on layer names; empty: every layer
    seed: int = 0
    recurrent: RecurrentInit = RecurrentInit.ORTHOGONAL
    reset_norm: bool = False  # normalisation layers: affine to (1, 0), running stats to (0, 1)
    forget_bias: bool = False  # LSTM forget-gate bias 1 (Gers et al. 2000; Jozefowicz et al. 2015)
    lsuv_tolerance: float = DEFAULT_LSUV_TOLERANCE
    lsuv_max_iterations: int = DEFAULT_LSUV_MAX_ITERATIONS
