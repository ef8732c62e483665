"""optuna-dashboard opens scaletune's database as it is and reads back a study that real trials completed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from wsgiref.util import setup_testing_defaults

import optuna_dashboard
import pytest
from sqlalchemy import select

from service.db import SessionFactory, create_db_engine, make_session_factory, upgrade_database
from service.dispatch import dispatch
from service.models import Study, TrialAttempt, TrialState
from service.optuna_study import get_storage
from service.settings import Settings
from service.kinds.registry import STUDY_SPEC
from service.studies import create_study
from workers.trial_task import WorkerContext, run_attempt

pytestmark = pytest.mark.integration

N_TRIALS = 3
SPEC: dict[str, Any] = {
    "name": "dashboard", "kind": "tune",
    "model": {"family": "mlp", "base": {"width": 16, "depth": 1}, "proxy": {"width": 32, "depth": 1}},
    "parametrization": "mup", "optimizer": "adamw", "dataset": {"name": "digits"},
    "budget": {"steps": 20, "batch_size": 32, "eval_every": 10},
    "search_space": {"lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
    "n_trials": N_TRIALS, "parallelism": 1, "sampler": {"name": "random", "seed": 0},
}


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'scaletune.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def session_factory(database_url: str) -> Iterator[SessionFactory]:
    upgrade_database(database_url)
    engine = create_db_engine(database_url)
    yield make_session_factory(engine)
    engine.dispose()


def _run_study_in_process(settings: Settings, session_factory: SessionFactory) -> Study:
    """Create the study as the API does and run every trial through the worker's own function."""
    queued: list[str] = []
    ctx = WorkerContext(settings, session_factory, lambda attempt_id, _queue: queued.append(attempt_id))
    study = create_study(session_factory, get_storage(settings.DATABASE_URL), STUDY_SPEC.validate_python(SPEC))
    dispatch(session_factory, study.id, ctx.enqueue)
    while queued:
        run_attempt(ctx, queued.pop(0))
    with session_factory() as session:
        return session.get_one(Study, study.id)


def _get(app: Any, path: str) -> tuple[str, Any]:
    """One GET through the WSGI interface, as a WSGI server would call it."""
    environ: dict[str, Any] = {"PATH_INFO": path, "REQUEST_METHOD": "GET", "QUERY_STRING": ""}
    setup_testing_defaults(environ)
    status: list[str] = []
    body = b"".join(app(environ, lambda s, _headers, _exc=None: status.append(s)))
    return status[0], json.loads(body)


def test_dashboard_reads_a_completed_study_from_our_database(database_url: str, session_factory: SessionFactory,
                                                             tmp_path: Path) -> None:
    settings = Settings(HOME=tmp_path / "home", DATABASE_URL=database_url, DATA_ROOT=tmp_path / "data")
    study = _run_study_in_process(settings, session_factory)
    assert study.status == "completed"
    with session_factory() as session:
        ours = {a.number: a for a in session.scalars(select(TrialAttempt).where(TrialAttempt.study_id == study.id))}
    assert all(a.state == TrialState.complete for a in ours.values()) and len(ours) == N_TRIALS

    app = optuna_dashboard.wsgi(database_url)  # the URL a user passes to `optuna-dashboard`
    status, listing = _get(app, "/api/studies")
    assert status.startswith("200"), listing
    [summary] = [s for s in listing["study_summaries"] if s["study_name"] == study.optuna_study_name]

    status, detail = _get(app, f"/api/studies/{summary['study_id']}")
    assert status.startswith("200"), detail
    assert detail["name"] == study.optuna_study_name
    trials = {t["number"]: t for t in detail["trials"]}
    assert set(trials) == set(ours)
    for number, trial in trials.items():
        assert trial["state"] == "Complete"
        assert trial["values"] == pytest.approx([ours[number].value])
        assert {p["name"]: float(p["param_internal_value"]) for p in trial["params"]} == pytest.approx(
            ours[number].params)
        assert [v["step"] for v in trial["intermediate_values"]] == [10, 20]
    assert detail["best_trials"][0]["values"] == pytest.approx([study.best_value])
