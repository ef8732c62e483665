"""The 'gpt' family: a decoder-only causal language model with learned positions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from scaletune.data.base import DataSpec
from scaletune.models.checks import (
    bool_arg,
    check_heads,
    check_known_args,
    check_no_patch_size,
    check_task,
    positive_int_arg,
)
from scaletune.models.transformer import TransformerBlock, transformer_blocks_forward_flops
from scaletune.shapes import Shape

NAME = "gpt"
ALLOWED_ARGS = ("head_dim", "mlp_ratio", "tie_embeddings")


@dataclass(frozen=True)
class GPTConfig:
    seq_len: int
    vocab: int
    width: int
    depth: int
    head_dim: int
    mlp_ratio: int
    tie_embeddings: bool


def gpt_config(shape: Shape, data: DataSpec, args: dict[str, Any]) -> GPTConfig:
    check_known_args(NAME, args, ALLOWED_ARGS)
    check_task(NAME, data, "lm")
    check_no_patch_size(NAME, shape)
    if len(data.input_shape) != 1:
        raise ValueError(f"model family {NAME!r} needs token sequences of shape (seq_len,), but the dataset's inputs "
                         f"have shape {tuple(data.input_shape)}")
    head_dim = positive_int_arg(NAME, args, "head_dim", 16)
    check_heads(shape.width, head_dim)
    return GPTConfig(data.input_shape[0], data.num_outputs, shape.width, shape.depth, head_dim,
                     positive_int_arg(NAME, args, "mlp_ratio", 4), bool_arg(NAME, args, "tie_embeddings", False))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab, cfg.width)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.width)
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg.width, cfg.head_dim, cfg.mlp_ratio, causal=True) for _ in range(cfg.depth))
        self.ln_f = nn.LayerNorm(cfg.width)
        self.lm_head = nn.Linear(cfg.width, cfg.vocab, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, vocab) next-token logits."""
        positions = torch.arange(idx.shape[1], device=idx.device)
        h = self.wte(idx) + self.wpe(positions)
        for block in self.blocks:
            h = block(h)
        return self.lm_head(self.ln_f(h))


def gpt_forward_flops(cfg: GPTConfig) -> float:
    """Embedding lookups cost no FLOPs; the blocks and the readout over every position do."""
    return (transformer_blocks_forward_flops(cfg.seq_len, cfg.width, cfg.depth, cfg.mlp_ratio)
            + 2 * cfg.seq_len * cfg.width * cfg.vocab)


class GPTFamily:
    name = NAME

    def validate(self, shape: Shape, data: DataSpec, args: dict[str, Any]) -> None:
        gpt_config(shape, data, args)

    def build(self, shape: Shape, data: DataSpec, args: dict[str, Any]) -> nn.Module:
        return GPT(gpt_config(shape, data, args))

    def train_flops_per_sample(self, shape: Shape, data: DataSpec, args: dict[str, Any]) -> float:
        return 3.0 * gpt_forward_flops(gpt_config(shape, data, args))


GPT_FAMILY = GPTFamily()
