"""Soak: many tune trials over 3 Celery workers in production mode while a chaos loop breaks things.

PostgreSQL + Redis + `scaletune api` + `scaletune reconciler` + 3 Celery worker processes, started as the
integration fault tests start them (tests/integration/conftest.py). A chaos loop SIGKILLs a random worker every
20-40 s (the worker is restarted, as `scaletune worker` restarts its children) and restarts Redis once, when half
the trials have finished. Redis is a private `redis-server` on a free port, so the restart (which loses every
queued message) disturbs no other user of the machine. Checks at the end, per study: it completed with exactly
n_trials finished trials; no Optuna trial number was recorded by two attempts and Optuna agrees with our table on
every finished trial; no attempt or Optuna trial is left queued or running; every lost attempt was retried with
its params (up to MAX_RETRIES); no trial checkpoint is left on disk; no process other than the killed workers ended.

    python bench/soak.py            # 4 studies x 50 trials; figures into docs/reliability.md ("Soak")
    python bench/soak.py --trials-per-study 5 --studies 2 --no-docs   # a quick smoke run

Exit code 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import optuna
import redis
from optuna.trial import TrialState as OptunaState

from common import DOCS, markdown_table, write_section  # also puts the checkout on sys.path
from service.embedded import RestartPolicy, Supervisor
from service.optuna_study import get_storage
from service.trials import is_retryable
from tests.integration.conftest import FAST_RECOVERY, Deployment, deployment, migrated_env, scratch_database
from tests.integration.test_faults import SPEC
from tests.ports import free_port

RELIABILITY_MD = DOCS / "reliability.md"
WORKERS = 3
MAX_RETRIES = 2  # the service's default, stated so the retry check does not depend on the environment
# Restart a killed worker after 1 s, however often it was killed: the chaos loop, not a crash loop, ends it (a
# process ending on its own fails the soak instead, see note_ends).
CHAOS_RESTARTS = RestartPolicy(backoff=1.0, max_backoff=1.0, burst=10**6)
# After the last study completes, one reconciler pass may still have to tell Optuna about a trial whose worker was
# killed mid-way (a trial asked but never recorded waits STALE_AFTER): the checks run once that has had time.
SETTLE_S = float(FAST_RECOVERY["SCALETUNE_STALE_AFTER"]) + 2 * float(FAST_RECOVERY["SCALETUNE_RECONCILE_INTERVAL"])
EX_CONFIG = 78  # a worker's exit code when its start-up check finds a setting it cannot work with
REFUSAL_WINDOW_S = 60.0
FINISHED = ("complete", "pruned", "diverged", "failed", "cancelled")


@dataclass
class Chaos:
    """What the chaos loop did, and which process ends it did not cause."""

    kills: list[tuple[float, str]] = field(default_factory=list)
    killed_pids: set[int] = field(default_factory=set)
    redis_restarts: list[float] = field(default_factory=list)
    redis_outage: tuple[float, float] | None = None  # monotonic: Redis stopped, Redis answered again
    refused_starts: list[str] = field(default_factory=list)
    """Workers (re)started while Redis was down that exited EX_CONFIG: their start-up check cannot reach the broker."""
    unexpected_ends: list[str] = field(default_factory=list)


class PrivateRedis:
    """A redis-server of our own (no persistence: a restart loses every queued message, the worst case)."""

    def __init__(self, log: Path) -> None:
        self.port, self.log = free_port(), log
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                             "--save", "", "--appendonly", "no"], stdout=out, stderr=out)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError(f"redis-server on port {self.port} did not answer; see {self.log}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


def tune_spec(index: int, n_trials: int, steps: int) -> dict[str, Any]:
    """The fault tests' tiny MLP; even studies sample at random, odd ones use TPE with the median pruner."""
    sampler = {"name": "random", "seed": index} if index % 2 == 0 else {"name": "tpe", "seed": index}
    return {**SPEC, "name": f"soak-{index}", "n_trials": n_trials, "parallelism": WORKERS, "sampler": sampler,
            "pruner": {"name": "none" if index % 2 == 0 else "median"},
            "budget": {**SPEC["budget"], "steps": steps}}


