"""Write a (rewritten) PyTorch module back to disk, by default in the format it was loaded from.

The counterpart of :mod:`gradcheck_cli.model.torch_load`. Every writer goes through
:func:`gradcheck_cli.fsutil.atomic_path`, so a failed save never leaves a partial file under the
output name. A pickled ``nn.Module`` is only written when the input was itself loaded with the
trust flag: writing one makes a file that runs code when loaded, and we do not create such files
for users who did not opt in.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradcheck_cli.errors import GradcheckError, UsageError, first_line
from gradcheck_cli.fsutil import atomic_path
from gradcheck_cli.model.formats import ModelFormat
from gradcheck_cli.model.handle import LoadedModel

if TYPE_CHECKING:
    import torch
    from torch import nn

    from gradcheck_cli.model.dynamic import DynamicDim, InputDims


@dataclass(frozen=True)
class Saved:
    """What :func:`save_model` wrote: the format, and what a user should know about the file."""

    format: ModelFormat
    notes: tuple[str, ...] = ()
    # True when the writer knowingly fixed the batch size (a model torch.export cannot give a
    # dynamic batch; ``notes`` says why): the file is then verified at that one size.
    static_batch: bool = False


def save_model(
    loaded: LoadedModel,
    module: nn.Module,
    out: Path,
    *,
    fmt: ModelFormat | None = None,
    example_args: tuple[torch.Tensor, ...] | None = None,
    example_kwargs: dict[str, torch.Tensor] | None = None,
    state_dict_only: bool | None = None,
    output_names: list[str] | None = None,
) -> Saved:
    """Write ``module`` to ``out`` in ``fmt`` (default: ``loaded.format``).

    ``loaded`` is the model as it was read: it tells where a state_dict sat inside the original
    checkpoint, whether pickles were trusted, and which input dimensions are dynamic (see
    :mod:`gradcheck_cli.model.dynamic`: a re-exported program or ONNX graph keeps them).
    ``example_args``/``example_kwargs`` are needed for ExportedProgram and ONNX output (export) and
    for TorchScript output of modules that cannot be scripted (tracing); the loaded model's own
    example inputs are used when they are not given. For torch.save output, ``state_dict_only``
    None writes a pickled module exactly when the input was one (loaded with `trust_pickle`);
    True writes tensors only; False asks for a pickled module and needs a trusted pickled input.
    ``output_names`` names an ONNX export's outputs (the verification's names, so both agree).
    """
    target = fmt or loaded.format
    args = example_args if example_args is not None else loaded.example_args
    kwargs = example_kwargs if example_kwargs is not None else loaded.example_kwargs
    notes: tuple[str, ...] = ()
    if target is ModelFormat.EXPORTED_PROGRAM:
        notes = _save_exported_program(loaded, module, out, args, kwargs)
        return Saved(target, notes, static_batch=bool(notes))
    elif target is ModelFormat.TORCHSCRIPT:
        _save_torchscript(module, out, args, kwargs)
    elif target is ModelFormat.SAFETENSORS:
        _save_safetensors(module, out)
    elif target in (ModelFormat.TORCH_ZIP, ModelFormat.TORCH_LEGACY):
        _save_torch_pickle(
            loaded,
            module,
            out,
            legacy=target is ModelFormat.TORCH_LEGACY,
            pickle_module=not writes_state_dict(loaded, target, state_dict_only=state_dict_only),
        )
    elif target is ModelFormat.ONNX:
        example = _need_examples(args, ModelFormat.ONNX.description)
        export_onnx(module, out, example, kwargs, dims=input_dims(loaded, example, kwargs), output_names=output_names)
    else:  # pragma: no cover - the enum is closed
        raise UsageError(f"cannot write {target.description}")
    return Saved(target, notes)


def input_dims(
    loaded: LoadedModel, args: tuple[torch.Tensor, ...], kwargs: dict[str, torch.Tensor] | None
) -> InputDims:
    """The dynamic dimensions a re-export of ``loaded`` keeps: an exported program's own, or a batch.

    Raises when an exported program's inputs cannot be matched to ``args``/``kwargs``: writing it
    static would silently drop what the input declared.
    """
    from gradcheck_cli.model.dynamic import batch_dims, program_dims

    if loaded.exported is None:
        return batch_dims(args, kwargs)
    dims = program_dims(loaded.exported)
    if dims is None or len(dims) != len(args) + len(kwargs or {}):
        raise GradcheckError(
            f"the inputs of {loaded.path} could not be matched to its example inputs, so its dynamic "
            "dimensions cannot be carried over to the rewritten model",
            hint="choose another output format with `to` (e.g. state_dict with `arch`)",
        )
    return dims


def writes_state_dict(loaded: LoadedModel, fmt: ModelFormat | None, *, state_dict_only: bool | None = None) -> bool:
    """True when ``save_model`` would write only tensors (so the module's class must not change)."""
    target = fmt or loaded.format
    if target is ModelFormat.SAFETENSORS:
        return True
    if target in (ModelFormat.TORCH_ZIP, ModelFormat.TORCH_LEGACY):
        if state_dict_only is not None:
            if not state_dict_only and not _writes_pickled_module(loaded):
                raise UsageError(
                    "a pickled module is only written for a pickled module loaded with `trust_pickle`",
                    hint="write a state_dict, .pt2 or TorchScript instead",
                )
            return state_dict_only
        return not _writes_pickled_module(loaded)
    return False


def _writes_pickled_module(loaded: LoadedModel) -> bool:
    # The loader sets trusted_pickle only when the file held a whole nn.Module (not a state_dict).
    return loaded.trusted_pickle and loaded.arch is None


def _need_examples(args: tuple[torch.Tensor, ...] | None, what: str) -> tuple[torch.Tensor, ...]:
    if args is None:
        raise UsageError(
            f"writing {what} needs example inputs to trace the model with",
            hint="pass `input_shape` or `input` so gradcheck has inputs to export with",
        )
    return args


def _save_exported_program(
    loaded: LoadedModel,
    module: nn.Module,
    out: Path,
    args: tuple[torch.Tensor, ...] | None,
    kwargs: dict[str, torch.Tensor] | None,
) -> tuple[str, ...]:
    """Re-export with the input's dynamic dimensions (see :func:`input_dims`); returns notes.

    A model that was not an exported program gets a dynamic batch where torch.export can give it
    one; where it cannot (the model fixes the batch size somewhere), it is written with the example's
    batch size and a note says so. An exported program's own dynamic dimensions are never dropped.
    """
    import torch

    from gradcheck_cli.model.dynamic import export_dynamic_shapes, is_dynamic

    example = _need_examples(args, ModelFormat.EXPORTED_PROGRAM.description)
    dims = input_dims(loaded, example, kwargs)
    traced, traced_kwargs = (example, kwargs)
    if loaded.exported is None and is_dynamic(dims):
        traced, traced_kwargs = _at_least_two(example, kwargs, dims)
    notes: tuple[str, ...] = ()
    try:
        dynamic = export_dynamic_shapes(module, traced, traced_kwargs, dims) if is_dynamic(dims) else None
        program = _export(module, traced, traced_kwargs, dynamic)
    except Exception as exc:
        if loaded.exported is not None or not is_dynamic(dims):
            raise GradcheckError(
                f"torch.export could not export the rewritten model: {first_line(exc)}",
                hint="choose another output format with `to` (e.g. torchscript or state_dict)",
            ) from exc
        try:
            program = _export(module, example, kwargs, None)
        except Exception as static_exc:
            raise GradcheckError(
                f"torch.export could not export the rewritten model: {first_line(static_exc)}",
                hint="choose another output format with `to` (e.g. torchscript or state_dict)",
            ) from static_exc
        batch = int(example[0].shape[0]) if example and example[0].dim() else 1
        notes = (
            f"the program was written with a static batch of {batch}: torch.export could not make "
            f"the batch dimension dynamic ({first_line(exc)})",
        )
    with atomic_path(out) as tmp:
        torch.export.save(program, str(tmp))
    return notes


def _at_least_two(
    args: tuple[torch.Tensor, ...], kwargs: dict[str, torch.Tensor] | None, dims: InputDims
) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor] | None]:
    """The example with each batch of 1 repeated to 2: torch.export specialises a dimension traced
    at size 1 (it cannot tell a batch from a broadcast there), so a batch of 1 would come out static."""
    import torch

    def grown(tensor: torch.Tensor, per_input: dict[int, DynamicDim]) -> torch.Tensor:
        return torch.cat([tensor, tensor]) if 0 in per_input and tensor.shape[0] == 1 else tensor

    names = list(kwargs or {})
    tensors = [grown(t, d) for t, d in zip((*args, *(kwargs or {}).values()), dims, strict=True)]
    return tuple(tensors[: len(args)]), dict(zip(names, tensors[len(args) :], strict=True)) or kwargs


