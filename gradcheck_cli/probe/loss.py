"""The scalar the probe differentiates, chosen so micro-batching is exact.

Each micro-batch contributes ``sum of per-sample losses / total samples``; summing the
micro-batches' gradients then gives exactly the gradient of the mean loss over the whole
probe. Random targets are drawn once for the whole probe from their own seeded generator and
sliced per micro-batch, so they do not depend on how the probe is split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gradcheck_cli.errors import LoadError, ProbeError, UsageError, first_line
from gradcheck_cli.options import LossKind

if TYPE_CHECKING:
    from pathlib import Path

    import torch


def select_output(output: Any, selector: str | None) -> tuple[torch.Tensor, str]:
    """The tensor the loss is taken from, and a label saying which one it was."""
    import torch

    if isinstance(output, torch.Tensor):
        if selector not in (None, "0"):
            raise UsageError(
                f"`model_output` {selector!r}: the model returns a single tensor", hint="drop `model_output`"
            )
        return output, "output"
    if isinstance(output, dict) or hasattr(output, "keys"):
        mapping = {str(k): v for k, v in output.items()}
        tensors = {k: v for k, v in mapping.items() if isinstance(v, torch.Tensor)}
        key = selected_key(list(tensors), selector)
        if key is None:
            raise UsageError(
                f"`model_output` {selector!r} does not name a tensor output of the model",
                hint=f"the model returns: {', '.join(tensors) or 'no tensors'}",
            )
        return tensors[key], f"output[{key!r}]"
    if isinstance(output, (tuple, list)):
        if selector is None:
            for index, item in enumerate(output):
                if isinstance(item, torch.Tensor):
                    return item, f"output[{index}]"
        elif selector.lstrip("-").isdigit() and -len(output) <= int(selector) < len(output):
            item = output[int(selector)]
            if isinstance(item, torch.Tensor):
                return item, f"output[{int(selector)}]"
        raise UsageError(
            f"`model_output` {selector!r} does not pick a tensor among the model's {len(output)} outputs",
            hint="pass the index of a tensor output",
        )
    raise ProbeError(
        f"the model returned a {type(output).__name__}, not a tensor",
        hint="wrap the model so that it returns a tensor (or a tuple/dict of tensors)",
    )


def selected_key(keys: list[str], selector: str | None) -> str | None:
    """Which of a mapping's tensor outputs the loss is taken from: `model_output` (a key or an
    index), else 'logits', else the first."""
    if selector is None:
        return "logits" if "logits" in keys else next(iter(keys), None)
    if selector.isdigit() and selector not in keys:
        return keys[int(selector)] if int(selector) < len(keys) else None
    return selector if selector in keys else None


def model_loss(output: Any, batch_size: int, total: int) -> torch.Tensor:
    """The loss a transformers head computed (a mean over this micro-batch's tokens), weighted so
    that equal micro-batches sum to the mean over the whole probe."""
    import torch

    loss = output.get("loss") if hasattr(output, "get") else getattr(output, "loss", None)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise ProbeError(
            "the model was given labels but returned no scalar 'loss'",
            hint="use `loss` cross_entropy or mse to compute the loss from its output",
        )
    return loss * (batch_size / total)


def from_sigmoid(output: torch.Tensor) -> bool:
    """Whether autograd recorded ``output`` as a sigmoid's result (eager, exported and lowered ONNX
    graphs alike)."""
    return output.grad_fn is not None and type(output.grad_fn).__name__.startswith("SigmoidBackward")


def resolve_loss(kind: LossKind, output: torch.Tensor, *, sigmoid_output: bool = False) -> LossKind:
    if kind is not LossKind.AUTO:
        return kind
    if sigmoid_output or from_sigmoid(output):
        return LossKind.BCE
    if output.dim() == 2 and output.shape[1] >= 2 and output.dtype.is_floating_point:
        return LossKind.CROSS_ENTROPY
    return LossKind.MSE


@dataclass
class LossFunction:
    """The probe loss over ``total`` samples, with its targets drawn on first use."""

    kind: LossKind
    total: int
    seed: int
    target_file: Path | None = None
    # The output is a sigmoid's, known from the graph where autograd cannot tell (onnxruntime's
    # outputs, which the ONNX probe's reference loss is computed on).
    sigmoid_output: bool = False
    _targets: torch.Tensor | None = None
    _offset: int = 0

    def seek(self, offset: int) -> None:
        """Take the next targets from sample ``offset`` of the probe batch (a rank's share of it)."""
        self._offset = offset

    def __call__(self, output: torch.Tensor) -> torch.Tensor:

        if not output.dtype.is_floating_point:
            raise ProbeError(
                f"the model output has dtype {output.dtype}; a loss needs floating-point outputs",
                hint="pick a float output with `model_output`",
            )
        if not output.requires_grad:
            raise ProbeError(
                "the model output does not depend on any parameter, so there is no gradient to measure",
                hint="check that the model has trainable parameters",
            )
        kind = resolve_loss(self.kind, output, sigmoid_output=self.sigmoid_output)
        self.kind = kind
        n = int(output.shape[0]) if output.dim() else 1
        targets = self._take(kind, output, n)
        if self.target_file is None:
            return self._loss(kind, output, targets)
        try:
            return self._loss(kind, output, targets)
        except (RuntimeError, ValueError, IndexError) as exc:  # the user's targets do not fit
            text = first_line(exc, 200)
            raise LoadError(
                f"`target` {self.target_file} (shape {tuple(targets.shape)}, {targets.dtype}) does not "
                f"fit the {kind.value} loss on outputs of shape {tuple(output.shape)}: {text}",
                hint="cross_entropy needs integer class labels of shape (N,); mse and bce need targets "
                "shaped like the output; or pick another `loss`",
            ) from exc

    def _loss(self, kind: LossKind, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        if kind is LossKind.CROSS_ENTROPY:
            if output.dim() < 2:
                raise UsageError("`loss` cross_entropy needs (N, C) logits", hint="use `loss` mse")
            return F.cross_entropy(output.float(), targets, reduction="sum") / self.total
        if kind is LossKind.MSE:
            per_sample = output[0].numel() if output.dim() else 1
            return (output.float() - targets).pow(2).sum() / (self.total * per_sample)
        if kind is LossKind.BCE:
            per_sample = output[0].numel() if output.dim() else 1
            probabilities = output.float()
            # NaN passes: a non-finite output is a finding of the probe, not a wrong loss.
            if bool(((probabilities < 0) | (probabilities > 1)).any()):
                raise UsageError(
                    "`loss` bce needs probabilities in [0, 1]; the output leaves that range",
                    hint="use `loss` mse, or pick a probability output with `model_output`",
                )
            # Written out rather than F.binary_cross_entropy, which refuses NaN; logs are clamped at
            # -100 as torch's is, so a probability of exactly 0 or 1 gives a finite loss.
            import torch

            log_p = torch.log(probabilities).clamp(min=-100.0)
            log_q = torch.log1p(-probabilities).clamp(min=-100.0)
            summed = -(targets * log_p + (1.0 - targets) * log_q).sum()
            return summed / (self.total * per_sample)
        return output.float().sum() / self.total

    def _take(self, kind: LossKind, output: torch.Tensor, n: int) -> torch.Tensor:
        import torch

        if kind is LossKind.SUM:
            return torch.zeros(())
        if self._targets is None:
            self._targets = self._load_or_draw(kind, output)
        chunk = self._targets[self._offset : self._offset + n]
        self._offset += n
        if chunk.shape[0] != n:
            raise LoadError(
                f"`target` holds {self._targets.shape[0]} samples, fewer than the probe's {self.total}",
                hint="give one target per probe sample",
            )
        if self._offset >= self._targets.shape[0]:
            # The last micro-batch's targets: the loss's graph does not keep them, so they need not
            # outlive it through the backward pass (the bare step's targets are a temporary too).
            self._targets = None
        return chunk.to(output.device)

    def _load_or_draw(self, kind: LossKind, output: torch.Tensor) -> torch.Tensor:
        import torch

        sample_shape = tuple(output.shape[1:])
        if self.target_file is not None:
            targets = _read_target(self.target_file)
            if kind is LossKind.CROSS_ENTROPY:
                return targets.long()
            if tuple(targets.shape[1:]) != sample_shape:
                raise LoadError(
                    f"`target` has per-sample shape {tuple(targets.shape[1:])}, the output {sample_shape}",
                    hint="targets must match the selected output",
                )
            return targets.float()
        generator = torch.Generator().manual_seed(self.seed + 1_000_003)
        if kind is LossKind.CROSS_ENTROPY:
            classes = int(output.shape[1])
            return torch.randint(0, classes, (self.total, *output.shape[2:]), generator=generator)
        if kind is LossKind.BCE:
            return torch.rand((self.total, *sample_shape), generator=generator)
        return torch.randn((self.total, *sample_shape), generator=generator)


def _read_target(path: Path) -> torch.Tensor:

    from gradcheck_cli.probe.batch import read_input_file

    args, kwargs = read_input_file(path, "`target`")
    tensors = list(args) + list(kwargs.values())
    if len(tensors) != 1:
        raise LoadError(
            f"`target` {path} must hold exactly one tensor, found {len(tensors)}",
            hint="save one tensor of labels or targets",
        )
    target: torch.Tensor = tensors[0]
    return target
