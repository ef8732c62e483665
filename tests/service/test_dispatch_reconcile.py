"""Dispatcher idempotency and study completion; the reconciler's stale-trial, retry and re-send rules."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import pytest
from optuna.trial import TrialState as OptunaState
from sqlalchemy import select, update

from service.db import SessionFactory, create_db_engine, make_session_factory, upgrade_database
from service.dispatch import Claimant, dispatch, dispatch_and_claim
from service.models import Event, Study, TrialAttempt, TrialState, new_id, utcnow
from service.optuna_study import create_optuna_study, get_storage, optuna_study_name
from service.reconcile import reconcile_forever, reconcile_once
from service.settings import Settings, normalise_database_url
from service.kinds.registry import STUDY_SPEC
from service.studies import create_study
from service.trials import Outcome, claim_attempt, finish_attempt, record_asked, trial_checkpoint

if TYPE_CHECKING:
    from tests.service.conftest import SentTasks


def _study(session_factory: SessionFactory, storage: Any, spec_dict: dict[str, Any], **changes: Any) -> Study:
    return create_study(session_factory, storage, STUDY_SPEC.validate_python({**spec_dict, **changes}))


def _attempts(session_factory: SessionFactory, study_id: str) -> list[TrialAttempt]:
    with session_factory() as session:
        return list(session.scalars(select(TrialAttempt).where(TrialAttempt.study_id == study_id)
                                    .order_by(TrialAttempt.queued_at)))


def _start(session_factory: SessionFactory, storage: Any, study: Study, attempt_id: str) -> int:
    """What a worker does before training: claim the attempt and ask Optuna for a trial."""
    assert claim_attempt(session_factory, attempt_id, "test-worker", None) is not None
    trial = optuna.load_study(study_name=study.optuna_study_name, storage=storage).ask({
        "lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)})
    record_asked(session_factory, attempt_id, trial.number, trial.params)
    return trial.number


def _age_heartbeat(session_factory: SessionFactory, attempt_id: str, seconds: float) -> None:
    with session_factory.begin() as session:
        session.execute(update(TrialAttempt).where(TrialAttempt.id == attempt_id)
                        .values(heartbeat_at=utcnow() - timedelta(seconds=seconds)))


def test_dispatch_twice_adds_no_extra_attempts(session_factory: SessionFactory, storage: Any,
                                               spec_dict: dict[str, Any], sent: SentTasks) -> None:
    study = _study(session_factory, storage, spec_dict, n_trials=5, parallelism=3)
    first = dispatch(session_factory, study.id, sent)
    second = dispatch(session_factory, study.id, sent)
    assert len(first) == 3 and second == []
    assert sent.ids() == first and {queue for _, queue in sent} == {"cpu"}
    assert len(_attempts(session_factory, study.id)) == 3


def test_dispatch_tops_up_to_remaining_then_completes_the_study(session_factory: SessionFactory, storage: Any,
                                                                spec_dict: dict[str, Any], sent: SentTasks,
                                                                migrated: Settings) -> None:
    study = _study(session_factory, storage, spec_dict, n_trials=3, parallelism=2)
    assert len(dispatch(session_factory, study.id, sent)) == 2
    for value in (0.5, 0.3, 0.4):
        attempt = next(a for a in _attempts(session_factory, study.id) if a.state == TrialState.queued)
        _start(session_factory, storage, study, attempt.id)
        finish_attempt(session_factory, attempt.id, Outcome(TrialState.complete, value=value), migrated.MAX_RETRIES)
        dispatch(session_factory, study.id, sent)
    # 2 at first, then one top-up after the first finish; none after that (nothing remained to start).
    assert len(sent) == 3
    assert [a.state for a in _attempts(session_factory, study.id)] == ["complete"] * 3
    with session_factory() as session:
        done = session.get_one(Study, study.id)
        events = session.scalars(select(Event.type).where(Event.study_id == study.id)).all()
    assert done.status == "completed" and done.best_value == 0.3 and done.finished_at is not None
    assert events.count("study_finished") == 1 and events.count("trial_finished") == 3


def test_finishing_an_attempt_twice_changes_nothing(session_factory: SessionFactory, storage: Any,
                                                    spec_dict: dict[str, Any], sent: SentTasks) -> None:
    study = _study(session_factory, storage, spec_dict, n_trials=2, parallelism=1)
    [attempt_id] = dispatch(session_factory, study.id, sent)
    _start(session_factory, storage, study, attempt_id)
    assert finish_attempt(session_factory, attempt_id, Outcome(TrialState.complete, value=0.7), 2) is not None
    assert finish_attempt(session_factory, attempt_id, Outcome(TrialState.failed, failure_reason="error: x"), 2) is None
    [attempt] = _attempts(session_factory, study.id)
    assert attempt.state == "complete" and attempt.value == 0.7 and attempt.failure_reason is None


def test_reconciler_fails_a_stale_attempt_and_queues_a_retry_with_the_same_params(
        session_factory: SessionFactory, storage: Any, spec_dict: dict[str, Any], sent: SentTasks,
        migrated: Settings) -> None:
    study = _study(session_factory, storage, spec_dict, n_trials=1, parallelism=1)
    [attempt_id] = dispatch(session_factory, study.id, sent)
    number = _start(session_factory, storage, study, attempt_id)
    _age_heartbeat(session_factory, attempt_id, migrated.STALE_AFTER + 1)

    actions = reconcile_once(session_factory, sent, migrated)

    assert [a.kind for a in actions] == ["failed_stale", "retried"]
    old, retry = _attempts(session_factory, study.id)
    assert old.state == "failed" and old.failure_reason == "worker_lost"
    assert retry.state == "queued" and retry.retry_of == old.id and retry.attempt == 2
    assert retry.params == old.params
    assert sent.ids()[-1] == retry.id
    optuna_trial = optuna.load_study(study_name=study.optuna_study_name, storage=storage).trials[number]
    assert optuna_trial.state == OptunaState.FAIL
    # A healthy attempt is left alone.
    assert reconcile_once(session_factory, sent, migrated) == []


def test_reconciler_stops_retrying_after_max_retries(session_factory: SessionFactory, storage: Any,
                                                     spec_dict: dict[str, Any], sent: SentTasks,
                                                     migrated: Settings) -> None:
    study = _study(session_factory, storage, spec_dict, n_trials=1, parallelism=1)
    attempt_id = dispatch(session_factory, study.id, sent)[0]
    for _ in range(migrated.MAX_RETRIES + 1):
        _start(session_factory, storage, study, attempt_id)
        _age_heartbeat(session_factory, attempt_id, migrated.STALE_AFTER + 1)
        reconcile_once(session_factory, sent, migrated)
        attempt_id = sent.ids()[-1]
    attempts = _attempts(session_factory, study.id)
    assert [a.attempt for a in attempts] == [1, 2, 3]
    assert all(a.state == "failed" for a in attempts)
    with session_factory() as session:
        done = session.get_one(Study, study.id)
    assert done.status == "failed" and "no trial produced a value" in (done.error or "")


def test_diverged_and_invalid_trials_are_never_retried(session_factory: SessionFactory, storage: Any,
                                                       spec_dict: dict[str, Any], sent: SentTasks,
                                                       migrated: Settings) -> None:
    study = _study(session_factory, storage, spec_dict, n_trials=4, parallelism=3)
    diverged, invalid, error = dispatch(session_factory, study.id, sent)
    outcomes = {diverged: Outcome(TrialState.diverged),
                invalid: Outcome(TrialState.failed, failure_reason="invalid: ValueError: width too small"),
                error: Outcome(TrialState.failed, failure_reason="error: RuntimeError: CUDA error")}
    retries = {}
    for attempt_id, outcome in outcomes.items():
        _start(session_factory, storage, study, attempt_id)
        finished = finish_attempt(session_factory, attempt_id, outcome, migrated.MAX_RETRIES)
        assert finished is not None
        retries[attempt_id] = finished.retry
    assert retries[diverged] is None and retries[invalid] is None
    assert retries[error] is not None and retries[error].retry_of == error


def test_reconciler_resends_queued_attempts_nobody_claimed(session_factory: SessionFactory, storage: Any,
                                                           spec_dict: dict[str, Any], sent: SentTasks,
                                                           migrated: Settings) -> None:
    study = _study(session_factory, storage, spec_dict, n_trials=2, parallelism=2)
    queued = dispatch(session_factory, study.id, sent)
    sent.clear()
    assert reconcile_once(session_factory, sent, migrated) == []

    later = utcnow() + timedelta(seconds=migrated.REQUEUE_AFTER + 1)
    actions = reconcile_once(session_factory, sent, migrated, now=later)
    assert sorted(a.attempt_id for a in actions if a.kind == "resent") == sorted(queued)
    assert sorted(sent.ids()) == sorted(queued)
    assert len(_attempts(session_factory, study.id)) == 2


def test_reconcile_forever_dispatches_through_the_broker_until_stopped(
        session_factory: SessionFactory, storage: Any, spec_dict: dict[str, Any], migrated: Settings) -> None:
    """A study whose first dispatch never happened (say the API died right after creating it) still starts."""
    study = _study(session_factory, storage, spec_dict, n_trials=3, parallelism=2)
    stop = threading.Event()
    loop = threading.Thread(target=reconcile_forever, args=(migrated.model_copy(update={"RECONCILE_INTERVAL": 0.05}),
                                                            stop))
    loop.start()
    try:
        deadline = time.monotonic() + 20
        while len(_attempts(session_factory, study.id)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        loop.join(timeout=10)
    assert not loop.is_alive()
    assert len(_attempts(session_factory, study.id)) == 2
    messages = list(Path(migrated.broker_transport_options["data_folder_in"]).glob("*.msg"))
    assert len(messages) == 2


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, settings: Settings) -> Iterator[tuple[Settings, SessionFactory]]:
    """Settings and sessions on a migrated database of each backend."""
    url = settings.DATABASE_URL if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    upgrade_database(url)
    engine = create_db_engine(url)
    yield settings.model_copy(update={"DATABASE_URL": normalise_database_url(url)}), make_session_factory(engine)
    engine.dispose()


def test_reconciler_removes_optuna_studies_left_without_a_study_row_after_the_grace_period(
        database: tuple[Settings, SessionFactory], spec_dict: dict[str, Any], sent: SentTasks) -> None:
    """A crash between the Optuna study and our row leaves an Optuna study nothing schedules: it goes, ours stay."""
    settings, session_factory = database
    storage = get_storage(settings.DATABASE_URL)
    study = _study(session_factory, storage, spec_dict, n_trials=2, parallelism=1)
    crashed = optuna_study_name(new_id())
    create_optuna_study(storage, crashed, "minimize", [])  # what create_study did before the crash
    optuna.create_study(storage=storage, study_name="someone-elses-study")

    def names() -> set[str]:
        return {summary.study_name for summary in optuna.get_all_study_summaries(storage)}

    grace = timedelta(seconds=settings.ORPHAN_STUDY_GRACE)
    assert [a for a in reconcile_once(session_factory, sent, settings) if a.kind == "removed_orphan"] == []
    assert names() == {study.optuna_study_name, crashed, "someone-elses-study"}

    unstamped = optuna_study_name(new_id())  # a crash before the stamp: the reconciler stamps it when it first sees it
    optuna.create_study(storage=storage, study_name=unstamped)
    later = utcnow() + grace + timedelta(seconds=1)
    actions = [a for a in reconcile_once(session_factory, sent, settings, now=later) if a.kind == "removed_orphan"]
    assert [a.study_id for a in actions] == [crashed.removeprefix("scaletune-")]
    assert names() == {study.optuna_study_name, unstamped, "someone-elses-study"}

    reconcile_once(session_factory, sent, settings, now=later + grace + timedelta(seconds=1))
    assert names() == {study.optuna_study_name, "someone-elses-study"}
    assert len(dispatch(session_factory, study.id, sent)) == 0 and len(_attempts(session_factory, study.id)) == 1


def test_reconciler_tells_optuna_how_trials_ended_that_it_still_counts_as_running(
        database: tuple[Settings, SessionFactory], spec_dict: dict[str, Any], sent: SentTasks) -> None:
    """A worker killed after recording its attempt's end but before telling Optuna, and one killed between Optuna's
    ask and recording it: once STALE_AFTER has passed, Optuna learns the first's value (its checkpoint goes) and
    fails the second."""
    settings, session_factory = database
    storage = get_storage(settings.DATABASE_URL)
    study = _study(session_factory, storage, spec_dict, n_trials=3, parallelism=2)
    finished, asked = dispatch(session_factory, study.id, sent)
    number = _start(session_factory, storage, study, finished)
    finish_attempt(session_factory, finished, Outcome(TrialState.complete, value=0.25), settings.MAX_RETRIES)
    [attempt] = [a for a in _attempts(session_factory, study.id) if a.id == finished]
    assert settings.ARTIFACTS_DIR is not None
    checkpoint = trial_checkpoint(settings.ARTIFACTS_DIR, session_factory, attempt)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_bytes(b"saved")
    assert claim_attempt(session_factory, asked, "test-worker", None) is not None
    unrecorded = optuna.load_study(study_name=study.optuna_study_name, storage=storage).ask().number

    def optuna_states() -> dict[int, OptunaState]:
        return {t.number: t.state for t in optuna.load_study(study_name=study.optuna_study_name,
                                                              storage=storage).get_trials(deepcopy=False)}

    assert [a for a in reconcile_once(session_factory, sent, settings) if a.kind == "told_optuna"] == [], \
        "young: their workers may be telling or recording them right now"
    assert optuna_states()[number] == optuna_states()[unrecorded] == OptunaState.RUNNING and checkpoint.exists()

    later = utcnow() + timedelta(seconds=settings.STALE_AFTER + 1)
    actions = reconcile_once(session_factory, sent, settings, now=later)
    assert sorted((a.attempt_id or "") for a in actions if a.kind == "told_optuna") == ["", finished]
    told = optuna.load_study(study_name=study.optuna_study_name, storage=storage).trials[number]
    assert (told.state, told.value) == (OptunaState.COMPLETE, 0.25)
    assert optuna_states()[unrecorded] == OptunaState.FAIL
    assert not checkpoint.exists()
    assert [a.kind for a in reconcile_once(session_factory, sent, settings, now=later) if a.kind == "told_optuna"] == []


def test_a_worker_that_tops_up_takes_its_studys_next_pack_and_sends_tasks_only_for_the_rest(
        database: tuple[Settings, SessionFactory], spec_dict: dict[str, Any], sent: SentTasks) -> None:
    """One transaction queues the new attempts and claims the oldest for the worker; only the rest get tasks."""
    settings, session_factory = database
    study = _study(session_factory, get_storage(settings.DATABASE_URL), spec_dict, n_trials=5, parallelism=3)
    sizes: list[str] = []

    def pack_size(study_row: Study, attempt: TrialAttempt) -> int:
        sizes.append(f"{study_row.id}:{attempt.state}")
        return 2

    study_row, claimed = dispatch_and_claim(session_factory, study.id, sent, Claimant("w1", "task-9", pack_size))

    attempts = _attempts(session_factory, study.id)
    assert study_row is not None and study_row.id == study.id and sizes == [f"{study.id}:queued"]
    assert [a.id for a in claimed] == [a.id for a in attempts[:2]]
    assert [(a.state, a.worker, a.task_id) for a in claimed] == [("running", "w1", "task-9")] * 2
    assert [(a.state, a.worker) for a in attempts] == [("running", "w1")] * 2 + [("queued", None)]
    assert sent.ids() == [attempts[2].id], "the attempts the worker took get no task; the one left queued does"
    with session_factory() as session:
        started = session.scalars(select(Event.trial_id).where(Event.study_id == study.id,
                                                               Event.type == "trial_started")).all()
        assert session.get_one(Study, study.id).status == "running"
    assert sorted(started) == sorted(a.id for a in claimed)


def test_a_worker_that_tops_up_a_finished_study_completes_it_and_takes_nothing(
        database: tuple[Settings, SessionFactory], spec_dict: dict[str, Any], sent: SentTasks) -> None:
    settings, session_factory = database
    storage = get_storage(settings.DATABASE_URL)
    study = _study(session_factory, storage, spec_dict, n_trials=1, parallelism=1)
    [attempt_id] = dispatch(session_factory, study.id, sent)
    _start(session_factory, storage, study, attempt_id)
    finish_attempt(session_factory, attempt_id, Outcome(TrialState.complete, value=0.5), max_retries=0)

    study_row, claimed = dispatch_and_claim(session_factory, study.id, sent, Claimant("w1", None, lambda *_: 4))

    assert claimed == [] and study_row is not None and study_row.status == "completed"
    assert sent.ids() == [attempt_id]
