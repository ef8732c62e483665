"""The one training loop used by trials, benchmarks and checks: schedules, eval, divergence, flops."""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from scaletune.clipping import RelativeClipper
from scaletune.data.base import Dataset, Task
from scaletune.hparams import HParams
from scaletune.parametrize import make_optimizer

Schedule = Literal["cosine", "linear", "wsd", "constant"]
SCHEDULES: tuple[str, ...] = ("cosine", "linear", "wsd", "constant")
Status = Literal["completed", "diverged", "stopped"]


@dataclass(frozen=True)
class Budget:
    """How long and how a run trains; the warmup fraction is a tuned value and lives in HParams.

    Gradient clipping is not here: it is part of the parametrization (``ParamOptions.grad_clip``).
    """

    steps: int
    batch_size: int
    eval_every: int
    schedule: Schedule = "cosine"
    decay_frac: float = 0.2
    eval_batches: int | None = None
    min_lr_frac: float = 0.0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.eval_every < 1:
            raise ValueError("steps, batch_size and eval_every must be positive integers, got "
                             f"{self.steps}, {self.batch_size}, {self.eval_every}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; known: {list(SCHEDULES)}")
        if not 0.0 <= self.decay_frac <= 1.0:
            raise ValueError(f"decay_frac must lie in [0, 1], got {self.decay_frac}")
        if not 0.0 <= self.min_lr_frac <= 1.0:
            raise ValueError(f"min_lr_frac must lie in [0, 1], got {self.min_lr_frac}")
        if self.eval_batches is not None and self.eval_batches < 1:
            raise ValueError(f"eval_batches must be positive or None, got {self.eval_batches}")

    def evaluates_after(self, step: int) -> bool:
        """Whether the run evaluates once ``step`` updates are done: every ``eval_every`` and at the end."""
        return step % self.eval_every == 0 or step == self.steps

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Budget:
        return cls(**d)


def lr_factor(step: int, budget: Budget, warmup_frac: float) -> float:
    """Multiplier on every group's base LR for the update at ``step`` (0-based)."""
    if not 0.0 <= warmup_frac < 1.0:
        raise ValueError(f"warmup_frac must lie in [0, 1), got {warmup_frac}")
    warmup = round(warmup_frac * budget.steps)
    if step < warmup:
        return (step + 1) / warmup
    floor = budget.min_lr_frac
    if budget.schedule == "constant":
        return 1.0
    if budget.schedule == "wsd":
        cooldown = round(budget.decay_frac * budget.steps)
        start = budget.steps - cooldown
        if step < start:
            return 1.0
        return 1.0 - (1.0 - floor) * (step - start + 1) / (cooldown + 1)
    progress = (step - warmup) / max(1, budget.steps - warmup)
    if budget.schedule == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def apply_lr_factor(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Scale each group relative to its own base LR, so muP's per-group ratios survive the schedule."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


@dataclass(frozen=True)
class EvalPoint:
    step: int
    samples: int
    flops: float
    train_loss: float
    eval_loss: float


Callback = Callable[[EvalPoint], bool | None]


def _finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


@dataclass
class TrainResult:
    """A run's outcome: ``steps`` counts updates applied; ``diverged_step`` is the step whose loss was non-finite."""

    status: Status
    steps: int
    final_eval_loss: float | None
    best_eval_loss: float | None
    curve: list[EvalPoint] = field(default_factory=list)
    diverged_step: int | None = None
    flops: float = 0.0
    seconds: float = 0.0
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: non-finite floats become None."""
        d = asdict(self)
        d["final_eval_loss"] = _finite_or_none(self.final_eval_loss)
        d["best_eval_loss"] = _finite_or_none(self.best_eval_loss)
        d["curve"] = [{k: _finite_or_none(v) if isinstance(v, float) else v for k, v in asdict(p).items()}
                      for p in self.curve]
        return d


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def model_logits(output: Any) -> torch.Tensor:
    """A model's logits: the output itself, or its ``logits`` (Hugging Face models return output objects)."""
    return getattr(output, "logits", output)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, task: Task) -> torch.Tensor:
    """Cross-entropy in fp32; for ``lm`` averaged over every token."""
    if task == "lm":
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return F.cross_entropy(logits.float(), targets)


