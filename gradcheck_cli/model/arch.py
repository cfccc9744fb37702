"""Build an architecture from an `arch` spec.

Specs: ``package.module:callable``, ``path/to/file.py:callable``, ``torchvision:<name>``,
``timm:<name>`` and ``transformers:<ModelClass>`` (built from a config with random weights, never
downloaded). A ``.py`` spec *executes that file*, exactly like ``python file.py`` would
import it: only point it at code you trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradcheck_cli.errors import LoadError, MissingDependencyError, UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn


def parse_arch_kwargs(text: str | None) -> dict[str, Any]:
    if text is None or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"`arch_kwargs` is not valid JSON: {exc.msg} at position {exc.pos}",
            hint="pass a JSON object, e.g. `arch_kwargs` '{\"depth\": 8}'",
        ) from exc
    if not isinstance(value, dict):
        raise UsageError("`arch_kwargs` must be a JSON object", hint="e.g. `arch_kwargs` '{\"depth\": 8}'")
    return value


def build_arch(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    """Instantiate the module that ``spec`` names, with ``kwargs``."""
    return _build(spec, kwargs)


def build_arch_for_weights(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    """:func:`build_arch` for a module whose every parameter and persistent buffer is about to be
    overwritten from a state_dict (strict loading): the random initialisation is skipped.

    ResNet-50's constructor spends most of its time drawing 25M random numbers that the
    checkpoint then replaces. Here the in-place random fills of ``torch.nn.init`` and of tensors
    (``uniform_``, ``normal_``, ...) are skipped while the constructor runs, leaving the tensors
    as allocated (even a ``zero_()`` costs as much: the time is the first touch of fresh memory,
    which loading the state_dict then pays once). That is only right if every tensor so skipped
    is one the state_dict overwrites whole; when any is not (a non-persistent random buffer, a
    fill through a view), the module is built again the ordinary way, from the same random state.
    A constructor that computes something from its freshly drawn weights would compute it from
    unset memory instead; the result was meaningless for loaded weights either way.
    """
    import torch

    state = torch.random.get_rng_state()
    filled: list[torch.Tensor] = []
    with _random_fills_skipped(filled):
        module = _build(spec, kwargs)
    if _all_overwritten_by_state_dict(module, filled):
        return module
    torch.random.set_rng_state(state)
    return _build(spec, kwargs)


# In-place random fills: the torch.nn.init functions (which dispatch through __torch_function__
# themselves) and the Tensor methods they and hand-written initialisers call.
_INIT_FUNCTIONS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "xavier_uniform_",
    "xavier_normal_",
    "orthogonal_",
    "sparse_",
)
_TENSOR_FILLS = ("uniform_", "normal_", "random_", "exponential_", "geometric_", "log_normal_", "cauchy_", "bernoulli_")


@contextlib.contextmanager
def _random_fills_skipped(filled: list[torch.Tensor]) -> Iterator[None]:
    import torch
    from torch.overrides import TorchFunctionMode

    targets = {getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS if hasattr(torch.nn.init, name)}
    targets |= {getattr(torch.Tensor, name) for name in _TENSOR_FILLS if hasattr(torch.Tensor, name)}

    class SkipFills(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            # torch.nn.init passes the tensor by keyword when it dispatches to a mode.
            tensor = args[0] if args else (kwargs or {}).get("tensor")
            if (func in targets or _is_wrapped_init(func)) and isinstance(tensor, torch.Tensor):
                filled.append(tensor)  # left as allocated: loading the state_dict writes every byte
                return tensor
            return func(*args, **(kwargs or {}))

    with SkipFills():
        yield


# Libraries that swap torch.nn.init's functions for wrappers of their own while a model is built
# (transformers 5 does, to skip tensors it has already initialised): the wrappers fill just the same.
_INIT_WRAPPER_MODULES = ("torch.nn.init", "transformers.initialization")


def _is_wrapped_init(func: Any) -> bool:
    return (
        getattr(func, "__module__", None) in _INIT_WRAPPER_MODULES
        and getattr(func, "__name__", None) in _INIT_FUNCTIONS
    )


def _all_overwritten_by_state_dict(module: nn.Module, filled: list[torch.Tensor]) -> bool:
    """Whether each skipped tensor's memory is exactly that of a state_dict entry (a strict load
    copies into every byte of each entry, so nothing unset survives it)."""
    whole: set[tuple[int, int]] = set()
    for tensor in module.state_dict(keep_vars=True).values():
        storage = tensor.untyped_storage()
        if (
            tensor.storage_offset() == 0
            and tensor.is_contiguous()
            and tensor.numel() * tensor.element_size() == storage.nbytes()
        ):
            whole.add((storage.data_ptr(), storage.nbytes()))
    for tensor in filled:
        storage = tensor.untyped_storage()
        if (storage.data_ptr(), storage.nbytes()) not in whole:
            return False
    return True


def _build(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    from torch import nn

    factory = resolve_factory(spec)
    try:
        module = factory(**kwargs)
    except TypeError as exc:
        raise LoadError(
            f"`arch` {spec} could not be called with {kwargs or 'no arguments'}: {exc}",
            hint="check `arch_kwargs` against the callable's signature",
        ) from exc
    except Exception as exc:  # the user's own code failed; report it, not our stack
        raise LoadError(
            f"`arch` {spec} raised {type(exc).__name__}: {exc}",
            hint="run the callable by hand to debug it, or pass `debug`",
        ) from exc
    if not isinstance(module, nn.Module):
        raise LoadError(
            f"`arch` {spec} returned {type(module).__name__}, not a torch.nn.Module",
            hint="point `arch` at a function or class that builds the model",
        )
    return module


def resolve_factory(spec: str) -> Any:
    prefix, sep, name = spec.partition(":")
    if not sep or not prefix or not name:
        raise UsageError(
            f"`arch` {spec!r} is not of the form MODULE:CALLABLE",
            hint="e.g. `arch` mypkg.models:build, `arch` models.py:Net, `arch` torchvision:resnet18",
        )
    if prefix == "torchvision":
        return _torchvision_factory(name)
    if prefix == "timm":
        return _timm_factory(name)
    if prefix == "transformers":
        return _transformers_factory(name)
    if prefix.endswith(".py"):
        module = _import_file(Path(prefix))
    else:
        try:
            module = importlib.import_module(prefix)
        except ImportError as exc:
            raise LoadError(
                f"`arch`: cannot import module '{prefix}': {exc}",
                hint="install the package, or point `arch` at a .py file",
            ) from exc
    target: Any = module
    for part in name.split("."):
        if not hasattr(target, part):
            raise LoadError(f"`arch`: '{prefix}' has no attribute '{name}'", hint="check the name after the colon")
        target = getattr(target, part)
    if not callable(target):
        raise LoadError(f"`arch`: '{spec}' is not callable", hint="name a function or class")
    return target


def _import_file(path: Path) -> Any:
    if not path.is_file():
        raise LoadError(f"`arch`: no such file {path}", hint="check the path before the colon")
    resolved = path.resolve()
    # A name derived from the path keeps two files called model.py apart in sys.modules.
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    module_name = f"gradcheck_arch_{resolved.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, resolved)
    if spec is None or spec.loader is None:
        raise LoadError(f"`arch`: cannot import {path}", hint="is it a Python file?")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise LoadError(
            f"`arch`: importing {path} raised {type(exc).__name__}: {exc}",
            hint="fix the file, or pass `debug` for the traceback",
        ) from exc
    return module


def _torchvision_factory(name: str) -> Any:
    try:
        import torchvision.models
    except ImportError as exc:
        raise MissingDependencyError("torchvision", purpose=f"`arch` torchvision:{name}", extra="vision") from exc
    available = set(torchvision.models.list_models())
    if name not in available:
        raise LoadError(f"torchvision has no model '{name}'", hint="see torchvision.models.list_models() for the names")

    def build(**kwargs: Any) -> Any:
        kwargs.setdefault("weights", None)  # never download: the checkpoint supplies the weights
        return torchvision.models.get_model(name, **kwargs)

    return build


def _timm_factory(name: str) -> Any:
    try:
        import timm
    except ImportError as exc:
        raise MissingDependencyError("timm", purpose=f"`arch` timm:{name}") from exc

    def build(**kwargs: Any) -> Any:
        kwargs.setdefault("pretrained", False)
        return timm.create_model(name, **kwargs)

    return build


def _transformers_factory(name: str) -> Any:
    """``transformers:BertForMaskedLM``: the class built from a config, never from the hub.

    The config comes from the ``config`` keyword (a config.json or a directory holding one), which
    the loader fills in from the model's directory or the weights' neighbour when it is not given;
    any other keyword overrides a config field (e.g. ``{"num_hidden_layers": 2}``). Loading weights
    into it goes through transformers' own ``from_pretrained`` (gradcheck_cli.model.hf).
    """
    from gradcheck_cli.model.hf import config_for, model_class

    cls = model_class(name)

    def build(**kwargs: Any) -> Any:
        config_path = kwargs.pop("config", None)
        if config_path is None:
            raise LoadError(
                f"`arch` transformers:{name} needs a config",
                hint="put config.json next to the weights, pass the model directory, or "
                '`arch_kwargs` \'{"config": "path/to/config.json"}\'',
            )
        path = Path(config_path)
        return cls(config_for(cls, path / "config.json" if path.is_dir() else path, kwargs))

    return build
