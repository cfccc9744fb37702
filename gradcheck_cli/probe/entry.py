"""The probe's one entry: a model file, a loaded model or a module in, a :class:`Report` out.

PyTorch models run through the eager probe (:mod:`gradcheck_cli.probe.run`), ONNX graphs through
the ONNX probe (:mod:`gradcheck_cli.probe.onnx_probe`: statistics from onnxruntime, gradients from a torch
lowering of the graph). Both take the same :class:`ProbeOptions` and return the same records.
Never prints; torch and onnx are imported only when a model runs.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from gradcheck_cli.options import LoadOptions, ProbeOptions
from gradcheck_cli.records import Report

if TYPE_CHECKING:
    from torch import nn

    from gradcheck_cli.model.handle import LoadedModel
    from gradcheck_cli.probe.run import Progress


def inspect_path(
    path: Path, *, load: LoadOptions | None = None, probe: ProbeOptions | None = None, progress: Progress | None = None
) -> Report:
    """Load ``path`` and probe it: one row per layer and activation call, in execution order."""
    from gradcheck_cli.model.formats import is_onnx
    from gradcheck_cli.model.load import load_model

    load = load or LoadOptions()
    probe = probe or ProbeOptions()
    if is_onnx(path):
        report = inspect_onnx(path, probe=probe, allow_nonfinite=load.allow_nonfinite, progress=progress)
        if load.arch is not None:
            ignored = f"`arch` {load.arch} was ignored: an ONNX model carries its own graph"
            report = replace(report, notes=(*report.notes, ignored))
        return report
    return inspect_loaded(load_model(path, load, device=probe.device), probe, progress=progress)


def inspect_onnx(
    path: Path, *, probe: ProbeOptions | None = None, allow_nonfinite: bool = False, progress: Progress | None = None
) -> Report:
    """Probe an ONNX model: activation statistics from onnxruntime on the real graph, gradients
    from gradcheck's torch lowering of it (checked against onnxruntime; see ``probe.lowering``)."""
    from gradcheck_cli.probe.onnx_probe import run_onnx_probe

    return run_onnx_probe(path, probe or ProbeOptions(), progress=progress, allow_nonfinite=allow_nonfinite)


def inspect_loaded(
    loaded: LoadedModel, probe: ProbeOptions | None = None, *, progress: Progress | None = None
) -> Report:
    """Probe an already loaded model."""
    from gradcheck_cli.model.torch_load import resolve_device
    from gradcheck_cli.probe.run import run_probe
    from gradcheck_cli.threads import probe_threads

    probe = probe or ProbeOptions()
    with probe_threads(loaded.module, resolve_device(probe.device).type):
        return run_probe(loaded, probe, progress=progress)


def loaded_module(module: nn.Module, *, name: str = "<module>") -> LoadedModel:
    """An in-memory ``nn.Module`` as a loaded model (the probe restores its mode, gradients and
    buffers afterwards)."""
    from gradcheck_cli.model.formats import ModelFormat
    from gradcheck_cli.model.handle import LoadedModel

    return LoadedModel(path=Path(name), format=ModelFormat.TORCH_ZIP, module=module)


def inspect_module(
    module: nn.Module, probe: ProbeOptions | None = None, *, name: str = "<module>", progress: Progress | None = None
) -> Report:
    """Probe an in-memory ``nn.Module``; its mode, gradients and buffers are restored afterwards."""
    return inspect_loaded(loaded_module(module, name=name), probe, progress=progress)
