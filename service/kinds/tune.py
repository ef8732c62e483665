"""The tune kind: search hyperparameters with Optuna's samplers and pruners by training the proxy shape."""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import optuna
from optuna.distributions import BaseDistribution
from optuna.storages import BaseStorage

from scaletune.hparams import HParams
from scaletune.runner import TrialConfig
from scaletune.shapes import Shape
from service.coord_plot import COORD_CHECK
from service.kinds.base import StudyKind, pack_of
from service.plot_drawing import draw_history, draw_importance, draw_intermediate
from service.plots import DrawnPlot, history_data, importance_data, intermediate_data
from service.settings import Settings
from service.spec import Loc, SamplerSpec, SearchParam, SpecProblem, TuneSpec, check_shapes, over_limits


class Searched(Protocol):
    """A spec Optuna samples for: what the tune and external kinds share."""

    search_space: dict[str, SearchParam]
    sampler: SamplerSpec
    n_trials: int


def search_problems(spec: Searched) -> list[SpecProblem]:
    """Each searched range's problems, and a grid too small for n_trials."""
    grid = spec.sampler.name == "grid"
    problems = [p for name, param in spec.search_space.items() for p in param.problems(("search_space", name), grid)]
    if grid and not problems:
        points = math.prod(param.grid_size() for param in spec.search_space.values())
        if points < spec.n_trials:
            problems.append(SpecProblem(("n_trials",), f"the grid has only {points} points, fewer than n_trials="
                                                       f"{spec.n_trials}; lower n_trials or widen the grid."))
    return problems


def _check_search(spec: TuneSpec) -> list[SpecProblem]:
    problems = search_problems(spec)
    for name in sorted(set(spec.hyperparameters) & set(spec.search_space)):
        problems.append(SpecProblem(("hyperparameters", name), f"{name} is both fixed and searched; remove it from "
                                                                 "hyperparameters or from search_space."))
    for i, point in enumerate(spec.enqueue):
        for name in sorted(set(point) - set(spec.search_space)):
            problems.append(SpecProblem(("enqueue", i, name), f"{name} is not in search_space, so it cannot be "
                                                               "enqueued; add it to search_space or remove it."))
    if len(spec.enqueue) > spec.n_trials:
        problems.append(SpecProblem(("enqueue",), f"{len(spec.enqueue)} enqueued points but only n_trials="
                                                  f"{spec.n_trials}; raise n_trials or enqueue fewer points."))
    if spec.budget.eval_every > spec.budget.steps:
        problems.append(SpecProblem(("budget", "eval_every"), f"eval_every ({spec.budget.eval_every}) is larger "
                                                              f"than steps ({spec.budget.steps}); no eval would run."))
    return problems


def _check_model(spec: TuneSpec, settings: Settings) -> list[SpecProblem]:
    shapes = {("model", which): Shape(**getattr(spec.model, which).model_dump()) for which in ("base", "proxy")}
    return check_shapes(spec.model.family, spec.model.args, spec.dataset, shapes, {("model", "proxy"): "the proxy"},
                        settings)


def make_sampler(spec: Searched, n_existing_trials: int) -> optuna.samplers.BaseSampler:
    """Seeded from the spec, offset by how many trials exist, so parallel tasks do not replay one random stream.

    QMC and grid are the exceptions: they index their sequence (QMC) or their seed-shuffled grid (grid) by trial
    number, so the seed must stay the same; an offset seed reshuffled the grid per trial and handed out points twice.
    """
    base_seed = spec.sampler.seed
    seed = None if base_seed is None else (base_seed + 7919 * n_existing_trials) % 2**31
    match spec.sampler.name:
        case "tpe":
            return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
        case "gp":
            return optuna.samplers.GPSampler(seed=seed)
        case "cmaes":
            return optuna.samplers.CmaEsSampler(seed=seed)
        case "qmc":
            return optuna.samplers.QMCSampler(seed=base_seed, scramble=base_seed is not None)
        case "random":
            return optuna.samplers.RandomSampler(seed=seed)
        case "grid":
            grid = {name: param.grid() for name, param in spec.search_space.items()}
            return optuna.samplers.GridSampler(grid, seed=base_seed)
    raise AssertionError(spec.sampler.name)


