"""Service overhead: one TPE study run as a bare in-process Optuna loop and through the service, same trials.

    .venv/bin/python bench/service_overhead.py [--quick] [--no-docs] [--redis-db 14]
    .venv/bin/python bench/service_overhead.py --packs [--rounds 3] [--pack 16] [--no-docs]

(a) bare: ``optuna.create_study`` in memory, ``ask`` / ``run_trial`` with a report-and-prune callback / ``tell``
in this process. (b) service: a fresh PostgreSQL database, a Redis database number of its own, ``scaletune api``
and ONE Celery worker process (solo pool) as subprocesses, the study submitted over HTTP with a token from
``scaletune token create`` and polled until it ends. Per-trial phases come from the attempt rows; a replay of
the worker's database and Optuna calls against the same database prices them one by one. Writes the
``## Service overhead`` section of docs/benchmarks.md. Drops the database, flushes the Redis database and
stops the subprocesses (by process group) on the way out, also on Ctrl-C.

``--packs``: the same two arms in rounds, their order alternating round by round (the machine's load drifts;
alternating spreads it over both arms): each round runs the study bare (unpacked, as above) and through the
service with ``parallelism`` = ``pack`` = ``--pack``, so the worker trains the trials in packs. Reports the
service/bare trials-per-hour ratio per round, its median and spread, and the dispatch latency (attempt queued ->
its pack's training started). Writes the ``## Service overhead with packs`` section.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import optuna
import psycopg
import redis
from common import ROOT, markdown_table, single_thread, write_section  # also puts the checkout on sys.path
from sqlalchemy import select

from scaletune.runner import run_trial
from scaletune.train import EvalPoint
from service.db import create_db_engine, make_session_factory, upgrade_database
from service.embedded import ChildSpec, Supervisor, celery_worker, wait_until_healthy
from service.models import Event, EventType, Study, TrialAttempt
from service.kinds.registry import STUDY_SPEC
from service.kinds.tune import KIND as TUNE
from service.optuna_study import get_storage
from service.spec import TuneSpec
from service.studies import study_is_cancelled
from service.trials import record_asked, record_point
from tests.ports import free_port

POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
SCALETUNE = [sys.executable, "-m", "service.cli"]
SECTION = "Service overhead"
PACKS_SECTION = "Service overhead with packs"
EVALS_PER_TRIAL = 5
TARGET_RATIO = 0.95
TARGET_P50_MS = 100.0
POLL_S = 0.5
STUDY_TIMEOUT_S = 240.0
REPLAY_REPEATS = 7
DISPATCH_PHASES = ("queued -> claimed (commit, Redis, Celery, claim row)",  # the dispatch latency's two parts
                   "claimed -> train() entered (Optuna load + ask, rows, dataset, model build)")


def tune_spec(name: str, steps: int, n_trials: int, pack: int = 1) -> dict[str, Any]:
    """A tiny muP MLP on digits; EVALS_PER_TRIAL reports per trial whatever the step count."""
    return {
        "name": name, "kind": "tune",
        "model": {"family": "mlp", "base": {"width": 64, "depth": 2}, "proxy": {"width": 64, "depth": 2}},
        "parametrization": "mup", "optimizer": "adamw", "dataset": {"name": "digits", "seed": 0},
        "budget": {"steps": steps, "batch_size": 64, "eval_every": steps // EVALS_PER_TRIAL, "schedule": "cosine"},
        "search_space": {"lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
                         "output_mult": {"type": "float", "low": 0.25, "high": 4.0, "log": True}},
        "n_trials": n_trials, "parallelism": pack, "pack": pack, "sampler": {"name": "tpe", "seed": 0},
        "pruner": {"name": "none"},
    }


def ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f}"


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


@dataclass
class Run:
    """One arm's study: wall seconds, per-trial training seconds, per-phase seconds lists, trial states."""

    wall: float
    train: list[float]
    phases: dict[str, list[float]]
    states: list[str]

    def trials_per_hour(self) -> float:
        return 3600 * len(self.train) / self.wall


# ---------------------------------------------------------------- (a) bare in-process Optuna loop

