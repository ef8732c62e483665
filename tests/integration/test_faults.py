"""Faults with real processes (PostgreSQL + Redis + Celery workers + API + reconciler): nothing is lost or doubled.

Each test breaks one thing mid-study: a worker is SIGKILLed, Redis is flushed, the API dies (0 s and 20 s
downtime), every PostgreSQL connection of the database is terminated, or the study is cancelled. Heartbeat,
stale and reconcile intervals are shortened through the environment so each test takes well under a minute.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

import pytest
import redis

if TYPE_CHECKING:
    from tests.integration.conftest import Deployment

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SPEC: dict[str, Any] = {
    "name": "faults", "kind": "tune",
    "model": {"family": "mlp", "base": {"width": 16, "depth": 1}, "proxy": {"width": 32, "depth": 1}},
    "parametrization": "mup", "optimizer": "adamw", "dataset": {"name": "digits"},
    "budget": {"steps": 600, "batch_size": 32, "eval_every": 50, "schedule": "cosine"},  # a few seconds a trial
    "search_space": {"lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}},
    "n_trials": 4, "parallelism": 2, "sampler": {"name": "random", "seed": 0},
    "pack": 1,  # one trial per worker task (the pack test below sets its own)
}


def running_with_progress(trial: dict[str, Any]) -> bool:
    return trial["state"] == "running" and len(trial["intermediate"]) >= 1


def queued(trial: dict[str, Any]) -> bool:
    return trial["state"] == "queued"


def assert_exactly_n_trials_finished(service: Deployment, study_id: str, n_trials: int) -> list[dict[str, Any]]:
    """Every trial number finished once; every failed attempt was replaced by a retry with the same params."""
    trials = service.trials(study_id)
    finished = [t for t in trials if t["state"] in ("complete", "pruned")]
    assert len(finished) == n_trials, [(t["number"], t["state"], t["failure_reason"]) for t in trials]
    assert len({t["number"] for t in finished}) == n_trials, "no trial number counted twice"
    retries = {t["retry_of"]: t for t in trials if t["retry_of"]}
    for failed in (t for t in trials if t["state"] == "failed"):
        assert failed["id"] in retries, f"failed attempt {failed['id']} was not retried"
        if failed["params"] is not None:  # an attempt that died before recording its params has none to reuse
            assert retries[failed["id"]]["params"] == failed["params"]
    return trials


def test_a_killed_worker_is_found_stale_and_its_trial_retried_once(service: Deployment) -> None:
    study_id = service.submit(SPEC)
    # Two evals recorded: the checkpoint saved after the first (CHECKPOINT_EVERY_EVALS=1) is on disk.
    victim = service.wait_for_trial(study_id, lambda t: t["state"] == "running" and len(t["intermediate"]) >= 2)
    os.kill(int(victim["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
    service.start_worker("worker-c")

    study = service.wait_until_finished(study_id)

    assert study["status"] == "completed"
    trials = assert_exactly_n_trials_finished(service, study_id, SPEC["n_trials"])
    lost = next(t for t in trials if t["id"] == victim["id"])
    assert lost["state"] == "failed" and lost["failure_reason"] == "worker_lost"
    [retry] = [t for t in trials if t["retry_of"] == victim["id"]]
    assert retry["state"] == "complete" and retry["attempt"] == 2 and retry["params"] == victim["params"]
    eval_every = SPEC["budget"]["eval_every"]
    assert retry["intermediate"][0]["step"] > eval_every, "the retry resumed from the checkpoint, not from step 0"
    assert [p["step"] for p in retry["intermediate"]][-1] == SPEC["budget"]["steps"]


def packed_members(listed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trials of a worker running two or more members at once, each past its first eval (else none)."""
    by_worker: dict[str, list[dict[str, Any]]] = {}
    for trial in filter(running_with_progress, listed):
        by_worker.setdefault(trial["worker"], []).append(trial)
    return max(by_worker.values(), key=len) if by_worker and max(map(len, by_worker.values())) >= 2 else []


