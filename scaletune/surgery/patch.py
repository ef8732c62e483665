"""Shape changes that only set a value on the model: patch size (FlexiViT-style ViT) and context (GPT).

Parameters, the plan's groups and the optimizer state are untouched. A patch-size change keeps one base
kernel that is PI-resized to the current patch size and a position embedding bilinearly resized to the
current grid; it is still not function-preserving: going to a smaller patch than the base *down*-samples the
kernel (PI-resize is then only the least-squares best) and changes the token count. Measured on digits (8x8,
base patch 4, width 32, depth 2, muP, 150 Adam steps), switching 4 -> 2 moves the logits by about 0.2-0.3 of
their RMS, and raises eval loss from ~0.3 to ~0.4 (tests/core/test_surgery.py pins the bound); a short
transient, not a reset. A context change lets attention span more (or fewer) of the tokens before each one;
every position embedding was trained at any context, so nothing is new but what attention sees.
"""

from __future__ import annotations

from scaletune.surgery.recipe import Recipe, Trainee

IN_PLACE = {"patch_size": "FlexiViT-style models (the 'vit' family)", "context": "the 'gpt' family"}


def change_in_place(recipe: Recipe, trainee: Trainee, axis: str, value: int) -> Trainee:
    """The same model, optimizer and state with ``axis`` (patch_size or context) at ``value``; raises if the
    model cannot switch it in place."""
    setter = getattr(trainee.model, f"set_{axis}", None)
    if not callable(setter):
        raise ValueError(f"{type(trainee.model).__name__} has no set_{axis}(); only {IN_PLACE[axis]} change "
                         f"{axis} in place")
    shape = trainee.shape.with_(**{axis: value})
    plan = recipe.plan(shape)
    if plan.groups != trainee.plan.groups:
        raise ValueError(f"the parameter groups at {shape} differ from those at {trainee.shape}; a {axis} change "
                         "must not touch parameters")
    setter(value)
    return Trainee(shape, trainee.model, plan, trainee.optimizer)


def change_patch_size(recipe: Recipe, trainee: Trainee, patch_size: int) -> Trainee:
    return change_in_place(recipe, trainee, "patch_size", patch_size)
