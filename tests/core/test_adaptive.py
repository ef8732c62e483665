"""Executing a shape schedule: surgery at the transition FLOPs, one WSD run, exact resume after a kill."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from scaletune.adaptive import CHECKPOINT, Phase, phase_ends, run_schedule
from scaletune.data.registry import dataset_spec
from scaletune.hparams import HParams
from scaletune.models.registry import get_family
from scaletune.runner import TrialConfig
from scaletune.shapes import Shape
from scaletune.train import Budget, EvalPoint

START = Shape(16, 2, patch_size=4)
CFG = TrialConfig(family="vit", args={}, base=Shape(16, 2), shape=START, parametrization="mup", optimizer="adamw",
                  dataset="digits", dataset_args={}, hparams=HParams(lr=3e-3, warmup_frac=0.1),
                  budget=Budget(steps=1, batch_size=16, eval_every=5, eval_batches=2, schedule="wsd"), seed=3)


def per_step(shape: Shape) -> float:
    return CFG.budget.batch_size * get_family("vit").train_flops_per_sample(shape, dataset_spec("digits", {}), {})


FINE, WIDE = START.with_(patch_size=2), Shape(32, 2, patch_size=2)
# 15 steps at patch 4, 15 at patch 2, then 20 at twice the width (each phase end is in cumulative FLOPs)
PHASES = [Phase(START, 15 * per_step(START)), Phase(FINE, 15 * per_step(START) + 15 * per_step(FINE)),
          Phase(WIDE, 15 * per_step(START) + 15 * per_step(FINE) + 20 * per_step(WIDE))]


class Killed(Exception):
    pass


def test_surgery_happens_at_the_transition_flops(tmp_path: Path) -> None:
    out = run_schedule(CFG, PHASES, tmp_path, noise=0.0)
    ends = phase_ends(PHASES, per_step)
    assert out.train.status == "completed" and out.train.steps == ends[-1]
    assert [s.step for s in out.switches] == ends[:2]
    assert [s.to_shape for s in out.switches] == [PHASES[1].shape.to_dict(), PHASES[2].shape.to_dict()]
    assert PHASES[0].until_flops <= out.switches[0].flops < PHASES[0].until_flops + per_step(PHASES[0].shape)
    assert out.train.flops >= PHASES[-1].until_flops
    assert out.switches[1].eval_after == pytest.approx(out.switches[1].eval_before, abs=1e-5)  # width growth is exact
    assert all(math.isfinite(p.eval_loss) for p in out.train.curve)
    flops = [p.flops for p in out.train.curve]
    assert flops == sorted(flops)


def test_a_killed_run_resumes_in_the_right_shape_and_ends_where_an_uninterrupted_one_does(tmp_path: Path) -> None:
    reference = run_schedule(CFG, PHASES, tmp_path / "ref")
    second_switch = phase_ends(PHASES, per_step)[1]

    def kill_after_second_switch(point: EvalPoint) -> None:
        if point.step > second_switch + 5:
            raise Killed

    with pytest.raises(Killed):
        run_schedule(CFG, PHASES, tmp_path / "run", callback=kill_after_second_switch)
    assert (tmp_path / "run" / CHECKPOINT).exists() and not list((tmp_path / "run").glob("*.tmp"))
    resumed = run_schedule(CFG, PHASES, tmp_path / "run")
    assert resumed.train.curve == reference.train.curve
    assert resumed.switches == reference.switches


def test_a_diverging_schedule_is_a_recorded_outcome_numbered_as_train_numbers_it(tmp_path: Path) -> None:
    overflowing = replace(CFG, optimizer="sgd", hparams=HParams(lr=1e38))
    out = run_schedule(overflowing, PHASES, tmp_path)
    assert out.train.status == "diverged" and out.train.diverged_step == out.train.steps + 1
    assert out.train.steps < phase_ends(PHASES, per_step)[0] and not out.switches
    assert all(math.isfinite(p.eval_loss) for p in out.train.curve)


def test_a_checkpoint_is_not_reused_for_a_different_schedule(tmp_path: Path) -> None:
    run_schedule(CFG, PHASES[:2], tmp_path)
    with pytest.raises(ValueError, match="different schedule"):
        run_schedule(CFG, PHASES, tmp_path)


def test_phases_must_start_at_the_configured_shape_and_increase() -> None:
    with pytest.raises(ValueError, match="first phase"):
        run_schedule(CFG, PHASES[1:], "unused")
    with pytest.raises(ValueError, match="must increase"):
        phase_ends([PHASES[1], PHASES[0]], per_step)