def test_a_worker_killed_mid_pack_has_every_member_retried_once_with_its_params(service: Deployment) -> None:
    study_id = service.submit({**SPEC, "pack": 4, "parallelism": 4})
    packed = packed_members(service.wait_for_trials(study_id, lambda listed: bool(packed_members(listed))))
    os.kill(int(packed[0]["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
    service.start_worker("worker-c")

    study = service.wait_until_finished(study_id)

    assert study["status"] == "completed"
    trials = assert_exactly_n_trials_finished(service, study_id, SPEC["n_trials"])
    for member in packed:
        lost = next(t for t in trials if t["id"] == member["id"])
        assert lost["state"] == "failed" and lost["failure_reason"] == "worker_lost"
        [retry] = [t for t in trials if t["retry_of"] == member["id"]]
        assert (retry["state"], retry["attempt"], retry["params"]) == ("complete", 2, member["params"])
        assert [p["step"] for p in retry["intermediate"]][-1] == SPEC["budget"]["steps"]
    assert len(trials) == SPEC["n_trials"] + len(packed), "each member retried once, nothing else queued"


def test_a_flushed_broker_is_repaired_by_the_reconciler(service: Deployment, redis_url: str) -> None:
    study_id = service.submit({**SPEC, "n_trials": 6, "parallelism": 3})  # two workers: one task waits in Redis
    trials = service.wait_for_trials(  # one snapshot: a trial runs while another waits in Redis
        study_id, lambda listed: any(map(running_with_progress, listed)) and any(map(queued, listed)))
    waiting = {t["id"] for t in trials if queued(t)}
    redis.Redis.from_url(redis_url).flushdb()
    flushed_at = time.time()

    study = service.wait_until_finished(study_id)

    assert study["status"] == "completed"
    trials = assert_exactly_n_trials_finished(service, study_id, 6)
    restarted = [datetime.fromisoformat(t["started_at"]).timestamp() - flushed_at for t in trials if t["id"] in waiting]
    assert restarted and max(restarted) < 60, f"lost tasks re-sent and started after {restarted} s"


@pytest.mark.parametrize("downtime_s", [0, 20])
def test_the_api_dies_and_comes_back_while_workers_run(service: Deployment, downtime_s: float) -> None:
    study_id = service.submit({**SPEC, "n_trials": 6})
    done_before = service.wait_for_trial(study_id, lambda t: t["state"] == "complete")
    [(_, api)] = [(spec, process) for spec, process in service.processes.children if spec.name == "api"]
    api.kill()
    api.wait()
    time.sleep(downtime_s)
    service.start_api("api-restarted")

    study = service.wait_until_finished(study_id)

    assert study["status"] == "completed"
    trials = assert_exactly_n_trials_finished(service, study_id, 6)
    kept = next(t for t in trials if t["id"] == done_before["id"])
    assert (kept["value"], kept["params"]) == (done_before["value"], done_before["params"])


def test_lost_database_connections_are_survived(service: Deployment) -> None:
    study_id = service.submit({**SPEC, "n_trials": 6})
    service.wait_for_trial(study_id, running_with_progress)
    killed = service.terminate_database_connections()
    time.sleep(3)
    killed += service.terminate_database_connections()
    assert killed > 0

    study = service.wait_until_finished(study_id)

    assert study["status"] == "completed"
    assert_exactly_n_trials_finished(service, study_id, 6)
    assert service.processes.exited() == [], "no process crashed"


@pytest.mark.alone
def test_a_postgresql_restart_mid_study_is_survived(service: Deployment) -> None:
    """The real server goes down and comes back (this machine's own PostgreSQL, as in CI)."""
    study_id = service.submit({**SPEC, "n_trials": 6})
    service.wait_for_trial(study_id, running_with_progress)
    restart_postgresql()

    study = service.wait_until_finished(study_id)

    assert study["status"] == "completed"
    assert_exactly_n_trials_finished(service, study_id, 6)
    assert service.processes.exited() == [], "no process crashed"


def restart_postgresql() -> None:
    clusters = sorted(os.listdir("/etc/postgresql"), key=lambda v: [int(p) for p in v.split(".")])
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", clusters[-1], "main", "restart"],
                   check=True, timeout=120, capture_output=True)


def test_cancel_stops_running_trials_at_their_next_eval_and_starts_nothing(service: Deployment) -> None:
    steps = 6000
    budget = {"steps": steps, "batch_size": 32, "eval_every": 50, "schedule": "cosine"}
    study_id = service.submit({**SPEC, "n_trials": 8, "parallelism": 3, "budget": budget})
    service.wait_for_trial(study_id, running_with_progress)
    cancelled = service.client.post(f"/v1/studies/{study_id}/cancel")
    assert cancelled.status_code == 200
    cancelled_at = time.time()

    service.wait_for_trials(study_id, lambda listed: not any(t["state"] == "running" for t in listed), timeout_s=60)
    time.sleep(6)  # longer than the reconcile interval and the re-send delay: nothing may start meanwhile
    trials = service.trials(study_id)

    assert service.client.get(f"/v1/studies/{study_id}").json()["status"] == "cancelled"
    assert {t["state"] for t in trials} == {"cancelled"}, [(t["state"], t["failure_reason"]) for t in trials]
    for trial in trials:
        if trial["started_at"] is not None:
            assert datetime.fromisoformat(trial["started_at"]).timestamp() < cancelled_at
            assert len(trial["intermediate"]) < steps // 50, "it stopped at an eval instead of running to the end"
    assert len(trials) == 3, "nothing new was queued after the cancel"
