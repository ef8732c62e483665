"""API latency under load: a fresh PostgreSQL database with 1k studies (one with 10k trials), uvicorn on loopback.

    .venv/bin/python bench/api_load.py [--quick] [--concurrency 1,4] [--requests 1000] [--seconds 20] [--processes 1]
    .venv/bin/python bench/api_load.py --asktell [--quick] [--agents 256] [--trials 512] [--reports 4]

Rows are bulk-inserted (no workers), then vacuumed. The API runs as its own uvicorn server (``--processes`` worker
processes; its memory, summed over them, is measured after the load); the load comes from other processes: for each
level in ``concurrency``, that many closed-loop clients per endpoint, each in its own process, each run bounded by a
request count and a time limit. Writes p50/p99, requests/s and the API's CPU per request per endpoint to
docs/benchmarks.md.

``--asktell``: simulated agents (asyncio, no training) serve one external study: ask, ``reports`` reports of
random values, tell (pruned when the pruner says so); on 429 they wait Retry-After. Then a check: exactly
n_trials told, no trial number or params handed out twice, nothing failed.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import os
import re
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
from common import markdown_table, write_section  # also puts the checkout on sys.path
from sqlalchemy import insert

from service.db import create_db_engine, upgrade_database
from service.models import Study, TrialAttempt
from tests.ports import free_port

POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
N_STUDIES = 1000
N_TRIALS_BIG = 10_000
EVALS_PER_TRIAL = 10
TARGET_P99_MS = 50.0
KEEP_ALIVE_S = 75  # as behind a load balancer; uvicorn's 5 s raced clients that reuse a connection after a pause
API_START_S = 180  # a loaded 2-core machine took over 60 s to import and start the API
SECTION = "API latency under load"
ASKTELL_SECTION = "Ask/tell under load (external studies)"
EXTERNAL_SPEC: dict[str, Any] = {
    "name": "asktell-load", "kind": "external", "parallelism": 256, "lease_seconds": 600,
    "search_space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True},
                     "output_mult": {"type": "float", "low": 0.25, "high": 8.0, "log": True}},
    "sampler": {"name": "tpe", "seed": 0}, "pruner": {"name": "median"}, "parametrization": "mup",
    "optimizer": "adamw", "model": {"base": {"width": 64, "depth": 2}, "proxy": {"width": 128, "depth": 2}},
}
SPEC: dict[str, Any] = {
    "name": "load", "kind": "tune",
    "model": {"family": "mlp", "base": {"width": 64, "depth": 2}, "proxy": {"width": 128, "depth": 2}, "args": {}},
    "parametrization": "mup", "optimizer": "adamw", "dataset": {"name": "digits", "args": {}, "seed": 0},
    "budget": {"steps": 200, "batch_size": 64, "eval_every": 20, "schedule": "cosine"},
    "search_space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True, "step": None},
                     "output_mult": {"type": "float", "low": 0.25, "high": 8.0, "log": True, "step": None}},
    "hyperparameters": {}, "objective": {"metric": "eval_loss", "direction": "minimize"},
    "n_trials": 20, "parallelism": 2, "sampler": {"name": "tpe", "seed": 0}, "pruner": {"name": "none"},
    "enqueue": [], "queue": "cpu",
}


def seed(url: str, n_studies: int, n_trials: int) -> str:
    """Bulk-insert completed studies and one big study's trials; returns the big study's id."""
    engine = create_db_engine(url)
    start = datetime.now(UTC) - timedelta(days=30)
    studies = [{"id": f"{i:08d}-0000-4000-8000-000000000000", "name": f"study-{i}", "kind": "tune",
                "spec": {**SPEC, "n_trials": n_trials if i == 0 else SPEC["n_trials"]}, "status": "completed",
                "tenant": "default", "optuna_study_name": f"scaletune-load-{i}",
                "created_at": start + timedelta(minutes=i), "updated_at": start + timedelta(minutes=i),
                "finished_at": start + timedelta(minutes=i + 5), "best_value": 0.3, "best_params": {"lr": 0.01}}
               for i in range(n_studies)]
    big = studies[0]["id"]
    curve = [{"step": 20 * (k + 1), "samples": 1280 * (k + 1), "flops": 1e9 * (k + 1), "train_loss": 1.0 / (k + 1),
              "eval_loss": 1.1 / (k + 1)} for k in range(EVALS_PER_TRIAL)]
    trials = [{"id": f"{i:08d}-1111-4000-8000-000000000000", "study_id": big, "number": i, "attempt": 1,
               "state": "complete", "params": {"lr": 1e-3 * (1 + i % 97), "output_mult": 1.0 + i % 7},
               "value": 0.3 + (i % 101) / 1000, "intermediate": curve, "worker": "bench:1",
               "queued_at": start + timedelta(seconds=i), "started_at": start + timedelta(seconds=i),
               "finished_at": start + timedelta(seconds=i + 1), "flops": 1e10, "seconds": 1.0}
              for i in range(n_trials)]
    with engine.begin() as connection:
        connection.execute(insert(Study), studies)
        for chunk in range(0, len(trials), 2000):
            connection.execute(insert(TrialAttempt), trials[chunk:chunk + 2000])
    # As autovacuum would within a minute of a bulk load (this server runs with it off): without the visibility
    # map, every count and index-only scan would visit all 10k rows in the table.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.exec_driver_sql("VACUUM ANALYZE")
    engine.dispose()
    return big


@contextmanager
def fresh_database() -> Iterator[tuple[str, str]]:
    """A new PostgreSQL database (its URL and name), dropped afterwards."""
    name = f"scaletune_load_{secrets.token_hex(4)}"
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}", name
    finally:
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def start_api(url: str, port: int, home: str, processes: int = 1, **settings: str) -> subprocess.Popen[bytes]:
    """``processes``: uvicorn worker processes; ``settings``: more SCALETUNE_* variables for the API, by name without
    the prefix."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SCALETUNE_")},
           "SCALETUNE_DATABASE_URL": url, "SCALETUNE_HOME": home, "SCALETUNE_AUTH_DISABLED": "true",
           **{f"SCALETUNE_{key}": value for key, value in settings.items()}}
    api = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "service.api.app:create_app",
                            "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
                            "--timeout-keep-alive", str(KEEP_ALIVE_S), "--workers", str(processes)], env=env)
    deadline = time.monotonic() + API_START_S
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return api
        except httpx.TransportError:
            time.sleep(0.2)
    api.kill()
    raise RuntimeError(f"the API did not start within {API_START_S} s")


