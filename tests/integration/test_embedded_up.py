"""`scaletune up` owns its processes: it announces the URL, restarts a child that dies (the study goes on with no
operator action), and leaves nothing running once stopped or killed."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from service.embedded import ChildSpec, Supervisor
from tests.integration.conftest import FAST_RECOVERY, SCALETUNE, child_env, wait_for_api
from tests.ports import free_port
from tests.integration.test_faults import SPEC, running_with_progress

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def descendants(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except FileNotFoundError:
            continue
        for child in map(int, children):
            found |= {child} | descendants(child)
    return found


def running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def still_running(pids: set[int], within_s: float) -> set[int]:
    deadline = time.monotonic() + within_s
    while (alive := {pid for pid in pids if running(pid)}) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def test_up_announces_its_url_and_stops_everything_on_sigterm(
        processes: Supervisor, embedded_service: str, embedded_home: Path, tmp_path: Path) -> None:
    (_, up), = processes.children
    started = descendants(up.pid)
    assert len(started) >= 2, "the API and one worker run as child processes"
    announcement = f"scaletune is up at {embedded_service}"
    deadline = time.monotonic() + 10  # up polls /healthz itself and may see it a moment after the test did
    while announcement not in (tmp_path / "logs" / "up.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert announcement in (tmp_path / "logs" / "up.log").read_text()
    assert (embedded_home / "scaletune.db").exists()

    up.send_signal(signal.SIGTERM)
    assert up.wait(timeout=60) == 0
    assert not still_running(started, within_s=0)


def test_killing_up_takes_its_children_with_it(processes: Supervisor, embedded_service: str) -> None:
    (_, up), = processes.children
    started = descendants(up.pid)
    assert started

    up.kill()
    up.wait(timeout=10)
    assert not still_running(started, within_s=30)


def test_a_worker_killed_mid_study_is_restarted_and_the_study_completes(
        processes: Supervisor, tmp_path: Path) -> None:
    port = free_port()
    processes.start(ChildSpec("up", [*SCALETUNE, "up", "--no-auth", "--port", str(port)],
                              child_env(SCALETUNE_HOME=str(tmp_path / "home"), **FAST_RECOVERY)))
    base_url = wait_for_api(processes, f"http://127.0.0.1:{port}")
    (_, up), = processes.children
    with httpx.Client(base_url=base_url, timeout=30.0) as client:
        study_id = client.post("/v1/studies", json={**SPEC, "parallelism": 1}).raise_for_status().json()["id"]
        victim = wait_for_running_trial(client, study_id)
        api_before = descendants_named(up.pid, "service.cli")
        os.kill(int(victim["worker"].rsplit(":", 1)[1]), signal.SIGKILL)

        deadline = time.monotonic() + 300
        while (study := poll(client, f"/v1/studies/{study_id}"))["status"] not in ("completed", "failed"):
            assert time.monotonic() < deadline, f"study not finished: {study}"
            time.sleep(0.5)
        trials = client.get(f"/v1/studies/{study_id}/trials", params={"limit": 100}).json()["items"]
        ready = client.get("/readyz")

    assert study["status"] == "completed"
    finished = [t for t in trials if t["state"] == "complete"]
    assert len(finished) == len({t["number"] for t in finished}) == SPEC["n_trials"], "exactly n_trials, none twice"
    assert [(t["id"], t["failure_reason"]) for t in trials if t["state"] == "failed"] == [(victim["id"], "worker_lost")]
    [retry] = [t for t in finished if t["retry_of"] == victim["id"]]
    assert retry["params"] == victim["params"] and retry["worker"] != victim["worker"], "a new worker process ran it"
    assert up.poll() is None, "scaletune up kept running"
    assert descendants_named(up.pid, "service.cli") == api_before, "the API process was never restarted"
    assert ready.status_code == 200, ready.text
    log = (tmp_path / "logs" / "up.log").read_text()
    assert "worker-cpu-0 ended (killed by SIGKILL); restarting it in 1 s" in log
    assert "restarted worker-cpu-0" in log


def poll(client: httpx.Client, path: str) -> dict[str, object]:
    """The resource, or an empty one while a busy machine keeps the API from answering within the timeout."""
    try:
        return dict(client.get(path).raise_for_status().json())
    except httpx.TimeoutException:
        return {"status": None}


def wait_for_running_trial(client: httpx.Client, study_id: str) -> dict[str, object]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        trials = client.get(f"/v1/studies/{study_id}/trials").json()["items"]
        if running := [t for t in trials if running_with_progress(t)]:
            return running[0]
        time.sleep(0.2)
    pytest.fail(f"no trial started running: {trials}")


def descendants_named(pid: int, needle: str) -> set[int]:
    """The descendants of ``pid`` whose command line contains ``needle``."""
    return {child for child in descendants(pid)
            if needle in Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")}
