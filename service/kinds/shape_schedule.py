"""shape_schedule: shapes along one axis x proxy sizes x seeds x compute budgets, each a WSD run to its budget."""

from __future__ import annotations

from typing import Any

from optuna.distributions import BaseDistribution, IntDistribution

from scaletune.runner import TrialConfig
from scaletune.shapes import Shape
from scaletune.train import Budget
from service.kinds.setup import base_config
from service.spec import ShapeScheduleSpec

GRID_AXES = ("value_index", "size_index", "seed", "budget_index")


def grid_points(spec: ShapeScheduleSpec) -> list[dict[str, Any]]:
    """Seed by seed and smallest budget first, so a study cut short still has whole curves."""
    return [{"value_index": v, "size_index": s, "seed": seed, "budget_index": b}
            for seed in range(spec.seeds) for b in range(len(spec.budgets))
            for s in range(len(spec.sizes)) for v in range(len(spec.values))]


def distributions(spec: ShapeScheduleSpec) -> dict[str, BaseDistribution]:
    counts = {"value_index": len(spec.values), "size_index": len(spec.sizes), "seed": spec.seeds,
              "budget_index": len(spec.budgets)}
    return {name: IntDistribution(0, counts[name] - 1) for name in GRID_AXES}


def base_shape(spec: ShapeScheduleSpec) -> Shape:
    assert spec.model is not None, "resolve the source first"
    return Shape(**spec.model.base.model_dump())


def trial_shape(spec: ShapeScheduleSpec, params: dict[str, Any]) -> Shape:
    return spec.shape_at(base_shape(spec), spec.values[int(params["value_index"])],
                         spec.sizes[int(params["size_index"])])


def trial_config(spec: ShapeScheduleSpec, params: dict[str, Any]) -> TrialConfig:
    """A WSD run with its own cooldown ending exactly at its budget, evaluated once at the end."""
    assert spec.budget is not None, "resolve the source first"
    steps = spec.budgets[int(params["budget_index"])]
    budget = Budget(steps=steps, batch_size=spec.budget.batch_size, eval_every=steps, schedule="wsd")
    return base_config(spec, trial_shape(spec, params), budget, dict(spec.hyperparameters), int(params["seed"]))
