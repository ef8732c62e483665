"""Repair what a lost broker message, a killed worker or a restarted API left behind; the database is the truth."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import optuna
from optuna.trial import TrialState as OptunaState
from sqlalchemy import exists, select, update

from service.db import SessionFactory, create_db_engine, make_session_factory, write_session
from service.dispatch import dispatch, send_all
from service.kinds.registry import dispatching_kinds
from service.leases import expire_leases
from service.logging import log_context
from service.metrics import RECONCILER_ACTIONS
from service.models import IN_FLIGHT, Study, TrialAttempt, TrialState, utcnow
from service.optuna_study import NAME_PREFIX, created_at, delete_optuna_study, get_storage, stamp_created_at, \
    tell_outcome
from service.queue import Enqueue, make_celery, trial_sender
from service.settings import Settings
from service.studies import orphan_optuna_study_names, running_optuna_trials, unfinished_study_ids
from service.trials import WORKER_LOST, Outcome, finish_attempt, stale_attempt_ids, trial_checkpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Action:
    """One thing the reconciler did: ``failed_stale``, ``retried``, ``lease_expired``, ``resent``, ``dispatched``,
    ``told_optuna`` (no attempt: an Optuna trial asked for but never recorded) or ``removed_orphan`` (then
    ``study_id`` is the id the orphan Optuna study was made for, which has no row, and there is no attempt)."""

    kind: str
    study_id: str
    attempt_id: str | None


def _tell_optuna_failed(settings: Settings, study: Study, number: int | None) -> None:
    if number is None:
        return
    try:
        optuna_study = optuna.load_study(study_name=study.optuna_study_name,
                                         storage=get_storage(settings.DATABASE_URL))
        optuna_study.tell(number, state=OptunaState.FAIL, skip_if_finished=True)
    except Exception:  # our row is the truth; a trial Optuna cannot close must not stall the reconciler
        log.exception("could not mark Optuna trial %s of study %s failed", number, study.id)


def fail_stale_attempts(session_factory: SessionFactory, enqueue: Enqueue, settings: Settings,
                        now: datetime) -> list[Action]:
    """Running attempts whose heartbeat is older than STALE_AFTER lost their worker: fail them, retry if allowed."""
    with session_factory() as session:
        stale = stale_attempt_ids(session, now - timedelta(seconds=settings.STALE_AFTER))
    actions = []
    for attempt_id in stale:
        finished = finish_attempt(session_factory, attempt_id, Outcome(TrialState.failed, failure_reason=WORKER_LOST),
                                  settings.MAX_RETRIES)
        if finished is None:  # it finished on its own meanwhile
            continue
        study_id = finished.attempt.study_id
        actions.append(Action("failed_stale", study_id, attempt_id))
        with session_factory() as session:
            study = session.get_one(Study, study_id)
        _tell_optuna_failed(settings, study, finished.attempt.number)
        if finished.retry is not None:
            send_all(enqueue, [finished.retry.id], study.spec["queue"])
            actions.append(Action("retried", study_id, finished.retry.id))
    return actions


def resend_lost_tasks(session_factory: SessionFactory, enqueue: Enqueue, settings: Settings,
                      now: datetime) -> list[Action]:
    """Queued attempts nobody claimed within REQUEUE_AFTER: send again (the claim is atomic, duplicates are harmless).

    Whatever the study's status: a queued attempt is work someone asked for (a schedule run belongs to a completed
    study), and cancelling a study cancels its queued attempts.
    """
    cutoff = now - timedelta(seconds=settings.REQUEUE_AFTER)
    with write_session(session_factory) as session:
        rows = session.execute(
            select(TrialAttempt.id, TrialAttempt.study_id, Study.spec["queue"].as_string())
            .join(Study, Study.id == TrialAttempt.study_id)
            .where(TrialAttempt.state == TrialState.queued, TrialAttempt.queued_at < cutoff,
                   Study.kind.in_(dispatching_kinds()))).all()
        session.execute(update(TrialAttempt).where(TrialAttempt.id.in_([row[0] for row in rows]))
                        .values(queued_at=now))
    for attempt_id, _study_id, queue in rows:
        send_all(enqueue, [attempt_id], queue)
    return [Action("resent", study_id, attempt_id) for attempt_id, study_id, _queue in rows]


def close_optuna_trials(session_factory: SessionFactory, settings: Settings, now: datetime) -> list[Action]:
    """Tell Optuna how trials ended that it still counts as running, and remove their checkpoints.

    A worker that dies after recording how its attempt ended but before telling Optuna leaves the Optuna trial
    running (and the trial's checkpoint on disk); one that dies between Optuna's ask and recording it leaves a
    trial no attempt names. Either would stay running forever. Both are closed here once STALE_AFTER has passed
    (since the attempt ended, or since the ask): a live worker tells Optuna itself, well within that.
    """
    stale = now - timedelta(seconds=settings.STALE_AFTER)
    actions = []
    with session_factory() as session:
        for study, number, started in running_optuna_trials(session):
            attempt = session.scalars(select(TrialAttempt).where(TrialAttempt.study_id == study.id,
                                                                 TrialAttempt.number == number)).one_or_none()
            if attempt is None and (started is None or started.astimezone(UTC) > stale):
                continue  # the worker that asked may be recording it right now
            if attempt is not None and (attempt.state in IN_FLIGHT or attempt.finished_at is None
                                        or attempt.finished_at > stale):
                continue  # still running, or its worker may be telling Optuna right now
            try:
                optuna_study = optuna.load_study(study_name=study.optuna_study_name,
                                                 storage=get_storage(settings.DATABASE_URL))
                tell_outcome(optuna_study, number, study.spec["objective"]["direction"],
                             TrialState.failed if attempt is None else TrialState(attempt.state),
                             None if attempt is None else attempt.value)
            except Exception:  # as in _tell_optuna_failed: the next pass tries again
                log.exception("could not tell Optuna how trial %s of study %s ended", number, study.id)
                continue
            actions.append(Action("told_optuna", study.id, None if attempt is None else attempt.id))
            retried = attempt is not None and session.scalar(select(exists().where(
                TrialAttempt.retry_of == attempt.id)))
            if attempt is not None and not retried and settings.ARTIFACTS_DIR is not None:
                trial_checkpoint(settings.ARTIFACTS_DIR, session_factory, attempt).unlink(missing_ok=True)
    return actions


def remove_orphan_optuna_studies(session_factory: SessionFactory, settings: Settings, now: datetime) -> list[Action]:
    """Delete Optuna studies without a study row once ORPHAN_STUDY_GRACE has passed since they were stamped.

    ``create_study`` stamps its Optuna study at creation; one without a stamp (a crash before it, or made before
    stamps existed) is stamped ``now`` here, so it too is removed a grace period later. The grace period must be
    far longer than a submit takes: a study whose row is still being written is not an orphan.
    """
    with session_factory() as session:
        orphans = orphan_optuna_study_names(session)
    storage = get_storage(settings.DATABASE_URL)
    actions = []
    for name in orphans:
        stamped = created_at(storage, name)
        if stamped is None:
            stamp_created_at(storage, name, now)
        elif now - stamped > timedelta(seconds=settings.ORPHAN_STUDY_GRACE):
            delete_optuna_study(storage, name)
            actions.append(Action("removed_orphan", name.removeprefix(NAME_PREFIX), None))
    return actions


def reconcile_once(session_factory: SessionFactory, enqueue: Enqueue, settings: Settings | None = None,
                   now: datetime | None = None) -> list[Action]:
    """One pass: fail stale attempts (and retry), end run-out leases, re-send lost tasks, tell Optuna how trials it
    still counts as running ended, top up every unfinished study, remove orphan Optuna studies."""
    settings = settings or Settings()
    now = now or utcnow()
    actions = fail_stale_attempts(session_factory, enqueue, settings, now)
    actions += [Action("lease_expired", study_id, attempt_id) for study_id, attempt_id in
                expire_leases(session_factory, get_storage(settings.DATABASE_URL), settings.MAX_RETRIES, now)]
    actions += resend_lost_tasks(session_factory, enqueue, settings, now)
    actions += close_optuna_trials(session_factory, settings, now)
    with session_factory() as session:
        study_ids = unfinished_study_ids(session)
    for study_id in study_ids:
        actions += [Action("dispatched", study_id, attempt_id)
                    for attempt_id in dispatch(session_factory, study_id, enqueue)]
    return actions + remove_orphan_optuna_studies(session_factory, settings, now)


def reconcile_forever(settings: Settings, stop_event: threading.Event) -> None:
    """Run ``reconcile_once`` every RECONCILE_INTERVAL seconds until ``stop_event`` is set.

    A plain loop rather than Celery beat: beat needs its own process and schedule state and does not
    run as simply on the filesystem broker, while this loop runs the same way as a thread in the API
    or as the ``scaletune reconciler`` process, in embedded and production mode alike.
    """
    engine = create_db_engine(settings.DATABASE_URL)
    session_factory = make_session_factory(engine)
    enqueue = trial_sender(make_celery(settings))
    try:
        while not stop_event.is_set():
            try:
                for action in reconcile_once(session_factory, enqueue, settings):
                    RECONCILER_ACTIONS.labels(action.kind).inc()
                    with log_context(study_id=action.study_id, trial_id=action.attempt_id):
                        log.info("reconciler: %s", action.kind)
            except Exception:
                log.exception("reconcile pass failed; trying again in %.0f s", settings.RECONCILE_INTERVAL)
            stop_event.wait(settings.RECONCILE_INTERVAL)
    finally:
        engine.dispose()
