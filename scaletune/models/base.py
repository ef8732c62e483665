"""The contract between model families and the parametrization core.

Built-in modules follow these conventions so the core can set multipliers as plain Python floats:
- a residual block has ``branch_mult: float`` (1.0 by default) and computes ``x + branch_mult * f(x)``, and
  ``branch_outputs: tuple[str, ...]``, the submodules whose outputs end its branches (the block's readouts,
  which ``ParamOptions.zero_init_block_readout`` zeroes);
- an attention module has ``head_dim: int``, ``attn_scale: float`` (logit scale, default
  1/sqrt(head_dim)) and ``zero_query_()`` that zeroes the query projection;
- readouts are ``nn.Linear``; tied readouts share the embedding's weight tensor.

Inside a pack (``scaletune.packs``) these multipliers are per-member 0-dim tensors under ``vmap``, so a
module computes with them as numbers (no ``float()``, no Python branch on their value).
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import nn

from scaletune.data.base import DataSpec
from scaletune.shapes import Shape


class ModelFamily(Protocol):
    name: str

    def validate(self, shape: Shape, data: DataSpec, args: dict[str, Any]) -> None:
        """Raise ValueError with a sentence a person can act on if shape/args are not buildable."""
        ...

    def build(self, shape: Shape, data: DataSpec, args: dict[str, Any]) -> nn.Module:
        """Construct the model (on the current default device; callers may use torch.device('meta'))."""
        ...

    def train_flops_per_sample(self, shape: Shape, data: DataSpec, args: dict[str, Any]) -> float:
        """Analytic training FLOPs per sample (a sequence for LM) = 3 x forward, attention included."""
        ...
