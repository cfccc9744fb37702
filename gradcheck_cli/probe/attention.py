"""Attention rows: each query's entropy and largest probability, the two numbers an attention row
of the report is made of (docs/theory.md#attention-entropy).

Two sources:

* an explicit softmax inside an attention module: its probabilities are read as they are;
* a fused ``scaled_dot_product_attention``, which computes the probabilities and does not return
  them: the probe recomputes the scores ``q·kᵀ`` for a few heads at a time into reused buffers
  and takes the entropy from the scores, ``H = lse - Σ p·s``, with no logarithm per probability
  (docs/theory.md, "From the scores"). On BERT-base's attention (8 × 12 heads × 128²) that took
  3.2 ms per layer against 8 ms for a whole-tensor softmax followed by ``-Σ p·log p``: the
  chunks stay in cache, no 6 MB buffer is allocated per layer, and half the passes are gone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Bytes of scores computed at once: a few heads of a short sequence, or a block of queries of
# one head of a long one, so the chunk's passes run in the CPU's cache and the probe never holds
# a (samples, heads, queries, keys) tensor, which for a 4096-token Llama would be gigabytes.
# 4 MB: BERT-base's 12 heads of one sample (0.8 MB) in one chunk, as with 1 MB, and 8 heads of
# 2048 causal tokens in 48 ms, against 57 ms in 1 MB chunks (more calls) and 67 ms in 16 MB ones.
_CPU_CHUNK_BYTES = 1 << 22
_ACCELERATOR_CHUNK_BYTES = 1 << 28


@dataclass(frozen=True)
class AttentionRows:
    """Per attention row (sample, head, query): entropy in nats and the largest probability,
    both float32 of shape (N, heads, queries), and the number of keys."""

    entropy: torch.Tensor
    top: torch.Tensor
    keys: int


def rows_of_probabilities(probs: torch.Tensor) -> AttentionRows:
    """Rows of explicit probabilities (..., queries, keys): ``-Σ p·log p`` with 0·log 0 = 0."""
    import torch

    with torch.no_grad():
        p = probs.detach().float()
        heads = p.shape[1] if p.dim() == 4 else 1
        p = p.reshape(p.shape[0], heads, -1, p.shape[-1])
        # log, the -inf of zero probabilities set to 0, times p, in one buffer (xlogy, which does
        # this itself, took 2.4 times as long on BERT's attention).
        terms = torch.log(p).nan_to_num_(neginf=0.0).mul_(p)
        entropy = terms.sum(dim=-1).neg_()
        del terms
        return AttentionRows(entropy=entropy, top=p.amax(dim=-1), keys=int(p.shape[-1]))


def attention_rows(
    func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any, inside_attention: bool
) -> AttentionRows | None:
    """The attention rows of one call, or None when it is not attention: a softmax over the last
    dimension of a 4-d tensor inside an attention module, or a scaled_dot_product_attention."""
    import torch

    from gradcheck_cli.probe.activations import function_name

    name = function_name(func)
    if name == "softmax":
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        if inside_attention and isinstance(result, torch.Tensor) and result.dim() == 4 and dim in (-1, 3):
            return rows_of_probabilities(result)
        return None
    if name != "scaled_dot_product_attention" or len(args) < 2:
        return None
    query, key = args[0], args[1]
    if not (isinstance(query, torch.Tensor) and isinstance(key, torch.Tensor)) or query.dim() < 3:
        return None
    mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
    causal = bool(kwargs.get("is_causal", args[5] if len(args) > 5 else False))
    return rows_of_scores(query, key, mask if isinstance(mask, torch.Tensor) else None, causal, kwargs.get("scale"))


def rows_of_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    scale: float | None,
    chunk_bytes: int | None = None,
) -> AttentionRows:
    """Rows of ``softmax(scale·q·kᵀ + mask)``, as scaled_dot_product_attention computes it, from
    the scores alone: per chunk of heads (and of queries, for long sequences), the scores with
    the scale and the mask folded into one ``baddbmm``, their maximum, the softmax, its maximum
    and ``Σ p·s``; then ``H = s_max - log p_max - Σ p·s``.

    A masked key gets the most negative finite float instead of -inf: its probability is exactly
    0 either way, and 0·s stays 0 where 0·(-inf) would be NaN. A query whose every key is masked
    attends to nothing (scaled_dot_product_attention returns 0 for it): entropy 0, top 0.
    Grouped-query attention (fewer key heads than query heads) shares each key head across its
    group, as ``enable_gqa`` does.
    """
    import torch

    with torch.no_grad():
        q, k = query.detach(), key.detach()
        *leading, heads, queries, width = q.shape if q.dim() > 3 else (q.shape[0], 1, *q.shape[1:])
        keys = k.shape[-2]
        key_heads = k.shape[-3] if k.dim() > 3 else 1
        q = q.reshape(-1, heads, queries, width)
        k = k.reshape(-1, key_heads, keys, width)
        n = q.shape[0]
        group = heads // key_heads
        factor = scale if scale is not None else 1 / math.sqrt(width)
        bias, unattended = _additive_mask(mask, causal, queries, keys, q.device)
        score_shape = (*leading, heads, queries, keys) if query.dim() > 3 else (n, queries, keys)
        if bias is not None:
            # A view with stride 0 along broadcast dimensions: the mask is never copied per head.
            bias = bias.expand(score_shape).reshape(n, heads, queries, keys)
        budget = chunk_bytes or (_CPU_CHUNK_BYTES if q.device.type == "cpu" else _ACCELERATOR_CHUNK_BYTES)
        rows_per_chunk = max(1, budget // (keys * 4))
        block = min(queries, rows_per_chunk)
        heads_per_chunk = max(1, min(heads, rows_per_chunk // block))
        entropy = torch.empty((n, heads, queries), dtype=torch.float32, device=q.device)
        top = torch.empty_like(entropy)
        # Flat buffers, viewed per chunk: a chunk's scores are always contiguous, as out= needs.
        scores = torch.empty(heads_per_chunk * block * keys, dtype=torch.float32, device=q.device)
        probs = torch.empty_like(scores)
        zero = scores.new_zeros(())
        for sample in range(n):
            for h0 in range(0, heads, heads_per_chunk):
                h1 = min(heads, h0 + heads_per_chunk)
                keys_of_heads = k[sample, h0 // group : (h1 - 1) // group + 1].float()
                if group > 1:
                    keys_of_heads = keys_of_heads.repeat_interleave(group, dim=0)[h0 % group : h0 % group + h1 - h0]
                keys_t = keys_of_heads.transpose(-2, -1)
                for r0 in range(0, queries, block):
                    r1 = min(queries, r0 + block)
                    size = (h1 - h0, r1 - r0, keys)
                    s, p = scores[: math.prod(size)].view(size), probs[: math.prod(size)].view(size)
                    q_chunk = q[sample, h0:h1, r0:r1].float()
                    # The scale (and the mask) folded into the product: beta=0 reads no input.
                    added = zero if bias is None else bias[sample, h0:h1, r0:r1].float()
                    torch.baddbmm(added, q_chunk, keys_t, beta=0.0 if bias is None else 1.0, alpha=factor, out=s)
                    h_out, t_out = entropy[sample, h0:h1, r0:r1], top[sample, h0:h1, r0:r1]
                    torch.amax(s, dim=-1, out=h_out)  # s_max, for now
                    torch.softmax(s, dim=-1, out=p)
                    torch.amax(p, dim=-1, out=t_out)
                    h_out.sub_(torch.log(t_out)).sub_(s.mul_(p).sum(dim=-1))
        # Rounding can take a one-hot row a hair below 0; non-finite scores give NaN, which the
        # explicit path also reports as a row that attends to nothing.
        entropy.clamp_(min=0.0).nan_to_num_(nan=0.0)
        top.nan_to_num_(nan=0.0)
        if unattended is not None:
            unattended = unattended.expand(score_shape[:-1]).reshape(n, heads, queries)
            entropy.masked_fill_(unattended, 0.0)
            top.masked_fill_(unattended, 0.0)
        return AttentionRows(entropy=entropy, top=top, keys=int(keys))


def _additive_mask(
    mask: torch.Tensor | None, causal: bool, queries: int, keys: int, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(the mask as finite float32 scores to add, or None; where a query has no key left, or None)
    on the mask's own shape: it is broadcast as a view, never copied per head."""
    import torch

    lowest = torch.finfo(torch.float32).min
    if causal:  # top-left aligned, as scaled_dot_product_attention's is_causal
        upper = torch.ones((queries, keys), dtype=torch.bool, device=device).triu_(1)
        return torch.zeros((queries, keys), device=device).masked_fill_(upper, lowest), None
    if mask is None:
        return None, None
    if mask.dtype == torch.bool:
        blocked = ~mask
        bias = torch.zeros(mask.shape, device=mask.device).masked_fill_(blocked, lowest)
        return bias, _rows_without_keys(blocked)
    blocked = torch.isneginf(mask)
    if not bool(blocked.any()):
        return mask, None
    return mask.float().clamp(min=lowest), _rows_without_keys(blocked)


def _rows_without_keys(blocked: torch.Tensor) -> torch.Tensor | None:
    every = blocked.all(dim=-1)
    return every if bool(every.any()) else None
