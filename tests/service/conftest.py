"""Fixtures for service tests: a migrated SQLite database per test, a real filesystem broker, the API client."""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
import yaml
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.db import SessionFactory, create_db_engine, make_session_factory, upgrade_database
from service.optuna_study import get_storage
from service.settings import Settings
from service.tokens import create_token
from tests.integration.conftest import scratch_database
from tests.ports import free_port

# The spec, exactly as shipped for users in examples/.
EXAMPLE_SPEC: dict[str, Any] = yaml.safe_load(
    (Path(__file__).resolve().parents[2] / "examples" / "mlp-digits.yaml").read_text())


class SentTasks(list[tuple[str, str]]):
    """The dispatcher's send function for tests: records (attempt_id, queue) instead of talking to a broker."""

    def __call__(self, attempt_id: str, queue: str) -> None:
        self.append((attempt_id, queue))

    def ids(self) -> list[str]:
        return [attempt_id for attempt_id, _ in self]


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A throwaway database on the local PostgreSQL server, dropped afterwards (plain psycopg URL scheme)."""
    with scratch_database() as url:
        yield url.replace("postgresql+psycopg://", "postgresql://", 1)


@pytest.fixture
def spec_dict() -> dict[str, Any]:
    return copy.deepcopy(EXAMPLE_SPEC)


@pytest.fixture
def tiny_spec(spec_dict: dict[str, Any]) -> dict[str, Any]:
    """One trial of a 1k-parameter MLP, 20 steps, evaluated twice: a worker runs it in a second or so."""
    spec_dict["model"] = {"family": "mlp", "base": {"width": 16, "depth": 1}, "proxy": {"width": 32, "depth": 1}}
    spec_dict["budget"] = {"steps": 20, "batch_size": 32, "eval_every": 10, "schedule": "cosine"}
    spec_dict["search_space"] = {"lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}
    spec_dict.update(n_trials=1, parallelism=1)
    return spec_dict


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    result = Settings(HOME=tmp_path / "home", DATABASE_URL=f"sqlite:///{tmp_path / 'st.db'}",
                      DATA_ROOT=tmp_path / "data", HEARTBEAT_INTERVAL=0.2, STALE_AFTER=60, REQUEUE_AFTER=300,
                      MAX_RETRIES=2)
    result.ensure_dirs()
    return result


@pytest.fixture
def migrated(settings: Settings) -> Settings:
    upgrade_database(settings.DATABASE_URL)
    return settings


@pytest.fixture
def session_factory(migrated: Settings) -> Iterator[SessionFactory]:
    engine = create_db_engine(migrated.DATABASE_URL)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def storage(migrated: Settings) -> Any:
    return get_storage(migrated.DATABASE_URL)


@pytest.fixture
def sent() -> SentTasks:
    return SentTasks()


@pytest.fixture
def live_url(migrated: Settings) -> Iterator[str]:
    """The API served by uvicorn on a loopback port in a thread, for clients in other processes."""
    server = uvicorn.Server(uvicorn.Config(create_app(migrated), host="127.0.0.1", port=free_port(),
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{server.config.port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def client(migrated: Settings, session_factory: SessionFactory) -> Iterator[TestClient]:
    """The API in-process, calling as a (non-admin) token of tenant 'default'."""
    token = create_token(session_factory, "test-user", tenant="default")
    with TestClient(create_app(migrated), headers={"Authorization": f"Bearer {token}"}) as test_client:
        yield test_client
