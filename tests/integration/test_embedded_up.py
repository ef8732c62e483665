"""`scaletune up` owns its processes: it announces the URL, and leaves nothing running once stopped or killed."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from service.embedded import Supervisor

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
