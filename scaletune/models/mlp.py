"""The 'mlp' family: a pre-norm residual MLP on vectors (or flattened images)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from scaletune.data.base import DataSpec
from scaletune.models.checks import (
    ACTIVATIONS,
    activation_arg,
    check_known_args,
    check_shape_fields,
    check_task,
    positive_int_arg,
)
from scaletune.shapes import Shape

NAME = "mlp"
ALLOWED_ARGS = ("expansion", "activation")


@dataclass(frozen=True)
class MLPConfig:
    features: int
    width: int
    depth: int
    hidden: int
    activation: str
    classes: int


def mlp_config(shape: Shape, data: DataSpec, args: dict[str, Any]) -> MLPConfig:
    check_known_args(NAME, args, ALLOWED_ARGS)
    check_task(NAME, data, "classification")
    check_shape_fields(NAME, shape)
    return MLPConfig(
        features=math.prod(data.input_shape), width=shape.width, depth=shape.depth,
        hidden=positive_int_arg(NAME, args, "expansion", 1) * shape.width,
        activation=activation_arg(NAME, args), classes=data.num_outputs,
    )


class ResidualMLPBlock(nn.Module):
    branch_outputs = ("fc2",)

    def __init__(self, width: int, hidden: int, activation: str) -> None:
        super().__init__()
        self.branch_mult = 1.0
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.act = ACTIVATIONS[activation]()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch_mult * self.fc2(self.act(self.fc1(self.norm(x))))


class ResidualMLP(nn.Module):
    def __init__(self, cfg: MLPConfig) -> None:
        super().__init__()
        self.embed = nn.Linear(cfg.features, cfg.width)
        self.blocks = nn.ModuleList(ResidualMLPBlock(cfg.width, cfg.hidden, cfg.activation) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.flatten(1))
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


class MLPFamily:
    name = NAME

    def validate(self, shape: Shape, data: DataSpec, args: dict[str, Any]) -> None:
        mlp_config(shape, data, args)

    def build(self, shape: Shape, data: DataSpec, args: dict[str, Any]) -> nn.Module:
        return ResidualMLP(mlp_config(shape, data, args))

    def train_flops_per_sample(self, shape: Shape, data: DataSpec, args: dict[str, Any]) -> float:
        cfg = mlp_config(shape, data, args)
        forward = 2 * cfg.width * (cfg.features + cfg.depth * 2 * cfg.hidden + cfg.classes)
        return 3.0 * forward


MLP_FAMILY = MLPFamily()
