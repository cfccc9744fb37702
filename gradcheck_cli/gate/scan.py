"""Checkpoint tensors, scanned before anything runs: non-finite values and BatchNorm buffers.

These are the problems a probe would only show second-hand (every row downstream of a NaN
weight is NaN too), so they are read straight from the loaded module and named by the
tensor's own state_dict key. torch is imported inside the function; the records are plain.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class NonFiniteTensor:
    """A parameter or buffer that holds NaN or Inf."""

    name: str  # state_dict key, e.g. 'body.2.weight'
    module: str  # path of the module that owns it ('' for the root)
    nan: int
    inf: int
    count: int


@dataclass(frozen=True)
class BatchNormBuffers:
    """The running statistics of one BatchNorm module (only modules that track them)."""

    module: str
    type: str
    channels: int
    nonpositive_var: int  # channels whose running_var is <= 0 (NaN counts as not positive)
    min_var: float | None  # smallest finite running_var (None when no channel is finite)
    num_batches_tracked: int | None  # None when the checkpoint has no counter
    default_stats: bool  # running_mean all 0 and running_var all 1: what a fresh module holds

    @property
    def never_updated(self) -> bool:
        """No training step ever updated the running statistics (the eval-mode BN is then the
        identity up to gamma/beta, whatever the data the model was trained on)."""
        return self.num_batches_tracked == 0 and self.default_stats


@dataclass(frozen=True)
class CheckpointScan:
    nonfinite: tuple[NonFiniteTensor, ...] = ()
    batchnorms: tuple[BatchNormBuffers, ...] = ()


def scan_module(module: nn.Module) -> CheckpointScan:
    """Every floating tensor of ``module`` checked for NaN/Inf, and every BatchNorm's buffers."""
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    nonfinite: list[NonFiniteTensor] = []
    batchnorms: list[BatchNormBuffers] = []
    with torch.no_grad():
        # remove_duplicate=True (the default): a tied weight is reported once, under its first name.
        for owner_path, owner in module.named_modules():
            tensors = list(owner._parameters.items()) + list(owner._buffers.items())
            for leaf, tensor in tensors:
                if tensor is None or not (tensor.dtype.is_floating_point or tensor.dtype.is_complex):
                    continue
                finite = torch.isfinite(tensor)
                if bool(finite.all()):
                    continue
                nan = int(torch.isnan(tensor).sum())
                nonfinite.append(
                    NonFiniteTensor(
                        name=f"{owner_path}.{leaf}" if owner_path else leaf,
                        module=owner_path,
                        nan=nan,
                        inf=int((~finite).sum()) - nan,
                        count=tensor.numel(),
                    )
                )
            if isinstance(owner, _BatchNorm) and owner.running_var is not None and owner.running_mean is not None:
                var = owner.running_var.detach().double()
                mean = owner.running_mean.detach().double()
                finite_var = var[torch.isfinite(var)]
                tracked = owner.num_batches_tracked
                batchnorms.append(
                    BatchNormBuffers(
                        module=owner_path,
                        type=type(owner).__name__,
                        channels=var.numel(),
                        nonpositive_var=int((~(var > 0)).sum()),
                        min_var=float(finite_var.min()) if finite_var.numel() else None,
                        num_batches_tracked=int(tracked) if tracked is not None else None,
                        default_stats=bool((mean == 0).all() and (var == 1).all()),
                    )
                )
    return CheckpointScan(nonfinite=tuple(nonfinite), batchnorms=tuple(batchnorms))


def scan_onnx(path: Path) -> CheckpointScan:
    """The same scan over an ONNX file's stored tensors (initializers, and the parameters of the
    parameter map held in Constant nodes); BatchNormalization's running variance is its fifth
    input, wherever it is stored. ONNX keeps no ``num_batches_tracked``, so 'never updated' cannot be told."""
    import numpy as np
    from onnx import numpy_helper

    from gradcheck_cli.model.onnx_load import onnx_model_from_path
    from gradcheck_cli.onnx.params import parameter_map

    # The checked loader: external data outside the model's directory, sizes that do not match
    # their data, cyclic graphs are refused here too (this runs before the probe's own load).
    model = onnx_model_from_path(path)
    pmap = parameter_map(model.graph)
    nonfinite: list[NonFiniteTensor] = []
    for name, source in pmap.sources.items():
        # Constant nodes other than parameters may hold -inf on purpose (an attention mask).
        if source.node is not None and not pmap.is_parameter(name):
            continue
        array = numpy_helper.to_array(source.tensor)
        finite = np.isfinite(array)
        if bool(finite.all()):
            continue
        nan = int(np.isnan(array).sum())
        nonfinite.append(
            NonFiniteTensor(name=name, module=name, nan=nan, inf=int((~finite).sum()) - nan, count=int(array.size))
        )
    batchnorms: list[BatchNormBuffers] = []
    for node in model.graph.node:
        stored = pmap.value(node.input[4]) if node.op_type == "BatchNormalization" and len(node.input) >= 5 else None
        if stored is None:
            continue
        var = stored.astype(np.float64).ravel()
        finite_var = var[np.isfinite(var)]
        batchnorms.append(
            BatchNormBuffers(
                module=node.name or node.input[4],
                type="BatchNormalization",
                channels=int(var.size),
                nonpositive_var=int((~(var > 0)).sum()),
                min_var=float(finite_var.min()) if finite_var.size else None,
                num_batches_tracked=None,
                default_stats=False,
            )
        )
    return CheckpointScan(nonfinite=tuple(nonfinite), batchnorms=tuple(batchnorms))
