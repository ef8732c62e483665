"""Agents as real processes against a worker-less production service (PostgreSQL, API and reconciler processes).

An agent killed with SIGKILL mid-trial (with its command: the machine died) leaves a trial whose lease runs out;
the next ask hands out its params again, and the study ends with exactly n_trials finished trials.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.embedded import ChildSpec, Supervisor, answers
from tests.integration.conftest import FAST_RECOVERY, SCALETUNE, issue_token, wait_for_api
from tests.ports import free_port

pytestmark = pytest.mark.integration
TRAINER = [sys.executable, str(Path(__file__).resolve().parent / "asktell_trainer.py")]
N_TRIALS = 4
SPEC = {"name": "agents", "kind": "external", "n_trials": N_TRIALS, "parallelism": 2, "lease_seconds": 5,
        "search_space": {"lr": {"type": "float", "low": 1e-4, "high": 1e-1, "log": True}},
        "sampler": {"name": "random", "seed": 1}, "parametrization": "mup", "optimizer": "adamw",
        "model": {"base": {"width": 64, "depth": 2}, "proxy": {"width": 64, "depth": 2}}}


@pytest.fixture
def api(processes: Supervisor, production_env: dict[str, str]) -> Iterator[tuple[httpx.Client, dict[str, str]]]:
    """API and reconciler processes, no worker; the agents' environment (URL and token) with it."""
    env = {**production_env, **FAST_RECOVERY}
    port = free_port()
    processes.start(ChildSpec("reconciler", [*SCALETUNE, "reconciler"], env))
    processes.start(ChildSpec("api", [*SCALETUNE, "api", "--host", "127.0.0.1", "--port", str(port)], env))
    url = wait_for_api(processes, f"http://127.0.0.1:{port}")
    token = issue_token(env, "agents")
    with httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {token}"}) as client:
        yield client, {**env, "SCALETUNE_URL": url, "SCALETUNE_TOKEN": token}


def wait_for(what: str, check: object, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def test_an_agent_killed_mid_trial_has_its_params_handed_out_again_and_exactly_n_trials_finish(
        api: tuple[httpx.Client, dict[str, str]], processes: Supervisor, tmp_path: Path) -> None:
    client, env = api
    study_id = client.post("/v1/studies", json=SPEC).raise_for_status().json()["id"]
    marks = tmp_path / "marks"
    marks.mkdir()
    agent_env = {**env, "TRAINER_MARK_DIR": str(marks), "TRAINER_STEP_S": "0.5"}
    doomed = processes.start(ChildSpec("agent-doomed", [*SCALETUNE, "agent", study_id, "--", *TRAINER], agent_env))
    wait_for("the first agent's trial to start", lambda: any(marks.iterdir()))
    lost_number = int(next(marks.iterdir()).name.split("-")[1])
    os.killpg(doomed.pid, signal.SIGKILL)  # the agent and its command, as when the machine dies
    lost = client.get(f"/v1/studies/{study_id}/trials/{lost_number}").raise_for_status().json()
    assert lost["state"] == "running"

    survivors = [processes.start(ChildSpec(f"agent-{i}", [*SCALETUNE, "agent", study_id, "--", *TRAINER],
                                           {**agent_env, "TRAINER_STEP_S": "0.2"})) for i in range(2)]
    wait_for("both agents to run out of trials", lambda: all(p.poll() is not None for p in survivors), 240)
    assert [p.returncode for p in survivors] == [0, 0]

    study = client.get(f"/v1/studies/{study_id}").raise_for_status().json()
    trials = client.get(f"/v1/studies/{study_id}/trials", params={"limit": 100}).raise_for_status().json()["items"]
    assert study["status"] == "completed" and study["trial_counts"]["complete"] == N_TRIALS
    expired = [t for t in trials if t["failure_reason"] == "lease_expired"]
    assert [t["number"] for t in expired] == [lost_number]
    retry, = [t for t in trials if t["retry_of"] == lost["id"]]
    assert retry["params"] == lost["params"] and retry["state"] == "complete" and retry["attempt"] == 2
    # Nothing else was handed out twice, and nothing more than n_trials finished.
    handed_out = Counter(tuple(sorted(t["params"].items())) for t in trials)
    assert handed_out.pop(tuple(sorted(lost["params"].items()))) == 2
    assert list(handed_out.values()) == [1] * (N_TRIALS - 1)
    assert client.post(f"/v1/studies/{study_id}/trials/ask").status_code == 409


def test_an_agent_rides_out_an_api_that_is_briefly_down(api: tuple[httpx.Client, dict[str, str]],
                                                        processes: Supervisor, tmp_path: Path) -> None:
    """The API process is killed mid-trial and started again a few seconds later: the agent's heartbeats, the
    command's reports and tell, and the agent's next ask are retried, so every trial completes at its first try."""
    client, env = api
    study_id = client.post("/v1/studies", json={**SPEC, "n_trials": 3, "parallelism": 1,
                                                "lease_seconds": 120}).raise_for_status().json()["id"]
    marks = tmp_path / "marks"
    marks.mkdir()
    agent = processes.start(ChildSpec("agent", [*SCALETUNE, "agent", study_id, "--", *TRAINER],
                                      {**env, "TRAINER_MARK_DIR": str(marks), "TRAINER_STEP_S": "1"}))
    wait_for("the first trial to start", lambda: any(marks.iterdir()))
    [(api_spec, api_process)] = [(spec, process) for spec, process in processes.children if spec.name == "api"]
    api_process.kill()
    api_process.wait()
    time.sleep(3)
    processes.start(ChildSpec("api-again", api_spec.argv, api_spec.env))
    wait_for("the API to answer again", lambda: answers(f"{env['SCALETUNE_URL']}/healthz"))
    wait_for("the agent to finish", lambda: agent.poll() is not None, 240)

    assert agent.returncode == 0
    study = client.get(f"/v1/studies/{study_id}").raise_for_status().json()
    trials = client.get(f"/v1/studies/{study_id}/trials", params={"limit": 100}).raise_for_status().json()["items"]
    assert study["status"] == "completed" and study["trial_counts"]["complete"] == 3
    assert [(t["state"], t["attempt"]) for t in trials] == [("complete", 1)] * 3
    assert all([p["step"] for p in t["intermediate"]] == [1, 2, 3, 4, 5, 6] for t in trials)
