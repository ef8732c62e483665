"""What running one attempt and running a pack share: the worker's context, the heartbeat, asking and telling Optuna,
outcomes."""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import optuna
from celery.worker import state as celery_worker_state
from optuna.storages import BaseStorage

from scaletune.train import TrainResult
from service.db import SessionFactory, create_db_engine, make_session_factory
from service.kinds.base import StudyKind
from service.models import TrialAttempt, TrialState
from service.optuna_study import ChangedTrialsStorage, ask_together, tell_outcome
from service.queue import Enqueue
from service.settings import Settings
from service.trials import Outcome, heartbeat

log = logging.getLogger(__name__)


class RecentIds:
    """The last ``limit`` ids added, oldest forgotten first: a pack member's own task may go to another worker and
    never come here, so an unbounded set would grow for the worker's whole life."""

    def __init__(self, limit: int = 4096) -> None:
        self._ids: dict[str, None] = {}
        self._limit = limit

    def add(self, ids: Iterable[str]) -> None:
        self._ids.update(dict.fromkeys(ids))
        for oldest in list(itertools.islice(self._ids, max(0, len(self._ids) - self._limit))):
            del self._ids[oldest]

    def take(self, id_: str) -> bool:
        """Whether ``id_`` was here (it is forgotten now)."""
        if id_ not in self._ids:
            return False
        del self._ids[id_]
        return True


def never() -> bool:
    return False


def celery_worker_is_running() -> bool:
    """False once a warm or cold shutdown began: Celery's signal handlers set these to the exit code, which may be
    0 (so ``in (None, False)`` would not do: 0 == False)."""
    return all(flag is None or flag is False
               for flag in (celery_worker_state.should_stop, celery_worker_state.should_terminate))


@dataclass(frozen=True)
class WorkerContext:
    """What a task needs from its process: settings, database sessions, a way to send follow-up tasks, the
    attempts this process claimed whose own tasks have not come yet (``pack_members``), and whether a task should
    go on with its study's next queued attempts when its own are done (``carry_on``; off where nothing can stop it,
    as when a test calls a task's function)."""

    settings: Settings
    session_factory: SessionFactory
    enqueue: Enqueue
    pack_members: RecentIds = field(default_factory=RecentIds, compare=False)
    carry_on: Callable[[], bool] = field(default=never, compare=False)

    @classmethod
    def from_settings(cls, settings: Settings, enqueue: Enqueue, carry_on: Callable[[], bool] = never) -> WorkerContext:
        return cls(settings, make_session_factory(create_db_engine(settings.DATABASE_URL)), enqueue,
                   carry_on=carry_on)


class Heartbeat:
    """Refreshes the attempts' leases in a thread (one UPDATE for a whole pack); notices attempts the reconciler
    has taken away: ``lost_ids`` names them, ``lost`` is set once any is lost."""

    def __init__(self, session_factory: SessionFactory, attempt_ids: list[str], interval_s: float) -> None:
        self.lost = threading.Event()
        self.lost_ids: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(session_factory, attempt_ids, interval_s),
                                        name=f"heartbeat-{attempt_ids[0]}", daemon=True)

    def _run(self, session_factory: SessionFactory, attempt_ids: list[str], interval_s: float) -> None:
        ours = list(attempt_ids)
        while ours and not self._stop.wait(interval_s):
            try:
                kept = heartbeat(session_factory, ours)
            except Exception:
                log.exception("heartbeat for attempts %s failed; will try again", ours)
                continue
            self.lost_ids.update(set(ours) - kept)
            ours = [attempt_id for attempt_id in ours if attempt_id in kept]
            if self.lost_ids:
                self.lost.set()

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


def outcome_of(result: TrainResult, stop_reason: TrialState | None) -> Outcome:
    common = {"flops": result.flops, "seconds": result.seconds}
    if result.status == "diverged" or (result.status == "completed" and result.final_eval_loss is None):
        return Outcome(TrialState.diverged, **common)
    if result.status == "stopped":
        return Outcome(stop_reason or TrialState.cancelled, **common)
    return Outcome(TrialState.complete, value=result.final_eval_loss, **common)


def ask_attempts(kind: StudyKind[Any], spec: Any, storage: BaseStorage, name: str,
                 attempts: list[TrialAttempt]) -> list[tuple[optuna.Study, optuna.Trial]]:
    """Each attempt's Optuna trial: new ones asked together from the study (``ask_together``), a retry through a
    study of its own that re-runs its params (as its kind re-runs them)."""
    study = kind.load_optuna_study(storage, name, spec, retried_params=None)
    retried = {i: kind.load_optuna_study(storage, name, spec, retried_params=a.params)
               for i, a in enumerate(attempts) if a.retry_of and a.params}
    fresh = iter(ask_together(study, kind.distributions(spec), len(attempts) - len(retried)))
    return [(retried[i], retried[i].ask(kind.distributions(spec))) if i in retried else (study, next(fresh))
            for i in range(len(attempts))]


def tell(study: optuna.Study, trial: optuna.Trial, direction: str, outcome: Outcome) -> None:
    """Tell Optuna how the trial ended; a failure here is only logged (our row is the truth, the reconciler retells)."""
    try:
        tell_outcome(study, trial, direction, outcome.state, outcome.value)
    except Exception:
        log.exception("could not tell Optuna how trial %s ended", trial.number)


def tell_all(storage: ChangedTrialsStorage, told: list[tuple[optuna.Study, optuna.Trial, Outcome]],
             direction: str) -> None:
    """``tell`` for each of a pack's members, their new states written in one transaction; a failure to write
    them is only logged, like a failed ``tell``."""
    try:
        with storage.told_together([trial._trial_id for _, trial, _ in told]):
            for study, trial, outcome in told:
                tell(study, trial, direction, outcome)
    except Exception:
        log.exception("could not tell Optuna how trials %s ended", [trial.number for _, trial, _ in told])


def failure(error: Exception) -> Outcome:
    """ValueError means the config cannot work (never retried); anything else may be transient."""
    kind = "invalid" if isinstance(error, ValueError) else "error"
    return Outcome(TrialState.failed, failure_reason=f"{kind}: {type(error).__name__}: {error}")
