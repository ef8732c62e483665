"""The issue's tune study over HTTP, through real worker processes, in production and in embedded mode."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

pytestmark = pytest.mark.integration

# The spec, with a shorter budget so twelve trials fit in a test.
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mlp-digits.yaml"
SPEC: dict[str, Any] = {**yaml.safe_load(EXAMPLE.read_text()),
                        "budget": {"steps": 60, "batch_size": 64, "eval_every": 20, "schedule": "cosine"}}
STUDY_TIMEOUT_S = 300.0
FINISHED_STUDY = {"completed", "failed", "cancelled"}


def wait_for_study(client: httpx.Client, study_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + STUDY_TIMEOUT_S
    while time.monotonic() < deadline:
        study = client.get(f"/v1/studies/{study_id}").raise_for_status().json()
        if study["status"] in FINISHED_STUDY:
            return study
        time.sleep(1.0)
    pytest.fail(f"study {study_id} not finished after {STUDY_TIMEOUT_S:.0f} s: {study}")


def all_trials(client: httpx.Client, study_id: str) -> list[dict[str, Any]]:
    page = client.get(f"/v1/studies/{study_id}/trials", params={"limit": 100}).raise_for_status().json()
    return page["items"]


@pytest.fixture(params=["production", "embedded"])
def client(request: pytest.FixtureRequest) -> Iterator[httpx.Client]:
    """production: PostgreSQL + Redis + separate processes; embedded: `scaletune up` with SQLite + filesystem broker."""
    url = str(request.getfixturevalue(f"{request.param}_service"))
    token = str(request.getfixturevalue(f"{request.param}_token"))
    with httpx.Client(base_url=url, timeout=30.0, headers={"Authorization": f"Bearer {token}"}) as client:
        yield client


@pytest.mark.timeout(STUDY_TIMEOUT_S + 180)
def test_tune_study_runs_to_completion(client: httpx.Client) -> None:
    created = client.post("/v1/studies", json=copy.deepcopy(SPEC))
    assert created.status_code == 201, created.text
    study_id = created.json()["id"]

    study = wait_for_study(client, study_id)
    assert study["status"] == "completed", study
    trials = all_trials(client, study_id)

    finished = [t for t in trials if t["state"] in ("complete", "pruned")]
    assert len(finished) == SPEC["n_trials"], [(t["number"], t["state"], t.get("failure_reason")) for t in trials]
    assert sorted(t["number"] for t in finished) == list(range(SPEC["n_trials"]))
    for trial in finished:
        assert set(trial["params"]) == set(SPEC["search_space"])
        if trial["state"] == "complete":
            assert math.isfinite(trial["value"])
            assert trial["intermediate"], "each completed trial reports its eval curve"

    assert study["trial_counts"].get("complete", 0) + study["trial_counts"].get("pruned", 0) == SPEC["n_trials"]
    best = study["best_params"]
    assert set(best) == set(SPEC["search_space"])
    for name, value in best.items():
        space = SPEC["search_space"][name]
        assert space["low"] <= value <= space["high"], (name, value)
    assert study["best_value"] == min(t["value"] for t in finished if t["state"] == "complete")