def finished_trials(studies: list[dict[str, Any]]) -> int:
    return sum(s["trial_counts"].get(state, 0) for s in studies for state in ("complete", "pruned", "diverged"))


def studies_now(service: Deployment, ids: list[str]) -> list[dict[str, Any]] | None:
    try:
        return [service.client.get(f"/v1/studies/{study_id}").raise_for_status().json() for study_id in ids]
    except httpx.HTTPError:
        return None


def worker_processes(service: Deployment) -> list[tuple[str, subprocess.Popen[bytes]]]:
    return [(spec.name, process) for spec, process in service.processes.children
            if spec.name.startswith("worker-") and process.poll() is None]


def note_ends(service: Deployment, chaos: Chaos, seen: set[int], now: float) -> None:
    """Record every child that ended without our SIGKILL (each once).

    A worker (re)started while Redis is down refuses to start: exit 78 (EX_CONFIG), its start-up check cannot reach
    the broker; it is restarted like a killed one. That is expected until REFUSAL_WINDOW_S after Redis is back (a
    start-up check may still be running then); any other end is not.
    """
    for spec, process in service.processes.children:
        code = process.poll()
        if code is None or process.pid in chaos.killed_pids or process.pid in seen:
            continue
        seen.add(process.pid)
        what = f"{spec.name} (pid {process.pid}) ended with {code}"
        outage = chaos.redis_outage is not None and chaos.redis_outage[0] <= now <= chaos.redis_outage[1] + \
            REFUSAL_WINDOW_S
        (chaos.refused_starts if outage and code == EX_CONFIG else chaos.unexpected_ends).append(what)


def run_chaos(service: Deployment, broker: PrivateRedis, ids: list[str], total: int, args: argparse.Namespace,
              started: float) -> tuple[Chaos, list[dict[str, Any]]]:
    """Kill and restart until every study has finished (or the timeout); the studies as last seen."""
    rng, chaos, seen = random.Random(args.seed), Chaos(), set[int]()
    next_kill = time.monotonic() + rng.uniform(*args.kill_every)
    last_report, studies = 0.0, []
    while time.monotonic() - started < args.timeout:
        note_ends(service, chaos, seen, time.monotonic())
        service.processes.restart_ended()
        now = time.monotonic()
        if now >= next_kill and (alive := worker_processes(service)):
            name, process = rng.choice(alive)
            chaos.killed_pids.add(process.pid)
            os.kill(process.pid, signal.SIGKILL)
            chaos.kills.append((now - started, name))
            next_kill = now + rng.uniform(*args.kill_every)
        if now - last_report >= 5:
            last_report = now
            studies = studies_now(service, ids) or studies
            done = finished_trials(studies) if studies else 0
            print(f"{now - started:6.0f} s: {done}/{total} trials finished, {len(chaos.kills)} kills, "
                  f"{len(chaos.redis_restarts)} Redis restarts", flush=True)
            if chaos.redis_outage is None and done >= total // 2:
                stopped = time.monotonic()
                broker.stop()
                time.sleep(args.redis_down)
                broker.start()
                chaos.redis_outage = (stopped, time.monotonic())
                chaos.redis_restarts.append(stopped - started)
            if studies and all(s["status"] in ("completed", "failed", "cancelled") for s in studies):
                return chaos, studies
        time.sleep(0.5)
    return chaos, studies_now(service, ids) or studies


