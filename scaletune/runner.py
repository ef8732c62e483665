"""One trial end to end (dataset, model in its parametrization, training): what workers and benchmarks call."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from scaletune.clipping import make_clipper
from scaletune.data.base import Dataset
from scaletune.data.registry import dataset_spec, get_dataset
from scaletune.hparams import HParams
from scaletune.models.registry import get_family
from scaletune.models.size import count_params, family_factory
from scaletune.parametrize import BuiltModel, Classification, Factory, ParamOptions, build_model, classify
from scaletune.shapes import Shape
from scaletune.train import Budget, Callback, TrainResult, resolve_device, train


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

    @cached_property
    def dataset(self) -> Dataset:
        """Loaded on first use, so sizing a trial (parameters, FLOPs) costs no data loading."""
        return get_dataset(self.cfg.dataset, self.cfg.dataset_args, self.data_root)

    @cached_property
    def classification(self) -> Classification:
        return classify(self.factory, self.cfg.base, self.cfg.shape)

    def build(self, hparams: HParams, seed: int) -> BuiltModel:
        """The model at the trial's shape in its parametrization, initialised from ``seed``."""
        cfg = self.cfg
        torch.manual_seed(seed)
        return build_model(self.factory, cfg.base, cfg.shape, cfg.parametrization, hparams, cfg.optimizer,
                           ParamOptions.from_dict(cfg.options), device=self.device,
                           classification=self.classification)


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
        count = count_params(factory, cfg.shape)
        if count > max_params:
            raise ModelTooLarge(count, max_params)
    return Prepared(cfg, factory, data_root, resolve_device(cfg.device),
                    family.train_flops_per_sample(cfg.shape, spec, cfg.args))


def run_trial(cfg: TrialConfig, callback: Callback | None = None, data_root: str | Path | None = None,
              max_params: int | None = None, checkpointing: Checkpointing | None = None) -> TrainResult:
    """Validate, build, train (resuming from ``checkpointing``'s file when there is one)."""
    prepared = prepare_trial(cfg, data_root, max_params)
    built = prepared.build(cfg.hparams, cfg.seed)
    return train(built.model, built.param_groups, prepared.dataset, cfg.budget, cfg.hparams, cfg.optimizer,
                 flops_per_sample=prepared.flops_per_sample, seed=cfg.seed, device=prepared.device,
                 callback=callback, checkpointing=checkpointing, clip=make_clipper(**built.plan.grad_clip))
