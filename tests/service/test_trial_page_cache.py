"""Trials pages rendered from a cache of trials keyed by row version: the same bytes as the models, never stale."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import TypeAdapter
from sqlalchemy import select, update

from service.api.app import create_app
from service.api.schemas import TrialOut, TrialPage
from service.api.trial_pages import RenderedTrials
from service.db import SessionFactory, create_db_engine, make_session_factory, upgrade_database
from service.models import TrialAttempt, TrialState
from service.settings import Settings
from service.tokens import create_token


@pytest.fixture(params=["sqlite", "postgresql"])
def api(request: pytest.FixtureRequest, settings: Settings) -> Iterator[tuple[TestClient, SessionFactory]]:
    """The API and a session factory on SQLite (no row versions: every trial rendered) and PostgreSQL (cached)."""
    url = settings.DATABASE_URL if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    upgrade_database(url)
    engine = create_db_engine(url)
    factory = make_session_factory(engine)
    token = create_token(factory, "pages", tenant="default")
    with TestClient(create_app(settings.model_copy(update={"DATABASE_URL": url})),
                    headers={"Authorization": f"Bearer {token}"}) as client:
        yield client, factory
    engine.dispose()


def expected_page(factory: SessionFactory, study_id: str, limit: int, offset: int,
                  next_cursor: str | None) -> bytes:
    """What the page was before the cache: TrialPage built from the ORM rows and encoded by pydantic."""
    with factory() as session:
        attempts = list(session.scalars(select(TrialAttempt).where(TrialAttempt.study_id == study_id)
                                        .order_by(TrialAttempt.queued_at, TrialAttempt.id)))
    page = TrialPage(items=[TrialOut.of(a) for a in attempts[offset:offset + limit]], total=len(attempts),
                     limit=limit, offset=offset, next_cursor=next_cursor)
    return TypeAdapter(TrialPage).dump_json(page)


def finish(factory: SessionFactory, attempt_id: str, **values: Any) -> None:
    with factory.begin() as session:
        session.execute(update(TrialAttempt).where(TrialAttempt.id == attempt_id).values(**values))


def test_a_page_is_the_models_json_and_shows_every_change_to_a_trial(api: tuple[TestClient, SessionFactory],
                                                                     spec_dict: dict[str, Any]) -> None:
    client, factory = api
    study_id = client.post("/v1/studies", json={**spec_dict, "n_trials": 4, "parallelism": 4}).json()["id"]
    ids = [t["id"] for t in client.get(f"/v1/studies/{study_id}/trials").json()["items"]]
    now = datetime.now(UTC)
    finish(factory, ids[0], state=TrialState.complete, number=0, params={"lr": 0.01, "width": 64}, value=0.25,
           intermediate=[{"step": 10, "samples": 320, "flops": 1e9, "train_loss": 1.5, "eval_loss": 1.25},
                         {"step": 20, "value": 0.5, "phase": 1, "shape": {"width": 64, "depth": 2}}],
           worker="w:1", started_at=now, finished_at=now, seconds=1.5, flops=2e9)
    finish(factory, ids[1], state=TrialState.failed, number=1, failure_reason="boom", started_at=now,
           finished_at=now)
    finish(factory, ids[2], state=TrialState.running, number=2, params={"lr": 0.002}, started_at=now,
           intermediate=[{"step": 10, "eval_loss": 2.0}])

    first = client.get(f"/v1/studies/{study_id}/trials", params={"limit": 3})
    assert first.status_code == 200 and first.headers["content-type"] == "application/json"
    assert first.content == expected_page(factory, study_id, 3, 0, first.json()["next_cursor"])
    assert client.get(f"/v1/studies/{study_id}/trials", params={"limit": 3}).content == first.content

    # The running trial reports, then ends; the queued one starts: each page shows the rows as they are now.
    finish(factory, ids[2], intermediate=[{"step": 10, "eval_loss": 2.0}, {"step": 20, "eval_loss": 1.75}])
    finish(factory, ids[3], state=TrialState.running, number=3, started_at=now)
    later = client.get(f"/v1/studies/{study_id}/trials", params={"limit": 3})
    assert [p["eval_loss"] for p in later.json()["items"][2]["intermediate"]] == [2.0, 1.75]
    assert later.content == expected_page(factory, study_id, 3, 0, later.json()["next_cursor"])
    finish(factory, ids[2], state=TrialState.complete, value=1.75, finished_at=now)
    for params in ({"limit": 3}, {"limit": 2, "offset": 2}, {"limit": 10}):
        page = client.get(f"/v1/studies/{study_id}/trials", params=params)
        assert page.content == expected_page(factory, study_id, params["limit"], params.get("offset", 0),
                                             page.json()["next_cursor"])
    after_cursor = client.get(f"/v1/studies/{study_id}/trials",
                              params={"limit": 3, "cursor": first.json()["next_cursor"]}).json()
    assert [t["id"] for t in after_cursor["items"]] == ids[3:] and after_cursor["items"][0]["state"] == "running"
    assert [t["id"] for t in client.get(f"/v1/studies/{study_id}/trials",
                                        params={"state": "complete"}).json()["items"]] == ids[:1] + ids[2:3]


def test_rendered_trials_keep_the_most_recently_used_within_their_byte_budget() -> None:
    rendered = RenderedTrials(max_bytes=10)
    rendered.put(("a", "1"), b"aaaa")
    rendered.put(("b", "1"), b"bbbb")
    assert rendered.get(("a", "1")) == b"aaaa"  # now the most recently used
    rendered.put(("c", "1"), b"cccc")
    assert rendered.get(("b", "1")) is None, "the least recently used went first"
    assert rendered.get(("a", "1")) == b"aaaa" and rendered.get(("c", "1")) == b"cccc"
    assert rendered.get(("a", "2")) is None, "another version of a trial is another entry"
    assert rendered.size == 8
