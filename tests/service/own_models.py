"""A user's own model code, as `scaletune coord-check/transfer --factory own_models:build` import it.

A residual MLP for the digits dataset (64 features, 10 classes) written without scaletune's conventions:
its input layer is a raw nn.Parameter used as x @ W and its blocks have no branch_mult.
"""

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class Stem(nn.Module):
    def __init__(self, features: int, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(features, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


class Net(nn.Module):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.stem = Stem(64, width)
        self.blocks = nn.Sequential(*(Block(width) for _ in range(depth)))
        self.out = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(self.stem(x.flatten(1))))


def build(width: int, depth: int) -> Net:
    return Net(width, depth)
