"""Input shapes that an exported program was specialised to, and what to say about them.

``torch.export`` fixes every input dimension it was not told is dynamic (``torch.export.Dim``);
the program then checks its inputs with guards, and a probe at another size dies on a raw
``Guard failed: x.size()[0] == 2``. This module reads the shapes back from the program, so that
a probe batch that does not fit is refused up front with the exported shape and the way to export
dynamic dimensions, and a fully static program says that it is probed at its own shape.

TorchScript archives keep no input shapes at all (``torch.jit.load`` drops the types a trace
recorded), so for them the only evidence is a failed forward pass: ``explain_forward_failure``
turns the interpreter's multi-line report into its one informative line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gradcheck_cli.errors import UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn


def dynamic_export_hint(position: int, axis: int, size: int) -> str:
    """How to export the program so that dimension ``axis`` of input ``position`` may vary."""
    name = "batch" if axis == 0 else f"dim{axis}"
    spec = "{" + f"{axis}: torch.export.Dim('{name}', max={max(size, 2) * 2})" + "}"
    slots = ", ".join(["None"] * position + [spec])
    return (
        "leave out `input_shape` and `batch_size` to probe at the exported shape, or re-export "
        f"with dynamic dimensions: torch.export.export(model, args, dynamic_shapes=({slots},))"
    )


@dataclass(frozen=True)
class InputDims:
    """One tensor input of an exported program: each dimension fixed (int) or a range."""

    name: str
    # A fixed size, or (min, max) for a dynamic dimension (max None: unbounded).
    dims: tuple[int | tuple[int, int | None], ...]

    @property
    def static(self) -> bool:
        return all(isinstance(d, int) for d in self.dims)

    def describe(self) -> str:
        parts = []
        for d in self.dims:
            if isinstance(d, int):
                parts.append(str(d))
            else:
                low, high = d
                parts.append(f"{low}..{high if high is not None else 'inf'}")
        return f"({', '.join(parts)})"

    def mismatch(self, shape: Sequence[int]) -> tuple[int, str] | None:
        """The first dimension of ``shape`` that does not fit and why; None when all fit."""
        if len(shape) != len(self.dims):
            return 0, f"rank {len(shape)} instead of {len(self.dims)}"
        for axis, (size, allowed) in enumerate(zip(shape, self.dims, strict=True)):
            if isinstance(allowed, int):
                if size != allowed:
                    return axis, f"dimension {axis} is {size}, fixed at {allowed} when exported"
            else:
                low, high = allowed
                if size < low or (high is not None and size > high):
                    bound = f"{low}..{high}" if high is not None else f">= {low}"
                    return axis, f"dimension {axis} is {size}, exported as dynamic in {bound}"
        return None


def program_inputs(module: nn.Module) -> tuple[InputDims, ...] | None:
    """The tensor inputs of a ``torch.export`` module (``ExportedProgram.module()``), in order.

    None for anything else (an eager module, TorchScript), or when a placeholder carries no
    example value to read the shape from.
    """
    from torch import fx

    if not isinstance(module, fx.GraphModule) or not hasattr(module, "range_constraints"):
        return None
    ranges = getattr(module, "range_constraints", None) or {}
    found: list[InputDims] = []
    for node in module.graph.nodes:
        if node.op != "placeholder":
            continue
        value = node.meta.get("val")
        shape = getattr(value, "shape", None)
        if shape is None:
            if value is None:
                return None
            continue  # a non-tensor input (an int, a flag): nothing to check
        found.append(InputDims(str(node.name), tuple(_dim(size, ranges) for size in shape)))
    return tuple(found) if found else None


def _dim(size: Any, ranges: dict[Any, Any]) -> int | tuple[int, int | None]:
    import torch

    if not isinstance(size, torch.SymInt):
        return int(size)
    expr = size.node.expr
    bounds = ranges.get(expr)
    if bounds is None and size.node.shape_env is not None:
        bounds = size.node.shape_env.var_to_range.get(expr)
    low = _finite(getattr(bounds, "lower", None))
    high = _finite(getattr(bounds, "upper", None))
    return (low if low is not None else 0, high)


def _finite(value: Any) -> int | None:
    # sympy's infinity (an unbounded dynamic dimension) refuses int() with AttributeError in some
    # sympy versions rather than OverflowError: ask it first.
    if value is None or getattr(value, "is_finite", True) is False:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None
    return number if abs(number) < 2**62 else None


def static_note(inputs: tuple[InputDims, ...]) -> str | None:
    """The report note for a program whose every input dimension was fixed at export."""
    if not all(i.static for i in inputs):
        return None
    shapes = ", ".join(f"{i.name} {i.describe()}" for i in inputs)
    return (
        f"the program was exported with fixed input shapes ({shapes}); it is probed at that "
        "shape, and other shapes need a re-export with dynamic dimensions (torch.export.Dim)"
    )


def check_inputs(
    module: nn.Module,
    args: Sequence[torch.Tensor],
    kwargs: dict[str, torch.Tensor],
) -> None:
    """Refuse, in one line, probe tensors that an exported program's guards would reject."""
    inputs = program_inputs(module)
    if inputs is None:
        return
    if len(args) + len(kwargs) != len(inputs):
        return  # nested or optional inputs: leave the verdict to the program's own guards
    # Positional inputs come first, in order; keyword inputs are matched by name, since their
    # order in the probe batch need not be the order they were exported in.
    pairs = list(zip(range(len(args)), inputs, args, strict=False))
    by_name = {declared.name: (position, declared) for position, declared in enumerate(inputs)}
    pairs += [(*by_name[name], tensor) for name, tensor in kwargs.items() if name in by_name]
    for position, declared, tensor in pairs:
        shape = tuple(int(d) for d in tensor.shape)
        found = declared.mismatch(shape)
        if found is None:
            continue
        axis, problem = found
        kind = "a fixed input shape" if declared.static else "input shape"
        raise UsageError(
            f"the exported program takes '{declared.name}' with {kind} {declared.describe()}; "
            f"the probe input has {shape} ({problem})",
            hint=dynamic_export_hint(position, axis, shape[axis] if axis < len(shape) else 1),
        )


def explain_forward_failure(exc: BaseException) -> str:
    """The informative line of a failed forward pass.

    TorchScript wraps errors as 'The following operation failed in the TorchScript interpreter.'
    followed by a traceback of TorchScript frames; the cause is on the last line.
    """
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if "TorchScript interpreter" in lines[0] and len(lines) > 1:
        cause = lines[-1]
        return cause.split(": ", 1)[1] if cause.startswith(("RuntimeError: ", "ValueError: ")) else cause
    return lines[0]
