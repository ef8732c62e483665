"""Process orchestration: start scaletune's processes side by side and stop them together.

Used by ``scaletune up`` (API + workers + reconciler on one machine) and by ``scaletune worker``
(one Celery worker process per GPU). Every child runs in its own process group so that stopping
reaches anything it spawned, and (on Linux) dies with its parent even if the parent is SIGKILLed.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO

import httpx

from service.process_status import write_given_up
from service.settings import Settings

_PR_SET_PDEATHSIG = 1
_log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class RestartPolicy:
    """How a supervising loop restarts a child that ended on its own (as systemd's Restart= with a start limit).

    The n-th restart within ``window`` seconds waits ``backoff * 2**(n-1)`` s (at most ``max_backoff``); a child
    that ends more than ``burst`` times within ``window`` is a crash loop and is not restarted again.
    """

    backoff: float = 1.0
    max_backoff: float = 30.0
    burst: int = 5
    window: float = 120.0


def describe_exit(code: int) -> str:
    """``exit code 3`` or ``killed by SIGKILL`` (Popen reports death by signal N as -N)."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


@dataclass
class _Restarts:
    """One child's recent ends (monotonic times) and, while it waits out its backoff, when it starts again."""

    ends: list[float] = field(default_factory=list)
    due: float | None = None
    gave_up: str | None = None


class Supervisor:
    """Owns a set of child processes; ``stop()`` sends SIGTERM to each group, then SIGKILL after ``grace`` s.

    ``restart_ended()``, called from a supervising loop, restarts children that ended under ``policy``.
    """

    def __init__(self, log_dir: Path | None = None, grace: float = 15.0,
                 policy: RestartPolicy = RestartPolicy()) -> None:
        self.log_dir = log_dir
        self.grace = grace
        self.policy = policy
        self.children: list[tuple[ChildSpec, subprocess.Popen[bytes]]] = []
        self._logs: dict[str, IO[bytes]] = {}
        self._restarts: dict[str, _Restarts] = {}

    def start(self, spec: ChildSpec) -> subprocess.Popen[bytes]:
        process = self._spawn(spec)
        self.children.append((spec, process))
        return process

    def _spawn(self, spec: ChildSpec) -> subprocess.Popen[bytes]:
        output: IO[bytes] | None = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            if spec.name not in self._logs:
                self._logs[spec.name] = open(self.log_dir / f"{spec.name}.log", "ab")  # noqa: SIM115 - see stop()
            output = self._logs[spec.name]
        return subprocess.Popen(
            spec.argv,
            env={**os.environ, **spec.env},
            stdout=output,
            stderr=subprocess.STDOUT if output else None,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509 - no threads yet
        )

    def exited(self) -> list[tuple[ChildSpec, int]]:
        """Children that have already ended (and were not restarted), with their exit codes."""
        return [(spec, code) for spec, process in self.children if (code := process.poll()) is not None]

    def given_up(self) -> dict[str, str]:
        """Children in a crash loop, which ``restart_ended()`` no longer restarts: name -> why."""
        return {name: restarts.gave_up for name, restarts in self._restarts.items() if restarts.gave_up}

    def restart_ended(self) -> None:
        """Schedule a restart (with backoff) for each child that ended, start those whose backoff is over."""
        now = time.monotonic()
        for index, (spec, process) in enumerate(self.children):
            code = process.poll()
            restarts = self._restarts.setdefault(spec.name, _Restarts())
            if code is None or restarts.gave_up:
                continue
            if restarts.due is None:
                self._schedule(spec.name, restarts, describe_exit(code), now)
            elif now >= restarts.due:
                restarts.due = None
                self.children[index] = (spec, self._spawn(spec))
                _log.warning("restarted %s", spec.name, extra={"fields": {"child": spec.name}})

    def _schedule(self, name: str, restarts: _Restarts, how: str, now: float) -> None:
        policy = self.policy
        restarts.ends = [t for t in restarts.ends if now - t < policy.window] + [now]
        fields = {"child": name, "exit": how, "ends_in_window": len(restarts.ends)}
        if len(restarts.ends) > policy.burst:
            restarts.gave_up = (f"crash loop: ended {len(restarts.ends)} times within {policy.window:g} s "
                                f"(last: {how}); not restarted again")
            _log.error("gave up on %s: %s", name, restarts.gave_up, extra={"fields": fields})
            return
        delay = min(policy.max_backoff, policy.backoff * 2 ** (len(restarts.ends) - 1))
        restarts.due = now + delay
        _log.warning("%s ended (%s); restarting it in %g s (end %d of at most %d within %g s)", name, how, delay,
                     len(restarts.ends), policy.burst, policy.window, extra={"fields": fields})

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
        for log in self._logs.values():
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


def api_server(host: str, port: int, no_auth: bool, status_file: Path) -> ChildSpec:
    """``scaletune api`` running the reconciler in-process (its actions show on the API's /metrics).

    Its /readyz reports the processes the supervisor gave up on, read from ``status_file``.
    """
    argv = [sys.executable, "-m", "service.cli", "api", "--host", host, "--port", str(port),
            *(["--no-auth"] if no_auth else [])]
    return ChildSpec(name="api", argv=argv, env={"SCALETUNE_RECONCILE_IN_API": "true",
                                                 "SCALETUNE_PROCESS_STATUS_FILE": str(status_file)})


def stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM, so a supervising loop can shut its children down in order."""
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def supervise(supervisor: Supervisor, stop: threading.Event, essential: Collection[str],
              status_file: Path | None = None, tick: Callable[[], None] = lambda: None) -> int:
    """Restart children that end until ``stop`` is set (returns 0) or an ``essential`` one is in a crash loop (1).

    The children given up on are written to ``status_file`` (JSON) for the API's /readyz; ``tick`` runs each round.
    """
    reported: dict[str, str] = {}
    while not stop.wait(0.5):
        supervisor.restart_ended()
        given_up = supervisor.given_up()
        if given_up != reported and status_file is not None:
            write_given_up(status_file, given_up)
        reported = given_up
        if lost := sorted(set(given_up) & set(essential)):
            _log.error("stopping everything: %s cannot be kept running", ", ".join(lost))
            return 1
        tick()
    return 0


def run_processes(specs: Sequence[ChildSpec]) -> int:
    """Run ``specs``, restarting any that ends, until SIGINT/SIGTERM or a crash loop; always stops all of them."""
    stop = stop_on_signals()
    with Supervisor() as supervisor:
        for spec in specs:
            supervisor.start(spec)
        return supervise(supervisor, stop, essential=[spec.name for spec in specs])


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
        if answers(url):
            return True
        stop.wait(0.3)
    return False


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.TransportError:
        return False


def run_up(settings: Settings, host: str, port: int, workers: int, gpus: Sequence[int],
           announce: Callable[[str], None]) -> int:
    """Embedded mode on a migrated database: the API (with the reconciler inside) and workers until SIGINT/SIGTERM.

    A child that ends is restarted with backoff; a worker in a crash loop is reported on /readyz while the API
    stays up; an API in a crash loop stops everything (exit code 1).
    """
    # Children resolve their settings from the environment; an absolute HOME makes them agree with us.
    os.environ["SCALETUNE_HOME"] = str(settings.HOME.resolve())
    status_file = (settings.HOME / "processes.json").resolve()
    write_given_up(status_file, {})
    stop = stop_on_signals()
    base_url = f"http://{_client_host(host)}:{port}"
    announced = threading.Event()

    def announce_once_healthy() -> None:
        if not announced.is_set() and answers(f"{base_url}/healthz"):
            announced.set()
            announce(base_url)

    with Supervisor() as supervisor:
        api = api_server(host, port, settings.AUTH_DISABLED, status_file)
        supervisor.start(api)
        # The only workers on this machine: with GPUs they also take studies queued for cpu (the spec's default).
        for spec in worker_fleet(gpus, workers, "gpu,cpu" if gpus else "cpu"):
            supervisor.start(spec)
        return supervise(supervisor, stop, essential=[api.name], status_file=status_file, tick=announce_once_healthy)
