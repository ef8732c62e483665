"""The training loop: relative schedules, determinism, eval cadence, divergence and stopping."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from scaletune.data.base import DataSpec
from scaletune.hparams import HParams
from scaletune.train import SCHEDULES, Budget, EvalPoint, apply_lr_factor, lr_factor, train


class Blobs:
    """Two Gaussian blobs in 8-d: learnable in a few steps, deterministic per seed."""

    spec = DataSpec(task="classification", input_shape=(8,), num_outputs=2)

    def __init__(self) -> None:
        self.eval_batches_served = 0

    @staticmethod
    def _batch(gen: torch.Generator, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 2, (batch_size,), generator=gen)
        x = torch.randn(batch_size, 8, generator=gen) + 2.0 * (y.float()[:, None] * 2 - 1)
        return x, y

    def train_batches(self, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(seed)
        while True:
            yield self._batch(gen, batch_size)

    def eval_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(10_000)
        for _ in range(5):
            self.eval_batches_served += 1
            yield self._batch(gen, batch_size)


class Tokens:
    """Next-token data where token t+1 = t + 1 mod V: an LM can learn it exactly."""

    spec = DataSpec(task="lm", input_shape=(6,), num_outputs=7)

    def _batch(self, gen: torch.Generator, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = torch.randint(0, 7, (batch_size, 1), generator=gen)
        seq = (start + torch.arange(7)) % 7
        return seq[:, :-1], seq[:, 1:]

    def train_batches(self, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(seed)
        while True:
            yield self._batch(gen, batch_size)

    def eval_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(1)
        for _ in range(2):
            yield self._batch(gen, batch_size)


def mlp_and_groups(lr: float, seed: int = 0) -> tuple[nn.Module, list[dict]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    groups = [
        {"params": [model[0].weight, model[0].bias], "lr": lr, "base_lr": lr, "weight_decay": 0.0,
         "eps": 1e-8, "name": "input"},
        {"params": [model[2].weight, model[2].bias], "lr": lr / 4, "base_lr": lr / 4, "weight_decay": 0.0,
         "eps": 1e-8, "name": "output"},
    ]
    return model, groups


def run(budget: Budget, lr: float = 1e-2, seed: int = 0, optimizer: str = "adamw", **kwargs):
    model, groups = mlp_and_groups(lr, seed)
    return train(model, groups, Blobs(), budget, HParams(lr=lr), optimizer, flops_per_sample=100.0,
                 seed=seed, device="cpu", **kwargs)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedules_keep_per_group_lr_ratios_at_every_step(schedule: str) -> None:
    budget = Budget(steps=20, batch_size=4, eval_every=5, schedule=schedule, min_lr_frac=0.1)
    _, groups = mlp_and_groups(lr=1e-2)
    opt = torch.optim.AdamW(groups)
    for step in range(budget.steps):
        apply_lr_factor(opt, lr_factor(step, budget, warmup_frac=0.2))
        lrs = [g["lr"] for g in opt.param_groups]
        assert lrs[0] > 0
        assert lrs[1] / lrs[0] == pytest.approx(0.25, rel=1e-12)
        assert [g["base_lr"] for g in opt.param_groups] == [1e-2, 2.5e-3]


def test_schedule_shapes() -> None:
    steps = 100
    factors = {s: [lr_factor(i, Budget(steps, 1, 10, schedule=s, decay_frac=0.2), 0.1) for i in range(steps)]
               for s in SCHEDULES}
    for f in factors.values():
        assert f[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])  # linear warmup
    assert factors["constant"][10:] == [1.0] * 90
    assert factors["wsd"][10:80] == [1.0] * 70 and factors["wsd"][-1] < 0.05
    for s in ("cosine", "linear", "wsd"):
        tail = factors[s][10:]
        assert all(a >= b for a, b in zip(tail, tail[1:]))
        assert tail[-1] < 0.05
    floor = lr_factor(steps - 1, Budget(steps, 1, 10, schedule="cosine", min_lr_frac=0.3), 0.0)
    assert floor == pytest.approx(0.3, abs=1e-3)


def test_eval_cadence_samples_and_flops() -> None:
    result = run(Budget(steps=10, batch_size=4, eval_every=4))
    assert result.status == "completed" and result.steps == 10
    assert [p.step for p in result.curve] == [4, 8, 10]
    assert [p.samples for p in result.curve] == [16, 32, 40]
    assert [p.flops for p in result.curve] == [1600.0, 3200.0, 4000.0]
    assert result.flops == 4000.0
    assert result.final_eval_loss == result.curve[-1].eval_loss
    assert result.best_eval_loss == min(p.eval_loss for p in result.curve)
    assert result.device == "cpu"


def test_training_learns_the_task() -> None:
    result = run(Budget(steps=40, batch_size=16, eval_every=10, schedule="constant"), lr=3e-2)
    assert result.curve[-1].eval_loss < 0.5 * result.curve[0].eval_loss
    assert result.curve[-1].eval_loss < 0.1


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_same_seed_gives_bit_identical_losses(optimizer: str) -> None:
    budget = Budget(steps=12, batch_size=8, eval_every=3)
    a, b = run(budget, seed=3, optimizer=optimizer), run(budget, seed=3, optimizer=optimizer)
    c = run(budget, seed=4, optimizer=optimizer)
    assert [p.eval_loss for p in a.curve] == [p.eval_loss for p in b.curve]
    assert [p.train_loss for p in a.curve] == [p.train_loss for p in b.curve]
    assert [p.train_loss for p in a.curve] != [p.train_loss for p in c.curve]


def test_eval_batches_caps_the_held_out_pass() -> None:
    model, groups = mlp_and_groups(1e-2)
    data = Blobs()
    train(model, groups, data, Budget(steps=4, batch_size=4, eval_every=2, eval_batches=2), HParams(), "adamw",
          flops_per_sample=1.0, device="cpu")
    assert data.eval_batches_served == 2 * 2


def test_overflowing_lr_is_a_recorded_divergence_not_an_exception() -> None:
    result = run(Budget(steps=20, batch_size=8, eval_every=5, schedule="constant"),
                 lr=1e30, optimizer="sgd")
    assert result.status == "diverged"
    assert result.diverged_step is not None and 1 <= result.diverged_step <= 20
    assert result.steps < result.diverged_step
    payload = json.dumps(result.to_dict(), allow_nan=False)
    assert json.loads(payload)["status"] == "diverged"


class NaNWhenEvaluated(nn.Module):
    """Finite while training, NaN in eval mode: a divergence only the held-out pass can see."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        return out if self.training else out * float("nan")


