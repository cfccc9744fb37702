"""Load every common PyTorch artifact into a :class:`LoadedModel`.

Unpickling runs code, so everything is read with ``weights_only=True`` unless the user
passes the trust flag; a file that needs more is refused with the reason and the way out.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradcheck_cli.errors import LoadError, UntrustedPickleError, UsageError, first_line
from gradcheck_cli.model.arch import build_arch, build_arch_for_weights
from gradcheck_cli.model.formats import ModelFormat, detect_format
from gradcheck_cli.model.handle import LoadedModel
from gradcheck_cli.model.static_shapes import program_inputs, static_note
from gradcheck_cli.model.weights_only import forced_weights_only

if TYPE_CHECKING:
    import torch
    from torch import nn

# Keys under which training scripts commonly nest the state_dict, most specific first.
STATE_DICT_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "net",
    "network",
    "model_ema",
    "ema",
    "weights",
    "params",
)
# Prefixes that wrappers add to every key: DataParallel/DDP, torch.compile, Lightning attributes.
KEY_PREFIXES = ("module.", "_orig_mod.", "model.", "net.", "network.")

TRUST_HINT = (
    "re-save it as a state_dict (torch.save(model.state_dict(), f)) and pass `arch`, or as "
    "safetensors, or export a .pt2 with torch.export; if you trust this file, pass `trust_pickle`"
)


def parse_device(device: str) -> torch.device:
    """The device ``device`` names, whether or not this machine has it; 'auto' is the first GPU when
    there is one, else the CPU (a model loaded with 'auto' on several GPUs is spread across them:
    :func:`place_across_gpus`)."""
    import torch

    if device == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise UsageError(f"`device` {device!r} is not a device torch knows", hint="use cpu, cuda or cuda:N") from exc


def resolve_device(device: str) -> torch.device:
    """The device ``device`` names, refused when this machine cannot run on it."""
    import torch

    resolved = parse_device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            "`device` cuda was asked for, but CUDA is not available here",
            hint="run on the cpu `device`, or on a machine with a GPU and a CUDA build of torch",
        )
    if resolved.type == "cuda" and resolved.index is None and "LOCAL_RANK" in os.environ:
        # Under torchrun each process has its own GPU: loading every rank's copy onto cuda:0 would
        # put them all on one device before FSDP shards them.
        resolved = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return resolved


def model_from_path(
    path: Path,
    *,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    strict: bool = True,
    trust_pickle: bool = False,
    device: str = "cpu",
) -> LoadedModel:
    """Load a PyTorch model file, whatever its format (detected from its bytes)."""
    fmt = detect_format(path)
    spread = device == "auto" and _gpu_count() > 1
    target = resolve_device("cpu" if spread else device)
    if fmt is ModelFormat.ONNX:
        raise LoadError(
            f"{path} is {fmt.description}; this command needs a PyTorch model here",
            hint="probing ONNX graphs is not available yet in this version of gradcheck",
        )
    if fmt is ModelFormat.TRANSFORMERS_DIRECTORY:
        from gradcheck_cli.model.hf import model_from_directory

        return model_from_directory(
            path, arch=arch, arch_kwargs=arch_kwargs, strict=strict, trust_pickle=trust_pickle, device=target
        )
    elif fmt is ModelFormat.EXPORTED_PROGRAM:
        loaded = exported_program_from_path(path, target, trust_pickle=trust_pickle)
    elif fmt is ModelFormat.TORCHSCRIPT:
        loaded = torchscript_from_path(path, target)
    elif fmt is ModelFormat.SAFETENSORS:
        loaded = _with_arch(
            path,
            fmt,
            _safetensors_state_dict(path),
            {},
            (),
            arch,
            _with_config(arch, arch_kwargs, path.parent),
            strict,
            target,
        )
    else:
        loaded = _from_pickle_container(
            path,
            fmt,
            arch=arch,
            arch_kwargs=_with_config(arch, arch_kwargs, path.parent),
            strict=strict,
            trust_pickle=trust_pickle,
            device=target,
        )
    if arch is not None and loaded.arch is None:
        loaded.notes.append(f"`arch` {arch} was ignored: {fmt.description} carries its own architecture")
    if spread:
        loaded.notes.append(place_across_gpus(loaded.module))
    return loaded


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def place_across_gpus(module: nn.Module) -> str:
    """Spread ``module`` over the visible GPUs with accelerate's big-model dispatch (whole blocks per
    device; accelerate's hooks move each block's inputs to it); returns the note saying where."""
    try:
        from accelerate import dispatch_model, infer_auto_device_map
    except ImportError as exc:
        from gradcheck_cli.errors import MissingDependencyError

        raise MissingDependencyError("accelerate", purpose="placing a model across GPUs (device auto)") from exc
    no_split = getattr(module, "_no_split_modules", None) or []
    device_map = infer_auto_device_map(module, no_split_module_classes=list(no_split))
    dispatch_model(module, device_map=device_map)
    devices = sorted({str(d) for d in device_map.values()})
    return f"placed across {len(devices)} devices with accelerate's big-model dispatch ({', '.join(devices)})"


def exported_program_from_path(path: Path, device: torch.device, *, trust_pickle: bool = False) -> LoadedModel:
    import torch

    if not trust_pickle:
        _refuse_pickled_pt2_payloads(path)
    try:
        with warnings.catch_warnings(), forced_weights_only(not trust_pickle), _quiet_torch_export():
            warnings.simplefilter("ignore")
            program = torch.export.load(str(path))
    except Exception as exc:
        if not trust_pickle and "Weights only load failed" in str(exc):
            raise UntrustedPickleError(
                f"{path} is {ModelFormat.EXPORTED_PROGRAM.description} whose archive holds pickled Python "
                "objects (in its sample inputs or constants); loading them would run code from the file, "
                "so gradcheck refused",
                hint=TRUST_HINT,
            ) from exc
        raise LoadError(
            f"{path} looks like {ModelFormat.EXPORTED_PROGRAM.description} but could not be loaded: {first_line(exc)}",
            hint="re-export it with torch.export.save from this torch version",
        ) from exc
    example_args: tuple[torch.Tensor, ...] | None = None
    example_kwargs: dict[str, torch.Tensor] | None = None
    stored = program.example_inputs
    if stored is not None:
        args, kwargs = stored
        example_args = tuple(a.to(device) for a in args if isinstance(a, torch.Tensor))
        example_kwargs = {k: v.to(device) for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    module = program.module()
    module.to(device)
    declared = program_inputs(module)
    note = static_note(declared) if declared else None
    return LoadedModel(
        path=path,
        format=ModelFormat.EXPORTED_PROGRAM,
        module=module,
        exported=program,
        example_args=example_args,
        example_kwargs=example_kwargs,
        notes=[note] if note else [],
    )


# torch.export.load unpickles parts of a .pt2 archive with weights_only=False: tensors marked
# use_pickle, opaque objects (plain pickle.loads), torchbind objects, and -- after a failed
# weights-only attempt -- the sample inputs and legacy weight files. A crafted .pt2 can therefore
# run code. Two guards: the payload configs are read first (JSON, nothing executed) and any
# pickled entry is refused; and the load itself runs with TORCH_FORCE_WEIGHTS_ONLY_LOAD set, which
# makes every torch.load inside it weights-only whatever its call site asks for.
_PT2_SAFE_PREFIXES = ("weight_", "tensor_")


def _refuse_pickled_pt2_payloads(path: Path) -> None:
    import json
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if not name.endswith(("_weights_config.json", "_constants_config.json")):
                    continue
                if archive.getinfo(name).file_size > 64 * 1024 * 1024:
                    raise LoadError(
                        f"{path}: its payload table {name} is implausibly large",
                        hint="the archive is damaged or crafted; re-export it with torch.export.save",
                    )
                config = json.loads(archive.read(name))
                entries = config.get("config", {}) if isinstance(config, dict) else None
                if not isinstance(entries, dict):
                    raise LoadError(
                        f"{path}: its payload table {name} is not a JSON object",
                        hint="the archive is damaged; re-export it with torch.export.save",
                    )
                for fqn, meta in entries.items():
                    pickled = not isinstance(meta, dict) or bool(meta.get("use_pickle"))
                    where = meta.get("path_name", "") if isinstance(meta, dict) else ""
                    if pickled or not str(where).startswith(_PT2_SAFE_PREFIXES):
                        raise UntrustedPickleError(
                            f"{path} is {ModelFormat.EXPORTED_PROGRAM.description} whose entry '{fqn}' is a "
                            "pickled Python object; loading it would run code from the file, so gradcheck "
                            "refused",
                            hint=TRUST_HINT,
                        )
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, RuntimeError, EOFError, NotImplementedError) as exc:
        raise LoadError(
            f"{path} looks like {ModelFormat.EXPORTED_PROGRAM.description} but its archive "
            f"could not be read: {first_line(exc)}",
            hint="the file is probably truncated or damaged; export it again",
        ) from exc


@contextlib.contextmanager
def _quiet_torch_export() -> Iterator[None]:
    """torch.export.load logs a warning *with a traceback* on stderr before it falls back to an older
    archive layout; the error we raise says what failed, in one line, so silence its loggers."""
    import logging

    names = ("torch.export", "torch.export.pt2_archive._package", "torch._export.serde.serialize")
    loggers = [logging.getLogger(name) for name in names]
    saved = [logger.disabled for logger in loggers]
    for logger in loggers:
        logger.disabled = True
    try:
        yield
    finally:
        for logger, disabled in zip(loggers, saved, strict=True):
            logger.disabled = disabled


def torchscript_from_path(path: Path, device: torch.device) -> LoadedModel:
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(str(path), map_location=device)
    except Exception as exc:
        raise LoadError(
            f"{path} looks like {ModelFormat.TORCHSCRIPT.description} but could not be loaded: {first_line(exc)}",
            hint="the archive may be damaged, or saved by an incompatible torch",
        ) from exc
    return LoadedModel(path=path, format=ModelFormat.TORCHSCRIPT, module=module)


def _with_config(arch: str | None, arch_kwargs: dict[str, Any] | None, directory: Path) -> dict[str, Any] | None:
    """For ``transformers:`` specs without a config, use the config.json beside the weights."""
    if arch is None or not arch.startswith("transformers:"):
        return arch_kwargs
    kwargs = dict(arch_kwargs or {})
    if "config" not in kwargs and (directory / "config.json").is_file():
        kwargs["config"] = str(directory / "config.json")
    return kwargs


def _safetensors_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors, memory-mapped (model/stream.py), or read by the safetensors package when
    this reader cannot map it (which also words the error for a damaged file)."""
    from gradcheck_cli.model.stream import NotMappable, safetensors_mapped

    try:
        return safetensors_mapped(path)
    except (NotMappable, OSError, ValueError, RuntimeError):
        pass
    try:
        from safetensors.torch import load_file
    except ImportError as exc:
        from gradcheck_cli.errors import MissingDependencyError

        raise MissingDependencyError("safetensors", purpose="reading safetensors files", extra="safetensors") from exc
    try:
        return dict(load_file(str(path)))
    except Exception as exc:
        raise LoadError(
            f"{path} looks like {ModelFormat.SAFETENSORS.description} but could not be read: {first_line(exc)}",
            hint="the file may be truncated or damaged",
        ) from exc


