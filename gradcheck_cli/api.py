"""The library API: every command is one call here. Nothing in this module prints.

    from gradcheck_cli import api
    report = api.inspect(Path("model.pt"), load=api.LoadOptions(arch="model.py:build"))
    print(report.to_dict()["layers"][0])
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradcheck_cli.probe.batch import InputOptions
from gradcheck_cli.probe.options import LossKind, Mode, ProbeOptions
from gradcheck_cli.records import Report

if TYPE_CHECKING:
    from torch import nn

    from gradcheck_cli.model.handle import LoadedModel
    from gradcheck_cli.probe.run import Progress

__all__ = ["InputOptions", "LoadOptions", "LossKind", "Mode", "ProbeOptions", "inspect",
           "inspect_model", "inspect_module", "load"]


@dataclass(frozen=True)
class LoadOptions:
    arch: str | None = None
    arch_kwargs: dict[str, Any] | None = None
    strict: bool = True
    trust_pickle: bool = False
    # Probe a model whose weights hold NaN/Inf instead of refusing it (the report then shows
    # where the non-finite values go).
    allow_nonfinite: bool = False


def load(path: Path, options: LoadOptions | None = None, *, device: str = "cpu") -> LoadedModel:
    """Load any supported PyTorch model file (format detected from its content)."""
    from gradcheck_cli.model.torch_load import model_from_path

    options = options or LoadOptions()

    return model_from_path(path, arch=options.arch, arch_kwargs=options.arch_kwargs, strict=options.strict,
                           trust_pickle=options.trust_pickle, device=device)


def inspect(path: Path, *, load_options: LoadOptions | None = None, probe: ProbeOptions | None = None,
            progress: Progress | None = None) -> Report:
    """Load ``path`` and probe it: one row per layer and activation call, in execution order."""
    load_options = load_options or LoadOptions()
    probe = probe or ProbeOptions()
    loaded = load(path, load_options, device=probe.device)
    if not load_options.allow_nonfinite:
        check_finite_weights(loaded)
    return inspect_model(loaded, probe, progress=progress)


def inspect_model(loaded: LoadedModel, probe: ProbeOptions | None = None, *,
                  progress: Progress | None = None) -> Report:
    """Probe an already loaded model."""
    from gradcheck_cli.probe.run import run_probe

    return run_probe(loaded, probe or ProbeOptions(), progress=progress)


def inspect_module(module: nn.Module, probe: ProbeOptions | None = None, *, name: str = "<module>",
                   progress: Progress | None = None) -> Report:
    """Probe an in-memory ``nn.Module``; its mode, gradients and buffers are restored afterwards."""
    from gradcheck_cli.model.formats import ModelFormat
    from gradcheck_cli.model.handle import LoadedModel
    from gradcheck_cli.probe.run import run_probe

    loaded = LoadedModel(path=Path(name), format=ModelFormat.TORCH_ZIP, module=module)
    return run_probe(loaded, probe or ProbeOptions(), progress=progress)


def check_finite_weights(loaded: LoadedModel) -> None:
    """Refuse weights with NaN/Inf: every statistic downstream of them would be meaningless."""
    import torch

    from gradcheck_cli.errors import LoadError

    for name, tensor in list(loaded.module.named_parameters()) + list(loaded.module.named_buffers()):
        if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise LoadError(f"{loaded.path}: '{name}' holds {bad} NaN/Inf value(s) of {tensor.numel()}",
                            hint="restore a checkpoint from before training diverged, or pass "
                            "--allow-nonfinite to probe it anyway")
