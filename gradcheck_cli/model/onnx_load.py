"""Read and write ONNX models, external data included, without ever leaving the model's directory.

An ONNX file may keep large tensors in side files named by a relative ``location``. A crafted
model can point that location at ``../../etc/passwd`` or an absolute path; onnx would read it
(and a writer would overwrite it). We refuse any location that resolves outside the directory
of the model file, on read, and always write side files next to the output.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradcheck_cli.errors import GradcheckError, LoadError, first_line
from gradcheck_cli.fsutil import atomic_path, publish, write_error

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
        raise _parse_error(path, exc) from exc
    _check_and_complete(model, path, load_external_data=load_external_data)
    return model


def onnx_model_and_bytes(path: Path) -> tuple[onnx.ModelProto, bytes | None]:
    """The model (external data loaded) and, when the file holds all of it, the file's bytes.

    The bytes are what was parsed, so they can go to onnxruntime as they are instead of a second
    serialisation of the model (a full copy of every weight). None when the model keeps tensors in
    side files: then only the loaded model is complete.
    """
    import onnx

    try:
        raw = path.read_bytes()
        model = onnx.load_from_string(raw)
    except OSError as exc:
        raise LoadError(
            f"{path} could not be read: {exc.strerror or exc}", hint="check the path and its permissions"
        ) from exc
    except Exception as exc:
        raise _parse_error(path, exc) from exc
    external = _check_and_complete(model, path, load_external_data=True)
    return model, None if external else raw


def _parse_error(path: Path, exc: BaseException) -> LoadError:
    return LoadError(
        f"{path} could not be parsed as an ONNX model: {first_line(exc)}",
        hint="the file may be truncated, or not an ONNX model",
    )


def _check_and_complete(model: onnx.ModelProto, path: Path, *, load_external_data: bool) -> bool:
    """The load-time checks; loads external data if asked. Returns whether it had any."""
    import onnx

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
            what = "is not a regular file" if resolved.exists() else "does not exist"
            raise LoadError(
                f"{path} refers to external data '{location}', which {what}",
                hint="copy the data file next to the model",
            )
    bad = _first_non_utf8_string(model)
    if bad is not None:
        raise LoadError(
            f"{path}: the field '{bad}' is not valid UTF-8 text (ONNX names are strings)",
            hint="the file is damaged; export it again",
        )
    check_declared_sizes(model, path, base)
    if locations and load_external_data:
        try:
            onnx.load_external_data_for_model(model, str(base))
        except Exception as exc:
            raise LoadError(
                f"{path}: its external data could not be read: {first_line(exc)}",
                hint="the data file may be truncated or belong to another model",
            ) from exc
    return bool(locations)


def _first_non_utf8_string(model: onnx.ModelProto) -> str | None:
    """The name of a string field holding invalid UTF-8, or None. onnx.proto is proto2, where
    protobuf hands such fields back as bytes instead of failing, and every name lookup downstream
    would then break on them."""
    from google.protobuf.descriptor import FieldDescriptor  # type: ignore[import-untyped]
    from google.protobuf.message import Message  # type: ignore[import-untyped]

    stack: list[Any] = [model]
    while stack:
        message = stack.pop()
        for field, value in message.ListFields():
            # A repeated field's value is a container; a singular one the message or string itself.
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                stack.extend([value] if isinstance(value, Message) else value)
            elif field.type == FieldDescriptor.TYPE_STRING:
                values = [value] if isinstance(value, (str, bytes)) else value
                if any(isinstance(v, bytes) for v in values):
                    return str(field.full_name)
    return None


# A graph input may declare at most this many elements (per input, batch included) before gradcheck
# refuses to synthesise it: 2**31 float32 values are 8 GiB, far beyond any probe batch.
MAX_INPUT_ELEMENTS = 2**31
# Subgraph nesting (If/Loop/Scan bodies) deeper than this is refused: real models nest a few levels.
# (protobuf itself refuses messages nested over 100 deep, about 33 subgraph levels, at parse time.)
MAX_SUBGRAPH_DEPTH = 16


def check_declared_sizes(model: onnx.ModelProto, path: Path, base: Path) -> None:
    """Refuse, before anything is allocated, a model whose declarations cannot be honest: a tensor
    whose data does not have its declared size, external data past the end of its file, an input
    declaring an enormous shape, subgraphs nested absurdly deep, a cyclic graph."""
    import math

    import onnx

    for tensor in _all_tensors(model):
        if any(d < 0 for d in tensor.dims):
            raise LoadError(
                f"{path}: tensor '{tensor.name}' declares a negative dimension {list(tensor.dims)}",
                hint="the model is damaged or crafted; export it again",
            )
        numel = math.prod(tensor.dims)
        itemsize = _ITEMSIZE.get(tensor.data_type)
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            entries = {entry.key: entry.value for entry in tensor.external_data}
            try:
                offset = int(entries.get("offset", "0") or 0)
                length = int(entries["length"]) if entries.get("length") else None
            except ValueError as exc:
                raise LoadError(
                    f"{path}: tensor '{tensor.name}' has an invalid external-data offset or length",
                    hint="the model is damaged or crafted; export it again",
                ) from exc
            declared = numel * itemsize if itemsize is not None else None
            if length is not None and declared is not None and length != declared:
                raise LoadError(
                    f"{path}: tensor '{tensor.name}' declares shape {list(tensor.dims)} "
                    f"({declared} bytes) but its external data is {length} bytes",
                    hint="the model and its data file do not match; export it again",
                )
            needed = length if length is not None else declared
            data_file = base / entries.get("location", "")
            if needed is not None and data_file.is_file() and offset + needed > data_file.stat().st_size:
                raise LoadError(
                    f"{path}: tensor '{tensor.name}' reads {needed} bytes at offset {offset} of "
                    f"'{entries.get('location')}', past its end ({data_file.stat().st_size} bytes)",
                    hint="the data file is truncated or belongs to another model",
                )
            continue
        stored = _stored_elements(tensor, itemsize)
        if stored is not None and stored != numel:
            raise LoadError(
                f"{path}: tensor '{tensor.name}' declares shape {list(tensor.dims)} ({numel} values) "
                f"but holds {stored}",
                hint="the model is damaged or crafted; export it again",
            )
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim if value.type.HasField("tensor_type") else []
        # A negative dim_value on an input is a dynamic dimension, as onnxruntime reads it
        # (Paddle2ONNX declares batch as -1), and zero allocates nothing: neither is damage. Tensor data with a negative
        # dimension (above) stays refused: a stored tensor has a size.
        static = [d.dim_value for d in dims if d.HasField("dim_value") and d.dim_value > 0]
        if math.prod(static) > MAX_INPUT_ELEMENTS:
            raise LoadError(
                f"{path}: input '{value.name}' declares shape {static} ({math.prod(static)} values), "
                f"more than gradcheck will allocate for a probe ({MAX_INPUT_ELEMENTS})",
                hint="export the model with a dynamic batch dimension and pass `input_shape`",
            )
    depth = _subgraph_depth(model.graph)
    if depth > MAX_SUBGRAPH_DEPTH:
        raise LoadError(
            f"{path}: subgraphs nest {depth} levels deep (at most {MAX_SUBGRAPH_DEPTH} are read)",
            hint="the model is damaged or crafted",
        )
    cycle = _cycle_node(model.graph)
    if cycle is not None:
        raise LoadError(
            f"{path}: the graph has a cycle through node '{cycle}'; an ONNX graph must be acyclic",
            hint="the model is damaged or crafted; export it again",
        )


# Bytes per element of the fixed-size ONNX data types (strings and 4-bit types are not checked).
_ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 14: 8, 15: 16, 16: 2}


def _stored_elements(tensor: onnx.TensorProto, itemsize: int | None) -> int | None:
    """How many values the tensor actually carries (None: a type or layout not checked here)."""
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data) // itemsize if itemsize else None
    # Typed fields; complex values take two floats, float16/bfloat16/bool/int8.. sit in int32_data.
    for field, per_value in (
        ("float_data", 1),
        ("double_data", 1),
        ("int64_data", 1),
        ("uint64_data", 1),
        ("int32_data", 1),
    ):
        values = len(getattr(tensor, field))
        if values:
            if tensor.data_type in (14, 15) and field in ("float_data", "double_data"):
                per_value = 2
            return values // per_value
    if tensor.string_data:
        return len(tensor.string_data)
    return 0 if itemsize is not None else None


def _subgraph_depth(graph: onnx.GraphProto) -> int:
    import onnx

    deepest = 0
    stack: list[tuple[onnx.GraphProto, int]] = [(graph, 0)]
    while stack:  # iterative: a crafted nesting must not hit Python's recursion limit
        current, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_SUBGRAPH_DEPTH:
            break
        for node in current.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    stack.append((attribute.g, depth + 1))
                elif attribute.type == onnx.AttributeProto.GRAPHS:
                    stack.extend((sub, depth + 1) for sub in attribute.graphs)
    return deepest


def _cycle_node(graph: onnx.GraphProto) -> str | None:
    """A node on a cycle of the top-level graph (Kahn's algorithm), or None when it is acyclic."""
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    pending = [sum(1 for name in node.input if name in producer) for node in graph.node]
    consumers: dict[int, list[int]] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            if name in producer:
                consumers.setdefault(producer[name], []).append(i)
    ready = [i for i, count in enumerate(pending) if count == 0]
    done = 0
    while ready:
        i = ready.pop()
        done += 1
        for j in consumers.get(i, []):
            pending[j] -= 1
            if pending[j] == 0:
                ready.append(j)
    if done == len(graph.node):
        return None
    stuck = graph.node[next(i for i, count in enumerate(pending) if count > 0)]
    return str(stuck.name or stuck.op_type)


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
    model: onnx.ModelProto, out: Path, *, external_data: bool | None = None, serialized: bytes | None = None
) -> None:
    """Write ``model`` to ``out`` atomically; side data, if any, goes to ``<out name>.data``.

    ``external_data`` None means: use a side file only when the model is too large for one
    protobuf message. The caller's ``model`` is not modified (the external-data conversion
    happens on a copy). ``serialized``: ``model.SerializeToString()`` when the caller already has
    it (see :func:`serialized_or_none`), written as it is.
    """
    import onnx

    use_external = (
        (serialized is None and model.ByteSize() > _PROTOBUF_LIMIT) if external_data is None else external_data
    )
    parent = out.parent if str(out.parent) else Path(".")
    if not use_external:
        data = model.SerializeToString() if serialized is None else serialized
        with atomic_path(out) as tmp:
            tmp.write_bytes(data)
        return
    data_name = f"{out.name}.data"
    # onnx appends to an existing data file, so write into a fresh scratch directory in the
    # destination directory (same filesystem), then move the data file and the model into place.
    staged = onnx.ModelProto()
    staged.CopyFrom(model)
    try:
        _write_external(staged, out, parent, data_name)
    except OSError as exc:
        raise write_error(out, exc) from exc


