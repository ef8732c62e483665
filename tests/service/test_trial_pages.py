"""A study's trials pages, on SQLite and PostgreSQL: every field of every attempt as stored, in queue order, however
the page is reached (offset, cursor, state filter)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, insert

from service.api.app import create_app
from service.db import create_db_engine, make_session_factory, upgrade_database
from service.models import TrialAttempt
from service.settings import Settings

T0 = datetime(2026, 11, 1, 12, 0, 0, 123456, tzinfo=UTC)
NULL_POINT = {"step": None, "samples": None, "flops": None, "train_loss": None, "eval_loss": None, "value": None,
              "phase": None, "shape": None}
# (row as stored, item as the API shows it), in queue order; b and c were queued in the same instant (id breaks it)
ATTEMPTS: list[tuple[dict[str, Any], dict[str, Any]]] = [
    ({"id": "a0000000-0000-4000-8000-000000000000", "number": 0, "state": "complete", "params": {"lr": 0.01, "n": 3},
      "value": 0.25, "intermediate": [{"step": 10, "samples": 320, "flops": 1e9, "train_loss": 1.5, "eval_loss": 1.25},
                                      {"step": 20, "samples": 640, "flops": 2000000000, "train_loss": 1.0,
                                       "eval_loss": 0.25}],
      "worker": "w:1", "queued_at": T0, "started_at": T0 + timedelta(seconds=1),
      "finished_at": T0 + timedelta(seconds=3), "seconds": 2.5, "flops": 3e9},
     {"number": 0, "state": "complete", "params": {"lr": 0.01, "n": 3}, "value": 0.25,
      "intermediate": [{**NULL_POINT, "step": 10, "samples": 320, "flops": 1e9, "train_loss": 1.5, "eval_loss": 1.25},
                       {**NULL_POINT, "step": 20, "samples": 640, "flops": 2e9, "train_loss": 1.0, "eval_loss": 0.25}],
      "worker": "w:1", "queued_at": "2026-11-01T12:00:00.123456Z", "started_at": "2026-11-01T12:00:01.123456Z",
      "finished_at": "2026-11-01T12:00:03.123456Z", "duration_s": 2.5, "flops": 3e9}),
    ({"id": "b0000000-0000-4000-8000-000000000000", "number": 1, "state": "diverged", "params": {"lr": 0.5, "n": 1},
      "value": math.inf, "intermediate": [{"step": 10, "eval_loss": None, "lr": 0.5}], "queued_at": T0 + timedelta(1)},
     {"number": 1, "state": "diverged", "params": {"lr": 0.5, "n": 1}, "value": None,
      "intermediate": [{**NULL_POINT, "step": 10}], "queued_at": "2026-11-02T12:00:00.123456Z"}),
    ({"id": "c0000000-0000-4000-8000-000000000000", "number": 2, "state": "pruned", "params": {"lr": 0.1, "n": 2},
      "value": math.nan, "queued_at": T0 + timedelta(1),
      "intermediate": [{"step": 5, "value": 2.0, "phase": 1, "shape": {"width": 64, "depth": 2}}]},
     {"number": 2, "state": "pruned", "params": {"lr": 0.1, "n": 2}, "value": None,
      "intermediate": [{**NULL_POINT, "step": 5, "value": 2.0, "phase": 1, "shape": {"width": 64, "depth": 2}}],
      "queued_at": "2026-11-02T12:00:00.123456Z"}),
    ({"id": "d0000000-0000-4000-8000-000000000000", "number": 3, "state": "failed", "params": None,
      "intermediate": [], "failure_reason": "error: boom", "queued_at": T0 + timedelta(2)},
     {"number": 3, "state": "failed", "failure_reason": "error: boom", "queued_at": "2026-11-03T12:00:00.123456Z"}),
    ({"id": "e0000000-0000-4000-8000-000000000000", "attempt": 2, "retry_of": "d0000000-0000-4000-8000-000000000000",
      "state": "queued", "params": {"lr": 0.2, "n": 1}, "intermediate": [], "queued_at": T0 + timedelta(3)},
     {"attempt": 2, "retry_of": "d0000000-0000-4000-8000-000000000000", "state": "queued",
      "params": {"lr": 0.2, "n": 1}, "queued_at": "2026-11-04T12:00:00.123456Z"}),
]
NULL_ITEM = {"number": None, "attempt": 1, "retry_of": None, "params": None, "value": None, "intermediate": [],
             "failure_reason": None, "worker": None, "started_at": None, "finished_at": None, "duration_s": None,
             "flops": None}
EXPECTED = [{"id": row["id"], **NULL_ITEM, **item} for row, item in ATTEMPTS]


@pytest.fixture(params=["sqlite", "postgresql"])
def client(request: pytest.FixtureRequest, tmp_path: Path,
           spec_dict: dict[str, Any]) -> Iterator[tuple[TestClient, str]]:
    """The API (auth off) on a database holding one study with the attempts above: (client, study id)."""
    url = f"sqlite:///{tmp_path / 'st.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    settings = Settings(HOME=tmp_path / "home", DATABASE_URL=url, DATA_ROOT=tmp_path / "data", AUTH_DISABLED=True)
    settings.ensure_dirs()
    upgrade_database(url)
    engine = create_db_engine(url)
    try:
        with TestClient(create_app(settings)) as http:
            study_id = http.post("/v1/studies", json={**spec_dict, "parallelism": 1}).raise_for_status().json()["id"]
            with make_session_factory(engine).begin() as session:
                session.execute(delete(TrialAttempt).where(TrialAttempt.study_id == study_id))
                session.execute(insert(TrialAttempt), [{"study_id": study_id, **row} for row, _ in ATTEMPTS])
            yield http, study_id
    finally:
        engine.dispose()


def _by_cursor(http: TestClient, study_id: str, limit: int, **params: Any) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = http.get(f"/v1/studies/{study_id}/trials",
                        params={"limit": limit, **params, **({"cursor": cursor} if cursor else {})}).json()
        assert page["total"] == len([e for e in EXPECTED if params.get("state") in (None, e["state"])])
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items


def test_a_page_shows_every_field_as_stored_null_for_missing_points_and_non_finite_values(
        client: tuple[TestClient, str]) -> None:
    http, study_id = client
    page = http.get(f"/v1/studies/{study_id}/trials").json()
    assert page == {"items": EXPECTED, "total": 5, "limit": 100, "offset": 0, "next_cursor": None}
    assert http.get(f"/v1/studies/{study_id}/trials/2").json() == EXPECTED[2], "one trial reads as in a page"


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_offset_and_cursor_pages_walk_the_same_attempts_in_queue_order(client: tuple[TestClient, str],
                                                                        limit: int) -> None:
    http, study_id = client
    by_offset = []
    for offset in range(0, 6, limit):
        page = http.get(f"/v1/studies/{study_id}/trials", params={"limit": limit, "offset": offset}).json()
        assert page["total"] == 5 and page["offset"] == offset
        by_offset += page["items"]
    assert by_offset == EXPECTED
    assert _by_cursor(http, study_id, limit) == EXPECTED
    deep = http.get(f"/v1/studies/{study_id}/trials", params={"limit": limit, "offset": 10}).json()
    assert deep["items"] == [] and deep["total"] == 5 and deep["next_cursor"] is None


def test_a_state_filter_pages_only_that_state(client: tuple[TestClient, str]) -> None:
    http, study_id = client
    assert _by_cursor(http, study_id, 1, state="diverged") == [EXPECTED[1]]
    page = http.get(f"/v1/studies/{study_id}/trials", params={"state": "queued", "offset": 1}).json()
    assert page["items"] == [] and page["total"] == 1
