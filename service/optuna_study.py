"""Optuna's RDB storage in our database, and creating and deleting a study's Optuna study in it."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import optuna
from optuna.storages import BaseStorage, RDBStorage
from optuna.trial import TrialState as OptunaState

from service.models import TrialState
from service.settings import SQLITE_BUSY_TIMEOUT_S, is_sqlite, normalise_database_url

optuna.logging.set_verbosity(optuna.logging.WARNING)


@lru_cache(maxsize=8)
def get_storage(url: str) -> BaseStorage:
    """One storage per process and URL: building it checks (and on first use creates) Optuna's schema.

    Wrapped in Optuna's own cache of finished trials (what ``optuna.load_study(storage=url)`` does), kept
    for the whole process: without it every task's sampler re-read every trial from the database
    (bench/service_overhead.py measured ~100 ms per ask at 20 trials).
    """
    url = normalise_database_url(url)
    engine_kwargs: dict[str, Any] = (
        {"connect_args": {"timeout": SQLITE_BUSY_TIMEOUT_S}} if is_sqlite(url) else {"pool_pre_ping": True})
    return optuna.storages.get_storage(RDBStorage(url, engine_kwargs=engine_kwargs))


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
