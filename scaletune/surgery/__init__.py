"""Model surgery for adaptive shape schedules: change patch size, context, width or depth (or several)
mid-training.

Each operation takes a :class:`Trainee` (model, plan, optimizer with state, at one shape) and returns
one at the new shape whose parameter groups are ``make_plan`` at that shape. Width and depth growth are
function-preserving (exactly, up to fp32 rounding, with zero noise) under the ``duplicate`` growth rule;
the seed paper's ``random`` rule (new units and blocks freshly initialised, optimizer state reset) is not,
and neither is a patch-size or context change (both in place, see ``patch``).
"""

from __future__ import annotations

from typing import Literal

import torch

from scaletune.shapes import Shape
from scaletune.surgery.depth import grow_depth, output_projections
from scaletune.surgery.patch import change_in_place, change_patch_size
from scaletune.surgery.recipe import Recipe, Trainee
from scaletune.surgery.width import grow_width, grow_width_random

Growth = Literal["duplicate", "random"]
GROWTH_RULES: tuple[Growth, ...] = ("duplicate", "random")

__all__ = ["GROWTH_RULES", "Growth", "Recipe", "Trainee", "change_in_place", "change_patch_size", "grow_depth",
           "grow_width", "grow_width_random", "output_projections", "reshape"]


def reshape(recipe: Recipe, trainee: Trainee, shape: Shape, example: torch.Tensor, noise: float = 0.0,
            generator: torch.Generator | None = None, growth: Growth = "duplicate") -> Trainee:
    """Move to ``shape`` along one or more axes (patch size, context, then depth, then width), as a schedule step
    does.

    ``growth`` picks the width/depth rule: ``duplicate`` (function-preserving, ``noise`` breaks symmetry)
    or ``random`` (the seed paper's: new units/blocks freshly initialised, same hyperparameters).
    """
    old = trainee.shape
    axes = ("patch_size", "context", "depth", "width")
    changed = [axis for axis in axes if getattr(shape, axis) != getattr(old, axis)]
    if not changed:
        raise ValueError(f"a schedule step changes at least one of {', '.join(axes)}; {old} -> {shape} changes none")
    if growth not in GROWTH_RULES:
        raise ValueError(f"unknown growth rule {growth!r}; known: {', '.join(GROWTH_RULES)}")
    for axis in changed:
        if axis in ("patch_size", "context"):
            trainee = change_in_place(recipe, trainee, axis, getattr(shape, axis))
        elif axis == "depth":
            trainee = grow_depth(recipe, trainee, shape.depth, example, zero_new=growth == "duplicate")
        elif growth == "duplicate":
            trainee = grow_width(recipe, trainee, shape.width, noise, generator)
        else:
            trainee = grow_width_random(recipe, trainee, shape.width)
    return trainee
