"""The 'resnet' family: a CIFAR-style pre-activation ResNet whose three stages all scale with width.

Pre-activation blocks keep the residual stream an exact sum ``shortcut(x) + branch_mult * branch(x)``,
which is what the depth parametrizations assume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from scaletune.data.base import DataSpec
from scaletune.models.checks import check_known_args, check_shape_fields, check_task, image_shape
from scaletune.shapes import Shape

NAME = "resnet"
ALLOWED_ARGS = ("strides",)
STAGES = 3
DEFAULT_STRIDES = (1, 2, 2)


@dataclass(frozen=True)
class ResNetConfig:
    channels: int
    image_h: int
    image_w: int
    width: int
    depth: int
    strides: tuple[int, ...]
    classes: int

    @property
    def stage_widths(self) -> tuple[int, ...]:
        return tuple(self.width * 2**s for s in range(STAGES))


def _strides_arg(args: dict[str, Any]) -> tuple[int, ...]:
    value = args.get("strides", DEFAULT_STRIDES)
    if (not isinstance(value, (list, tuple)) or len(value) != STAGES
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in value)):
        raise ValueError(f"arg 'strides' of model family {NAME!r} must be {STAGES} positive integers "
                         f"(one per stage, e.g. [1, 2, 2]; use [1, 1, 2] for tiny images), got {value!r}")
    return tuple(value)


def resnet_config(shape: Shape, data: DataSpec, args: dict[str, Any]) -> ResNetConfig:
    check_known_args(NAME, args, ALLOWED_ARGS)
    check_task(NAME, data, "classification")
    check_shape_fields(NAME, shape)
    channels, image_h, image_w = image_shape(NAME, data)
    return ResNetConfig(channels, image_h, image_w, shape.width, shape.depth, _strides_arg(args), data.num_outputs)


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


class PreActBlock(nn.Module):
    """``out = shortcut(x) + branch_mult * branch(x)``; the 1x1 shortcut lies outside the branch."""

    branch_outputs = ("conv2",)

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.branch_mult = 1.0
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        reshapes = stride != 1 or c_in != c_out
        self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False) if reshapes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))
        return self.shortcut(x) + self.branch_mult * branch


class Stage(nn.Module):
    def __init__(self, c_in: int, c_out: int, depth: int, stride: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            PreActBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1) for i in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class PreActResNet(nn.Module):
    def __init__(self, cfg: ResNetConfig) -> None:
        super().__init__()
        widths = cfg.stage_widths
        self.stem = _conv3x3(cfg.channels, cfg.width)
        self.stages = nn.ModuleList(
            Stage(widths[s - 1] if s else cfg.width, widths[s], cfg.depth, cfg.strides[s]) for s in range(STAGES))
        self.norm = nn.BatchNorm2d(widths[-1])
        self.head = nn.Linear(widths[-1], cfg.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for stage in self.stages:
            h = stage(h)
        return self.head(F.relu(self.norm(h)).mean(dim=(2, 3)))


def _conv_flops(c_in: int, c_out: int, kernel: int, pixels: int) -> int:
    return 2 * c_in * c_out * kernel * kernel * pixels


def resnet_forward_flops(cfg: ResNetConfig) -> float:
    image_h, image_w = cfg.image_h, cfg.image_w
    flops = _conv_flops(cfg.channels, cfg.width, 3, image_h * image_w)
    c_in = cfg.width
    for c_out, stride in zip(cfg.stage_widths, cfg.strides):
        image_h, image_w = -(-image_h // stride), -(-image_w // stride)
        pixels = image_h * image_w
        flops += _conv_flops(c_in, c_out, 3, pixels) + (2 * cfg.depth - 1) * _conv_flops(c_out, c_out, 3, pixels)
        if stride != 1 or c_in != c_out:
            flops += _conv_flops(c_in, c_out, 1, pixels)
        c_in = c_out
    return float(flops + 2 * c_in * cfg.classes)


class ResNetFamily:
    name = NAME

    def validate(self, shape: Shape, data: DataSpec, args: dict[str, Any]) -> None:
        resnet_config(shape, data, args)

    def build(self, shape: Shape, data: DataSpec, args: dict[str, Any]) -> nn.Module:
        return PreActResNet(resnet_config(shape, data, args))

    def train_flops_per_sample(self, shape: Shape, data: DataSpec, args: dict[str, Any]) -> float:
        return 3.0 * resnet_forward_flops(resnet_config(shape, data, args))


RESNET_FAMILY = ResNetFamily()
