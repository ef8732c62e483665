"""`scaletune agent` and the client's Trial against a real API server: real agent and command processes."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import scaletune
from scaletune.client import Client
from service.tokens import create_token
from service.db import SessionFactory
from tests.service.test_asktell import EXTERNAL, OWN_SPACE

SCALETUNE = [sys.executable, "-c", "from service.cli import main; main()"]
TRAINER = [sys.executable, str(Path(__file__).resolve().parents[1] / "integration" / "asktell_trainer.py")]


@pytest.fixture
def token(session_factory: SessionFactory) -> str:
    return create_token(session_factory, "agent-test")


@pytest.fixture
def api(live_url: str, token: str) -> Any:
    with Client(live_url, token=token) as client:
        yield client


def run_agent(live_url: str, token: str, study_id: str, *options: str, timeout: float = 240,
              **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "SCALETUNE_URL": live_url, "SCALETUNE_TOKEN": token, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([*SCALETUNE, "agent", study_id, *options, "--", *TRAINER], env=environment,
                          capture_output=True, text=True, timeout=timeout)


def submit(api: Client, **changes: Any) -> str:
    return api.submit({**EXTERNAL, **changes}).id


def test_the_agent_runs_the_command_once_per_trial_until_nothing_is_left(api: Client, live_url: str,
                                                                          token: str) -> None:
    study_id = submit(api, n_trials=2, parallelism=1)
    done = run_agent(live_url, token, study_id)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "nothing left to ask" in done.stderr
    study = api.study(study_id)
    assert study.status == "completed" and study.trial_counts["complete"] == 2
    for trial in api.trials(study_id).items:
        assert trial.params is not None and trial.value == pytest.approx((math.log10(trial.params["lr"]) + 2) ** 2)
        assert [p.step for p in trial.intermediate] == [1, 2, 3, 4, 5, 6] and trial.worker


def test_a_failing_command_is_told_failed_with_the_tail_of_its_stderr(api: Client, live_url: str,
                                                                       token: str) -> None:
    study_id = submit(api, n_trials=2)
    done = run_agent(live_url, token, study_id, "--count", "1", TRAINER_EXIT="3")
    assert done.returncode == 0, done.stdout + done.stderr
    trial, = api.trials(study_id).items
    assert trial.state == "failed" and trial.failure_reason is not None
    assert "exited with code 3" in trial.failure_reason and "CUDA out of memory" in trial.failure_reason
    assert api.study(study_id).status == "running"  # --count 1: the second trial is left for another agent


def test_a_command_that_works_on_after_telling_is_left_to_finish(api: Client, live_url: str, token: str,
                                                                  tmp_path: Path) -> None:
    """The agent renews every 5/3 s; the command tells, then saves for 4 s: the renewals refused in between are
    a told trial, not a lost one, so the command is not stopped and the trial ends as it was told."""
    study_id = submit(api, n_trials=1, parallelism=1, lease_seconds=5)
    done = run_agent(live_url, token, study_id, TRAINER_MARK_DIR=str(tmp_path), TRAINER_AFTER_S="4")
    assert done.returncode == 0, done.stdout + done.stderr
    trial, = api.trials(study_id).items
    assert (tmp_path / f"saved-{trial.number}").exists(), done.stdout + done.stderr
    assert f"trial {trial.number} ended: complete" in done.stdout and trial.state == "complete"


def test_each_gpu_slot_runs_its_own_trials_with_cuda_visible_devices(api: Client, live_url: str, token: str,
                                                                     tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    marks.mkdir()
    study_id = submit(api, n_trials=2, parallelism=2)
    env_dump = "import os,sys; open(os.environ['TRAINER_MARK_DIR'] + '/' + os.environ['SCALETUNE_TRIAL'], 'w')" \
               ".write(os.environ.get('CUDA_VISIBLE_DEVICES', ''))"
    environment = {**os.environ, "SCALETUNE_URL": live_url, "SCALETUNE_TOKEN": token,
                   "TRAINER_MARK_DIR": str(marks)}
    done = subprocess.run([*SCALETUNE, "agent", study_id, "--gpus", "0,1", "--", sys.executable, "-c", env_dump],
                          env=environment, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.read_text() for p in marks.iterdir()) == ["0", "1"]
    trials = api.trials(study_id).items
    assert all(t.state == "failed" and "without telling" in (t.failure_reason or "") for t in trials)
    assert sorted(t.worker.rsplit("/", 1)[1] for t in trials if t.worker) == ["gpu0", "gpu1"]


def test_with_trial_tells_failed_on_an_exception(api: Client) -> None:
    study_id = submit(api)
    with pytest.raises(RuntimeError, match="boom"), api.ask(study_id) as trial:
        raise RuntimeError("boom")
    recorded = api.trial(study_id, trial.number)
    assert recorded.state == "failed" and "RuntimeError: boom" in (recorded.failure_reason or "")


def test_a_trial_reports_prunes_and_tells_through_the_client(api: Client) -> None:
    study_id = submit(api, n_trials=2, parallelism=2)
    first, second = api.ask(study_id), api.ask(study_id)
    assert first.report(1, 2.0) is False and first.report(2, float("nan")) is False
    first.tell(float("inf"))
    second.prune()
    assert (first.state, second.state) == ("diverged", "pruned")
    assert [p.value for p in api.trial(study_id, first.number).intermediate] == [2.0, None]


def test_ask_waits_while_every_trial_is_out_or_says_so(api: Client) -> None:
    study_id = submit(api, n_trials=2, parallelism=1)
    trial = api.ask(study_id)
    with pytest.raises(scaletune.client.TooManyOut) as out:
        api.ask(study_id, wait=False)
    assert 1 <= out.value.retry_after <= 10
    trial.tell(0.5)
    api.ask(study_id).tell(0.25)
    with pytest.raises(scaletune.client.Conflict, match="completed"):
        api.ask(study_id)


class Mlp(nn.Module):
    """A model of the user's own: raw nn.Linear layers, built at any width and depth."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.out = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for layer in self.hidden:
            x = x + torch.relu(layer(x))
        return self.out(x)