def with_children(pid: int) -> list[int]:
    return [pid, *(int(child) for child in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                                          text=True).stdout.split())]


def memory_mib(pid: int) -> tuple[float, float]:
    """(PSS, RSS) in MiB of a process and its children (PSS shares each page among the processes mapping it)."""
    pss = rss = 0
    for each in with_children(pid):
        with open(f"/proc/{each}/smaps_rollup") as f:
            fields = {line.split()[0]: int(line.split()[1]) for line in f if line.split()[0] in ("Pss:", "Rss:")}
        pss, rss = pss + fields["Pss:"], rss + fields["Rss:"]
    return pss / 1024, rss / 1024


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of a process and its children so far: the API's own work, whatever the load's
    latency does (it swings with what shares the cores; the CPU a request costs the server does much less)."""
    total = 0
    for each in with_children(pid):
        with open(f"/proc/{each}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return total / os.sysconf("SC_CLK_TCK")


def _client(base: str, path: str, deadline: float, remaining: Any, out: Any) -> None:
    """One closed-loop client: its next request when the last answered; puts (latencies, errors) on ``out``."""
    latencies, errors = [], 0
    with httpx.Client(base_url=base, timeout=10) as http:
        while time.monotonic() < deadline:
            with remaining.get_lock():
                if remaining.value <= 0:
                    break
                remaining.value -= 1
            started = time.perf_counter()
            errors += http.get(path).status_code != 200
            latencies.append(time.perf_counter() - started)
    out.put((latencies, errors))


def _hammer(base: str, path: str, n_requests: int, seconds: float, concurrency: int) -> dict[str, Any]:
    """``concurrency`` clients, each in its own process: threads of one process would wait for each other's GIL
    between a response's arrival and its reading, and that wait would count as the server's latency."""
    context = multiprocessing.get_context("fork")
    remaining, out = context.Value("i", n_requests), context.Queue()
    deadline = time.monotonic() + seconds  # CLOCK_MONOTONIC: one clock for every process of the machine
    started = time.perf_counter()
    clients = [context.Process(target=_client, args=(base, path, deadline, remaining, out))
               for _ in range(concurrency)]
    for client in clients:
        client.start()
    gathered = [out.get() for _ in clients]
    for client in clients:
        client.join()
    wall = time.perf_counter() - started
    latencies = [x for client_latencies, _ in gathered for x in client_latencies]
    errors = sum(client_errors for _, client_errors in gathered)
    p50, p99 = percentiles(latencies)
    return {"requests": len(latencies), "errors": errors, "rps": len(latencies) / wall, "p50_ms": p50, "p99_ms": p99}


def drive(base: str, endpoints: dict[str, str], n_requests: int, seconds: float, levels: list[int],
          results: Any, api_pid: int) -> None:
    """The load process: warm each endpoint up, then measure it at each concurrency level."""
    for name, path in endpoints.items():
        _hammer(base, path, 20, 10, 1)
        for clients in levels:
            cpu = cpu_seconds(api_pid)
            result = _hammer(base, path, n_requests, seconds, clients)
            results[(name, clients)] = {**result, "cpu_ms": 1000 * (cpu_seconds(api_pid) - cpu) / result["requests"]}


def report(results: dict[tuple[str, int], dict[str, Any]], endpoints: dict[str, str],
           args: argparse.Namespace) -> str:
    big = endpoints["detail"].rsplit("/", 1)[1]
    rows = [[name, f"`{re.sub('cursor=[^&]+', 'cursor={cursor}', endpoints[name].replace(big, '{big}'))}`", clients, r["requests"], r["errors"], f"{r['p50_ms']:.1f}", f"{r['p99_ms']:.1f}", f"{r['rps']:.0f}",
             f"{r['cpu_ms']:.1f}", "yes" if r["p99_ms"] < TARGET_P99_MS else "**no**"]
            for (name, clients), r in results.items()]
    table = markdown_table(["endpoint", "request", "clients", "requests", "errors", "p50 ms", "p99 ms", "req/s",
                            "API CPU ms per request", f"p99 < {TARGET_P99_MS:.0f} ms"], rows)
    return (f"`.venv/bin/python bench/api_load.py{' --quick' if args.quick else ''} --processes {args.processes}` on "
            f"{os.cpu_count()} CPU cores, {datetime.now(UTC):%Y-%m-%d}. A fresh PostgreSQL database holds "
            f"{args.studies:,} studies, one of them with {args.trials:,} trials of {EVALS_PER_TRIAL} eval points each "
            f"(bulk insert, then VACUUM ANALYZE). The API is uvicorn with {args.processes} worker process(es) on "
            "loopback; its memory after "
            f"the load, summed over its processes: PSS {args.memory[0]:.0f} MiB (RSS {args.memory[1]:.0f} MiB). The "
            "cursor page is the page after offset "
            f"{args.deep - 100:,} reached by the next_cursor that page hands out. The load comes from separate processes: "
            f"{args.concurrency.replace(',', ' and ')} closed-loop clients per endpoint, each in its own process (until "
            f"2026-12-03 16:20 UTC: threads of one process, whose waits for each other's GIL counted as latency), at most {args.requests:,} requests or "
            f"{args.seconds:.0f} s per endpoint, after a short warm-up. Auth disabled (a token check adds one "
            "primary-key lookup per request). The API, PostgreSQL and the load process share the cores, with whatever "
            "else runs: the load average at the end is in the last line. API CPU per request: the user and system "
            "CPU time of the API's processes during the endpoint's run over its requests (since 2026-12-03 17:50 "
            f"UTC); it swings far less with the machine than the latencies do.\n\n{table}\n\nload average (1, 5, 15 "
            f"min) at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


def percentiles(latencies: list[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds."""
    ordered = sorted(latencies)
    return 1000 * statistics.median(ordered), 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


