"""Real processes for end-to-end tests: PostgreSQL + Redis + worker/API/reconciler processes, or `scaletune up`.

Each subprocess logs to a file under the test's tmp_path; a failing test's report shows the tail of every log.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from service.embedded import ChildSpec, Supervisor, wait_until_healthy

SCALETUNE = [sys.executable, "-c", "from service.cli import main; main()"]
POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/15"  # a database number of its own, flushed before and after
LOG_DIR = pytest.StashKey[Path]()
LOG_TAIL_LINES = 150


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> pytest.TestReport:
    report: pytest.TestReport = yield
    log_dir = item.stash.get(LOG_DIR, None)
    if report.failed and log_dir is not None:
        for log in sorted(log_dir.glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
            report.sections.append((f"log of {log.stem} ({log})", "\n".join(tail)))
    return report


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env(**overrides: str) -> dict[str, str]:
    """Environment for a child: unbuffered logs, short reconcile interval, no SCALETUNE_* leaking from outside."""
    cleared = {key: "" for key in os.environ if key.startswith("SCALETUNE_")}
    return {**cleared, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
            "SCALETUNE_RECONCILE_INTERVAL": "2", **overrides}


@pytest.fixture
def processes(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Supervisor]:
    """Started children are stopped at teardown (SIGTERM to each process group, SIGKILL after 15 s)."""
    log_dir = tmp_path / "logs"
    request.node.stash[LOG_DIR] = log_dir
    supervisor = Supervisor(log_dir=log_dir, grace=15.0)
    yield supervisor
    supervisor.stop()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    name = f"scaletune_it_{secrets.token_hex(4)}"
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def redis_url() -> Iterator[str]:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield REDIS_URL
    client.flushdb()
    client.close()


def wait_for_api(supervisor: Supervisor, base_url: str) -> str:
    if not wait_until_healthy(f"{base_url}/healthz", supervisor, threading.Event(), timeout=120.0):
        pytest.fail(f"the API at {base_url} did not become healthy; exited: {supervisor.exited()}")
    return base_url


def issue_token(env: dict[str, str], name: str) -> str:
    """An admin API token, made the way an operator makes one: `scaletune token create`."""
    created = subprocess.run([*SCALETUNE, "token", "create", "--name", name, "--admin"],
                             env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert created.returncode == 0, created.stdout + created.stderr
    return created.stdout.strip()


@pytest.fixture
def production_env(postgres_url: str, redis_url: str, tmp_path: Path) -> dict[str, str]:
    """The environment of every production-mode process, with the database already migrated."""
    env = child_env(SCALETUNE_DATABASE_URL=postgres_url, SCALETUNE_BROKER_URL=redis_url,
                    SCALETUNE_HOME=str(tmp_path / "home"))
    migrated = subprocess.run([*SCALETUNE, "migrate"], env={**os.environ, **env}, capture_output=True, text=True,
                              timeout=180)
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
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
