"""Run the original and the rewritten model on the probe batch and compare every output.

Tolerance (docs/fold-bn.md explains it at length; docs/theory.md#floating-point-tolerances derives it):

    |folded - original| <= max(rtol(dtype) · scale, 4 · eps(dtype)),   scale = max |original output|
    rtol(dtype) = min(1000 · eps(dtype), sqrt(eps(dtype)))

For float32 (eps = 2^-23 ≈ 1.19e-7) that is 1.19e-4 of the output's largest magnitude. Folding
changes the order and number of float operations (one multiply by a pre-rounded W·s instead of
a conv followed by a scale), so each output element picks up a few ulps of its *intermediate*
magnitudes per layer; through tens of layers that is typically 1e-7..1e-5 of the output scale
(the 3.8e-6 users see). A wrong fold (wrong channel axis, missing shift, zero padding seen
through a shifted BatchNorm) moves outputs by a sizeable fraction of their scale, orders of
magnitude above the tolerance. Integer and boolean outputs must match exactly.

Every check runs at two batch sizes where the model allows it: the probe batch, and one other
size (1, or the nearest the model accepts) made by repeating the probe batch's samples. The
second size proves the written model is not tied to the probe's shape (a re-export that fixed a
dynamic batch); a model whose inputs fix the batch is verified at its one size, with a note.

ONNX models run in onnxruntime with graph optimisations *disabled*: its own Conv+BN fusion
would otherwise make both sides fold the same way and hide a mistake in ours.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gradcheck_cli.errors import (
    LoadError,
    MissingDependencyError,
    ProbeError,
    UsageError,
    VerificationError,
    first_line,
)
from gradcheck_cli.rewrite.fold_records import OutputCheck, Verification

if TYPE_CHECKING:
    import numpy as np
    import onnx
    from torch import nn

    from gradcheck_cli.model.handle import LoadedModel
    from gradcheck_cli.model.torch_save import Saved
    from gradcheck_cli.options import InputOptions
    from gradcheck_cli.probe.batch import ProbeBatch

# (output names, one array per output concatenated over the batches, dtype names)
Reference = tuple[list[str], list[Any], list[str]]

BACKEND_TORCH = "torch eager"
BACKEND_ORT = "onnxruntime (graph optimisations disabled)"

# Batch size for a graph input whose first dimension is symbolic (same default as the probe).
_DEFAULT_ONNX_BATCH = 8

# Multiple of machine epsilon allowed per unit of output scale, capped at sqrt(eps) so that
# half-precision models (eps ~1e-3) are not compared with a tolerance of 100 %.
_EPS_MULTIPLE = 1000.0
# Absolute floor of the tolerance, in ulps of 1 (see compare_outputs).
_ABSOLUTE_ULPS = 4.0

_ONNX_DTYPES = {
    1: "float32",
    2: "uint8",
    3: "int8",
    5: "int16",
    6: "int32",
    7: "int64",
    9: "bool",
    10: "float16",
    11: "float64",
    12: "uint32",
    13: "uint64",
    16: "bfloat16",
}


def _eps(dtype_name: str) -> float:
    """Machine epsilon of a float dtype; 0 for integers and booleans."""
    import numpy as np

    return {
        "float64": float(np.finfo(np.float64).eps),
        "float32": float(np.finfo(np.float32).eps),
        "float16": float(np.finfo(np.float16).eps),
        "bfloat16": 2.0**-7,
    }.get(dtype_name, 0.0)


def relative_tolerance(dtype_name: str) -> float:
    """rtol for outputs of this dtype (0 for integers and booleans: they must match exactly)."""
    eps = _eps(dtype_name)
    if not eps:
        return 0.0
    return min(_EPS_MULTIPLE * eps, math.sqrt(eps))


def compare_outputs(
    names: Sequence[str],
    original: Sequence[np.ndarray[Any, Any]],
    rewritten: Sequence[np.ndarray[Any, Any]],
    *,
    dtypes: Sequence[str],
) -> tuple[OutputCheck, ...]:
    """Per output: max absolute/relative error against the tolerance for its dtype and scale."""
    import numpy as np

    if len(original) != len(rewritten):
        raise ProbeError(
            f"the rewritten model returns {len(rewritten)} outputs, the original {len(original)}",
            hint="this is a bug in gradcheck; please report it",
        )
    checks = []
    for name, dtype, ref, new in zip(names, dtypes, original, rewritten, strict=True):
        if ref.shape != new.shape:
            checks.append(OutputCheck(name, dtype, math.inf, math.inf, 0.0, 0.0, passed=False))
            continue
        ref64 = ref.astype(np.float64)
        new64 = new.astype(np.float64)
        both_nan = np.isnan(ref64) & np.isnan(new64)
        same_inf = np.isinf(ref64) & (ref64 == new64)
        diff = np.where(both_nan | same_inf, 0.0, np.abs(new64 - ref64))
        diff = np.where(np.isnan(diff), np.inf, diff)
        finite = ref64[np.isfinite(ref64)]
        scale = float(np.abs(finite).max()) if finite.size else 0.0
        scale_for_tol = scale if scale > 0 else 1.0
        max_abs = float(diff.max()) if diff.size else 0.0
        # Never below a few ulps of 1: onnxruntime's activation kernels (its Sigmoid, a polynomial)
        # are accurate to about eps in absolute terms, so an output saturated near 0 (a detection
        # map on a random probe batch, max ~1e-6) differs by eps between two runs of equal maths.
        tolerance = max(relative_tolerance(dtype) * scale_for_tol, _ABSOLUTE_ULPS * _eps(dtype))
        checks.append(
            OutputCheck(
                name,
                dtype,
                max_abs,
                max_abs / scale_for_tol,
                scale,
                tolerance,
                passed=max_abs <= tolerance,
            )
        )
    return tuple(checks)


# --------------------------------------------------------------------------------------------
# PyTorch


def torch_outputs(module: nn.Module, batches: Sequence[ProbeBatch]) -> Reference:
    """(names, arrays, dtypes) of every tensor the model returns, concatenated over the batches."""
    import numpy as np
    import torch

    from gradcheck_cli.rewrite.torch_fold import set_eval

    per_batch: list[list[tuple[str, torch.Tensor]]] = []
    was_training = module.training
    set_eval(module)
    try:
        # inference_mode, not just no_grad: no version counters or view tracking either; the
        # outputs only go to numpy.
        with torch.inference_mode():
            for batch in batches:
                per_batch.append(_flatten_outputs(module(*batch.args, **batch.kwargs)))
    except Exception as exc:
        raise ProbeError(
            f"the model failed on the probe batch: {first_line(exc)}",
            hint="pass `input_shape` or `input` with inputs the model accepts",
        ) from exc
    finally:
        set_eval(module, was_training)
    names = [name for name, _ in per_batch[0]]
    arrays = []
    dtypes = []
    for index in range(len(names)):
        parts = [outputs[index][1] for outputs in per_batch]
        dtypes.append(str(parts[0].dtype).removeprefix("torch."))
        joined = torch.cat([p.reshape(1, -1) if p.dim() == 0 else p for p in parts]) if len(parts) > 1 else parts[0]
        if joined.dtype == torch.bfloat16:
            joined = joined.float()
        arrays.append(np.asarray(joined.detach().cpu().numpy()))
    return names, arrays, dtypes


def _flatten_outputs(value: Any, prefix: str = "output") -> list[tuple[str, Any]]:
    import torch

    if isinstance(value, torch.Tensor):
        return [(prefix, value)]
    if isinstance(value, Mapping):
        return [item for key, inner in value.items() for item in _flatten_outputs(inner, f"{prefix}.{key}")]
    if isinstance(value, (list, tuple)):
        fields = getattr(value, "_fields", None)
        labels = list(fields) if fields else [str(i) for i in range(len(value))]
        return [
            item
            for label, inner in zip(labels, value, strict=True)
            for item in _flatten_outputs(inner, f"{prefix}.{label}")
        ]
    return []


@dataclass
class TorchPlan:
    """What a rewritten PyTorch model is checked on: groups of batches, one per batch size, with
    the original's outputs on each, and notes on a size that could not be used."""

    groups: list[list[ProbeBatch]]
    references: list[Reference]
    notes: list[str] = field(default_factory=list)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(group[0].size for group in self.groups)

    def without_second(self, note: str) -> TorchPlan:
        return TorchPlan(self.groups[:1], self.references[:1], [*self.notes, note])