def _write_external(staged: onnx.ModelProto, out: Path, parent: Path, data_name: str) -> None:
    import onnx

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
                f"could not write {out}: {first_line(exc)}",
                hint="check free disk space and permissions; nothing was written",
            ) from exc
        # onnx creates the data file with mode 600: publish gives both files the umask's mode.
        if (scratch / data_name).exists():
            publish(scratch / data_name, parent / data_name)
        publish(scratch / out.name, out)


def serialized_or_none(model: onnx.ModelProto) -> bytes | None:
    """``model.SerializeToString()``, or None when it is too large for one protobuf message.

    Serialising a model copies every weight; callers that hand a model to the checker, to
    onnxruntime and to the writer serialise it once with this and pass the bytes to each.
    """
    if model.ByteSize() > _PROTOBUF_LIMIT:
        return None
    data: bytes = model.SerializeToString()
    return data


def check_onnx_model(model: onnx.ModelProto | bytes) -> str | None:
    """Run ``onnx.checker`` with the full check (shape inference); None if it passes.

    ``model`` may be the model's serialised bytes (see :func:`serialized_or_none`).
    """
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        return first_line(exc)
    return None


def opset_of(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 0


def numpy_of(tensor: onnx.TensorProto) -> Any:
    """The tensor's values as a numpy array (a copy, safe to modify)."""
    from onnx import numpy_helper

    return numpy_helper.to_array(tensor).copy()