def check_study(service: Deployment, study: dict[str, Any], artifacts: Path) -> tuple[list[str], Counter[str]]:
    """Everything wrong with one finished study, and its attempts by state."""
    problems: list[str] = []
    trials = service.trials(study["id"])
    n_trials = study["spec"]["n_trials"]
    states = Counter(t["state"] if t["state"] != "failed" else f"failed ({(t['failure_reason'] or '').split(':')[0]})"
                     for t in trials)  # failed attempts by cause: worker_lost, error
    if study["status"] != "completed":
        problems.append(f"status {study['status']}")
    replaced = {t["retry_of"] for t in trials if t["retry_of"]}
    finished = [t for t in trials if t["state"] in FINISHED and t["id"] not in replaced]
    if len(finished) != n_trials:
        problems.append(f"{len(finished)} trials finished, not {n_trials}")
    numbers = [t["number"] for t in trials if t["number"] is not None]
    if len(numbers) != len(set(numbers)):
        problems.append(f"Optuna trial numbers recorded twice: {[n for n, c in Counter(numbers).items() if c > 1]}")
    if left := [t["id"] for t in trials if t["state"] in ("queued", "running")]:
        problems.append(f"attempts left queued or running: {left}")
    by_id = {t["retry_of"]: t for t in trials if t["retry_of"]}
    for failed in (t for t in trials if t["state"] == "failed" and is_retryable(t["failure_reason"] or "")):
        retry = by_id.get(failed["id"])
        if retry is None and failed["attempt"] <= MAX_RETRIES:
            problems.append(f"attempt {failed['id']} ({failed['failure_reason']}) was not retried")
        elif retry is not None and failed["params"] is not None and retry["params"] != failed["params"]:
            problems.append(f"retry {retry['id']} changed the params of {failed['id']}")
    optuna_trials = optuna.load_study(study_name=study["optuna_study_name"],
                                      storage=get_storage(service.env["SCALETUNE_DATABASE_URL"])).trials
    if unfinished := [t.number for t in optuna_trials if t.state in (OptunaState.RUNNING, OptunaState.WAITING)]:
        problems.append(f"Optuna trials left running or waiting: {unfinished}")
    by_number = {t.number: t for t in optuna_trials}
    for trial in (t for t in trials if t["state"] == "complete"):
        told = by_number.get(trial["number"])
        if told is None or told.state != OptunaState.COMPLETE or told.value != trial["value"]:
            problems.append(f"Optuna does not agree on trial {trial['number']}: {told}")
    if left_files := list((artifacts / study["id"] / "trials").glob("*.pt")):
        problems.append(f"checkpoints left behind: {[p.name for p in left_files]}")
    return problems, states