async def _agent(http: httpx.AsyncClient, study_id: str, reports: int, seed: int, log: dict[str, Any]) -> None:
    """Ask, report random values, tell; until the study has nothing left to ask."""
    rng = random.Random(seed)

    async def timed(kind: str, path: str, body: dict[str, Any] | None) -> httpx.Response:
        started = time.perf_counter()
        response = await http.post(path, json=body)
        log["latency"][kind].append(time.perf_counter() - started)
        return response

    while True:
        asked = await timed("ask", f"/v1/studies/{study_id}/trials/ask", None)
        if asked.status_code == 409:
            return
        if asked.status_code == 429:
            log["too_many"] += 1
            await asyncio.sleep(float(asked.headers["Retry-After"]))
            continue
        asked.raise_for_status()
        trial = asked.json()
        log["asked"].append((trial["number"], tuple(sorted(trial["params"].items()))))
        base, state = rng.random(), "complete"
        for step in range(1, reports + 1):
            answer = await timed("report", f"/v1/studies/{study_id}/trials/{trial['number']}/report",
                                 {"step": step, "value": base + 1.0 / step})
            answer.raise_for_status()
            if answer.json()["should_prune"]:
                state = "pruned"
                break
        told = await timed("tell", f"/v1/studies/{study_id}/trials/{trial['number']}/tell",
                           {"state": state, "value": base})
        told.raise_for_status()
        log["told"].append(trial["number"])


