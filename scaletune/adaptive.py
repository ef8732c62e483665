"""Execute an adaptive shape schedule: one WSD run whose model changes shape at given FLOPs.

The run is one warm-up/stable/decay schedule over its whole length (constant LR between switches, a
single cooldown at the end; Hägele et al. 2024), with surgery (``scaletune.surgery.reshape``) when the
cumulative training FLOPs reach each phase's end. It checkpoints atomically (temp file + os.replace)
just before and just after each surgery and at the end, with the model and optimizer state, the phase
index, the shape, the step and FLOP counters, the curve so far and the RNG state, so a killed worker
rerun on the same directory resumes in the right shape and reproduces an uninterrupted run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from scaletune.clipping import RelativeClipper, make_clipper
from scaletune.data.base import DataSpec
from scaletune.data.registry import dataset_spec, get_dataset
from scaletune.models.registry import get_family
from scaletune.parametrize import ParamOptions
from scaletune.runner import TrialConfig
from scaletune.scaling.schedule import Schedule
from scaletune.shapes import Shape
from scaletune.surgery import Growth, Recipe, Trainee, reshape
from scaletune.train import Callback, EvalPoint, Loop, Progress, Status, TrainResult, resolve_device, save_atomically

CHECKPOINT = "schedule.pt"


@dataclass(frozen=True)
class Phase:
    """Train at ``shape`` until the run's cumulative training FLOPs reach ``until_flops``."""

    shape: Shape
    until_flops: float

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape.to_dict(), "until_flops": self.until_flops}


@dataclass(frozen=True)
class Switch:
    """One surgery: where it happened and the eval loss just before and just after it."""

    step: int
    flops: float
    from_shape: dict[str, int]
    to_shape: dict[str, int]
    eval_before: float
    eval_after: float


@dataclass
class ScheduleResult:
    train: TrainResult
    switches: list[Switch] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"train": self.train.to_dict(), "switches": [asdict(s) for s in self.switches]}


def phases_from_schedule(schedule: Schedule, shapes: dict[str, Shape], budget_flops: float) -> list[Phase]:
    """The DP schedule's segments as phases; the last one runs to ``budget_flops``."""
    phases = [Phase(shapes[s.shape], s.c_exit) for s in schedule.segments]
    return [*phases[:-1], replace(phases[-1], until_flops=budget_flops)]


def trial_recipe(cfg: TrialConfig, spec: DataSpec) -> Recipe:
    family = get_family(cfg.family)
    return Recipe(build=lambda shape: family.build(shape, spec, cfg.args), base=cfg.base,
                  parametrization=cfg.parametrization, hparams=cfg.hparams, optimizer=cfg.optimizer,
                  options=ParamOptions.from_dict(cfg.options))


def phase_ends(phases: Sequence[Phase], flops_per_step: Callable[[Shape], float]) -> list[int]:
    """Cumulative step at which each phase ends: the first step whose cumulative FLOPs reach its end."""
    ends, step, flops = [], 0, 0.0
    for phase in phases:
        per_step = flops_per_step(phase.shape)
        steps = math.ceil((phase.until_flops - flops) / per_step - 1e-9)
        if steps < 1:
            raise ValueError(f"phase at {phase.shape} ends at {phase.until_flops:.4g} FLOPs, not after the previous "
                             f"phase ({flops:.4g}); phase ends must increase")
        step, flops = step + steps, flops + steps * per_step
        ends.append(step)
    return ends


