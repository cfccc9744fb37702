"""Checkpoint tensors, scanned before anything runs: non-finite values and BatchNorm buffers.

These are the problems a probe would only show second-hand (every row downstream of a NaN
weight is NaN too), so they are read straight from the loaded module and named by the
tensor's own state_dict key. torch is imported inside the function; the records are plain.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradcheck_cli.choice import Choice

if TYPE_CHECKING:
    import torch
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
    # gamma one constant (1, or 0 for a zero-init residual gate) and beta all 0, or no affine
    # parameters at all: what a constructor (and timm/torchvision's zero-init) leaves. Trained
    # affine parameters are never all equal.
    default_affine: bool = True
    # Mean of gamma (None without affine parameters): a gamma drawn at random at init (RepVGG:
    # N(0.1, 0.1)) sits far from the 1 that training starts from.
    gamma_mean: float | None = None

    @property
    def never_updated(self) -> bool:
        """No training step ever updated the running statistics (the eval-mode BN is then the
        identity up to gamma/beta, whatever the data the model was trained on). A checkpoint
        without a counter counts when its statistics are the defaults."""
        return self.num_batches_tracked in (0, None) and self.default_stats

    @property
    def updated(self) -> bool:
        """The running statistics moved: the model ran in train mode (a training evidence)."""
        return bool(self.num_batches_tracked) or not self.default_stats


class GateKind(Choice):
    """How a zero-initialised branch is spelled (module or functional, any name)."""

    NORM_SCALE = "norm-scale"  # a norm's gamma at 0: timm zero_init_last, torchvision zero_init_residual
    # A scalar or vector parameter at 0 (ReZero/SkipInit alpha) or at one tiny constant (LayerScale,
    # 1e-6 in ConvNeXt/EdgeNeXt, 1e-5 in CaiT: the same design, not quite closed).
    SCALE = "scale"
    ZERO_MATRIX = "zero-matrix"  # a Linear/Conv weight (and bias) at 0: LoRA B, DiT adaLN-zero


@dataclass(frozen=True)
class ZeroParameter:
    """A parameter that is exactly zero everywhere and multiplies something (not a bias): the
    candidate gate of a zero-initialised branch. Whether it gates anything is decided from the
    gradients (see :func:`gradcheck_cli.gate.check.check_module`), not from its name."""

    name: str  # state_dict key
    module: str
    kind: GateKind
    count: int


@dataclass(frozen=True)
class CheckpointScan:
    nonfinite: tuple[NonFiniteTensor, ...] = ()
    batchnorms: tuple[BatchNormBuffers, ...] = ()
    zero_parameters: tuple[ZeroParameter, ...] = ()
    # Top-level keys of the checkpoint dict that only a training loop writes ('optimizer',
    # 'epoch', ...): evidence that the weights are trained, whatever their distribution.
    training_keys: tuple[str, ...] = ()
    # (passed, tested): of a sample of the Linear/Conv weights, how many pass the init-draw test;
    # measured only when a BatchNorm has default statistics but non-default gamma/beta, to tell
    # an affine randomised at init (RepVGG) from one trained with the statistics frozen.
    init_draws: tuple[int, int] | None = None

    @property
    def never_trained(self) -> tuple[BatchNormBuffers, ...]:
        """BatchNorms that belong to a model never trained: statistics never updated, and gamma/beta
        at their defaults or drawn at init (:attr:`affine_drawn_at_init`)."""
        drawn = self.affine_drawn_at_init
        return tuple(bn for bn in self.batchnorms if bn.never_updated and (bn.default_affine or drawn))

    @property
    def affine_drawn_at_init(self) -> bool:
        """The BatchNorms' gamma/beta were drawn at random at init rather than trained: every
        BatchNorm with default statistics but non-default gamma/beta has its gamma far from 1
        (more than 0.5 away on average: training moves gamma from 1 a little at a time, and
        moving it that far moves the weights too), and most sampled Linear/Conv weights are
        still an init draw (see ``init_draws``)."""
        drawn = self.init_draws is not None and self.init_draws[1] > 0 and 2 * self.init_draws[0] > self.init_draws[1]
        odd = [bn for bn in self.batchnorms if bn.never_updated and not bn.default_affine]
        return drawn and bool(odd) and all(bn.gamma_mean is not None and abs(bn.gamma_mean - 1.0) > 0.5 for bn in odd)

    @property
    def trained_batchnorm(self) -> BatchNormBuffers | None:
        """The first BatchNorm whose statistics moved (training evidence), if any."""
        return next((bn for bn in self.batchnorms if bn.updated), None)


# Checkpoint keys that a training loop writes next to the weights (lower case, exact).
TRAINING_KEYS = frozenset(
    {
        "optimizer",
        "optimizer_state_dict",
        "optim",
        "optimizer_state",
        "opt",
        "scheduler",
        "lr_scheduler",
        "scheduler_state_dict",
        "scaler",
        "epoch",
        "epochs",
        "step",
        "global_step",
        "iteration",
        "iter",
        "best_acc1",
        "best_loss",
        "train_loss",
    }
)


def training_keys(checkpoint: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The keys of ``checkpoint`` that only training writes (empty for a bare state_dict)."""
    if not checkpoint:
        return ()
    return tuple(str(key) for key in checkpoint if str(key).lower() in TRAINING_KEYS)


