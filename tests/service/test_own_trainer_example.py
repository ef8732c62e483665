"""examples/own-trainer end to end at tiny size, as the README tells a new user to run it: submit the study,
`scaletune agent` runs train.py per trial, `scaletune transfer --factory` plans 8x width and 4x depth, and
train.py trains the target with the plan applied."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from service.tokens import create_token
from service.db import SessionFactory

pytestmark = pytest.mark.integration
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "own-trainer"
SCALETUNE = [sys.executable, "-c", "from service.cli import main; main()"]
TINY = ["--steps", "6", "--eval-every", "3", "--batch-size", "4", "--eval-batches", "2"]


def run(argv: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(argv, cwd=EXAMPLE, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{argv}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_the_own_trainer_example_tunes_transfers_and_trains_the_target(live_url: str, session_factory: SessionFactory,
                                                                       tmp_path: Path) -> None:
    text = tmp_path / "input.txt"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text.write_text("".join((stdlib / name).read_text() for name in ("textwrap.py", "string.py", "shlex.py")))
    spec = yaml.safe_load((EXAMPLE / "study.yaml").read_text())
    spec.update(n_trials=2, parallelism=1)
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "SCALETUNE_URL": live_url, "OMP_NUM_THREADS": "1",
           "SCALETUNE_TOKEN": create_token(session_factory, "own-trainer")}

    study_id = json.loads(run([*SCALETUNE, "submit", str(tmp_path / "study.yaml"), "--json"], env))["id"]
    run([*SCALETUNE, "agent", study_id, "--", sys.executable, "train.py", "--data", str(text), *TINY], env)
    status = json.loads(run([*SCALETUNE, "status", study_id, "--json"], env))
    assert status["status"] == "completed" and status["trial_counts"]["complete"] == 2, status

    plan_path = tmp_path / "plan.json"
    run([*SCALETUNE, "transfer", study_id, "--factory", "model:build", "--branch-outputs",
         "blocks.*.attn,blocks.*.mlp", "--width", "512", "--depth", "8", "-o", str(plan_path)], env)
    plan = json.loads(plan_path.read_text())
    assert plan["target"] == {"width": 512, "depth": 8} and plan["parametrization"] == "completep"
    assert plan["branch_multiplier"] == pytest.approx(2 / 8)  # CompleteP: (target depth / base depth)^-1
    assert plan["hparams"]["lr"] == pytest.approx(status["best_params"]["lr"])

    out = run([sys.executable, "train.py", "--data", str(text), "--plan", str(plan_path), "--width", "512",
               "--depth", "8", "--steps", "2", "--eval-every", "2", "--batch-size", "2", "--eval-batches", "1"], env)
    final = float(out.strip().splitlines()[-1].rsplit(" ", 1)[1])
    assert "target 512x8" in out and math.isfinite(final)
