"""Width growth n -> k*n (integer k) by duplicating every hidden unit and head, function-preserving.

Every width-sized dimension of every tensor is tiled k times per chunk (a fused qkv of size 3n becomes
[q q' k k' v v'] with q' = q, so heads are duplicated and head_dim is kept). For a tensor used by a module
with forward multiplier mult, the *effective* weight on duplicated input coordinates is divided by k:

    stored W' = dup(W) * (mult(n) / mult(n')) / k**[fan-in is a width dim]

so a plain hidden layer gets W/k (Net2WiderNet), and a muP readout, whose multiplier output_mult/m halves
when the width doubles, keeps W. The multipliers are read from the two Plans, not assumed. Integer k
only: tiling keeps LayerNorm/BatchNorm statistics exactly, a partial duplication would not.

Adam state is duplicated with the scalings of the gradient, which after duplication is
dup(G) * (mult(n')/mult(n)) / k**[fan-out is a width dim]: exp_avg by that factor, exp_avg_sq by its
square, the step count kept. Under muP + Adam this makes the grown model follow the small one's
trajectory exactly when no symmetry-breaking noise is added (the muP LR of hidden layers falls by k,
exactly as the duplicated update needs; Ma et al. 2026, "muP-scaling"); ``noise`` adds
noise * init_std(n') of the new plan to every normally-initialised tensor to let duplicates diverge.

``grow_width_random`` is the seed paper's rule instead (Anagnostidis et al.): the old units keep their
stored weights in the first n slots of each width chunk, the new units are freshly initialised by the new
plan, the hyperparameters are unchanged and the optimizer state starts afresh. Not function-preserving:
the new units' random contributions act as a regulariser and the loss rises briefly at the switch.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from scaletune.parametrize import ParamClass, ParamInfo, Plan
from scaletune.surgery.recipe import OptimizerState, Recipe, Trainee

_FAN_IN_WIDTH = frozenset({ParamClass.HIDDEN, ParamClass.OUTPUT})
_SECOND_MOMENTS = frozenset({"exp_avg_sq", "max_exp_avg_sq"})


def grow_width(recipe: Recipe, trainee: Trainee, width: int, noise: float = 0.0,
               generator: torch.Generator | None = None) -> Trainee:
    """The same function at ``width`` (a multiple of the current width), with the muP plan of the new shape."""
    old = trainee.shape
    if width % old.width or width <= old.width:
        raise ValueError(f"width growth duplicates units, so the new width must be a multiple (>= 2x) of "
                         f"{old.width}; got {width}")
    if noise < 0:
        raise ValueError(f"noise must be non-negative, got {noise}")
    k = width // old.width
    shape = old.with_(width=width)
    new_plan = recipe.plan(shape)
    with torch.device("meta"):
        target = recipe.build(shape)
    new_shapes = {n: tuple(t.shape) for n, t in (*target.named_parameters(), *target.named_buffers())}
    aliases = _aliases(trainee.model)
    old_mults, new_mults = _multipliers(trainee.plan), _multipliers(new_plan)
    init_std = {name: g.init_std if g.init == "normal" else 0.0 for g in new_plan.groups for name in g.params}
    state = trainee.named_state()

    params: dict[str, torch.Tensor] = {}
    new_state: dict[str, OptimizerState] = {}
    for info in recipe.classify(old).params:
        tensor = trainee.model.get_parameter(info.name).detach()
        dims = _width_dims(tensor, new_shapes[info.name], k, old.width, info.name)
        weight_factor, grad_factor = _factors(info, aliases[info.name], bool(dims), k, old_mults, new_mults)
        grown = _tile(tensor, dims, k, old.width) * weight_factor
        if noise and init_std[info.name]:
            grown += noise * init_std[info.name] * torch.randn(grown.shape, generator=generator).to(grown)
        params[info.name] = grown
        if info.name in state:
            new_state[info.name] = _grow_state(state[info.name], dims, k, old.width, grad_factor)
    buffers = {name: _tile(b, _width_dims(b, new_shapes[name], k, old.width, name), k, old.width)
               for name, b in trainee.model.named_buffers() if b.ndim}
    return recipe.transplant(shape, params, buffers, new_state, trainee.device)


def grow_width_random(recipe: Recipe, trainee: Trainee, width: int) -> Trainee:
    """The old units at ``width`` (a multiple of the current width) beside new randomly initialised ones."""
    old = trainee.shape
    if width % old.width or width <= old.width:
        raise ValueError(f"width growth keeps each width chunk's units, so the new width must be a multiple "
                         f"(>= 2x) of {old.width}; got {width}")
    k = width // old.width
    shape = old.with_(width=width)
    fresh = recipe.start(shape, trainee.device)
    new = {n: t.detach() for n, t in (*fresh.model.named_parameters(), *fresh.model.named_buffers())}

    def embed(name: str, tensor: torch.Tensor) -> torch.Tensor:
        dims = _width_dims(tensor, tuple(new[name].shape), k, old.width, name)
        if not dims:
            return tensor.detach()
        target = new[name].clone()
        index = [_kept_slots(n, k, old.width) if d in dims else torch.arange(n) for d, n in enumerate(tensor.shape)]
        target[torch.meshgrid(*[i.to(target.device) for i in index], indexing="ij")] = tensor.detach()
        return target

    params = {n: embed(n, p) for n, p in trainee.model.named_parameters()}
    buffers = {n: embed(n, b) for n, b in trainee.model.named_buffers() if b.ndim}
    return recipe.transplant(shape, params, buffers, {}, trainee.device)


def _kept_slots(size: int, k: int, width: int) -> torch.Tensor:
    """Positions of a dim of ``size`` (c chunks of width) inside the grown dim (c chunks of k*width)."""
    chunks = size // width
    return (torch.arange(chunks)[:, None] * k * width + torch.arange(width)[None, :]).flatten()


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """Every name under which each parameter is used, keyed by its first name (tied tensors have two)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {names[0]: names for names in by_id.values()}


