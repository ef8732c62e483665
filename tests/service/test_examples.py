"""Every spec in examples/ is accepted by the API as shipped; the grid kinds are small enough to run end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.models import TrialAttempt, TrialState
from workers.trial_task import WorkerContext, run_attempt

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))
SPECS: dict[str, dict[str, Any]] = {path.name: yaml.safe_load(path.read_text()) for path in EXAMPLES}


def test_there_is_an_example_per_study_kind_and_one_for_gpt_with_completep() -> None:
    assert {spec["kind"] for spec in SPECS.values()} == {"tune", "transfer_check", "shape_schedule"}
    assert any(spec["kind"] == "tune" and spec["model"]["family"] == "gpt" and spec["parametrization"] == "completep"
               for spec in SPECS.values())


@pytest.mark.parametrize("name", SPECS)
def test_the_api_accepts_each_example_as_shipped(client: TestClient, name: str) -> None:
    response = client.post("/v1/studies", json=SPECS[name])
    assert response.status_code == 201, response.text
    detail = client.get(f"/v1/studies/{response.json()['id']}").json()
    assert detail["spec"]["kind"] == SPECS[name]["kind"] and detail["spec"]["name"] == SPECS[name]["name"]


def run_every_attempt(ctx: WorkerContext, study_id: str) -> list[str]:
    """Run the attempts the API queued, and those each finished attempt queues after it, here (packs take several
    at once); the final state of every attempt, in the order they were queued."""
    while True:
        with ctx.session_factory() as session:
            queued = session.scalars(select(TrialAttempt.id).where(TrialAttempt.study_id == study_id,
                                                                   TrialAttempt.state == TrialState.queued)).all()
        if not queued:
            with ctx.session_factory() as session:
                return list(session.scalars(select(TrialAttempt.state).where(TrialAttempt.study_id == study_id)
                                            .order_by(TrialAttempt.queued_at, TrialAttempt.id)))
        for attempt_id in queued:
            run_attempt(ctx, attempt_id)


@pytest.fixture
def ctx(migrated: Any, session_factory: Any, sent: Any) -> WorkerContext:
    return WorkerContext(migrated, session_factory, sent)


def test_the_transfer_check_example_runs_and_gives_a_verdict(client: TestClient, ctx: WorkerContext) -> None:
    study_id = client.post("/v1/studies", json=SPECS["transfer-check.yaml"]).json()["id"]
    states = run_every_attempt(ctx, study_id)  # 45, plus 3 per octave the grid grew at an edge
    grown = client.get(f"/v1/studies/{study_id}").json()["spec"]["extensions"]
    assert states == ["complete"] * (45 + 3 * len(grown))

    check = client.get(f"/v1/studies/{study_id}/check")
    assert check.status_code == 200, check.text
    body = check.json()
    assert len(body["sizes"]) == 3 and all(s["seeds"] == 3 for s in body["sizes"])
    intervals, tolerance = [s["drift_interval"] for s in body["sizes"][1:]], body["tolerance"]
    if body["verdict"] == "holds":  # what the verdict claims is what the intervals show
        assert all(-tolerance <= low <= high <= tolerance for low, high in intervals)
    elif body["verdict"] == "drifts":
        assert any(low > tolerance or high < -tolerance for low, high in intervals)
    else:
        assert body["reasons"]


def test_the_shape_schedule_example_runs_and_answers_a_budget(client: TestClient, ctx: WorkerContext) -> None:
    study_id = client.post("/v1/studies", json=SPECS["shape-schedule.yaml"]).json()["id"]
    assert run_every_attempt(ctx, study_id) == ["complete"] * 16
    trials = client.get(f"/v1/studies/{study_id}/trials", params={"limit": 100}).json()["items"]
    budget = sorted(t["flops"] for t in trials)[len(trials) // 2]

    schedule = client.get(f"/v1/studies/{study_id}/schedule", params={"budget_flops": budget})
    assert schedule.status_code == 200, schedule.text
    assert set(schedule.json()["fits"]) == {"width=8", "width=32"} and schedule.json()["segments"]
