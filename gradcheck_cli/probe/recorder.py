"""Per-row accumulators: reduce each output where it lives, fetch once per micro-batch.

Hooks call :meth:`Recorder.record_output` with the output tensor; it is reduced at once to
eight numbers (and, for ReLU-family rows, a per-unit 'ever non-zero' mask) on the tensor's
device and then dropped. Nothing crosses to the host until :meth:`Recorder.end_batch`, which
moves every row's numbers in one transfer.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gradcheck_cli.probe import compiled as compiled_pass
from gradcheck_cli.probe.activations import RELU_FAMILY, SATURATING, saturated_mask, unit_axis
from gradcheck_cli.records import (
    AttentionStats,
    DeadUnits,
    GradStats,
    Histograms,
    LayerStats,
    OutputStats,
    RowKind,
    Saturation,
    ThroughTime,
)
from gradcheck_cli.stats import CANCELLATION_GUARD, Moments

if TYPE_CHECKING:
    import torch

    from gradcheck_cli.probe.attention import AttentionRows
    from gradcheck_cli.probe.compiled import CompiledStatistics

    # A row's numbers for one micro-batch (see the layout below): Python floats when computed on
    # the CPU, a float64 tensor on an accelerator, fetched with the others at the batch's end.
    Statistics = torch.Tensor | list[float]

# Layout of the per-batch statistics vector.
_COUNT, _MEAN, _M2, _MIN, _MAX, _NAN, _INF, _SAT = range(8)


@dataclass
class Row:
    name: str
    type: str
    kind: RowKind
    module: str
    fn: str | None = None
    fn_params: dict[str, float] = field(default_factory=dict)
    channel_first: bool = False
    param_names: tuple[str, ...] = ()  # fully qualified names of the parameters the row owns
    shape: tuple[int, ...] = ()
    moments: Moments = field(default_factory=Moments)
    nan: int = 0
    inf: int = 0
    saturated: int = 0
    grad_sumsq: float = 0.0
    has_grad: bool = False
    alive: torch.Tensor | None = None  # per-unit 'was ever non-zero', OR-merged across batches
    axis: int = 1
    hist_output: torch.Tensor | None = None  # counts per histogram bin, summed over micro-batches
    hist_grad: torch.Tensor | None = None
    # This micro-batch's statistics, not yet merged: Python floats where they were computed on the
    # CPU (reading a CPU scalar costs no synchronisation), tensors on an accelerator.
    pending: list[Statistics] = field(default_factory=list)
    pending_grad: list[torch.Tensor | float] = field(default_factory=list)
    seen_output: bool = False
    skip_reason: str | None = None  # why the output could not be measured
    wants_grad: bool = False  # the output required a gradient (so a missing one means the loss ignores it)
    input_row: Row | None = None  # norm layers: the same statistics of their input
    attention_entropy: torch.Tensor | None = None  # per head, summed over rows
    attention_saturated: torch.Tensor | None = None
    attention_rows: int = 0
    attention_keys: int = 0

    def input_of(self) -> Row:
        """The row of this (norm) layer's input statistics, created on first use."""
        if self.input_row is None:
            self.input_row = Row(name=self.name, type=self.type, kind=self.kind, module=self.module)
        return self.input_row


def _measured(output: torch.Tensor) -> torch.Tensor:
    """The values statistics are computed on: detached, and float32 for half precision (whose
    sums would overflow or round away), except large bfloat16 tensors on the CPU, which are
    reduced in their own dtype row by row (see :func:`sum_of_squares`): converting one of 16M
    values took 27 ms, its three reductions in bfloat16 2.5 ms."""
    import torch

    y = output.detach()
    if y.dtype in (torch.float16, torch.bfloat16) and not _native_rows(y):
        return y.float()
    return y


