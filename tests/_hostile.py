"""Hostile files for the reliability tests: pickles that run code, and mutated sample files.

Every payload here writes a marker file when it is unpickled (``open(marker, "w")``); a test
passes only if the marker never appears. The same payload loaded *with* the trust flag does
create it, which proves the payload is live and the refusal is what kept it from running.
"""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path
from typing import Any

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


class Payload:
    """Unpickling this object calls ``open(marker, 'w')``: a file appears if code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return open, (self.marker, "w")


def _torch_bytes(obj: Any, *, legacy: bool = False) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


def _replace_members(src: Path, dst: Path, replace: dict[str, bytes]) -> Path:
    """Copy the zip ``src`` to ``dst`` with the members whose name ends with a key replaced."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            for suffix, new in replace.items():
                if info.filename.endswith(suffix):
                    data = new
            zout.writestr(info, data)
    return dst


def hostile_files(directory: Path, marker: Path) -> dict[str, Path]:
    """One file per way of smuggling a payload into something gradcheck reads as a model."""
    import torch

    payload = Payload(marker)
    weights = {"fc.weight": torch.zeros(2, 2)}
    files: dict[str, bytes] = {
        "top_level_zip.pt": _torch_bytes(payload),
        "nested_in_dict_zip.pt": _torch_bytes({**weights, "extra": {"deep": [payload]}}),
        "nested_state_dict_zip.ckpt": _torch_bytes({"state_dict": weights, "optimizer": payload}),
        "top_level_legacy.pt": _torch_bytes(payload, legacy=True),
        "nested_in_dict_legacy.pt": _torch_bytes({**weights, "extra": payload}, legacy=True),
        "bare_pickle.pkl": pickle.dumps(payload, protocol=2),
        "bare_pickle_protocol5.pkl": pickle.dumps({"w": payload}, protocol=5),
    }
    paths = {}
    for name, data in files.items():
        paths[name] = directory / name
        paths[name].write_bytes(data)
    paths.update(hostile_pt2_files(directory, marker))
    paths["torchscript_data_pkl.pt"] = _replace_members(
        SAMPLES / "relu_dead.torchscript.pt",
        directory / "torchscript_data_pkl.pt",
        {"/data.pkl": pickle.dumps(payload, protocol=2)},
    )
    return paths


def hostile_pt2_files(directory: Path, marker: Path) -> dict[str, Path]:
    """.pt2 archives whose sample inputs, weights or constants are pickles with a payload.

    torch.export.load itself unpickles these with weights_only=False (sample inputs after a
    failed weights-only attempt; weights marked use_pickle; opaque constants via pickle.loads).
    """
    payload = Payload(marker)
    src = SAMPLES / "relu_healthy.pt2"
    out: dict[str, Path] = {}
    out["pt2_sample_inputs.pt2"] = _replace_members(
        src, directory / "pt2_sample_inputs.pt2", {"sample_inputs/model.pt": _torch_bytes(((payload,), {}))}
    )
    with zipfile.ZipFile(src) as archive:
        name = next(n for n in archive.namelist() if n.endswith("_weights_config.json"))
        config = json.loads(archive.read(name))
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True
    out["pt2_pickled_weight.pt2"] = _replace_members(
        src,
        directory / "pt2_pickled_weight.pt2",
        {"_weights_config.json": json.dumps(config).encode(), "/" + first["path_name"]: _torch_bytes(payload)},
    )
    return out