def _export(
    module: nn.Module, args: tuple[torch.Tensor, ...], kwargs: dict[str, torch.Tensor] | None, dynamic: Any
) -> Any:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(_eval(module), args, kwargs or {}, dynamic_shapes=dynamic)


def _save_torchscript(
    module: nn.Module,
    out: Path,
    args: tuple[torch.Tensor, ...] | None,
    kwargs: dict[str, torch.Tensor] | None,
) -> None:
    import torch

    scripted: Any
    if isinstance(module, torch.jit.ScriptModule):
        scripted = module
    else:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scripted = torch.jit.script(_eval(module))
        except Exception:
            # Scripting fails on much ordinary Python (FX GraphModules with getattr targets,
            # data-dependent code); tracing records the path the example inputs take.
            example = _need_examples(args, ModelFormat.TORCHSCRIPT.description)
            if kwargs:
                raise UsageError(
                    "the model takes keyword inputs and cannot be scripted; "
                    "TorchScript tracing supports positional inputs only",
                    hint="choose another output format with `to`",
                ) from None
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    scripted = torch.jit.trace(  # type: ignore[no-untyped-call]
                        _eval(module), example, check_trace=False
                    )
            except Exception as exc:
                raise GradcheckError(
                    f"the rewritten model could neither be scripted nor traced: {first_line(exc)}",
                    hint="choose another output format with `to`",
                ) from exc
    with atomic_path(out) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.save's deprecation notice: TorchScript was asked for
        torch.jit.save(scripted, str(tmp))