def _to_device(batch: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if device.type != "cuda":
        return batch[0].to(device), batch[1].to(device)
    return tuple(t.pin_memory().to(device, non_blocking=True) for t in batch)  # type: ignore[return-value]


def _autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, batch_size: int, max_batches: int | None,
             device: torch.device) -> float:
    """Mean loss per target (sample or token) over the held-out split, capped at ``max_batches``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in itertools.islice(dataset.eval_batches(batch_size), max_batches):
        x, y = _to_device(batch, device)
        with _autocast(device):
            logits = model_logits(model(x))
        n = y.numel()
        total += loss_fn(logits, y, dataset.spec.task).item() * n
        count += n
    model.train(was_training)
    if count == 0:
        raise ValueError("the dataset's eval split yielded no batches")
    return total / count


@dataclass
class Progress:
    """Where a run stands: updates and FLOPs done, the train-loss window since the last eval, the finite curve."""

    step: int = 0
    flops: float = 0.0
    window_loss: float = 0.0
    window_steps: int = 0
    curve: list[EvalPoint] = field(default_factory=list)
    diverged_step: int | None = None

    def advance(self, loss_value: float, flops: float) -> None:
        """Count one applied update whose training loss was ``loss_value``."""
        self.step += 1
        self.flops += flops
        self.window_loss += loss_value
        self.window_steps += 1

    def record(self, eval_loss: float, batch_size: int) -> EvalPoint | None:
        """Close the train-loss window with an eval point; a finite one joins the curve, a non-finite one
        marks the run diverged at this step and is None."""
        point = EvalPoint(step=self.step, samples=self.step * batch_size, flops=self.flops,
                          train_loss=self.window_loss / self.window_steps, eval_loss=eval_loss)
        self.window_loss, self.window_steps = 0.0, 0
        if not math.isfinite(eval_loss):
            self.diverged_step = self.step
            return None
        self.curve.append(point)
        return point

    def result(self, status: Status, seconds: float, device: torch.device) -> TrainResult:
        losses = [p.eval_loss for p in self.curve]
        return TrainResult(status=status, steps=self.step, final_eval_loss=losses[-1] if losses else None,
                           best_eval_loss=min(losses) if losses else None, curve=self.curve,
                           diverged_step=self.diverged_step, flops=self.flops, seconds=seconds, device=str(device))


@dataclass(frozen=True)
class Loop:
    """The training step and its evaluation, shared by ``train`` and the adaptive schedule (which swaps models)."""

    dataset: Dataset
    budget: Budget
    warmup_frac: float
    device: torch.device
    callback: Callback | None = None

    def run(self, model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterator[tuple[torch.Tensor, ...]],
            progress: Progress, until: int, flops_per_step: float, clip: RelativeClipper | None = None) -> Status:
        """Train from ``progress.step`` to step ``until`` ("completed"), or to a divergence or a stop.

        ``clip`` is the parametrization's clipping rule (``make_clipper(**plan.grad_clip)``); None never clips.

        A non-finite training loss at step k stops before that update (``steps`` = k - 1); a non-finite eval
        after step k stops after it (``steps`` = k). Either way ``diverged_step`` = k, the step whose loss was
        non-finite, so it always names a step that ran and lies on the curve's step axis.
        """
        budget, task = self.budget, self.dataset.spec.task
        params = [p for g in optimizer.param_groups for p in g["params"]]
        while progress.step < until:
            apply_lr_factor(optimizer, lr_factor(progress.step, budget, self.warmup_frac))
            x, y = _to_device(next(batches), self.device)
            with _autocast(self.device):
                loss = loss_fn(model_logits(model(x)), y, task)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                progress.diverged_step = progress.step + 1
                return "diverged"
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip is not None:
                clip(params)
            optimizer.step()
            progress.advance(loss_value, flops_per_step)
            if not budget.evaluates_after(progress.step):
                continue
            point = progress.record(self.eval_loss(model), budget.batch_size)
            if point is None:
                return "diverged"
            if self.callback is not None and self.callback(point):
                return "stopped"
        return "completed"

    def eval_loss(self, model: nn.Module) -> float:
        return evaluate(model, self.dataset, self.budget.batch_size, self.budget.eval_batches, self.device)


@dataclass(frozen=True)
class Checkpointing:
    """Save the run to ``path`` after every ``every_evals``-th eval; a run that finds the file there resumes it."""

    path: Path
    every_evals: int


def save_atomically(path: Path, payload: dict[str, Any]) -> None:
    """Write to a temporary file, then rename over ``path``: a kill leaves the old or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _saving(callback: Callback | None, checkpointing: Checkpointing, model: nn.Module,
            optimizer: torch.optim.Optimizer, progress: Progress, clip: RelativeClipper | None) -> Callback:
    def on_eval(point: EvalPoint) -> bool:
        stop = callback is not None and callback(point)
        if not stop and len(progress.curve) % checkpointing.every_evals == 0:
            save_atomically(checkpointing.path, {"progress": asdict(progress), "model": model.state_dict(),
                                                 "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                                                 "clip": None if clip is None else clip.state_dict()})
        return stop
    return on_eval


def _restore(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
             clip: RelativeClipper | None) -> Progress:
    payload = torch.load(path, map_location=device, weights_only=True)
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    torch.set_rng_state(payload["rng"])
    if clip is not None and payload.get("clip") is not None:  # saved by a run that clipped (older saves did not)
        clip.load_state_dict(payload["clip"])
    saved = payload["progress"]
    return Progress(**{**saved, "curve": [EvalPoint(**p) for p in saved["curve"]]})


def train(model: nn.Module, param_groups: list[dict[str, Any]], dataset: Dataset, budget: Budget,
          hparams: HParams, optimizer: str, *, flops_per_sample: float, seed: int = 0,
          device: str | torch.device | None = None, callback: Callback | None = None,
          checkpointing: Checkpointing | None = None, clip: RelativeClipper | None = None) -> TrainResult:
    """Train ``model`` for ``budget.steps`` steps; divergence and early stops are outcomes, not errors.

    With ``checkpointing``, a run resumes from its checkpoint when one exists (the data stream skips the
    batches already trained on) and saves one every few evals; the callback sees only the new eval points.
    ``clip``: see :meth:`Loop.run`; the checkpoint keeps a relative rule's running norm, so a resumed run clips
    as the uninterrupted one would.
    """
    started = time.perf_counter()
    dev = resolve_device(device)
    torch.manual_seed(seed)
    model.to(dev)
    model.train()
    opt = make_optimizer(param_groups, optimizer, hparams)
    progress = Progress()
    if checkpointing is not None:
        if checkpointing.path.exists():
            progress = _restore(checkpointing.path, model, opt, dev, clip)
        callback = _saving(callback, checkpointing, model, opt, progress, clip)
    batches = itertools.islice(dataset.train_batches(budget.batch_size, seed), progress.step, None)
    status = Loop(dataset, budget, hparams.warmup_frac, dev, callback).run(
        model, opt, batches, progress, budget.steps, flops_per_step=float(budget.batch_size * flops_per_sample),
        clip=clip)
    return progress.result(status, time.perf_counter() - started, dev)
