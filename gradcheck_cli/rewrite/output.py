"""Which format a rewrite writes: the one decision both ``fold_batchnorm`` and ``reinit`` make.

The written model's format is ``to`` when it is given, otherwise what the output path's extension
says. An explicit ``to`` that the extension contradicts is refused (``model.onnx`` holding a zip
is the bug this replaces), and so is an unknown extension without ``to``: there is no format to
infer. ``.pt``/``.pth``/``.ckpt`` (and ``.pkl``, ``.pth.tar``) are the extensions of every
torch.save-like archive, so they keep the input's own torch format where it is one (a TorchScript
archive stays TorchScript, a pickled module stays pickled, a legacy checkpoint stays legacy) and
mean a state_dict otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath

from gradcheck_cli.errors import UsageError
from gradcheck_cli.model.formats import ModelFormat
from gradcheck_cli.options import WriteFormat

_MODEL_FORMATS = {
    WriteFormat.PT2: ModelFormat.EXPORTED_PROGRAM,
    WriteFormat.TORCHSCRIPT: ModelFormat.TORCHSCRIPT,
    WriteFormat.STATE_DICT: ModelFormat.TORCH_ZIP,
    WriteFormat.SAFETENSORS: ModelFormat.SAFETENSORS,
    WriteFormat.PICKLE: ModelFormat.TORCH_ZIP,
    WriteFormat.ONNX: ModelFormat.ONNX,
}


def model_format_of(to: WriteFormat) -> ModelFormat:
    """The model format a ``to`` choice writes."""
    return _MODEL_FORMATS[to]


_TORCH_ARCHIVE = frozenset({WriteFormat.STATE_DICT, WriteFormat.PICKLE, WriteFormat.TORCHSCRIPT})

# Extension (lower case) -> the formats a file with it may hold; the first is the one inferred
# when nothing else decides (see written_format for the torch archive extensions).
EXTENSIONS: dict[str, frozenset[WriteFormat]] = {
    ".pt2": frozenset({WriteFormat.PT2}),
    ".onnx": frozenset({WriteFormat.ONNX}),
    ".safetensors": frozenset({WriteFormat.SAFETENSORS}),
    ".pt": _TORCH_ARCHIVE,
    ".pth": _TORCH_ARCHIVE,
    ".ckpt": _TORCH_ARCHIVE,
    ".pkl": _TORCH_ARCHIVE,  # a pickled module, or a checkpoint written by torch.save under that name
    ".tar": _TORCH_ARCHIVE,  # the `.pth.tar` checkpoints of many training scripts
    ".torchscript": frozenset({WriteFormat.TORCHSCRIPT}),
    ".ts": frozenset({WriteFormat.TORCHSCRIPT}),
}


@dataclass(frozen=True)
class WrittenFormat:
    """The decision: the file format, and for torch.save archives what goes in them.

    ``state_dict_only`` None: a pickled module exactly when the input was one (loaded with
    `trust_pickle`), tensors otherwise; True: tensors only; False: a pickled module.
    """

    format: ModelFormat
    state_dict_only: bool | None = None


def known_extensions() -> str:
    return ", ".join(EXTENSIONS)


def written_format(out: PurePath | None, to: WriteFormat | None, *, input_format: ModelFormat) -> WrittenFormat:
    """The format a rewrite of a model in ``input_format`` writes to ``out``.

    ``out`` None (a dry run) with no ``to``: the input's own format. Raises :class:`UsageError`
    when ``to`` and the extension disagree, when the extension is unknown and ``to`` is not
    given, and when an ONNX input would be written as anything but ONNX.
    """
    suffix = out.suffix.lower() if out is not None else ""
    allowed = EXTENSIONS.get(suffix)
    if to is not None and out is not None and allowed is not None and to not in allowed:
        raise UsageError(
            f"the output {out.name} has the extension {suffix}, which does not hold {model_format_of(to).description} "
            f"(`to` is {to})",
            hint=f"name the output with an extension of {to} ({_extensions_of(to)}), or leave `to` out",
        )
    if to is None and out is not None and allowed is None:
        raise UsageError(
            f"cannot tell which format to write from the output name {out.name}: "
            f"{'no extension' if not suffix else f'unknown extension {suffix}'}",
            hint=f"use one of the extensions {known_extensions()}, or give `to`",
        )
    if to is not None:
        decided = _explicit(to)
    elif out is None:
        decided = WrittenFormat(input_format)
    else:
        assert allowed is not None
        decided = _inferred(allowed, input_format)
    if input_format is ModelFormat.ONNX and decided.format is not ModelFormat.ONNX:
        raise UsageError(
            f"an ONNX model can only be written as ONNX, not {decided.format.description}",
            hint="write to a .onnx file",
        )
    return decided


def _explicit(to: WriteFormat) -> WrittenFormat:
    if to is WriteFormat.STATE_DICT:
        return WrittenFormat(ModelFormat.TORCH_ZIP, state_dict_only=True)
    if to is WriteFormat.PICKLE:
        return WrittenFormat(ModelFormat.TORCH_ZIP, state_dict_only=False)
    return WrittenFormat(model_format_of(to))


def _inferred(allowed: frozenset[WriteFormat], input_format: ModelFormat) -> WrittenFormat:
    if allowed is not _TORCH_ARCHIVE:
        (only,) = allowed
        return _explicit(only)
    if input_format in (ModelFormat.TORCHSCRIPT, ModelFormat.TORCH_ZIP, ModelFormat.TORCH_LEGACY):
        return WrittenFormat(input_format)  # the input's own torch format, pickled or not as it was
    return WrittenFormat(ModelFormat.TORCH_ZIP, state_dict_only=True)


def _extensions_of(to: WriteFormat) -> str:
    return ", ".join(suffix for suffix, formats in EXTENSIONS.items() if to in formats)
