"""One trial end to end (dataset, model in its parametrization, training): what workers and benchmarks call."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from scaletune.data.registry import dataset_spec, get_dataset
from scaletune.hparams import HParams
from scaletune.models.registry import get_family
from scaletune.models.size import count_params, family_factory
from scaletune.parametrize import ParamOptions, build_model
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


def run_trial(cfg: TrialConfig, callback: Callback | None = None, data_root: str | Path | None = None,
              max_params: int | None = None) -> TrainResult:
    """Validate, refuse oversize models before allocating them, build, train."""
    family = get_family(cfg.family)
    data_root = None if data_root is None else Path(data_root)
    spec = dataset_spec(cfg.dataset, cfg.dataset_args, data_root)
    family.validate(cfg.base, spec, cfg.args)
    family.validate(cfg.shape, spec, cfg.args)
    options = ParamOptions.from_dict(cfg.options)
    factory = family_factory(family, cfg.shape, spec, cfg.args)
    if max_params is not None:
        count = count_params(factory, cfg.shape)
        if count > max_params:
            raise ModelTooLarge(count, max_params)
    dataset = get_dataset(cfg.dataset, cfg.dataset_args, data_root)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    built = build_model(factory, cfg.base, cfg.shape, cfg.parametrization, cfg.hparams, cfg.optimizer,
                        options, device=device)
    return train(built.model, built.param_groups, dataset, cfg.budget, cfg.hparams, cfg.optimizer,
                 flops_per_sample=family.train_flops_per_sample(cfg.shape, spec, cfg.args),
                 seed=cfg.seed, device=device, callback=callback)
