"""The one definition of a model's parameter count, used by every report that shows one.

A parameter is a trainable tensor of the model, counted once however many layers share it:

- PyTorch: the ``nn.Parameter``s of the module, each shared (tied) one once. Buffers (BatchNorm's
  running statistics, ``num_batches_tracked``, registered constants) are not parameters.
- ONNX: the initializers that are parameters of the source model, as the ONNX probe's graph plan
  assigns them (:func:`gradcheck_cli.onnx.plan.plan_rows`): floating-point layer weights, each
  shared one once; BatchNorm's running statistics, integer shape tensors and scalar constants are
  not. An exporter that merged equal parameters into one initializer behind Identity aliases
  (the legacy exporter does so for every fresh BatchNorm's ones and zeros) still counts one per
  alias, as the separate PyTorch parameters they were exported from.

So a model exported from PyTorch to ONNX has the same count in both, and ``inspect`` and
``fold-bn``'s "before" agree on the same file. (Counting every ONNX initializer, as fold-bn once
did, added the BatchNorms' running statistics.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from gradcheck_cli.onnx.plan import GraphPlan


def module_parameter_count(module: nn.Module) -> int:
    """Elements of the module's parameters; ``parameters()`` yields a shared one only once."""
    return sum(p.numel() for p in module.parameters())


def onnx_parameter_count(plan: GraphPlan) -> int:
    """Elements of the graph's parameters, as its plan (:func:`gradcheck_cli.onnx.plan.plan_rows`)
    sizes them: every trainable leaf, initializer or Constant-held (Paddle2ONNX), one per alias."""
    return sum(plan.numel[key] for key in plan.trainable)
