"""The probe batch: read from a file, synthesised from shapes, or inferred from the model.

Synthesised float inputs are N(0, 1) so that the variances the report shows are directly the
gain of each layer (docs/theory.md#variance-through-a-layer). Everything is drawn from one seeded generator, so
the same seed gives the same batch, and micro-batches are slices of one conceptual batch.
"""

from __future__ import annotations

import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradcheck_cli.errors import LoadError, ProbeError, UsageError, first_line
from gradcheck_cli.model.static_shapes import check_inputs, explain_forward_failure
from gradcheck_cli.options import InputOptions
from gradcheck_cli.records import InputSpec
from gradcheck_cli.torch_util import type_name

if TYPE_CHECKING:
    import torch
    from torch import nn

DEFAULT_BATCH_SIZE = 8
DEFAULT_SEQ_LEN = 16
# Spatial sizes tried, in order, when only a first conv layer tells us the channel count.
SPATIAL_CANDIDATES = (32, 28, 64, 224)

DTYPES = {
    "float32": "float32",
    "float": "float32",
    "float64": "float64",
    "double": "float64",
    "float16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "int64": "int64",
    "long": "int64",
    "int32": "int32",
    "int": "int32",
    "int16": "int16",
    "int8": "int8",
    "uint8": "uint8",
    "bool": "bool",
}


@dataclass
class ProbeBatch:
    args: tuple[torch.Tensor, ...]
    kwargs: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def size(self) -> int:
        first = self.args[0] if self.args else next(iter(self.kwargs.values()))
        return int(first.shape[0]) if first.dim() else 1


@dataclass
class ProbeInputs:
    batches: list[ProbeBatch]
    specs: tuple[InputSpec, ...]
    batch_size: int
    # The batches carry `labels` for a model that computes its own loss (a transformers LM head).
    model_loss: bool = False
    # Non-tensor keyword arguments every forward call takes (CLIP's return_loss=True).
    constants: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(batch.size for batch in self.batches)


