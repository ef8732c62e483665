"""Gradient clipping rules that cannot confound a transfer: off, or a threshold in the model's own units.

Clipping at a fixed global norm is not scale-invariant: at init the global gradient norm differs several-fold
between sizes of one ladder, so a fixed threshold clips some sizes and not others and moves their optimum
for a reason that has nothing to do with the parametrization. The ``relative`` rule clips a step only when
its global norm exceeds ``factor`` times a running average of the previous steps' norms (a spike guard): the
threshold scales with each model's own norm, so it acts alike at every size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

ClipRule = Literal["off", "relative"]
CLIP_RULES: tuple[str, ...] = ("off", "relative")
DEFAULT_FACTOR = 2.0
EMA_DECAY = 0.9  # the running norm follows about the last 10 steps


@dataclass
class RelativeClipper:
    """Clip the global gradient norm at ``factor`` x the running average of past (clipped) norms."""

    factor: float = DEFAULT_FACTOR
    average: float | None = None  # None until the first step: that step is never clipped
    clipped_steps: int = 0

    def __call__(self, params: Iterable[torch.Tensor]) -> float:
        """Clip the gradients in place; returns the norm before clipping."""
        with_grad = [p for p in params if p.grad is not None]
        norm = float(nn.utils.get_total_norm([p.grad for p in with_grad]))
        scale = self.scale(norm)
        if scale < 1.0:
            nn.utils.clip_grads_with_norm_(with_grad, scale * norm, torch.tensor(norm))
        return norm

    def scale(self, norm: float) -> float:
        """The factor (<= 1) this step's gradient of global norm ``norm`` is multiplied by; updates the average."""
        if not math.isfinite(norm):
            return 1.0  # the loss diverges next step; clipping would hide it
        kept = norm
        if self.average is not None and norm > self.factor * self.average:
            kept = self.factor * self.average
            self.clipped_steps += 1
        self.average = kept if self.average is None else EMA_DECAY * self.average + (1 - EMA_DECAY) * kept
        return kept / norm if norm > 0 else 1.0

    def state_dict(self) -> dict[str, float | int | None]:
        return {"factor": self.factor, "average": self.average, "clipped_steps": self.clipped_steps}

    def load_state_dict(self, state: dict[str, float | int | None]) -> None:
        self.average = None if state["average"] is None else float(state["average"])
        self.clipped_steps = int(state["clipped_steps"] or 0)


def make_clipper(rule: str, factor: float = DEFAULT_FACTOR) -> RelativeClipper | None:
    """The clipper for a rule; None means gradients are never clipped."""
    if rule not in CLIP_RULES:
        raise ValueError(f"unknown grad_clip rule {rule!r}; choose one of {CLIP_RULES}")
    if not factor > 1.0:
        raise ValueError(f"grad_clip_factor must be above 1 (a multiple of the running norm), got {factor}")
    return RelativeClipper(factor) if rule == "relative" else None
