"""What grid kinds (transfer_check, shape_schedule) share with the worker: the Optuna grid and each trial's setup."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.storages import BaseStorage

from scaletune.runner import TrialConfig
from service.kinds import shape_schedule, transfer_check
from service.kinds.setup import GridSpec
from service.spec import TransferCheckSpec


def grid_points(spec: GridSpec) -> list[dict[str, Any]]:
    if isinstance(spec, TransferCheckSpec):
        return transfer_check.grid_points(spec)
    return shape_schedule.grid_points(spec)


def grid_distributions(spec: GridSpec) -> dict[str, BaseDistribution]:
    if isinstance(spec, TransferCheckSpec):
        return transfer_check.distributions(spec)
    return shape_schedule.distributions(spec)


def load_grid_study(storage: BaseStorage, name: str, retried_params: dict[str, Any] | None) -> optuna.Study:
    """The study with every grid point enqueued; ``ask()`` pops the next one atomically. Nothing is pruned.

    A retry puts the failed attempt's point back in the queue and runs the next waiting point: every point
    still runs exactly once, whatever order attempts fail in.
    """
    study = optuna.load_study(study_name=name, storage=storage, pruner=optuna.pruners.NopPruner())
    if retried_params:
        study.enqueue_trial(retried_params)
    return study


def grid_trial_config(spec: GridSpec, params: dict[str, Any]) -> TrialConfig:
    if isinstance(spec, TransferCheckSpec):
        return transfer_check.trial_config(spec, params)
    return shape_schedule.trial_config(spec, params)