def parse_shape(text: str) -> tuple[int, ...]:
    """'8,3,224,224' (or '8x3x224x224') to a shape tuple."""
    parts = [p for p in text.replace("x", ",").replace(" ", "").split(",") if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError as exc:
        raise UsageError(
            f"`input_shape` {text!r} is not a list of integers", hint="e.g. `input_shape` 8,3,224,224 (batch first)"
        ) from exc
    if not shape or any(d <= 0 for d in shape):
        raise UsageError(
            f"`input_shape` {text!r} must list positive sizes", hint="e.g. `input_shape` 8,3,224,224 (batch first)"
        )
    return shape


def parse_dtype(name: str) -> torch.dtype:
    import torch

    key = DTYPES.get(name.lower().removeprefix("torch."))
    if key is None:
        raise UsageError(
            f"`input_dtype` {name!r} is not a dtype gradcheck knows",
            hint="use one of " + ", ".join(sorted(set(DTYPES.values()))),
        )
    dtype: torch.dtype = getattr(torch, key)
    return dtype


def probe_inputs(
    module: nn.Module,
    options: InputOptions,
    *,
    device: torch.device,
    example_args: tuple[torch.Tensor, ...] | None = None,
    example_kwargs: dict[str, torch.Tensor] | None = None,
) -> ProbeInputs:
    """Build the probe's micro-batches, in the order of precedence file > shapes > inferred."""
    inputs = _probe_inputs(module, options, device=device, example_args=example_args, example_kwargs=example_kwargs)
    # An exported program refuses shapes it was not exported for; say so before running it.
    check_inputs(module, inputs.batches[0].args, inputs.batches[0].kwargs)
    return inputs


def _probe_inputs(
    module: nn.Module,
    options: InputOptions,
    *,
    device: torch.device,
    example_args: tuple[torch.Tensor, ...] | None,
    example_kwargs: dict[str, torch.Tensor] | None,
) -> ProbeInputs:
    import torch

    if options.batches < 1:
        raise UsageError("`batches` must be at least 1")
    if options.batch_size is not None and options.batch_size < 1:
        raise UsageError("`batch_size` must be at least 1")
    generator = torch.Generator().manual_seed(options.seed)
    if options.input is not None:
        return inputs_from_file(options, device)
    # A transformers model declares its inputs: `input_shape` only resizes them (ids stay ids over
    # the vocabulary, masks and labels stay), unless it was saved with example inputs (.pt2).
    if not (example_args or example_kwargs):
        declared = _transformers_inputs(module, options, generator, device)
        if declared is not None:
            return declared
    if options.input_shape:
        dtype = parse_dtype(options.input_dtype) if options.input_dtype else _float_dtype(module)
        shapes = [(_with_batch(s, options.batch_size), dtype, options.input_range) for s in options.input_shape]
        return synthesise(shapes, (), options, generator, device, source="synthesized")
    # An example with no tensor in it (a crafted or odd .pt2) says nothing about the inputs.
    if example_args or example_kwargs:
        args = example_args or ()
        kwargs = example_kwargs or {}
        shapes = [(_with_batch(tuple(t.shape), options.batch_size), t.dtype, _range_of(t, options)) for t in args]
        kw = [
            (name, (_with_batch(tuple(t.shape), options.batch_size), t.dtype, _range_of(t, options)))
            for name, t in kwargs.items()
        ]
        return synthesise(shapes, tuple(kw), options, generator, device, source="example")
    return _inferred(module, options, generator, device)


def _transformers_inputs(
    module: nn.Module, options: InputOptions, generator: torch.Generator, device: torch.device
) -> ProbeInputs | None:
    """The inputs a transformers model declares for itself (gradcheck_cli.model.hf), drawn: token
    ids over its vocabulary, masks of ones, N(0, 1) floats (or ``input_range``) in the model's dtype."""
    import torch

    from gradcheck_cli.model.hf import declared_inputs, is_transformers_model

    if not is_transformers_model(module):
        return None
    declaration = declared_inputs(
        module,
        batch=options.batch_size,
        seq_len=options.seq_len,
        shapes=tuple(_with_batch(s, options.batch_size) for s in options.input_shape),
    )
    if declaration is None:
        return None
    float_dtype = parse_dtype(options.input_dtype) if options.input_dtype else _float_dtype(module)
    if not float_dtype.is_floating_point:
        float_dtype = _float_dtype(module)  # an integer `input_dtype` speaks of the ids, which are int64 anyway
    keyword: list[tuple[str, Shape]] = []
    for item in declaration.inputs:
        if item.kind == "ids":
            keyword.append((item.name, (item.shape, torch.int64, (0.0, float(item.high)))))
        elif item.kind == "mask":
            keyword.append((item.name, (item.shape, torch.int64, (1.0, 2.0))))
        else:
            keyword.append((item.name, (item.shape, float_dtype, options.input_range)))
    inputs = synthesise([], tuple(keyword), options, generator, device, source="synthesized")
    inputs.model_loss = declaration.model_loss
    inputs.constants = dict(declaration.constants)
    inputs.notes = list(declaration.notes)
    return inputs


def _with_batch(shape: tuple[int, ...], batch_size: int | None) -> tuple[int, ...]:
    if batch_size is None or not shape:
        return shape
    return (batch_size, *shape[1:])


def _range_of(t: torch.Tensor, options: InputOptions) -> tuple[float, float] | None:
    if options.input_range is not None:
        return options.input_range
    if t.dtype.is_floating_point or t.numel() == 0:
        return None
    return float(t.min()), float(t.max()) + 1


def _float_dtype(module: nn.Module) -> torch.dtype:
    import torch

    for param in module.parameters():
        if param.dtype.is_floating_point:
            return param.dtype
    return torch.float32


def _draw(
    shape: tuple[int, ...], dtype: torch.dtype, value_range: tuple[float, float] | None, generator: torch.Generator
) -> torch.Tensor:
    import torch

    if dtype.is_floating_point or dtype.is_complex:
        if value_range is None:
            return torch.randn(shape, generator=generator, dtype=torch.float32).to(dtype)
        low, high = value_range
        return (torch.rand(shape, generator=generator, dtype=torch.float32) * (high - low) + low).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    low, high = value_range if value_range is not None else (0, 2)
    if int(high) <= int(low):
        raise UsageError(
            f"`input_range` {low},{high} is empty for integer inputs",
            hint="the upper bound is exclusive: e.g. `input_range` 0,1000",
        )
    return torch.randint(int(low), int(high), shape, generator=generator, dtype=dtype)


Shape = tuple[tuple[int, ...], "torch.dtype", "tuple[float, float] | None"]


def synthesise(
    positional: list[Shape],
    keyword: tuple[tuple[str, Shape], ...],
    options: InputOptions,
    generator: torch.Generator,
    device: torch.device,
    *,
    source: str,
) -> ProbeInputs:
    # Draw the whole probe at once and slice it, so that the samples do not depend on how the
    # probe is split into micro-batches (`batch_size` 8 `batches` 4 sees the same 32 samples
    # as `batch_size` 32).
    count = options.batches

    def whole(
        shape: tuple[int, ...], dtype: torch.dtype, value_range: tuple[float, float] | None
    ) -> list[torch.Tensor]:
        if not shape:
            return [_draw(shape, dtype, value_range, generator).to(device) for _ in range(count)]
        drawn = _draw((shape[0] * count, *shape[1:]), dtype, value_range, generator)
        return [part.to(device) for part in drawn.split(shape[0])]

    arg_parts = [whole(s, d, r) for s, d, r in positional]
    kwarg_parts = {name: whole(s, d, r) for name, (s, d, r) in keyword}
    batches = [
        ProbeBatch(tuple(parts[i] for parts in arg_parts), {name: parts[i] for name, parts in kwarg_parts.items()})
        for i in range(count)
    ]
    specs = [_spec(f"input_{i}", s, d, r, source) for i, (s, d, r) in enumerate(positional)]
    specs += [_spec(name, s, d, r, source) for name, (s, d, r) in keyword]
    first = positional[0][0] if positional else keyword[0][1][0]
    return ProbeInputs(batches, tuple(specs), batch_size=first[0] if first else 1)


def _spec(
    name: str, shape: tuple[int, ...], dtype: torch.dtype, value_range: tuple[float, float] | None, source: str
) -> InputSpec:
    is_int = not (dtype.is_floating_point or dtype.is_complex)
    if is_int and value_range is None:
        value_range = (0, 2)
    return InputSpec(
        name=name,
        shape=shape,
        dtype=str(dtype).removeprefix("torch."),
        source=source,
        low=value_range[0] if (is_int and value_range) else None,
        high=value_range[1] if (is_int and value_range) else None,
    )


def _inferred(
    module: nn.Module, options: InputOptions, generator: torch.Generator, device: torch.device
) -> ProbeInputs:
    import torch

    batch = options.batch_size or DEFAULT_BATCH_SIZE
    dtype = parse_dtype(options.input_dtype) if options.input_dtype else _float_dtype(module)
    first = _first_input_layer(module)
    if first is None:
        raise ProbeError(
            "cannot infer the probe input shape: the model has no Conv, Linear, Embedding "
            "or recurrent layer to read it from",
            hint="pass `input_shape` (e.g. `input_shape` 8,3,224,224) or `input` FILE",
        )
    name, kind, weight_shape, extra = first
    candidates: list[tuple[tuple[int, ...], torch.dtype, tuple[float, float] | None]]
    shape: tuple[int, ...]
    value_range: tuple[float, float] | None
    if kind == "embedding":
        vocab = weight_shape[0]
        value_range = options.input_range or (0.0, float(vocab))
        int_dtype = parse_dtype(options.input_dtype) if options.input_dtype else torch.int64
        candidates = [((batch, DEFAULT_SEQ_LEN), int_dtype, value_range)]
    elif kind == "linear":
        candidates = [((batch, weight_shape[1]), dtype, options.input_range)]
    elif kind == "rnn":
        size, batch_first = extra
        shape = (batch, DEFAULT_SEQ_LEN, size) if batch_first else (DEFAULT_SEQ_LEN, batch, size)
        candidates = [(shape, dtype, options.input_range)]
    else:  # conv with `extra` spatial dims
        channels = weight_shape[1] * int(extra[1])
        candidates = [
            ((batch, channels) + (side,) * int(extra[0]), dtype, options.input_range) for side in SPATIAL_CANDIDATES
        ]
    errors = []
    for shape, cand_dtype, value_range in candidates:
        batch_dim = 1 if kind == "rnn" and not extra[1] else 0
        trial = tuple(1 if i == batch_dim else d for i, d in enumerate(shape))
        problem = _try_forward(module, _draw(trial, cand_dtype, value_range, torch.Generator()).to(device))
        if problem is None:
            return synthesise([(shape, cand_dtype, value_range)], (), options, generator, device, source="synthesized")
        errors.append(f"{tuple(shape)}: {problem}")
    raise ProbeError(
        f"cannot infer the probe input shape from the first layer '{name}'; tried " + "; ".join(errors),
        hint="pass `input_shape` (e.g. `input_shape` 8,3,224,224) or `input` FILE",
    )


def _first_input_layer(module: nn.Module) -> tuple[str, str, tuple[int, ...], tuple[Any, ...]] | None:
    for name, sub in module.named_modules():
        kind = type_name(sub)
        weight = getattr(sub, "weight", None)
        if kind in {"Embedding", "EmbeddingBag"} and weight is not None:
            return name, "embedding", tuple(weight.shape), ()
        if kind == "Linear" and weight is not None:
            return name, "linear", tuple(weight.shape), ()
        if kind in {"Conv1d", "Conv2d", "Conv3d"} and weight is not None:
            groups = int(getattr(sub, "groups", 1))
            return name, "conv", tuple(weight.shape), (weight.dim() - 2, groups)
        if kind in {"RNN", "LSTM", "GRU"}:
            return name, "rnn", (), (int(sub.input_size), bool(getattr(sub, "batch_first", False)))
    return None


def _try_forward(module: nn.Module, x: torch.Tensor) -> str | None:
    import torch

    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            module(x)
    except Exception as exc:
        return explain_forward_failure(exc)[:160]
    finally:
        module.train(was_training)
    return None


def inputs_from_file(options: InputOptions, device: torch.device) -> ProbeInputs:
    path = options.input
    assert path is not None
    args, kwargs = read_input_file(path)
    tensors = list(args) + list(kwargs.values())
    if not tensors:
        raise LoadError(f"`input` {path} holds no tensors", hint="save a tensor, a tuple or a dict of tensors")
    sizes = {int(t.shape[0]) if t.dim() else -1 for t in tensors}
    if len(sizes) != 1 or -1 in sizes:
        raise LoadError(
            f"`input` {path}: every input needs the same leading (batch) dimension, got "
            f"shapes {[tuple(t.shape) for t in tensors]}",
            hint="stack the samples along dim 0",
        )
    total = sizes.pop()
    if total == 0:
        raise LoadError(
            f"`input` {path} holds zero samples (shapes {[tuple(t.shape) for t in tensors]})",
            hint="save at least one sample along dim 0",
        )
    batch = min(options.batch_size or total, total)
    batches = []
    for start in range(0, total, batch):
        batches.append(
            ProbeBatch(
                tuple(t[start : start + batch].to(device) for t in args),
                {k: v[start : start + batch].to(device) for k, v in kwargs.items()},
            )
        )
    specs = [
        InputSpec(
            name=f"input_{i}", shape=(batch, *t.shape[1:]), dtype=str(t.dtype).removeprefix("torch."), source="file"
        )
        for i, t in enumerate(args)
    ]
    specs += [
        InputSpec(name=k, shape=(batch, *t.shape[1:]), dtype=str(t.dtype).removeprefix("torch."), source="file")
        for k, t in kwargs.items()
    ]
    return ProbeInputs(batches, tuple(specs), batch_size=batch)


def read_input_file(path: Path, flag: str = "`input`") -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """Read probe inputs (or, with ``flag`` naming the `target` option, targets) without unpickling any object.

    .npy/.npz headers are checked against the file's size before numpy allocates the array, so a
    crafted header declaring terabytes is refused instead of exhausting memory.
    """
    import pickle

    import numpy as np
    import torch

    from gradcheck_cli.model.formats import check_regular_file

    try:
        check_regular_file(path, what="probe file")
    except LoadError as exc:
        raise LoadError(f"{flag} {exc.message}", hint=exc.hint) from None
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
    except OSError as exc:
        raise LoadError(f"{flag} {path}: cannot be read ({exc.strerror or exc})", hint="check its permissions") from exc
    if not head:
        raise LoadError(f"{flag} {path} is empty", hint="the file was probably not written completely")
    try:
        if head.startswith(b"\x93NUMPY"):
            _check_npy_header(path, flag)
            return (torch.from_numpy(np.load(path, allow_pickle=False)),), {}
        if head.startswith(b"PK") and _is_npz(path):
            _check_npz_members(path, flag)
            with np.load(path, allow_pickle=False) as archive:
                arrays = {name: torch.from_numpy(archive[name]) for name in archive.files}
            if all(name.startswith("arr_") for name in arrays):
                return tuple(arrays[f"arr_{i}"] for i in range(len(arrays))), {}
            return (), arrays
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except LoadError:
        raise
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" in str(exc):
            from gradcheck_cli.errors import UntrustedPickleError

            raise UntrustedPickleError(
                f"{flag} {path} holds pickled Python objects, not only tensors; unpickling them would run "
                "code from the file, so gradcheck refused (`trust_pickle` does not apply to probe files)",
                hint="save plain tensors (torch.save(tensor, f)), or use .npy/.npz",
            ) from exc
        raise LoadError(
            f"{flag} {path} could not be read: {first_line(exc)}", hint="the file is probably truncated or damaged"
        ) from exc
    except MemoryError as exc:
        raise LoadError(
            f"{flag} {path} declares more data than fits in memory",
            hint="the file is damaged or crafted; save the inputs again",
        ) from exc
    except Exception as exc:
        raise LoadError(
            f"{flag} {path} could not be read: {first_line(exc)}",
            hint="use a .pt file of a tensor, tuple or dict of tensors, or .npy/.npz",
        ) from exc
    if isinstance(obj, torch.Tensor):
        return (obj,), {}
    if isinstance(obj, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in obj):
        return tuple(obj), {}
    if isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return (), dict(obj)
    raise LoadError(
        f"{flag} {path} holds a {type(obj).__name__}, not tensors",
        hint="save a tensor, a tuple/list of tensors, or a dict of name -> tensor",
    )


def _npy_declared_bytes(handle: Any) -> int:
    import math

    import numpy as np

    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(handle)
    else:
        raise ValueError(f"unsupported .npy version {version}")
    if dtype.hasobject:
        raise ValueError("the array holds Python objects (pickled), which gradcheck does not load")
    return math.prod(int(d) for d in shape) * int(dtype.itemsize)


def _check_npy_header(path: Path, flag: str) -> None:
    with path.open("rb") as handle:
        try:
            declared = _npy_declared_bytes(handle)
        except ValueError as exc:
            raise LoadError(
                f"{flag} {path}: invalid .npy header: {first_line(exc)}",
                hint="the file is damaged; save the inputs again",
            ) from exc
        available = path.stat().st_size - handle.tell()
    if declared > available:
        raise LoadError(
            f"{flag} {path}: the .npy header declares {declared} bytes of data but the file holds {available}",
            hint="the file is truncated or crafted; save the inputs again",
        )


def _check_npz_members(path: Path, flag: str) -> None:
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            with archive.open(info) as member:
                try:
                    declared = _npy_declared_bytes(member)
                except ValueError as exc:
                    raise LoadError(
                        f"{flag} {path}: member {info.filename} has an invalid .npy header: {first_line(exc)}",
                        hint="the file is damaged; save the inputs again",
                    ) from exc
            if declared > info.file_size:
                raise LoadError(
                    f"{flag} {path}: member {info.filename} declares {declared} bytes of data but "
                    f"holds {info.file_size}",
                    hint="the file is truncated or crafted; save the inputs again",
                )


def _is_npz(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError):
        return False
    return bool(names) and all(name.endswith(".npy") for name in names)
