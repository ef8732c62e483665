"""Depth growth L -> L' by inserting identity blocks, function-preserving under every parametrization.

Blocks are the modules with a ``branch_mult`` (the convention the parametrization relies on); within
each container (a ModuleList of blocks) old block i moves to index floor(i * L'/L) and the gaps are
filled with new blocks, freshly initialised by the new plan except for their *output projections*,
which are zeroed so each new block is the identity on the residual stream. Output projections are found
by module convention, not by name: the last weight-bearing layers of a new block, in call order, that
must be zeroed for ``block(x) == x`` (attention out-projection and MLP down-projection in a transformer
block, ``fc2`` in a residual MLP block, the last conv in a pre-activation ResNet block).

Under depth-muP/CompleteP the branch multiplier (L/L_base)^-alpha falls for *all* blocks, so the old
blocks' output projections are multiplied by rho = bm(L)/bm(L') = (L'/L)^alpha (read from the two
Plans) and their Adam moments by 1/rho and 1/rho^2 (the gradient's scaling). New blocks start with empty
Adam state. The new plan's per-layer LR/eps/WD rules at L' apply from the next step.
"""

from __future__ import annotations

import copy
from collections import defaultdict

import torch
from torch import nn

from scaletune.parametrize import Plan
from scaletune.surgery.recipe import OptimizerState, Recipe, Trainee


def grow_depth(recipe: Recipe, trainee: Trainee, depth: int, example: torch.Tensor, zero_new: bool = True) -> Trainee:
    """The same function at ``depth`` blocks per container; ``example`` is one model input batch.

    ``zero_new=False`` is the seed paper's rule instead: new blocks keep their fresh initialisation, old
    blocks and hyperparameters are untouched and the optimizer state starts afresh (not function-preserving).
    """
    old = trainee.shape
    if depth <= old.depth:
        raise ValueError(f"depth growth needs more blocks than the current {old.depth}; got {depth}")
    shape = old.with_(depth=depth)
    new_plan = recipe.plan(shape)
    placement = _placement(_blocks(trainee.plan), _blocks(new_plan))
    rename = {name: _renamed(name, placement) for name, _ in trainee.model.named_parameters()}
    params = {rename[n]: p.detach() for n, p in trainee.model.named_parameters()}
    buffers = {_renamed(n, placement): b for n, b in trainee.model.named_buffers()}
    state = {rename[n]: s for n, s in trainee.named_state().items()} if zero_new else {}
    grown = recipe.transplant(shape, params, buffers, state, trainee.device)
    if not zero_new:
        return grown

    inserted = sorted(set(_blocks(new_plan)) - set(placement.values()))
    projections = output_projections(grown.model, inserted[0], example)
    rho = trainee.plan.branch_multiplier / new_plan.branch_multiplier
    with torch.no_grad():
        for block in inserted:
            for module in projections:
                for p in grown.model.get_submodule(f"{block}.{module}").parameters(recurse=False):
                    p.zero_()
        if rho != 1.0:
            for block in placement.values():
                for module in projections:
                    for p in grown.model.get_submodule(f"{block}.{module}").parameters(recurse=False):
                        p.mul_(rho)
                        _scale_moments(grown.optimizer.state.get(p, {}), 1.0 / rho)
    return grown


def output_projections(model: nn.Module, block_name: str, example: torch.Tensor) -> list[str]:
    """Names (relative to the block) of the layers whose zeroing makes the block the identity.

    Walking back from the last-called layer, a layer is kept zeroed only if zeroing it changes the
    block's output: once a branch's last layer is zero, the layers feeding it no longer matter, so
    they keep their weights (and the new block its gradients).
    """
    block = model.get_submodule(block_name)
    block_input = _block_input(model, block, example)
    probe = copy.deepcopy(block).eval()
    zeroed: list[str] = []
    with torch.no_grad():
        output = probe(block_input)
        for name in reversed(_call_order(probe, block_input)):
            if torch.equal(output, block_input):
                break
            module = probe.get_submodule(name)
            saved = [p.clone() for p in module.parameters(recurse=False)]
            for p in module.parameters(recurse=False):
                p.zero_()
            changed = probe(block_input)
            if torch.equal(changed, output):
                for p, value in zip(module.parameters(recurse=False), saved):
                    p.copy_(value)
            else:
                zeroed.append(name)
                output = changed
    if not torch.equal(output, block_input):
        raise ValueError(f"{block_name} is not the identity even with its output layers zeroed; depth growth "
                         "needs residual blocks computing x + branch_mult * f(x)")
    return zeroed


def _blocks(plan: Plan) -> list[str]:
    return [m.name for m in plan.modules if m.role == "branch"]


def _placement(old: list[str], new: list[str]) -> dict[str, str]:
    """Old block name -> new block name, spreading the old blocks evenly within each container."""
    old_by, new_by = _by_container(old), _by_container(new)
    if set(old_by) != set(new_by):
        raise ValueError(f"the block containers differ between depths ({sorted(old_by)} vs {sorted(new_by)})")
    placement: dict[str, str] = {}
    for container, indices in old_by.items():
        count, new_count = len(indices), len(new_by[container])
        for i, index in enumerate(indices):
            placement[f"{container}.{index}"] = f"{container}.{new_by[container][i * new_count // count]}"
    return placement


def _by_container(blocks: list[str]) -> dict[str, list[int]]:
    grouped: dict[str, list[int]] = defaultdict(list)
    for name in blocks:
        container, _, index = name.rpartition(".")
        if not index.isdigit():
            raise ValueError(f"block {name!r} is not an element of a ModuleList; depth growth cannot place it")
        grouped[container].append(int(index))
    return {c: sorted(v) for c, v in grouped.items()}


def _renamed(name: str, placement: dict[str, str]) -> str:
    for old, new in placement.items():
        if name.startswith(old + "."):
            return new + name[len(old):]
    return name


def _block_input(model: nn.Module, block: nn.Module, example: torch.Tensor) -> torch.Tensor:
    captured: list[torch.Tensor] = []
    handle = block.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().clone()))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example.to(next(model.parameters()).device))
    finally:
        handle.remove()
        model.train(was_training)
    return captured[0]


def _call_order(block: nn.Module, block_input: torch.Tensor) -> list[str]:
    """Submodules owning a weight matrix/kernel, in the order the block's forward first calls them."""
    order: list[str] = []
    handles = [module.register_forward_hook(lambda _m, _a, _o, name=name: order.append(name))
               for name, module in block.named_modules()
               if name and any(p.ndim >= 2 for p in module.parameters(recurse=False))]
    with torch.no_grad():
        block(block_input)
    for handle in handles:
        handle.remove()
    return list(dict.fromkeys(order))


def _scale_moments(state: OptimizerState, factor: float) -> None:
    for key in ("exp_avg", "momentum_buffer"):
        if key in state:
            state[key].mul_(factor)
    for key in ("exp_avg_sq", "max_exp_avg_sq"):
        if key in state:
            state[key].mul_(factor ** 2)
