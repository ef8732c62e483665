"""How a model uses its raw ``nn.Parameter`` matrices, seen by running one forward pass.

A raw matrix tells nothing in its shape about which dimension is its fan-in (``x @ W`` contracts
dim 0, ``x @ W.T`` and ``F.linear`` dim 1) or whether it is looked up like an embedding. This
trace follows each tracked tensor through transposes and casts, at the torch-function level, and
records the dimension each contraction sums over.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

LOOKUP = "lookup"
ELEMENTWISE = "elementwise"
_PASSTHROUGH = frozenset({"to", "float", "double", "half", "bfloat16", "type", "type_as", "contiguous", "clone",
                          "detach", "requires_grad_"})
_TRANSPOSES = frozenset({"t", "T", "mT", "transpose", "swapaxes", "swapdims", "permute"})
_MATMULS = frozenset({"matmul", "mm", "bmm", "__rmatmul__"})
_ADD_MATMULS = frozenset({"addmm", "baddbmm", "addbmm"})


@dataclass(frozen=True)
class Use:
    """``kind`` is "contract" (``dim`` is the fan-in dim of the parameter), "lookup" or "elementwise"."""

    kind: str
    dim: int | None = None


def _name(func: Any) -> str:
    if getattr(func, "__name__", "") == "__get__":  # a property such as Tensor.T
        return getattr(getattr(func, "__self__", None), "__name__", "")
    return getattr(func, "__name__", "")


def _permuted(func_name: str, args: tuple[Any, ...], perm: tuple[int, ...]) -> tuple[int, ...]:
    ndim = len(perm)
    if func_name in ("t", "T") or (func_name == "mT" and ndim == 2):
        return tuple(reversed(perm)) if ndim == 2 else perm
    if func_name == "permute":
        order = args[1] if len(args) == 2 and isinstance(args[1], (tuple, list)) else args[1:]
        return tuple(perm[d % ndim] for d in order)
    if func_name == "mT":
        return (*perm[:-2], perm[-1], perm[-2])
    a, b = (d % ndim for d in args[1:3])
    swapped = list(perm)
    swapped[a], swapped[b] = swapped[b], swapped[a]
    return tuple(swapped)


class _UsageTrace(TorchFunctionMode):
    def __init__(self, tracked: dict[int, str]) -> None:
        super().__init__()
        self.views: dict[int, tuple[str, tuple[int, ...]]] = {}
        self.alive: list[torch.Tensor] = []  # keeps views alive so their ids are not reused
        self.uses: dict[str, set[Use]] = {name: set() for name in tracked.values()}
        self.tracked = tracked

    def _view(self, t: Any) -> tuple[str, tuple[int, ...]] | None:
        if not isinstance(t, torch.Tensor):
            return None
        if id(t) in self.tracked:
            return self.tracked[id(t)], tuple(range(t.ndim))
        return self.views.get(id(t))

    def _contract(self, view: tuple[str, tuple[int, ...]], dim: int) -> None:
        name, perm = view
        self.uses[name].add(Use("contract", perm[dim % len(perm)]))

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _name(func)
        operands = [(i, view) for i, arg in enumerate(args) if (view := self._view(arg)) is not None]
        if not operands:
            return out
        first = operands[0][1]
        if name in _PASSTHROUGH or (name == "__getitem__" and isinstance(out, torch.Tensor)
                                    and out.ndim == len(first[1]) and not isinstance(args[1], torch.Tensor)):
            self._keep(out, first)
        elif name in _TRANSPOSES:
            self._keep(out, (first[0], _permuted(name, args, first[1])))
        elif name == "__getitem__" or name == "embedding":
            for _, view in operands:
                self.uses[view[0]].add(Use(LOOKUP))
        elif name == "linear":
            for i, view in operands:
                if i == 1:
                    self._contract(view, 1)
        elif name in _MATMULS or name in _ADD_MATMULS:
            left = 1 if name in _ADD_MATMULS else 0
            for i, view in operands:
                right = (i == left + 1) != (name == "__rmatmul__")
                if i >= left and len(view[1]) >= 2:
                    self._contract(view, -2 if right else -1)
        elif name == "einsum":
            self._einsum(args, operands)
        else:
            for _, view in operands:
                self.uses[view[0]].add(Use(ELEMENTWISE))
        return out

    def _keep(self, out: Any, view: tuple[str, tuple[int, ...]]) -> None:
        if isinstance(out, torch.Tensor):
            self.alive.append(out)
            self.views[id(out)] = view

    def _einsum(self, args: tuple[Any, ...], operands: list[tuple[int, tuple[str, tuple[int, ...]]]]) -> None:
        inputs, _, output = str(args[0]).replace(" ", "").partition("->")
        terms = inputs.split(",")
        for i, view in operands:
            letters = terms[i - 1] if i - 1 < len(terms) else ""
            summed = [d for d, letter in enumerate(letters) if letter not in output]
            if len(summed) == 1:
                self._contract(view, summed[0])
            else:
                self.uses[view[0]].add(Use(ELEMENTWISE))


def _call(model: nn.Module, example_input: Any) -> None:
    if isinstance(example_input, dict):
        model(**example_input)
    elif isinstance(example_input, tuple):
        model(*example_input)
    else:
        model(example_input)


def _to(example_input: Any, device: torch.device | str) -> Any:
    return tree_map(lambda v: v.to(device) if isinstance(v, torch.Tensor) else v, example_input)


def trace_uses(models: Iterator[nn.Module], names: list[str], example_input: Any) -> dict[str, set[Use]]:
    """Per parameter name, how one forward pass uses it; ``models`` yields the model on meta, then on CPU.

    The meta device costs nothing; a model whose forward needs real values (``.item()``, data-dependent
    control flow) is traced again on CPU, where ``models`` builds it on demand.
    """
    error: Exception | None = None
    for model in models:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        params = dict(model.named_parameters(remove_duplicate=False))
        trace = _UsageTrace({id(params[n]): n for n in names})
        try:
            with torch.no_grad(), trace:
                _call(model, _to(example_input, device))
        except Exception as exc:  # noqa: BLE001 - retried on the next device, reported if all fail
            error = exc
            continue
        return trace.uses
    raise ValueError(f"tracing the model with example_input failed: {error}") from error
