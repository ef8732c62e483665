"""Short ids and id prefixes: lists show a unique short id, every route takes a unique prefix, an ambiguous one is a 400
listing the candidates; prefixes resolve among the caller's own studies only."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

import service.studies
from service.api.app import create_app
from service.db import SessionFactory
from service.settings import Settings
from service.tokens import create_token

# Two ids that share their first 12 characters, one alone, and one of another tenant next to the lone one.
TWINS = ("aaaa1111-0000-4000-8000-000000000001", "aaaa1111-0001-4000-8000-000000000002")
LONE = "bbbb2222-0000-4000-8000-000000000003"
FOREIGN = "bbbb2222-0000-4000-8000-000000000004"


@pytest.fixture
def ids(monkeypatch: pytest.MonkeyPatch) -> None:
    """Studies get these ids, in this order, instead of random ones."""
    monkeypatch.setattr(service.studies, "new_id", iter([*TWINS, LONE, FOREIGN]).__next__)


@pytest.fixture
def submitted(ids: None, client: TestClient, migrated: Settings, session_factory: SessionFactory,
              spec_dict: dict[str, Any]) -> Iterator[TestClient]:
    for name in ("twin-a", "twin-b", "lone"):
        assert client.post("/v1/studies", json={**spec_dict, "name": name}).json()["id"] in (*TWINS, LONE)
    other = create_token(session_factory, "other", tenant="elsewhere")
    with TestClient(create_app(migrated), headers={"Authorization": f"Bearer {other}"}) as elsewhere:
        assert elsewhere.post("/v1/studies", json={**spec_dict, "name": "foreign"}).json()["id"] == FOREIGN
    yield client


def test_the_list_shows_the_shortest_unique_prefix_of_at_least_8_characters(submitted: TestClient) -> None:
    items = submitted.get("/v1/studies").json()["items"]
    assert {item["id"]: item["short_id"] for item in items} == {
        TWINS[0]: "aaaa1111-0000", TWINS[1]: "aaaa1111-0001", LONE: "bbbb2222"}  # FOREIGN is not this tenant's


def test_every_route_takes_a_unique_prefix(submitted: TestClient) -> None:
    for ref, study_id in [("aaaa1111-0000", TWINS[0]), ("aaaa1111-0001", TWINS[1]), ("bbbb", LONE),
                          (LONE, LONE)]:
        assert submitted.get(f"/v1/studies/{ref}").json()["id"] == study_id
    trials = submitted.get("/v1/studies/bbbb22/trials").json()
    assert trials["total"] == 2, "the trials of the study the prefix names"
    assert submitted.get("/v1/studies/bbbb22/trials/0").status_code == 404  # queued: no number yet
    cancelled = submitted.post("/v1/studies/aaaa1111-0001/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["id"] == TWINS[1]
    assert cancelled.json()["links"]["self"] == f"/v1/studies/{TWINS[1]}"


def test_an_ambiguous_prefix_is_a_400_listing_the_candidates(submitted: TestClient) -> None:
    for path in ("/v1/studies/aaaa", "/v1/studies/aaaa1111/trials", "/v1/studies/aaaa1111-/cancel"):
        method = "post" if path.endswith("cancel") else "get"
        response = submitted.request(method, path)
        assert response.status_code == 400, response.text
        assert response.headers["content-type"] == "application/problem+json"
        body = response.json()
        assert body["candidates"] == list(TWINS)
        assert all(f"{study_id} (twin-" in body["detail"] for study_id in TWINS), body["detail"]
        assert "give more characters" in body["detail"]
    assert submitted.get("/v1/studies").json()["total"] == 3, "nothing was cancelled"


def test_prefixes_resolve_among_the_callers_studies_only(submitted: TestClient, session_factory: SessionFactory,
                                                          migrated: Settings) -> None:
    assert submitted.get("/v1/studies/bbbb2222-0000-4000-8000-00000000000").json()["id"] == LONE
    assert submitted.get(f"/v1/studies/{FOREIGN}").status_code == 404
    admin = create_token(session_factory, "root", admin=True)
    with TestClient(create_app(migrated), headers={"Authorization": f"Bearer {admin}"}) as as_admin:
        assert as_admin.get("/v1/studies/bbbb").json()["candidates"] == [LONE, FOREIGN]
        shown = {item["id"]: item["short_id"] for item in as_admin.get("/v1/studies").json()["items"]}
    assert shown[LONE] == LONE and shown[FOREIGN] == FOREIGN  # they differ only in the last character


@pytest.mark.parametrize("ref", ["aaa", "zzzz", "aaaa%", "aaaa_", "no-such-study"])
def test_a_prefix_too_short_or_matching_nothing_is_404(submitted: TestClient, ref: str) -> None:
    response = submitted.get(f"/v1/studies/{ref}")
    assert response.status_code == 404 and f"no study with id {ref}" in response.json()["detail"]
