"""A small GPT in plain PyTorch, written the way one writes one's own (nanoGPT-style): nothing from scaletune.

``build(width, depth)`` is the factory scaletune builds it through: at the proxy shape for every trial, and at
the target shape when the tuned values are transferred. The head dimension stays 16 at every width (more
heads as the model widens; ``head_dim`` says so), so only the residual branches need declaring: ``BRANCHES``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 256  # bytes
CONTEXT = 64
HEAD_DIM = 16
BRANCHES = ["blocks.*.attn", "blocks.*.mlp"]  # modules whose output is added to the residual stream


class SelfAttention(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.heads = width // HEAD_DIM
        self.head_dim = HEAD_DIM  # read by scaletune: fixed as width grows, so the logit scale 1/sqrt(d) holds
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        q, k, v = (t.view(batch, length, self.heads, HEAD_DIM).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))


class Mlp(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, 4 * width, bias=False)
        self.down = nn.Linear(4 * width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn, self.mlp = SelfAttention(width), Mlp(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Gpt(nn.Module):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        if width % HEAD_DIM:
            raise ValueError(f"width must be a multiple of {HEAD_DIM}, got {width}")
        self.tokens = nn.Embedding(VOCAB, width)
        self.positions = nn.Embedding(CONTEXT, width)
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tokens(idx) + self.positions(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def build(width: int, depth: int) -> Gpt:
    return Gpt(width, depth)