def _is_norm(module: nn.Module) -> bool:
    return "Norm" in type(module).__name__


def _is_linear_map(module: nn.Module) -> bool:
    from torch import nn
    from torch.nn.modules.conv import _ConvNd

    # transformers' Conv1D (GPT-2) is a Linear with a transposed weight.
    return isinstance(module, (nn.Linear, _ConvNd)) or type(module).__name__ == "Conv1D"


def zero_parameters(module: nn.Module) -> tuple[ZeroParameter, ...]:
    """Parameters that are exactly 0 everywhere and scale something: a norm's gamma, a Linear or
    Conv weight whose bias is 0 too, or any other parameter not named as a bias; and vectors
    holding one tiny constant (LayerScale). Biases are excluded because they add, so a zero bias
    gates nothing."""
    import torch

    from gradcheck_cli.torch_util import all_zero

    found: list[ZeroParameter] = []
    with torch.no_grad():
        for owner_path, owner in module.named_modules():
            for leaf, tensor in owner._parameters.items():
                if tensor is None or not tensor.dtype.is_floating_point or not tensor.numel():
                    continue
                if ("bias" in leaf or leaf == "beta") and not _single_feature_norm(owner):
                    continue
                if not all_zero(tensor) and not _tiny_constant(tensor):
                    continue
                name = f"{owner_path}.{leaf}" if owner_path else leaf
                if _is_norm(owner) and leaf == "weight":
                    kind = GateKind.NORM_SCALE
                elif _is_linear_map(owner) and leaf == "weight":
                    bias = owner._parameters.get("bias")
                    if bias is not None and not all_zero(bias):
                        continue  # a constant output, not a closed gate
                    kind = GateKind.ZERO_MATRIX
                else:  # functional spellings: a raw alpha, or a raw LoRA B used with matmul
                    kind = GateKind.ZERO_MATRIX if tensor.dim() >= 2 else GateKind.SCALE
                found.append(ZeroParameter(name=name, module=owner_path, kind=kind, count=tensor.numel()))
    return tuple(found)


def _single_feature_norm(owner: nn.Module) -> bool:
    """A LayerNorm over one feature: it normalises every value to 0, so its output is its bias
    alone, and a zero bias closes what follows as a zero gamma would (CSATv2's spatial
    attention normalises a one-channel map this way)."""
    shape = getattr(owner, "normalized_shape", None)
    return _is_norm(owner) and isinstance(shape, tuple) and math.prod(shape) == 1


