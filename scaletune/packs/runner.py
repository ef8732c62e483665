"""Several trials of one configuration (same family, shape, data, budget; own values and seeds) as one pack."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from scaletune.clipping import make_clipper
from scaletune.hparams import HParams
from scaletune.packs.train import PackMember, train_pack
from scaletune.runner import TrialConfig, prepare_trial
from scaletune.train import Callback, TrainResult


def pack_key(cfg: TrialConfig) -> TrialConfig:
    """What members of one pack share: everything but their values, seed and length (steps, eval cadence)."""
    return replace(cfg, hparams=HParams(), seed=0, budget=replace(cfg.budget, steps=1, eval_every=1))


def run_pack(cfgs: list[TrialConfig], callbacks: list[Callback | None] | None = None,
             data_root: str | Path | None = None, max_params: int | None = None) -> list[TrainResult]:
    """``run_trial`` for every config at once; results in the configs' order."""
    if not cfgs:
        return []
    if any(pack_key(cfg) != pack_key(cfgs[0]) for cfg in cfgs[1:]):
        raise ValueError("a pack's trials must differ only in their hyperparameters, seed, steps and eval cadence "
                         "(same family, shapes, parametrization, optimizer, data, batch, schedule, options and device)")
    callbacks = callbacks or [None] * len(cfgs)
    if len(callbacks) != len(cfgs):
        raise ValueError(f"{len(cfgs)} trials but {len(callbacks)} callbacks")
    prepared = prepare_trial(cfgs[0], data_root, max_params)
    members = []
    for cfg, callback in zip(cfgs, callbacks):
        built = prepared.build(cfg.hparams, cfg.seed)
        members.append(PackMember(built.model, built.param_groups, cfg.hparams, cfg.budget, cfg.seed, callback,
                                  make_clipper(**built.plan.grad_clip)))
    return train_pack(members, prepared.dataset, cfgs[0].optimizer,
                      flops_per_sample=prepared.flops_per_sample, device=prepared.device)
