"""The Dockerfile's CMD and every command in docker-compose.yml, run as processes (no Docker engine here).

Each command line is read from the file and run as written, in a temporary home, with only what a container
would change swapped: the published port for a free one, and compose's service hostnames (postgres, redis)
for this machine's PostgreSQL and Redis. Each must serve, keep running or exit as a deployment expects.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import yaml
from sqlalchemy.engine import make_url

from service.embedded import ChildSpec, Supervisor
from tests.integration.conftest import child_env, wait_for_api
from tests.ports import free_port
from tests.integration.test_faults import SPEC

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
COMPOSE: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
TOKEN = re.compile(r"\bst_[0-9a-f]+_[A-Za-z0-9_-]+")


def dockerfile_cmd() -> list[str]:
    [cmd] = [line.removeprefix("CMD ") for line in (ROOT / "Dockerfile").read_text().splitlines()
             if line.startswith("CMD ")]
    return list(json.loads(cmd))


def runnable(command: list[str]) -> list[str]:
    """``scaletune ...`` as installed next to this Python (the image puts the same entry point on PATH)."""
    assert command[0] == "scaletune", command
    return [str(Path(sys.executable).parent / "scaletune"), *command[1:]]


def on_port(command: list[str], port: int) -> list[str]:
    """The command serving on ``port`` instead of the container's 8000 (a later --port wins)."""
    return [*command, "--port", str(port)]


def compose_env(service: str, postgres_url: str, redis_url: str, home: Path) -> dict[str, str]:
    """The service's compose environment, pointed at this machine's servers and a temporary home."""
    env = dict(COMPOSE["services"][service]["environment"])
    assert "@postgres:5432/" in env["SCALETUNE_DATABASE_URL"] and env["SCALETUNE_BROKER_URL"].startswith("redis://redis")
    return child_env(**{**env, "SCALETUNE_DATABASE_URL": postgres_url, "SCALETUNE_BROKER_URL": redis_url,
                        "SCALETUNE_HOME": str(home), "SCALETUNE_DATA_ROOT": str(home / "data")})