def cpu_moments(y: torch.Tensor, total: torch.Tensor | None = None) -> tuple[float, float]:
    """(variance, mean) from a sum and a sum of squares: two vectorised passes instead of CPU
    Welford's one slow pass (about 8x slower per element on this kind of machine). ``total`` is
    Σx where the caller already has it (a ReLU-family row's per-unit sums), saving a pass.

    E[x^2] - E[x]^2 loses digits when the mean dwarfs the spread; reading the result costs no
    synchronisation on the CPU, so such tensors (and overflowing ones) fall back to Welford.
    """
    import torch

    count = y.numel()
    mean = float(sum_of_elements(y) if total is None else total) / count
    mean_square = float(sum_of_squares(y)) / count
    var = mean_square - mean * mean
    if not math.isfinite(var) or var < CANCELLATION_GUARD * mean_square:
        exact_var, exact_mean = torch.var_mean(y.float() if y.dtype.itemsize < 4 else y, correction=0)
        return float(exact_var), float(exact_mean)
    return var, mean


def sum_of_elements(values: torch.Tensor) -> torch.Tensor:
    """Σx as a float64 scalar tensor, accumulated in at least float32: large bfloat16 tensors on
    the CPU row by row in their own dtype, as :func:`sum_of_squares` does."""
    import torch

    if _native_rows(values):
        rows, tail = _rows_and_tail(values)
        total: torch.Tensor = rows.sum(dim=1).to(torch.float64).sum()
        if tail is not None:
            total = total + tail.sum(dtype=torch.float32).to(torch.float64)
        return total
    return values.sum(dtype=torch.float32 if values.dtype.itemsize < 4 else None).to(torch.float64)


def sum_of_squares(values: torch.Tensor) -> torch.Tensor:
    """Σx² of every element, as a float64 scalar tensor, accumulated in at least float32.

    On the CPU a contiguous float32/float64 tensor goes through a BLAS dot product with itself:
    on 12.8M float32 normal values (mean 0.5) it took 0.9 ms against vector_norm's 1.8 ms, with a
    relative error of 1e-4 against vector_norm's 9e-4 (BLAS keeps more partial sums). MKL's
    partial sums depend on the data's alignment, so only 64-byte-aligned data (every tensor torch
    allocates on the CPU; views at offsets fixed by the model) takes that path: the same seed gives
    the same bits. Elsewhere, and for half precision, vector_norm with float32 accumulation, row by
    row for large tensors (see below).
    """
    import torch

    if (
        values.device.type == "cpu"
        and values.dtype in (torch.float32, torch.float64)
        and values.is_contiguous()
        and values.data_ptr() % 64 == 0
    ):
        flat = values.reshape(-1)
        return torch.dot(flat, flat).to(torch.float64)
    accumulate = torch.float64 if values.dtype == torch.float64 else torch.float32
    if values.is_contiguous() and values.numel() >= 2 * _NORM_ROW:
        # One vector_norm over a whole large tensor accumulates in one float32 sum per thread: on a
        # 32000x2048 bfloat16 embedding its square was off by 1.2%. Row by row (rows of 4096) and
        # the rows' squares added in float64, the error was 7e-7, at the same speed.
        #
        # bfloat16 on the CPU: converting to float32 first made these norms most of a 1B Llama
        # probe's overhead (0.5 s per 65M elements, against 0.04 s for a pass that reads them).
        # vector_norm in bfloat16 still accumulates each row in float32 and rounds only the row's
        # norm to bfloat16 (2^-9 relative, unbiased), so the sum's error shrinks as 2^-8/sqrt(rows):
        # 3e-5 to 6e-5 on 12-65M elements, 14x faster. Only tensors of _NATIVE_ROWS rows or more
        # take it (about 1e-4 at the smallest), where converting costs most. (float16 keeps
        # float32: its range would under- or overflow row norms.)
        rows, tail = _rows_and_tail(values)
        norms = torch.linalg.vector_norm(rows, dim=1, dtype=None if _native_rows(values) else accumulate)
        total: torch.Tensor = norms.to(torch.float64).square().sum()
        if tail is not None:
            total = total + torch.linalg.vector_norm(tail, dtype=accumulate).to(torch.float64).square()
        return total
    if values.numel() >= 2 * _NORM_ROW and values.dim() >= 2 and values.shape[-1] >= 64:
        # A large view (not contiguous): its own last dimension serves as the rows, without a copy.
        native = _bfloat16_on_cpu(values) and values.numel() // values.shape[-1] >= _NATIVE_ROWS
        by_row = torch.linalg.vector_norm(values, dim=-1, dtype=None if native else accumulate)
        squares: torch.Tensor = by_row.to(torch.float64).square().sum()
        return squares
    norm: torch.Tensor = torch.linalg.vector_norm(values, dtype=accumulate).to(torch.float64)
    return norm * norm