def test_a_divergence_names_the_step_whose_loss_was_non_finite() -> None:
    """A NaN train loss at step k stops before update k; a NaN eval after step k stops after it: both say k."""
    in_training = run(Budget(steps=20, batch_size=8, eval_every=5, schedule="constant"),
                      lr=1e30, optimizer="sgd")
    assert in_training.diverged_step == in_training.steps + 1
    model = NaNWhenEvaluated()
    groups = [{"params": list(model.parameters()), "lr": 1e-2, "base_lr": 1e-2, "weight_decay": 0.0,
               "eps": 1e-8, "name": "all"}]
    in_eval = train(model, groups, Blobs(), Budget(steps=20, batch_size=4, eval_every=5), HParams(), "adamw",
                    flops_per_sample=1.0, device="cpu")
    assert in_eval.status == "diverged"
    assert in_eval.steps == 5 and in_eval.diverged_step == 5
    assert in_eval.curve == [] and in_eval.final_eval_loss is None and in_eval.flops == 5 * 4


def test_callback_returning_true_stops_the_run() -> None:
    seen: list[EvalPoint] = []

    def stop_at_second(point: EvalPoint) -> bool:
        seen.append(point)
        return len(seen) == 2

    result = run(Budget(steps=30, batch_size=4, eval_every=5), callback=stop_at_second)
    assert result.status == "stopped"
    assert result.steps == 10 and [p.step for p in result.curve] == [5, 10]
    assert seen == result.curve


def test_lm_loss_is_token_level_and_learnable() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(7, 16), nn.Linear(16, 7))
    groups = [{"params": list(model.parameters()), "lr": 5e-2, "base_lr": 5e-2, "weight_decay": 0.0,
               "eps": 1e-8, "name": "all"}]
    result = train(model, groups, Tokens(), Budget(steps=60, batch_size=8, eval_every=20, schedule="constant"),
                   HParams(lr=5e-2), "adamw", flops_per_sample=1.0, device="cpu")
    assert result.status == "completed"
    assert result.curve[0].eval_loss < 1.9  # below chance, log(7) = 1.95
    assert result.final_eval_loss < 0.1


def test_budget_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="schedule"):
        Budget(steps=10, batch_size=4, eval_every=2, schedule="exp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        Budget(steps=0, batch_size=4, eval_every=2)
    assert Budget.from_dict(Budget(5, 2, 1, schedule="wsd").to_dict()) == Budget(5, 2, 1, schedule="wsd")
