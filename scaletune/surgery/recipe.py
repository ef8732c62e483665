"""What a shape change carries: a recipe to build the model at any shape, and the model mid-training.

Surgery never re-derives the muP rules: it builds the new shape through ``make_plan``/``apply_plan``
(which set multipliers and parameter groups) and then overwrites every inherited parameter, so the new
model's optimizer groups are exactly the plan's at the new shape.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from scaletune.hparams import HParams
from scaletune.parametrize import (
    Classification, Factory, ParamOptions, Plan, apply_plan, classify, make_optimizer, make_plan,
)
from scaletune.shapes import Shape

OptimizerState = dict[str, Any]


@dataclass(frozen=True)
class Recipe:
    """How to build the model at any shape in its parametrization (everything but the weights)."""

    build: Callable[[Shape], nn.Module]
    base: Shape
    parametrization: str
    hparams: HParams
    optimizer: str = "adamw"
    options: ParamOptions = field(default_factory=ParamOptions)

    def factory(self, shape: Shape) -> Factory:
        """The ``(width, depth) -> model`` builder for ``classify``; other shape fields stay ``shape``'s."""
        return lambda width, depth: self.build(shape.with_(width=width, depth=depth))

    def classify(self, shape: Shape) -> Classification:
        return classify(self.factory(shape), self.base, shape)

    def plan(self, shape: Shape) -> Plan:
        return make_plan(self.classify(shape), self.parametrization, self.hparams, self.optimizer, self.options)

    def start(self, shape: Shape, device: str | torch.device = "cpu") -> Trainee:
        """A freshly initialised model at ``shape`` with its optimizer (no state yet)."""
        return self.transplant(shape, {}, {}, {}, device)

    def transplant(self, shape: Shape, params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor],
                   state: Mapping[str, OptimizerState], device: str | torch.device) -> Trainee:
        """Build ``shape`` per its plan, then overwrite the named parameters, buffers and optimizer state.

        Parameters not in ``params`` keep the plan's fresh initialisation and start with empty optimizer
        state (Adam's bias correction then treats them as new).
        """
        plan = self.plan(shape)
        with torch.device(device):
            model = self.build(shape)
        groups = apply_plan(model, plan)
        named = dict(model.named_parameters())
        own_buffers = dict(model.named_buffers())
        unknown = sorted((set(params) - set(named)) | (set(buffers) - set(own_buffers)))
        if unknown:
            raise ValueError(f"the model at {shape} has no tensors named {unknown[:5]}")
        with torch.no_grad():
            for name, value in params.items():
                named[name].copy_(value)
            for name, value in buffers.items():
                own_buffers[name].copy_(value)
        optimizer = make_optimizer(groups, self.optimizer, self.hparams)
        for name, param_state in state.items():
            optimizer.state[named[name]] = {k: v.to(device, copy=True) if torch.is_tensor(v) else v
                                            for k, v in param_state.items()}
        return Trainee(shape, model, plan, optimizer)


@dataclass
class Trainee:
    """A model mid-training at one shape: its plan and its optimizer (with state) belong to that shape."""

    shape: Shape
    model: nn.Module
    plan: Plan
    optimizer: torch.optim.Optimizer

    def named_state(self) -> dict[str, OptimizerState]:
        """Optimizer state keyed by parameter name (a tied tensor appears once, under its first name)."""
        return {name: dict(self.optimizer.state[p]) for name, p in self.model.named_parameters()
                if p in self.optimizer.state}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device
