"""run_trial: a real family on a real dataset, the parameter cap, and input validation."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from scaletune.data.registry import dataset_spec
from scaletune.hparams import HParams
from scaletune.models.registry import get_family
from scaletune.parametrize import build_model
from scaletune.runner import ModelTooLarge, TrialConfig, prepare_trial, run_trial
from scaletune.shapes import Shape
from scaletune.train import Budget, Checkpointing, EvalPoint


def mlp_trial(**changes) -> TrialConfig:
    cfg = TrialConfig(family="mlp", args={}, base=Shape(16, 2), shape=Shape(32, 2), parametrization="mup",
                      optimizer="adamw", dataset="digits", dataset_args={}, hparams=HParams(lr=1e-2),
                      budget=Budget(steps=30, batch_size=32, eval_every=10, eval_batches=4), seed=0, device="cpu")
    return replace(cfg, **changes)


def test_run_trial_trains_a_family_on_a_dataset() -> None:
    cfg = mlp_trial()
    result = run_trial(cfg)
    assert result.status == "completed"
    assert [p.step for p in result.curve] == [10, 20, 30]
    assert result.final_eval_loss < result.curve[0].eval_loss < 2.3  # log(10) is chance on 10 digits
    spec = dataset_spec("digits", {})
    per_sample = get_family("mlp").train_flops_per_sample(cfg.shape, spec, cfg.args)
    assert result.flops == pytest.approx(30 * 32 * per_sample)


def test_run_trial_is_reproducible_and_seed_dependent() -> None:
    a, b, c = run_trial(mlp_trial()), run_trial(mlp_trial()), run_trial(mlp_trial(seed=1))
    assert [p.eval_loss for p in a.curve] == [p.eval_loss for p in b.curve]
    assert [p.eval_loss for p in a.curve] != [p.eval_loss for p in c.curve]


def test_a_seed_initialises_the_weights_torch_manual_seed_would_whatever_ran_before() -> None:
    """Builds seed only the generators they draw from, and reuse one classification: the weights of a seed are
    those of ``torch.manual_seed(seed)`` and a build from scratch, whatever drew random numbers in between."""
    cfg = mlp_trial()
    prepared = prepare_trial(cfg)
    torch.manual_seed(cfg.seed)
    expected = build_model(prepared.factory, cfg.base, cfg.shape, cfg.parametrization, cfg.hparams, cfg.optimizer)
    torch.rand(7)
    for _ in range(2):  # the second build reuses the first's classification
        built = prepare_trial(cfg).build(cfg.hparams, cfg.seed)
        assert all(torch.equal(a, b) for a, b in zip(built.model.state_dict().values(),
                                                     expected.model.state_dict().values(), strict=True))


def test_run_trial_passes_eval_points_to_the_callback() -> None:
    result = run_trial(mlp_trial(), callback=lambda point: point.step >= 20)
    assert result.status == "stopped" and result.steps == 20


def test_oversized_model_is_refused_before_allocation() -> None:
    huge = Shape(1_000_000, 64)  # trillions of parameters: allocating would fail, counting on meta does not
    started = time.perf_counter()
    with pytest.raises(ModelTooLarge) as info:
        run_trial(mlp_trial(shape=huge), max_params=10_000_000)
    assert time.perf_counter() - started < 10
    assert info.value.limit == 10_000_000 and info.value.count > 10**12
    assert "10,000,000" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_model_under_the_cap_runs() -> None:
    assert run_trial(mlp_trial(budget=Budget(steps=2, batch_size=8, eval_every=2, eval_batches=1)),
                     max_params=10_000_000).status == "completed"


def test_invalid_shape_or_family_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="patch_size"):
        run_trial(mlp_trial(shape=Shape(32, 2, patch_size=4)))
    with pytest.raises(ValueError, match="unknown"):
        run_trial(mlp_trial(family="no-such-family"))


def test_divergence_is_reported_not_raised() -> None:
    cfg = mlp_trial(optimizer="sgd", hparams=HParams(lr=1e30),
                    budget=Budget(steps=10, batch_size=32, eval_every=5, schedule="constant"))
    result = run_trial(cfg)
    assert result.status == "diverged" and result.diverged_step is not None


@pytest.mark.parametrize("options", [None, {"grad_clip": "relative", "grad_clip_factor": 1.05}],
                         ids=["no clipping", "relative clipping"])
def test_a_killed_run_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one(
        tmp_path: Path, options: dict[str, object] | None) -> None:
    """With the relative clipping rule (a factor that clips often), the running norm is saved and restored too."""
    cfg = mlp_trial(budget=Budget(steps=60, batch_size=32, eval_every=10, eval_batches=4), options=options)
    saves = Checkpointing(tmp_path / "trial.pt", every_evals=2)

    def killed_at_step_50(point: EvalPoint) -> bool:
        if point.step == 50:
            raise KeyboardInterrupt("worker killed")
        return False

    with pytest.raises(KeyboardInterrupt):
        run_trial(cfg, killed_at_step_50, checkpointing=saves)
    seen: list[int] = []
    resumed = run_trial(cfg, lambda point: seen.append(point.step) is not None, checkpointing=saves)

    assert seen == [50, 60], "resumed after the save at the 4th eval (step 40), not from step 0"
    uninterrupted = run_trial(cfg)
    assert [p.step for p in resumed.curve] == [p.step for p in uninterrupted.curve]
    assert [p.eval_loss for p in resumed.curve] == pytest.approx([p.eval_loss for p in uninterrupted.curve], rel=1e-5)
    assert resumed.flops == pytest.approx(uninterrupted.flops)
