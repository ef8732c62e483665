"""Operations: /metrics reads trial states, queue depth and durations from the database; logs are JSON with ids."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.db import SessionFactory
from service.dispatch import dispatch
from service.logging import JsonFormatter
from service.settings import Settings
from service.kinds.registry import STUDY_SPEC
from service.studies import create_study
from workers.trial_task import WorkerContext, run_attempt

if TYPE_CHECKING:
    from tests.service.conftest import SentTasks

TINY = {"model": {"family": "mlp", "base": {"width": 16, "depth": 1}, "proxy": {"width": 32, "depth": 1}},
        "budget": {"steps": 20, "batch_size": 32, "eval_every": 10, "schedule": "cosine"},
        "search_space": {"lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
        "n_trials": 3, "parallelism": 2, "pack": 1}  # one trial a task: the metrics count them one by one


def samples(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("test"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


def test_metrics_count_trials_by_state_queue_depth_and_durations(
        client: TestClient, migrated: Settings, session_factory: SessionFactory, sent: SentTasks,
        spec_dict: dict[str, Any]) -> None:
    study_id = client.post("/v1/studies", json={**spec_dict, **TINY}).json()["id"]
    first = client.get(f"/v1/studies/{study_id}/trials").json()["items"][0]["id"]
    run_attempt(WorkerContext(migrated, session_factory, sent), first)

    values = samples(client)
    assert values[("scaletune_trials", (("state", "complete"),))] == 1
    assert values[("scaletune_trials", (("state", "queued"),))] == 2, "one left from the start, one topped up"
    assert values[("scaletune_queue_depth", (("queue", "cpu"),))] == 2
    assert values[("scaletune_studies", (("status", "running"),))] == 1
    assert values[("scaletune_trial_duration_seconds_count", ())] == 1
    assert values[("scaletune_trial_duration_seconds_bucket", (("le", "+Inf"),))] == 1
    assert 0 < values[("scaletune_trial_duration_seconds_sum", ())] < 60


def test_worker_log_lines_are_json_with_study_and_trial_ids(
        json_log: io.StringIO, migrated: Settings, session_factory: SessionFactory, storage: Any, sent: SentTasks,
        spec_dict: dict[str, Any]) -> None:
    study = create_study(session_factory, storage, STUDY_SPEC.validate_python({**spec_dict, **TINY, "n_trials": 1,
                                                                                "parallelism": 1}))
    [attempt_id] = dispatch(session_factory, study.id, sent)
    run_attempt(WorkerContext(migrated, session_factory, sent), attempt_id)

    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    ours = [line for line in lines if line["logger"] == "workers.trial_task"]
    assert [line["msg"] for line in ours] == [f"attempt {attempt_id} started (attempt number 1)",
                                              f"attempt {attempt_id} ended complete"]
    assert all(line["study_id"] == study.id and line["trial_id"] == attempt_id and line["level"] == "INFO"
               for line in ours)


def test_request_log_names_the_study_and_leaves_out_the_query(json_log: io.StringIO, client: TestClient) -> None:
    client.get("/v1/studies/abc", params={"token": "secret-in-query"})
    server_lines = [json.loads(line) for line in json_log.getvalue().splitlines()  # the test client (httpx or
                    if not json.loads(line)["logger"].startswith("httpx")]  # httpx2) logs its own URLs
    [line] = [line for line in server_lines if line["logger"] == "service.api.requests"]
    assert line["study_id"] == "abc" and line["status"] == 404 and line["path"] == "/v1/studies/abc"
    assert "secret-in-query" not in json.dumps(server_lines)
