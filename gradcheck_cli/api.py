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
    from gradcheck_cli.rewrite.fold_records import FoldReport
    from gradcheck_cli.rewrite.reinit_records import ReinitReport
    from gradcheck_cli.rules import Rule

__all__ = [
    "InputOptions",
    "LoadOptions",
    "LossKind",
    "Mode",
    "ProbeOptions",
    "check",
    "fold_batchnorm",
    "inspect",
    "inspect_model",
    "inspect_module",
    "inspect_onnx",
    "load",
    "reinit",
]


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
    if _is_onnx(path):
        report = inspect_onnx(path, probe=probe, allow_nonfinite=load_options.allow_nonfinite, progress=progress)
        if load_options.arch is not None:
            from dataclasses import replace

            ignored = f"--arch {load_options.arch} was ignored: an ONNX model carries its own graph"
            report = replace(report, notes=(*report.notes, ignored))
        return report
    loaded = load(path, load_options, device=probe.device)
    if not load_options.allow_nonfinite:
        check_finite_weights(loaded)
    return inspect_model(loaded, probe, progress=progress)


def _is_onnx(path: Path) -> bool:
    from gradcheck_cli.model.formats import ModelFormat, detect_format

    return detect_format(path) is ModelFormat.ONNX


def inspect_onnx(path: Path, *, probe: ProbeOptions | None = None, allow_nonfinite: bool = False,
                 progress: Progress | None = None) -> Report:
    """Probe an ONNX model: activation statistics from onnxruntime on the real graph, gradients
    from gradcheck's torch lowering of it (checked against onnxruntime; see ``probe.lowering``)."""
    from gradcheck_cli.onnx.run import run_onnx_probe

    return run_onnx_probe(path, probe or ProbeOptions(), progress=progress, allow_nonfinite=allow_nonfinite)


def inspect_model(loaded: LoadedModel, probe: ProbeOptions | None = None, *,
                  progress: Progress | None = None) -> Report:
    """Probe an already loaded model."""
    from gradcheck_cli.model.torch_load import resolve_device
    from gradcheck_cli.probe.run import run_probe
    from gradcheck_cli.threads import probe_threads

    probe = probe or ProbeOptions()
    with probe_threads(loaded.module, resolve_device(probe.device).type):
        return run_probe(loaded, probe, progress=progress)


def inspect_module(module: nn.Module, probe: ProbeOptions | None = None, *, name: str = "<module>",
                   progress: Progress | None = None) -> Report:
    """Probe an in-memory ``nn.Module``; its mode, gradients and buffers are restored afterwards."""
    from gradcheck_cli.model.formats import ModelFormat
    from gradcheck_cli.model.handle import LoadedModel

    loaded = LoadedModel(path=Path(name), format=ModelFormat.TORCH_ZIP, module=module)
    return inspect_model(loaded, probe, progress=progress)


def check_finite_weights(loaded: LoadedModel) -> None:
    """Refuse weights with NaN/Inf: every statistic downstream of them would be meaningless."""
    import torch

    from gradcheck_cli.errors import LoadError

    for name, tensor in list(loaded.module.named_parameters()) + list(loaded.module.named_buffers()):
        if not tensor.dtype.is_floating_point or tensor.numel() == 0:
            continue
        # NaN propagates through min/max, so finite extremes mean finite values: one vectorised
        # pass (isfinite().all() took 36x as long on bfloat16 weights).
        low, high = torch.aminmax(tensor.detach())
        if not bool(torch.isfinite(low) & torch.isfinite(high)):
            bad = int((~torch.isfinite(tensor)).sum())
            raise LoadError(f"{loaded.path}: '{name}' holds {bad} NaN/Inf value(s) of {tensor.numel()}",
                            hint="restore a checkpoint from before training diverged, or pass "
                            "--allow-nonfinite to probe it anyway")


def check(path: Path, *, load_options: LoadOptions | None = None, probe: ProbeOptions | None = None,
          rules: tuple[Rule, ...] | None = None, progress: Progress | None = None) -> Report:
    """What ``gradcheck check`` computes for one model: the checkpoint scanned (NaN/Inf tensors
    are findings, not errors), the probe report with ``init`` measured, and the rules' findings."""
    from gradcheck_cli.check import check_path
    from gradcheck_cli.rules import RULES

    return check_path(path, load_options=load_options or LoadOptions(), probe=probe or ProbeOptions(),
                      rules=RULES if rules is None else rules, progress=progress)


def fold_batchnorm(path: Path, **options: Any) -> FoldReport:
    """Fold every exactly foldable BatchNorm, verify, write (a safe rewrite). See
    :func:`gradcheck_cli.rewrite.fold.fold_batchnorm` for the options."""
    from gradcheck_cli.rewrite.fold import fold_batchnorm as run_fold

    return run_fold(path, **options)


def reinit(path: Path, **options: Any) -> ReinitReport:
    """Re-initialise layers and probe before and after (an unsafe rewrite). See
    :func:`gradcheck_cli.rewrite.reinit.reinit` for the options."""
    from gradcheck_cli.rewrite.reinit import reinit as run_reinit

    return run_reinit(path, **options)
