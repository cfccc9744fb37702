"""transformers models, loaded and fed the way transformers itself loads and feeds them.

Loading goes through the model class's own ``from_pretrained``: it knows each architecture's
legacy and renamed keys (``gamma``/``beta``, GPT-NeoX's ``embed_out``, the position-id buffers
older checkpoints carry), tied weights, shards and the dtype the config asks for, which a
hand-written ``load_state_dict`` cannot keep up with. It only ever reads local files
(``local_files_only``), never runs code from a model repository (``trust_remote_code`` stays
off: a class that is not in the installed transformers is refused by name), and reads ``.bin``
pickles weights-only unless the user trusts pickles.

The probe inputs come from what the model declares: ``main_input_name``, the names in
``dummy_inputs``, the parameters ``forward`` accepts and the config's sizes (vocabulary, image
size and channels, mel bins and source positions, the audio feature extractor's strides).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradcheck_cli.errors import LoadError, MissingDependencyError, UntrustedPickleError, UsageError, first_line
from gradcheck_cli.model.formats import ModelFormat
from gradcheck_cli.model.handle import LoadedModel

if TYPE_CHECKING:
    import torch
    from torch import nn

PREFIX = "transformers:"

# Weight files of a model directory, in the order transformers itself prefers them.
_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

# Wrapper prefixes a training script adds to every key of a state_dict saved by hand (DDP,
# torch.compile). transformers strips its own base-model prefix ("bert.", "model.") itself.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

PICKLE_HINT = (
    "convert it to safetensors (save_pretrained writes model.safetensors), or pass `trust_pickle` if you trust the file"
)


def is_transformers_spec(arch: str | None) -> bool:
    return arch is not None and arch.startswith(PREFIX)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise MissingDependencyError("transformers", purpose="loading a transformers model") from exc
    return transformers


def model_class(name: str, *, where: str | None = None) -> Any:
    """The model class ``name`` of the installed transformers, or a one-line refusal naming it.

    A class that is not there would have to come from the model's repository (remote code), which
    gradcheck never runs.
    """
    transformers = _transformers()
    cls = getattr(transformers, name, None) if name.isidentifier() else None
    if (
        cls is None
        or not isinstance(cls, type)
        or not hasattr(cls, "config_class")
        or not hasattr(cls, "from_pretrained")
    ):
        source = f"{where} names" if where else "`arch` names"
        raise LoadError(
            f"{source} the architecture '{name}', which the installed transformers "
            f"{transformers.__version__} has no model class for",
            hint="gradcheck never runs code shipped with a model (trust_remote_code); upgrade "
            "transformers if it added the model since, or set `arch` to transformers:<ModelClass> "
            "with a class it has, e.g. BertModel",
        )
    return cls


def architecture_from_config(config_path: Path) -> str:
    """The model class a config.json asks for: its ``architectures`` entry, or else the base model
    class transformers maps its ``model_type`` to (AutoModel's choice)."""
    data = _read_json(config_path)
    names = data.get("architectures")
    if isinstance(names, list) and names and isinstance(names[0], str):
        return names[0]
    model_type = data.get("model_type")
    if isinstance(model_type, str):
        import importlib

        auto = importlib.import_module("transformers.models.auto.modeling_auto")
        base = getattr(auto, "MODEL_MAPPING_NAMES", {}).get(model_type)
        if isinstance(base, str):
            return base
    raise UsageError(
        f"{config_path} names no architecture ('architectures' is missing and its "
        f"model_type {model_type!r} is not one transformers knows)",
        hint="set `arch` to transformers:<ModelClass>, e.g. transformers:BertModel",
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LoadError(f"{path} could not be read as JSON: {first_line(exc)}", hint="check the file") from exc
    if not isinstance(data, dict):
        raise LoadError(f"{path} is not a JSON object", hint="a transformers config.json is a JSON object")
    return data


def config_for(cls: Any, config_path: Path, overrides: Mapping[str, Any]) -> Any:
    """The model's config read from ``config_path``, with ``overrides`` (from ``arch_kwargs``) set on it."""
    if not config_path.is_file():
        raise LoadError(f"`arch` transformers:{cls.__name__}: no config file at {config_path}", hint="check the path")
    try:
        with quiet_transformers():
            config = cls.config_class.from_json_file(str(config_path))
    except Exception as exc:
        raise LoadError(
            f"{config_path} is not a valid {cls.config_class.__name__} file: {first_line(exc)}", hint="check the JSON"
        ) from exc
    with quiet_transformers():
        for key, value in overrides.items():
            setattr(config, key, value)
    return config


def model_from_directory(
    directory: Path,
    *,
    arch: str | None,
    arch_kwargs: Mapping[str, Any] | None,
    strict: bool,
    trust_pickle: bool,
    device: torch.device,
) -> LoadedModel:
    """A transformers model directory (config.json and weights), loaded by ``from_pretrained``."""
    config_file = directory / "config.json"
    overrides = dict(arch_kwargs or {})
    config_path = Path(overrides.pop("config", config_file))
    config_path = config_path / "config.json" if config_path.is_dir() else config_path
    if is_transformers_spec(arch):
        assert arch is not None
        cls = model_class(arch[len(PREFIX) :])
    elif arch is not None:
        raise UsageError(
            f"`arch` {arch} cannot load {directory}: a transformers directory is loaded by a transformers model class",
            hint="set `arch` to transformers:<ModelClass> or leave it unset; to load the weights into "
            "your own architecture, give the weights file inside the directory instead",
        )
    else:
        cls = model_class(architecture_from_config(config_file), where=str(config_file))
    weights = _weight_files(directory)
    pickled = [path for path in weights if path.suffix == ".bin"]
    config = config_for(cls, config_path, overrides)
    model, info = _from_pretrained(
        cls,
        str(directory),
        config=config,
        state_dict=None,
        trust_pickle=trust_pickle,
        what=str(pickled[0] if pickled else directory),
    )
    loaded = LoadedModel(
        path=directory,
        format=ModelFormat.TRANSFORMERS_DIRECTORY,
        module=_checked(model, info, strict=strict, source=str(directory), arch=f"{PREFIX}{cls.__name__}").to(device),
        arch=f"{PREFIX}{cls.__name__}",
    )
    loaded.notes.extend(_loading_notes(info, strict=strict))
    return loaded


def model_from_state_dict(
    path: Path,
    fmt: ModelFormat,
    state_dict: dict[str, torch.Tensor],
    *,
    arch: str,
    arch_kwargs: Mapping[str, Any] | None,
    strict: bool,
    device: torch.device,
    checkpoint: dict[str, Any] | None = None,
    key_path: tuple[str, ...] = (),
) -> LoadedModel:
    """A state_dict file with ``arch`` ``transformers:<Class>``: the config comes from ``arch_kwargs``
    (``config``, filled in from config.json next to the weights), the loading from ``from_pretrained``."""
    cls = model_class(arch[len(PREFIX) :])
    overrides = dict(arch_kwargs or {})
    config_path = overrides.pop("config", None)
    if config_path is None:
        raise LoadError(
            f"`arch` {arch} needs a config",
            hint="put config.json next to the weights, pass the model directory, or "
            '`arch_kwargs` {"config": "path/to/config.json"}',
        )
    resolved = Path(config_path)
    config = config_for(cls, resolved / "config.json" if resolved.is_dir() else resolved, overrides)
    prefix = next((p for p in _WRAPPER_PREFIXES if state_dict and all(k.startswith(p) for k in state_dict)), "")
    stripped = {key[len(prefix) :]: value for key, value in state_dict.items()}
    model, info = _from_pretrained(cls, None, config=config, state_dict=stripped, trust_pickle=False, what=str(path))
    loaded = LoadedModel(
        path=path,
        format=fmt,
        module=_checked(model, info, strict=strict, source=str(path), arch=arch).to(device),
        arch=arch,
        state_dict_path=key_path,
        key_prefix=prefix,
        checkpoint=checkpoint,
    )
    loaded.notes.extend(_loading_notes(info, strict=strict))
    if prefix:
        loaded.notes.append(f"stripped the key prefix '{prefix}' from the state_dict")
    return loaded


def _weight_files(directory: Path) -> list[Path]:
    """The weight files ``from_pretrained`` will read, checked to lie inside the directory."""
    for name in _SINGLE_FILES:
        if (directory / name).is_file():
            return [directory / name]
    for name in _INDEX_FILES:
        index = directory / name
        if not index.is_file():
            continue
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise LoadError(f"{index} is not a valid shard index ('weight_map' is missing)", hint="check the file")
        shards = []
        for shard in sorted(set(weight_map.values())):
            # The names are checked, not where symbolic links lead: the hub's cache keeps each shard
            # of a snapshot directory as a link into its blob store.
            shard_name = Path(shard)
            if shard_name.is_absolute() or ".." in shard_name.parts or not shard_name.parts:
                raise LoadError(
                    f"{index} points outside the model directory ({shard})",
                    hint="shards must lie in the model's own directory",
                )
            shard_path = directory / shard_name
            if not shard_path.is_file():
                raise LoadError(
                    f"{index} lists the shard {shard}, which is missing",
                    hint="copy every shard into the model directory",
                )
            shards.append(shard_path)
        return shards
    raise LoadError(
        f"{directory} has a config.json but no weights (model.safetensors, sharded safetensors "
        "with model.safetensors.index.json, or pytorch_model.bin)",
        hint="add the weights file",
    )


def _loading_kwargs(cls: Any, *, trust_pickle: bool) -> dict[str, Any]:
    """Keyword arguments of ``from_pretrained`` for a faithful, local, weights-only load, spelled
    for the installed transformers (``dtype`` replaced ``torch_dtype`` in 4.56)."""
    transformers = _transformers()
    try:
        accepted = set(inspect.signature(cls.from_pretrained).parameters)
    except (TypeError, ValueError):
        accepted = set()
    # Shape mismatches come back in the loading info (named, refused when strict) instead of an
    # exception whose text points at a report transformers printed.
    kwargs: dict[str, Any] = {"local_files_only": True, "output_loading_info": True, "ignore_mismatched_sizes": True}
    # The checkpoint's own dtype: bf16/fp16 configs load in bf16/fp16, as transformers >= 5 does anyway.
    kwargs["dtype" if _version(transformers.__version__) >= (4, 56) else "torch_dtype"] = "auto"
    if "weights_only" in accepted:
        kwargs["weights_only"] = not trust_pickle
    return kwargs


def _version(text: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _from_pretrained(
    cls: Any,
    source: str | None,
    *,
    config: Any,
    state_dict: dict[str, torch.Tensor] | None,
    trust_pickle: bool,
    what: str,
) -> tuple[nn.Module, dict[str, Any]]:
    from gradcheck_cli.model.weights_only import forced_weights_only

    kwargs = _loading_kwargs(cls, trust_pickle=trust_pickle)
    if state_dict is not None:
        kwargs["state_dict"] = state_dict
    try:
        with quiet_transformers(), forced_weights_only(not trust_pickle):
            model, info = cls.from_pretrained(source, config=config, **kwargs)
    except Exception as exc:
        text = _chain_text(exc)
        if not trust_pickle and "Weights only load failed" in text:
            found = re.search(r"GLOBAL ([\w.]+)", text)
            raise UntrustedPickleError(
                f"{what} holds pickled Python objects{f' ({found.group(1)})' if found else ''}; loading it "
                "would run code from the file, so gradcheck refused",
                hint=PICKLE_HINT,
            ) from exc
        mismatch = re.findall(
            r"size mismatch for ([\w.]+): copying a param with shape (torch.Size\(\[[\d, ]*\]\))"
            r".*?shape in current model is (torch.Size\(\[[\d, ]*\]\))",
            text,
        )
        detail = "; ".join(f"{k}: file {a}, model {b}" for k, a, b in mismatch[:3]) or first_line(exc)
        raise LoadError(
            f"{what}: transformers could not load {cls.__name__} from it: {detail}",
            hint="check the config against the weights (or `arch` and `arch_kwargs`)",
        ) from exc
    return model, dict(info)


def _chain_text(exc: BaseException) -> str:
    """The messages of ``exc`` and the exceptions it wraps (transformers 4.x re-raises torch's
    weights-only refusal as an OSError that does not repeat its text)."""
    texts = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        texts.append(str(current))
        current = current.__cause__ or current.__context__
    return "\n".join(texts)


def _problems(info: Mapping[str, Any]) -> tuple[list[str], list[str], list[str]]:
    missing = sorted(str(k) for k in info.get("missing_keys") or ())
    unexpected = sorted(str(k) for k in info.get("unexpected_keys") or ())
    mismatched = sorted(
        f"{item[0]} (file {tuple(item[1])}, model {tuple(item[2])})"
        if isinstance(item, tuple) and len(item) == 3
        else str(item)
        for item in info.get("mismatched_keys") or ()
    )
    return missing, unexpected, mismatched


def _mismatch_parts(info: Mapping[str, Any]) -> list[str]:
    missing, unexpected, mismatched = _problems(info)
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({_few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_few(unexpected)})")
    if mismatched:
        parts.append(f"{len(mismatched)} of another shape ({_few(mismatched)})")
    return parts


def _checked(model: nn.Module, info: Mapping[str, Any], *, strict: bool, source: str, arch: str) -> nn.Module:
    """The model, unless transformers reported keys it had to leave unset or could not place and
    the load is strict. transformers' report already leaves out what the architecture declares
    harmless (legacy buffers, tied weights), so what remains is a real mismatch."""
    parts = _mismatch_parts(info)
    if strict and parts:
        raise LoadError(
            f"{source}: the weights do not match {arch}: " + ", ".join(parts) + " keys",
            hint="check the config (or `arch` and `arch_kwargs`), or set `non_strict` to load "
            "what matches (the rest keeps its random initialisation)",
        )
    return model


def _loading_notes(info: Mapping[str, Any], *, strict: bool) -> list[str]:
    parts = _mismatch_parts(info)
    if strict or not parts:
        return []
    return ["`non_strict`: " + ", ".join(parts) + " keys ignored; those weights keep their random initialisation"]


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars, loading report and warnings while it loads: gradcheck's
    computations never print, and what matters in the report (the keys) is returned as data."""
    import importlib

    hf_logging: Any = importlib.import_module("transformers.utils.logging")
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled() if hasattr(hf_logging, "is_progress_bar_enabled") else None
    hf_logging.set_verbosity_error()
    if bars:
        hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _few(keys: list[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (", ..." if len(keys) > limit else "")


# ---------------------------------------------------------------------------------------------
# Inputs the model declares


@dataclass(frozen=True)
class DeclaredInput:
    """One keyword input: token ids below ``high``, a mask of ones, or N(0, 1) floats."""

    name: str
    shape: tuple[int, ...]
    kind: str  # "ids", "mask" or "float"
    high: int = 0


@dataclass(frozen=True)
class Declaration:
    inputs: tuple[DeclaredInput, ...]
    # Non-tensor keyword arguments the forward needs (CLIP's return_loss=True).
    constants: dict[str, Any] = field(default_factory=dict)
    model_loss: bool = False
    notes: tuple[str, ...] = ()


_MASKS = {"input_ids": "attention_mask", "decoder_input_ids": "decoder_attention_mask"}

DEFAULT_BATCH = 8
DEFAULT_SEQ = 16
DEFAULT_IMAGE = 224

# Mapping tables (transformers.models.auto.modeling_auto) of heads that compute a loss from
# token `labels` shaped like their input ids; the suffixes catch heads missing from the tables.
_LABELLED_TABLES = (
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES",
)
_LABELLED_SUFFIXES = ("LMHeadModel", "ForCausalLM", "ForMaskedLM", "ForConditionalGeneration")


def is_transformers_model(module: object) -> bool:
    return (
        any(base.__name__ == "PreTrainedModel" for base in type(module).__mro__)
        and getattr(module, "config", None) is not None
    )


def _labelled_heads() -> set[str]:
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:  # pragma: no cover
        return set()
    names: set[str] = set()
    for table in _LABELLED_TABLES:
        for value in getattr(modeling_auto, table, {}).values():
            names.update([value] if isinstance(value, str) else [v for v in value if isinstance(v, str)])
    return names


def _sub(config: Any, *names: str) -> Any:
    """The first of the config's sub-configs (text_config, vision_config, ...) that exists, else the config."""
    for name in names:
        sub = getattr(config, name, None)
        if sub is not None and not isinstance(sub, (dict, str, int, float)):
            return sub
    return config


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _accepted(module: nn.Module) -> tuple[set[str], set[str]]:
    """The keyword parameters of ``forward``, and those of them that have no default."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return set(), set()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    accepted = {n for n, p in params.items() if p.kind in kinds}
    required = {n for n, p in params.items() if p.kind in kinds and p.default is inspect.Parameter.empty}
    return accepted, required


def _dummy_names(module: nn.Module) -> list[str]:
    try:
        dummy = module.dummy_inputs  # type: ignore[attr-defined]
    except Exception:  # a property that needs what a tiny config lacks: it only named inputs
        return []
    return [str(k) for k in dummy] if isinstance(dummy, Mapping) else []


def _vocabulary(module: nn.Module, config: Any) -> int | None:
    """Ids the input embedding can look up (the table itself is the authority over config fields)."""
    from torch import nn

    get = getattr(module, "get_input_embeddings", None)
    try:
        embedding = get() if callable(get) else None
    except Exception:  # NotImplementedError on models without token embeddings
        embedding = None
    if isinstance(embedding, nn.Embedding):
        return int(embedding.num_embeddings)
    return _int(getattr(_sub(config, "text_config"), "vocab_size", None))


def _label_vocabulary(module: nn.Module, vocab: int) -> int:
    from torch import nn

    get = getattr(module, "get_output_embeddings", None)
    try:
        head = get() if callable(get) else None
    except Exception:
        head = None
    if isinstance(head, nn.Linear):
        return min(vocab, int(head.out_features))
    return vocab


def _position_limit(config: Any, *names: str) -> int | None:
    for name in names:
        value = _int(getattr(config, name, None))
        if value is not None:
            return value
    return None


def _image_size(config: Any) -> tuple[int, int]:
    vision = _sub(config, "vision_config")
    size = getattr(vision, "image_size", None)
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(_int(s) for s in size):
        return int(size[0]), int(size[1])
    side = _int(size) or DEFAULT_IMAGE
    return side, side


def _audio_samples(config: Any, frames: int) -> int:
    """Raw-audio samples that the convolutional feature encoder turns into ``frames`` frames
    (Wav2Vec2 and kin), or one second at the config's sampling rate when it has no such encoder."""
    kernels, strides = getattr(config, "conv_kernel", None), getattr(config, "conv_stride", None)
    if (
        isinstance(kernels, (list, tuple))
        and isinstance(strides, (list, tuple))
        and kernels
        and len(kernels) == len(strides)
    ):
        receptive, hop = 1, 1
        for kernel, stride in zip(kernels, strides, strict=True):
            receptive += (int(kernel) - 1) * hop
            hop *= int(stride)
        return receptive + (frames - 1) * hop
    return _int(getattr(config, "sampling_rate", None)) or 16000


def declared_inputs(
    module: nn.Module,
    *,
    batch: int | None,
    seq_len: int | None,
    shapes: tuple[tuple[int, ...], ...] = (),
) -> Declaration | None:
    """The keyword inputs a transformers model declares for itself, at the probe's sizes.

    ``shapes`` (``input_shapes``) set the shapes of the model's primary inputs in order (the main
    input first): they change sizes only, so ids stay ids over the vocabulary, masks stay, and a
    head that computes its own loss still gets its labels. None when the model declares nothing
    gradcheck knows how to synthesise.
    """
    if not is_transformers_model(module):
        return None
    config = module.config  # type: ignore[attr-defined]
    main = getattr(module, "main_input_name", None)
    accepted, required = _accepted(module)
    if not isinstance(main, str) or main not in accepted:
        return None
    given = list(shapes)
    first = given[0] if given else None
    batch = (first[0] if first else None) or batch or DEFAULT_BATCH
    text = _sub(config, "text_config")
    seq = seq_len or DEFAULT_SEQ
    if first is not None and main == "input_ids" and len(first) >= 2:
        seq = first[1]
    inputs: list[DeclaredInput] = []
    notes: list[str] = []
    constants: dict[str, Any] = {}
    vocab = _vocabulary(module, config)
    names = [main] + [n for n in _dummy_names(module) if n != main and n in accepted]
    # A dual encoder (CLIP and kin) takes both modalities; its forward asks for its own loss.
    dual = "return_loss" in accepted and {"input_ids", "pixel_values"} <= accepted
    if dual:
        names += [n for n in ("input_ids", "pixel_values") if n not in names]
        constants["return_loss"] = True
    names += [n for n in sorted(required) if n not in names]

    def shape_for(default: tuple[int, ...]) -> tuple[int, ...]:
        # The i-th `input_shape` goes to the i-th primary input (main first); the rest follow batch.
        if given:
            chosen = given.pop(0)
            return chosen
        return (batch, *default[1:])

    def tokens(name: str) -> None:
        nonlocal seq
        if vocab is None:
            raise UsageError(
                f"cannot synthesise {name}: the model declares no vocabulary size",
                hint="give the inputs in a file (`input`)",
            )
        limit = _position_limit(text, "max_position_embeddings", "n_positions", "max_target_positions")
        shape = shape_for((batch, seq))
        if len(shape) != 2:
            raise UsageError(
                f"`input_shape` {','.join(map(str, shape))} does not fit {name}, token ids of shape (batch, sequence)",
                hint="e.g. 8,16",
            )
        if limit is not None and shape[1] > limit:
            raise UsageError(
                f"`seq_len` {shape[1]} exceeds the model's maximum of {limit} positions",
                hint=f"use a `seq_len` of {limit} or less",
            )
        inputs.append(DeclaredInput(name, shape, "ids", vocab))

    for name in names:
        if any(i.name == name for i in inputs):
            continue
        if name in ("input_ids", "decoder_input_ids"):
            if name == "decoder_input_ids" and _labelled(module, config, accepted):
                continue  # the head shifts its labels into decoder inputs itself
            tokens(name)
        elif name.endswith("attention_mask") or name in ("token_type_ids",):
            continue  # added after the inputs they belong to
        elif name == "pixel_values":
            inputs.append(DeclaredInput(name, shape_for(_pixel_shape(config, batch)), "float"))
        elif name == "input_features":
            inputs.append(DeclaredInput(name, shape_for(_feature_shape(config, batch, seq)), "float"))
        elif name == "input_values":
            inputs.append(DeclaredInput(name, shape_for(_values_shape(config, batch, seq)), "float"))
        elif name in required:
            return None  # a required input gradcheck cannot synthesise: let the caller say so
    if not inputs:
        return None
    main_batch = inputs[0].shape[0]
    token_inputs = {i.name: i for i in inputs if i.kind == "ids"}
    masked: list[DeclaredInput] = []
    for item in inputs:  # each mask right after the ids it masks
        masked.append(item)
        mask_name = _MASKS.get(item.name)
        if mask_name in accepted:
            masked.append(DeclaredInput(mask_name, item.shape, "mask"))
    inputs = masked
    model_loss = bool(constants.get("return_loss"))
    if _labelled(module, config, accepted):
        label_vocab = _label_vocabulary(module, vocab) if vocab is not None else None
        if label_vocab is not None:
            if getattr(config, "is_encoder_decoder", False) or main != "input_ids":
                limit = _position_limit(
                    _sub(config, "decoder"), "max_target_positions", "max_position_embeddings", "n_positions"
                )
                length = min(seq, limit) if limit else seq
                inputs.append(DeclaredInput("labels", (main_batch, length), "ids", label_vocab))
            else:
                inputs.append(DeclaredInput("labels", token_inputs["input_ids"].shape, "ids", label_vocab))
            model_loss = True
    elif (
        getattr(config, "is_encoder_decoder", False)
        and "decoder_input_ids" in accepted
        and "decoder_input_ids" not in token_inputs
        and vocab is not None
    ):
        limit = _position_limit(_sub(config, "decoder"), "max_target_positions", "max_position_embeddings")
        inputs.append(DeclaredInput("decoder_input_ids", (main_batch, min(seq, limit) if limit else seq), "ids", vocab))
    if given:
        notes.append(f"{len(given)} `input_shape` value(s) beyond the model's {len(inputs)} inputs were ignored")
    return Declaration(tuple(inputs), constants, model_loss, tuple(notes))


def _labelled(module: nn.Module, config: Any, accepted: set[str]) -> bool:
    """Whether the head computes its own token-level loss from ``labels`` shaped like its ids."""
    if "labels" not in accepted:
        return False
    name = type(module).__name__
    if getattr(config, "is_encoder_decoder", False) and name.endswith("ForConditionalGeneration"):
        return True
    if getattr(module, "main_input_name", None) != "input_ids":
        return False
    return name in _labelled_heads() or name.endswith(_LABELLED_SUFFIXES)


def _pixel_shape(config: Any, batch: int) -> tuple[int, ...]:
    vision = _sub(config, "vision_config")
    height, width = _image_size(config)
    channels = _int(getattr(vision, "num_channels", None)) or 3
    frames = _int(getattr(vision, "num_frames", None))
    if frames is not None:  # video models: (batch, frames, channels, height, width)
        return (batch, frames, channels, height, width)
    return (batch, channels, height, width)


def _feature_shape(config: Any, batch: int, seq: int) -> tuple[int, ...]:
    """Spectrogram features. Whisper's encoder takes exactly 2 * max_source_positions mel frames
    (its convolutions halve them once), channels first; Speech2Text and kin take frames first."""
    mels = _int(getattr(config, "num_mel_bins", None))
    sources = _int(getattr(config, "max_source_positions", None))
    if mels is not None and sources is not None:
        return (batch, mels, 2 * sources)
    per_channel = _int(getattr(config, "input_feat_per_channel", None))
    channels = _int(getattr(config, "input_channels", None)) or 1
    features = per_channel * channels if per_channel else (_int(getattr(config, "feature_size", None)) or mels or 80)
    return (batch, max(seq, 4) * 4, features)


def _values_shape(config: Any, batch: int, seq: int) -> tuple[int, ...]:
    mels = _int(getattr(config, "num_mel_bins", None))
    length = _int(getattr(config, "max_length", None))
    if mels is not None and length is not None:  # AST: a spectrogram patch grid under input_values
        return (batch, length, mels)
    samples = _audio_samples(config, seq)
    channels = _int(getattr(config, "audio_channels", None))
    return (batch, channels, samples) if channels is not None else (batch, samples)