def test_trial_build_makes_the_users_model_at_the_proxy_shape_with_the_trials_values(api: Client) -> None:
    study_id = submit(api, model={"base": {"width": 16, "depth": 1}, "proxy": {"width": 64, "depth": 2}})
    trial = api.ask(study_id)
    built = trial.build(Mlp)
    assert built.model.inp.out_features == 64 and len(built.model.hidden) == 2
    lrs = {group["name"]: group["lr"] for group in built.param_groups}
    # muP with Adam: hidden matrices' LR scales as 1/width ratio (4x wider than base), vectors keep the base LR.
    hidden, = [group for group in built.plan.groups if group.cls == "hidden"]
    assert hidden.params == ["hidden.0.weight", "hidden.1.weight"]
    assert lrs[hidden.name] == pytest.approx(trial.params["lr"] / 4)
    assert lrs["vector.bias"] == pytest.approx(trial.params["lr"])
    assert built.plan.parametrization == "mup" and built.plan.hparams["lr"] == pytest.approx(trial.params["lr"])
    optimizer = torch.optim.AdamW(built.param_groups)
    loss = built.model(torch.randn(4, 8)).pow(2).mean()
    loss.backward()
    optimizer.step()
    trial.tell(float(loss))


def test_trial_build_applies_the_builtin_values_and_leaves_the_studys_own_to_the_code(api: Client) -> None:
    study_id = submit(api, search_space=OWN_SPACE)
    trial = api.ask(study_id)
    built = trial.build(Mlp)
    assert set(trial.params) == set(OWN_SPACE)
    assert built.plan.hparams["lr"] == pytest.approx(trial.params["lr"]) and "dropout" not in built.plan.hparams
    trial.tell(1.0)


def test_current_trial_reads_the_agents_environment(api: Client, live_url: str, token: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    assert scaletune.current_trial() is None or os.environ.get("SCALETUNE_TRIAL")
    study_id = submit(api)
    asked = api.ask(study_id)
    for key, value in {"SCALETUNE_URL": live_url, "SCALETUNE_TOKEN": token, "SCALETUNE_STUDY": study_id,
                       "SCALETUNE_TRIAL": str(asked.number), "SCALETUNE_PARAMS": __import__("json").dumps(asked.params)
                       }.items():
        monkeypatch.setenv(key, value)
    trial = scaletune.current_trial()
    assert trial is not None and (trial.number, trial.params, trial.proxy) == (asked.number, asked.params, asked.proxy)
    assert (trial.parametrization, trial.optimizer, trial.lease_seconds) == ("mup", "adamw", 30)
