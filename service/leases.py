"""Trials handed out to code the service does not run (ask/tell), each under a lease its holder keeps renewing.

An ask creates an attempt that is running at once, with ``lease_expires_at`` ``lease_seconds`` ahead; every
report or renewal moves it on. An attempt whose lease ran out is failed with ``lease_expired`` (by whichever
comes first: a call about that trial, the study's next ask, or the reconciler) and, like a worker's lost
attempt, retried: the retry waits as a queued attempt with the same params until an ask hands it out.
Optuna is written after our row (its trial numbers are what the user's code sees); our row is the truth.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

import optuna
from optuna.storages import BaseStorage
from optuna.trial import TrialState as OptunaState
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from service.db import SessionFactory, write_session
from service.dispatch import complete_study, count_finished, dispatch
from service.models import UNFINISHED_STUDY, EventType, Study, StudyStatus, TrialAttempt, TrialState, utcnow
from service.kinds.external import KIND, ExternalSpec
from service.kinds.registry import kind_of
from service.optuna_study import failure_value
from service.queue import Enqueue
from service.studies import StudyNotFound, add_event
from service.trials import LEASE_EXPIRED, Outcome, finish_attempt, record_asked

log = logging.getLogger(__name__)
MAX_RETRY_AFTER_S = 10
Told = Literal["complete", "pruned", "failed"]


class NotAskable(RuntimeError):
    """The study's trials run on the service's workers: there is nothing to ask or tell."""


class StudyClosed(RuntimeError):
    """The study has finished or was cancelled: it hands out no more trials."""


class AllTrialsOut(RuntimeError):
    """``parallelism`` trials (or every remaining one) are out; ask again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TrialNotFound(LookupError):
    pass


class TrialEnded(RuntimeError):
    """The trial is not running any more; ``attempt`` says how it ended."""

    def __init__(self, message: str, attempt: TrialAttempt) -> None:
        super().__init__(message)
        self.attempt = attempt


class LeaseExpired(TrialEnded):
    """The trial's lease ran out before this call: it was failed and its params are handed out again."""


def _external(session: Session, study_id: str, tenant: str | None, lock: bool = False) -> tuple[Study, ExternalSpec]:
    query = select(Study).where(Study.id == study_id)
    study = session.scalars(query.with_for_update() if lock else query).one_or_none()
    if study is None or (tenant is not None and study.tenant != tenant):
        raise StudyNotFound(study_id)
    if kind_of(study) is not KIND:
        raise NotAskable(f"study {study_id} is a {study.kind} study: the service's workers run its trials, so "
                         "there is nothing to ask or tell; submit a study of kind external for your own code")
    return study, KIND.parse(study.spec)


# ---------------------------------------------------------------- expiry


def _tell_optuna(storage: BaseStorage, study: Study, spec: ExternalSpec, number: int | None,
                 outcome: Outcome) -> None:
    """Close Optuna's trial; a failure is only logged (our row is the truth, Optuna's trial stays RUNNING)."""
    if number is None:
        return
    try:
        optuna_study = optuna.load_study(study_name=study.optuna_study_name, storage=storage)
        match outcome.state:
            case TrialState.complete:
                optuna_study.tell(number, outcome.value, skip_if_finished=True)
            case TrialState.diverged:
                optuna_study.tell(number, failure_value(spec.objective.direction), skip_if_finished=True)
            case TrialState.pruned:
                optuna_study.tell(number, state=OptunaState.PRUNED, skip_if_finished=True)
            case _:
                optuna_study.tell(number, state=OptunaState.FAIL, skip_if_finished=True)
    except Exception:
        log.exception("could not tell Optuna how trial %s of study %s ended", number, study.id)


def _expire(session_factory: SessionFactory, storage: BaseStorage, attempt_id: str, max_retries: int) -> bool:
    """Fail one attempt whose lease ran out and queue its retry; False when it had already ended."""
    finished = finish_attempt(session_factory, attempt_id, Outcome(TrialState.failed, failure_reason=LEASE_EXPIRED),
                              max_retries)
    if finished is None:
        return False
    with session_factory() as session:
        study = session.get_one(Study, finished.attempt.study_id)
    _tell_optuna(storage, study, KIND.parse(study.spec), finished.attempt.number, Outcome(TrialState.failed))
    return True