def _from_pickle_container(
    path: Path,
    fmt: ModelFormat,
    *,
    arch: str | None,
    arch_kwargs: dict[str, Any] | None,
    strict: bool,
    trust_pickle: bool,
    device: torch.device,
) -> LoadedModel:
    import torch
    from torch import nn

    obj = _torch_load(path, fmt, trust_pickle=trust_pickle, device=device)
    if isinstance(obj, torch.jit.ScriptModule):
        return LoadedModel(path=path, format=ModelFormat.TORCHSCRIPT, module=obj)
    if isinstance(obj, nn.Module):
        obj.to(device)
        return LoadedModel(path=path, format=fmt, module=obj, trusted_pickle=True)
    if isinstance(obj, Mapping) and not obj:
        raise LoadError(
            f"{path} is {fmt.description} holding an empty dict: no weights at all",
            hint="save the model's state_dict after building the model (a model without "
            "parameters has no gradients to check)",
        )
    if isinstance(obj, Mapping):
        found = find_state_dict(obj)
        if found is None:
            keys = ", ".join(sorted(str(k) for k in obj)[:8])
            raise LoadError(
                f"{path} is {fmt.description} holding a dict without tensors gradcheck "
                f"recognises as a state_dict (top-level keys: {keys})",
                hint="save the model's state_dict, or nest it under 'state_dict'",
            )
        key_path, state_dict = found
        checkpoint = dict(obj) if key_path else None
        return _with_arch(path, fmt, state_dict, checkpoint, key_path, arch, arch_kwargs, strict, device)
    raise LoadError(
        f"{path} is {fmt.description} holding a {type(obj).__name__}, not a model or a state_dict",
        hint="save the model's state_dict, or a torch.export program",
    )


