"""Real processes for end-to-end tests: PostgreSQL + Redis + worker/API/reconciler processes, or `scaletune up`.

Each subprocess logs to a file under the test's tmp_path; a failing test's report shows the tail of every log.
"""

from __future__ import annotations

import os
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis

from service.db import create_db_engine, make_session_factory, upgrade_database
from service.embedded import ChildSpec, Supervisor, celery_worker, wait_until_healthy
from service.settings import Settings
from service.tokens import create_token
from tests.ports import free_port

SCALETUNE = [sys.executable, "-c", "from service.cli import main; main()"]
POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
# A database number of its own, flushed before and after; parallel runs on one machine each pick another, and
# each process of a parallel run (pytest -n: gw0, gw1, ...) takes the next number down from it.
REDIS_URL = os.environ.get("SCALETUNE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
REDIS_DB = int(REDIS_URL.rsplit("/", 1)[1]) - int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:])
LOG_DIR = pytest.StashKey[Path]()
LOG_TAIL_LINES = 150
FAST_RECOVERY = {"SCALETUNE_HEARTBEAT_INTERVAL": "0.5", "SCALETUNE_STALE_AFTER": "4",
                 "SCALETUNE_RECONCILE_INTERVAL": "1", "SCALETUNE_REQUEUE_AFTER": "8",
                 "SCALETUNE_CHECKPOINT_EVERY_EVALS": "1"}