def _state_dict_of(module: nn.Module) -> dict[str, torch.Tensor]:
    # Detached, contiguous copies: safetensors refuses shared or non-contiguous storage, and the
    # file must not alias the live module.
    return {key: value.detach().clone().contiguous() for key, value in module.state_dict().items()}


def _save_safetensors(module: nn.Module, out: Path) -> None:
    try:
        from safetensors.torch import save_file
    except ImportError as exc:
        from gradcheck_cli.errors import MissingDependencyError

        raise MissingDependencyError("safetensors", purpose="writing safetensors files", extra="safetensors") from exc
    tensors = _state_dict_of(module)
    with atomic_path(out) as tmp:
        save_file(tensors, str(tmp))


def _save_torch_pickle(loaded: LoadedModel, module: nn.Module, out: Path, *, legacy: bool, pickle_module: bool) -> None:
    import torch

    payload: Any
    if pickle_module:
        payload = module
    else:
        state = {loaded.key_prefix + key: value for key, value in _state_dict_of(module).items()}
        payload = _nest(loaded.checkpoint, loaded.state_dict_path, state)
    with atomic_path(out) as tmp:
        torch.save(payload, str(tmp), _use_new_zipfile_serialization=not legacy)


def _nest(checkpoint: Mapping[str, Any] | None, key_path: tuple[str, ...], state: dict[str, Any]) -> Any:
    """Put ``state`` back where the state_dict sat; every other entry of the checkpoint is kept."""
    if checkpoint is None or not key_path:
        return state
    # Shallow copies along the path only: the caller's checkpoint dict must stay as it was loaded.
    root = dict(checkpoint)
    node = root
    for key in key_path[:-1]:
        inner = node.get(key)
        node[key] = dict(inner) if isinstance(inner, Mapping) else {}
        node = node[key]
    node[key_path[-1]] = state
    return root