def _torch_load(path: Path, fmt: ModelFormat, *, trust_pickle: bool, device: torch.device) -> Any:
    import pickle

    import torch

    # A zip checkpoint read onto the CPU is memory-mapped: its tensors stay in the file's pages
    # until used instead of being copied into memory first (the legacy format cannot be mapped).
    mmap = fmt is ModelFormat.TORCH_ZIP and device.type == "cpu"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location=device, weights_only=not trust_pickle, mmap=mmap)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if not trust_pickle and "Weights only load failed" in text:
            match = re.search(r"GLOBAL ([\w.]+)", text)
            what = f" ({match.group(1)})" if match else ""
            raise UntrustedPickleError(
                f"{path} is {fmt.description} that holds pickled Python objects{what}; loading it "
                "would run code from the file, so gradcheck refused",
                hint=TRUST_HINT,
            ) from exc
        raise LoadError(
            f"{path} is {fmt.description} that could not be unpickled: {first_line(exc)}",
            hint="the file is probably damaged or truncated",
        ) from exc
    except (AttributeError, ModuleNotFoundError) as exc:
        raise LoadError(
            f"{path} holds a pickled module whose class cannot be imported here: {first_line(exc)}",
            hint="make the defining module importable (PYTHONPATH), or save a state_dict and pass `arch`",
        ) from exc
    except Exception as exc:
        raise LoadError(
            f"{path} looks like {fmt.description} but could not be loaded: {first_line(exc)}",
            hint="the file is probably damaged or truncated",
        ) from exc


