"""Models for tests/test_big.py, importable by path (``--arch tests/_big_models.py:blocks_net``) so that
processes started by torchrun build the same architecture."""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.fc(self.norm(x)))


class BlocksNet(nn.Module):
    """A ModuleList of residual blocks (the units FSDP2 shards), a ReLU with units killed by a large
    negative bias (dead-unit masks must merge across ranks), a sigmoid head (saturation counts) and
    a linear head."""

    def __init__(self, width: int = 12, depth: int = 3, classes: int = 5) -> None:
        super().__init__()
        self.embed = nn.Linear(width, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.gate = nn.Linear(width, width)
        self.head = nn.Linear(width, classes)
        with torch.no_grad():
            self.blocks[0].fc.bias[:3] = -1e3
            self.gate.weight.mul_(8.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        return self.head(torch.sigmoid(self.gate(h)))


def blocks_net() -> nn.Module:
    torch.manual_seed(0)
    return BlocksNet()


class Tied(nn.Module):
    """An embedding and an output projection that are one tensor (as LM heads often are)."""

    def __init__(self, vocab: int = 40, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.out = nn.Linear(width, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mix(self.embed(tokens)))).mean(dim=1)


def tied() -> nn.Module:
    torch.manual_seed(0)
    return Tied()


class Wide(nn.Module):
    """Gradients large relative to activations: 12 square layers of 1024 (50 MB of float32
    gradients) on a batch of 2 (a few KB of activations)."""

    def __init__(self, width: int = 1024, depth: int = 12) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(nn.Linear(width, width) for _ in range(depth)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
