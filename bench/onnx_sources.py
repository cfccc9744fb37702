"""ONNX files for the zoo sweep (minimal stand-in; the ONNX helper's version of this module, with
Paddle2ONNX and other exporters' files, replaces this one at merge).

    onnx_sources(workdir, quick=...) -> [(model name, exporter, path)]

Here: torchvision's resnet18 exported by torch's legacy (TorchScript-based) exporter, keeping the
BatchNormalization nodes, and by the dynamo exporter. Files are written once into ``workdir``.
"""

from __future__ import annotations

import warnings
from pathlib import Path


def onnx_sources(workdir: Path, *, quick: bool) -> list[tuple[str, str, Path]]:
    import torch
    import torchvision

    folder = workdir / "onnx"
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    legacy, dynamo = folder / "resnet18.legacy.onnx", folder / "resnet18.dynamo.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not legacy.exists():
            torch.onnx.export(model, (x,), str(legacy), dynamo=False, do_constant_folding=False,
                              training=torch.onnx.TrainingMode.PRESERVE,
                              input_names=["input"], dynamic_axes={"input": {0: "batch"}})
        if not dynamo.exists() and not quick:
            program = torch.onnx.export(model, (x,), dynamo=True)
            assert program is not None
            program.save(str(dynamo))
    found = [("resnet18", "torch legacy", legacy)]
    if dynamo.exists():
        found.append(("resnet18", "torch dynamo", dynamo))
    return found