def find_state_dict(obj: Mapping[Any, Any]) -> tuple[tuple[str, ...], dict[str, torch.Tensor]] | None:
    """Find the state_dict inside a checkpoint: the dict itself, or nested under a usual key."""
    import torch

    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if tensors and len(tensors) == len(obj):
        return (), _with_metadata(tensors, obj, "")
    for key in STATE_DICT_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            found = find_state_dict(inner)
            if found is not None:
                return (key, *found[0]), found[1]
    return None


def _with_metadata(tensors: dict[str, Any], source: Mapping[Any, Any], prefix: str) -> dict[str, Any]:
    """``tensors`` with the ``_metadata`` that ``torch.save(model.state_dict())`` kept on
    ``source`` (module versions), re-keyed without ``prefix``: some modules refuse to load
    without their version (torchvision's MNASNet raises "version should be set to 1 or 2")."""
    import collections

    metadata = getattr(source, "_metadata", None)
    if not isinstance(metadata, Mapping):
        return tensors
    result: Any = collections.OrderedDict(tensors)
    stem = prefix.rstrip(".")
    result._metadata = {
        ("" if key == stem else key[len(prefix) :]): value
        for key, value in metadata.items()
        if not prefix or key == stem or key.startswith(prefix)
    }
    return result  # type: ignore[no-any-return]


