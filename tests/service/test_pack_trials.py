"""Packs in the service: the spec's ``pack``, the atomic claim, and a pack of trials run in-process on a tiny MLP."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import optuna
import pytest
from fastapi.testclient import TestClient
from optuna.trial import TrialState as OptunaState
from sqlalchemy import event, select

from scaletune.runner import run_trial
from service.db import SessionFactory, create_db_engine, make_session_factory, upgrade_database
from service.dispatch import dispatch
from service.kinds.registry import STUDY_SPEC, spec_of
from service.kinds.tune import KIND as TUNE
from service.models import Event, Study, TrialAttempt, utcnow
from service.optuna_study import get_storage
from service.reconcile import reconcile_once
from service.settings import Settings
from service.studies import create_study
from service.trials import claim_pack, record_asked
from workers.running import RecentIds, celery_worker_is_running, celery_worker_state
from workers.trial_task import WorkerContext, run_attempt

if TYPE_CHECKING:
    from tests.service.conftest import SentTasks


@pytest.fixture
def pack_spec(tiny_spec: dict[str, Any]) -> dict[str, Any]:
    """Four trials, all queued at once, trained as one pack."""
    return {**tiny_spec, "n_trials": 4, "parallelism": 4, "pack": 4, "sampler": {"name": "random", "seed": 0}}


@pytest.fixture
def ctx(migrated: Settings, session_factory: SessionFactory, sent: SentTasks) -> WorkerContext:
    return WorkerContext(migrated, session_factory, sent)


def _attempts(session_factory: SessionFactory, study_id: str) -> list[TrialAttempt]:
    with session_factory() as session:
        return list(session.scalars(select(TrialAttempt).where(TrialAttempt.study_id == study_id)
                                    .order_by(TrialAttempt.queued_at, TrialAttempt.id)))


@pytest.mark.parametrize(("given", "stored"), [(None, "auto"), ("auto", "auto"), (1, 1), (8, 8)])
def test_pack_is_stored_and_shown_in_the_study_detail(client: TestClient, pack_spec: dict[str, Any],
                                                      given: Any, stored: Any) -> None:
    pack_spec.pop("pack")
    if given is not None:
        pack_spec["pack"] = given
    study_id = client.post("/v1/studies", json=pack_spec).json()["id"]
    assert client.get(f"/v1/studies/{study_id}").json()["spec"]["pack"] == stored


@pytest.mark.parametrize("bad", [0, -1, "big", 1.5])
def test_a_bad_pack_is_a_422_naming_the_field(client: TestClient, pack_spec: dict[str, Any], bad: Any) -> None:
    response = client.post("/v1/studies", json={**pack_spec, "pack": bad})
    assert response.status_code == 422
    assert any("pack" in str(error["loc"]) for error in response.json()["errors"]), response.json()


def test_auto_sizes_the_pack_for_the_proxy_and_one_means_one(pack_spec: dict[str, Any]) -> None:
    auto = TUNE.pack_size(STUDY_SPEC.validate_python({**pack_spec, "pack": "auto"}), None)
    assert auto > 1, "a 1k-parameter proxy on a CPU is packed"
    assert TUNE.pack_size(STUDY_SPEC.validate_python({**pack_spec, "pack": 1}), None) == 1


def test_a_pack_claim_takes_queued_trials_of_the_study_once(ctx: WorkerContext, storage: Any,
                                                            pack_spec: dict[str, Any]) -> None:
    study = create_study(ctx.session_factory, storage, STUDY_SPEC.validate_python(pack_spec))
    first, *rest = dispatch(ctx.session_factory, study.id, ctx.enqueue)

    claimed = claim_pack(ctx.session_factory, first, "w", "task", 3)

    assert [a.id for a in claimed] == [first, *rest[:2]] and {a.state for a in claimed} == {"running"}
    assert claim_pack(ctx.session_factory, rest[0], "w2", None, 3) == [], "a claimed member is not queued any more"
    [last] = claim_pack(ctx.session_factory, rest[2], "w2", None, 3)
    assert last.id == rest[2]


def test_concurrent_pack_claims_on_postgresql_are_disjoint(postgres_url: str, tmp_path: Any,
                                                           pack_spec: dict[str, Any]) -> None:
    """Workers racing for one study's queued trials (FOR UPDATE SKIP LOCKED): nobody gets a trial twice."""
    upgrade_database(postgres_url)
    engine = create_db_engine(postgres_url)
    try:
        factory = make_session_factory(engine)
        pack_spec.update(n_trials=24, parallelism=24)
        study = create_study(factory, get_storage(postgres_url), STUDY_SPEC.validate_python(pack_spec))
        queued = dispatch(factory, study.id, lambda *_: None)
        claims: dict[int, list[str]] = {}

        def claim(worker: int) -> None:
            claims[worker] = [a.id for start in queued[worker::6]
                              for a in claim_pack(factory, start, f"w{worker}", None, 4)]

        threads = [threading.Thread(target=claim, args=(w,)) for w in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        taken = [attempt_id for ids in claims.values() for attempt_id in ids]
        assert sorted(taken) == sorted(queued), "every queued trial claimed exactly once"
    finally:
        engine.dispose()


def test_a_pack_runs_each_member_as_its_own_trial(ctx: WorkerContext, storage: Any, sent: SentTasks,
                                                  pack_spec: dict[str, Any]) -> None:
    study = create_study(ctx.session_factory, storage, STUDY_SPEC.validate_python(pack_spec))
    ids = dispatch(ctx.session_factory, study.id, ctx.enqueue)

    assert run_attempt(ctx, ids[0], task_id="task-1") == "complete"
    queries: list[str] = []
    event.listen(ctx.session_factory.kw["bind"], "before_cursor_execute",
                 lambda _conn, _cursor, statement, *_rest: queries.append(statement))
    assert [run_attempt(ctx, other) for other in ids[1:]] == [None] * 3, "the members' own tasks find them taken"
    assert queries == [], "this worker knows it took them: their tasks cost no query"

    attempts = _attempts(ctx.session_factory, study.id)
    with ctx.session_factory() as session:
        done = session.get_one(Study, study.id)
        events = list(session.execute(select(Event.trial_id, Event.type).where(Event.study_id == study.id)))
    assert [a.id for a in attempts] == ids and {a.state for a in attempts} == {"complete"}
    assert sorted(a.number for a in attempts) == [0, 1, 2, 3]
    assert len({a.params["lr"] for a in attempts}) == 4, "each member has its own sampled value"
    for attempt in attempts:
        assert [p["step"] for p in attempt.intermediate] == [10, 20]
        assert attempt.value == pytest.approx(attempt.intermediate[-1]["eval_loss"])
        assert [kind for trial_id, kind in events if trial_id == attempt.id] == [
            "trial_started", "trial_reported", "trial_reported", "trial_finished"]
    assert done.status == "completed" and done.best_value == min(a.value for a in attempts)
    trials = {t.number: t for t in optuna.load_study(study_name=study.optuna_study_name, storage=storage).trials}
    for attempt in attempts:
        told = trials[attempt.number]
        assert told.state == OptunaState.COMPLETE and told.value == pytest.approx(attempt.value)
        assert told.params == attempt.params and set(told.intermediate_values) == {10, 20}
    alone = run_trial(TUNE.trial_config(spec_of(done), attempts[2].params))
    assert alone.final_eval_loss == pytest.approx(attempts[2].value, rel=1e-5), "a member trains as it would alone"


def test_a_diverged_member_leaves_the_pack_and_the_rest_go_on(ctx: WorkerContext, storage: Any,
                                                              pack_spec: dict[str, Any]) -> None:
    pack_spec.update(search_space={"lr": {"type": "categorical", "choices": [0.005, 1.0e6]}}, n_trials=3,
                     parallelism=3, enqueue=[{"lr": 0.005}, {"lr": 1.0e6}, {"lr": 0.005}])
    study = create_study(ctx.session_factory, storage, STUDY_SPEC.validate_python(pack_spec))
    first, *_ = dispatch(ctx.session_factory, study.id, ctx.enqueue)

    run_attempt(ctx, first)

    states = {a.params["lr"]: a.state for a in _attempts(ctx.session_factory, study.id)}
    assert sorted(a.state for a in _attempts(ctx.session_factory, study.id)) == ["complete", "complete", "diverged"]
    assert states[1.0e6] == "diverged"


def test_a_pruned_member_stops_and_the_rest_go_on(ctx: WorkerContext, storage: Any,
                                                  pack_spec: dict[str, Any]) -> None:
    """Successive halving with two members at the first rung: only the better one is promoted."""
    pack_spec.update(search_space={"lr": {"type": "categorical", "choices": [0.005, 1.0e-7]}}, n_trials=2,
                     parallelism=2, pruner={"name": "successive_halving"}, enqueue=[{"lr": 0.005}, {"lr": 1.0e-7}])
    study = create_study(ctx.session_factory, storage, STUDY_SPEC.validate_python(pack_spec))
    first, _ = dispatch(ctx.session_factory, study.id, ctx.enqueue)

    run_attempt(ctx, first)

    good, bad = _attempts(ctx.session_factory, study.id)
    assert (good.params, good.state, len(good.intermediate)) == ({"lr": 0.005}, "complete", 2)
    assert (bad.params, bad.state, len(bad.intermediate)) == ({"lr": 1.0e-7}, "pruned", 1)
    told = {t.number: t.state for t in optuna.load_study(study_name=study.optuna_study_name, storage=storage).trials}
    assert told == {good.number: OptunaState.COMPLETE, bad.number: OptunaState.PRUNED}


def test_a_lost_pack_is_retried_member_by_member_with_each_ones_params(
        ctx: WorkerContext, storage: Any, migrated: Settings, pack_spec: dict[str, Any]) -> None:
    pack_spec.update(n_trials=2, parallelism=2, enqueue=[{"lr": 0.0042}, {"lr": 0.0071}])
    study = create_study(ctx.session_factory, storage, STUDY_SPEC.validate_python(pack_spec))
    first, _ = dispatch(ctx.session_factory, study.id, ctx.enqueue)
    doomed = claim_pack(ctx.session_factory, first, "doomed-worker", None, 2)
    optuna_study = optuna.load_study(study_name=study.optuna_study_name, storage=storage)
    for attempt in doomed:
        trial = optuna_study.ask(TUNE.distributions(spec_of(study)))
        record_asked(ctx.session_factory, attempt.id, trial.number, trial.params)
    later = utcnow() + timedelta(seconds=migrated.STALE_AFTER + 1)
    retries = [a.attempt_id for a in reconcile_once(ctx.session_factory, ctx.enqueue, migrated, now=later)
               if a.kind == "retried"]
    assert len(retries) == 2

    assert run_attempt(ctx, retries[0]) == "complete"

    attempts = {a.id: a for a in _attempts(ctx.session_factory, study.id)}
    for attempt in doomed:
        [retry] = [a for a in attempts.values() if a.retry_of == attempt.id]
        assert attempts[attempt.id].state == "failed" and retry.state == "complete" and retry.attempt == 2
        assert retry.params == attempts[attempt.id].params
    assert sorted(a.params["lr"] for a in attempts.values() if a.state == "complete") == [0.0042, 0.0071]


def test_a_worker_forgets_the_oldest_pack_members_whose_tasks_went_elsewhere() -> None:
    """Members' own tasks may reach other workers; what a worker remembers of its packs stays bounded."""
    remembered = RecentIds(limit=3)
    remembered.add(["a", "b"])
    remembered.add(["c", "d", "e"])

    assert [remembered.take(i) for i in "abcde"] == [False, False, True, True, True]
    assert not remembered.take("c"), "a member's task is skipped once; a later delivery is looked up"


def test_a_worker_goes_on_with_its_studys_next_pack_until_told_to_stop(
        migrated: Settings, session_factory: SessionFactory, sent: SentTasks, storage: Any,
        pack_spec: dict[str, Any]) -> None:
    """The next pack starts without waiting behind the tasks of the pack just trained; a stopping worker stops."""
    carry_on = iter([True, False])
    ctx = WorkerContext(migrated, session_factory, sent, carry_on=lambda: next(carry_on))
    study = create_study(session_factory, storage, STUDY_SPEC.validate_python({**pack_spec, "n_trials": 12}))
    first = dispatch(session_factory, study.id, ctx.enqueue)[0]

    assert run_attempt(ctx, first) == "complete"

    attempts = _attempts(session_factory, study.id)
    assert [a.state for a in attempts] == ["complete"] * 8 + ["queued"] * 4, \
        "two packs of four, then the worker stopped going on"
    assert {a.worker for a in attempts[:8]} == {attempts[0].worker}
    assert sent.ids() == [a.id for a in attempts[:4] + attempts[8:]], \
        "no task is sent for the pack the worker took itself; the pack left queued has its tasks"
    queries: list[str] = []
    event.listen(session_factory.kw["bind"], "before_cursor_execute",
                 lambda _conn, _cursor, statement, *_rest: queries.append(statement))
    assert [run_attempt(ctx, attempt.id) for attempt in attempts[1:4]] == [None] * 3
    assert queries == [], "the tasks of the members it trained are skipped without a query"


def test_a_worker_does_not_go_on_ahead_of_an_older_studys_queued_trials(
        migrated: Settings, session_factory: SessionFactory, sent: SentTasks, storage: Any,
        pack_spec: dict[str, Any]) -> None:
    ctx = WorkerContext(migrated, session_factory, sent, carry_on=lambda: True)
    waiting = create_study(session_factory, storage, STUDY_SPEC.validate_python({**pack_spec, "name": "waiting"}))
    dispatch(session_factory, waiting.id, ctx.enqueue)
    study = create_study(session_factory, storage, STUDY_SPEC.validate_python({**pack_spec, "n_trials": 8}))
    first = dispatch(session_factory, study.id, ctx.enqueue)[0]

    assert run_attempt(ctx, first) == "complete"

    assert [a.state for a in _attempts(session_factory, study.id)] == ["complete"] * 4 + ["queued"] * 4
    assert {a.state for a in _attempts(session_factory, waiting.id)} == {"queued"}, "its tasks come first"


@pytest.mark.parametrize("flag", ["should_stop", "should_terminate"])
def test_a_celery_worker_stops_going_on_once_its_shutdown_begins(monkeypatch: pytest.MonkeyPatch, flag: str) -> None:
    assert celery_worker_is_running()
    monkeypatch.setattr(celery_worker_state, flag, 0)  # EX_OK, what a warm shutdown on SIGTERM sets
    assert not celery_worker_is_running()
