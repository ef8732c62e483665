"""FlexiViT patch embedding: one underlying kernel, PI-resized to whatever patch size is in use.

For a base patch x (P0 x P0) and its bilinear upsampling B x (p x p, p >= P0), the resized kernel
pinv(B^T) w satisfies <B x, pinv(B^T) w> = <x, w> exactly (Beyer et al. 2023, "FlexiViT"); for p < P0
it is the least-squares best kernel. Parameters never change shape, so patch size can vary freely.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def bilinear_resize_matrix(src: int, dst: int) -> torch.Tensor:
    """B of shape (dst*dst, src*src) with vec(resize(x)) = B vec(x) for a src x src patch, in float64 on CPU."""
    basis = torch.eye(src * src, dtype=torch.float64, device="cpu").reshape(src * src, 1, src, src)
    resized = F.interpolate(basis, size=(dst, dst), mode="bilinear", align_corners=False, antialias=True)
    return resized.reshape(src * src, dst * dst).T


def pi_resize_matrix(src: int, dst: int) -> torch.Tensor:
    """pinv(B^T), shape (dst*dst, src*src): maps a flattened src kernel to its dst kernel."""
    return torch.linalg.pinv(bilinear_resize_matrix(src, dst).T)


class FlexiPatchEmbed(nn.Module):
    """Patchify-and-project with a (width, C, P0, P0) kernel shared by every patch size."""

    def __init__(self, in_channels: int, width: int, base_patch: int) -> None:
        super().__init__()
        self.base_patch = base_patch
        self.weight = nn.Parameter(torch.empty(width, in_channels, base_patch, base_patch))
        self.bias = nn.Parameter(torch.empty(width))
        self._resize_cache: dict[int, torch.Tensor] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The same default as nn.Conv2d, so the module is usable before the parametrization re-initialises it."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(self.weight[0].numel())
        nn.init.uniform_(self.bias, -bound, bound)

    def kernel(self, patch_size: int) -> torch.Tensor:
        if patch_size == self.base_patch:
            return self.weight
        if patch_size not in self._resize_cache:
            self._resize_cache[patch_size] = pi_resize_matrix(self.base_patch, patch_size)
        resize = self._resize_cache[patch_size].to(device=self.weight.device, dtype=self.weight.dtype)
        out_channels, in_channels = self.weight.shape[:2]
        return (self.weight.flatten(2) @ resize.T).reshape(out_channels, in_channels, patch_size, patch_size)

    def forward(self, x: torch.Tensor, patch_size: int) -> torch.Tensor:
        """(B, C, H, W) -> (B, tokens, width) in row-major patch order."""
        return F.conv2d(x, self.kernel(patch_size), self.bias, stride=patch_size).flatten(2).transpose(1, 2)


def patch_embed_forward_flops(in_channels: int, width: int, patch_size: int, tokens: int) -> float:
    return float(2 * tokens * width * in_channels * patch_size * patch_size)
