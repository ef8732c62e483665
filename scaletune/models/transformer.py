"""The pre-norm transformer block shared by the 'vit' and 'gpt' families."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
              scale: float | torch.Tensor) -> torch.Tensor:
    """Fused attention for a float scale; the explicit softmax formula for a tensor scale (a pack's per-member
    scale under vmap, where the fused CPU kernel has no batching rule and would run member by member)."""
    if not isinstance(scale, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    logits = (q @ k.transpose(-2, -1)) * scale
    if causal:
        tokens = q.shape[-2]
        future = torch.ones(tokens, tokens, dtype=torch.bool, device=q.device).triu(1)
        logits = logits.masked_fill(future, float("-inf"))
    return logits.softmax(dim=-1) @ v


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection and a logit scale the parametrization sets."""

    def __init__(self, width: int, head_dim: int, causal: bool) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.heads = width // head_dim
        self.causal = causal
        self.attn_scale = 1.0 / math.sqrt(head_dim)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def zero_query_(self) -> None:
        width = self.proj.in_features
        with torch.no_grad():
            self.qkv.weight[:width].zero_()
            self.qkv.bias[:width].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v, self.causal, self.attn_scale)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, width))


class FeedForward(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class TransformerBlock(nn.Module):
    """Both residual branches (attention and MLP) share this block's ``branch_mult``."""

    branch_outputs = ("attn.proj", "mlp.proj")

    def __init__(self, width: int, head_dim: int, mlp_ratio: int, causal: bool) -> None:
        super().__init__()
        self.branch_mult = 1.0
        self.ln1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, head_dim, causal)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = FeedForward(width, mlp_ratio * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.branch_mult * self.attn(self.ln1(x))
        return x + self.branch_mult * self.mlp(self.ln2(x))


def transformer_blocks_forward_flops(tokens: int, width: int, depth: int, mlp_ratio: int,
                                     span: int | None = None) -> float:
    """Forward FLOPs of ``depth`` blocks on one sequence: projections, QK^T and AV (full, causal or not).

    ``span``: each token attends within its block of ``span`` tokens (None: the whole sequence), so attention
    costs ``tokens * span`` per layer instead of ``tokens ** 2``.
    """
    projections = 2 * tokens * width * width * (3 + 1 + 2 * mlp_ratio)
    attention = 2 * 2 * tokens * (span or tokens) * width
    return float(depth * (projections + attention))
