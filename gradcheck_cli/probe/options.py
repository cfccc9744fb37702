"""How the probe runs: every knob, with its default and the reason for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from gradcheck_cli.probe.batch import InputOptions

# An output counts as saturated when its local derivative is below this fraction of the
# activation's maximum derivative: sigmoid s(1-s) < 0.05 * 0.25, i.e. s outside [0.013, 0.987],
# |z| > 4.4; tanh 1 - y^2 < 0.05, i.e. |y| > 0.975, |z| > 2.2. At that point the unit passes
# at most 5% of the gradient it could, which is what THEORY.md section 3 calls saturated.
DEFAULT_SATURATION_CUTOFF = 0.05


class LossKind(str, Enum):
    """The scalar the probe differentiates (documented in the README)."""

    AUTO = "auto"  # model for transformers LM heads, cross_entropy for (N, C) float logits, mse otherwise
    CROSS_ENTROPY = "cross_entropy"  # against seeded random labels in [0, C)
    MSE = "mse"  # against a seeded N(0, 1) target of the output's shape
    SUM = "sum"  # the plain sum of the output: gradient 1 everywhere
    MODEL = "model"  # the model's own loss (a transformers LM head against seeded random labels)

    def __str__(self) -> str:
        return self.value


class Mode(str, Enum):
    """Eval by default: samples are then independent of each other, so micro-batching is exact,
    there is no dropout noise, and BatchNorm uses the running statistics the checkpoint ships
    (which is what deployment runs). Train shows batch statistics and dropout as training sees them."""

    EVAL = "eval"
    TRAIN = "train"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class ProbeOptions:
    inputs: InputOptions = field(default_factory=InputOptions)
    loss: LossKind = LossKind.AUTO
    target_file: Path | None = None
    mode: Mode = Mode.EVAL
    device: str = "cpu"
    # Which model output the loss is taken from: an index for tuples/lists, a key for dicts and
    # HF-style outputs. None: 'logits' if present, else the first tensor.
    output: str | None = None
    saturation_cutoff: float = DEFAULT_SATURATION_CUTOFF
    # Collect fixed-bin histograms of every row's output and output gradient (one more pass over
    # each tensor; off by default, on for the HTML report).
    histograms: bool = False
    # Refuse a probe estimated (weights, gradients, inputs, activations sized on one sample) to need
    # more bytes than this, with a --batch-size/--batches split that fits. Without it, the cheap
    # part of the estimate (weights, gradients, inputs) is still checked against available memory.
    memory_budget: int | None = None
    # transformers models: recompute each block's activations during backward (the model's own
    # gradient checkpointing) instead of keeping them, for long sequences.
    activation_checkpointing: bool = False
