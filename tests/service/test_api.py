"""The HTTP API over SQLite with a real filesystem broker: create, list, inspect, cancel, errors, probes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from service.api.app import DatabaseNotMigrated, create_app
from service.models import TrialAttempt
from service.settings import Settings


def _broker_messages(settings: Settings) -> list[Path]:
    return sorted(Path(settings.broker_transport_options["data_folder_in"]).glob("*.msg"))


def test_create_study_queues_parallelism_trials(client: TestClient, migrated: Settings,
                                                spec_dict: dict[str, Any]) -> None:
    response = client.post("/v1/studies", json=spec_dict)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "queued"
    assert body["links"]["self"] == f"/v1/studies/{body['id']}"
    assert len(_broker_messages(migrated)) == spec_dict["parallelism"]

    detail = client.get(body["links"]["self"]).json()
    assert detail["spec"]["name"] == "mlp-digits"
    assert detail["trial_counts"]["queued"] == 2 and detail["trial_counts"]["complete"] == 0
    assert detail["best_value"] is None and detail["created_at"]

    trials = client.get(body["links"]["trials"]).json()
    assert trials["total"] == 2
    assert [t["state"] for t in trials["items"]] == ["queued", "queued"]
    assert all(t["number"] is None and t["intermediate"] == [] for t in trials["items"])


def test_list_studies_filters_and_paginates(client: TestClient, spec_dict: dict[str, Any]) -> None:
    ids = [client.post("/v1/studies", json={**spec_dict, "name": f"s{i}"}).json()["id"] for i in range(3)]
    client.post(f"/v1/studies/{ids[0]}/cancel")

    page = client.get("/v1/studies", params={"limit": 2}).json()
    assert page["total"] == 3 and len(page["items"]) == 2
    rest = client.get("/v1/studies", params={"limit": 2, "offset": 2}).json()
    assert {s["id"] for s in page["items"] + rest["items"]} == set(ids)

    cancelled = client.get("/v1/studies", params={"status": "cancelled"}).json()
    assert [s["id"] for s in cancelled["items"]] == [ids[0]]
    assert client.get("/v1/studies", params={"status": "exploded"}).status_code == 422


def test_cancel_stops_queued_trials_and_a_second_cancel_conflicts(client: TestClient,
                                                                  spec_dict: dict[str, Any]) -> None:
    study_id = client.post("/v1/studies", json=spec_dict).json()["id"]
    response = client.post(f"/v1/studies/{study_id}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    detail = client.get(f"/v1/studies/{study_id}").json()
    assert detail["trial_counts"]["queued"] == 0 and detail["trial_counts"]["cancelled"] == 2
    assert detail["finished_at"] is not None

    again = client.post(f"/v1/studies/{study_id}/cancel")
    assert again.status_code == 409
    assert "already cancelled" in again.json()["detail"]


@pytest.mark.parametrize("method,path", [("get", "/v1/studies/{id}"), ("get", "/v1/studies/{id}/trials"),
                                         ("get", "/v1/studies/{id}/trials/0"), ("post", "/v1/studies/{id}/cancel")])
def test_unknown_study_is_404(client: TestClient, method: str, path: str) -> None:
    response = getattr(client, method)(path.format(id="no-such-study"))
    assert response.status_code == 404
    assert "no-such-study" in response.json()["detail"]


def test_unknown_trial_number_is_404(client: TestClient, spec_dict: dict[str, Any]) -> None:
    study_id = client.post("/v1/studies", json=spec_dict).json()["id"]
    response = client.get(f"/v1/studies/{study_id}/trials/7")
    assert response.status_code == 404
    assert "no trial number 7" in response.json()["detail"]


def test_oversized_body_is_413(client: TestClient, spec_dict: dict[str, Any]) -> None:
    spec_dict["model"]["args"] = {"padding": "x" * 300_000}
    response = client.post("/v1/studies", json=spec_dict)
    assert response.status_code == 413
    assert client.get("/v1/studies").json()["total"] == 0


def test_probes_and_openapi(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "broker": "ok"}
    assert client.get("/docs").status_code == 200
    assert "/v1/studies/{study_id}/cancel" in client.get("/openapi.json").json()["paths"]


def test_readyz_is_503_when_the_broker_is_down(migrated: Settings) -> None:
    down = migrated.model_copy(update={"BROKER_URL": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(down)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"] == {"database": "ok", "broker": "unreachable"}


def test_api_refuses_to_start_on_an_unmigrated_database(settings: Settings) -> None:
    with pytest.raises(DatabaseNotMigrated, match="run `scaletune migrate`"):
        with TestClient(create_app(settings)):
            pass


def _page_by_cursor(client: TestClient, study_id: str, limit: int, **params: Any) -> list[str]:
    """Every trial id, following next_cursor from the first page to the one that has none."""
    ids: list[str] = []
    page = client.get(f"/v1/studies/{study_id}/trials", params={"limit": limit, **params}).json()
    while True:
        ids += [t["id"] for t in page["items"]]
        assert len(page["items"]) <= limit
        if page["next_cursor"] is None:
            return ids
        page = client.get(f"/v1/studies/{study_id}/trials",
                          params={"limit": limit, "cursor": page["next_cursor"], **params}).json()


def test_trials_page_by_cursor_in_the_same_order_as_by_offset(client: TestClient, session_factory: Any,
                                                              spec_dict: dict[str, Any]) -> None:
    study_id = client.post("/v1/studies", json={**spec_dict, "n_trials": 7, "parallelism": 7}).json()["id"]
    with session_factory.begin() as session:  # four queued in the same instant: the id breaks the tie
        same = list(session.scalars(select(TrialAttempt.id).where(TrialAttempt.study_id == study_id).limit(4)))
        first = session.scalar(select(TrialAttempt.queued_at).where(TrialAttempt.id == same[0]))
        session.execute(update(TrialAttempt).where(TrialAttempt.id.in_(same)).values(queued_at=first))
    by_offset = [t["id"] for t in client.get(f"/v1/studies/{study_id}/trials", params={"limit": 1000}).json()["items"]]

    for limit in (1, 3, 7, 100):
        assert _page_by_cursor(client, study_id, limit) == by_offset
    assert client.get(f"/v1/studies/{study_id}/trials", params={"limit": 7}).json()["next_cursor"] is None
    assert _page_by_cursor(client, study_id, 2, state="queued") == by_offset
    assert _page_by_cursor(client, study_id, 2, state="running") == []
    second = client.get(f"/v1/studies/{study_id}/trials", params={"limit": 3, "offset": 3}).json()
    assert [t["id"] for t in second["items"]] == by_offset[3:6], "offset paging works as before"
    assert second["next_cursor"] is not None and second["offset"] == 3


@pytest.mark.parametrize("params", [{"cursor": "not-a-cursor"}, {"cursor": "WyJ4IiwgMV0="},
                                    {"cursor": "WyIyMDI2LTAxLTAxVDAwOjAwOjAwKzAwOjAwIiwgIngiXQ==", "offset": 2}])
def test_a_bad_cursor_is_a_422_at_query_cursor(client: TestClient, spec_dict: dict[str, Any],
                                               params: dict[str, Any]) -> None:
    study_id = client.post("/v1/studies", json=spec_dict).json()["id"]
    response = client.get(f"/v1/studies/{study_id}/trials", params=params)
    assert response.status_code == 422, response.text
    assert response.json()["errors"][0]["loc"] == ["query", "cursor"]