async def _agents(base: str, study_id: str, n_agents: int, reports: int) -> dict[str, Any]:
    log: dict[str, Any] = {"latency": {"ask": [], "report": [], "tell": []}, "asked": [], "told": [], "too_many": 0}
    limits = httpx.Limits(max_connections=n_agents, max_keepalive_connections=n_agents)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*[_agent(http, study_id, reports, seed, log) for seed in range(n_agents)])
        log["wall"] = time.perf_counter() - started
    return log


def drive_agents(base: str, study_id: str, n_agents: int, reports: int, results: Any) -> None:
    """The load process of the ask/tell run."""
    results["log"] = asyncio.run(_agents(base, study_id, n_agents, reports))


def check_asktell(base: str, study_id: str, n_trials: int, log: dict[str, Any]) -> dict[str, Any]:
    """Exactly n_trials told, no number or params handed out twice, nothing failed or left running."""
    with httpx.Client(base_url=base, timeout=60) as http:
        study = http.get(f"/v1/studies/{study_id}").raise_for_status().json()
    numbers = [number for number, _ in log["asked"]]
    params = [point for _, point in log["asked"]]
    counts = study["trial_counts"]
    return {"status": study["status"], "told": len(log["told"]), "asked": len(numbers),
            "numbers_unique": len(set(numbers)) == len(numbers), "params_unique": len(set(params)) == len(params),
            "finished": counts["complete"] + counts["pruned"], "failed": counts["failed"],
            "running": counts["running"] + counts["queued"],
            "ok": (study["status"] == "completed" and len(log["told"]) == n_trials == len(numbers)
                   and len(set(numbers)) == len(numbers) and len(set(params)) == len(params)
                   and counts["complete"] + counts["pruned"] == n_trials and counts["failed"] == 0)}