def bare_study(spec_dict: dict[str, Any]) -> Run:
    """ask / run_trial / tell in this process, the same callback work minus the database."""
    spec = TuneSpec.model_validate(spec_dict)
    dists = TUNE.distributions(spec)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=0),
                                pruner=optuna.pruners.NopPruner())  # the spec's pruner "none", as in the service
    phases: dict[str, list[float]] = {"ask": [], "setup (dataset, model build)": [], "tell": [],
                                      "train(): start -> 1st eval reported": [],
                                      "train(): eval reported -> next eval reported": [],
                                      "train(): last eval reported -> trial end": []}
    train_s, states = [], []
    started = time.perf_counter()
    for _ in range(spec.n_trials):
        t0 = time.perf_counter()
        trial = study.ask(dists)
        t1 = time.perf_counter()

        reported: list[float] = []

        def report(point: EvalPoint, trial: optuna.Trial = trial, reported: list[float] = reported) -> bool:
            trial.report(point.eval_loss, point.step)
            pruned = trial.should_prune()
            reported.append(time.perf_counter())
            return pruned

        result = run_trial(TUNE.trial_config(spec, trial.params), report)
        t2 = time.perf_counter()
        train_start = t2 - result.seconds
        phases["train(): start -> 1st eval reported"].append(reported[0] - train_start)
        phases["train(): eval reported -> next eval reported"] += [b - a for a, b in zip(reported, reported[1:])]
        phases["train(): last eval reported -> trial end"].append(t2 - reported[-1])
        value = result.final_eval_loss if result.status == "completed" else None
        study.tell(trial, value if value is not None else float("inf"))
        t3 = time.perf_counter()
        phases["ask"].append(t1 - t0)
        phases["setup (dataset, model build)"].append(t2 - t1 - result.seconds)
        phases["tell"].append(t3 - t2)
        train_s.append(result.seconds)
        states.append(result.status)
    return Run(time.perf_counter() - started, train_s, phases, states)


# ---------------------------------------------------------------- (b) the service

@dataclass
class Service:
    """A running API + one worker against a fresh database; ``client`` carries the token."""

    url: str
    client: httpx.Client
    session_factory: Any


def child_env(database_url: str, broker_url: str, home: Path) -> dict[str, str]:
    cleared = {key: "" for key in os.environ if key.startswith("SCALETUNE_")}
    return {**cleared, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "SCALETUNE_DATABASE_URL": database_url,
            "SCALETUNE_BROKER_URL": broker_url, "SCALETUNE_HOME": str(home)}


def issue_token(env: dict[str, str]) -> str:
    """The way an operator makes one: ``scaletune token create``."""
    created = subprocess.run([*SCALETUNE, "token", "create", "--name", "bench", "--admin"], cwd=ROOT,
                             env={**os.environ, **env}, capture_output=True, text=True, timeout=120, check=True)
    return created.stdout.strip()


def wait_for_worker_ready(log: Path, supervisor: Supervisor, started: float, timeout_s: float = 120.0) -> float:
    """Celery logs ``ready.`` once it consumes; returns the seconds since ``started`` (monotonic)."""
    while time.monotonic() - started < timeout_s:
        if log.exists() and b" ready." in log.read_bytes():
            return time.monotonic() - started
        if supervisor.exited():
            raise RuntimeError(f"a service process ended: {supervisor.exited()}; see {log.parent}")
        time.sleep(0.1)
    raise RuntimeError(f"the worker was not ready within {timeout_s:.0f} s; see {log}")


def submit_and_wait(service: Service, spec: dict[str, Any]) -> tuple[str, float]:
    """POST the spec, poll until the study ends; returns its id and the wall clock (epoch s) just before the POST."""
    posted = time.time()
    response = service.client.post("/v1/studies", json=spec)
    response.raise_for_status()
    study_id = str(response.json()["id"])
    deadline = time.monotonic() + STUDY_TIMEOUT_S
    while time.monotonic() < deadline:
        status = service.client.get(f"/v1/studies/{study_id}").raise_for_status().json()["status"]
        if status in ("completed", "failed", "cancelled"):
            if status != "completed":
                raise RuntimeError(f"study {study_id} ended {status}")
            return study_id, posted
        time.sleep(POLL_S)
    raise RuntimeError(f"study {study_id} did not finish in {STUDY_TIMEOUT_S:.0f} s")