def torch_plan(
    original: nn.Module,
    batches: list[ProbeBatch],
    *,
    batch_range: tuple[int, int | None] | None = (0, None),
    static_reason: str | None = None,
) -> TorchPlan:
    """The probe batches and a second batch size for ``original`` (see the module docstring).

    ``batch_range``: the sizes the model's inputs declare (None: the batch is fixed, and
    ``static_reason`` says why). The original must run at the second size for it to be used.
    """
    plan = TorchPlan([batches], [torch_outputs(original, batches)])
    size = batches[0].size
    other = other_batch_size(size, batch_range)
    if other is None:
        plan.notes.append(f"verified at batch size {size} only: {static_reason or 'the model fixes its batch size'}")
        return plan
    second = resized_batch(batches[0], other)
    if second is None:
        plan.notes.append(f"verified at batch size {size} only: the inputs do not share a batch dimension")
        return plan
    try:
        reference = torch_outputs(original, [second])
    except ProbeError as exc:
        plan.notes.append(
            f"verified at batch size {size} only: the original model does not run at batch size "
            f"{other} ({exc.message.removeprefix('the model failed on the probe batch: ')})"
        )
        return plan
    plan.groups.append([second])
    plan.references.append(reference)
    return plan


def plan_for(loaded: LoadedModel, batches: list[ProbeBatch], *, reference: nn.Module | None = None) -> TorchPlan:
    """:func:`torch_plan` for a loaded model: a second size where the input model allows one.

    An exported program declares which batch sizes it takes; any other model is tried at the
    second size, and used there if it runs. ``reference``: the module whose outputs the
    rewritten one must reproduce (default: the loaded one).
    """
    from gradcheck_cli.model.dynamic import batch_range, program_dims, why_no_batch

    module = loaded.module if reference is None else reference
    if loaded.exported is None:
        return torch_plan(module, batches)
    dims = program_dims(loaded.exported)
    if dims is None:
        return torch_plan(
            module, batches, batch_range=None, static_reason="the input program's inputs are not all tensors"
        )
    return torch_plan(module, batches, batch_range=batch_range(dims), static_reason=why_no_batch(dims))