def export_onnx(
    module: nn.Module,
    out: Path,
    args: tuple[torch.Tensor, ...],
    kwargs: dict[str, torch.Tensor] | None,
    *,
    dims: InputDims,
    output_names: list[str] | None = None,
    opset: int | None = None,
) -> None:
    """Export ``module`` to ONNX as it is, with ``dims`` (see :func:`input_dims`) left dynamic.

    The TorchScript-based exporter, in the module's own (eval) mode and without constant folding:
    its eval mode and constant folding would fold BatchNorms into convolutions on their own, so
    the file would no longer be the model the report describes (a re-initialised BatchNorm gone,
    fold-bn's "BatchNorms after" count wrong). The torch.export-based exporter folds them too
    unless its optimiser is off, and then writes Expand chains for zero biases; it also takes
    seconds where this one takes a fraction of one.
    """
    import torch

    from gradcheck_cli.model.dynamic import onnx_dynamic_axes
    from gradcheck_cli.model.onnx_load import onnx_model_from_path, onnx_model_to_path

    names = _input_names(module, args, kwargs)
    # Output names given, so the exporter never looks for a TorchScript graph on an FX
    # GraphModule's `graph` (it does when validating dynamic axes without them).
    outputs = output_names if output_names is not None else _output_names(module, args, kwargs)
    parent = out.parent if str(out.parent) else Path(".")
    try:
        scratch_dir = tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent)
    except OSError as exc:
        from gradcheck_cli.fsutil import write_error

        raise write_error(out, exc) from exc
    with _removed_after(scratch_dir):
        scratch = Path(scratch_dir) / "export.onnx"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    _eval(copy.deepcopy(module)),
                    args,
                    str(scratch),
                    kwargs=kwargs or None,
                    input_names=names,
                    output_names=outputs,
                    dynamic_axes=onnx_dynamic_axes(names, dims) or None,
                    opset_version=opset or 17,
                    training=torch.onnx.TrainingMode.PRESERVE,
                    do_constant_folding=False,
                    dynamo=False,
                )
        except Exception as exc:
            raise GradcheckError(
                f"the model could not be exported to ONNX: {first_line(exc)}",
                hint="choose another output format with `to`",
            ) from exc
        # Re-written through our ONNX writer so that large models keep their external data next
        # to the output, and the scratch directory disappears whatever happens.
        onnx_model_to_path(onnx_model_from_path(scratch), out)


def _output_names(
    module: nn.Module, args: tuple[torch.Tensor, ...], kwargs: dict[str, torch.Tensor] | None
) -> list[str]:
    """``output``, or ``output_0``, ``output_1``, ... for a model that returns several tensors."""
    import torch

    with torch.no_grad():
        result = module(*args, **dict(kwargs or {}))
    count = len(torch.utils._pytree.tree_leaves(result))
    return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]


def _input_names(
    module: nn.Module, args: tuple[torch.Tensor, ...], kwargs: dict[str, torch.Tensor] | None
) -> list[str]:
    """Graph input names: the forward's parameter names where it has them, then the keywords."""
    try:
        parameters = [
            p
            for p in inspect.signature(module.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        parameters = []
    positional = [parameters[i].name if i < len(parameters) else f"input_{i}" for i in range(len(args))]
    names = positional + list(kwargs or {})
    # A name used twice would make the exporter merge two inputs' axes; fall back to positions.
    return names if len(set(names)) == len(names) else [f"input_{i}" for i in range(len(names))]


@contextlib.contextmanager
def _removed_after(directory: str) -> Iterator[None]:
    import shutil

    try:
        yield
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _eval(module: nn.Module) -> nn.Module:
    # ExportedProgram.module() refuses eval(): its mode was fixed at export time.
    with contextlib.suppress(NotImplementedError):
        module.eval()
    return module