def expire_leases(session_factory: SessionFactory, storage: BaseStorage, max_retries: int, now: datetime,
                  study_id: str | None = None) -> list[tuple[str, str]]:
    """Fail every running attempt (of one study, or all) whose lease ran out; returns (study id, attempt id) pairs."""
    query = select(TrialAttempt.study_id, TrialAttempt.id).where(TrialAttempt.state == TrialState.running,
                                                                TrialAttempt.lease_expires_at < now)
    if study_id is not None:
        query = query.where(TrialAttempt.study_id == study_id)
    with session_factory() as session:
        rows = session.execute(query).all()
    return [(sid, aid) for sid, aid in rows if _expire(session_factory, storage, aid, max_retries)]


# ---------------------------------------------------------------- ask


@dataclass(frozen=True)
class Asked:
    attempt: TrialAttempt
    spec: ExternalSpec


def _retry_after(session: Session, study_id: str, now: datetime) -> int:
    """Seconds until the first lease out may run out, at most MAX_RETRY_AFTER_S (a trial may be told any time)."""
    first = session.scalar(select(func.min(TrialAttempt.lease_expires_at))
                           .where(TrialAttempt.study_id == study_id, TrialAttempt.state == TrialState.running))
    if first is None:
        return 1
    return max(1, min(MAX_RETRY_AFTER_S, math.ceil((first - now).total_seconds())))


def _asked_with(session: Session, study_id: str, key: str) -> TrialAttempt | None:
    """The running attempt an earlier ask with this Idempotency-Key handed out; AllTrialsOut while it is mid-answer."""
    earlier = session.scalars(select(TrialAttempt).where(TrialAttempt.study_id == study_id,
                                                         TrialAttempt.task_id == key,
                                                         TrialAttempt.state == TrialState.running)).first()
    if earlier is not None and earlier.number is None:
        raise AllTrialsOut(f"an earlier ask of study {study_id} with this Idempotency-Key is still being answered; "
                           "ask again in a moment for the same trial", 1)
    return earlier


def _reserve(session_factory: SessionFactory, study_id: str, tenant: str | None, worker: str | None,
             key: str | None, now: datetime) -> tuple[Study, ExternalSpec, TrialAttempt, int | None]:
    """Under the study's lock: hand out a waiting retry or a new attempt (and how many came before), or say why not.

    The ordinal is None when ``key`` names an attempt already handed out (the answer to that ask was lost).
    """
    with write_session(session_factory) as session:
        study, spec = _external(session, study_id, tenant, lock=True)
        if key is not None and (earlier := _asked_with(session, study_id, key)) is not None:
            return study, spec, earlier, None
        if study.status not in UNFINISHED_STUDY:
            raise StudyClosed(f"study {study_id} is {study.status}; it hands out no more trials")
        running = session.scalar(select(func.count()).where(TrialAttempt.study_id == study_id,
                                                            TrialAttempt.state == TrialState.running)) or 0
        remaining = spec.n_trials - count_finished(session, study_id)
        if remaining <= 0 and running == 0:
            complete_study(session, study)
            raise StudyClosed(f"study {study_id} has all its {spec.n_trials} trials and is now {study.status}")
        if running >= min(spec.parallelism, remaining):
            why = (f"parallelism is {spec.parallelism}" if running >= spec.parallelism
                   else f"the study's last {remaining} trial(s) are out")
            raise AllTrialsOut(f"{running} trial(s) of study {study_id} are out and {why}; ask again later, or wait "
                               "for the study to finish", _retry_after(session, study_id, now))
        retry = session.scalars(select(TrialAttempt).where(TrialAttempt.study_id == study_id,
                                                           TrialAttempt.state == TrialState.queued)
                                .order_by(TrialAttempt.queued_at, TrialAttempt.id).limit(1)).one_or_none()
        ordinal = session.scalar(select(func.count()).where(TrialAttempt.study_id == study_id)) or 0
        attempt = retry or TrialAttempt(study_id=study_id, intermediate=[], queued_at=now)
        attempt.state, attempt.worker, attempt.task_id, attempt.started_at = TrialState.running, worker, key, now
        attempt.heartbeat_at, attempt.lease_expires_at = now, now + timedelta(seconds=spec.lease_seconds)
        session.add(attempt)
        session.flush()
        if study.status == StudyStatus.queued:
            study.status = StudyStatus.running
        add_event(session, study_id, EventType.trial_started, {"attempt": attempt.attempt, "worker": worker},
                  trial_id=attempt.id)
    return study, spec, attempt, ordinal


