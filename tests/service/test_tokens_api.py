"""Token management over HTTP (/v1/tokens) for admins: create, list, revoke, expiry; everyone else gets 403."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update
from typer.testing import CliRunner

from service.api.app import create_app
from service.cli import app as cli
from service.db import SessionFactory, write_session
from service.models import ApiToken
from service.settings import Settings
from service.tokens import authenticate, create_token


@pytest.fixture
def admin(migrated: Settings, session_factory: SessionFactory) -> Iterator[TestClient]:
    token = create_token(session_factory, "root", admin=True)
    with TestClient(create_app(migrated), headers={"Authorization": f"Bearer {token}"}) as test_client:
        yield test_client


@pytest.mark.parametrize(("method", "path", "body"), [("post", "/v1/tokens", {"name": "sneaky", "admin": True}),
                                                      ("get", "/v1/tokens", None),
                                                      ("delete", "/v1/tokens/test-user", None)])
def test_a_non_admin_gets_403_and_changes_nothing(client: TestClient, session_factory: SessionFactory, method: str,
                                                  path: str, body: dict[str, object] | None) -> None:
    response = client.request(method, path, json=body)
    assert response.status_code == 403, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert "not an admin token" in response.json()["detail"]
    assert client.get("/v1/studies").status_code == 200, "the caller's own token still works"
    with session_factory() as session:
        assert session.query(ApiToken).filter_by(name="sneaky").count() == 0


def test_an_admin_creates_lists_and_revokes_a_token(admin: TestClient, session_factory: SessionFactory,
                                                   spec_dict: dict[str, object]) -> None:
    created = admin.post("/v1/tokens", json={"name": "alice", "tenant": "vision"})
    assert created.status_code == 201, created.text
    body = created.json()
    assert (body["name"], body["tenant"], body["admin"], body["expires_at"], body["state"]) == (
        "alice", "vision", False, None, "active")
    alice = {"Authorization": f"Bearer {body['token']}"}
    assert admin.post("/v1/studies", json=spec_dict, headers=alice).status_code == 201
    assert admin.get("/v1/tokens", headers=alice).status_code == 403, "a token made by an admin is not one"

    listed = admin.get("/v1/tokens").json()["items"]
    assert [(t["name"], t["state"]) for t in listed] == [("root", "active"), ("alice", "active")]
    assert all(set(t) == {"name", "tenant", "admin", "created_at", "expires_at", "state"} for t in listed)
    again = admin.post("/v1/tokens", json={"name": "alice"})
    assert again.status_code == 409 and "already exists" in again.json()["detail"]

    revoked = admin.delete("/v1/tokens/alice")
    assert revoked.status_code == 200 and revoked.json()["state"] == "revoked"
    assert admin.get("/v1/studies", headers=alice).status_code == 401
    assert admin.delete("/v1/tokens/alice").status_code == 404
    assert [t["state"] for t in admin.get("/v1/tokens").json()["items"]] == ["active", "revoked"]


def test_a_token_stops_working_when_it_expires(admin: TestClient, session_factory: SessionFactory) -> None:
    body = admin.post("/v1/tokens", json={"name": "temp", "expires_in_days": 30}).json()
    expires_at = datetime.fromisoformat(body["expires_at"])
    assert abs(expires_at - (datetime.now(UTC) + timedelta(days=30))) < timedelta(minutes=5)
    temp = {"Authorization": f"Bearer {body['token']}"}
    assert admin.get("/v1/studies", headers=temp).status_code == 200

    with write_session(session_factory) as session:  # thirty days later
        session.execute(update(ApiToken).where(ApiToken.name == "temp")
                        .values(expires_at=datetime.now(UTC) - timedelta(seconds=1)))
    refused = admin.get("/v1/studies", headers=temp)
    assert refused.status_code == 401 and "expired" in refused.json()["detail"]
    assert authenticate(session_factory, body["token"]) is None
    assert {t["name"]: t["state"] for t in admin.get("/v1/tokens").json()["items"]}["temp"] == "expired"


@pytest.mark.parametrize("body", [{"name": "has/slash"}, {"name": ""}, {"name": "x", "expires_in_days": 0},
                                  {"name": "x", "expires_in_days": 100_000}, {"name": "x", "tenant": "a b"}])
def test_a_bad_token_request_is_422_at_the_field(admin: TestClient, body: dict[str, object]) -> None:
    response = admin.post("/v1/tokens", json=body)
    assert response.status_code == 422, response.text
    [error] = response.json()["errors"]
    assert error["loc"][0] == "body" and error["loc"][1] in body


def test_the_cli_creates_an_expiring_token_and_lists_tokens(migrated: Settings, session_factory: SessionFactory,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCALETUNE_DATABASE_URL", migrated.DATABASE_URL)
    runner = CliRunner()
    created = runner.invoke(cli, ["token", "create", "--name", "ci", "--expires-in-days", "7"])
    assert created.exit_code == 0, created.output
    assert authenticate(session_factory, created.stdout.strip()) is not None
    runner.invoke(cli, ["token", "create", "--name", "old"])
    runner.invoke(cli, ["token", "revoke", "--name", "old"])
    listed = runner.invoke(cli, ["token", "list"], env={"COLUMNS": "200"})
    assert listed.exit_code == 0, listed.output
    rows = {line.split()[1]: line for line in listed.output.splitlines() if line.startswith("│")}
    in_a_week = (datetime.now(UTC) + timedelta(days=7)).strftime("%Y-%m-%d")
    assert in_a_week in rows["ci"] and "active" in rows["ci"]
    assert "never" in rows["old"] and "revoked" in rows["old"]
