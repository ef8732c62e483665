"""The SSE event stream: frames from persisted events, resume with Last-Event-ID, live delivery, end of stream."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from scaletune.client import parse_sse
from service.api import events as events_api
from service.db import SessionFactory, write_session
from service.models import EventType, Study, StudyStatus
from service.studies import add_event
from service.tokens import create_token


def _add(session_factory: SessionFactory, study_id: str, type_: EventType, payload: dict[str, Any],
         finish: bool = False) -> None:
    with write_session(session_factory) as session:
        add_event(session, study_id, type_, payload)
        if finish:
            session.execute(update(Study).where(Study.id == study_id).values(status=StudyStatus.completed))


def _frames(text: str) -> list[tuple[str | None, str, dict[str, Any]]]:
    return [(frame_id, kind, json.loads(data)) for frame_id, kind, data in parse_sse(text.splitlines())]


@pytest.fixture
def study_id(client: TestClient, spec_dict: dict[str, Any]) -> str:
    return str(client.post("/v1/studies", json=spec_dict).json()["id"])


def test_stream_sends_every_event_in_order_and_ends_after_study_finished(
        client: TestClient, session_factory: SessionFactory, study_id: str) -> None:
    _add(session_factory, study_id, EventType.trial_started, {"attempt": 1, "worker": "w"})
    _add(session_factory, study_id, EventType.trial_reported, {"step": 50, "eval_loss": 1.5})
    _add(session_factory, study_id, EventType.study_finished, {"status": "completed"}, finish=True)

    response = client.get(f"/v1/studies/{study_id}/events")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    frames = _frames(response.text)
    assert [kind for _, kind, _ in frames] == ["trial_started", "trial_reported", "study_finished"]
    ids = [int(frame_id) for frame_id, _, _ in frames if frame_id]
    assert ids == sorted(ids) and len(ids) == 3
    assert frames[1][2]["payload"] == {"step": 50, "eval_loss": 1.5}
    assert all(data["study_id"] == study_id and int(frame_id or 0) == data["id"] for frame_id, _, data in frames)


def test_reconnecting_with_last_event_id_resumes_after_it(client: TestClient, session_factory: SessionFactory,
                                                          study_id: str) -> None:
    for step in (10, 20, 30):
        _add(session_factory, study_id, EventType.trial_reported, {"step": step})
    _add(session_factory, study_id, EventType.study_finished, {"status": "completed"}, finish=True)
    first = _frames(client.get(f"/v1/studies/{study_id}/events").text)
    second_id = first[1][0]

    resumed = _frames(client.get(f"/v1/studies/{study_id}/events", headers={"Last-Event-ID": str(second_id)}).text)
    assert [data["payload"].get("step") for _, _, data in resumed] == [30, None]
    assert resumed == first[2:]
    by_query = _frames(client.get(f"/v1/studies/{study_id}/events", params={"after": second_id}).text)
    assert by_query == resumed


def test_events_written_while_streaming_arrive_with_keepalives_between(
        client: TestClient, session_factory: SessionFactory, study_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events_api, "POLL_S", 0.05)
    monkeypatch.setattr(events_api, "KEEPALIVE_S", 0.2)

    def writer() -> None:
        time.sleep(0.6)
        _add(session_factory, study_id, EventType.trial_reported, {"step": 1})
        time.sleep(0.6)
        _add(session_factory, study_id, EventType.study_finished, {"status": "completed"}, finish=True)

    thread = threading.Thread(target=writer)
    thread.start()
    response = client.get(f"/v1/studies/{study_id}/events")
    thread.join()
    assert ": keep-alive" in response.text.split("event: trial_reported")[0]
    assert [kind for _, kind, _ in _frames(response.text)] == ["trial_reported", "study_finished"]


def test_stream_of_a_finished_study_without_new_events_ends_at_once(
        client: TestClient, session_factory: SessionFactory, study_id: str) -> None:
    client.post(f"/v1/studies/{study_id}/cancel")
    frames = _frames(client.get(f"/v1/studies/{study_id}/events").text)
    assert [(kind, data["payload"]["status"]) for _, kind, data in frames] == [("study_finished", "cancelled")]
    last = frames[-1][0]
    started = time.monotonic()
    assert _frames(client.get(f"/v1/studies/{study_id}/events", headers={"Last-Event-ID": str(last)}).text) == []
    assert time.monotonic() - started < 5.0


def test_events_of_unknown_study_is_404(client: TestClient) -> None:
    response = client.get("/v1/studies/nope/events")
    assert response.status_code == 404 and "nope" in response.json()["detail"]


def test_events_need_a_token_and_take_it_from_the_cookie_the_web_page_sets(
        client: TestClient, session_factory: SessionFactory, study_id: str) -> None:
    _add(session_factory, study_id, EventType.study_finished, {"status": "completed"}, finish=True)
    bearer = client.headers.pop("Authorization")
    assert client.get(f"/v1/studies/{study_id}/events").status_code == 401
    client.cookies.set("scaletune_token", bearer.removeprefix("Bearer "))  # EventSource cannot send headers
    assert [kind for _, kind, _ in _frames(client.get(f"/v1/studies/{study_id}/events").text)] == ["study_finished"]


def test_another_tenants_events_are_not_found(client: TestClient, session_factory: SessionFactory,
                                              study_id: str) -> None:
    other = create_token(session_factory, "other-tenant", tenant="other")
    response = client.get(f"/v1/studies/{study_id}/events", headers={"Authorization": f"Bearer {other}"})
    assert response.status_code == 404
