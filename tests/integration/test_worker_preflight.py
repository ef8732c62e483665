"""A worker checks its host's configuration when it starts: a wrong one stops it at once (exit 78, EX_CONFIG)
with one message per problem naming the setting to fix, instead of failing the first trial it takes."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from service.embedded import ChildSpec, Supervisor, celery_worker
from service.models import Study
from tests.integration.conftest import child_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

EX_CONFIG = 78


def run_worker(env: dict[str, str], queues: str = "cpu") -> subprocess.CompletedProcess[str]:
    return subprocess.run(celery_worker("preflight", queues).argv, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=180)


def add_study(database_url: str, name: str, spec: dict[str, Any]) -> str:
    with Session(create_engine(database_url)) as session, session.begin():
        study = Study(name=name, kind="tune", spec=spec, optuna_study_name=f"optuna-{name}")
        session.add(study)
        session.flush()
        return study.id


def test_unreachable_services_and_an_unwritable_artifacts_folder_stop_the_worker(tmp_path: Path) -> None:
    (tmp_path / "a-file").touch()
    worker = run_worker(child_env(SCALETUNE_HOME=str(tmp_path / "home"),
                                  SCALETUNE_DATABASE_URL="postgresql://scaletune:secret@127.0.0.1:1/scaletune",
                                  SCALETUNE_BROKER_URL="redis://127.0.0.1:1/0",
                                  SCALETUNE_ARTIFACTS_DIR=str(tmp_path / "a-file" / "artifacts")))
    assert worker.returncode == EX_CONFIG, worker.stderr[-3000:]
    assert "cannot reach the database postgresql+psycopg://scaletune:***@127.0.0.1:1/scaletune" in worker.stderr
    assert "Set SCALETUNE_DATABASE_URL to the database the API uses" in worker.stderr
    assert "secret" not in worker.stderr, "passwords are masked"
    assert "cannot reach the broker redis://127.0.0.1:1/0; set SCALETUNE_BROKER_URL" in worker.stderr
    assert f"SCALETUNE_ARTIFACTS_DIR {tmp_path / 'a-file' / 'artifacts'} is not a writable folder" in worker.stderr
    assert "3 configuration problem(s)" in worker.stderr and "docs/deploy.md" in worker.stderr


@pytest.mark.parametrize("home_exists", [False, True])
def test_the_default_sqlite_file_of_a_remote_host_is_named_as_the_problem(tmp_path: Path, home_exists: bool) -> None:
    if home_exists:  # an empty SQLite file is made on connecting: reachable, but without our tables
        (tmp_path / "home").mkdir()
    worker = run_worker(child_env(SCALETUNE_HOME=str(tmp_path / "home"), SCALETUNE_BROKER_URL="redis://127.0.0.1:1/0"))
    assert worker.returncode == EX_CONFIG
    assert "It is this host's default SQLite file: a worker on another host needs SCALETUNE_DATABASE_URL" in \
        worker.stderr


def test_a_study_needing_a_plugin_or_files_missing_here_stops_the_worker(
        production_env: dict[str, str], tmp_path: Path) -> None:
    url = production_env["SCALETUNE_DATABASE_URL"]
    model = {"family": "mlp", "base": {"width": 16, "depth": 1}, "proxy": {"width": 32, "depth": 1}}
    plugin = add_study(url, "needs-plugin", {"model": {**model, "family": "acme-net"}, "dataset": {"name": "digits"}})
    files = add_study(url, "needs-files", {"model": model, "dataset": {"name": "npz", "args": {"path": "x.npz"}}})
    add_study(url, "other-queue", {"model": {**model, "family": "gpu-only"}, "dataset": {"name": "digits"},
                                   "queue": "gpu"})

    worker = run_worker(production_env, queues="cpu")

    assert worker.returncode == EX_CONFIG, worker.stderr[-3000:]
    assert (f"study {plugin} ('needs-plugin') needs model family 'acme-net', not installed here" in worker.stderr
            and "entry-point group scaletune.families" in worker.stderr)
    assert f"study {files} ('needs-files') needs dataset 'npz', unusable here" in worker.stderr
    assert "give SCALETUNE_DATA_ROOT the same files as on the API host" in worker.stderr
    assert "gpu-only" not in worker.stderr, "a study for a queue this worker does not take is not its concern"


def test_a_well_configured_worker_says_what_it_checked_and_runs(production_env: dict[str, str],
                                                               tmp_path: Path) -> None:
    with Supervisor(log_dir=tmp_path / "logs") as processes:
        worker = processes.start(ChildSpec("worker", celery_worker("ok", "cpu").argv, production_env))
        log, deadline = tmp_path / "logs" / "worker.log", time.monotonic() + 120
        while "ready." not in log.read_text() and time.monotonic() < deadline and worker.poll() is None:
            time.sleep(0.5)
        assert worker.poll() is None, log.read_text()[-3000:]
        assert "worker configuration checked: database, broker, artifacts folder, the studies of queues cpu" in \
            log.read_text()
