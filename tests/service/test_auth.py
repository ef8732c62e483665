"""Tokens and tenants over HTTP: 401 without a valid token, another tenant's study is 404, admins see all."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from typer.testing import CliRunner

from service.api.app import create_app
from service.api.auth import AUTH_COOKIE
from service.cli import app as cli
from service.db import SessionFactory
from service.models import ApiToken
from service.settings import Settings
from service.tokens import TokenNameTaken, authenticate, create_token, revoke_token


@pytest.fixture
def api(migrated: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(migrated)) as test_client:
        yield test_client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_tokens_are_stored_hashed_and_revocable(session_factory: SessionFactory) -> None:
    token = create_token(session_factory, "alice", tenant="vision")
    with session_factory() as session:
        [row] = session.scalars(select(ApiToken)).all()
    assert token.split("_", 2)[2] not in row.hash and row.name == "alice" and not row.admin
    principal = authenticate(session_factory, token)
    assert principal is not None and (principal.tenant, principal.token_name) == ("vision", "alice")
    assert authenticate(session_factory, token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    with pytest.raises(TokenNameTaken):
        create_token(session_factory, "alice")
    assert revoke_token(session_factory, "alice") and not revoke_token(session_factory, "alice")
    assert authenticate(session_factory, token) is None


def test_the_token_store_works_without_the_http_layer() -> None:
    """The CLI and workers use the store; only the API's dependency knows about headers, cookies and FastAPI."""
    loaded = subprocess.run([sys.executable, "-c", "import sys, service.tokens; print(sorted(m for m in sys.modules "
                             "if m.split('.')[0] in ('fastapi', 'starlette') or m.startswith('service.api')))"],
                            capture_output=True, text=True, timeout=120, check=True).stdout.strip()
    assert loaded == "[]"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nonsense"}, {"Authorization": "Basic eDp5"},
                                     {"Authorization": "Bearer st_0123456789abcdef_wrong-secret"}])
@pytest.mark.parametrize("method,path", [("get", "/v1/studies"), ("post", "/v1/studies"),
                                         ("get", "/v1/studies/x"), ("post", "/v1/studies/x/cancel"),
                                         ("get", "/v1/studies/x/trials"), ("get", "/v1/studies/x/events")])
def test_every_study_route_is_401_without_a_valid_token(api: TestClient, headers: dict[str, str], method: str,
                                                         path: str) -> None:
    response = api.request(method, path, headers=headers, json={} if method == "post" else None)
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"


def test_probes_need_no_token(api: TestClient) -> None:
    assert api.get("/healthz").status_code == 200 and api.get("/readyz").status_code == 200


def test_a_tenant_sees_only_its_own_studies_and_an_admin_sees_all(
        api: TestClient, session_factory: SessionFactory, spec_dict: dict[str, Any]) -> None:
    alice = bearer(create_token(session_factory, "alice", tenant="vision"))
    bob = bearer(create_token(session_factory, "bob", tenant="language"))
    root = bearer(create_token(session_factory, "root", tenant="ops", admin=True))
    study_id = api.post("/v1/studies", json=spec_dict, headers=alice).json()["id"]

    for path in (f"/v1/studies/{study_id}", f"/v1/studies/{study_id}/trials", f"/v1/studies/{study_id}/trials/0",
                 f"/v1/studies/{study_id}/events"):
        response = api.get(path, headers=bob)
        assert response.status_code == 404, (path, response.text)
    assert api.post(f"/v1/studies/{study_id}/cancel", headers=bob).status_code == 404
    assert api.get("/v1/studies", headers=bob).json()["total"] == 0

    assert [s["id"] for s in api.get("/v1/studies", headers=alice).json()["items"]] == [study_id]
    assert api.get(f"/v1/studies/{study_id}", headers=alice).status_code == 200
    assert api.get("/v1/studies", headers=root).json()["total"] == 1
    assert api.get(f"/v1/studies/{study_id}", headers=root).json()["status"] == "queued"
    assert api.post(f"/v1/studies/{study_id}/cancel", headers=root).json()["status"] == "cancelled"


def test_the_token_also_works_as_cookie_and_query_parameter(api: TestClient, session_factory: SessionFactory) -> None:
    token = create_token(session_factory, "browser")
    api.cookies.set(AUTH_COOKIE, token)
    assert api.get("/v1/studies").status_code == 200
    api.cookies.clear()
    assert api.get("/v1/studies", params={"token": token}).status_code == 200
    assert api.get("/v1/studies").status_code == 401


def test_auth_disabled_makes_every_caller_admin_of_the_default_tenant(
        migrated: Settings, session_factory: SessionFactory, spec_dict: dict[str, Any]) -> None:
    other = bearer(create_token(session_factory, "other", tenant="elsewhere"))
    with TestClient(create_app(migrated)) as secured:
        secured.post("/v1/studies", json=spec_dict, headers=other)
    with TestClient(create_app(migrated.model_copy(update={"AUTH_DISABLED": True}))) as open_api:
        created = open_api.post("/v1/studies", json={**spec_dict, "name": "local"})
        listed = open_api.get("/v1/studies").json()
    assert created.status_code == 201
    assert listed["total"] == 2, "the no-auth principal is an admin"


def test_token_create_prints_a_working_token_once(migrated: Settings, session_factory: SessionFactory,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCALETUNE_DATABASE_URL", migrated.DATABASE_URL)
    runner = CliRunner()
    result = runner.invoke(cli, ["token", "create", "--name", "ci", "--tenant", "robots", "--admin"])
    assert result.exit_code == 0, result.output
    token = result.stdout.strip()
    principal = authenticate(session_factory, token)
    assert principal is not None and principal.tenant == "robots" and principal.is_admin
    assert runner.invoke(cli, ["token", "create", "--name", "ci"]).exit_code == 1
    assert runner.invoke(cli, ["token", "revoke", "--name", "ci"]).exit_code == 0
    assert authenticate(session_factory, token) is None