def as_written(plan: TorchPlan, saved: Saved) -> TorchPlan:
    """``plan`` for the file ``saved`` describes, with the writer's notes.

    The second size is dropped only where the writer fixed the batch size knowingly (a model
    torch.export could not give a dynamic batch): any other written file must run at it.
    """
    checked = TorchPlan(plan.groups, plan.references, [*plan.notes, *saved.notes])
    if saved.static_batch and len(plan.groups) > 1:
        return checked.without_second(
            f"verified at batch size {plan.sizes[0]} only: the file was written with a static batch"
        )
    return checked


def verify_torch_plan(rewritten: nn.Module, plan: TorchPlan, *, backend: str, what: str) -> Verification:
    """``rewritten`` against the original's outputs in ``plan``, at each of its batch sizes.

    Failing to run at the second size, where the original ran, is a :class:`VerificationError`:
    the written model would not be the deployable one the report describes.
    """
    checks = []
    for index, (group, reference) in enumerate(zip(plan.groups, plan.references, strict=True)):
        names, ref, dtypes = reference
        try:
            _, new, _ = torch_outputs(rewritten, group)
        except ProbeError as exc:
            if index == 0:
                raise
            raise fails_at(what, group[0].size, plan.sizes[0], exc.message) from exc
        checks.append(compare_outputs(names, ref, new, dtypes=dtypes))
    # The second size repeats the probe's samples: the distinct samples are the probe batches'.
    return Verification(backend, sum(b.size for b in plan.groups[0]), merge_checks(checks), batch_sizes=plan.sizes)


def fails_at(what: str, size: int, first: int, message: str) -> VerificationError:
    detail = message.split(": ", 1)[-1]
    return VerificationError(
        f"{what} runs at batch size {first} but fails at batch size {size}, where the original runs: {detail}",
        hint="nothing was written; choose another output format with `to`, or report this to gradcheck",
    )


def other_batch_size(size: int, batch_range: tuple[int, int | None] | None = (0, None)) -> int | None:
    """The second batch size to verify at: 1, else the nearest other size ``batch_range`` allows."""
    if batch_range is None:
        return None
    low, high = batch_range
    for candidate in (1, size + 1, size - 1):
        if candidate != size and candidate >= max(low, 1) and (high is None or candidate <= high):
            return candidate
    return None


def resized_batch(batch: ProbeBatch, size: int) -> ProbeBatch | None:
    """``batch`` with ``size`` samples (its own, repeated in order); None when its tensor inputs do
    not all have the batch's size along dimension 0 (then there is no batch dimension to resize)."""
    import torch

    from gradcheck_cli.probe.batch import ProbeBatch

    tensors = [*batch.args, *batch.kwargs.values()]
    if not tensors or any(t.dim() == 0 or t.shape[0] != tensors[0].shape[0] for t in tensors):
        return None
    index = torch.arange(size) % int(tensors[0].shape[0])

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t.index_select(0, index.to(t.device))

    return ProbeBatch(tuple(pick(t) for t in batch.args), {k: pick(v) for k, v in batch.kwargs.items()})


