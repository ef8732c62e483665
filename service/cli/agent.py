"""The ``scaletune agent`` command: run the user's own command once per trial of an external study (like `wandb agent`).

Each slot (one, or one per GPU) asks for a trial, runs the command with the trial in its environment while
renewing the trial's lease, and tells ``failed`` (with the tail of the command's stderr) when the command exits
non-zero or exits without telling. It stops when the study has nothing left to ask. Interrupted, it ends its
commands without telling: their leases run out and their params are handed out again. Its client (and the
command's, through ``current_trial()``) retries asks, reports, renewals and tells on transport errors, 5xx and
429 with bounded backoff (PATIENT_RETRIES, honouring Retry-After), so a restarting API costs no trial.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Annotated

import typer

from service.cli.client_commands import StudyId, error_console, server_errors

if TYPE_CHECKING:
    from scaletune.client import Client
    from scaletune.trial import Trial

STDERR_TAIL_CHARS = 4000
STOP_GRACE_S = 10.0


@dataclass
class _Budget:
    """How many more trials this agent may start (None: as many as the study has), shared by its slots."""

    left: int | None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self) -> bool:
        with self.lock:
            if self.left is None:
                return True
            if self.left <= 0:
                return False
            self.left -= 1
            return True


class _StderrTail:
    """Passes the command's stderr through and keeps its last STDERR_TAIL_CHARS characters for the failure reason."""

    def __init__(self, stream: IO[str]) -> None:
        self._chunks: collections.deque[str] = collections.deque()
        self._size = 0
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in iter(stream.readline, ""):
            sys.stderr.write(line)
            self._chunks.append(line)
            self._size += len(line)
            while self._size > STDERR_TAIL_CHARS and len(self._chunks) > 1:
                self._size -= len(self._chunks.popleft())

    def text(self) -> str:
        self._thread.join(timeout=5.0)
        return "".join(self._chunks)[-STDERR_TAIL_CHARS:]


def trial_env(client: Client, trial: Trial, gpu: str | None) -> dict[str, str]:
    """The command's environment: ours plus the trial (what ``scaletune.current_trial()`` reads)."""
    from scaletune.trial import ENV_PARAMS, ENV_STUDY, ENV_TOKEN, ENV_TRIAL, ENV_URL

    env = {**os.environ, ENV_URL: client.url, ENV_STUDY: trial.study_id, ENV_TRIAL: str(trial.number),
           ENV_PARAMS: json.dumps(trial.params)}
    token = os.environ.get(ENV_TOKEN)
    if token:
        env[ENV_TOKEN] = token
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


def _stop(process: subprocess.Popen[str]) -> None:
    process.terminate()
    try:
        process.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def run_one(client: Client, trial: Trial, command: list[str], gpu: str | None, stopping: threading.Event) -> str:
    """Run the command for one trial; returns the state the trial ended in (as the server recorded it)."""
    from scaletune.client import ScaletuneError
    from scaletune.trial import LeaseKeeper

    process = subprocess.Popen(command, env=trial_env(client, trial, gpu), stderr=subprocess.PIPE, text=True,
                               errors="replace")
    assert process.stderr is not None
    tail = _StderrTail(process.stderr)
    with LeaseKeeper(client, trial.study_id, trial.number, trial.lease_seconds) as keeper:
        while process.poll() is None:
            if keeper.lost.wait(0.5) or stopping.is_set():
                _stop(process)
    if stopping.is_set():
        return "running"  # not told: its lease runs out and its params are handed out again
    if keeper.lost.is_set():
        return "lost"
    code = process.returncode
    reason = (f"the command exited with code {code}; its stderr ended with:\n{tail.text()}" if code
              else "the command exited 0 without telling a value (call trial.tell(value) in it)")
    try:
        trial.fail(reason)  # told already (by the command) -> the server answers what was told
    except ScaletuneError as error:
        error_console.print(f"trial {trial.number}: could not tell it failed: {error}", markup=False)
        return "unknown"
    return trial.state


def serve_slot(client: Client, study_id: str, command: list[str], gpu: str | None, budget: _Budget,
               stopping: threading.Event, worker: str, errors: list[str]) -> None:
    """Ask, run, repeat until the study has nothing left to ask, the budget is spent or the agent stops."""
    from scaletune.client import Conflict, ScaletuneError

    while not stopping.is_set() and budget.take():
        try:
            trial = client.ask(study_id, worker=worker)
        except Conflict as error:
            error_console.print(f"nothing left to ask: {error}", markup=False, soft_wrap=True)
            return
        except ScaletuneError as error:
            error_console.print(f"error: {error}", style="red", markup=False, soft_wrap=True)
            errors.append(str(error))
            return
        where = f" on GPU {gpu}" if gpu is not None else ""
        print(f"trial {trial.number}{where}: {json.dumps(trial.params)}", flush=True)
        state = run_one(client, trial, command, gpu, stopping)
        print(f"trial {trial.number} ended: {state}", flush=True)


def agent(
    study_id: StudyId,
    command: Annotated[list[str], typer.Argument(help="The command to run per trial, after `--`.",
                                                 show_default=False)],
    count: Annotated[int | None, typer.Option(min=1, help="Run at most this many trials, then exit.")] = None,
    gpus: Annotated[str | None, typer.Option(help="Comma-separated GPU ids: one trial at a time per GPU, each "
                                                  "with CUDA_VISIBLE_DEVICES set to its id.")] = None,
) -> None:
    """Run your own training command once per trial of an external study, until it has nothing left to ask.

    The command finds its trial with scaletune.current_trial() (from SCALETUNE_URL, SCALETUNE_TOKEN,
    SCALETUNE_STUDY, SCALETUNE_TRIAL and SCALETUNE_PARAMS in its environment), reports and tells through it.
    The agent renews the trial's lease while the command runs and tells the trial failed, with the tail of its
    stderr, when it exits non-zero. Start agents on as many machines as you like for one study.

    Example: scaletune agent 3f2c0e9a-... --gpus 0,1 -- python train.py --data input.txt
    """
    from scaletune.client import PATIENT_RETRIES, Client

    slots: list[str | None] = [g.strip() for g in gpus.split(",") if g.strip()] if gpus else [None]
    if not slots:
        raise typer.BadParameter("give GPU ids like 0,1", param_hint="--gpus")
    stopping = threading.Event()
    budget = _Budget(count)
    errors: list[str] = []
    host = f"{socket.gethostname()}:{os.getpid()}"
    with server_errors():
        client = Client(retries=PATIENT_RETRIES)
        client.study(study_id)  # fail fast on a wrong id, URL or token
        threads = [threading.Thread(target=serve_slot, name=f"slot-{gpu}", daemon=True,
                                    args=(client, study_id, command, gpu, budget, stopping,
                                          host if gpu is None else f"{host}/gpu{gpu}", errors))
                   for gpu in slots]
        previous = signal.signal(signal.SIGTERM, lambda *_: stopping.set())
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                while thread.is_alive():
                    thread.join(0.5)
        except KeyboardInterrupt:
            stopping.set()
            for thread in threads:
                thread.join()
            raise typer.Exit(130) from None
        finally:
            signal.signal(signal.SIGTERM, previous)
    if stopping.is_set():
        raise typer.Exit(143)
    if errors:
        raise typer.Exit(1)
