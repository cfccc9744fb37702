"""The records BatchNorm folding produces: plain numbers and strings (see records.to_jsonable)."""

from __future__ import annotations

from dataclasses import dataclass

from gradcheck_cli.choice import Choice
from gradcheck_cli.records import SCHEMA_VERSION


class Pattern(Choice):
    """Which rewrite folded a BatchNorm. Stable names: they appear in JSON reports."""

    CONV_BN = "conv-bn"  # Conv1d/2d/3d (or ONNX Conv) -> BN
    CONV_TRANSPOSE_BN = "conv-transpose-bn"  # ConvTranspose1d/2d/3d -> BN
    LINEAR_BN = "linear-bn"  # Linear (or ONNX Gemm) -> BN on (N, F)
    MATMUL_BN = "matmul-bn"  # ONNX MatMul with a constant weight [-> Add constant] -> BN
    BN_CONV = "bn-conv"  # BN -> Conv without zero padding
    BN_LINEAR = "bn-linear"  # BN on (N, F) -> Linear / Gemm / MatMul
    AFFINE = "bn-affine"  # a BN left alone, rewritten as a per-channel multiply-add


@dataclass(frozen=True)
class FoldEntry:
    """One BatchNorm: folded into ``layer`` by ``pattern``, or left alone with ``reason``."""

    batchnorm: str
    folded: bool
    pattern: Pattern | None = None
    layer: str | None = None
    reason: str | None = None
    note: str | None = None  # e.g. 'the layer got a bias', 'shift kept in the BatchNorm'


@dataclass(frozen=True)
class OutputCheck:
    """Original against folded on the probe batch, for one model output."""

    name: str
    dtype: str
    max_abs_error: float
    max_rel_error: float  # max_abs_error / scale
    scale: float  # max |original output|: what the tolerance is relative to
    tolerance: float  # absolute: relative_tolerance(dtype) * scale
    passed: bool


@dataclass(frozen=True)
class Verification:
    backend: str  # 'torch eager' or 'onnxruntime (graph optimisations disabled)'
    samples: int  # distinct samples: those of the probe batches (a second batch size repeats them)
    outputs: tuple[OutputCheck, ...]
    # The batch sizes the models ran at: the probe batch's, and a second one where the model allows it.
    batch_sizes: tuple[int, ...] = ()

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.outputs)


@dataclass(frozen=True)
class Latency:
    backend: str
    runs: int
    before_ms: float  # median
    after_ms: float

    @property
    def speedup(self) -> float:
        return self.before_ms / self.after_ms if self.after_ms > 0 else 0.0


@dataclass(frozen=True)
class Counts:
    parameters: int
    batchnorms: int
    nodes: int  # graph nodes (ops) for graph methods and ONNX; modules for module structure


@dataclass(frozen=True)
class FoldReport:
    """What ``gradcheck fold-bn`` did, verified, before anything was written."""

    model: str
    input_format: str
    output_format: str
    method: str  # how the BatchNorms were found: torch.fx, torch.export, module structure, onnx graph
    entries: tuple[FoldEntry, ...]
    before: Counts
    after: Counts
    verification: Verification
    written: str | None  # None for `dry_run` or a failed verification
    latency: tuple[Latency, ...] = ()
    notes: tuple[str, ...] = ()
    schema_version: str = SCHEMA_VERSION

    @property
    def folded(self) -> int:
        return sum(1 for entry in self.entries if entry.folded)

    @property
    def skipped(self) -> int:
        return sum(1 for entry in self.entries if not entry.folded)
