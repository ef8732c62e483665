"""One trial end to end (dataset, model in its parametrization, training): what workers and benchmarks call."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, TypeVar

import torch

from scaletune.clipping import make_clipper
from scaletune.data.base import DataSpec, Dataset
from scaletune.data.registry import dataset_spec, get_dataset
from scaletune.hparams import HParams
from scaletune.models.base import ModelFamily
from scaletune.models.registry import get_family
from scaletune.models.size import count_params, family_factory
from scaletune.parametrize import BuiltModel, Classification, Factory, ParamOptions, build_model, classify
from scaletune.shapes import Shape
from scaletune.train import Budget, Callback, TrainResult, resolve_device, train

T = TypeVar("T")


class ModelTooLarge(ValueError):
    """The requested model has more parameters than this worker accepts."""

    def __init__(self, count: int, limit: int) -> None:
        super().__init__(f"the model has {count:,} parameters, above the limit of {limit:,}; "
                         "choose a smaller shape or raise the limit")
        self.count = count
        self.limit = limit


@dataclass(frozen=True)
class TrialConfig:
    family: str
    args: dict[str, Any]
    base: Shape
    shape: Shape
    parametrization: str
    optimizer: str
    dataset: str
    dataset_args: dict[str, Any]
    budget: Budget
    hparams: HParams
    seed: int = 0
    device: str | None = None
    options: dict[str, Any] | None = None


@dataclass(frozen=True)
class Prepared:
    """A validated trial configuration: what building and training need (the dataset loads on first use)."""

    cfg: TrialConfig
    factory: Factory
    data_root: Path | None
    device: torch.device
    flops_per_sample: float
    family: ModelFamily
    data: DataSpec

    @cached_property
    def dataset(self) -> Dataset:
        """Loaded on first use, so sizing a trial (parameters, FLOPs) costs no data loading."""
        return get_dataset(self.cfg.dataset, self.cfg.dataset_args, self.data_root)

    @cached_property
    def classification(self) -> Classification:
        cfg = self.cfg
        return _per_model(_classified, lambda: classify(self.factory, cfg.base, cfg.shape), self.family, cfg.args,
                          self.data, cfg.base, cfg.shape)

    def build(self, hparams: HParams, seed: int) -> BuiltModel:
        """The model at the trial's shape in its parametrization, initialised from ``seed``."""
        cfg = self.cfg
        seed_generators(seed, self.device)
        return build_model(self.factory, cfg.base, cfg.shape, cfg.parametrization, hparams, cfg.optimizer,
                           ParamOptions.from_dict(cfg.options), device=self.device,
                           classification=self.classification)


def _per_model(cached: Callable[..., T], uncached: Callable[[], T], family: ModelFamily, args: dict[str, Any],
               *key: Any) -> T:
    """``cached(family, args as JSON, *key)``: what every pack of a study works out again for the same model, once
    per process; ``uncached()`` for a family or args that make no cache key (unhashable, not JSON)."""
    try:
        return cached(family, json.dumps(args, sort_keys=True), *key)
    except TypeError:
        return uncached()


@lru_cache(maxsize=16)
def _classified(family: ModelFamily, args: str, data: DataSpec, base: Shape, shape: Shape) -> Classification:
    """``classify`` (~7 ms for a 2-block MLP, on the way to each pack's training)."""
    return classify(family_factory(family, shape, data, json.loads(args)), base, shape)


@lru_cache(maxsize=16)
def _param_count(family: ModelFamily, args: str, data: DataSpec, shape: Shape) -> int:
    """``count_params`` (~1.5 ms for a 2-block MLP)."""
    return count_params(family_factory(family, shape, data, json.loads(args)), shape)


def seed_generators(seed: int, device: torch.device) -> None:
    """``torch.manual_seed`` for the generators a model built on ``device`` draws from: the CPU's, and CUDA's on a
    CUDA device. ``torch.manual_seed`` also queues the seed for each accelerator backend not started yet, formatting
    the call stack for each: ~1 ms a build from a Celery worker's deep stack, 16 times per pack."""
    if device.type not in ("cpu", "cuda"):
        torch.manual_seed(seed)
        return
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)


def prepare_trial(cfg: TrialConfig, data_root: str | Path | None = None, max_params: int | None = None) -> Prepared:
    """Validate and refuse oversize models before allocating them."""
    family = get_family(cfg.family)
    data_root = None if data_root is None else Path(data_root)
    spec = dataset_spec(cfg.dataset, cfg.dataset_args, data_root)
    family.validate(cfg.base, spec, cfg.args)
    family.validate(cfg.shape, spec, cfg.args)
    ParamOptions.from_dict(cfg.options)
    factory = family_factory(family, cfg.shape, spec, cfg.args)
    if max_params is not None:
        count = _per_model(_param_count, lambda: count_params(factory, cfg.shape), family, cfg.args, spec, cfg.shape)
        if count > max_params:
            raise ModelTooLarge(count, max_params)
    return Prepared(cfg, factory, data_root, resolve_device(cfg.device),
                    family.train_flops_per_sample(cfg.shape, spec, cfg.args), family, spec)


def run_trial(cfg: TrialConfig, callback: Callback | None = None, data_root: str | Path | None = None,
              max_params: int | None = None, checkpointing: Checkpointing | None = None) -> TrainResult:
    """Validate, build, train (resuming from ``checkpointing``'s file when there is one)."""
    prepared = prepare_trial(cfg, data_root, max_params)
    built = prepared.build(cfg.hparams, cfg.seed)
    return train(built.model, built.param_groups, prepared.dataset, cfg.budget, cfg.hparams, cfg.optimizer,
                 flops_per_sample=prepared.flops_per_sample, seed=cfg.seed, device=prepared.device,
                 callback=callback, checkpointing=checkpointing, clip=make_clipper(**built.plan.grad_clip))
