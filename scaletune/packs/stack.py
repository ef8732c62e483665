"""K same-shape models as one: parameters in one flat (K, N) leaf, forward by vmap over a shared template module.

Each member keeps its own initial values (stacked from its own model), its own BatchNorm statistics and
its own forward multipliers, which become per-member 0-dim tensors inside the vmapped call.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.func import stack_module_state, vmap

from scaletune.parametrize import MULTIPLIER_ATTRS


Slot = tuple[dict[str, torch.Tensor], str]  # where a module holds one of its tensors: the dict and the key


def _slots(model: nn.Module, template: nn.Module, names: list[str]) -> list[list[Slot]]:
    """Per name (a parameter, buffer or multiplier of ``model``), every place in ``template`` holding that tensor.

    A tied parameter (one tensor under two names) fills each of its places, as functional_call's tying would.
    """
    owners: dict[int, list[str]] = {}
    for name, tensor in (*model.named_parameters(remove_duplicate=False),
                         *model.named_buffers(remove_duplicate=False)):
        owners.setdefault(id(tensor), []).append(name)
    out = []
    for name in names:
        value, slots = _get(model, name), []
        for place in owners[id(value)] if isinstance(value, torch.Tensor) else [name]:
            module_name, _, attr = place.rpartition(".")
            module = template.get_submodule(module_name)
            slots.append((next((d for d in (module._parameters, module._buffers) if attr in d), module.__dict__), attr))
        out.append(slots)
    return out


def _multiplier_names(model: nn.Module) -> list[str]:
    """``module.attr`` of every forward multiplier the parametrization set on ``model``."""
    names = []
    for module_name, module in model.named_modules():
        for attr in sorted(set(MULTIPLIER_ATTRS.values())):
            if isinstance(getattr(module, attr, None), float):
                names.append(f"{module_name}.{attr}" if module_name else attr)
    return names


class PackedModel:
    """The members' parameters live in ``flat`` (one row per member); ``keep`` drops members.

    ``flat`` is the one leaf: each call splits it into the parameters inside vmap, so the backward gathers every
    gradient into ``flat.grad`` with one concatenation and an optimizer updates every parameter of every member
    with a handful of ops on ``flat``.
    """

    def __init__(self, models: list[nn.Module]) -> None:
        if not models:
            raise ValueError("a pack needs at least one member")
        params, buffers = stack_module_state(models)
        self.names = list(params)
        self.sizes = [math.prod(params[n].shape[1:]) for n in self.names]
        self.shapes = [tuple(params[n].shape[1:]) for n in self.names]
        self.flat = torch.cat([params[n].detach().reshape(len(models), -1) for n in self.names], dim=1)
        self.flat.requires_grad_()
        self.repeats = torch.tensor(self.sizes, device=self.flat.device)  # ``expand``'s, made once
        self.buffers = buffers
        names = _multiplier_names(models[0])
        self.multipliers = torch.tensor([[float(_get(m, n)) for n in names] for m in models],
                                        device=self.flat.device).reshape(len(models), len(names))  # (K, M)
        self.template = copy.deepcopy(models[0]).to("meta")  # the members' own models stay usable on their own
        for n in names:  # the call swaps tensors only: the template holds a tensor where members hold a float
            _set(self.template, n, torch.zeros((), device="meta"))
        self.slots = _slots(models[0], self.template, [*self.names, *buffers, *names])
        self.own = tuple(held[key] for (held, key), *_ in self.slots)  # the template's meta tensors, put back

    @property
    def size(self) -> int:
        return self.flat.shape[0]

    def per_parameter(self, values: list[dict[str, float]]) -> torch.Tensor:
        """(K, P) float64: member k's value for the p-th parameter tensor; ``expand`` spreads it over (K, N)."""
        return torch.tensor([[member[n] for n in self.names] for member in values], dtype=torch.float64,
                            device=self.flat.device)

    def expand(self, per_parameter: torch.Tensor) -> torch.Tensor:
        """(K, P) -> (K, N) in the parameters' dtype, each value repeated over its parameter's elements."""
        return per_parameter.to(self.flat.dtype).repeat_interleave(self.repeats, dim=1, output_size=self.flat.shape[1])

    def split(self, row: torch.Tensor) -> dict[str, torch.Tensor]:
        """One member's (N,) row of a flat tensor as one tensor per parameter, by name, in its shape."""
        return {name: part.view(shape) for name, shape, part in zip(self.names, self.shapes,
                                                                     torch.split(row, self.sizes))}

    def unstack_into(self, pos: int, model: nn.Module) -> None:
        """Copy the member at stack position ``pos`` (parameters and buffers) into its own ``model``."""
        with torch.no_grad():
            for name, value in self.split(self.flat[pos]).items():
                model.get_parameter(name).copy_(value)
            for name, buffer in self.buffers.items():
                model.get_buffer(name).copy_(buffer[pos])

    def take_grad(self) -> torch.Tensor:
        """The gradient of every member as one (K, N) tensor; ``flat``'s gradient is cleared."""
        grad = torch.zeros_like(self.flat) if self.flat.grad is None else self.flat.grad
        self.flat.grad = None
        return grad

    def train(self, mode: bool = True) -> None:
        self.template.train(mode)

    def map(self, fn, x: torch.Tensor, y: torch.Tensor, per_member_data: bool) -> torch.Tensor:
        """``fn(model_output, y)`` for every member, vmapped: (K, ...) results.

        Inside the vmapped call each member's tensors are put straight into the template's slots (what
        functional_call does, without its per-call name lookups and pytree work, which cost more than the forward
        of a small proxy) and the template's own tensors are put back afterwards. Parameters and multipliers
        enter vmap as one tensor each and are split inside, for the same reason.
        """
        data_dim = 0 if per_member_data else None

        def member(flat: torch.Tensor, buffers: tuple[torch.Tensor, ...], multipliers: torch.Tensor,
                   xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
            params = [part.view(shape) for part, shape in zip(flat.split(self.sizes), self.shapes)]
            _fill(self.slots, (*params, *buffers, *multipliers.unbind()))
            try:
                return fn(self.template(xs), ys)
            finally:
                _fill(self.slots, self.own)

        return vmap(member, in_dims=(0, 0, 0, data_dim, data_dim))(
            self.flat, tuple(self.buffers.values()), self.multipliers, x, y)

    def keep(self, index: torch.Tensor) -> None:
        """Keep only the members at ``index`` (positions in the current stack), in that order."""
        self.flat = self.flat.detach()[index].requires_grad_()
        self.buffers = {n: b[index] for n, b in self.buffers.items()}
        self.multipliers = self.multipliers[index]


def _fill(slots: list[list[Slot]], values: tuple[torch.Tensor, ...]) -> None:
    """Put each value in every place of its slots."""
    for places, value in zip(slots, values):
        for held, key in places:
            held[key] = value


def _get(model: nn.Module, name: str) -> float | torch.Tensor:
    module_name, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module_name), attr)


def _set(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(module_name), attr, value)