def ask(session_factory: SessionFactory, storage: BaseStorage, study_id: str, tenant: str | None,
        worker: str | None, max_retries: int, now: datetime | None = None, key: str | None = None) -> Asked:
    """The next trial to run: a retried one's params first, else Optuna's next sample.

    ``key`` (the request's Idempotency-Key) makes a repeated ask answer the trial the first one handed out, while
    that trial runs. Raises StudyNotFound, NotAskable, StudyClosed (finished or cancelled) or AllTrialsOut.
    """
    now = now or utcnow()
    expire_leases(session_factory, storage, max_retries, now, study_id)
    study, spec, attempt, ordinal = _reserve(session_factory, study_id, tenant, worker, key, now)
    if ordinal is None:
        return Asked(attempt, spec)
    try:
        optuna_study = KIND.asking_study(storage, study.optuna_study_name, spec,
                                         attempt.params if attempt.retry_of else None, ordinal)
        trial = optuna_study.ask(KIND.distributions(spec))
        record_asked(session_factory, attempt.id, trial.number, trial.params)
    except Exception as error:  # give the slot back; a transient failure is retried with the next ask
        finish_attempt(session_factory, attempt.id,
                       Outcome(TrialState.failed, failure_reason=f"error: {type(error).__name__}: {error}"),
                       max_retries)
        raise
    attempt.number, attempt.params = trial.number, trial.params
    return Asked(attempt, spec)


# ---------------------------------------------------------------- report, renew, tell


def _running(session_factory: SessionFactory, storage: BaseStorage, study_id: str, number: int,
             tenant: str | None, max_retries: int, now: datetime) -> tuple[Study, ExternalSpec, TrialAttempt]:
    """The trial if its lease holds; TrialEnded (LeaseExpired when its lease has just run out) otherwise."""
    with session_factory() as session:
        study, spec = _external(session, study_id, tenant)
        attempt = session.scalars(select(TrialAttempt).where(TrialAttempt.study_id == study_id,
                                                             TrialAttempt.number == number)).one_or_none()
    if attempt is None:
        raise TrialNotFound(f"study {study_id} has no trial number {number}")
    if attempt.state == TrialState.running and attempt.lease_expires_at is not None \
            and attempt.lease_expires_at < now:
        _expire(session_factory, storage, attempt.id, max_retries)
        with session_factory() as session:
            attempt = session.get_one(TrialAttempt, attempt.id)
    if attempt.state != TrialState.running:
        raise _ended(attempt)
    return study, spec, attempt


def _ended(attempt: TrialAttempt) -> TrialEnded:
    if attempt.failure_reason == LEASE_EXPIRED:
        return LeaseExpired(f"trial {attempt.number}'s lease ran out before this call (nothing was heard from it "
                            "in time); it was failed and its params are handed out again by the next ask", attempt)
    return TrialEnded(f"trial {attempt.number} has already ended ({attempt.state})", attempt)


def _hold(session: Session, attempt: TrialAttempt, spec: ExternalSpec, now: datetime) -> TrialAttempt:
    """Renew the lease of a running attempt; TrialEnded if it ended meanwhile."""
    renewed = session.execute(update(TrialAttempt)
                              .where(TrialAttempt.id == attempt.id, TrialAttempt.state == TrialState.running)
                              .values(heartbeat_at=now, lease_expires_at=now + timedelta(seconds=spec.lease_seconds)))
    if renewed.rowcount != 1:  # type: ignore[attr-defined]
        raise _ended(session.get_one(TrialAttempt, attempt.id))
    return session.get_one(TrialAttempt, attempt.id)