# A LayerScale initialised at or below this constant gates its branch as a zero would.
TINY_SCALE = 1e-3


def _tiny_constant(tensor: torch.Tensor) -> bool:
    """A vector or scalar holding one tiny non-zero constant: a LayerScale at init (also shaped
    (C, 1, 1) to broadcast over an image, as in SwiftFormer and FastViT)."""
    if tensor.numel() != max(tensor.shape, default=1):
        return False
    first = tensor.reshape(-1)[0]
    return 0 < abs(float(first)) <= TINY_SCALE and bool((tensor == first).all())


def scan_module(
    module: nn.Module, *, checkpoint: Mapping[str, Any] | None = None, floating_finite: bool = False
) -> CheckpointScan:
    """Every floating tensor of ``module`` checked for NaN/Inf, every BatchNorm's buffers and
    affine parameters, the zero parameters that may gate a branch, and the training keys of the
    ``checkpoint`` dict the module was loaded from (None: a bare state_dict or a module).

    ``floating_finite``: the loader has already found every real floating tensor finite
    (``LoadedModel.weights_finite``), so only complex ones are read for NaN/Inf here."""
    import torch
    from torch.nn.modules.batchnorm import _BatchNorm

    from gradcheck_cli.torch_util import all_finite, open_bound

    nonfinite: list[NonFiniteTensor] = []
    batchnorms: list[BatchNormBuffers] = []
    with torch.no_grad():
        # remove_duplicate=True (the default): a tied weight is reported once, under its first name.
        for owner_path, owner in module.named_modules():
            tensors = list(owner._parameters.items()) + list(owner._buffers.items())
            for leaf, tensor in tensors:
                if tensor is None or not (tensor.dtype.is_floating_point or tensor.dtype.is_complex):
                    continue
                if (
                    (floating_finite and tensor.dtype.is_floating_point)
                    or all_finite(tensor)
                    or open_bound(owner, leaf)
                ):
                    continue
                finite = torch.isfinite(tensor)
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
                        default_affine=_default_affine(owner.weight, owner.bias),
                        gamma_mean=float(owner.weight.detach().double().mean()) if owner.weight is not None else None,
                    )
                )
    drawn = None
    if any(bn.never_updated and not bn.default_affine for bn in batchnorms):
        drawn = _init_draws(module)
    return CheckpointScan(
        nonfinite=tuple(nonfinite),
        batchnorms=tuple(batchnorms),
        zero_parameters=zero_parameters(module),
        training_keys=training_keys(checkpoint),
        init_draws=drawn,
    )


# Weights tested for ``init_draws``: evenly spaced over the model, enough for a majority.
_DRAW_SAMPLE = 16


def _init_draws(module: nn.Module) -> tuple[int, int]:
    """(passed, tested): how many of up to 16 Linear/Conv weights, spread over the model, pass the
    test every standard init draw passes (:func:`gradcheck_cli.gate.init_scale.weight_verdict`)."""
    from torch import nn
    from torch.nn.modules.conv import _ConvNd

    from gradcheck_cli.gate.init_scale import weight_verdict

    weights = [m.weight for m in module.modules() if isinstance(m, (nn.Linear, _ConvNd)) and m.weight.dim() >= 2]
    step = max(1, len(weights) // _DRAW_SAMPLE)
    sample = [w for w in weights[::step] if w.numel() >= 64][:_DRAW_SAMPLE]
    passed = sum(1 for w in sample if weight_verdict(w.detach(), out_dim=0).at_init)
    return passed, len(sample)


def _default_affine(weight: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    if weight is None or bias is None:
        return weight is None and bias is None
    gamma = weight.detach()
    first = float(gamma.reshape(-1)[0]) if gamma.numel() else 1.0
    return first in (0.0, 1.0) and bool((gamma == first).all()) and not bool(bias.detach().any())


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
