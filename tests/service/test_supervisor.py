"""The supervisor of `scaletune up` / `scaletune worker`: a child that ends is restarted with backoff and the log
says why; a crash loop is given up on, reported for /readyz, and stops everything only when the child is essential."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.embedded import ChildSpec, RestartPolicy, Supervisor, supervise
from service.process_status import read_given_up
from service.settings import Settings

SLEEPER = ChildSpec("sleeper", [sys.executable, "-c", "import time; time.sleep(600)"])
CRASHER = ChildSpec("crasher", [sys.executable, "-c", "raise SystemExit(3)"])
FAST = RestartPolicy(backoff=0.1, max_backoff=0.4, burst=3, window=60.0)


def supervise_in_thread(supervisor: Supervisor, essential: list[str], status_file: Path | None = None,
                        ) -> tuple[threading.Event, list[int], threading.Thread]:
    stop, result = threading.Event(), []
    thread = threading.Thread(target=lambda: result.append(supervise(supervisor, stop, essential, status_file)))
    thread.start()
    return stop, result, thread


def wait_for(condition, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_a_killed_child_is_restarted_and_the_log_says_why(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="service.embedded")
    with Supervisor(policy=FAST) as supervisor:
        first = supervisor.start(SLEEPER)
        stop, result, thread = supervise_in_thread(supervisor, essential=["sleeper"])
        os.kill(first.pid, signal.SIGKILL)
        wait_for(lambda: supervisor.children[0][1].pid != first.pid)
        assert supervisor.children[0][1].poll() is None, "the new process runs"
        stop.set()
        thread.join()
    assert result == [0] and supervisor.given_up() == {}
    assert "sleeper ended (killed by SIGKILL); restarting it in 0.1 s" in caplog.text
    assert "restarted sleeper" in caplog.text


def test_backoff_doubles_up_to_its_cap(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="service.embedded")
    with Supervisor(policy=RestartPolicy(backoff=0.2, max_backoff=0.5, burst=10, window=60.0)) as supervisor:
        supervisor.start(CRASHER)
        started = time.monotonic()
        wait_for(lambda: (supervisor.restart_ended(), caplog.text.count("restarted crasher") == 3)[1])
        elapsed = time.monotonic() - started
    delays = [line.split("restarting it in ")[1].split(" s")[0] for line in caplog.messages if "restarting it" in line]
    assert delays[:3] == ["0.2", "0.4", "0.5"]
    assert elapsed >= 0.2 + 0.4 + 0.5, "each restart waited out its backoff"


def test_a_crash_loop_of_a_worker_is_reported_while_the_rest_keeps_running(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="service.embedded")
    status_file = tmp_path / "processes.json"
    with Supervisor(policy=FAST) as supervisor:
        api = supervisor.start(SLEEPER)
        supervisor.start(CRASHER)
        stop, result, thread = supervise_in_thread(supervisor, essential=["sleeper"], status_file=status_file)
        wait_for(lambda: "crasher" in read_given_up(status_file))
        time.sleep(1.0)
        assert result == [], "supervision goes on: the essential child is fine"
        assert api.poll() is None and supervisor.children[0][1] is api, "the API was never touched"
        stop.set()
        thread.join()
    assert result == [0]
    reason = read_given_up(status_file)["crasher"]
    assert reason == "crash loop: ended 4 times within 60 s (last: exit code 3); not restarted again"
    assert "gave up on crasher: crash loop" in caplog.text


def test_a_crash_loop_of_an_essential_child_stops_everything() -> None:
    with Supervisor(policy=FAST) as supervisor:
        other = supervisor.start(SLEEPER)
        supervisor.start(CRASHER)
        assert supervise(supervisor, threading.Event(), essential=["crasher"]) == 1
    assert other.poll() is not None, "stopping the supervisor stopped the others"


def test_readyz_says_which_process_is_in_a_crash_loop(migrated: Settings, tmp_path: Path) -> None:
    status_file = tmp_path / "processes.json"
    settings = migrated.model_copy(update={"PROCESS_STATUS_FILE": status_file, "AUTH_DISABLED": True})
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").status_code == 200, "no file yet: nothing given up"
        status_file.write_text('{"given_up": {}}')
        assert client.get("/readyz").json()["checks"] == {"database": "ok", "broker": "ok"}
        status_file.write_text('{"given_up": {"worker-cpu-0": "crash loop: ended 6 times within 120 s"}}')
        response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {"status": "not ready", "checks": {
        "database": "ok", "broker": "ok", "worker-cpu-0": "crash loop: ended 6 times within 120 s"}}
