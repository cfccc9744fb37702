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