def resized_feed(feed: Mapping[str, Any], size: int) -> dict[str, Any] | None:
    """:func:`resized_batch` for an onnxruntime feed (name -> numpy array)."""
    import numpy as np

    arrays = list(feed.values())
    if not arrays or any(np.ndim(a) == 0 or np.shape(a)[0] != np.shape(arrays[0])[0] for a in arrays):
        return None
    index = np.arange(size) % int(np.shape(arrays[0])[0])
    return {name: np.take(value, index, axis=0) for name, value in feed.items()}


def merge_checks(per_size: Sequence[tuple[OutputCheck, ...]]) -> tuple[OutputCheck, ...]:
    """One check per output over every batch size: the largest error against the tolerance of
    the largest scale, as if the outputs of all sizes had been compared at once."""
    if len(per_size) == 1:
        return per_size[0]
    merged = []
    for checks in zip(*per_size, strict=True):
        worst = max(checks, key=lambda c: c.max_abs_error)
        scale = max(c.scale for c in checks)
        tolerance = max(c.tolerance for c in checks)
        passed = all(c.passed for c in checks) and worst.max_abs_error <= tolerance
        merged.append(
            OutputCheck(
                worst.name,
                worst.dtype,
                worst.max_abs_error,
                worst.max_abs_error / (scale if scale > 0 else 1.0),
                scale,
                tolerance,
                passed,
            )
        )
    return tuple(merged)


# --------------------------------------------------------------------------------------------
# ONNX