_NORM_ROW = 4096


def _rows_and_tail(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A contiguous tensor as rows of _NORM_ROW values (a view, no copy) and the values left over
    (None when there are none)."""
    flat = values.reshape(-1)
    whole = flat.numel() // _NORM_ROW * _NORM_ROW
    return flat[:whole].view(-1, _NORM_ROW), (flat[whole:] if whole < flat.numel() else None)


_NATIVE_ROWS = 1024


def _native_rows(values: torch.Tensor) -> bool:
    """Whether ``values`` is reduced row by row in bfloat16: a contiguous CPU tensor of at least
    _NATIVE_ROWS rows, where the per-row rounding averages out (see :func:`sum_of_squares`)."""
    return _bfloat16_on_cpu(values) and values.is_contiguous() and values.numel() >= _NATIVE_ROWS * _NORM_ROW


def _bfloat16_on_cpu(values: torch.Tensor) -> bool:
    import torch

    return values.dtype == torch.bfloat16 and values.device.type == "cpu"


def _unit_blocks(y: torch.Tensor, axis: int) -> tuple[torch.Tensor, int, int]:
    """``y`` as (leading, units, trailing) around ``axis`` (a view), with the leading and trailing
    sizes."""
    units = y.shape[axis]
    leading = 1
    for size in y.shape[:axis]:
        leading *= size
    trailing = y.numel() // max(leading * units, 1)
    return y.reshape(leading, units, trailing), leading, trailing


def unit_extremes(y: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per unit along ``axis``: (minimum, maximum).

    Reduces the contiguous trailing block first, then the leading one: a reduction over
    scattered dimensions (e.g. (0, 2, 3) of NCHW at once) is an order of magnitude slower on CPU.
    """
    blocks, leading, trailing = _unit_blocks(y, axis)
    if trailing == 1:  # units on the last axis (sequences, features): a column reduction, one pass
        rows = blocks[:, :, 0]
        return rows.amin(dim=0), rows.amax(dim=0)
    if leading == 1:
        return blocks[0].amin(dim=1), blocks[0].amax(dim=1)
    return blocks.amin(dim=2).amin(dim=0), blocks.amax(dim=2).amax(dim=0)


def unit_sums(y: torch.Tensor, axis: int) -> torch.Tensor:
    """Per unit along ``axis``: the sum of its elements, accumulated in float32 (trailing block
    first, as :func:`unit_extremes`)."""
    import torch

    blocks, leading, trailing = _unit_blocks(y, axis)
    accumulate = torch.float32 if y.dtype.itemsize < 4 else None
    if trailing == 1:
        return blocks[:, :, 0].sum(dim=0, dtype=accumulate)
    if leading == 1:
        return blocks[0].sum(dim=1, dtype=accumulate)
    return blocks.sum(dim=2, dtype=accumulate).sum(dim=0)


def units_alive(y: torch.Tensor, axis: int) -> torch.Tensor:
    """Per unit along ``axis``: whether any element is non-zero (NaN counts as non-zero), from
    its minimum and maximum."""
    low, high = unit_extremes(y, axis)
    return (low != 0) | (high != 0)


def _alive_from_sums(y: torch.Tensor, axis: int, sums: torch.Tensor, lowest: float) -> torch.Tensor:
    """Per unit: whether any element is non-zero, from its sum where that settles it.

    A unit whose sum is non-zero has a non-zero element. With no negative element (a ReLU's
    output: ``lowest`` >= 0) a zero sum means every element is zero, since a sum of non-negative
    floats is at least its largest term. Otherwise a zero sum may be cancellation, and the units
    are tested by their extremes.
    """
    alive = sums != 0
    if lowest >= 0 or bool(alive.all()):
        return alive
    return units_alive(y, axis)


@dataclass
class _Reduced:
    """One tensor's statistics for one micro-batch, shared by every row the tensor reaches."""

    source: weakref.ref[torch.Tensor]
    version: int
    values: Statistics  # count, mean, M2, min, max, NaN count, Inf count
    n_nan: torch.Tensor | None  # None when known to be zero
    alive: dict[int, torch.Tensor] = field(default_factory=dict)  # axis -> per unit: any element non-zero
    histogram: torch.Tensor | None = None

    def with_saturation(self, saturated: torch.Tensor | None) -> Statistics:
        """A row's eight numbers: these seven and its saturation count (0 for a row that does
        not saturate)."""
        import torch

        if isinstance(self.values, list):
            return [*self.values, float(saturated) if saturated is not None else 0.0]
        extra = saturated.to(torch.float64).reshape(1) if saturated is not None else self.values.new_zeros(1)
        return torch.cat([self.values, extra])


class Recorder:
    """Owns every row of one probe, in the order rows first produced an output."""

    def __init__(self, *, saturation_cutoff: float, histograms: bool = False) -> None:
        self.saturation_cutoff = saturation_cutoff
        self.rows: dict[str, Row] = {}
        self.histograms = histograms
        self._edges: dict[torch.device, torch.Tensor] = {}
        # Per micro-batch, keyed by id() of the tensor (checked against a weak reference and the
        # tensor's in-place version counter before any reuse).
        self._reduced: dict[int, _Reduced] = {}
        self._watched: dict[int, tuple[weakref.ref[torch.Tensor], int, list[Row]]] = {}
        # The autograd nodes that carry this micro-batch's gradient hooks (probe/reach.py).
        self.hooked_nodes: list[object] = []
        # The one-pass kernel for large outputs (probe/compiled.py), when the probe uses it.
        self.compiled: CompiledStatistics | None = None
        # Bytes of the whole-tensor outputs it could take (compiled.fits), in the last micro-batch's forward.
        self.large_output_bytes = 0
        self._large_bytes = 0

    def _histogram(self, flat: torch.Tensor, n_nan: torch.Tensor | None) -> torch.Tensor:
        """Counts per fixed bin (see stats.histogram_edges); NaN is counted apart, never binned."""
        import torch

        edges = self._edges.get(flat.device)
        if edges is None:
            from gradcheck_cli.stats import histogram_edges

            edges = torch.tensor(histogram_edges(), dtype=torch.float32, device=flat.device)
            self._edges[flat.device] = edges
        counts = torch.bincount(torch.bucketize(flat.float(), edges), minlength=edges.numel() + 1)
        if n_nan is not None:
            counts[-1] -= n_nan  # bucketize puts NaN in the top overflow bin
        return counts

    def row(self, name: str, **attributes: object) -> Row:
        existing = self.rows.get(name)
        if existing is None:
            existing = Row(name=name, **attributes)  # type: ignore[arg-type]
            self.rows[name] = existing
        return existing

    def record_input(self, row: Row, value: torch.Tensor) -> None:
        """Statistics of a norm layer's input (no gradient hook: that is the layer below's output)."""
        self.record_output(row.input_of(), value, gradient=False)

    def record_attention(self, row: Row, rows: AttentionRows) -> None:
        """Per-head entropy sums and near one-hot rows of one call's attention (probe/attention.py)."""
        import torch

        with torch.no_grad():
            # A near one-hot row passes no gradient, as a saturated sigmoid: docs/theory.md#attention-entropy
            top = rows.top
            saturated = (top * (1 - top) < self.saturation_cutoff * 0.25).sum()
            per_head = rows.entropy.sum(dim=(0, 2))
            row.attention_entropy = per_head if row.attention_entropy is None else row.attention_entropy + per_head
            row.attention_saturated = (
                saturated if row.attention_saturated is None else row.attention_saturated + saturated
            )
            row.attention_rows += int(rows.entropy.numel())
            row.attention_keys = rows.keys

    def record_output(self, row: Row, output: torch.Tensor, *, gradient: bool = True) -> None:
        """Reduce ``output`` to the row's statistics now; register the hook for its gradient."""
        import torch

        if not output.dtype.is_floating_point:
            row.skip_reason = f"the output is {str(output.dtype).removeprefix('torch.')}, not floating point"
            return
        if output.numel() == 0:
            row.skip_reason = "the output is empty"
            return
        row.shape = tuple(output.shape)
        row.seen_output = True
        axis = None
        if row.fn in RELU_FAMILY and output.dim() >= 1:
            row.axis = axis = unit_axis(tuple(output.shape), row.channel_first)
        with torch.no_grad():
            y = _measured(output)
            reduced = self._reduced_of(output, y, axis)
            saturated = None
            if row.fn in SATURATING:
                exact = y.float() if y.dtype.itemsize < 4 else y  # thresholds compared in float32
                saturated = saturated_mask(row.fn, exact, self.saturation_cutoff, row.fn_params).sum()
            row.pending.append(reduced.with_saturation(saturated))
            if self.histograms:
                if reduced.histogram is None:
                    reduced.histogram = self._histogram(y.reshape(-1), reduced.n_nan)
                row.hist_output = reduced.histogram if row.hist_output is None else row.hist_output + reduced.histogram
            if axis is not None:
                nonzero = reduced.alive[axis]
                row.alive = nonzero if row.alive is None or row.alive.shape != nonzero.shape else row.alive | nonzero
        if gradient and output.requires_grad:
            row.wants_grad = True
            self._watch_gradient(row, output)

    def _reduced_of(self, output: torch.Tensor, y: torch.Tensor, axis: int | None) -> _Reduced:
        """The statistics of ``output``, computed once per tensor and micro-batch: the same tensor
        often reaches several rows (a convolution's output is the next BatchNorm's input; a
        transformer block returns its last LayerNorm's output), and is reduced for the first only.
        Only the small results are kept: a reference to the tensor would keep it alive.
        """
        cached = self._reduced.get(id(output))
        if cached is not None and (cached.source() is not output or cached.version != output._version):
            cached = None  # the id was reused, or the tensor was modified in place since
        if cached is None:
            cached = self._reduce(output, y, axis)
            self._reduced[id(output)] = cached
        elif axis is not None and axis not in cached.alive:
            cached.alive[axis] = units_alive(y, axis)
        return cached

    def _reduce(self, output: torch.Tensor, y: torch.Tensor, axis: int | None) -> _Reduced:
        import torch

        if axis is None and compiled_pass.fits(y):
            self._large_bytes += y.numel() * y.element_size()
        if y.device.type == "cpu":
            return self._reduce_on_cpu(output, y, axis)
        var, mean = torch.var_mean(y, correction=0)
        alive: dict[int, torch.Tensor] = {}
        if axis is None:
            low, high = torch.aminmax(y)
        else:  # a ReLU-family row's extremes follow from its units'
            lows, highs = unit_extremes(y, axis)
            alive[axis] = (lows != 0) | (highs != 0)
            low, high = lows.min(), highs.max()
        # On an accelerator, counting costs two cheap passes but no synchronisation.
        n_nan = torch.isnan(y).sum()
        n_inf = torch.isinf(y).sum()
        counts = torch.stack([y.numel() - n_nan - n_inf, n_nan, n_inf]).to(torch.float64)
        moments = torch.stack([mean, var * y.numel(), low, high]).to(torch.float64)
        vector = torch.cat([counts[:1], moments, counts[1:]])
        return _Reduced(source=weakref.ref(output), version=output._version, values=vector, n_nan=n_nan, alive=alive)

    def _reduce_on_cpu(self, output: torch.Tensor, y: torch.Tensor, axis: int | None) -> _Reduced:
        """The same numbers as Python floats: on the CPU reading a result costs no synchronisation,
        so the extremes come first and decide what else runs, and no small tensors are stacked.

        A ReLU-family row takes its sum from its units' sums, which also tell which units are
        alive: three passes (extremes, unit sums, squares), where per-unit extremes took four.
        """
        import torch

        # A whole-tensor row's one compiled pass, where the probe uses it (probe/compiled.py).
        one_pass = self.compiled.reduce(y) if self.compiled is not None and axis is None else None
        if one_pass is not None:
            return _Reduced(source=weakref.ref(output), version=output._version, values=one_pass, n_nan=None)
        low_tensor, high_tensor = torch.aminmax(y)
        low, high = float(low_tensor), float(high_tensor)
        count = y.numel()
        n_nan: torch.Tensor | None = None
        alive: dict[int, torch.Tensor] = {}
        if math.isfinite(low) and math.isfinite(high):
            # Finite extremes mean every element is finite (NaN propagates through min/max): no
            # NaN/Inf passes.
            total = None
            if axis is not None:
                sums = unit_sums(y, axis)
                alive[axis] = _alive_from_sums(y, axis, sums, low)
                total = sums.to(torch.float64).sum()
            var, mean = cpu_moments(y, total)
            values = [float(count), mean, var * count, low, high, 0.0, 0.0]
        else:
            # The moments of a tensor with NaN/Inf are not reported: only the counts are needed.
            if axis is not None:
                alive[axis] = units_alive(y, axis)
            n_nan = torch.isnan(y).sum()
            nan, inf = int(n_nan), int(torch.isinf(y).sum())
            values = [float(count - nan - inf), math.nan, math.nan, low, high, float(nan), float(inf)]
        return _Reduced(source=weakref.ref(output), version=output._version, values=values, n_nan=n_nan, alive=alive)

    def _watch_gradient(self, row: Row, output: torch.Tensor) -> None:
        """One gradient hook per tensor, whichever rows share it: its norm is computed once."""
        watched = self._watched.get(id(output))
        if watched is not None and watched[0]() is output and watched[1] == output._version:
            watched[2].append(row)
            return
        rows = [row]
        self._watched[id(output)] = (weakref.ref(output), output._version, rows)
        output.register_hook(self._grad_hook_for(rows))
        if output.grad_fn is not None:
            self.hooked_nodes.append(output.grad_fn)

    def end_forward(self) -> list[object]:
        """Call when the micro-batch's forward pass is done: returns the hooked autograd nodes and
        forgets them, with the forward's per-tensor caches, before the backward pass. A node
        referenced through the backward pass outlives its turn, and with it memory the pass
        would have freed (3.5 MB at BERT-base's peak)."""
        nodes, self.hooked_nodes = self.hooked_nodes, []
        self._reduced.clear()
        self._watched.clear()
        return nodes

    def grad_hook(self, row: Row) -> object:
        return self._grad_hook_for([row])

    def _grad_hook_for(self, rows: list[Row]) -> object:
        import torch

        def hook(grad: torch.Tensor) -> None:
            with torch.no_grad():
                g = grad.detach()
                sumsq: torch.Tensor | float = sum_of_squares(g)
                if g.device.type == "cpu":
                    sumsq = float(sumsq)
                counts = None
                if self.histograms:
                    flat = g.reshape(-1)
                    counts = self._histogram(flat, torch.isnan(flat).sum())
                for row in rows:
                    row.pending_grad.append(sumsq)
                    if counts is not None:
                        row.hist_grad = counts if row.hist_grad is None else row.hist_grad + counts

        return hook

    def end_batch(self) -> None:
        """Merge this micro-batch's numbers, moving those still on a device in one transfer."""
        import torch

        self.end_forward()  # a path that ran no backward pass (ONNX) has not forgotten them yet
        self.large_output_bytes, self._large_bytes = self._large_bytes, 0
        entries: list[tuple[Row, bool, Statistics | float]] = []  # (row, is a gradient, numbers)
        rows = list(self.rows.values())
        rows += [row.input_row for row in rows if row.input_row is not None]
        for row in rows:
            entries += [(row, False, vector) for vector in row.pending]
            entries += [(row, True, grad) for grad in row.pending_grad]
            row.pending, row.pending_grad = [], []
        on_device = [value.reshape(-1) for _, _, value in entries if isinstance(value, torch.Tensor)]
        fetched = torch.cat([v.to(on_device[0].device) for v in on_device]).cpu().tolist() if on_device else []
        offset = 0
        for row, is_gradient, value in entries:
            if isinstance(value, torch.Tensor):
                size = value.numel()
                numbers = fetched[offset : offset + size]
                offset += size
            else:
                numbers = value if isinstance(value, list) else [value]
            if is_gradient:
                row.grad_sumsq += numbers[0]
                row.has_grad = True
                continue
            n_finite = int(numbers[_COUNT])
            row.nan += int(numbers[_NAN])
            row.inf += int(numbers[_INF])
            row.saturated += int(numbers[_SAT])
            if row.nan == 0 and row.inf == 0:
                row.moments.merge(n_finite, numbers[_MEAN], numbers[_M2], numbers[_MIN], numbers[_MAX])
            else:
                row.moments.count += n_finite

    def layer_stats(
        self,
        param_grads: dict[str, tuple[float | None, float]],
        param_counts: dict[str, int],
        through_time: dict[str, ThroughTime] | None = None,
        gradient_reason: str | None = None,
    ) -> list[LayerStats]:
        """Finished rows; ``param_grads`` maps a row name to (grad norm, weight norm).

        ``gradient_reason`` explains every missing gradient at once (e.g. an ONNX lowering that
        could not be trusted); otherwise each row gets the reason that applies to it.
        """
        out: list[LayerStats] = []
        for row in self.rows.values():
            output = _output_stats(row)
            total = output.count
            dead = None
            if row.fn in RELU_FAMILY and row.alive is not None:
                alive = row.alive.cpu()
                dead = DeadUnits(
                    units=int((~alive).sum()),
                    total=int(alive.numel()),
                    axis=row.axis if len(row.shape) <= 2 or row.axis == 1 else -1,
                )
            saturation = None
            if row.fn in SATURATING and total:
                saturation = Saturation(fraction=row.saturated / total, cutoff=self.saturation_cutoff)
            elif row.attention_rows and row.attention_saturated is not None:
                saturation = Saturation(
                    fraction=float(row.attention_saturated) / row.attention_rows, cutoff=self.saturation_cutoff
                )
            grad = None
            if row.name in param_grads:
                grad_norm, weight_norm = param_grads[row.name]
                ratio = grad_norm / weight_norm if grad_norm is not None and weight_norm > 0 else None
                grad = GradStats(norm=grad_norm, weight_norm=weight_norm, ratio=ratio)
            histogram = None
            if self.histograms and (row.hist_output is not None or row.hist_grad is not None):
                histogram = Histograms(
                    output=tuple(int(c) for c in row.hist_output.tolist()) if row.hist_output is not None else None,
                    output_grad=tuple(int(c) for c in row.hist_grad.tolist()) if row.hist_grad is not None else None,
                )
            reasons: dict[str, str] = {}
            if not row.seen_output:
                reasons["output"] = row.skip_reason or "the row produced no tensor output"
            if not row.has_grad:
                reasons["output_grad_norm"] = gradient_reason or (
                    "no gradient reached this output: the loss does not depend on it"
                    if row.wants_grad
                    else "the output does not require a gradient: nothing trainable feeds it"
                )
            if grad is not None and grad.norm is None:
                reasons["grad"] = gradient_reason or "the row's parameters received no gradient"
            out.append(
                LayerStats(
                    index=len(out),
                    name=row.name,
                    type=row.type,
                    kind=row.kind,
                    module=row.module,
                    shape=row.shape,
                    output=output,
                    output_grad_norm=math.sqrt(row.grad_sumsq) if row.has_grad else None,
                    fn=row.fn,
                    dead=dead,
                    saturation=saturation,
                    grad=grad,
                    params=param_counts.get(row.name, 0),
                    histograms=histogram,
                    through_time=(through_time or {}).get(row.name),
                    input=_output_stats(row.input_row) if row.input_row is not None else None,
                    attention=_attention_stats(row),
                    reasons=reasons,
                )
            )
        return out


def _output_stats(row: Row) -> OutputStats:
    clean = row.nan == 0 and row.inf == 0 and row.moments.count > 0
    return OutputStats(
        count=row.moments.count + row.nan + row.inf,
        mean=row.moments.mean if clean else None,
        var=row.moments.variance if clean else None,
        min=row.moments.minimum if clean else None,
        max=row.moments.maximum if clean else None,
        nan=row.nan,
        inf=row.inf,
    )


def _attention_stats(row: Row) -> AttentionStats | None:
    if not row.attention_rows or row.attention_entropy is None:
        return None
    heads = int(row.attention_entropy.numel())
    per_head_rows = row.attention_rows / heads
    entropy = tuple(float(v) / per_head_rows for v in row.attention_entropy.cpu().tolist())
    return AttentionStats(heads=heads, entropy=entropy, max_entropy=math.log(max(row.attention_keys, 1)))


def uncomputed_note(layers: list[LayerStats]) -> str | None:
    """The summary line the report owes when some values could not be computed."""
    count = sum(1 for row in layers if row.reasons)
    if not count:
        return None
    return f"{count} of {len(layers)} rows have values that could not be computed (null); each row's `reasons` says why"