def make_pruner(spec: TuneSpec) -> optuna.pruners.BasePruner:
    """Reports happen at training steps, so resources are counted in steps and start at the first eval."""
    return pruner(spec.pruner.name, spec.budget.eval_every, spec.budget.steps)


def pruner(name: str, first_report: int | None, last_step: int | None) -> optuna.pruners.BasePruner:
    """The named pruner; None where the steps are not known ahead (the user's own code reports them): Optuna
    then starts at the first report and estimates the last from what trials report."""
    match name:
        case "none":
            return optuna.pruners.NopPruner()
        case "median":
            return optuna.pruners.MedianPruner(n_warmup_steps=first_report or 0)
        case "successive_halving":
            return optuna.pruners.SuccessiveHalvingPruner(min_resource=first_report or "auto")
        case "hyperband":
            return optuna.pruners.HyperbandPruner(min_resource=first_report or 1, max_resource=last_step or "auto")
        case "wilcoxon":
            return optuna.pruners.WilcoxonPruner()
    raise AssertionError(name)


def distributions(spec: Searched) -> dict[str, BaseDistribution]:
    return {name: param.distribution() for name, param in spec.search_space.items()}


def searching_study(storage: BaseStorage, name: str, spec: Searched, retried_params: dict[str, Any] | None,
                    n_existing: int, pruner: optuna.pruners.BasePruner) -> optuna.Study:
    """The study with the spec's sampler seeded by ``n_existing``; ``retried_params`` pins every value."""
    sampler = make_sampler(spec, n_existing)
    if retried_params:
        with warnings.catch_warnings():  # experimental since Optuna 2.4 and unchanged since; the warning is noise
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.PartialFixedSampler(retried_params, sampler)
    return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)


class TuneKind(StudyKind[TuneSpec]):
    name = "tune"
    spec_type = TuneSpec
    stored_type = TuneSpec
    plots = {"history": DrawnPlot(history_data, draw_history),
             "intermediate": DrawnPlot(intermediate_data, draw_intermediate),
             "importance": DrawnPlot(importance_data, draw_importance),
             "coord_check": COORD_CHECK}

    def check(self, spec: TuneSpec, settings: Settings) -> list[SpecProblem]:
        asked: list[tuple[Loc, str, int]] = [
            (("n_trials",), "trials", spec.n_trials), (("parallelism",), "parallelism", spec.parallelism),
            (("budget", "steps"), "steps", spec.budget.steps),
            (("budget", "batch_size"), "batch_size", spec.budget.batch_size)]
        problems = over_limits(asked, settings) + _check_search(spec)
        return problems or _check_model(spec, settings)

    def enqueued(self, spec: TuneSpec) -> list[dict[str, Any]]:
        return [dict(point) for point in spec.enqueue]

    def load_optuna_study(self, storage: BaseStorage, name: str, spec: TuneSpec,
                          retried_params: dict[str, Any] | None) -> optuna.Study:
        """The spec's sampler and pruner; a retry pins every value so the same point is re-run."""
        n_existing = storage.get_n_trials(storage.get_study_id_from_name(name))
        return searching_study(storage, name, spec, retried_params, n_existing, make_pruner(spec))

    def distributions(self, spec: TuneSpec) -> dict[str, BaseDistribution]:
        return distributions(spec)

    def pack_size(self, spec: TuneSpec, data_root: Path | None) -> int:
        """The spec's ``pack``; auto sizes it for the proxy on this worker's device (every trial has the proxy shape)."""
        return pack_of(spec.pack, self.trial_config(spec, {}), data_root)

    def trial_config(self, spec: TuneSpec, params: dict[str, Any]) -> TrialConfig:
        """Fixed hyperparameters plus the sampled ones, at the proxy shape; device None means CUDA when available."""
        return TrialConfig(
            family=spec.model.family, args=spec.model.args,
            base=Shape(**spec.model.base.model_dump()), shape=Shape(**spec.model.proxy.model_dump()),
            parametrization=spec.parametrization, optimizer=spec.optimizer,
            dataset=spec.dataset.name, dataset_args=spec.dataset.args, budget=spec.budget.to_budget(),
            hparams=HParams.from_dict({**spec.hyperparameters, **params}), seed=spec.dataset.seed,
            options=asdict(spec.parametrization_options))


KIND = TuneKind()
