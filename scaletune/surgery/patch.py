"""Patch-size change for a FlexiViT-style model: only the config value changes.

The patch embedding keeps one base kernel that is PI-resized to the current patch size and the
position embedding is bilinearly resized to the current grid, so parameters, the plan's groups and
the optimizer state are untouched. The switch is still not function-preserving: going to a smaller
patch than the base *down*-samples the kernel (PI-resize is then only the least-squares best) and
changes the token count. Measured on digits (8x8, base patch 4, width 32, depth 2, muP, 150 Adam
steps), switching 4 -> 2 moves the logits by about 0.2-0.3 of their RMS, and raises eval loss from
~0.3 to ~0.4 (tests/core/test_surgery.py pins the bound); a short transient, not a reset.
"""

from __future__ import annotations

from scaletune.surgery.recipe import Recipe, Trainee


def change_patch_size(recipe: Recipe, trainee: Trainee, patch_size: int) -> Trainee:
    """The same model, optimizer and state at ``patch_size``; raises if the model cannot switch in place."""
    set_patch_size = getattr(trainee.model, "set_patch_size", None)
    if not callable(set_patch_size):
        raise ValueError(f"{type(trainee.model).__name__} has no set_patch_size(); only FlexiViT-style models "
                         "(the 'vit' family) change patch size in place")
    shape = trainee.shape.with_(patch_size=patch_size)
    plan = recipe.plan(shape)
    if plan.groups != trainee.plan.groups:
        raise ValueError(f"the parameter groups at {shape} differ from those at {trainee.shape}; a patch-size "
                         "change must not touch parameters")
    set_patch_size(patch_size)
    return Trainee(shape, trainee.model, plan, trainee.optimizer)