def printed_token(log: Path, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while not (found := TOKEN.findall(log.read_text())) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(found) == 1, f"one admin token printed on first start: {log.read_text()[-2000:]}"
    return found[0]


def assert_token_is_admin(base_url: str, token: str) -> None:
    assert httpx.get(f"{base_url}/v1/studies").status_code == 401, "the API is not open to everyone"
    assert httpx.get(f"{base_url}/v1/studies", headers={"Authorization": "Bearer st_0_wrong"}).status_code == 401
    assert httpx.get(f"{base_url}/v1/studies", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_the_image_cmd_serves_on_the_network_and_prints_an_admin_token_on_first_start(
        processes: Supervisor, tmp_path: Path) -> None:
    home, port = tmp_path / "home", free_port()
    home.mkdir()
    processes.start(ChildSpec("cmd", on_port(runnable(dockerfile_cmd()), port), child_env(SCALETUNE_HOME=str(home))))
    base_url = wait_for_api(processes, f"http://127.0.0.1:{port}")
    assert httpx.get(f"{base_url}/readyz").status_code == 200
    token = printed_token(tmp_path / "logs" / "cmd.log")
    assert_token_is_admin(base_url, token)

    processes.stop()  # a restarted container keeps its volume: no second token is made or printed
    again = Supervisor(log_dir=tmp_path / "again")
    try:
        again.start(ChildSpec("cmd", on_port(runnable(dockerfile_cmd()), port), child_env(SCALETUNE_HOME=str(home))))
        wait_for_api(again, base_url)
        assert_token_is_admin(base_url, token)
        assert not TOKEN.search((tmp_path / "again" / "cmd.log").read_text())
    finally:
        again.stop()


def test_the_image_cmd_takes_its_admin_token_from_the_environment(processes: Supervisor, tmp_path: Path) -> None:
    chosen = "st_0123456789abcdef_" + "s" * 43
    port = free_port()
    processes.start(ChildSpec("cmd", on_port(runnable(dockerfile_cmd()), port),
                              child_env(SCALETUNE_HOME=str(tmp_path / "home"), SCALETUNE_BOOTSTRAP_TOKEN=chosen)))
    base_url = wait_for_api(processes, f"http://127.0.0.1:{port}")
    assert_token_is_admin(base_url, chosen)
    assert not TOKEN.search((tmp_path / "logs" / "cmd.log").read_text()), "a chosen token is never printed"


def test_the_image_cmd_refuses_a_malformed_bootstrap_token(tmp_path: Path) -> None:
    result = subprocess.run(on_port(runnable(dockerfile_cmd()), free_port()), capture_output=True, text=True,
                            env={**os.environ, **child_env(SCALETUNE_HOME=str(tmp_path),
                                                           SCALETUNE_BOOTSTRAP_TOKEN="hunter2")},
                            timeout=120)
    assert result.returncode == 2
    assert "SCALETUNE_BOOTSTRAP_TOKEN" in result.stderr and "st_" in result.stderr


def dashboard_studies(processes: Supervisor, command: list[str], postgres_url: str) -> set[str]:
    """Run the dashboard service: its image's ENTRYPOINT (``optuna-dashboard --port 8080 --host 0.0.0.0 --server
    gunicorn``, here on a free loopback port with the default server) on the compose command's storage, which is
    the test database here, through the driver installed here (psycopg 3; the image has psycopg2)."""
    [storage] = command
    assert make_url(storage).get_backend_name() == "postgresql"  # the same database as scaletune's: test_compose.py
    port = free_port()
    processes.start(ChildSpec("optuna-dashboard", [str(Path(sys.executable).parent / "optuna-dashboard"), "--port",
                                                   str(port), postgres_url]))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            listing = httpx.get(f"http://127.0.0.1:{port}/api/studies").raise_for_status().json()
            return {study["study_name"] for study in listing["study_summaries"]}
        except httpx.HTTPError:
            time.sleep(0.5)
    pytest.fail("optuna-dashboard did not answer")


def test_every_compose_command_runs(processes: Supervisor, tmp_path: Path, postgres_url: str,
                                    redis_url: str) -> None:
    services = COMPOSE["services"]
    env = {name: compose_env(name, postgres_url, redis_url, tmp_path / name)
           for name in ("migrate", "api", "reconciler", "worker")}

    migrate = subprocess.run(runnable(services["migrate"]["command"]), env={**os.environ, **env["migrate"]},
                             capture_output=True, text=True, timeout=180)
    assert migrate.returncode == 0, migrate.stdout + migrate.stderr

    port = free_port()
    processes.start(ChildSpec("api", on_port(runnable(services["api"]["command"]), port), env["api"]))
    processes.start(ChildSpec("reconciler", runnable(services["reconciler"]["command"]), env["reconciler"]))
    base_url = wait_for_api(processes, f"http://127.0.0.1:{port}")
    healthcheck = [word.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for word in services["api"]["healthcheck"]["test"]]
    assert healthcheck[0] == "CMD" and healthcheck[1] == "python"
    assert subprocess.run([sys.executable, *healthcheck[2:]], timeout=30).returncode == 0
    token = printed_token(tmp_path / "logs" / "api.log")
    assert_token_is_admin(base_url, token)
    submitted = httpx.post(f"{base_url}/v1/studies", json=SPEC, headers={"Authorization": f"Bearer {token}"})
    assert submitted.status_code == 201, submitted.text
    optuna_name = httpx.get(f"{base_url}/v1/studies/{submitted.json()['id']}",
                            headers={"Authorization": f"Bearer {token}"}).json()["optuna_study_name"]
    assert optuna_name in dashboard_studies(processes, services["optuna-dashboard"]["command"], postgres_url)

    worker = processes.start(ChildSpec("worker", runnable(services["worker"]["command"]), env["worker"]))
    time.sleep(10)
    if torch.cuda.device_count() == 0:  # the service reserves GPUs; without one it must say so, not idle
        assert worker.wait(timeout=120) == 2
        assert "no CUDA device is visible" in (tmp_path / "logs" / "worker.log").read_text()
    else:
        assert worker.poll() is None, "one worker process per GPU keeps running"
    assert [spec.name for spec, _ in processes.exited()] in ([], ["worker"]), "the others keep running"
    assert "Traceback" not in (tmp_path / "logs" / "reconciler.log").read_text()
