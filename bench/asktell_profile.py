"""Where an ask, a report and a tell of an external study spend their time: SQL statements and cProfile.

    .venv/bin/python bench/asktell_profile.py [--finished 40] [--out 64] [--cycles 5] [--optuna-cache] [--pstats F]

A fresh PostgreSQL database and the API's own state (create_app, auth off); the endpoints' bodies
(service.leases) run in this process so cProfile sees them. ``finished`` trials are asked, reported (4 steps)
and told, ``out`` more are asked and left running (as under many agents), then ``cycles`` ask + 4 reports +
tell are timed and counted. ``--optuna-cache`` swaps in Optuna's own trial cache (the storage before
ChangedTrialsStorage) for a before/after on the same machine. Prints mean milliseconds and SQL statements per
request; ``--pstats`` writes the cProfile of the timed cycles (then timed under the profiler).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import random
import time
from typing import Any

from fastapi.testclient import TestClient
from optuna.storages._cached_storage import _CachedStorage
from sqlalchemy import event
from sqlalchemy.engine import Engine

from api_load import EXTERNAL_SPEC, fresh_database  # also puts the checkout on sys.path
import service.optuna_study
from service import leases
from service.api.app import create_app
from service.db import upgrade_database
from service.settings import Settings

KINDS = ("ask", "report", "tell")
REPORTS = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--finished", type=int, default=40, help="trials asked, reported and told first")
    parser.add_argument("--out", type=int, default=64, help="trials asked and left running")
    parser.add_argument("--cycles", type=int, default=5, help="timed ask + reports + tell cycles")
    parser.add_argument("--optuna-cache", action="store_true", help="Optuna's own trial cache (the baseline)")
    parser.add_argument("--pstats", help="write the cProfile of the timed cycles to this file")
    args = parser.parse_args()
    if args.optuna_cache:
        service.optuna_study.ChangedTrialsStorage = _CachedStorage  # type: ignore[misc]
    statements = [0]
    event.listen(Engine, "before_cursor_execute", lambda *_a, **_k: statements.__setitem__(0, statements[0] + 1))
    with fresh_database() as (url, name):
        upgrade_database(url)
        settings = Settings(DATABASE_URL=url, HOME=f"/tmp/{name}", AUTH_DISABLED=True, MAX_TRIALS=100_000,
                            MAX_PARALLELISM=args.out + 1)
        with TestClient(create_app(settings)) as client:
            n_trials = args.finished + args.out + args.cycles
            study_id = client.post("/v1/studies", json={**EXTERNAL_SPEC, "n_trials": n_trials,
                                                        "parallelism": args.out + 1}).raise_for_status().json()["id"]
            state = client.app.state.service  # type: ignore[attr-defined]
            rng = random.Random(0)

            def measured(kind: str, took: dict[str, Any], call: Any, *call_args: Any, **kwargs: Any) -> Any:
                before, started = statements[0], time.perf_counter()
                result = call(state.session_factory, state.storage, *call_args, **kwargs)
                took[kind].append((time.perf_counter() - started, statements[0] - before))
                return result

            def cycle(took: dict[str, Any]) -> None:
                asked = measured("ask", took, leases.ask, study_id, None, "bench", state.settings.MAX_RETRIES)
                number, base = asked.attempt.number, rng.random()
                for step in range(1, REPORTS + 1):
                    measured("report", took, leases.report, study_id, number, None, step, base + 1 / step,
                             state.settings.MAX_RETRIES)
                measured("tell", took, lambda sf, st, *a: leases.tell(sf, st, state.enqueue, *a), study_id, number,
                         None, "complete", base, None, state.settings.MAX_RETRIES)

            warmup: dict[str, Any] = {kind: [] for kind in KINDS}
            for _ in range(args.finished):
                cycle(warmup)
            for _ in range(args.out):
                leases.ask(state.session_factory, state.storage, study_id, None, "held", state.settings.MAX_RETRIES)
            took: dict[str, Any] = {kind: [] for kind in KINDS}
            profile = cProfile.Profile()
            if args.pstats:
                profile.enable()
            for _ in range(args.cycles):
                cycle(took)
            profile.disable()
    if args.pstats:
        profile.dump_stats(args.pstats)
    cache = "Optuna's own cache" if args.optuna_cache else "ChangedTrialsStorage"
    print(f"{cache}, {args.finished} finished trials, {args.out} out, {args.cycles} cycles, "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    for kind in KINDS:
        seconds, counts = zip(*took[kind], strict=True)
        print(f"{kind}: {1000 * sum(seconds) / len(seconds):.0f} ms, {sum(counts) / len(counts):.1f} SQL statements")


if __name__ == "__main__":
    main()
