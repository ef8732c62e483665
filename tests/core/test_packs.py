"""Packs: a member trained inside a pack gets the losses it gets alone, leaves when it diverges or is pruned.

Tolerance: relative 1e-5 on every train and eval loss. Both runs are float32. Inside a pack the forward and
backward run as batched kernels (bmm, grouped convolution) and the optimizer and gradient-norm clipping as a
few fused ops over all parameters, so sums are taken in another order than in the single-model kernels; each
reordering moves a result by about one float32 ulp (6e-8 relative), and a few steps of training carry that to
~1e-7 (measured: at most 1.1e-7 over these cases). 1e-5 leaves two orders of magnitude for that noise while
anything a pack could get wrong (another member's learning rate, seed, init std, multiplier or data order)
moves the losses by more than 1e-3, which the test checks by requiring the members to differ that much.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from scaletune.hparams import HParams
from scaletune.packs import auto_pack_size, pack_size_for, run_pack
from scaletune.packs.auto import MAX_PACK, SATURATION_FLOPS
from scaletune.parametrize import OPTIMIZERS, PARAMETRIZATIONS
from scaletune.runner import TrialConfig, run_trial
from scaletune.shapes import Shape
from scaletune.train import Budget, TrainResult

RTOL = 1e-5
DISTINCT = 1e-3

FAMILIES: dict[str, dict[str, Any]] = {
    "mlp": dict(family="mlp", args={}, dataset="digits", dataset_args={}, base=Shape(8, 1), shape=Shape(16, 2)),
    "gpt": dict(family="gpt", args={"head_dim": 8}, dataset="pytext",
                dataset_args={"seq_len": 8, "max_bytes": 20_000, "eval_windows": 8},
                base=Shape(8, 1), shape=Shape(16, 2)),
    "vit": dict(family="vit", args={"head_dim": 8, "mlp_ratio": 2}, dataset="digits", dataset_args={},
                base=Shape(8, 1), shape=Shape(16, 2)),
    "resnet": dict(family="resnet", args={"strides": [1, 2, 2]}, dataset="digits", dataset_args={},
                   base=Shape(2, 1), shape=Shape(4, 2)),
}
LR = {"adamw": 3e-2, "sgd": 0.2}


def config(family: str, optimizer: str, parametrization: str, steps: int = 4) -> TrialConfig:
    return TrialConfig(parametrization=parametrization, optimizer=optimizer, hparams=HParams(), device="cpu",
                       budget=Budget(steps=steps, batch_size=8, eval_every=2, eval_batches=2), **FAMILIES[family])


def members(cfg: TrialConfig) -> list[TrialConfig]:
    """Two trials that differ in every per-member value a pack must keep apart, and in seed (data order)."""
    lr = LR[cfg.optimizer]
    return [
        replace(cfg, seed=0, hparams=HParams(lr=lr, warmup_frac=0.25, weight_decay=0.1)),
        replace(cfg, seed=1, hparams=HParams(lr=lr / 3, init_std=1.5, input_mult=1.5, output_mult=0.5, attn_mult=2.0,
                                             beta1=0.8, beta2=0.99, eps=1e-6, momentum=0.5)),
    ]


def losses(result: TrainResult) -> list[float]:
    return [v for p in result.curve for v in (p.train_loss, p.eval_loss)]


def assert_same_run(packed: TrainResult, alone: TrainResult) -> None:
    assert (packed.status, packed.steps, packed.diverged_step) == (alone.status, alone.steps, alone.diverged_step)
    assert [p.step for p in packed.curve] == [p.step for p in alone.curve]
    assert losses(packed) == pytest.approx(losses(alone), rel=RTOL)
    assert packed.flops == alone.flops


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_member_matches_the_same_trial_alone(family: str, optimizer: str, parametrization: str) -> None:
    cfgs = members(config(family, optimizer, parametrization))
    packed = run_pack(cfgs)
    alone = [run_trial(cfg) for cfg in cfgs]
    for p, a in zip(packed, alone):
        assert_same_run(p, a)
    a, b = losses(alone[0]), losses(alone[1])
    assert max(abs(x - y) / abs(x) for x, y in zip(a, b)) > DISTINCT  # the members really differ


def test_members_sharing_a_seed_share_batches_and_still_match() -> None:
    cfgs = [replace(c, seed=3) for c in members(config("mlp", "adamw", "mup"))]
    for p, a in zip(run_pack(cfgs), [run_trial(cfg) for cfg in cfgs]):
        assert_same_run(p, a)


def test_a_model_with_tied_embeddings_packs_and_still_matches() -> None:
    """One tensor under two names (gpt's readout tied to its embedding) is one parameter of every member."""
    cfg = config("gpt", "adamw", "mup")
    cfgs = members(replace(cfg, args={**cfg.args, "tie_embeddings": True}))
    for p, a in zip(run_pack(cfgs), [run_trial(c) for c in cfgs]):
        assert_same_run(p, a)


def test_members_of_different_lengths_each_follow_their_own_budget() -> None:
    """A shape-schedule grid packs one shape's budgets: each member its own WSD cooldown, evals and last step."""
    cfg = config("mlp", "adamw", "mup")
    cfgs = [replace(c, budget=replace(c.budget, steps=steps, eval_every=steps, schedule="wsd"))
            for c, steps in zip(members(cfg) + [replace(members(cfg)[0], seed=5)], (3, 7, 5))]
    packed, alone = run_pack(cfgs), [run_trial(c) for c in cfgs]
    assert [p.steps for p in packed] == [3, 7, 5]
    for p, a in zip(packed, alone):
        assert_same_run(p, a)


def test_a_diverged_member_leaves_and_the_others_go_on() -> None:
    cfgs = members(config("mlp", "sgd", "sp", steps=6))
    cfgs.insert(1, replace(cfgs[0], seed=2, hparams=HParams(lr=1e10)))
    packed, alone = run_pack(cfgs), [run_trial(cfg) for cfg in cfgs]
    assert alone[1].status == "diverged"
    for p, a in zip(packed, alone):
        assert_same_run(p, a)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_a_pruned_member_stops_and_the_last_one_finishes_alone_as_it_would_have(optimizer: str) -> None:
    """The last member leaves the stack for the plain loop with its parameters and optimizer state."""
    cfgs = members(config("gpt", optimizer, "completep", steps=6))
    seen: list[int] = []

    def prune_at_2(point) -> bool:
        seen.append(point.step)
        return point.step >= 2

    packed = run_pack(cfgs, callbacks=[prune_at_2, None])
    assert seen == [2]
    assert packed[0].status == "stopped" and packed[0].steps == 2
    assert_same_run(packed[0], run_trial(cfgs[0], callback=lambda point: point.step >= 2))
    assert_same_run(packed[1], run_trial(cfgs[1]))


def test_a_pack_refuses_trials_that_are_not_the_same_configuration() -> None:
    cfg = config("mlp", "adamw", "mup")
    with pytest.raises(ValueError, match="differ only in their hyperparameters, seed, steps"):
        run_pack([cfg, replace(cfg, shape=Shape(32, 2))])
    with pytest.raises(ValueError, match="2 trials but 1 callbacks"):
        run_pack([cfg, cfg], callbacks=[None])


def test_auto_pack_size_packs_tiny_proxies_fully_and_large_models_alone() -> None:
    tiny = config("mlp", "adamw", "mup")
    assert pack_size_for(tiny) == MAX_PACK["cpu"]
    assert auto_pack_size(params=10_000, flops_per_step=SATURATION_FLOPS["cpu"] / 4, device="cpu") == 4
    assert auto_pack_size(params=10_000, flops_per_step=10 * SATURATION_FLOPS["cpu"], device="cpu") == 1
    assert auto_pack_size(params=10**13, flops_per_step=1.0, device="cpu") == 1  # no room for a second copy
    sizes = [pack_size_for(replace(tiny, family="gpt", args={"head_dim": 8}, dataset="pytext",
                                   dataset_args={"seq_len": 16}, budget=replace(tiny.budget, batch_size=8),
                                   shape=Shape(width, 2))) for width in (16, 64, 256)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]
