"""Attention rows: per-head entropy and the share of near one-hot queries, against an explicit
float64 softmax of the same queries and keys, for a fused scaled_dot_product_attention (whose
probabilities the probe recomputes) and an explicit softmax (which it reads), with a causal mask."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradcheck_cli import api
from gradcheck_cli.options import InputOptions, LossKind, ProbeOptions

HEADS, WIDTH, STEPS = 2, 8, 6


class SelfAttention(nn.Module):
    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.qkv = nn.Linear(HEADS * WIDTH, 3 * HEADS * WIDTH)
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, HEADS, WIDTH).permute(2, 0, 3, 1, 4)
        if self.fused:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(WIDTH)
            scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
            out = torch.softmax(scores, dim=-1) @ v
        return out.transpose(1, 2).reshape(n, t, HEADS * WIDTH)


class Block(nn.Module):
    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.attn = SelfAttention(fused)
        self.head = nn.Linear(HEADS * WIDTH, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x))


@pytest.mark.parametrize("fused", [True, False])
def test_attention_entropy_and_saturation_match_an_explicit_softmax(fused: bool) -> None:
    torch.manual_seed(0)
    model = Block(fused)
    with torch.no_grad():
        model.attn.qkv.weight.mul_(4)  # sharp enough that some queries are near one-hot
    seen: list[torch.Tensor] = []

    def keep(_module: nn.Module, _args: Any, output: torch.Tensor) -> None:
        seen.append(output.detach().double())

    handle = model.attn.qkv.register_forward_hook(keep)
    try:
        options = ProbeOptions(inputs=InputOptions(input_shape=((4, STEPS, HEADS * WIDTH),)), loss=LossKind.MSE)
        report = api.inspect_module(model, options)
    finally:
        handle.remove()
    qkv = seen[0]
    n = qkv.shape[0]
    q, k, _ = qkv.view(n, STEPS, 3, HEADS, WIDTH).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(WIDTH)
    scores = scores.masked_fill(~torch.ones(STEPS, STEPS, dtype=torch.bool).tril(), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    entropy = -torch.special.xlogy(probs, probs).sum(dim=-1)  # (N, heads, queries)
    top = probs.amax(dim=-1)
    cutoff = report.probe.saturation_cutoff
    expected_saturated = float((top * (1 - top) < cutoff * 0.25).double().mean())
    rows = [row for row in report.layers if row.attention is not None]
    assert len(rows) == 1
    stats = rows[0].attention
    assert stats.heads == HEADS and stats.max_entropy == pytest.approx(math.log(STEPS))
    for got, want in zip(stats.entropy, entropy.mean(dim=(0, 2)).tolist(), strict=True):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert rows[0].saturation is not None
    assert rows[0].saturation.fraction == pytest.approx(expected_saturated)
    assert 0 < expected_saturated < 1  # the test would not see a wrong cutoff otherwise


def _explicit_rows(
    q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, causal: bool, scale: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(entropy, top, probabilities) of an explicit float64 softmax, the second method: -inf where
    a key is masked, a row with no key left attends to nothing (probabilities 0)."""
    q64, k64 = q.double(), k.double()
    if k64.shape[-3] != q64.shape[-3]:
        k64 = k64.repeat_interleave(q64.shape[-3] // k64.shape[-3], dim=-3)
    scores = (q64 @ k64.transpose(-2, -1)) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    if causal:
        scores = scores.masked_fill(~torch.ones(scores.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
    probs = torch.softmax(scores, dim=-1).nan_to_num(nan=0.0)
    return -torch.special.xlogy(probs, probs).sum(dim=-1), probs.amax(dim=-1), probs


def _case(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    g = torch.Generator().manual_seed(3)
    n, heads, queries, keys, width = 3, 4, 7, 9, 8
    q = torch.randn(n, heads, queries, width, generator=g) * 2
    k = torch.randn(n, heads, keys, width, generator=g) * 2
    v = torch.randn(n, heads, keys, width, generator=g)
    if name == "padding":  # a bool mask with padded keys, and one sample's query with no key at all
        mask = torch.ones(n, 1, queries, keys, dtype=torch.bool)
        mask[0, :, :, 6:] = False
        mask[1, :, 2, :] = False
        return q, k, v, {"attn_mask": mask}
    if name == "neginf":  # an additive mask with -inf, broadcast over samples
        mask = torch.zeros(queries, keys)
        mask[:, ::3] = float("-inf")
        mask[4] = float("-inf")
        return q, k, v, {"attn_mask": mask}
    if name == "lowest":  # transformers' mask: the most negative float, never -inf
        mask = torch.zeros(n, 1, queries, keys)
        mask[2, :, :, 5:] = torch.finfo(torch.float32).min
        return q, k, v, {"attn_mask": mask}
    if name == "bias":  # an additive bias per head (ALiBi-like), and a scale of its own
        bias = torch.randn(1, heads, queries, keys, generator=g)
        return q, k, v, {"attn_mask": bias, "scale": 0.3}
    if name == "causal":  # more keys than queries: top-left aligned
        return q, k, v, {"is_causal": True}
    if name == "grouped":  # three query heads per key head: a chunk of two heads can straddle two groups
        six = torch.randn(n, 6, queries, width, generator=g) * 2
        return six, k[:, :2], v[:, :2], {"enable_gqa": True}
    if name == "unbatched-heads":  # 3-d inputs: (N, queries, width)
        return q[:, 0], k[:, 0], v[:, 0], {}
    if name == "bfloat16":
        return q.bfloat16(), k.bfloat16(), v.bfloat16(), {}
    raise AssertionError(name)


CASES = ["padding", "neginf", "lowest", "bias", "causal", "grouped", "unbatched-heads", "bfloat16"]


@pytest.mark.parametrize("chunk_bytes", [None, 2 * 7 * 9 * 4, 3 * 9 * 4, 64])
@pytest.mark.parametrize("name", CASES)
def test_rows_of_a_fused_call_match_an_explicit_softmax(name: str, chunk_bytes: int | None) -> None:
    """The rows recomputed from the scores (H = s_max - log p_max - Σ p·s, per chunk) against an
    explicit float64 softmax of the same call; the explicit probabilities times v must give what
    scaled_dot_product_attention returned, so the reference reads the mask as the model did.
    Chunks of two heads, of 3 queries of one head and of a single row exercise every split of the
    loop."""
    from gradcheck_cli.probe.attention import rows_of_scores

    q, k, v, kwargs = _case(name)
    out = F.scaled_dot_product_attention(q, k, v, **kwargs)
    mask = kwargs.get("attn_mask")
    scale = kwargs.get("scale")
    entropy, top, probs = _explicit_rows(q, k, mask, bool(kwargs.get("is_causal")), scale)
    v64 = v.double().repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3) if name == "grouped" else v.double()
    tolerance = 2e-2 if name == "bfloat16" else 1e-5
    assert torch.allclose(probs @ v64, out.double(), atol=tolerance)
    rows = rows_of_scores(q, k, mask, bool(kwargs.get("is_causal")), scale, chunk_bytes=chunk_bytes)
    if q.dim() == 3:
        entropy, top = entropy.unsqueeze(1), top.unsqueeze(1)
    assert rows.entropy.shape == entropy.shape and rows.keys == k.shape[-2]
    # bfloat16 inputs: the reference upcasts the same rounded values, so float32 rounding alone.
    assert torch.allclose(rows.entropy.double(), entropy, atol=2e-5, rtol=1e-5)
    assert torch.allclose(rows.top.double(), top, atol=1e-6, rtol=1e-5)
    if name in ("padding", "neginf"):
        assert bool((top == 0).any())  # the case has a row with no key: it must read 0, not NaN


def test_an_explicit_softmax_and_its_scores_give_the_same_rows() -> None:
    """Both sources of attention rows agree: -Σ p·log p of the probabilities against the
    recomputation from the scores, on sharp rows (one-hot to float32 precision) and flat ones."""
    from gradcheck_cli.probe.attention import rows_of_probabilities, rows_of_scores

    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 3, 16, 8, generator=g) * torch.tensor([0.1, 1.0, 10.0]).view(1, 3, 1, 1)
    k = torch.randn(2, 3, 16, 8, generator=g)
    probs = torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(8), dim=-1)
    explicit, fused = rows_of_probabilities(probs), rows_of_scores(q, k, None, False, None)
    assert torch.allclose(explicit.entropy, fused.entropy, atol=1e-4)
    assert torch.equal(explicit.top, fused.top) or torch.allclose(explicit.top, fused.top, atol=1e-6)
    assert float(fused.top[:, 2].mean()) > 0.9 > float(fused.top[:, 0].mean())  # both regimes are there
