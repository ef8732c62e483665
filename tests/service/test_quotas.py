"""Per-tenant quotas (429 for concurrency, 422 for size, naming the limit) and idempotent study creation."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import optuna
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, func, select

from service.api.app import create_app
from service.db import SessionFactory, create_db_engine, make_session_factory, upgrade_database
from service.kinds.registry import STUDY_SPEC
from service.models import Study
from service.optuna_study import get_storage
from service.quotas import ConcurrencyQuotaExceeded
from service.settings import Settings, TenantQuota
from service.studies import create_study
from service.tokens import create_token


@pytest.fixture
def quota_settings(migrated: Settings) -> Settings:
    return migrated.model_copy(update={
        "MAX_CONCURRENT_STUDIES": 2,
        "TENANT_QUOTAS": {"small": TenantQuota(concurrent_studies=1, trials_per_study=5, steps=300,
                                               proxy_params=100_000)}})


def as_tenant(settings: Settings, session_factory: SessionFactory, tenant: str) -> TestClient:
    token = create_token(session_factory, f"user-of-{tenant}", tenant=tenant)
    return TestClient(create_app(settings), headers={"Authorization": f"Bearer {token}"})


@pytest.fixture
def small(quota_settings: Settings, session_factory: SessionFactory) -> Iterator[TestClient]:
    with as_tenant(quota_settings, session_factory, "small") as client:
        yield client


@pytest.fixture
def big(quota_settings: Settings, session_factory: SessionFactory) -> Iterator[TestClient]:
    with as_tenant(quota_settings, session_factory, "big") as client:
        yield client


def test_concurrent_studies_are_limited_per_tenant_with_429(small: TestClient, big: TestClient,
                                                            spec_dict: dict[str, Any]) -> None:
    spec_dict["n_trials"] = 5
    first = small.post("/v1/studies", json=spec_dict)
    assert first.status_code == 201
    refused = small.post("/v1/studies", json=spec_dict)
    assert refused.status_code == 429
    assert "limit of concurrent studies is 1" in refused.json()["detail"]
    assert [big.post("/v1/studies", json=spec_dict).status_code for _ in range(3)] == [201, 201, 429], \
        "another tenant has the server-wide limit of 2"

    small.post(f"/v1/studies/{first.json()['id']}/cancel")
    assert small.post("/v1/studies", json=spec_dict).status_code == 201, "a finished study frees its slot"


@pytest.mark.parametrize("change,loc,message", [
    ({"n_trials": 6}, ["body", "n_trials"], "limit of 5 trials per study"),
    ({"budget": {"steps": 301, "batch_size": 64, "eval_every": 50}}, ["body", "budget", "steps"],
     "limit of 300 training steps"),
    ({"model": {"family": "mlp", "base": {"width": 64, "depth": 2}, "proxy": {"width": 256, "depth": 2}}},
     ["body", "model", "proxy"], "limit of 100,000"),
])
def test_size_quotas_are_422_naming_the_limit(small: TestClient, big: TestClient, spec_dict: dict[str, Any],
                                              change: dict[str, Any], loc: list[str], message: str) -> None:
    spec_dict["n_trials"] = 5
    spec_dict.update(change)
    response = small.post("/v1/studies", json=spec_dict)
    assert response.status_code == 422, response.text
    [problem] = response.json()["errors"]
    assert problem["loc"] == loc and message in problem["msg"]
    assert big.post("/v1/studies", json=spec_dict).status_code == 201, "the tenant override applies to one tenant"


def test_same_idempotency_key_returns_the_same_study(client: TestClient, spec_dict: dict[str, Any]) -> None:
    headers = {"Idempotency-Key": "submit-42"}
    first = client.post("/v1/studies", json=spec_dict, headers=headers)
    again = client.post("/v1/studies", json=spec_dict, headers=headers)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
    assert client.get("/v1/studies").json()["total"] == 1
    trials = client.get(f"/v1/studies/{first.json()['id']}/trials").json()
    assert trials["total"] == spec_dict["parallelism"], "a replay queues no extra trials"

    conflict = client.post("/v1/studies", json={**spec_dict, "n_trials": 3}, headers=headers)
    assert conflict.status_code == 409 and "different spec" in conflict.json()["detail"]
    other = client.post("/v1/studies", json=spec_dict, headers={"Idempotency-Key": "submit-43"})
    assert other.status_code == 201 and other.json()["id"] != first.json()["id"]


def test_idempotency_keys_are_per_tenant(migrated: Settings, session_factory: SessionFactory,
                                         spec_dict: dict[str, Any]) -> None:
    headers = {"Idempotency-Key": "shared-key"}
    with as_tenant(migrated, session_factory, "a") as a, as_tenant(migrated, session_factory, "b") as b:
        first = a.post("/v1/studies", json=spec_dict, headers=headers)
        second = b.post("/v1/studies", json=spec_dict, headers=headers)
    assert (first.status_code, second.status_code) == (201, 201)
    assert first.json()["id"] != second.json()["id"], "one tenant's key never reveals another tenant's study"


def test_simultaneous_submits_on_postgresql_take_exactly_the_free_slots(postgres_url: str,
                                                                         spec_dict: dict[str, Any]) -> None:
    """Threads submit at once; the gap between each one's count and insert is widened to 0.2 s, so without
    serialisation every thread counts the same free slots and all of them insert."""
    upgrade_database(postgres_url)
    engine = create_db_engine(postgres_url)

    @event.listens_for(engine, "after_cursor_execute")
    def _slow_after_count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "count(*)" in statement and "st_studies" in statement:
            time.sleep(0.2)

    session_factory = make_session_factory(engine)
    storage = get_storage(postgres_url)
    spec = STUDY_SPEC.validate_python({**spec_dict, "n_trials": 5})
    limit, threads = 2, 6
    start = threading.Barrier(threads)

    def submit(tenant: str) -> str:
        start.wait()
        try:
            create_study(session_factory, storage, spec, tenant=tenant, max_unfinished=limit)
        except ConcurrencyQuotaExceeded:
            return "refused"
        return "accepted"

    try:
        with ThreadPoolExecutor(threads) as pool:
            outcomes = list(pool.map(submit, ["acme"] * (threads - 1) + ["other"]))
        with session_factory() as session:
            rows = session.execute(select(Study.tenant, func.count()).group_by(Study.tenant)).all()
    finally:
        engine.dispose()
    assert outcomes.count("accepted") == limit + 1 and outcomes[-1] == "accepted", "another tenant is not held up"
    assert dict(rows) == {"acme": limit, "other": 1}
    assert len(optuna.get_all_study_summaries(storage)) == limit + 1, "refused submits leave no Optuna study"
