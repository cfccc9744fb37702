"""Read and write ONNX models, external data included, without ever leaving the model's directory.

An ONNX file may keep large tensors in side files named by a relative ``location``. A crafted
model can point that location at ``../../etc/passwd`` or an absolute path; onnx would read it
(and a writer would overwrite it). We refuse any location that resolves outside the directory
of the model file, on read, and always write side files next to the output.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradcheck_cli.errors import GradcheckError, LoadError
from gradcheck_cli.fsutil import atomic_path

if TYPE_CHECKING:
    import onnx

# protobuf cannot serialise a message over 2 GiB; above this, tensors go to a side file.
_PROTOBUF_LIMIT = 2 * 1024**3 - 64 * 1024**2


def onnx_model_from_path(path: Path, *, load_external_data: bool = True) -> onnx.ModelProto:
    """Load an ONNX model with its external data, refusing locations outside its directory."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise LoadError(
            f"{path} could not be parsed as an ONNX model: {_first_line(exc)}",
            hint="the file may be truncated, or not an ONNX model",
        ) from exc
    base = (path.parent if str(path.parent) else Path(".")).resolve()
    locations = external_data_locations(model)
    for location in locations:
        resolved = (base / location).resolve()
        if not resolved.is_relative_to(base):
            raise LoadError(
                f"{path} refers to external data at '{location}', outside the model's "
                "directory; gradcheck does not read files outside it",
                hint="move the data file next to the model and fix its location",
            )
        if load_external_data and not resolved.is_file():
            raise LoadError(
                f"{path} refers to external data '{location}', which does not exist",
                hint="copy the data file next to the model",
            )
    if locations and load_external_data:
        try:
            onnx.load_external_data_for_model(model, str(base))
        except Exception as exc:
            raise LoadError(
                f"{path}: its external data could not be read: {_first_line(exc)}",
                hint="the data file may be truncated or belong to another model",
            ) from exc
    return model


def external_data_locations(model: onnx.ModelProto) -> list[str]:
    """The distinct side-file locations the model's tensors refer to, in order of appearance."""
    import onnx

    seen: dict[str, None] = {}
    for tensor in _all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    seen.setdefault(entry.value, None)
    return list(seen)


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Initializers and tensor attributes, in every subgraph (If/Loop/Scan bodies included)."""
    import onnx

    def walk(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
        yield from graph.initializer
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR:
                    yield attribute.t
                elif attribute.type == onnx.AttributeProto.TENSORS:
                    yield from attribute.tensors
                elif attribute.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attribute.g)
                elif attribute.type == onnx.AttributeProto.GRAPHS:
                    for sub in attribute.graphs:
                        yield from walk(sub)

    yield from walk(model.graph)


def onnx_model_to_path(
    model: onnx.ModelProto, out: Path, *, external_data: bool | None = None
) -> None:
    """Write ``model`` to ``out`` atomically; side data, if any, goes to ``<out name>.data``.

    ``external_data`` None means: use a side file only when the model is too large for one
    protobuf message. The caller's ``model`` is not modified (the external-data conversion
    happens on a copy).
    """
    import onnx

    use_external = model.ByteSize() > _PROTOBUF_LIMIT if external_data is None else external_data
    parent = out.parent if str(out.parent) else Path(".")
    if not use_external:
        data = model.SerializeToString()
        with atomic_path(out) as tmp:
            tmp.write_bytes(data)
        return
    data_name = f"{out.name}.data"
    # onnx appends to an existing data file, so write into a fresh scratch directory in the
    # destination directory (same filesystem), then move the data file and the model into place.
    staged = onnx.ModelProto()
    staged.CopyFrom(model)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=parent) as scratch_dir:
        scratch = Path(scratch_dir)
        try:
            onnx.save_model(
                staged,
                str(scratch / out.name),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
        except Exception as exc:
            raise GradcheckError(
                f"could not write {out}: {_first_line(exc)}",
                hint="check free disk space and permissions; nothing was written",
            ) from exc
        if (scratch / data_name).exists():
            os.replace(scratch / data_name, parent / data_name)
        os.replace(scratch / out.name, out)


def check_onnx_model(model: onnx.ModelProto) -> str | None:
    """Run ``onnx.checker`` with the full check (shape inference); None if it passes."""
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        return _first_line(exc)
    return None


def opset_of(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def numpy_of(tensor: onnx.TensorProto) -> Any:
    """The tensor's values as a numpy array (a copy, safe to modify)."""
    from onnx import numpy_helper

    return numpy_helper.to_array(tensor).copy()
