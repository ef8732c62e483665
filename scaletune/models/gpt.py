"""The 'gpt' family: a decoder-only causal language model with learned positions.

Its shape's ``context`` (a divisor of the dataset's sequence length) makes attention span blocks of that many
tokens: each sequence is cut into blocks that keep their absolute positions, and a token sees only the earlier
tokens of its block. Training at a short context is cheaper per token (attention costs tokens x context), every
position embedding still trains, and a longer context is the same parameters (``set_context``): the context-length
axis of adaptive schedules needs no surgery.
"""

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
    check_shape_fields,
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
    context: int
    vocab: int
    width: int
    depth: int
    head_dim: int
    mlp_ratio: int
    tie_embeddings: bool


def gpt_config(shape: Shape, data: DataSpec, args: dict[str, Any]) -> GPTConfig:
    check_known_args(NAME, args, ALLOWED_ARGS)
    check_task(NAME, data, "lm")
    check_shape_fields(NAME, shape)
    if len(data.input_shape) != 1:
        raise ValueError(f"model family {NAME!r} needs token sequences of shape (seq_len,), but the dataset's inputs "
                         f"have shape {tuple(data.input_shape)}")
    seq_len = data.input_shape[0]
    context = seq_len if shape.context is None else shape.context
    check_context_divides(context, seq_len)
    head_dim = positive_int_arg(NAME, args, "head_dim", 16)
    check_heads(shape.width, head_dim)
    return GPTConfig(seq_len, context, data.num_outputs, shape.width, shape.depth, head_dim,
                     positive_int_arg(NAME, args, "mlp_ratio", 4), bool_arg(NAME, args, "tie_embeddings", False))


def check_context_divides(context: int, seq_len: int) -> None:
    if seq_len % context:
        divisors = [d for d in range(1, seq_len + 1) if seq_len % d == 0]
        raise ValueError(f"context {context} does not divide the dataset's sequence length {seq_len}; choose one of "
                         f"{divisors}")


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab, cfg.width)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.width)
        self.seq_len, self.context = cfg.seq_len, cfg.context
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg.width, cfg.head_dim, cfg.mlp_ratio, causal=True) for _ in range(cfg.depth))
        self.ln_f = nn.LayerNorm(cfg.width)
        self.lm_head = nn.Linear(cfg.width, cfg.vocab, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    def set_context(self, context: int) -> None:
        """Switch the attention span in place; parameters are untouched."""
        check_context_divides(context, self.seq_len)
        self.context = context

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, vocab) next-token logits, attending within blocks of ``context`` tokens."""
        batch, tokens = idx.shape
        span = min(tokens, self.context)
        if tokens % span:
            raise ValueError(f"{tokens} tokens do not split into blocks of the context {self.context}")
        h = self.wte(idx) + self.wpe(torch.arange(tokens, device=idx.device))
        h = h.reshape(batch * (tokens // span), span, h.shape[-1])
        for block in self.blocks:
            h = block(h)
        return self.lm_head(self.ln_f(h.reshape(batch, tokens, h.shape[-1])))


def gpt_forward_flops(cfg: GPTConfig) -> float:
    """Embedding lookups cost no FLOPs; the blocks and the readout over every position do."""
    return (transformer_blocks_forward_flops(cfg.seq_len, cfg.width, cfg.depth, cfg.mlp_ratio, cfg.context)
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