def _with_arch(
    path: Path,
    fmt: ModelFormat,
    state_dict: dict[str, torch.Tensor],
    checkpoint: dict[str, Any] | None,
    key_path: tuple[str, ...],
    arch: str | None,
    arch_kwargs: dict[str, Any] | None,
    strict: bool,
    device: torch.device,
) -> LoadedModel:
    where = f" (found under {'/'.join(key_path)})" if key_path else ""
    if arch is not None and arch.startswith("transformers:"):
        from gradcheck_cli.model.hf import model_from_state_dict

        return model_from_state_dict(
            path,
            fmt,
            state_dict,
            arch=arch,
            arch_kwargs=arch_kwargs,
            strict=strict,
            device=device,
            checkpoint=checkpoint,
            key_path=key_path,
        )
    if arch is None:
        raise UsageError(
            f"{path} is {fmt.description} holding a state_dict{where} with "
            f"{len(state_dict)} tensors, but no architecture",
            hint="pass `arch` MODULE:CALLABLE (e.g. `arch` model.py:build or "
            "`arch` torchvision:resnet18) to build the model the weights belong to",
        )
    # Strict loading overwrites every parameter and persistent buffer (or fails): no need to draw
    # random initial values for them first.
    module = build_arch_for_weights(arch, arch_kwargs or {}) if strict else build_arch(arch, arch_kwargs or {})
    prefix = best_key_prefix(state_dict, set(module.state_dict()))
    renamed = _with_metadata(
        {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}, state_dict, prefix
    )
    dropped = len(state_dict) - len(renamed)
    half = half_precision_of(renamed)
    assign = strict and not dropped and _assignable(module, renamed, half)
    if half is not None and not assign:
        module.to(half)  # the copy below then keeps the checkpoint's precision
    tied = _tied_names(module)
    try:
        result = module.load_state_dict(renamed, strict=False, assign=assign)
    except (RuntimeError, ValueError) as exc:  # ValueError: a module's own _load_from_state_dict
        mismatches = re.findall(
            r"size mismatch for ([\w.]+): .*?shape (torch.Size\(\[[\d, ]*\]\)).*?"
            r"shape in current model is (torch.Size\(\[[\d, ]*\]\))",
            str(exc),
        )
        detail = "; ".join(f"{k}: file {a}, model {b}" for k, a, b in mismatches[:3]) or first_line(exc)
        raise LoadError(
            f"{path}: the weights do not fit `arch` {arch}: {detail}",
            hint="check `arch` and `arch_kwargs` (e.g. widths, number of classes)",
        ) from exc
    if assign:
        _retie(module, tied, renamed)
        if half is not None:
            _cast_buffers_not_in(module, renamed, half)
    missing, unexpected = _untied(module, list(result.missing_keys), renamed), list(result.unexpected_keys)
    if strict and (missing or unexpected or dropped):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_few(unexpected)})")
        if dropped:
            parts.append(f"{dropped} without the '{prefix}' prefix")
        raise LoadError(
            f"{path}: the state_dict does not match `arch` {arch}: " + ", ".join(parts) + " keys",
            hint="check `arch` and `arch_kwargs`, or pass `non_strict` to load what matches",
        )
    loaded = LoadedModel(
        path=path,
        format=fmt,
        module=module.to(device),
        arch=arch,
        state_dict_path=key_path,
        key_prefix=prefix,
        checkpoint=checkpoint,
    )
    if missing or unexpected:
        loaded.notes.append(
            f"`non_strict`: {len(missing)} missing and {len(unexpected)} unexpected keys "
            f"ignored (missing: {_few(missing)}; unexpected: {_few(unexpected)})"
        )
    if prefix:
        loaded.notes.append(f"stripped the key prefix '{prefix}' from the state_dict")
    return loaded


def half_precision_of(state_dict: Mapping[str, torch.Tensor]) -> torch.dtype | None:
    """The checkpoint's floating dtype when every floating tensor in it is one half-precision dtype
    (bfloat16 or float16): the model then runs in it, as deployed, rather than in float32 (twice
    the memory, and not what the checkpoint's users run)."""
    import torch

    dtypes = {t.dtype for t in state_dict.values() if isinstance(t, torch.Tensor) and t.dtype.is_floating_point}
    if len(dtypes) == 1 and next(iter(dtypes)) in (torch.bfloat16, torch.float16):
        return next(iter(dtypes))
    return None


