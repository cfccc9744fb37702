"""The one object every loader returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradcheck_cli.model.formats import ModelFormat

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.export import ExportedProgram


@dataclass
class LoadedModel:
    """A model ready to run, and what is needed to write it back in the format it came in.

    ``module`` is always a runnable ``nn.Module``: the architecture with the checkpoint's
    weights, the pickled module, the TorchScript module, or ``exported.module()``.
    """

    path: Path
    format: ModelFormat
    module: nn.Module
    exported: ExportedProgram | None = None
    # Example inputs stored with the model (.pt2): positional and keyword tensors.
    example_args: tuple[torch.Tensor, ...] | None = None
    example_kwargs: dict[str, torch.Tensor] | None = None
    arch: str | None = None
    # Where the state_dict sat in the file, so rewrites can put it back in the same place:
    # the keys leading to it inside the checkpoint dict, and the prefix stripped from its keys.
    state_dict_path: tuple[str, ...] = ()
    key_prefix: str = ""
    checkpoint: dict[str, Any] | None = field(default=None, repr=False)
    trusted_pickle: bool = False
    notes: list[str] = field(default_factory=list)
    # Every floating parameter and buffer was found free of NaN/Inf when the model was loaded (the
    # gate's scan need not read them again: on a 1B bf16 checkpoint each such pass reads 2.2 GB).
    weights_finite: bool = False

    @property
    def parameter_count(self) -> int:
        from gradcheck_cli.parameters import module_parameter_count

        return module_parameter_count(self.module)
