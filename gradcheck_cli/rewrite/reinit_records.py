"""What ``gradcheck reinit`` did, layer by layer: plain frozen records, no tensors.

Shared by the torch and ONNX passes and the facade; serialised with
:func:`gradcheck_cli.records.to_jsonable`.
"""

from __future__ import annotations

from dataclasses import dataclass

from gradcheck_cli.choice import Choice
from gradcheck_cli.records import SCHEMA_VERSION, Change, LayerStats
from gradcheck_cli.rewrite.fold_records import Verification


class ActivationSource(Choice):
    """Where the activation that follows a layer was read from."""

    EXECUTION = "execution"  # data flow of one forward pass on the probe batch (torch, eager/.pt2)
    GRAPH = "graph"  # data flow in the ONNX graph
    MODULE_ORDER = "module_order"  # the next activation module in definition order (TorchScript)
    INTERNAL = "internal"  # the layer's own nonlinearity (RNN/LSTM/GRU gates)
    NOT_EXECUTED = "not_executed"  # the layer did not run on the probe batch


@dataclass(frozen=True)
class TensorInit:
    """One tensor that received new values."""

    parameter: str
    shape: tuple[int, ...]
    dtype: str
    scheme: str  # he, glorot, lecun, orthogonal, lsuv, identity, zeros, ones
    std: float  # the standard deviation (orthogonal: root mean square) the formula prescribes
    measured_std: float  # root mean square of the values written, as stored (after the dtype cast)
    distribution: str | None = None
    mode: str | None = None
    gain: float | None = None
    fan_in: int | None = None
    fan_out: int | None = None
    shared_with: tuple[str, ...] = ()  # other names of the same tensor (tied weights): one new tensor


@dataclass(frozen=True)
class LsuvStep:
    """LSUV's rescaling of one layer (Mishkin & Matas 2016)."""

    iterations: int  # rescales applied
    initial_variance: float  # output variance right after the orthogonal init
    variance: float  # output variance after the last rescale
    converged: bool  # |variance - 1| <= tolerance


@dataclass(frozen=True)
class LayerInit:
    """One layer that was re-initialised: the scheme it got and why."""

    name: str
    type: str
    scheme: str
    reason: str
    activation: str | None
    activation_source: ActivationSource
    tensors: tuple[TensorInit, ...]
    lsuv: LsuvStep | None = None

    @property
    def weight_std(self) -> float | None:
        return self.tensors[0].std if self.tensors else None


@dataclass(frozen=True)
class ReinitReport:
    """The result of one ``reinit`` call; ``safe`` is always False (trained weights are discarded)."""

    model: str
    format: str
    output: str | None
    written: bool
    scheme: str
    seed: int
    layers: tuple[LayerInit, ...]
    changes: tuple[Change, ...]  # applied and declined, with reasons, as every rewrite reports
    before: tuple[LayerStats, ...] | None = None
    after: tuple[LayerStats, ...] | None = None
    notes: tuple[str, ...] = ()
    safe: bool = False
    output_format: str | None = None  # what was (or, for a dry run, would be) written
    # The written file, loaded back, against the re-initialised model in memory (None: not written).
    verification: Verification | None = None
    schema_version: str = SCHEMA_VERSION

    @property
    def declined(self) -> tuple[Change, ...]:
        return tuple(change for change in self.changes if not change.applied)