def onnx_session(model: onnx.ModelProto | bytes) -> Any:
    """An onnxruntime CPU session with every graph optimisation disabled.

    ``model`` may be already serialised: a model of ~100 MB costs a second or so to serialise on
    a loaded machine, so callers that need the bytes anyway pass them instead."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise MissingDependencyError("onnxruntime", purpose="running ONNX models") from exc
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(
            model if isinstance(model, bytes) else model.SerializeToString(),
            options,
            providers=["CPUExecutionProvider"],
        )
    except Exception as exc:
        raise LoadError(
            f"onnxruntime cannot run the model: {first_line(exc)}",
            hint="check the model with onnx.checker; unsupported ops or opsets cannot be verified",
        ) from exc


def onnx_outputs(model: onnx.ModelProto | bytes, feeds: Sequence[dict[str, Any]]) -> Reference:
    import numpy as np

    session = onnx_session(model)
    names = [output.name for output in session.get_outputs()]
    per_batch = []
    for feed in feeds:
        try:
            per_batch.append(session.run(names, feed))
        except Exception as exc:
            raise ProbeError(
                f"onnxruntime failed on the probe batch: {first_line(exc)}",
                hint="pass `input_shape` or `input` with inputs the model accepts",
            ) from exc
    arrays = [
        np.concatenate([outputs[i] for outputs in per_batch])
        if len(per_batch) > 1 and np.ndim(per_batch[0][i])
        else np.asarray(per_batch[0][i])
        for i in range(len(names))
    ]
    dtypes = [str(a.dtype) for a in arrays]
    return names, arrays, dtypes


def verify_onnx(
    original: onnx.ModelProto | bytes,
    rewritten: onnx.ModelProto | bytes,
    feeds: Sequence[dict[str, Any]],
    *,
    batch_dynamic: bool = False,
    notes: list[str] | None = None,
) -> Verification:
    """Both graphs in onnxruntime on ``feeds``, and at a second batch size when ``batch_dynamic``
    (dimension 0 of every graph input is dynamic); why there is no second size goes to ``notes``.

    The rewritten graph failing at the second size where the original runs is a
    :class:`VerificationError`, as in :func:`verify_torch_plan`.
    """
    reasons = notes if notes is not None else []
    first = _feed_size(feeds[0]) if feeds else 1
    groups: list[tuple[int, list[dict[str, Any]]]] = [(first, list(feeds))]
    other = other_batch_size(first) if batch_dynamic else None
    second = resized_feed(feeds[0], other) if other is not None and feeds else None
    if not batch_dynamic:
        reasons.append(f"verified at batch size {first} only: the graph's inputs have a static batch dimension")
    elif other is not None and second is None:
        reasons.append(f"verified at batch size {first} only: the inputs do not share a batch dimension")
    elif other is not None and second is not None:
        groups.append((other, [second]))
    checks = []
    sizes = []
    for size, group in groups:
        try:
            names, ref, dtypes = onnx_outputs(original, group)
        except ProbeError as exc:
            if size == first:
                raise
            reasons.append(
                f"verified at batch size {first} only: the original graph does not run at batch "
                f"size {size} ({exc.message.split(': ', 1)[-1]})"
            )
            break
        try:
            new_names, new, _ = onnx_outputs(rewritten, group)
        except ProbeError as exc:
            if size == first:
                raise
            raise fails_at("the rewritten graph", size, first, exc.message) from exc
        if new_names != names:
            raise ProbeError(
                f"the rewritten graph's outputs {new_names} differ from the original's {names}",
                hint="this is a bug in gradcheck; please report it",
            )
        checks.append(compare_outputs(names, ref, new, dtypes=dtypes))
        sizes.append(size)
    samples = sum(_feed_size(feed) for feed in feeds)  # the second size repeats these samples
    return Verification(BACKEND_ORT, samples, merge_checks(checks), batch_sizes=tuple(sizes))


def _feed_size(feed: Mapping[str, Any]) -> int:
    import numpy as np

    shape = np.shape(next(iter(feed.values()))) if feed else ()
    return int(shape[0]) if shape else 1


def onnx_probe_feeds(model: onnx.ModelProto, options: InputOptions) -> list[dict[str, Any]]:
    """Inputs for an ONNX graph: `input` file, `input_shape`, or the graph's declared shapes."""
    import numpy as np

    initializer_names = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializer_names]
    batch_size = options.batch_size
    if options.input is not None:
        from gradcheck_cli.probe.batch import read_input_file  # the probe's own reader, one format

        args, kwargs = read_input_file(options.input)
        arrays = [t.detach().cpu().numpy() for t in args]
        feed = (
            dict(zip([i.name for i in inputs], arrays, strict=False))
            if args
            else {k: v.numpy() for k, v in kwargs.items()}
        )
        missing = [i.name for i in inputs if i.name not in feed]
        if missing:
            raise UsageError(
                f"`input` does not provide the graph inputs {missing}",
                hint="save a tuple in graph-input order, or a dict keyed by input name",
            )
        total = int(next(iter(feed.values())).shape[0])
        step = min(batch_size or total, total)
        return [{k: v[start : start + step] for k, v in feed.items()} for start in range(0, total, step)]
    generator = np.random.default_rng(options.seed)
    shapes: list[tuple[int, ...]] = []
    if options.input_shape:
        if len(options.input_shape) != len(inputs):
            raise UsageError(
                f"the graph has {len(inputs)} inputs but {len(options.input_shape)} `input_shape` were given",
                hint="give one `input_shape` per graph input",
            )
        shapes = [tuple(s) for s in options.input_shape]
    else:
        for value in inputs:
            dims = value.type.tensor_type.shape.dim
            shape: list[int] = []
            for position, dim in enumerate(dims):
                if dim.HasField("dim_value") and dim.dim_value > 0:
                    # A static size is what the graph accepts; `batch_size` cannot change it.
                    shape.append(int(dim.dim_value))
                elif position == 0:
                    shape.append(batch_size or _DEFAULT_ONNX_BATCH)
                else:
                    raise UsageError(
                        f"graph input '{value.name}' has a symbolic dimension "
                        f"'{dim.dim_param or '?'}' at position {position}",
                        hint="pass `input_shape` for each graph input (e.g. 8,3,224,224)",
                    )
            shapes.append(tuple(shape))
    feeds = []
    for _ in range(options.batches):
        feed = {}
        for value, input_shape in zip(inputs, shapes, strict=True):
            dtype_name = _ONNX_DTYPES.get(value.type.tensor_type.elem_type, "float32")
            if options.input_dtype is not None:
                dtype_name = options.input_dtype
            feed[value.name] = _draw(generator, input_shape, dtype_name, options.input_range)
        feeds.append(feed)
    return feeds


def _draw(generator: Any, shape: tuple[int, ...], dtype_name: str, value_range: tuple[float, float] | None) -> Any:
    import numpy as np

    if dtype_name in ("float32", "float64", "float16"):
        if value_range is None:
            return generator.standard_normal(shape).astype(dtype_name)
        low, high = value_range
        return generator.uniform(low, high, shape).astype(dtype_name)
    if dtype_name == "bool":
        return generator.integers(0, 2, shape).astype(np.bool_)
    low, high = value_range if value_range is not None else (0, 2)
    return generator.integers(int(low), int(high), shape).astype(dtype_name)


# --------------------------------------------------------------------------------------------
# Latency


def median_ms(run: Callable[[], Any], *, runs: int, warmup: int = 2) -> float:
    """Median wall time of ``run`` in milliseconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        run()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        samples.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(samples)