STUDY_TIMEOUT_S = 180.0


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> pytest.TestReport:
    report: pytest.TestReport = yield
    log_dir = item.stash.get(LOG_DIR, None)
    if report.failed and log_dir is not None:
        for log in sorted(log_dir.glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
            report.sections.append((f"log of {log.stem} ({log})", "\n".join(tail)))
    return report


def child_env(**overrides: str) -> dict[str, str]:
    """Environment for a child: unbuffered logs, short reconcile interval, no SCALETUNE_* leaking from outside."""
    cleared = {key: "" for key in os.environ if key.startswith("SCALETUNE_")}
    return {**cleared, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
            "SCALETUNE_RECONCILE_INTERVAL": "2", **overrides}


@pytest.fixture
def processes(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Supervisor]:
    """Started children are stopped at teardown (SIGTERM to each process group, SIGKILL after 3 s: the test is
    over, and a worker's warm shutdown would wait for its trial)."""
    log_dir = tmp_path / "logs"
    request.node.stash[LOG_DIR] = log_dir
    supervisor = Supervisor(log_dir=log_dir, grace=3.0)
    yield supervisor
    supervisor.stop()


@contextmanager
def scratch_database() -> Iterator[str]:
    """A new, empty PostgreSQL database of its own (dropped afterwards): its SQLAlchemy URL."""
    name = f"scaletune_it_{secrets.token_hex(4)}"
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_url() -> Iterator[str]:
    with scratch_database() as url:
        yield url


@pytest.fixture
def redis_url() -> Iterator[str]:
    url = f"{REDIS_URL.rsplit('/', 1)[0]}/{REDIS_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


def wait_for_api(supervisor: Supervisor, base_url: str) -> str:
    """The message of a failed start carries the logs' last lines: CI's summary shows the message, not the report."""
    if not wait_until_healthy(f"{base_url}/healthz", supervisor, threading.Event(), timeout=120.0):
        pytest.fail(f"the API at {base_url} did not become healthy; exited: {supervisor.exited()}\n"
                    f"{last_log_lines(supervisor)}")
    return base_url


def last_log_lines(supervisor: Supervisor, lines: int = 20) -> str:
    if supervisor.log_dir is None:
        return ""
    return "\n".join(f"{log.stem}: {line}" for log in sorted(supervisor.log_dir.glob("*.log"))
                     for line in log.read_text(errors="replace").splitlines()[-lines:])


def settings_of(env: dict[str, str]) -> Settings:
    """The settings a child process started with ``env`` reads from it."""
    return Settings(**{key.removeprefix("SCALETUNE_"): value for key, value in env.items()
                       if key.startswith("SCALETUNE_") and value})


def issue_token(env: dict[str, str], name: str) -> str:
    """An admin API token in the database the children of ``env`` use.

    Made in this process by the function `scaletune token create` calls (the command has tests of its own):
    a subprocess would import torch again, and every test here needs a token.
    """
    engine = create_db_engine(settings_of(env).DATABASE_URL)
    try:
        return create_token(make_session_factory(engine), name, admin=True)
    finally:
        engine.dispose()


@pytest.fixture
def production_env(postgres_url: str, redis_url: str, tmp_path: Path) -> dict[str, str]:
    """The environment of every production-mode process, with the database already migrated."""
    return migrated_env(postgres_url, redis_url, tmp_path / "home")


def migrated_env(database_url: str, broker_url: str, home: Path) -> dict[str, str]:
    """A production-mode child environment on this database and broker, migrated in this process by the
    function `scaletune migrate` calls (the command itself runs in test_container_commands)."""
    env = child_env(SCALETUNE_DATABASE_URL=database_url, SCALETUNE_BROKER_URL=broker_url, SCALETUNE_HOME=str(home))
    settings_of(env).ensure_dirs()
    upgrade_database(database_url)
    return env


@pytest.fixture
def production_service(processes: Supervisor, production_env: dict[str, str]) -> str:
    """PostgreSQL + Redis, `scaletune migrate`, then worker, API and reconciler as separate processes."""
    port = free_port()
    processes.start(ChildSpec("worker", [*SCALETUNE, "worker"], production_env))
    processes.start(ChildSpec("reconciler", [*SCALETUNE, "reconciler"], production_env))
    processes.start(ChildSpec("api", [*SCALETUNE, "api", "--host", "127.0.0.1", "--port", str(port)],
                              production_env))
    return wait_for_api(processes, f"http://127.0.0.1:{port}")


@pytest.fixture
def production_token(production_service: str, production_env: dict[str, str]) -> str:
    return issue_token(production_env, "it-production")


@pytest.fixture
def embedded_home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def embedded_service(processes: Supervisor, embedded_home: Path) -> str:
    """`scaletune up` as a subprocess: SQLite and the filesystem broker under a fresh SCALETUNE_HOME."""
    port = free_port()
    processes.start(ChildSpec("up", [*SCALETUNE, "up", "--port", str(port)],
                              child_env(SCALETUNE_HOME=str(embedded_home))))
    return wait_for_api(processes, f"http://127.0.0.1:{port}")


@pytest.fixture
def embedded_token(embedded_service: str, embedded_home: Path) -> str:
    return issue_token(child_env(SCALETUNE_HOME=str(embedded_home)), "it-embedded")


@dataclass
class Deployment:
    """A running production-mode deployment and an authenticated client for its API."""

    processes: Supervisor
    env: dict[str, str]
    port: int
    client: httpx.Client

    def start_api(self, name: str = "api") -> None:
        """Start an API process and wait for it (an API killed earlier by the test does not count as a failure)."""
        api = self.processes.start(ChildSpec(name, [*SCALETUNE, "api", "--host", "127.0.0.1",
                                                    "--port", str(self.port)], self.env))
        deadline = time.monotonic() + 120
        while api.poll() is None and time.monotonic() < deadline:
            try:
                if self.client.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        pytest.fail(f"the API {name} did not become healthy (exit code {api.poll()})\n"
                    f"{last_log_lines(self.processes)}")

    def start_worker(self, name: str) -> None:
        spec = celery_worker(name, "cpu")
        self.processes.start(ChildSpec(name, spec.argv, {**spec.env, **self.env}))

    def submit(self, spec: dict[str, Any]) -> str:
        response = self.client.post("/v1/studies", json=spec)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    def trials(self, study_id: str) -> list[dict[str, Any]]:
        return self.client.get(f"/v1/studies/{study_id}/trials", params={"limit": 1000}).raise_for_status() \
            .json()["items"]

    def terminate_database_connections(self) -> int:
        return terminate_backends(self.env["SCALETUNE_DATABASE_URL"])

    def wait_for_trials(self, study_id: str, found: Callable[[list[dict[str, Any]]], bool],
                        timeout_s: float = 120.0) -> list[dict[str, Any]]:
        """The first listing of the study's trials that `found` accepts: one snapshot, so its facts agree."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if found(trials := self.trials(study_id)):
                return trials
            time.sleep(0.2)
        pytest.fail(f"no matching trials in {timeout_s:.0f} s: {self.trials(study_id)}")

    def wait_for_trial(self, study_id: str, found: Callable[[dict[str, Any]], bool],
                       timeout_s: float = 120.0) -> dict[str, Any]:
        trials = self.wait_for_trials(study_id, lambda listed: any(map(found, listed)), timeout_s)
        return next(t for t in trials if found(t))

    def wait_until_finished(self, study_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + STUDY_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                study = self.client.get(f"/v1/studies/{study_id}").raise_for_status().json()
            except httpx.TransportError:  # the API may be restarting
                study = {}
            if study.get("status") in ("completed", "failed", "cancelled"):
                return study
            time.sleep(0.5)
        pytest.fail(f"study {study_id} did not finish in {STUDY_TIMEOUT_S:.0f} s: {self.trials(study_id)}")


@contextmanager
def deployment(processes: Supervisor, env: dict[str, str], workers: int) -> Iterator[Deployment]:
    """Reconciler, ``workers`` Celery workers (worker-a, worker-b, ...) and the API, with an admin client."""
    token = issue_token(env, "faults")
    port = free_port()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30.0,
                      headers={"Authorization": f"Bearer {token}"}) as client:
        result = Deployment(processes, env, port, client)
        processes.start(ChildSpec("reconciler", [*SCALETUNE, "reconciler"], env))
        for index in range(workers):
            result.start_worker(f"worker-{chr(ord('a') + index)}")
        result.start_api()
        yield result


@pytest.fixture
def service(processes: Supervisor, production_env: dict[str, str]) -> Iterator[Deployment]:
    """API, reconciler and two workers; the test starts nothing else unless it needs to."""
    with deployment(processes, {**production_env, **FAST_RECOVERY}, workers=2) as result:
        yield result


def terminate_backends(database_url: str) -> int:
    """Kill every PostgreSQL connection to the test database (the server stays up for everyone else)."""
    database = database_url.rsplit("/", 1)[1]
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
        rows = admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             "WHERE datname = %s AND pid <> pg_backend_pid()", (database,)).fetchall()
    return len(rows)
