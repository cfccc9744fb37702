"""Architectures of the sample checkpoints. Pass them to gradcheck with --arch samples/models.py:NAME.

Each one reproduces a failure mode of docs/theory.md (or its absence) by construction; see README.md
in this folder for what the report shows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

WIDTH = 128
DEPTH = 8


class SigmoidMLP(nn.Module):
    """Deep sigmoid MLP; make_samples.py gives it N(0, 1) weights, which saturate it (section 3)."""

    def __init__(self, in_features: int = 32, width: int = WIDTH, depth: int = DEPTH, classes: int = 10) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(in_features if i == 0 else width, width) for i in range(depth))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.sigmoid(layer(x))  # functional, as most training code writes it
        return self.head(x)


class TanhMLP(nn.Module):
    """Deep tanh MLP; with the old U[-1/sqrt(n), 1/sqrt(n)] init its variance shrinks ~x1/3 per layer."""

    def __init__(self, in_features: int = 32, width: int = WIDTH, depth: int = DEPTH, classes: int = 10) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(in_features if i == 0 else width, width) for i in range(depth))
        self.act = nn.Tanh()
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = self.act(layer(x))
        return self.head(x)


class ReLUMLP(nn.Module):
    """ReLU MLP written with nn.ReLU modules; used for the dead-unit and the healthy samples."""

    def __init__(self, in_features: int = 32, width: int = 64, depth: int = 4, classes: int = 10) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        for i in range(depth):
            blocks += [nn.Linear(in_features if i == 0 else width, width), nn.ReLU()]
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class SmallCNN(nn.Module):
    """Conv-BN-ReLU x3 and a linear head: the BatchNorm sample (and fold-bn's)."""

    def __init__(self, channels: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.bn3 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def sigmoid_mlp() -> nn.Module:
    return SigmoidMLP()


def tanh_mlp() -> nn.Module:
    return TanhMLP()


def relu_mlp() -> nn.Module:
    return ReLUMLP()


def small_cnn() -> nn.Module:
    return SmallCNN()


def old_uniform_(weight: torch.Tensor) -> None:
    """The pre-2010 default of Glorot & Bengio's paper: U[-1/sqrt(n_in), 1/sqrt(n_in)]."""
    bound = 1.0 / math.sqrt(weight.shape[1])
    with torch.no_grad():
        weight.uniform_(-bound, bound)