def run_schedule(cfg: TrialConfig, phases: Sequence[Phase], checkpoint_dir: str | Path,
                 callback: Callback | None = None, data_root: str | Path | None = None,
                 noise: float = 0.5, growth: Growth = "duplicate") -> ScheduleResult:
    """Train through ``phases`` (the first at ``cfg.shape``), resuming from ``checkpoint_dir`` if it holds one.

    ``cfg.budget`` gives batch size, eval cadence and decay fraction; its ``steps`` are replaced by the steps
    the phases need. A relative clipping rule restarts its running norm at each new shape. ``noise`` (in
    units of the new width's init std) breaks symmetry after width
    growth (see ``surgery.width``): with 0, a grown muP + Adam model follows the narrow one's trajectory exactly
    and the growth can never pay; 0.5 left the narrow model's plateau in bench/adaptive_schedule.py.
    ``growth="random"`` is the seed paper's rule instead (new units freshly initialised, ``noise`` unused).
    A phase may change several axes at once (``surgery.reshape``).
    """
    if not phases or phases[0].shape != cfg.shape:
        raise ValueError(f"the first phase must train cfg.shape {cfg.shape}")
    if cfg.budget.schedule != "wsd":
        raise ValueError(f"an adaptive schedule runs one WSD schedule over the whole run; got {cfg.budget.schedule!r}")
    started = time.perf_counter()
    spec = dataset_spec(cfg.dataset, cfg.dataset_args, data_root)
    family, dataset = get_family(cfg.family), get_dataset(cfg.dataset, cfg.dataset_args, data_root)
    for phase in phases:
        family.validate(phase.shape, spec, cfg.args)
    recipe, device = trial_recipe(cfg, spec), resolve_device(cfg.device)

    def flops_per_step(shape: Shape) -> float:
        return cfg.budget.batch_size * family.train_flops_per_sample(shape, spec, cfg.args)

    ends = phase_ends(phases, flops_per_step)
    budget = replace(cfg.budget, steps=ends[-1])
    path = Path(checkpoint_dir) / CHECKPOINT
    clip = make_clipper(**recipe.options.clip_rule())
    progress, trainee = _resume(path, recipe, phases, device, clip) if path.exists() else _start(recipe, cfg, device)
    example = next(dataset.eval_batches(budget.batch_size))[0].to(device)
    batches = islice(dataset.train_batches(budget.batch_size, cfg.seed), progress.step, None)
    loop = Loop(dataset, budget, cfg.hparams.warmup_frac, device, callback)
    status: Status = "completed"
    while status == "completed" and progress.step < budget.steps:
        if progress.step == ends[progress.phase]:
            _save(path, progress, trainee, phases, clip)
            before, old = loop.eval_loss(trainee.model), trainee.shape
            generator = torch.Generator().manual_seed(cfg.seed * 1000 + progress.phase)
            trainee = reshape(recipe, trainee, phases[progress.phase + 1].shape, example, noise, generator, growth)
            clip = make_clipper(**recipe.options.clip_rule())
            progress.phase += 1
            progress.switches.append(Switch(progress.step, progress.flops, old.to_dict(), trainee.shape.to_dict(),
                                            before, loop.eval_loss(trainee.model)))
            _save(path, progress, trainee, phases, clip)
        status = loop.run(trainee.model, trainee.optimizer, batches, progress, until=ends[progress.phase],
                          flops_per_step=flops_per_step(trainee.shape), clip=clip)
    if status == "completed":
        _save(path, progress, trainee, phases, clip)
    return ScheduleResult(progress.result(status, time.perf_counter() - started, device), progress.switches)


@dataclass
class _Progress(Progress):
    """The run's position plus what a schedule adds (phase, switches): all a checkpoint restores besides tensors."""

    phase: int = 0
    switches: list[Switch] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> _Progress:
        return cls(**{**d, "curve": [EvalPoint(**p) for p in d["curve"]],
                      "switches": [Switch(**s) for s in d["switches"]]})


def _start(recipe: Recipe, cfg: TrialConfig, device: torch.device) -> tuple[_Progress, Trainee]:
    torch.manual_seed(cfg.seed)
    return _Progress(), recipe.start(cfg.shape, device)


def _save(path: Path, progress: _Progress, trainee: Trainee, phases: Sequence[Phase],
          clip: RelativeClipper | None) -> None:
    save_atomically(path, {"phases": [p.to_dict() for p in phases], "progress": progress.to_dict(),
                           "shape": trainee.shape.to_dict(), "model": trainee.model.state_dict(),
                           "optimizer": trainee.optimizer.state_dict(), "rng": torch.get_rng_state(),
                           "clip": None if clip is None else clip.state_dict()})


def _resume(path: Path, recipe: Recipe, phases: Sequence[Phase], device: torch.device,
            clip: RelativeClipper | None) -> tuple[_Progress, Trainee]:
    payload = torch.load(path, map_location=device, weights_only=True)
    if payload["phases"] != [p.to_dict() for p in phases]:
        raise ValueError(f"{path} belongs to a different schedule; use a fresh checkpoint directory")
    trainee = recipe.start(Shape.from_dict(payload["shape"]), device)
    trainee.model.load_state_dict(payload["model"])
    trainee.optimizer.load_state_dict(payload["optimizer"])
    torch.set_rng_state(payload["rng"])
    if clip is not None and payload.get("clip") is not None:
        clip.load_state_dict(payload["clip"])
    return _Progress.from_dict(payload["progress"]), trainee