def renew(session_factory: SessionFactory, storage: BaseStorage, study_id: str, number: int, tenant: str | None,
          max_retries: int, now: datetime | None = None) -> TrialAttempt:
    """Keep the trial's lease (what an agent does while the user's command runs)."""
    now = now or utcnow()
    _study, spec, attempt = _running(session_factory, storage, study_id, number, tenant, max_retries, now)
    with write_session(session_factory) as session:
        return _hold(session, attempt, spec, now)


def report(session_factory: SessionFactory, storage: BaseStorage, study_id: str, number: int, tenant: str | None,
           step: int, value: float | None, max_retries: int, now: datetime | None = None) -> bool:
    """Record an intermediate value (None: not finite), renew the lease; True when the trial should stop.

    A step already reported is only a renewal (a client retrying a report whose answer was lost), as in Optuna.
    """
    now = now or utcnow()
    study, spec, attempt = _running(session_factory, storage, study_id, number, tenant, max_retries, now)
    point = {"step": step, "value": value}
    with write_session(session_factory) as session:
        held = _hold(session, attempt, spec, now)
        fresh = all(earlier.get("step") != step for earlier in held.intermediate)
        if fresh:
            held.intermediate = [*held.intermediate, point]
            add_event(session, study_id, EventType.trial_reported, point, trial_id=attempt.id)
        cancelled = session.scalar(select(Study.status).where(Study.id == study_id)) == StudyStatus.cancelled
    optuna_study = optuna.load_study(study_name=study.optuna_study_name, storage=storage,
                                     sampler=optuna.samplers.RandomSampler(), pruner=KIND.pruner(spec))
    trial = optuna.trial.Trial(optuna_study, storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(study.optuna_study_name), number))
    if value is not None and fresh:
        trial.report(value, step)
    return cancelled or trial.should_prune()


def _outcome(state: Told, value: float | None, reason: str | None, attempt: TrialAttempt, now: datetime) -> Outcome:
    seconds = (now - attempt.started_at).total_seconds() if attempt.started_at else None
    match state:
        case "complete" if value is None:
            return Outcome(TrialState.diverged, seconds=seconds)
        case "complete":
            return Outcome(TrialState.complete, value=value, seconds=seconds)
        case "pruned":
            return Outcome(TrialState.pruned, value=value, seconds=seconds)
    return Outcome(TrialState.failed, failure_reason=f"told: {reason or 'failed without a reason'}", seconds=seconds)


def tell(session_factory: SessionFactory, storage: BaseStorage, enqueue: Enqueue, study_id: str, number: int,
         tenant: str | None, state: Told, value: float | None, reason: str | None, max_retries: int,
         now: datetime | None = None) -> TrialAttempt:
    """How the trial ended, exactly once: telling again answers what the first tell recorded.

    ``complete`` without a value is a diverged trial (its loss was not finite). Raises LeaseExpired.
    """
    now = now or utcnow()
    try:
        study, spec, attempt = _running(session_factory, storage, study_id, number, tenant, max_retries, now)
    except LeaseExpired:
        raise
    except TrialEnded as ended:
        return ended.attempt
    outcome = _outcome(state, value, reason, attempt, now)
    finished = finish_attempt(session_factory, attempt.id, outcome, max_retries)
    if finished is None:  # it ended between our read and our write (expired, or a concurrent tell)
        with session_factory() as session:
            ended_attempt = session.get_one(TrialAttempt, attempt.id)
        if ended_attempt.failure_reason == LEASE_EXPIRED:
            raise _ended(ended_attempt)
        return ended_attempt
    _tell_optuna(storage, study, spec, number, outcome)
    dispatch(session_factory, study_id, enqueue)
    return finished.attempt