def _assignable(module: nn.Module, state_dict: Mapping[str, torch.Tensor], half: torch.dtype | None) -> bool:
    """Whether the checkpoint's tensors can become the module's own (``load_state_dict(assign=True)``)
    instead of being copied into it: the weights are then held once, in the file's mapped pages,
    and the memory the constructor allocated (untouched: its random fills were skipped) is freed.
    Only when every entry matches its slot's shape and the dtype the model will run in, so the
    result is exactly what a copy would give."""
    own = module.state_dict(keep_vars=True)
    if set(own) - set(state_dict) - set(_tied_aliases(module)) or set(state_dict) - set(own):
        return False
    for key, value in state_dict.items():
        slot = own[key]
        wanted = half if half is not None and slot.dtype.is_floating_point else slot.dtype
        if value.shape != slot.shape or value.dtype != wanted or value.layout != slot.layout:
            return False
    return True


def _tied_names(module: nn.Module) -> list[list[str]]:
    """Names of parameters that are one tensor (an LM head sharing the embedding matrix)."""
    groups: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _tied_aliases(module: nn.Module) -> list[str]:
    return [name for names in _tied_names(module) for name in names[1:]]


def _retie(module: nn.Module, tied: list[list[str]], loaded: Mapping[str, Any]) -> None:
    """After an assigning load, make tied names one parameter again (assignment replaced only the
    name the checkpoint holds)."""
    for names in tied:
        source = next((name for name in names if name in loaded), names[0])
        parameter = module.get_parameter(source)
        for name in names:
            if name != source:
                owner_path, _, leaf = name.rpartition(".")
                owner = module.get_submodule(owner_path) if owner_path else module
                owner._parameters[leaf] = parameter


def _cast_buffers_not_in(module: nn.Module, loaded: Mapping[str, Any], dtype: torch.dtype) -> None:
    """Floating buffers the checkpoint does not hold (computed by the constructor) in the model's
    precision, as ``module.to(dtype)`` would leave them."""
    for name, buffer in list(module.named_buffers()):
        if name not in loaded and buffer.dtype.is_floating_point and buffer.dtype != dtype:
            owner_path, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_path) if owner_path else module
            owner._buffers[leaf] = buffer.to(dtype)


def _untied(module: nn.Module, missing: list[str], loaded: Mapping[str, Any]) -> list[str]:
    """Drop missing keys whose tensor is tied to one that was loaded (e.g. an LM head sharing the
    embedding matrix, which save_pretrained and safetensors store once)."""
    if not missing:
        return missing
    tensors = module.state_dict(keep_vars=True)
    loaded_ids = {id(tensors[key]) for key in loaded if key in tensors}
    return [key for key in missing if id(tensors.get(key)) not in loaded_ids]


def best_key_prefix(state_dict: Mapping[str, Any], expected: set[str]) -> str:
    """The wrapper prefix (possibly repeated, e.g. 'module.model.') whose removal best matches."""

    def overlap(prefix: str) -> int:
        return sum(1 for key in state_dict if key.startswith(prefix) and key[len(prefix) :] in expected)

    best, best_score = "", overlap("")
    frontier = [""]
    for _ in range(3):  # at most three nested wrappers, e.g. Lightning around DDP around compile
        next_frontier = []
        for base in frontier:
            candidates = set(KEY_PREFIXES)
            firsts = {key[len(base) :].split(".", 1)[0] for key in state_dict if key.startswith(base)}
            if len(firsts) == 1:
                candidates.add(next(iter(firsts)) + ".")
            for candidate in sorted(candidates):
                prefix = base + candidate
                score = overlap(prefix)
                if score > best_score:
                    best, best_score = prefix, score
                if any(key.startswith(prefix) for key in state_dict):
                    next_frontier.append(prefix)
        frontier = next_frontier
    return best


def _few(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (", ..." if len(keys) > limit else "")


def module_of(loaded: LoadedModel) -> nn.Module:
    return loaded.module
