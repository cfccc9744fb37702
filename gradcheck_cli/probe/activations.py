"""Which calls are activation functions, and what 'dead' and 'saturated' mean for each.

The same table serves the eager path (``torch.relu``, ``F.relu``, ``x.relu()``, ``nn.ReLU``)
and the graph path (``aten.relu.default``), so a model gets the same rows however it was
written or saved.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Normalised names of functions whose unit dies when its output is exactly zero everywhere.
RELU_FAMILY = frozenset(
    {"relu", "relu6", "leaky_relu", "rrelu", "prelu", "elu", "selu", "celu", "gelu", "silu", "mish", "hardswish"}
)
# Functions with a bounded derivative that vanishes away from the origin.
SATURATING = frozenset({"sigmoid", "tanh", "hardtanh", "hardsigmoid", "softsign", "softplus", "logsigmoid"})
ACTIVATIONS = RELU_FAMILY | SATURATING

# nn.Module classes that are activations, by class name (also TorchScript's original_name).
MODULE_ACTIVATIONS: dict[str, str] = {
    "ReLU": "relu",
    "ReLU6": "relu6",
    "LeakyReLU": "leaky_relu",
    "RReLU": "rrelu",
    "PReLU": "prelu",
    "ELU": "elu",
    "SELU": "selu",
    "CELU": "celu",
    "GELU": "gelu",
    "SiLU": "silu",
    "Mish": "mish",
    "Hardswish": "hardswish",
    "Sigmoid": "sigmoid",
    "Tanh": "tanh",
    "Hardtanh": "hardtanh",
    "Hardsigmoid": "hardsigmoid",
    "Softsign": "softsign",
    "Softplus": "softplus",
    "LogSigmoid": "logsigmoid",
    # transformers' activation modules (some compute GELU from tanh/erf by hand inside).
    "GELUActivation": "gelu",
    "NewGELUActivation": "gelu",
    "FastGELUActivation": "gelu",
    "QuickGELUActivation": "gelu",
    "GELUTanh": "gelu",
    "PytorchGELUTanh": "gelu",
    "AccurateGELUActivation": "gelu",
    "ClippedGELUActivation": "gelu",
    "BloomGelu": "gelu",  # BLOOM's tanh-approximated GELU, written out inside the module
    "SiLUActivation": "silu",
    "MishActivation": "mish",
    "ReLUSquaredActivation": "relu",
}

# Function (or aten op) names, without a trailing '_' for in-place variants.
_FUNCTION_NAMES = {
    "relu": "relu",
    "relu6": "relu6",
    "leaky_relu": "leaky_relu",
    "rrelu": "rrelu",
    "rrelu_with_noise": "rrelu",
    "prelu": "prelu",
    "_prelu_kernel": "prelu",
    "elu": "elu",
    "selu": "selu",
    "celu": "celu",
    "gelu": "gelu",
    "silu": "silu",
    "mish": "mish",
    "hardswish": "hardswish",
    "sigmoid": "sigmoid",
    "expit": "sigmoid",
    "tanh": "tanh",
    "hardtanh": "hardtanh",
    "hardsigmoid": "hardsigmoid",
    "softsign": "softsign",
    "softplus": "softplus",
    "logsigmoid": "logsigmoid",
    "log_sigmoid": "logsigmoid",
    "log_sigmoid_forward": "logsigmoid",
}


def _is_torch_callable(func: Any) -> bool:
    module = getattr(func, "__module__", None) or ""
    if module.startswith("torch"):
        return True
    owner = getattr(func, "__objclass__", None)  # Tensor methods are method descriptors
    return owner is not None and (getattr(owner, "__module__", "") or "").startswith("torch")


def function_name(func: Any) -> str | None:
    """The raw name of a torch function, Tensor method or aten op (None for anything else)."""
    packet = getattr(func, "overloadpacket", None)  # torch.ops.aten.relu.default
    if packet is not None:
        return str(getattr(packet, "__name__", "")).split(".")[-1]
    if not _is_torch_callable(func):
        return None
    name = getattr(func, "__name__", None)
    return name if isinstance(name, str) else None


def activation_of_call(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> str | None:
    """Normalised activation name of a call, or None when it is not an activation."""
    name = function_name(func)
    if name is None:
        return None
    if name.endswith("_") and not name.startswith("_"):
        name = name[:-1]
    fn = _FUNCTION_NAMES.get(name)
    if fn == "hardtanh" and _hardtanh_bounds(args, kwargs or {}) == (0.0, 6.0):
        return "relu6"  # F.relu6 and nn.ReLU6 are hardtanh(0, 6) underneath
    return fn


def _hardtanh_bounds(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[float, float]:
    low = kwargs.get("min_val", args[1] if len(args) > 1 else -1.0)
    high = kwargs.get("max_val", args[2] if len(args) > 2 else 1.0)
    try:
        return float(low), float(high)
    except (TypeError, ValueError):
        return -1.0, 1.0


def call_parameters(fn: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> dict[str, float]:
    """Parameters of the call that change where the function saturates."""
    kwargs = kwargs or {}
    if fn in {"hardtanh", "relu6"}:
        low, high = _hardtanh_bounds(args, kwargs)
        return {"min_val": low, "max_val": high}
    if fn == "softplus":
        beta = kwargs.get("beta", args[1] if len(args) > 1 else 1.0)
        return {"beta": float(beta)}
    return {}


def module_parameters(fn: str, module: Any) -> dict[str, float]:
    if fn in {"hardtanh", "relu6"}:
        return {
            "min_val": float(getattr(module, "min_val", 0.0 if fn == "relu6" else -1.0)),
            "max_val": float(getattr(module, "max_val", 6.0 if fn == "relu6" else 1.0)),
        }
    if fn == "softplus":
        return {"beta": float(getattr(module, "beta", 1.0))}
    return {}


def saturated_mask(fn: str, y: torch.Tensor, cutoff: float, params: dict[str, float]) -> torch.Tensor:
    """Elements whose local derivative is below ``cutoff`` times the function's maximum derivative.

    Computed from the output alone (every derivative below is a function of y), so no input
    needs to be kept.
    """
    import torch

    if fn == "sigmoid":  # s' = s(1 - s), max 1/4
        return y * (1 - y) < cutoff * 0.25
    if fn == "tanh":  # 1 - y^2, max 1
        return 1 - y * y < cutoff
    if fn == "softsign":  # 1/(1+|x|)^2 = (1 - |y|)^2, max 1
        return (1 - y.abs()) ** 2 < cutoff
    if fn == "softplus":  # sigmoid(beta x) = 1 - exp(-beta y), max 1
        return 1 - torch.exp(-params.get("beta", 1.0) * y) < cutoff
    if fn == "logsigmoid":  # 1 - sigmoid(x) = 1 - exp(y), max 1
        return 1 - torch.exp(y) < cutoff
    if fn == "hardtanh":  # derivative 0 at the clamps, 1 in between
        return (y <= params.get("min_val", -1.0)) | (y >= params.get("max_val", 1.0))
    if fn == "hardsigmoid":  # clamp(x/6 + 1/2, 0, 1): derivative 0 at the clamps
        return (y <= 0) | (y >= 1)
    raise ValueError(f"{fn} is not a saturating activation")


def unit_axis(shape: tuple[int, ...], channel_first: bool) -> int:
    """The output dimension that indexes units: features of (N, F), channels of (N, C, ...),
    the last dimension of sequence outputs (N, T, F) unless a conv layout is known."""
    if len(shape) <= 2:
        return len(shape) - 1
    if len(shape) == 3 and not channel_first:
        return 2
    return 1
