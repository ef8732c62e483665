"""The worker's task function run in-process on a tiny MLP: a trial trains, reports, and is recorded once."""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import optuna
import pytest
from fastapi.testclient import TestClient
from optuna.trial import TrialState as OptunaState
from sqlalchemy import select

from service.api.app import create_app
from service.db import SessionFactory
from service.dispatch import dispatch
from service.models import Event, Study, TrialAttempt, utcnow
from service.reconcile import reconcile_once
from service.settings import Settings
from service.kinds.registry import STUDY_SPEC
from service.kinds.tune import distributions
from service.studies import cancel_study, create_study
from service.trials import claim_attempt, record_asked
from workers.trial_task import WorkerContext, run_attempt

if TYPE_CHECKING:
    from tests.service.conftest import SentTasks


@pytest.fixture
def ctx(migrated: Settings, session_factory: SessionFactory, sent: SentTasks) -> WorkerContext:
    return WorkerContext(migrated, session_factory, sent)


def test_a_trial_runs_and_is_recorded_once(ctx: WorkerContext, storage: Any, tiny_spec: dict[str, Any]) -> None:
    study = create_study(ctx.session_factory, storage, STUDY_SPEC.validate_python(tiny_spec))
    [attempt_id] = dispatch(ctx.session_factory, study.id, ctx.enqueue)

    assert run_attempt(ctx, attempt_id, task_id="task-1") == "complete"
    assert run_attempt(ctx, attempt_id, task_id="task-1-duplicate") is None

    with ctx.session_factory() as session:
        attempt = session.get_one(TrialAttempt, attempt_id)
        done = session.get_one(Study, study.id)
        events = list(session.scalars(select(Event.type).where(Event.study_id == study.id).order_by(Event.id)))
    assert attempt.state == "complete" and attempt.number == 0 and attempt.task_id == "task-1"
    assert attempt.value is not None and 0 < attempt.value < 5
    assert [p["step"] for p in attempt.intermediate] == [10, 20]
    assert attempt.intermediate[-1]["eval_loss"] == pytest.approx(attempt.value)
    assert attempt.flops and attempt.flops > 0 and attempt.seconds is not None
    assert 1e-3 <= attempt.params["lr"] <= 1e-2
    assert events == ["trial_started", "trial_reported", "trial_reported", "trial_finished", "study_finished"]
    assert done.status == "completed" and done.best_value == attempt.value and done.best_params == attempt.params
    [optuna_trial] = optuna.load_study(study_name=study.optuna_study_name, storage=storage).trials
    assert optuna_trial.state == OptunaState.COMPLETE and optuna_trial.value == pytest.approx(attempt.value)
    assert optuna_trial.intermediate_values == {10: pytest.approx(attempt.intermediate[0]["eval_loss"]),
                                                20: pytest.approx(attempt.value)}


def test_a_diverging_trial_is_recorded_as_diverged_and_teaches_optuna_the_worst_value(
        ctx: WorkerContext, storage: Any, tiny_spec: dict[str, Any]) -> None:
    tiny_spec["search_space"] = {"lr": {"type": "categorical", "choices": [1.0e6]}}
    study = create_study(ctx.session_factory, storage, STUDY_SPEC.validate_python(tiny_spec))
    [attempt_id] = dispatch(ctx.session_factory, study.id, ctx.enqueue)

    assert run_attempt(ctx, attempt_id) == "diverged"

    with ctx.session_factory() as session:
        attempts = list(session.scalars(select(TrialAttempt).where(TrialAttempt.study_id == study.id)))
        done = session.get_one(Study, study.id)
    assert [a.state for a in attempts] == ["diverged"], "divergence is an outcome, never retried"
    assert done.status == "failed" and done.best_value is None
    [optuna_trial] = optuna.load_study(study_name=study.optuna_study_name, storage=storage).trials
    assert optuna_trial.state == OptunaState.COMPLETE and optuna_trial.value == float("inf")


