"""AdamW and SGD over a pack's flat (K, N) parameters, each member with its own settings.

The arithmetic follows torch.optim's single-tensor AdamW and SGD step by step (per-group products such as
lr * weight_decay in float64, as torch computes them in Python, then applied in the parameters' dtype), so a
member moves as it would alone. Per-parameter settings (lr, weight decay, eps) are (K, P) tensors over the P
parameter tensors, spread over the (K, N) elements when applied; per-member ones (betas, momentum) are (K, 1).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from scaletune.hparams import HParams
from scaletune.packs.stack import PackedModel
from scaletune.parametrize import OPTIMIZERS

GROUP_SETTINGS = ("lr", "weight_decay", "eps")


def settings_by_name(model: nn.Module, param_groups: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{setting: {parameter name: value}} from a model's optimizer groups."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, dict[str, float]] = {s: {} for s in GROUP_SETTINGS}
    for group in param_groups:
        for p in group["params"]:
            for s in GROUP_SETTINGS:
                out[s][name_of[id(p)]] = float(group[s])
    return out


class PackOptimizer(ABC):
    """One optimizer for every member; ``keep`` follows the pack when members leave."""

    def __init__(self, packed: PackedModel, settings: list[dict[str, dict[str, float]]],
                 hparams: list[HParams]) -> None:
        self.packed = packed
        self.steps = 0
        self.group = {s: packed.per_parameter([member[s] for member in settings]) for s in GROUP_SETTINGS}
        self.state = self.initial_state(hparams)

    def column(self, values: list[float]) -> torch.Tensor:
        """A (K, 1) float64 per-member setting."""
        return torch.tensor(values, dtype=torch.float64, device=self.packed.flat.device)[:, None]

    @abstractmethod
    def initial_state(self, hparams: list[HParams]) -> dict[str, torch.Tensor]:
        """Per-member settings and state, keyed by name, first dim K."""

    @abstractmethod
    def update(self, param: torch.Tensor, grad: torch.Tensor, lr: torch.Tensor) -> None:
        """Apply one step to ``param`` (K, N) in place; ``lr`` is (K, P) float64, already scheduled."""

    @torch.no_grad()
    def step(self, grad: torch.Tensor, lr_factors: torch.Tensor) -> None:
        """One update of every member; ``lr_factors`` (K,) is each member's schedule factor this step."""
        self.steps += 1
        self.update(self.packed.flat, grad, self.group["lr"] * lr_factors.to(self.group["lr"])[:, None])

    def keep(self, index: torch.Tensor) -> None:
        self.group = {n: t[index] for n, t in self.group.items()}
        self.state = {n: t[index] for n, t in self.state.items()}

    @abstractmethod
    def state_of(self, pos: int) -> dict[str, dict[str, torch.Tensor]]:
        """The member at ``pos``'s state as torch.optim keeps it per parameter: {parameter name: state}."""

    def export(self, pos: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Give ``optimizer`` (over ``model``'s parameters) the state of the member at ``pos``."""
        for name, state in self.state_of(pos).items():
            optimizer.state[model.get_parameter(name)] = state


class PackAdamW(PackOptimizer):
    def initial_state(self, hparams: list[HParams]) -> dict[str, torch.Tensor]:
        flat = self.packed.flat
        betas = torch.cat([self.column([h.beta1 for h in hparams]), self.column([h.beta2 for h in hparams])], dim=1)
        return {"betas": betas, "eps": self.packed.expand(self.group["eps"]),
                # the betas' per-step casts to the parameters' dtype, made once
                "one_minus_beta1": (1 - betas[:, :1]).to(flat.dtype), "beta2": betas[:, 1:].to(flat.dtype),
                "one_minus_beta2": (1 - betas[:, 1:]).to(flat.dtype),
                "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}

    def update(self, param: torch.Tensor, grad: torch.Tensor, lr: torch.Tensor) -> None:
        s, dtype = self.state, param.dtype
        corrections = 1 - s["betas"] ** self.steps  # (K, 2) float64: the bias corrections of both moments
        param.mul_(self.packed.expand(1 - lr * self.group["weight_decay"]))
        step_size = self.packed.expand(-lr / corrections[:, :1])
        s["exp_avg"].lerp_(grad, s["one_minus_beta1"])
        s["exp_avg_sq"].mul_(s["beta2"]).addcmul_(grad * s["one_minus_beta2"], grad)
        denom = (s["exp_avg_sq"].sqrt() / (corrections[:, 1:] ** 0.5).to(dtype)).add_(s["eps"])
        param.addcdiv_(s["exp_avg"] * step_size, denom)

    def state_of(self, pos: int) -> dict[str, dict[str, torch.Tensor]]:
        split = self.packed.split
        avg, avg_sq = split(self.state["exp_avg"][pos].clone()), split(self.state["exp_avg_sq"][pos].clone())
        return {name: {"step": torch.tensor(float(self.steps)), "exp_avg": avg[name], "exp_avg_sq": avg_sq[name]}
                for name in avg}


class PackSGD(PackOptimizer):
    def initial_state(self, hparams: list[HParams]) -> dict[str, torch.Tensor]:
        return {"momentum": self.column([h.momentum for h in hparams]),
                "weight_decay": self.packed.expand(self.group["weight_decay"])}

    def update(self, param: torch.Tensor, grad: torch.Tensor, lr: torch.Tensor) -> None:
        s = self.state
        grad = grad + s["weight_decay"] * param
        if "buffer" in s:
            s["buffer"].mul_(s["momentum"].to(param.dtype)).add_(grad)
        else:
            s["buffer"] = grad.clone()
        param.add_(self.packed.expand(-lr) * s["buffer"])

    def state_of(self, pos: int) -> dict[str, dict[str, torch.Tensor]]:
        if "buffer" not in self.state or float(self.state["momentum"][pos]) == 0.0:  # torch keeps no buffer then
            return {}
        return {name: {"momentum_buffer": buffer}
                for name, buffer in self.packed.split(self.state["buffer"][pos].clone()).items()}


PACK_OPTIMIZERS: dict[str, type[PackOptimizer]] = {"adamw": PackAdamW, "sgd": PackSGD}


def make_pack_optimizer(name: str, packed: PackedModel, settings: list[dict[str, dict[str, float]]],
                        hparams: list[HParams]) -> PackOptimizer:
    if name not in PACK_OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")
    return PACK_OPTIMIZERS[name](packed, settings, hparams)