def service_run(service: Service, study_id: str, posted: float) -> tuple[Run, list[float]]:
    """Phases from the attempt rows; training start = finished_at - seconds (train()'s own perf_counter span).

    Returns the run and the dispatch latencies: attempt row inserted (queued_at) -> train() entered.
    """
    with service.session_factory() as session:
        study = session.get_one(Study, study_id)
        rows = list(session.scalars(select(TrialAttempt).where(TrialAttempt.study_id == study_id)
                                    .order_by(TrialAttempt.queued_at)))
        reports = session.execute(select(Event.trial_id, Event.created_at).where(
            Event.study_id == study_id, Event.type == EventType.trial_reported).order_by(Event.id)).all()
    assert study.finished_at is not None and all(r.started_at and r.finished_at and r.seconds for r in rows)
    start = [r.finished_at.timestamp() - r.seconds for r in rows]  # type: ignore[union-attr, operator]
    queued = [r.queued_at.timestamp() for r in rows]
    claimed = [r.started_at.timestamp() for r in rows]  # type: ignore[union-attr]
    ended = [r.finished_at.timestamp() for r in rows]  # type: ignore[union-attr]
    phases = {
        "POST -> first attempt queued (API)": [queued[0] - posted],
        "trial end -> next queued (finish row, Optuna tell, top-up)": [queued[i] - ended[i - 1]
                                                                       for i in range(1, len(rows))],
        DISPATCH_PHASES[0]: [c - q for q, c in zip(queued, claimed)],
        DISPATCH_PHASES[1]: [s - c for c, s in zip(claimed, start)],
        "last trial end -> study completed": [study.finished_at.timestamp() - ended[-1]],
    }
    reported: dict[str, list[float]] = {}
    for trial_id, created_at in reports:
        reported.setdefault(trial_id, []).append(created_at.timestamp())
    phases["train(): start -> 1st eval reported"] = [reported[r.id][0] - s for r, s in zip(rows, start)]
    phases["train(): eval reported -> next eval reported"] = [
        b - a for r in rows for a, b in zip(reported[r.id], reported[r.id][1:])]
    phases["train(): last eval reported -> trial end"] = [e - reported[r.id][-1] for r, e in zip(rows, ended)]
    latencies = [s - q for q, s in zip(queued, start)]
    run = Run(study.finished_at.timestamp() - posted, [r.seconds for r in rows], phases,  # type: ignore[misc]
              [r.state for r in rows])
    return run, latencies