def test_trials_run_through_the_api_until_the_study_completes(
        client: TestClient, ctx: WorkerContext, sent: SentTasks, tiny_spec: dict[str, Any]) -> None:
    tiny_spec.update(n_trials=2, enqueue=[{"lr": 0.005}])
    study_id = client.post("/v1/studies", json=tiny_spec).json()["id"]
    with ctx.session_factory() as session:
        [first] = session.scalars(select(TrialAttempt.id).where(TrialAttempt.study_id == study_id)).all()
    run_attempt(ctx, first)
    [second] = [i for i in sent.ids() if i != first]
    run_attempt(ctx, second)
    detail = client.get(f"/v1/studies/{study_id}").json()
    first_trial = client.get(f"/v1/studies/{study_id}/trials/0").json()
    assert detail["status"] == "completed"
    assert detail["trial_counts"]["complete"] == 2
    assert first_trial["params"] == {"lr": 0.005}, "the enqueued point is tried first"
    assert len(first_trial["intermediate"]) == 2 and first_trial["duration_s"] > 0


def test_a_retry_reruns_the_failed_attempts_params(ctx: WorkerContext, storage: Any, migrated: Settings,
                                                   tiny_spec: dict[str, Any]) -> None:
    tiny_spec["enqueue"] = [{"lr": 0.0042}]
    study = create_study(ctx.session_factory, storage, STUDY_SPEC.validate_python(tiny_spec))
    [attempt_id] = dispatch(ctx.session_factory, study.id, ctx.enqueue)
    assert claim_attempt(ctx.session_factory, attempt_id, "doomed-worker", None) is not None
    doomed = optuna.load_study(study_name=study.optuna_study_name, storage=storage).ask(distributions(
        STUDY_SPEC.validate_python(tiny_spec)))
    record_asked(ctx.session_factory, attempt_id, doomed.number, doomed.params)  # the enqueued point, used up
    later = utcnow() + timedelta(seconds=migrated.STALE_AFTER + 1)
    [retry] = [a.attempt_id for a in reconcile_once(ctx.session_factory, ctx.enqueue, migrated, now=later)
               if a.kind == "retried"]

    assert run_attempt(ctx, retry) == "complete"

    with ctx.session_factory() as session:
        rerun = session.get_one(TrialAttempt, retry)
    assert rerun.params == {"lr": 0.0042} and rerun.retry_of == attempt_id and rerun.attempt == 2
    assert rerun.number == doomed.number + 1


def test_cancelling_a_study_stops_its_running_trial_at_the_next_eval(ctx: WorkerContext, storage: Any,
                                                                     tiny_spec: dict[str, Any]) -> None:
    tiny_spec["budget"] = {"steps": 400, "batch_size": 32, "eval_every": 10, "schedule": "cosine"}
    study = create_study(ctx.session_factory, storage, STUDY_SPEC.validate_python(tiny_spec))
    [attempt_id] = dispatch(ctx.session_factory, study.id, ctx.enqueue)

    def cancel_after_first_report() -> None:
        while True:
            with ctx.session_factory() as session:
                if session.scalar(select(Event.id).where(Event.type == "trial_reported")) is not None:
                    cancel_study(ctx.session_factory, study.id)
                    return
            time.sleep(0.01)

    canceller = threading.Thread(target=cancel_after_first_report)
    canceller.start()
    state = run_attempt(ctx, attempt_id)
    canceller.join()

    with ctx.session_factory() as session:
        attempt = session.get_one(TrialAttempt, attempt_id)
    assert state == "cancelled" and attempt.state == "cancelled"
    assert len(attempt.intermediate) < 40, "training stopped early instead of running all 400 steps"
    [optuna_trial] = optuna.load_study(study_name=study.optuna_study_name, storage=storage).trials
    assert optuna_trial.state == OptunaState.FAIL
