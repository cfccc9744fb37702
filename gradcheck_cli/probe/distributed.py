"""The probe under ``torchrun``: FSDP2 shards the model, ranks split the batch, statistics merge.

When ``WORLD_SIZE`` > 1 every process runs the same probe on its share of each micro-batch:

* the model is sharded with ``torch.distributed.fsdp.fully_shard`` on a one-dimensional
  ``DeviceMesh`` (each block of an ``nn.ModuleList``, then the root), so each process holds
  ``1/world`` of the weights between the layers it runs;
* the probe batch is drawn whole on every rank from the same seed, and rank r runs rows
  ``[r*n/W, (r+1)*n/W)`` of each micro-batch: the samples, their targets and the loss weights are
  those of a single-process probe of the same batch; FSDP sums the ranks' gradients (divide
  factor 1: each rank's loss is already its part of the global mean);
* statistics merge exactly: counts, non-finite and saturation counts and Σg² add; means and
  M2 merge with Chan's update; minima/maxima take the extremes; dead-unit masks are OR-ed;
  parameter norms add the shards' sums of squares;
* only rank 0 writes (the CLI checks :func:`is_rank_zero`).

The process group comes from torch.distributed (gloo on CPU, NCCL on CUDA); nothing here
communicates by itself.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gradcheck_cli.errors import UsageError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from gradcheck_cli.probe.batch import ProbeBatch
    from gradcheck_cli.probe.recorder import Recorder, Row


def world_size() -> int:
    """The number of processes ``torchrun`` started (1 outside it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def is_rank_zero() -> bool:
    """Whether this process writes reports and files (always, outside ``torchrun``)."""
    return os.environ.get("RANK", "0") == "0"


@dataclass
class Ranks:
    rank: int
    world: int
    device: torch.device
    owns_group: bool  # this probe started the process group, and ends it

    def close(self) -> None:
        import torch.distributed as dist

        if self.owns_group and dist.is_initialized():
            # Every rank leaves together: a rank that tears gloo down while another still waits on
            # it aborts the other process ("terminate called without an active exception").
            dist.barrier()
            dist.destroy_process_group()


def join_ranks(device: torch.device) -> Ranks | None:
    """The process group of a ``torchrun`` launch (started here if the caller has not), or None
    for a single process."""
    if world_size() <= 1:
        return None
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        raise UsageError(
            "WORLD_SIZE > 1, but this torch build has no torch.distributed",
            hint="run a single process, or install a torch build with distributed support",
        )
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        owns = True
    elif device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return Ranks(rank=dist.get_rank(), world=dist.get_world_size(), device=device, owns_group=owns)


def shard_model(module: nn.Module, ranks: Ranks) -> None:
    """Shard ``module`` in place with FSDP2: every block of an ``nn.ModuleList`` (a transformer's
    layers) is its own unit, gathered only while it runs; the root takes the rest."""
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    mesh = init_device_mesh(ranks.device.type, (ranks.world,))
    for sub in list(module.modules()):
        if isinstance(sub, nn.ModuleList):
            for block in sub:
                if any(True for _ in block.parameters()):
                    fully_shard(block, mesh=mesh)
    fully_shard(module, mesh=mesh)
    for sub in module.modules():
        if isinstance(sub, FSDPModule):
            sub.set_gradient_divide_factor(1.0)
            # A plain SUM: gloo has no PREMUL_SUM, and a factor of 1 needs no scaling anyway.
            sub.set_force_sum_reduction_for_comms(True)


def local_share(batch: ProbeBatch, ranks: Ranks) -> tuple[ProbeBatch, int]:
    """This rank's rows of ``batch`` and the offset of the first one in it."""
    from gradcheck_cli.probe.batch import ProbeBatch

    n = batch.size
    start, end = ranks.rank * n // ranks.world, (ranks.rank + 1) * n // ranks.world
    return (
        ProbeBatch(tuple(a[start:end] for a in batch.args), {k: v[start:end] for k, v in batch.kwargs.items()}),
        start,
    )


def check_shares(batches: Sequence[ProbeBatch], ranks: Ranks) -> None:
    smallest = min(batch.size for batch in batches)
    if smallest < ranks.world:
        raise UsageError(
            f"a micro-batch of {smallest} samples cannot be split across {ranks.world} processes",
            hint=f"set `batch_size` to at least {ranks.world}, or start fewer processes",
        )


def sum_across(values: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """Element-wise sum over the ranks (float64 kept; moved to the collective's device and back)."""
    import torch.distributed as dist

    on = values.to(ranks.device)
    dist.all_reduce(on, op=dist.ReduceOp.SUM)
    return on.to(values.device)


def merge_rows(recorder: Recorder, ranks: Ranks, local_sizes: Sequence[int], global_sizes: Sequence[int]) -> None:
    """Replace every row's statistics by those of all ranks together (in rank order, so each
    rank ends with the same numbers). ``local_sizes``/``global_sizes``: the micro-batch sizes, to
    report the global batch dimension in each row's shape."""
    import torch.distributed as dist

    state = [(name, _state(row)) for name, row in recorder.rows.items()]
    gathered: list[Any] = [None] * ranks.world
    dist.all_gather_object(gathered, state)
    merged: dict[str, Row] = {}
    for rank_state in gathered:
        for name, row_state in rank_state:
            row = merged.get(name)
            if row is None:
                row = recorder.rows.get(name) or _blank(name, row_state)
                _reset(row)
                merged[name] = row
            _absorb(row, row_state)
    last_local, last_global = local_sizes[-1], global_sizes[-1]
    for row in merged.values():
        for target in (row, row.input_row):
            if target is not None and target.shape and target.shape[0] == last_local:
                target.shape = (last_global, *target.shape[1:])
    recorder.rows = merged


_ADDED = ("nan", "inf", "saturated", "grad_sumsq", "attention_rows")
_ANY = ("has_grad", "seen_output", "wants_grad")
_TENSORS_ADDED = ("hist_output", "hist_grad", "attention_entropy", "attention_saturated")


def _state(row: Row) -> dict[str, Any]:
    m = row.moments
    state: dict[str, Any] = {key: getattr(row, key) for key in (*_ADDED, *_ANY)}
    state.update(
        attributes={
            "type": row.type,
            "kind": row.kind,
            "module": row.module,
            "fn": row.fn,
            "fn_params": row.fn_params,
            "channel_first": row.channel_first,
        },
        moments=(m.count, m.mean, m.m2, m.minimum, m.maximum),
        shape=row.shape,
        skip_reason=row.skip_reason,
        axis=row.axis,
        attention_keys=row.attention_keys,
        alive=None if row.alive is None else row.alive.cpu(),
        input=None if row.input_row is None else _state(row.input_row),
    )
    for key in _TENSORS_ADDED:
        value = getattr(row, key)
        state[key] = None if value is None else value.cpu()
    return state


def _blank(name: str, state: dict[str, Any]) -> Row:
    from gradcheck_cli.probe.recorder import Row

    return Row(name=name, **state["attributes"])


def _reset(row: Row) -> None:
    from gradcheck_cli.stats import Moments

    row.moments = Moments()
    for key in _ADDED:
        setattr(row, key, type(getattr(row, key))())
    for key in _ANY:
        setattr(row, key, False)
    for key in _TENSORS_ADDED:
        setattr(row, key, None)
    row.alive = None
    row.skip_reason = None
    if row.input_row is not None:
        _reset(row.input_row)


def _absorb(row: Row, state: dict[str, Any]) -> None:
    row.moments.merge(*state["moments"])
    for key in _ADDED:
        setattr(row, key, getattr(row, key) + state[key])
    for key in _ANY:
        setattr(row, key, getattr(row, key) or state[key])
    for key in _TENSORS_ADDED:
        value = state[key]
        if value is not None:
            current = getattr(row, key)
            setattr(row, key, value if current is None else current + value)
    alive = state["alive"]
    if alive is not None:
        row.alive = alive if row.alive is None or row.alive.shape != alive.shape else row.alive | alive
    if row.skip_reason is None:
        row.skip_reason = state["skip_reason"]
    if state["shape"]:
        row.shape = state["shape"]
    row.axis = state["axis"]
    row.attention_keys = max(row.attention_keys, state["attention_keys"])
    if state["input"] is not None:
        _absorb(row.input_of(), state["input"])