def replay_calls(service: Service, study_id: str) -> dict[str, float]:
    """Median seconds of each database / Optuna call a worker makes per trial, replayed here on the same database.

    Runs after the study ended (its rows were already read); the asked trials are failed again at once.
    """
    with service.session_factory() as session:
        study = session.get_one(Study, study_id)
        attempt_id = session.scalars(select(TrialAttempt.id).where(TrialAttempt.study_id == study_id)).first()
    spec = STUDY_SPEC.validate_python(study.spec)
    assert isinstance(spec, TuneSpec) and attempt_id is not None
    storage = get_storage(service.url)
    point = {"step": 1, "samples": 64, "flops": 1.0, "train_loss": 1.0, "eval_loss": 1.0}
    timings: dict[str, list[float]] = {}

    def timed(name: str, call: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        result = call()
        timings.setdefault(name, []).append(time.perf_counter() - started)
        return result

    for _ in range(REPLAY_REPEATS):
        timed("spec validation", lambda: STUDY_SPEC.validate_python(study.spec))
        loaded = timed("Optuna: load study + sampler", lambda: TUNE.load_optuna_study(
            storage, study.optuna_study_name, spec, None))
        trial = timed("Optuna: ask (TPE over the finished trials)", lambda: loaded.ask(TUNE.distributions(spec)))
        timed("ours: record asked params", lambda: record_asked(service.session_factory, attempt_id,
                                                              trial.number, trial.params))
        timed("Optuna: report (per eval)", lambda: trial.report(1.0, 1))
        timed("Optuna: should_prune (per eval)", trial.should_prune)
        timed("ours: record eval point + event (per eval)", lambda: record_point(
            service.session_factory, attempt_id, point))
        timed("ours: is the study cancelled? (per eval)", lambda: study_is_cancelled(
            service.session_factory, study_id))
        timed("Optuna: tell", lambda: loaded.tell(trial, state=optuna.trial.TrialState.FAIL))
    return {name: statistics.median(values) for name, values in timings.items()}


# ---------------------------------------------------------------- report

def phase_rows(run: Run) -> list[list[Any]]:
    return [[name, len(values), ms(statistics.median(values)), ms(sum(values) / len(values))]
            for name, values in run.phases.items()]


def report(results: list[dict[str, Any]], replay: dict[str, float], setup: dict[str, float],
           args: argparse.Namespace, load: tuple[float, ...]) -> str:
    rows = []
    for r in results:
        bare, svc = r["bare"], r["service"]
        ratio = svc.trials_per_hour() / bare.trials_per_hour()
        lat = r["latency"]
        rows.append([r["steps"], len(bare.train), f"{statistics.median(bare.train):.3f}",
                     f"{statistics.median(svc.train):.3f}", f"{bare.trials_per_hour():,.0f}",
                     f"{svc.trials_per_hour():,.0f}", f"{ratio:.2f}" + ("" if ratio >= TARGET_RATIO else " (miss)"),
                     ms(statistics.median(lat)), ms(p95(lat)),
                     ms((svc.wall - bare.wall) / len(svc.train))])
    table = markdown_table(["steps/trial", "trials", "bare train s (median)", "service train s (median)",
                            "bare trials/h", "service trials/h", f"ratio (target >= {TARGET_RATIO})",
                            "dispatch p50 ms", "dispatch p95 ms", "extra wall ms per trial"], rows)
    phase_tables = "\n\n".join(
        f"{r['steps']} steps per trial:\n\n"
        + markdown_table(["service phase (attempt rows, events)", "n", "median ms", "mean ms"],
                         phase_rows(r["service"])) + "\n\n"
        + markdown_table(["bare phase (in process)", "n", "median ms", "mean ms"], phase_rows(r["bare"]))
        for r in results)
    replay_table = markdown_table(["call (replayed on the same PostgreSQL database)", "median ms"],
                                  [[name, ms(value)] for name, value in replay.items()])
    states = {f"{r['steps']} steps": (sorted(set(r["bare"].states)), sorted(set(r["service"].states)))
              for r in results}
    return (
        f"`.venv/bin/python bench/service_overhead.py{' --quick' if args.quick else ''}`, "
        f"{datetime.now(UTC):%Y-%m-%d}, {os.cpu_count()} CPU cores (load average 1/5/15 min at the end: "
        f"{', '.join(f'{x:.2f}' for x in load)}; above about 1 other work shared the cores, and every figure "
        "carries its noise).\n\n"
        f"The same study both ways: {args.trials} trials of a muP MLP (width 64, depth 2) on digits, AdamW, "
        f"batch 64, {EVALS_PER_TRIAL} evals per trial, TPE seed 0 over lr and output_mult, no pruner, parallelism 1, "
        "torch on 1 thread. **Bare**: `optuna.create_study` in memory, `ask` -> `run_trial` with a callback that "
        "reports and asks `should_prune` -> `tell`, in this process. **Service**: fresh PostgreSQL database, Redis "
        f"database {args.redis_db}, `scaletune api` and ONE Celery worker (`--pool solo --concurrency 1`) as "
        "subprocesses (no reconciler: the worker tops the study up itself), submitted over HTTP with a token from "
        "`scaletune token create`, polled every "
        f"{POLL_S} s. Both arms are warmed first (one 1-trial study each), so the table is steady state; the "
        "worker's cold first trial is below. Service wall = POST sent -> study's `finished_at` (server side, so "
        "the poll interval is not counted); bare wall = the loop. Train s = `train()`'s own span; the arms sample "
        "different points (Optuna's RDB study is reseeded per trial by the service) but every trial runs every "
        f"step (states: {states}).\n\n"
        "**Dispatch latency** = attempt row inserted by the dispatcher (`queued_at`, before commit and send) -> "
        "the worker entering `train()` (`finished_at - seconds` of the same row), i.e. commit, Redis, Celery "
        "hand-off, claim, Optuna load + ask, our row updates, dataset and model build "
        f"(target p50 < {TARGET_P50_MS:.0f} ms).\n\n{table}\n\n"
        "Where the time goes. Service: from the attempt rows and the `trial_reported` events' `created_at` "
        "(written in the eval callback, so eval -> next eval = eval_every steps + one eval + the callback's "
        f"writes); bare: `perf_counter` at the same points.\n\n{phase_tables}\n\n"
        f"{replay_table}\n\n"
        f"Setup (not in the table): worker process start -> Celery ready {setup['worker_ready']:.1f} s; its cold "
        f"first trial's dispatch latency {ms(setup['cold_latency'])} ms (imports, engines, Optuna storage check, "
        f"first torch use) vs {ms(setup['warm_latency'])} ms warm; bare loop's first trial in a fresh process "
        f"{setup['bare_cold']:.2f} s vs {setup['bare_warm']:.2f} s warm (mean); whole benchmark {setup['total']:.0f} s."
    )


# ---------------------------------------------------------------- main

def packs_rounds(service: Service, args: argparse.Namespace) -> list[dict[str, Any]]:
    """``args.rounds`` rounds of bare vs packed service at 100 steps, the arms' order alternating by round."""
    rounds = []
    for i in range(args.rounds):
        arms: dict[str, Any] = {}
        for arm in (("bare", "service") if i % 2 == 0 else ("service", "bare")):
            if arm == "bare":
                arms["bare"] = bare_study(tune_spec(f"bare-{i}", 100, args.trials))
            else:
                study_id, posted = submit_and_wait(service, tune_spec(f"packed-{i}", 100, args.trials, args.pack))
                arms["service"], arms["latency"] = service_run(service, study_id, posted)
        ratio = arms["service"].trials_per_hour() / arms["bare"].trials_per_hour()
        rounds.append({**arms, "ratio": ratio, "first": "bare" if i % 2 == 0 else "service"})
        print(f"round {i}: bare {arms['bare'].wall:.1f} s, service {arms['service'].wall:.1f} s, ratio {ratio:.2f}",
              flush=True)
    return rounds


def packs_report(rounds: list[dict[str, Any]], args: argparse.Namespace, load: tuple[float, ...]) -> str:
    ratios = [r["ratio"] for r in rounds]
    latency = [x for r in rounds for x in r["latency"]]
    first_pack = [x for r in rounds for x in r["latency"][:args.pack]]  # the latencies are in queued order
    later_packs = [x for r in rounds for x in r["latency"][args.pack:]]
    phase_medians = ", ".join(
        f"{name.split(' (')[0]} {ms(statistics.median([x for r in rounds for x in r['service'].phases[name]]))} ms"
        for name in DISPATCH_PHASES)
    rows = [[i, r["first"], f"{r['bare'].wall:.1f}", f"{r['bare'].trials_per_hour():.0f}", f"{r['service'].wall:.1f}",
             f"{r['service'].trials_per_hour():.0f}", f"{r['ratio']:.2f}", ms(statistics.median(r["latency"]))]
            for i, r in enumerate(rounds)]
    return "\n\n".join([
        f"`.venv/bin/python bench/service_overhead.py --packs --rounds {args.rounds} --pack {args.pack}` on 2 CPU "
        f"cores (load average at the end: {', '.join(f'{x:.1f}' for x in load)}), "
        f"{datetime.now(UTC):%Y-%m-%d}. Protocol (fixed before the run): the study of the section above "
        f"({args.trials} trials of a muP MLP 64x2 on digits, 100 steps, batch 64, {EVALS_PER_TRIAL} evals, TPE "
        f"seed 0, no pruner, torch on 1 thread), {args.rounds} rounds; each round runs the bare loop (unpacked, "
        f"in this process) and the service (PostgreSQL, Redis, `scaletune api`, ONE Celery worker, solo pool) "
        f"with `parallelism` = `pack` = {args.pack}, in alternating order, after one warm-up study per arm "
        "(unpacked and packed). Service wall = POST sent -> "
        "`finished_at`; bare wall = the loop. Ratio = service trials/hour / bare trials/hour.",
        markdown_table(["round", "first arm", "bare wall s", "bare trials/h", "service wall s", "service trials/h",
                        "ratio", "dispatch p50 ms"], rows),
        f"**Median ratio {statistics.median(ratios):.2f}** (spread {min(ratios):.2f}-{max(ratios):.2f} over "
        f"{len(ratios)} rounds; goal >= 0.95). Dispatch latency (attempt queued -> its pack's training started) "
        f"p50 {ms(statistics.median(latency))} ms, p95 {ms(p95(latency))} ms over {len(latency)} trials (goal p50 < "
        f"100 ms); its two phases' medians: {phase_medians}. By pack: a study's first pack p50 "
        f"{ms(statistics.median(first_pack))} ms, its later packs p50 {ms(statistics.median(later_packs))} ms. The figures swing with the machine's load (its "
        "load average at the end is above).",
    ])


def stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so the ``finally`` cleanup runs."""
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10 trials at 100 steps only")
    parser.add_argument("--redis-db", type=int, default=14, help="a Redis database number nobody else uses")
    parser.add_argument("--no-docs", action="store_true", help="print the section instead of writing docs")
    parser.add_argument("--packs", action="store_true", help="bare vs packed service in alternating rounds")
    parser.add_argument("--rounds", type=int, default=3, help="with --packs: rounds of the two arms")
    parser.add_argument("--pack", type=int, default=16, help="with --packs: trials per pack (and parallelism)")
    args = parser.parse_args()
    args.trials, steps_list = (10, [100]) if args.quick else (20, [100, 1000])
    if args.packs:
        args.trials = 2 * args.pack
    stop_on_sigterm()
    single_thread()
    began = time.perf_counter()

    broker_url = f"redis://127.0.0.1:6379/{args.redis_db}"
    broker = redis.Redis.from_url(broker_url)
    if broker.dbsize():
        raise SystemExit(f"Redis database {args.redis_db} is not empty; pick a free one with --redis-db")
    name = f"scaletune_overhead_{secrets.token_hex(4)}"
    home = Path(tempfile.mkdtemp(prefix="scaletune-overhead-"))
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    supervisor = Supervisor(log_dir=home / "logs", grace=10.0)
    try:
        upgrade_database(url)
        env = child_env(url, broker_url, home)
        token = issue_token(env)
        worker_started = time.monotonic()
        worker = celery_worker("bench-worker", "cpu")
        supervisor.start(ChildSpec(worker.name, worker.argv, {**worker.env, **env}))
        port = free_port()
        supervisor.start(ChildSpec("api", [*SCALETUNE, "api", "--host", "127.0.0.1", "--port", str(port)], env))
        worker_ready = wait_for_worker_ready(home / "logs" / f"{worker.name}.log", supervisor, worker_started)
        base = f"http://127.0.0.1:{port}"
        if not wait_until_healthy(f"{base}/healthz", supervisor, threading.Event()):
            raise RuntimeError(f"the API did not become healthy; see {home / 'logs'}")
        with httpx.Client(base_url=base, timeout=30.0, headers={"Authorization": f"Bearer {token}"}) as client:
            service = Service(url, client, make_session_factory(create_db_engine(url)))
            cold_id, cold_posted = submit_and_wait(service, tune_spec("warm-up", steps_list[0], 1))
            cold_latency = service_run(service, cold_id, cold_posted)[1][0]
            bare_cold = bare_study(tune_spec("warm-up", steps_list[0], 1)).wall
            if args.packs:
                submit_and_wait(service, tune_spec("warm-up-packed", 100, args.pack, args.pack))
                body = packs_report(packs_rounds(service, args), args, os.getloadavg())
                print(body)
                if not args.no_docs:
                    write_section(PACKS_SECTION, body)
                return
            results = []
            for steps in steps_list:
                bare = bare_study(tune_spec(f"bare-{steps}", steps, args.trials))
                study_id, posted = submit_and_wait(service, tune_spec(f"service-{steps}", steps, args.trials))
                svc, latency = service_run(service, study_id, posted)
                results.append({"steps": steps, "bare": bare, "service": svc, "latency": latency, "id": study_id})
                print(f"{steps} steps: bare {bare.wall:.1f} s, service {svc.wall:.1f} s, "
                      f"dispatch p50 {ms(statistics.median(latency))} ms", flush=True)
            replay = replay_calls(service, results[0]["id"])
        bare_warm = results[0]["bare"].wall / args.trials
        setup = {"worker_ready": worker_ready, "cold_latency": cold_latency, "bare_cold": bare_cold,
                 "bare_warm": bare_warm, "warm_latency": statistics.median(results[0]["latency"]),
                 "total": time.perf_counter() - began}
        body = report(results, replay, setup, args, os.getloadavg())
        print(body)
        if not args.no_docs:
            write_section(SECTION, body)
    finally:
        supervisor.stop()
        broker.flushdb()
        broker.close()
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