def asktell_report(log: dict[str, Any], check: dict[str, Any], args: argparse.Namespace) -> str:
    rows = []
    for kind, latencies in log["latency"].items():
        p50, p99 = percentiles(latencies)
        rows.append([kind, len(latencies), f"{len(latencies) / log['wall']:.0f}", f"{p50:.1f}", f"{p99:.1f}"])
    table = markdown_table(["request", "count", "per second", "p50 ms", "p99 ms"], rows)
    total = sum(len(v) for v in log["latency"].values())
    verdict = "**passed**" if check["ok"] else "**FAILED**"
    return (f"`.venv/bin/python bench/api_load.py --asktell{' --quick' if args.quick else ''}` on {os.cpu_count()} "
            f"CPU cores, {datetime.now(UTC):%Y-%m-%d}. Protocol (fixed before the run): one external study on a fresh "
            f"PostgreSQL database, n_trials={args.trials:,}, parallelism={args.agents}, TPE sampler, median pruner; "
            f"{args.agents} simulated agents (asyncio coroutines in one separate process, one keep-alive connection "
            f"each, no training) each loop: ask, {args.reports} reports of a random value (stopping early when told "
            "to prune), tell complete (or pruned); on 429 they sleep Retry-After. The API is one uvicorn process on "
            f"loopback (keep-alive {KEEP_ALIVE_S} s), auth disabled. The 2 busy cores are shared by the API, "
            "PostgreSQL, the load process and "
            "other work on the machine (load average at the end below), so these are figures for a small box, not "
            f"a ceiling.\n\n{table}\n\nAll requests: {total:,} in {log['wall']:.1f} s ({total / log['wall']:.0f}/s); "
            f"429 answers: {log['too_many']}. Check {verdict}: study {check['status']}, {check['told']:,} trials "
            f"told of {args.trials:,} asked for, {check['asked']:,} handed out, trial numbers unique: "
            f"{check['numbers_unique']}, params unique: {check['params_unique']}, finished "
            f"{check['finished']:,}, failed {check['failed']}, still out {check['running']}.\n\nload average "
            f"(1, 5, 15 min) at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


def run_asktell(url: str, name: str, args: argparse.Namespace) -> str:
    upgrade_database(url)
    port = free_port()
    api = start_api(url, port, home=f"/tmp/{name}", MAX_PARALLELISM=str(args.agents), MAX_TRIALS=str(args.trials))
    base = f"http://127.0.0.1:{port}"
    try:
        study_id = httpx.post(f"{base}/v1/studies", json={**EXTERNAL_SPEC, "n_trials": args.trials,
                                                          "parallelism": args.agents}).raise_for_status().json()["id"]
        with multiprocessing.Manager() as manager:
            results = manager.dict()
            load = multiprocessing.get_context("spawn").Process(
                target=drive_agents, args=(base, study_id, args.agents, args.reports, results))
            load.start()
            load.join()
            log = dict(results["log"])
        return asktell_report(log, check_asktell(base, study_id, args.trials, log), args)
    finally:
        api.terminate()
        api.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100 studies, 1k trials, 200 requests per endpoint "
                                                             "(ask/tell: 32 agents, 128 trials)")
    parser.add_argument("--concurrency", default="1,4", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--requests", type=int, default=1000, help="at most this many requests per run")
    parser.add_argument("--seconds", type=float, default=20.0, help="at most this long per run")
    parser.add_argument("--no-docs", action="store_true", help="print the table instead of writing docs")
    parser.add_argument("--processes", type=int, default=1, help="uvicorn worker processes serving the API")
    parser.add_argument("--asktell", action="store_true", help="the ask/tell run instead (simulated agents)")
    parser.add_argument("--agents", type=int, default=256, help="ask/tell: simulated agents (and parallelism)")
    parser.add_argument("--trials", type=int, default=512, help="ask/tell: n_trials of the external study")
    parser.add_argument("--reports", type=int, default=4, help="ask/tell: reports per trial")
    args = parser.parse_args()
    if args.asktell:
        if args.quick:
            args.agents, args.trials = min(args.agents, 32), min(args.trials, 128)
        with fresh_database() as (url, name):
            body = run_asktell(url, name, args)
        print(body)
        if not args.no_docs:
            write_section(ASKTELL_SECTION, body)
        return
    levels = [int(level) for level in args.concurrency.split(",")]
    args.studies, args.trials = (100, 1000) if args.quick else (N_STUDIES, N_TRIALS_BIG)
    if args.quick:
        args.requests = min(args.requests, 200)

    with fresh_database() as (url, name):
        upgrade_database(url)
        big = seed(url, args.studies, args.trials)
        port = free_port()
        api = start_api(url, port, home=f"/tmp/{name}", processes=args.processes)
        try:
            deep = args.deep = (args.trials // 100 - 1) * 100
            cursor = httpx.get(f"http://127.0.0.1:{port}/v1/studies/{big}/trials",
                               params={"limit": 100, "offset": deep - 100}).raise_for_status().json()["next_cursor"]
            endpoints = {"list": "/v1/studies?limit=50", "detail": f"/v1/studies/{big}",
                         "trials page 1": f"/v1/studies/{big}/trials?limit=100",
                         f"trials deep page (offset {deep:,})": f"/v1/studies/{big}/trials?limit=100&offset={deep}",
                         f"trials deep page (cursor to row {deep:,})": f"/v1/studies/{big}/trials?limit=100&cursor={cursor}"}
            with multiprocessing.Manager() as manager:
                results = manager.dict()
                load = multiprocessing.get_context("spawn").Process(
                    target=drive, args=(f"http://127.0.0.1:{port}", endpoints, args.requests, args.seconds,
                                        levels, results, api.pid))
                load.start()
                load.join()
                measured = {(name, clients): dict(results[(name, clients)]) for name in endpoints
                            for clients in levels}
            args.memory = memory_mib(api.pid)
        finally:
            api.terminate()
            api.wait(timeout=30)
    body = report(measured, endpoints, args)
    print(body)
    if not args.no_docs:
        write_section(SECTION if args.processes == 1 else f"{SECTION}, {args.processes} API processes", body)


if __name__ == "__main__":
    main()
