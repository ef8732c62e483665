"""Process orchestration: start scaletune's processes side by side and stop them together.

Used by ``scaletune up`` (API + workers + reconciler on one machine) and by ``scaletune worker``
(one Celery worker process per GPU). Every child runs in its own process group so that stopping
reaches anything it spawned, and (on Linux) dies with its parent even if the parent is SIGKILLed.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

import httpx

from service.db import upgrade_database
from service.settings import Settings

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ChildSpec:
    """One process to run: a name for messages and log files, its argv and extra environment."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM this process when its parent dies, so nothing is orphaned."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Supervisor:
    """Owns a set of child processes; ``stop()`` sends SIGTERM to each group, then SIGKILL after ``grace`` s."""

    def __init__(self, log_dir: Path | None = None, grace: float = 15.0) -> None:
        self.log_dir = log_dir
        self.grace = grace
        self.children: list[tuple[ChildSpec, subprocess.Popen[bytes]]] = []
        self._logs: list[IO[bytes]] = []

    def start(self, spec: ChildSpec) -> subprocess.Popen[bytes]:
        output: IO[bytes] | None = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            output = open(self.log_dir / f"{spec.name}.log", "ab")  # noqa: SIM115 - closed in stop()
            self._logs.append(output)
        process = subprocess.Popen(
            spec.argv,
            env={**os.environ, **spec.env},
            stdout=output,
            stderr=subprocess.STDOUT if output else None,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509 - no threads yet
        )
        self.children.append((spec, process))
        return process

    def exited(self) -> list[tuple[ChildSpec, int]]:
        """Children that have already ended, with their exit codes."""
        return [(spec, code) for spec, process in self.children if (code := process.poll()) is not None]

    def stop(self) -> None:
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for _, process in self.children:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self._signal_all(signal.SIGKILL)
        for _, process in self.children:
            process.wait()
        for log in self._logs:
            log.close()

    def _signal_all(self, signum: int) -> None:
        for _, process in self.children:
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signum)
                except ProcessLookupError:
                    pass

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def celery_worker(name: str, queues: str, gpu: int | None = None) -> ChildSpec:
    """One Celery worker process running one trial at a time; pinned to ``gpu`` when given."""
    argv = [
        sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker",
        "--pool", "solo", "--concurrency", "1", "--queues", queues,
        "--hostname", f"{name}.{os.getpid()}@%h", "--loglevel", "INFO",
        # gossip/mingle/heartbeat need broadcast support the filesystem broker lacks; trials don't use them.
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]
    env = {} if gpu is None else {"CUDA_VISIBLE_DEVICES": physical_gpu(gpu)}
    return ChildSpec(name=name, argv=argv, env=env)


def worker_fleet(gpus: Sequence[int], cpu_workers: int, queues: str | None) -> list[ChildSpec]:
    """One worker per listed GPU (queue ``gpu``), or ``cpu_workers`` CPU workers (queue ``cpu``) when none."""
    if gpus:
        return [celery_worker(f"worker-gpu{gpu}-{i}", queues or "gpu", gpu) for i, gpu in enumerate(gpus)]
    return [celery_worker(f"worker-cpu-{i}", queues or "cpu") for i in range(cpu_workers)]


def api_server(host: str, port: int, no_auth: bool) -> ChildSpec:
    """``scaletune api`` running the reconciler in-process, so its actions show on the API's /metrics."""
    argv = [sys.executable, "-m", "service.cli", "api", "--host", host, "--port", str(port),
            *(["--no-auth"] if no_auth else [])]
    return ChildSpec(name="api", argv=argv, env={"SCALETUNE_RECONCILE_IN_API": "true"})


def stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM, so a supervising loop can shut its children down in order."""
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def supervise(supervisor: Supervisor, stop: threading.Event) -> int:
    """Wait until ``stop`` is set (returns 0) or a child ends on its own (returns 1)."""
    while not stop.wait(0.5):
        if ended := supervisor.exited():
            names = ", ".join(f"{spec.name} (exit code {code})" for spec, code in ended)
            print(f"scaletune: stopping everything because a process ended: {names}", file=sys.stderr, flush=True)
            return 1
    return 0


def run_processes(specs: Sequence[ChildSpec]) -> int:
    """Run ``specs`` until SIGINT/SIGTERM or until one of them ends; always stops all of them."""
    stop = stop_on_signals()
    with Supervisor() as supervisor:
        for spec in specs:
            supervisor.start(spec)
        return supervise(supervisor, stop)


def physical_gpu(index: int) -> str:
    """The device id to put in a child's CUDA_VISIBLE_DEVICES for visible GPU ``index``.

    Respects a CUDA_VISIBLE_DEVICES this process was started with (e.g. "2,3" makes index 0 GPU "2").
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",")[index].strip() if visible else str(index)


def _client_host(bind_host: str) -> str:
    """Where a local client reaches a server bound to ``bind_host`` (wildcards mean loopback works)."""
    if bind_host in ("0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{bind_host}]" if ":" in bind_host else bind_host


def wait_until_healthy(url: str, supervisor: Supervisor, stop: threading.Event, timeout: float = 120.0) -> bool:
    """Poll the API's /healthz until it answers, a child ends, a stop is requested or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stop.is_set() and not supervisor.exited():
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        stop.wait(0.3)
    return False


def run_up(settings: Settings, host: str, port: int, workers: int, gpus: Sequence[int],
           announce: Callable[[str], None]) -> int:
    """Embedded mode: migrate, then run the API (with the reconciler inside) and workers until SIGINT/SIGTERM."""
    settings.ensure_dirs()
    upgrade_database(settings.DATABASE_URL)
    # Children resolve their settings from the environment; an absolute HOME makes them agree with us.
    os.environ["SCALETUNE_HOME"] = str(settings.HOME.resolve())
    stop = stop_on_signals()
    with Supervisor() as supervisor:
        supervisor.start(api_server(host, port, settings.AUTH_DISABLED))
        # The only workers on this machine: with GPUs they also take studies queued for cpu (the spec's default).
        for spec in worker_fleet(gpus, workers, "gpu,cpu" if gpus else "cpu"):
            supervisor.start(spec)
        base_url = f"http://{_client_host(host)}:{port}"
        if wait_until_healthy(f"{base_url}/healthz", supervisor, stop):
            announce(base_url)
        return supervise(supervisor, stop)