def _multipliers(plan: Plan) -> dict[str, float]:
    """The forward multiplier acting on each parameter name it applies to (others are multiplied by 1).

    An input module's multiplier scales its whole output (weight and bias); an output module's scales
    its input, so only its weight.
    """
    found: dict[str, float] = {}
    for m in plan.modules:
        prefix = f"{m.name}." if m.name else ""
        if m.role == "output":
            found[f"{prefix}weight"] = m.value
        elif m.role == "input":
            found.update({f"{prefix}{leaf}": m.value for leaf in ("weight", "bias")})
    return found


def _width_dims(t: torch.Tensor, new_shape: tuple[int, ...], k: int, width: int, name: str) -> list[int]:
    dims = [d for d, (a, b) in enumerate(zip(t.shape, new_shape)) if a != b]
    for d in dims:
        if new_shape[d] != k * t.shape[d] or t.shape[d] % width:
            raise ValueError(f"{name}: dimension {d} goes from {t.shape[d]} to {new_shape[d]}; width growth needs "
                             f"every width-dependent size to be a multiple of the width and to grow {k}x")
    return dims


def _tile(t: torch.Tensor, dims: list[int], k: int, width: int) -> torch.Tensor:
    """Along each dim of size c*width, map new index (chunk, j) to old index (chunk, j mod width)."""
    for d in dims:
        chunks = t.shape[d] // width
        index = (torch.arange(chunks)[:, None] * width + torch.arange(k * width)[None, :] % width).flatten()
        t = t.index_select(d, index.to(t.device))
    return t


def _factors(info: ParamInfo, names: list[str], has_width_dims: bool, k: int,
             old_mults: dict[str, float], new_mults: dict[str, float]) -> tuple[float, float]:
    """(stored-weight factor, gradient factor) of one tensor; every module using it must agree."""
    found: set[tuple[float, float]] = set()
    for i, name in enumerate(names):
        role = ParamClass.OUTPUT if i and info.tied_readout else info.cls
        ratio = old_mults.get(name, 1.0) / new_mults.get(name, 1.0)
        fan_in_width = role in _FAN_IN_WIDTH
        fan_out_width = has_width_dims and role is not ParamClass.OUTPUT
        found.add((ratio / k ** fan_in_width, 1.0 / (ratio * k ** fan_out_width)))
    weight, grad = found.pop()
    if any(not (math.isclose(w, weight) and math.isclose(g, grad)) for w, g in found):
        raise ValueError(f"{info.name} is shared by modules whose multipliers change differently with width "
                         f"({names}); no single rescaling preserves all of them")
    return weight, grad


def _grow_state(state: OptimizerState, dims: list[int], k: int, width: int, grad_factor: float) -> OptimizerState:
    grown: OptimizerState = {}
    for key, value in state.items():
        if not torch.is_tensor(value) or value.ndim == 0:
            grown[key] = value.clone() if torch.is_tensor(value) else value
            continue
        power = 2 if key in _SECOND_MOMENTS else 1
        grown[key] = _tile(value, dims, k, width) * grad_factor ** power
    return grown
