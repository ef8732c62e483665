"""Optuna's RDB storage in our database, and creating and deleting a study's Optuna study in it."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import optuna
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages._cached_storage import _CachedStorage, _StudyInfo
from optuna.storages._rdb import models as optuna_models
from optuna.trial import FrozenTrial, TrialState as OptunaState
from sqlalchemy import func, select

from service.models import TrialState
from service.settings import SQLITE_BUSY_TIMEOUT_S, is_sqlite, normalise_database_url

optuna.logging.set_verbosity(optuna.logging.WARNING)
_COUNTED = (optuna_models.TrialParamModel, optuna_models.TrialIntermediateValueModel,
            optuna_models.TrialSystemAttributeModel, optuna_models.TrialUserAttributeModel)


def _signature(trial: FrozenTrial) -> tuple[Any, ...]:
    """What changes when a trial is written: its state and how many params, intermediate values and attributes."""
    return (trial.state, len(trial.params), len(trial.intermediate_values), len(trial.system_attrs),
            len(trial.user_attrs))


class ChangedTrialsStorage(_CachedStorage):
    """Optuna's cached storage that re-reads only the unfinished trials written since it last read them.

    Optuna's own re-reads every unfinished trial, with all its params, values and attributes, on every
    sampler and pruner call: with 64 trials out that was ~250 ms of every ask, report and tell (profile in
    docs/benchmarks.md). One light query of the unfinished trials' states and counts finds the ones any process
    wrote since (the database is the truth), and only those, and trials new since, are read. Study ids are
    kept by name: a name is a study's for its whole life.
    """

    def __init__(self, backend: RDBStorage) -> None:
        super().__init__(backend)
        self._read_up_to: dict[int, int] = {}
        self._ids_by_name: dict[str, int] = {}

    def get_study_id_from_name(self, study_name: str) -> int:
        known = self._ids_by_name.get(study_name)
        if known is None:
            known = self._ids_by_name[study_name] = super().get_study_id_from_name(study_name)
        return known

    def delete_study(self, study_id: int) -> None:
        self._ids_by_name = {name: id_ for name, id_ in self._ids_by_name.items() if id_ != study_id}
        self._read_up_to.pop(study_id, None)
        super().delete_study(study_id)

    def _written_since_read(self, study: _StudyInfo) -> set[int]:
        trial = optuna_models.TrialModel
        counts = [select(func.count()).where(model.trial_id == trial.trial_id).correlate(trial).scalar_subquery()
                  for model in _COUNTED]
        query = select(trial.trial_id, trial.state, *counts).where(trial.trial_id.in_(study.unfinished_trial_ids))
        with self._backend.engine.connect() as connection:
            rows = connection.execute(query).all()
        cached = {trial_id: study.trials[self._trial_id_to_study_id_and_number[trial_id][1]]
                  for trial_id in study.unfinished_trial_ids}
        return {row[0] for row in rows if tuple(row[1:]) != _signature(cached[row[0]])}

    def _read_trials_from_remote_storage(self, study_id: int) -> None:
        with self._lock:
            study = self._studies.setdefault(study_id, _StudyInfo())
            written = self._written_since_read(study) if study.unfinished_trial_ids else set()
            trials = self._backend._get_trials(study_id, states=None, included_trial_ids=written,
                                               trial_id_greater_than=self._read_up_to.get(study_id, -1))
            self._add_trials_to_cache(study_id, trials)
            for trial in trials:
                self._read_up_to[study_id] = max(self._read_up_to.get(study_id, -1), trial._trial_id)
                if trial.state.is_finished():
                    study.unfinished_trial_ids.discard(trial._trial_id)
                    study.last_finished_trial_id = max(study.last_finished_trial_id, trial._trial_id)
                else:
                    study.unfinished_trial_ids.add(trial._trial_id)


@lru_cache(maxsize=8)
def get_storage(url: str) -> BaseStorage:
    """One storage per process and URL: building it checks (and on first use creates) Optuna's schema.

    Wrapped in a cache of trials (ChangedTrialsStorage) kept for the whole process: without one every task's
    sampler re-read every trial from the database (bench/service_overhead.py measured ~100 ms per ask at 20
    trials).
    """
    url = normalise_database_url(url)
    engine_kwargs: dict[str, Any] = (
        {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}} if is_sqlite(url) else {"pool_pre_ping": True})
    return ChangedTrialsStorage(RDBStorage(url, engine_kwargs=engine_kwargs))


NAME_PREFIX = "scaletune-"
CREATED_AT = "scaletune_created_at"  # a system attribute: Optuna keeps no creation time of its own


def optuna_study_name(study_id: str) -> str:
    return f"{NAME_PREFIX}{study_id}"


def stamp_created_at(storage: BaseStorage, name: str, when: datetime) -> None:
    storage.set_study_system_attr(storage.get_study_id_from_name(name), CREATED_AT, when.isoformat())


def created_at(storage: BaseStorage, name: str) -> datetime | None:
    """When the study was stamped (at creation, or first seen as an orphan); None if never."""
    stamped = storage.get_study_system_attrs(storage.get_study_id_from_name(name)).get(CREATED_AT)
    return None if stamped is None else datetime.fromisoformat(stamped)


def create_optuna_study(storage: BaseStorage, name: str, direction: str, enqueued: list[dict[str, Any]]) -> None:
    """Create the Optuna study, stamped with the time, and queue the points it hands out first, each to one ``ask()``."""
    study = optuna.create_study(storage=storage, study_name=name, direction=direction)
    stamp_created_at(storage, name, datetime.now(UTC))
    for point in enqueued:
        study.enqueue_trial(point)


def delete_optuna_study(storage: BaseStorage, name: str) -> None:
    optuna.delete_study(study_name=name, storage=storage)


def failure_value(direction: str) -> float:
    """What a diverged trial tells Optuna: the worst possible value, so samplers learn to avoid the region."""
    return math.inf if direction == "minimize" else -math.inf


def tell_outcome(study: optuna.Study, trial: optuna.Trial | int, direction: str, state: TrialState,
                 value: float | None) -> None:
    """Tell Optuna how an attempt ended (its value, PRUNED, the worst value for a diverged one, else FAIL)."""
    match state:
        case TrialState.complete:
            study.tell(trial, value, skip_if_finished=True)
        case TrialState.diverged:
            study.tell(trial, failure_value(direction), skip_if_finished=True)
        case TrialState.pruned:
            study.tell(trial, state=OptunaState.PRUNED, skip_if_finished=True)
        case _:
            study.tell(trial, state=OptunaState.FAIL, skip_if_finished=True)
