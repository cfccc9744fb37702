"""Checkpoint tensors that stay in the file until used: memory-mapped, never read into a copy.

A safetensors file is an 8-byte header length, a JSON header naming each tensor's dtype, shape
and byte range, then the raw bytes. :func:`safetensors_mapped` maps the file copy-on-write and
returns tensors that are views of the mapping: pages are read from disk when first touched and
belong to the page cache, so loading a checkpoint does not hold its weights twice (a copy in
anonymous memory beside the file's pages), and a sharded directory is mapped shard by shard.
Writing to such a tensor (BatchNorm running statistics in train mode) copies only the page
written, privately: the file never changes.

The header is validated before anything is mapped (offsets inside the file, sizes that match
the shapes, contiguous non-overlapping ranges); anything this reader does not handle goes to
the safetensors package, which gives the error for a damaged file.
"""

from __future__ import annotations

import itertools
import json
import mmap
import struct
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# safetensors dtype names (the format's spec) to torch dtype attribute names.
_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


class NotMappable(Exception):
    """This reader cannot map the file; the caller reads it the ordinary way."""


def safetensors_mapped(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, as views of a private memory mapping of it."""
    import torch

    with path.open("rb") as handle:
        size = path.stat().st_size
        if size < 8:
            raise NotMappable("shorter than a header")
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > min(_HEADER_LIMIT, size - 8):
            raise NotMappable("header length out of range")
        try:
            header = json.loads(handle.read(length))
        except ValueError as exc:
            raise NotMappable("header is not JSON") from exc
        if not isinstance(header, dict):
            raise NotMappable("header is not an object")
        header.pop("__metadata__", None)
        data_start, data_size = 8 + length, size - 8 - length
        if data_start % 8:
            raise NotMappable("data not aligned")  # the format pads its header to 8 bytes
        entries = _validated(header, data_size)
        if data_size == 0:
            return {name: torch.empty(shape, dtype=dtype) for name, (dtype, shape, _, _) in entries.items()}
        mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    tensors: dict[str, torch.Tensor] = {}
    for name, (dtype, shape, begin, end) in entries.items():
        count = (end - begin) // _itemsize(dtype)
        if count == 0:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        # frombuffer keeps a reference to the mapping: it lives as long as any tensor of it.
        flat = torch.frombuffer(mapping, dtype=dtype, count=count, offset=data_start + begin)
        tensors[name] = flat.view(shape)
    return tensors


def _itemsize(dtype: torch.dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


def _validated(header: dict[str, object], data_size: int) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    import torch

    entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
    for name, info in header.items():
        if not isinstance(info, dict):
            raise NotMappable(f"entry {name!r} is not an object")
        dtype_name = _DTYPES.get(str(info.get("dtype")))
        dtype = getattr(torch, dtype_name, None) if dtype_name else None
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if (
            not isinstance(dtype, torch.dtype)
            or not isinstance(shape, list)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(v, int) and v >= 0 for v in [*shape, *offsets])
        ):
            raise NotMappable(f"entry {name!r} is not one this reader maps")
        begin, end = offsets
        numel = 1
        for dim in shape:
            numel *= dim
        if not begin <= end <= data_size or end - begin != numel * _itemsize(dtype):
            raise NotMappable(f"entry {name!r} has a byte range that does not fit its shape or the file")
        if begin % _itemsize(dtype):
            raise NotMappable(f"entry {name!r} is not aligned to its dtype")
        entries[name] = (dtype, tuple(shape), begin, end)
    ranges = sorted((begin, end) for _, _, begin, end in entries.values())
    for (_, end), (begin, _) in itertools.pairwise(ranges):
        if begin < end:
            raise NotMappable("tensors overlap")
    return entries
