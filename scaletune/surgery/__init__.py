"""Model surgery for adaptive shape schedules: change patch size, width or depth mid-training.

Each operation takes a :class:`Trainee` (model, plan, optimizer with state, at one shape) and returns
one at the new shape whose parameter groups are ``make_plan`` at that shape. Width and depth growth are
function-preserving (exactly, up to fp32 rounding, with zero noise); a patch-size change is not (see
``patch``).
"""

from __future__ import annotations

import torch

from scaletune.shapes import Shape
from scaletune.surgery.depth import grow_depth, output_projections
from scaletune.surgery.patch import change_patch_size
from scaletune.surgery.recipe import Recipe, Trainee
from scaletune.surgery.width import grow_width

__all__ = ["Recipe", "Trainee", "change_patch_size", "grow_depth", "grow_width", "output_projections", "reshape"]


def reshape(recipe: Recipe, trainee: Trainee, shape: Shape, example: torch.Tensor, noise: float = 0.0,
            generator: torch.Generator | None = None) -> Trainee:
    """Move to ``shape`` along exactly one axis (patch size, width or depth), as a schedule step does."""
    old = trainee.shape
    changed = [axis for axis in ("width", "depth", "patch_size") if getattr(shape, axis) != getattr(old, axis)]
    if len(changed) != 1:
        raise ValueError(f"a schedule step changes exactly one of width, depth, patch_size; {old} -> {shape} "
                         f"changes {changed or 'none'}")
    if changed == ["patch_size"]:
        return change_patch_size(recipe, trainee, shape.patch_size)
    if changed == ["width"]:
        return grow_width(recipe, trainee, shape.width, noise, generator)
    return grow_depth(recipe, trainee, shape.depth, example)
