"""Optuna's RDB storage in our database, and creating and deleting a study's Optuna study in it."""

from __future__ import annotations

import copy
import json
import math
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, distribution_to_json
from optuna.storages import BaseStorage, RDBStorage
from optuna.storages._cached_storage import _CachedStorage, _StudyInfo
from optuna.storages._rdb import models as optuna_models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import FrozenTrial, TrialState as OptunaState
from sqlalchemy import func, insert, select

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
    wrote since (the database is the truth), and only those, and trials new since, are read. What this storage
    writes in batches (a pack's new trials, reports and states) goes into the cache as well, so it reads back
    only what others wrote (re-reading a pack's 16 trials cost ~10 ms on the way to the next pack). Study ids
    are kept by name: a name is a study's for its whole life.
    """

    def __init__(self, backend: RDBStorage) -> None:
        super().__init__(backend)
        self._read_up_to: dict[int, int] = {}
        self._ids_by_name: dict[str, int] = {}
        self._fresh: dict[int, FrozenTrial] = {}
        self._deferred = threading.local()

    def create_new_trials(self, study_id: int, templates: list[FrozenTrial]) -> list[int]:
        """Running trials with the templates' params and attributes, written in one transaction of a few
        statements (Optuna's ``create_new_trial`` spends ~10 round trips on each); the ``optuna.Trial`` built next
        for each takes it from here instead of reading it back. The templates become the cached trials (numbered,
        with their ids): the caller hands them over."""
        trial = optuna_models.TrialModel
        with _create_scoped_session(self._backend.scoped_session) as session:
            optuna_models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)  # numbers are counts
            first = session.scalar(select(func.count(trial.trial_id)).where(trial.study_id == study_id)) or 0
            rows = [trial(study_id=study_id, number=first + i, state=OptunaState.RUNNING,
                          datetime_start=template.datetime_start) for i, template in enumerate(templates)]
            session.add_all(rows)
            session.flush()
            for model, values in _trial_children([row.trial_id for row in rows], templates).items():
                if values:
                    session.execute(insert(model), values)
            created = [(row.trial_id, row.number) for row in rows]
        for (trial_id, number), template in zip(created, templates):
            template.number, template._trial_id = number, trial_id
        with self._lock:
            study = self._studies.setdefault(study_id, _StudyInfo())
            if created and first == len(study.trials):  # every earlier trial cached: none up to these left to read
                study.unfinished_trial_ids.update(  # those cached unread are checked by signature from now on
                    t._trial_id for t in study.trials.values() if not t.state.is_finished())
                self._read_up_to[study_id] = created[-1][0]
            self._add_trials_to_cache(study_id, templates)
            study.unfinished_trial_ids.update(trial_id for trial_id, _ in created)
        self._fresh.update({frozen._trial_id: copy.deepcopy(frozen) for frozen in templates})
        return [trial_id for trial_id, _ in created]

    def get_trial(self, trial_id: int) -> FrozenTrial:
        fresh = self._fresh.pop(trial_id, None)
        if fresh is None:
            fresh = getattr(self._deferred, "told", {}).get(trial_id)
        return fresh if fresh is not None else super().get_trial(trial_id)

    def set_trial_state_values(self, trial_id: int, state: OptunaState,
                               values: Sequence[float] | None = None) -> bool:
        pending: list[tuple[int, OptunaState, Sequence[float] | None]] | None = getattr(self._deferred, "states", None)
        if pending is None or trial_id not in self._deferred.told:
            return super().set_trial_state_values(trial_id, state, values)
        pending.append((trial_id, state, values))
        return True

    @contextmanager
    def told_together(self, trial_ids: list[int]) -> Iterator[None]:
        """Inside, ``Study.tell`` of these trials reads them from one refresh of the cache, and their new states
        wait for the way out, where one transaction writes them (a pack tells K trials; each tell over the RDB
        storage reads its trial twice and writes it once, ~15 ms)."""
        self._deferred.told, self._deferred.states = {}, []
        try:
            if trial_ids:
                study_id = self._trial_id_to_study_id_and_number[trial_ids[0]][0]
                current = {trial._trial_id: trial for trial in self.get_all_trials(study_id, deepcopy=False)}
                self._deferred.told = {trial_id: current[trial_id] for trial_id in trial_ids}
            yield
            self._write_states(self._deferred.states)
        finally:
            self._deferred.told, self._deferred.states = {}, None

    def _write_states(self, states: list[tuple[int, OptunaState, Sequence[float] | None]]) -> None:
        """``set_trial_state_values`` to a finished state for each, in one transaction; a trial finished
        meanwhile (by another process) keeps its state, as ``tell(skip_if_finished=True)`` would."""
        if not states:
            return
        trial, value_row = optuna_models.TrialModel, optuna_models.TrialValueModel
        now = datetime.now()  # Optuna's own timestamps are naive local time
        written = []
        with _create_scoped_session(self._backend.scoped_session) as session:
            rows = {row.trial_id: row for row in session.scalars(
                select(trial).where(trial.trial_id.in_([trial_id for trial_id, _, _ in states])).with_for_update())}
            for trial_id, state, values in states:
                row = rows[trial_id]
                if row.state.is_finished():
                    continue
                for objective, value in enumerate(values or []):
                    stored, kind = value_row.value_to_stored_repr(value)
                    session.add(value_row(trial_id=trial_id, objective=objective, value=stored, value_type=kind))
                row.state, row.datetime_complete = state, now
                written.append((trial_id, state, values))
        with self._lock:
            for trial_id, state, values in written:
                self._update_cached(trial_id, state=state, values=None if values is None else list(values),
                                    datetime_complete=now)

    def set_trial_intermediate_value(self, trial_id: int, step: int, intermediate_value: float) -> None:
        pending: list[tuple[int, int, float]] | None = getattr(self._deferred, "reports", None)
        if pending is None:
            super().set_trial_intermediate_value(trial_id, step, intermediate_value)
        else:
            pending.append((trial_id, step, intermediate_value))

    @contextmanager
    def reports_deferred(self) -> Iterator[None]:
        """Inside, this thread's ``Trial.report`` values wait for ``write_reports`` (or the way out): a pack's
        members report an eval each, and one transaction for all K costs about what one report does."""
        self._deferred.reports = []
        try:
            yield
            self.write_reports()
        finally:
            self._deferred.reports = None

    def write_reports(self) -> None:
        """Write the deferred reports in one transaction; a trial finished meanwhile (taken by the reconciler)
        keeps what it has, as ``Trial.report`` would have refused the value."""
        pending, self._deferred.reports = self._deferred.reports, []
        if not pending:
            return
        trial, value_row = optuna_models.TrialModel, optuna_models.TrialIntermediateValueModel
        with _create_scoped_session(self._backend.scoped_session) as session:
            running = set(session.scalars(select(trial.trial_id).where(
                trial.trial_id.in_({trial_id for trial_id, _, _ in pending}), trial.state == OptunaState.RUNNING)))
            for trial_id, step, value in pending:
                if trial_id in running:
                    stored, kind = value_row.intermediate_value_to_stored_repr(value)
                    session.add(value_row(trial_id=trial_id, step=step, intermediate_value=stored,
                                          intermediate_value_type=kind))
        with self._lock:
            for trial_id, step, value in pending:
                if trial_id in running:
                    self._update_cached(trial_id, intermediate=(step, value))

    def _update_cached(self, trial_id: int, intermediate: tuple[int, float] | None = None,
                       **changes: Any) -> None:
        """Apply what this storage just wrote of an unfinished trial to its cached copy (under the lock), so its
        signature matches the database's and it is not read back; a trial not cached is read when next asked for."""
        place = self._trial_id_to_study_id_and_number.get(trial_id)
        if place is None:
            return
        study = self._studies[place[0]]
        cached = study.trials[place[1]]
        if cached.state.is_finished():
            return
        if intermediate is not None:
            cached.intermediate_values[intermediate[0]] = intermediate[1]
        for name, value in changes.items():
            setattr(cached, name, value)
        if cached.state.is_finished():
            study.unfinished_trial_ids.discard(trial_id)
            study.last_finished_trial_id = max(study.last_finished_trial_id, trial_id)

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


def _trial_children(trial_ids: list[int], templates: list[FrozenTrial]) -> dict[type, list[dict[str, Any]]]:
    """The rows of Optuna's params and attribute tables for these trials (what its ``_create_new_trial`` writes)."""
    rows: dict[type, list[dict[str, Any]]] = {optuna_models.TrialParamModel: [],
                                              optuna_models.TrialSystemAttributeModel: [],
                                              optuna_models.TrialUserAttributeModel: []}
    for trial_id, template in zip(trial_ids, templates):
        rows[optuna_models.TrialParamModel] += [
            {"trial_id": trial_id, "param_name": name, "param_value": template.distributions[name].to_internal_repr(value),
             "distribution_json": distribution_to_json(template.distributions[name])}
            for name, value in template.params.items()]
        for model, attrs in ((optuna_models.TrialSystemAttributeModel, template.system_attrs),
                             (optuna_models.TrialUserAttributeModel, template.user_attrs)):
            rows[model] += [{"trial_id": trial_id, "key": key, "value_json": json.dumps(value)}
                            for key, value in attrs.items()]
    return rows


@lru_cache(maxsize=8)
def get_storage(url: str) -> ChangedTrialsStorage:
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


def ask_together(study: optuna.Study, distributions: dict[str, BaseDistribution], n: int) -> list[optuna.Trial]:
    """``n`` trials, as ``study.ask`` one after another hands them out (each sees the earlier ones running: TPE's
    constant liar), sampled on an in-memory copy of the study and written in one transaction: over the RDB
    storage each ask costs ~30 ms of queries. A study with enqueued points left asks one by one (Optuna hands
    those out by claiming their stored rows)."""
    storage = study._storage
    trials = study.get_trials(deepcopy=False)
    if not isinstance(storage, ChangedTrialsStorage) or any(t.state == OptunaState.WAITING for t in trials):
        return [study.ask(distributions) for _ in range(n)]
    scratch = optuna.create_study(directions=study.directions, sampler=study.sampler)
    study_attrs = storage.get_study_system_attrs(study._study_id)
    for key, value in study_attrs.items():  # a sampler's own state (QMC counts its points here)
        scratch._storage.set_study_system_attr(scratch._study_id, key, value)
    scratch.add_trials(trials)
    templates = [scratch._storage.get_trial(scratch.ask(distributions)._trial_id) for _ in range(n)]  # handed over
    for key, value in scratch._storage.get_study_system_attrs(scratch._study_id).items():
        if study_attrs.get(key) != value:
            storage.set_study_system_attr(study._study_id, key, value)
    return [optuna.Trial(study, trial_id) for trial_id in storage.create_new_trials(study._study_id, templates)]


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