def report(args: argparse.Namespace, chaos: Chaos, wall_s: float, states: Counter[str], retries: int,
           told_by_reconciler: int, problems: list[str], total: int, load: str) -> str:
    kill_gaps = [b[0] - a[0] for a, b in zip(chaos.kills, chaos.kills[1:])]
    rows = [["trials (finished, over all studies)", f"{total} ({args.studies} tune studies x {args.trials_per_study}, "
             f"{args.steps} steps each, eval every {SPEC['budget']['eval_every']})"],
            ["worker processes", f"{WORKERS} (Celery, --pool solo), plus `scaletune api` and `scaletune reconciler`"],
            ["SIGKILLs of a random worker", f"{len(chaos.kills)} (every {args.kill_every[0]:g}-{args.kill_every[1]:g} "
             f"s; mean gap {sum(kill_gaps) / max(1, len(kill_gaps)):.0f} s), each worker restarted by the supervisor"],
            ["Redis restarts", f"{len(chaos.redis_restarts)} (at "
             + ", ".join(f"{t:.0f} s" for t in chaos.redis_restarts) + f", down {args.redis_down:g} s, queue lost)"],
            ["wall time", f"{wall_s / 60:.1f} min"],
            ["attempts by state", ", ".join(f"{state} {count}" for state, count in sorted(states.items()))],
            ["retries (attempts replacing a failed one)", str(retries)],
            ["Optuna trials the reconciler closed (worker killed before telling Optuna)", str(told_by_reconciler)],
            ["workers restarted during the Redis outage that refused to start (exit 78), then restarted",
             str(len(chaos.refused_starts))],
            ["other processes that ended", str(len(chaos.unexpected_ends))],
            ["checks", "all passed" if not problems else "FAILED: " + "; ".join(problems)]]
    return markdown_table(["", ""], rows) + (
        f"\n\nOne command: `python bench/soak.py` (seed {args.seed}), run {datetime.now(UTC):%Y-%m-%d %H:%M} "
        f"UTC on a 2-core machine (load average at the end: {load}; well above 2, the wall time is mostly other "
        "work). Recovery settings as in the fault tests (`HEARTBEAT_INTERVAL=0.5`, `STALE_AFTER=4`, "
        "`RECONCILE_INTERVAL=1`, `REQUEUE_AFTER=8`, `CHECKPOINT_EVERY_EVALS=1`); `MAX_RETRIES` 2 (the default); "
        "one trial per worker task (`pack: 1`, as in the fault tests). "
        "Checks, per study: completed with exactly `n_trials` finished trials; no Optuna trial number recorded by "
        "two attempts, and Optuna holds the same state and value as our table for every completed trial; no "
        "attempt and no Optuna trial left queued, waiting or running; every lost attempt retried with its params; "
        "no trial checkpoint left on disk; no process ended other than the killed workers and, during the Redis "
        "outage, workers whose start-up check could not reach the broker (exit 78; restarted until it could).")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=4)
    parser.add_argument("--trials-per-study", type=int, default=50)
    parser.add_argument("--steps", type=int, default=500, help="training steps per trial (eval every 50)")
    parser.add_argument("--kill-every", type=float, nargs=2, default=(20.0, 40.0), metavar=("MIN_S", "MAX_S"))
    parser.add_argument("--redis-down", type=float, default=5.0, help="seconds Redis stays down on its restart")
    parser.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-docs", action="store_true", help="print the figures, do not write the docs")
    args = parser.parse_args()
    total = args.studies * args.trials_per_study
    tmp = tempfile.mkdtemp(prefix="scaletune-soak-")
    with scratch_database() as database_url:
        logs = Path(tmp) / "logs"
        logs.mkdir()
        broker = PrivateRedis(logs / "redis.log")
        broker.start()
        env = {**migrated_env(database_url, broker.url, Path(tmp) / "home"), **FAST_RECOVERY,
               "SCALETUNE_MAX_RETRIES": str(MAX_RETRIES)}
        try:
            with (Supervisor(log_dir=logs, grace=15.0, policy=CHAOS_RESTARTS) as processes,
                  deployment(processes, env, WORKERS) as service):
                started = time.monotonic()
                ids = [service.submit(tune_spec(i, args.trials_per_study, args.steps)) for i in range(args.studies)]
                chaos, studies = run_chaos(service, broker, ids, total, args, started)
                wall_s = time.monotonic() - started
                time.sleep(SETTLE_S)
                problems, states = list(chaos.unexpected_ends), Counter[str]()
                for study in studies:
                    found, study_states = check_study(service, study, Path(tmp) / "home" / "artifacts")
                    problems += [f"study {study['name']}: {p}" for p in found]
                    states += study_states
                retries = sum(1 for study in studies for t in service.trials(study["id"]) if t["retry_of"])
        finally:
            broker.stop()
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    told = (logs / "reconciler.log").read_text(errors="replace").count('"msg": "reconciler: told_optuna"')
    body = report(args, chaos, wall_s, states, retries, told, problems, total, load)
    print(body)
    if problems:
        print(f"every process's log is kept in {logs}")
        return 1
    shutil.rmtree(tmp)
    if not args.no_docs:
        write_section("Soak", body, RELIABILITY_MD)
    return 0


if __name__ == "__main__":
    sys.exit(main())
