"""Which input dimensions of a model are dynamic, so that a rewrite writes them dynamic again.

A re-export (``torch.export``, ``torch.onnx.export``) traces the model at one example shape and
would fix every dimension to it. What stays dynamic is decided here:

- a torch.export program keeps exactly its own dynamic dimensions, with their ranges: they are
  read from the placeholders' symbolic shapes and the program's ``range_constraints``, one
  :class:`DynamicDim` per symbol, so two inputs sharing a batch symbol share it again;
- any other PyTorch model gets a dynamic batch: dimension 0 of every tensor input, one symbol.

Dimensions are described per flattened input (positional tensors, then keyword tensors), and
turned into ``dynamic_shapes`` for torch.export or ``dynamic_axes`` for the ONNX exporter.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import onnx
    import torch
    from torch import nn
    from torch.export import ExportedProgram

# The name of the one dynamic dimension given to models that carry no shape information.
BATCH = "batch"


@dataclass(frozen=True)
class DynamicDim:
    """A dynamic dimension: its symbol's name and the sizes it may take (``high`` None: unbounded).

    A dimension whose size is ``scale * base + offset`` of another symbol (``2*s0``, an input
    that holds two of another's rows) is derived from ``base``, and re-exported so. ``derived``
    without a ``base`` is any other expression: it stays dynamic, and torch.export works its
    relation out again rather than being told it.
    """

    name: str
    low: int
    high: int | None
    derived: bool = False
    base: DynamicDim | None = None
    scale: int = 1
    offset: int = 0


# Per flattened input: dimension index -> its DynamicDim (an empty dict: a static input).
InputDims = tuple[dict[int, DynamicDim], ...]


def batch_dims(args: tuple[torch.Tensor, ...], kwargs: dict[str, torch.Tensor] | None) -> InputDims:
    """Dimension 0 as one shared dynamic ``batch``, in every tensor input whose dimension 0 has the
    first input's size; an input with another leading size (a lookup table, a scalar) stays static."""
    tensors = [*args, *(kwargs or {}).values()]
    sizes = [int(tensor.shape[0]) if tensor.dim() >= 1 else None for tensor in tensors]
    batch = next((size for size in sizes if size is not None), None)
    shared = DynamicDim(BATCH, 0, None)
    return tuple({0: shared} if size is not None and size == batch else {} for size in sizes)


def program_dims(program: ExportedProgram) -> InputDims | None:
    """The user inputs' dynamic dimensions of an exported program, in flattened input order.

    None when the program's inputs cannot be matched to tensors (a non-tensor user input):
    the caller then has nothing reliable to re-export with.
    """
    from torch.export.graph_signature import InputKind, TensorArgument

    placeholders = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    ranges = {str(symbol): value for symbol, value in program.range_constraints.items()}
    dims: list[dict[int, DynamicDim]] = []
    for spec in program.graph_signature.input_specs:
        if spec.kind is not InputKind.USER_INPUT:
            continue
        if not isinstance(spec.arg, TensorArgument):
            return None
        value = placeholders[spec.arg.name].meta.get("val")
        shape = getattr(value, "shape", None)
        if shape is None:
            return None
        dims.append(
            {index: found for index, size in enumerate(shape) if (found := _symbolic(size, ranges)) is not None}
        )
    return tuple(dims)


def _symbolic(size: Any, ranges: dict[str, Any]) -> DynamicDim | None:
    expr = getattr(getattr(size, "node", None), "expr", None)
    if expr is None or not expr.free_symbols:
        return None
    if expr.is_Symbol:
        return _of_symbol(expr, ranges)
    (symbol, *others) = expr.free_symbols
    if not others:
        scale, offset = expr.coeff(symbol), expr.subs(symbol, 0)
        if scale.is_Integer and offset.is_Integer and (expr - (scale * symbol + offset)).expand() == 0:
            return DynamicDim(
                str(expr), 0, None, derived=True, base=_of_symbol(symbol, ranges), scale=int(scale), offset=int(offset)
            )
    return DynamicDim(str(expr), 0, None, derived=True)


def _of_symbol(symbol: Any, ranges: dict[str, Any]) -> DynamicDim:
    bounds = ranges.get(str(symbol))
    if bounds is None:
        return DynamicDim(str(symbol), 0, None)
    return DynamicDim(str(symbol), _bound(bounds.lower) or 0, _bound(bounds.upper))


def _bound(value: Any) -> int | None:
    """An integer bound, or None for an infinite one (torch's int_oo claims to be finite to sympy)."""
    from torch.utils._sympy.numbers import int_oo

    if value in (int_oo, -int_oo) or value.is_infinite:
        return None
    return int(value)


def batch_range(dims: InputDims) -> tuple[int, int | None] | None:
    """The sizes dimension 0 may take in every input at once; None when there is no such batch
    (see :func:`why_no_batch`)."""
    if why_no_batch(dims) is not None:
        return None
    low = max(per_input[0].low for per_input in dims)
    highs = [per_input[0].high for per_input in dims if per_input[0].high is not None]
    return low, min(highs) if highs else None


def why_no_batch(dims: InputDims) -> str | None:
    """Why dimension 0 of the inputs is not one batch that can take any size in a range, or None."""
    if not dims or any(0 not in per_input for per_input in dims):
        return "the input program has a static batch dimension"
    if any(per_input[0].derived for per_input in dims):
        return "the inputs' leading dimensions are related (one is computed from another)"
    return None


def is_dynamic(dims: InputDims) -> bool:
    return any(per_input for per_input in dims)


def export_dynamic_shapes(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None, dims: InputDims
) -> Any:
    """``dynamic_shapes`` for ``torch.export.export(module, args, kwargs)``.

    Keyword inputs are only matched by parameter name, so the specification is bound to the
    signature of ``module.forward``; without keyword inputs the positional tuple form is used,
    which needs no signature.
    """
    from torch.export import Dim

    made: dict[str, Any] = {}

    def dim_of(dynamic: DynamicDim) -> Any:
        if dynamic.base is not None:
            return dim_of(dynamic.base) * dynamic.scale + dynamic.offset
        if dynamic.derived:
            return Dim.AUTO
        if dynamic.name not in made:
            made[dynamic.name] = Dim(_identifier(dynamic.name), min=dynamic.low, max=dynamic.high)
        return made[dynamic.name]

    specs = [{index: dim_of(d) for index, d in per_input.items()} or None for per_input in dims]
    positional = tuple(specs[: len(args)])
    keywords = dict(zip((kwargs or {}).keys(), specs[len(args) :], strict=True))
    if not keywords:
        return positional
    return dict(inspect.signature(module.forward).bind(*positional, **keywords).arguments)


def onnx_dynamic_axes(names: list[str], dims: InputDims) -> dict[str, dict[int, str]]:
    """``dynamic_axes`` for the ONNX exporter: input name -> {dimension: dim_param name}.

    A program's symbol names (``s31``) mean nothing to an ONNX reader: the one symbol found at
    dimension 0 is called ``batch``.
    """
    leading = {per_input[0].name for per_input in dims if 0 in per_input}
    renamed = {leading.pop(): BATCH} if len(leading) == 1 else {}
    return {
        name: {index: renamed.get(d.name, _identifier(d.name)) for index, d in per_input.items()}
        for name, per_input in zip(names, dims, strict=True)
        if per_input
    }


def onnx_input_dims(model: onnx.ModelProto) -> list[list[str | int | None]]:
    """Each graph input's dimensions (initializers excluded): a dim_param, a size, or None (unknown)."""
    initializers = {tensor.name for tensor in model.graph.initializer}
    return [
        [
            dim.dim_param if dim.HasField("dim_param") else int(dim.dim_value) if dim.HasField("dim_value") else None
            for dim in value.type.tensor_type.shape.dim
        ]
        for value in model.graph.input
        if value.name not in initializers
    ]


def onnx_batch_is_dynamic(model: onnx.ModelProto) -> bool:
    """Whether dimension 0 of every graph input is dynamic (a dim_param, or left unknown)."""
    inputs = onnx_input_dims(model)
    return bool(inputs) and all(dims and not isinstance(dims[0], int) for dims in inputs)


def _identifier(name: str) -> str:
    cleaned = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return cleaned if cleaned and not cleaned[0].isdigit() else f"d_{cleaned}"
