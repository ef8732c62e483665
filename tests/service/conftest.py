"""Fixtures for service tests: a migrated SQLite database per test, a real filesystem broker, the API client."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.auth import create_token
from service.db import SessionFactory, create_db_engine, make_session_factory, upgrade_database
from service.optuna_study import get_storage
from service.settings import Settings

EXAMPLE_SPEC: dict[str, Any] = {
    "name": "mlp-digits",
    "kind": "tune",
    "model": {"family": "mlp", "base": {"width": 64, "depth": 2}, "proxy": {"width": 128, "depth": 2}, "args": {}},
    "parametrization": "mup",
    "optimizer": "adamw",
    "dataset": {"name": "digits"},
    "budget": {"steps": 200, "batch_size": 64, "eval_every": 50, "schedule": "cosine"},
    "search_space": {
        "lr": {"type": "float", "low": 1.0e-4, "high": 1.0e-1, "log": True},
        "output_mult": {"type": "float", "low": 0.25, "high": 8.0, "log": True},
    },
    "hyperparameters": {"weight_decay": 0.0},
    "objective": {"metric": "eval_loss", "direction": "minimize"},
    "n_trials": 12,
    "parallelism": 2,
    "sampler": {"name": "tpe", "seed": 0},
    "pruner": {"name": "none"},
    "enqueue": [],
}


class SentTasks(list[tuple[str, str]]):
    """The dispatcher's send function for tests: records (attempt_id, queue) instead of talking to a broker."""

    def __call__(self, attempt_id: str, queue: str) -> None:
        self.append((attempt_id, queue))

    def ids(self) -> list[str]:
        return [attempt_id for attempt_id, _ in self]


@pytest.fixture
def spec_dict() -> dict[str, Any]:
    return copy.deepcopy(EXAMPLE_SPEC)


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
def client(migrated: Settings, session_factory: SessionFactory) -> Iterator[TestClient]:
    """The API in-process, calling as a (non-admin) token of tenant 'default'."""
    token = create_token(session_factory, "test-user", tenant="default")
    with TestClient(create_app(migrated), headers={"Authorization": f"Bearer {token}"}) as test_client:
        yield test_client
