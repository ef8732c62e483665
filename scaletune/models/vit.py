"""The 'vit' family: a pre-norm Vision Transformer whose patch size changes without touching parameters."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from scaletune.data.base import DataSpec
from scaletune.models.checks import (
    check_heads,
    check_known_args,
    check_shape_fields,
    check_task,
    image_shape,
    positive_int_arg,
)
from scaletune.models.patch_embed import FlexiPatchEmbed, patch_embed_forward_flops
from scaletune.models.transformer import TransformerBlock, transformer_blocks_forward_flops
from scaletune.shapes import Shape

NAME = "vit"
ALLOWED_ARGS = ("base_patch", "head_dim", "mlp_ratio")


def default_base_patch(image_h: int, image_w: int) -> int:
    """The largest patch that tiles the image into at least a 2x2 grid (a 1x1 grid has no positions to learn)."""
    side = math.gcd(image_h, image_w)
    return max((p for p in range(1, side + 1) if side % p == 0 and p <= min(image_h, image_w) // 2), default=1)


@dataclass(frozen=True)
class ViTConfig:
    channels: int
    image_h: int
    image_w: int
    width: int
    depth: int
    base_patch: int
    patch_size: int
    head_dim: int
    mlp_ratio: int
    classes: int

    @property
    def tokens(self) -> int:
        """Patches plus the cls token."""
        return (self.image_h // self.patch_size) * (self.image_w // self.patch_size) + 1


def check_patch_divides(patch_size: int, image_h: int, image_w: int, what: str = "patch_size") -> None:
    if image_h % patch_size or image_w % patch_size:
        divisors = [p for p in range(1, math.gcd(image_h, image_w) + 1) if math.gcd(image_h, image_w) % p == 0]
        raise ValueError(f"{what} {patch_size} does not divide the {image_h}x{image_w} image; choose one of {divisors}")


def vit_config(shape: Shape, data: DataSpec, args: dict[str, Any]) -> ViTConfig:
    check_known_args(NAME, args, ALLOWED_ARGS)
    check_task(NAME, data, "classification")
    check_shape_fields(NAME, shape)
    channels, image_h, image_w = image_shape(NAME, data)
    base_patch = positive_int_arg(NAME, args, "base_patch", default_base_patch(image_h, image_w))
    check_patch_divides(base_patch, image_h, image_w, what="base_patch")
    patch_size = base_patch if shape.patch_size is None else shape.patch_size
    check_patch_divides(patch_size, image_h, image_w)
    head_dim = positive_int_arg(NAME, args, "head_dim", 16)
    check_heads(shape.width, head_dim)
    return ViTConfig(channels, image_h, image_w, shape.width, shape.depth, base_patch, patch_size, head_dim,
                     positive_int_arg(NAME, args, "mlp_ratio", 4), data.num_outputs)


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.image_h, self.image_w = cfg.image_h, cfg.image_w
        self.base_grid = (cfg.image_h // cfg.base_patch, cfg.image_w // cfg.base_patch)
        self.patch_size = cfg.patch_size
        self.patch_embed = FlexiPatchEmbed(cfg.channels, cfg.width, cfg.base_patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.base_grid[0] * self.base_grid[1], cfg.width))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg.width, cfg.head_dim, cfg.mlp_ratio, causal=False) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.classes)

    def set_patch_size(self, patch_size: int) -> None:
        """Switch patch size in place; parameters are untouched (the kernel is PI-resized on the fly)."""
        check_patch_divides(patch_size, self.image_h, self.image_w)
        self.patch_size = patch_size

    def position_embedding(self) -> torch.Tensor:
        """The base-grid position embedding, bilinearly resized to the current patch grid."""
        grid = (self.image_h // self.patch_size, self.image_w // self.patch_size)
        if grid == self.base_grid:
            return self.pos_embed
        width = self.pos_embed.shape[-1]
        base = self.pos_embed.reshape(1, *self.base_grid, width).permute(0, 3, 1, 2)
        resized = F.interpolate(base, size=grid, mode="bilinear", align_corners=False, antialias=True)
        return resized.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x, self.patch_size) + self.position_embedding()
        h = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h[:, 0]))


def vit_forward_flops(cfg: ViTConfig) -> float:
    return (patch_embed_forward_flops(cfg.channels, cfg.width, cfg.patch_size, cfg.tokens - 1)
            + transformer_blocks_forward_flops(cfg.tokens, cfg.width, cfg.depth, cfg.mlp_ratio)
            + 2 * cfg.width * cfg.classes)


class ViTFamily:
    name = NAME

    def validate(self, shape: Shape, data: DataSpec, args: dict[str, Any]) -> None:
        vit_config(shape, data, args)

    def build(self, shape: Shape, data: DataSpec, args: dict[str, Any]) -> nn.Module:
        return ViT(vit_config(shape, data, args))

    def train_flops_per_sample(self, shape: Shape, data: DataSpec, args: dict[str, Any]) -> float:
        return 3.0 * vit_forward_flops(vit_config(shape, data, args))


VIT_FAMILY = ViTFamily()
