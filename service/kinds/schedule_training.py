"""How a schedule run trains: the phases planned when it was queued, with surgery, resuming from its checkpoint.

A run is an attempt whose params hold the planned phases and ``RUN_KEY`` = the run's id, which names its
checkpoint directory: every attempt of one run shares it, so a retry continues in the shape the lost attempt had
reached. ``ShapeScheduleKind.run_planned`` is how the worker reaches this; the worker records what it reports.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from scaletune.adaptive import Phase, phase_ends, run_schedule
from scaletune.data.base import DataSpec
from scaletune.data.registry import dataset_spec
from scaletune.models.registry import get_family
from scaletune.runner import TrialConfig
from scaletune.shapes import Shape
from scaletune.train import EvalPoint, TrainResult
from service.kinds.setup import base_config
from service.models import TrialAttempt
from service.settings import Settings
from service.spec import ResolvedShapeSchedule

RUN_KEY = "schedule_run"  # in an attempt's params: the id of the schedule run it executes (not a grid point)


def is_schedule_run(params: dict[str, Any] | None) -> bool:
    return params is not None and RUN_KEY in params


def phases_of(params: dict[str, Any]) -> list[Phase]:
    return [Phase(Shape.from_dict(p["shape"]), float(p["until_flops"])) for p in params["phases"]]


def run_config(spec: ResolvedShapeSchedule, params: dict[str, Any]) -> TrialConfig:
    """The first phase's shape with the study's setup; run_schedule sets the steps from the phases."""
    return base_config(spec, phases_of(params)[0].shape, spec.budget.to_budget(schedule="wsd"),
                       dict(spec.hyperparameters), int(params["seed"]))


def step_ends(config: TrialConfig, phases: list[Phase], data: DataSpec) -> list[int]:
    """The step at which each phase ends, as the adaptive run counts them."""
    family = get_family(config.family)

    def flops_per_step(shape: Shape) -> float:
        return config.budget.batch_size * family.train_flops_per_sample(shape, data, config.args)

    return phase_ends(phases, flops_per_step)


def phase_at(ends: list[int]) -> Callable[[int], int]:
    """The phase an eval after ``step`` steps is taken in (the eval at a phase's last step precedes its surgery)."""
    return lambda step: min(bisect_left(ends, step), len(ends) - 1)


def checkpoint_dir(artifacts: Path, study_id: str, params: dict[str, Any]) -> Path:
    return artifacts / study_id / str(params[RUN_KEY])


def run_planned_schedule(spec: ResolvedShapeSchedule, attempt: TrialAttempt, settings: Settings,
                         record: Callable[[dict[str, Any]], bool]) -> TrainResult:
    """Train the attempt's planned schedule, passing each eval point with its phase and shape to ``record``
    (True: stop now)."""
    assert attempt.params is not None and settings.ARTIFACTS_DIR is not None
    config, phases = run_config(spec, attempt.params), phases_of(attempt.params)
    data = dataset_spec(config.dataset, config.dataset_args, settings.DATA_ROOT)
    phase = phase_at(step_ends(config, phases, data))

    def on_eval(point: EvalPoint) -> bool:
        index = phase(point.step)
        return record({**asdict(point), "phase": index, "shape": phases[index].shape.to_dict()})

    return run_schedule(config, phases, checkpoint_dir(settings.ARTIFACTS_DIR, attempt.study_id, attempt.params),
                        on_eval, data_root=settings.DATA_ROOT).train
