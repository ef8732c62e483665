"""examples/own-trainer end to end at tiny size, as the README tells a new user to run it: submit the study,
`scaletune agent` runs train.py for the trial, `scaletune transfer --factory` plans 8x width and 4x depth, and
train.py trains the target with the plan applied.

Kept cheap (each Python process with torch costs seconds): a 16x1 proxy and a 128x4 target, one trial, and only the
agent and the trial it runs in processes of their own; the other commands run here, in the example's directory."""

from __future__ import annotations

import json
import math
import os
import runpy
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from service.cli import app
from service.db import SessionFactory
from service.tokens import create_token

pytestmark = pytest.mark.integration
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "own-trainer"
AGENT = [sys.executable, "-c", "from service.cli import main; main()", "agent"]
TINY = ["--steps", "6", "--eval-every", "3", "--batch-size", "4", "--eval-batches", "2"]
SHAPE = {"width": 16, "depth": 1}


@pytest.fixture
def in_example(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """In the example's directory with its modules importable, as for a user there; its model module forgotten after."""
    monkeypatch.chdir(EXAMPLE)
    monkeypatch.syspath_prepend(str(EXAMPLE))
    yield
    sys.modules.pop("model", None)


def scaletune(argv: list[str], env: dict[str, str]) -> str:
    result = CliRunner().invoke(app, argv, env=env, prog_name="scaletune")
    assert result.exit_code == 0, f"{argv}\n{result.output}"
    return result.stdout


def test_the_own_trainer_example_tunes_transfers_and_trains_the_target(
        live_url: str, session_factory: SessionFactory, tmp_path: Path, in_example: None,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "input.txt"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text.write_text("".join((stdlib / name).read_text() for name in ("textwrap.py", "string.py", "shlex.py")))
    spec = yaml.safe_load((EXAMPLE / "study.yaml").read_text())
    spec.update(n_trials=1, parallelism=1, model={"base": SHAPE, "proxy": SHAPE})
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(spec))
    env = {"SCALETUNE_URL": live_url, "SCALETUNE_TOKEN": create_token(session_factory, "own-trainer")}

    study_id = json.loads(scaletune(["submit", str(tmp_path / "study.yaml"), "--json"], env))["id"]
    agent = subprocess.run([*AGENT, study_id, "--", sys.executable, "train.py", "--data", str(text), *TINY],
                           cwd=EXAMPLE, env={**os.environ, **env, "OMP_NUM_THREADS": "1"}, capture_output=True,
                           text=True, timeout=600)
    assert agent.returncode == 0, f"{agent.stdout}\n{agent.stderr}"
    status = json.loads(scaletune(["status", study_id, "--json"], env))
    assert status["status"] == "completed" and status["trial_counts"]["complete"] == 1, status

    plan_path = tmp_path / "plan.json"
    scaletune(["transfer", study_id, "--factory", "model:build", "--branch-outputs", "blocks.*.attn,blocks.*.mlp",
               "--width", "128", "--depth", "4", "-o", str(plan_path)], env)
    plan = json.loads(plan_path.read_text())
    assert plan["target"] == {"width": 128, "depth": 4} and plan["parametrization"] == "completep"
    assert plan["branch_multiplier"] == pytest.approx(1 / 4)  # CompleteP: (target depth / base depth)^-1
    assert plan["hparams"]["lr"] == pytest.approx(status["best_params"]["lr"])

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["train.py", "--data", str(text), "--plan", str(plan_path), "--width", "128",
                                      "--depth", "4", "--steps", "2", "--eval-every", "2", "--batch-size", "2",
                                      "--eval-batches", "1"])
    runpy.run_path(str(EXAMPLE / "train.py"), run_name="__main__")
    out = capsys.readouterr().out
    final = float(out.strip().splitlines()[-1].rsplit(" ", 1)[1])
    assert "target 128x4" in out and math.isfinite(final)
