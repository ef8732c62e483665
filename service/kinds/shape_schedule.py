"""shape_schedule: shapes along one axis x proxy sizes x seeds x compute budgets, each a WSD run to its budget."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
from optuna.distributions import BaseDistribution, IntDistribution
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from scaletune.data.base import DataSpec
from scaletune.data.registry import dataset_spec
from scaletune.models.registry import get_family
from scaletune.models.size import family_factory, params_by_depth
from scaletune.runner import TrialConfig
from scaletune.scaling.fit import FitResult, Run, fit_shapes
from scaletune.scaling.moves import surgery_moves
from scaletune.scaling.project import MIN_SIZES, Projection, project_tier_a, project_tier_b
from scaletune.scaling.schedule import ScheduleConstraints, ScheduleReport, schedule_from_fits
from scaletune.shapes import Shape
from scaletune.train import TrainResult
from service.kinds.base import pack_of
from service.kinds.grid import GridKind
from service.kinds.schedule_training import is_schedule_run, run_planned_schedule
from service.kinds.setup import base_config
from service.models import Study, TrialAttempt, TrialState
from service.plot_drawing import draw_scaling, draw_schedule
from service.plots import DrawnPlot, NoPlotData, PlotInput
from service.settings import Settings
from service.spec import Loc, ResolvedShapeSchedule, ShapeScheduleSpec

N_BOOTSTRAP = 30  # refits per shape: a coarse 90% interval, but a GET must answer in seconds on a CPU
FIT_CACHE_SIZE = 64  # sets of runs whose fits are kept (a few KB each)
PLAN_CACHE_SIZE = 64  # planned schedules kept, one per (spec, runs, query)
GRID_AXES = ("value_index", "size_index", "seed", "budget_index")
CURVE_POINTS = 60  # samples along a fitted curve
PATH_POINTS = 24  # samples along one schedule segment


def base_shape(spec: ResolvedShapeSchedule) -> Shape:
    return Shape(**spec.model.base.model_dump())


def trial_shape(spec: ResolvedShapeSchedule, params: dict[str, Any]) -> Shape:
    return spec.point_shape(base_shape(spec), int(params["value_index"]), spec.sizes[int(params["size_index"])])


def shape_label(spec: ResolvedShapeSchedule, value_index: int) -> str:
    return spec.point_label(value_index)


def runs_by_shape(spec: ResolvedShapeSchedule, attempts: Iterable[TrialAttempt]) -> dict[str, dict[float, list[Run]]]:
    """Completed attempts as learning curves: one Run per (shape, size, seed), one point per budget."""
    points: dict[tuple[int, int, int], list[tuple[float, float]]] = {}
    for a in attempts:
        if (a.state == TrialState.complete and a.params and not is_schedule_run(a.params) and a.flops
                and a.value is not None):
            key = (int(a.params["value_index"]), int(a.params["size_index"]), int(a.params["seed"]))
            points.setdefault(key, []).append((float(a.flops), float(a.value)))
    runs: dict[str, dict[float, list[Run]]] = {}
    for (v, s, seed), curve in sorted(points.items()):
        runs.setdefault(shape_label(spec, v), {}).setdefault(spec.sizes[s], []).append(
            Run(seed=seed, points=tuple(sorted(curve))))
    return runs


class NotEnoughRuns(ValueError):
    """Too few completed runs to fit a law per shape (yet)."""


@dataclass(frozen=True)
class ScheduleQuery:
    """Exactly one of target_loss / budget_flops; a target width or depth asks for a projection to that model."""

    target_loss: float | None = None
    budget_flops: float | None = None
    target_width: int | None = None
    target_depth: int | None = None


def _fit_summary(fit: FitResult) -> dict[str, Any]:
    return {"form": fit.form, "params": fit.law.params(), "extrapolation_error": fit.extrapolation_error,
            "param_intervals": {k: v.to_dict() for k, v in fit.param_intervals().items()},
            "flops_range": list(fit.flops_range), "loss_range": list(fit.loss_range), "n_runs": fit.n_runs}


def _target_shapes(spec: ResolvedShapeSchedule, query: ScheduleQuery) -> dict[str, Shape]:
    """Each schedule shape at the target's width and depth (the axes keep each shape's own values)."""
    base = base_shape(spec)
    target = base.with_(width=query.target_width or base.width, depth=query.target_depth or base.depth)
    return {shape_label(spec, i): target.with_(**point) for i, point in enumerate(spec.points())}


def executable_moves(spec: ResolvedShapeSchedule) -> ScheduleConstraints:
    """The switches surgery can make (width grows by a whole factor, depth grows, patch size changes either
    way), along one axis or both at once."""
    shapes = {shape_label(spec, i): spec.point_shape(base_shape(spec), i, spec.sizes[0])
              for i in range(len(spec.points()))}
    return ScheduleConstraints(allowed=surgery_moves(shapes, max_axes=2))


def _project(spec: ResolvedShapeSchedule, query: ScheduleQuery, runs: dict[str, dict[float, list[Run]]],
             fits: dict[str, FitResult], start_loss: float, data: DataSpec, n_bootstrap: int) -> Projection:
    """Tier A (a Chinchilla law per shape over >= 3 proxy sizes) or tier B (one compute factor, heuristic)."""
    family, args = get_family(spec.model.family), spec.model.args
    targets = _target_shapes(spec, query)
    sizes = sorted({size for by_size in runs.values() for size in by_size})
    moves = executable_moves(spec)
    if len(sizes) >= MIN_SIZES:
        def at(i: int, size: float) -> Shape:
            return spec.point_shape(base_shape(spec), i, size)

        def n_params(shape: Shape) -> float:
            return float(params_by_depth(family_factory(family, shape, data, args), shape))

        # One size index for every shape: the parameter count of the first shape at that size.
        index = {size: n_params(at(0, size)) for size in sizes}
        target_index = n_params(targets[shape_label(spec, 0)])
        labels = {shape_label(spec, i): i for i in range(len(spec.points()))}
        by_index = {label: {index[size]: size_runs for size, size_runs in runs[label].items()} for label in runs}
        table = {label: {**{index[size]: family.train_flops_per_sample(at(i, size), data, args) for size in sizes},
                         target_index: family.train_flops_per_sample(targets[label], data, args)}
                 for label, i in labels.items()}
        return project_tier_a(by_index, table, target_index, start_loss, query.target_loss, query.budget_flops,
                              constraints=moves, n_bootstrap=n_bootstrap)
    first = next(iter(fits))
    proxy = spec.point_shape(base_shape(spec), 0, sizes[0])
    kappa = family.train_flops_per_sample(targets[first], data, args) / family.train_flops_per_sample(proxy, data, args)
    return project_tier_b(fits, kappa, start_loss, query.target_loss, query.budget_flops, constraints=moves)


@lru_cache(maxsize=FIT_CACHE_SIZE)
def _fits_of(runs: tuple[tuple[str, tuple[Run, ...]], ...], n_bootstrap: int) -> dict[str, FitResult]:
    return fit_shapes(dict(runs), n_bootstrap=n_bootstrap)


def cached_fits(runs: Mapping[str, Sequence[Run]], n_bootstrap: int) -> dict[str, FitResult]:
    """``fit_shapes``, kept per set of runs: GET /schedule, the study detail and the plots plan on the same fits,
    and a refit with its bootstrap takes seconds per shape. A finished or changed trial changes the runs, so
    the key, and the laws are refitted."""
    return dict(_fits_of(tuple((label, tuple(shape_runs)) for label, shape_runs in runs.items()), n_bootstrap))


@dataclass(frozen=True)
class Plan:
    """The per-shape fits at the first proxy size and the schedule planned on them (or on a projection)."""

    fits: dict[str, FitResult]
    start_loss: float
    report: ScheduleReport
    projection: Projection | None


@dataclass(frozen=True)
class _StoredSpec:
    """A spec hashed and compared by its stored JSON (pydantic models are not hashable), so it can key a cache."""

    json: str
    spec: ResolvedShapeSchedule = field(compare=False)


FrozenRuns = tuple[tuple[str, tuple[tuple[float, tuple[Run, ...]], ...]], ...]


def plan(spec: ResolvedShapeSchedule, attempts: Iterable[TrialAttempt], query: ScheduleQuery, data: DataSpec) -> Plan:
    """Fit a law per shape and plan the cheapest schedule surgery can execute.

    The plan is kept per (spec, completed proxy runs, query, data): repeated GETs on a finished sweep reuse it
    instead of redoing the DP (or projection); a newly finished run changes the runs, so the key, and the plan
    is recomputed. Raises NotEnoughRuns before two shapes have runs, ValueError when the target cannot be reached.
    """
    runs = runs_by_shape(spec, attempts)
    frozen = tuple((label, tuple((size, tuple(size_runs)) for size, size_runs in by_size.items()))
                   for label, by_size in runs.items())
    return _plan_of(_StoredSpec(spec.model_dump_json(), spec), frozen, query, data, N_BOOTSTRAP)


@lru_cache(maxsize=PLAN_CACHE_SIZE)
def _plan_of(stored: _StoredSpec, frozen: FrozenRuns, query: ScheduleQuery, data: DataSpec,
             n_bootstrap: int) -> Plan:
    spec = stored.spec
    runs = {label: {size: list(size_runs) for size, size_runs in by_size} for label, by_size in frozen}
    at_proxy = {label: by_size[spec.sizes[0]] for label, by_size in runs.items() if spec.sizes[0] in by_size}
    if len(at_proxy) < 2:
        raise NotEnoughRuns(f"need completed runs of at least two shapes at size {spec.sizes[0]}, have {len(at_proxy)}")
    fits = cached_fits(at_proxy, n_bootstrap)
    start_loss = max(fit.loss_range[1] for fit in fits.values())
    if query.target_width is None and query.target_depth is None:
        report = schedule_from_fits(fits, start_loss, query.target_loss, query.budget_flops,
                                    constraints=executable_moves(spec))
        return Plan(fits, start_loss, report, None)
    projection = _project(spec, query, runs, fits, start_loss, data, n_bootstrap)
    return Plan(fits, start_loss, projection.report, projection)


def segments(report: ScheduleReport) -> list[dict[str, Any]]:
    return [{"shape": s.shape, "loss_enter": s.e_enter, "loss_exit": s.e_exit, "flops_enter": s.c_enter,
             "flops_exit": s.c_exit, "extrapolated": s.extrapolated} for s in report.schedule.segments]


def describe(planned: Plan, axes: list[str]) -> dict[str, Any]:
    """The plan as JSON: fits per shape, the schedule's segments, its saving vs the best static shape, flags.

    ``axis`` is the first axis (as before joint schedules); ``axes`` lists every axis the shapes vary along.
    """
    report, projection = planned.report, planned.projection
    return {
        "axis": axes[0],
        "axes": axes,
        "tier": "proxy" if projection is None else projection.tier,
        "heuristic": projection is not None and projection.heuristic,
        "compute_factor": None if projection is None else projection.compute_factor,
        "fits": {label: _fit_summary(fit) for label, fit in planned.fits.items()},
        "start_loss": planned.start_loss,
        "target_loss": report.schedule.target_loss,
        "budget_flops": report.schedule.budget_flops,
        "segments": segments(report),
        "adaptive_flops": report.schedule.adaptive_flops,
        "static": {"shape": report.schedule.static_shape, "flops": report.schedule.static_flops,
                   "loss_at_budget": report.schedule.static_loss_at_budget},
        "saving": report.schedule.saving,
        "saving_interval": report.saving.to_dict(),
        "transitions": [t.to_dict() for t in report.transitions],
        "low_confidence": report.low_confidence,
        "reasons": list(report.reasons),
    }


def _planned(given: PlotInput) -> Plan:
    """The fits per shape and the schedule to the lowest loss a proxy-size run reached (as the study detail plans)."""
    study, spec, attempts = given.study, given.spec, given.attempts
    runs = runs_by_shape(spec, attempts)
    losses = [loss for by_size in runs.values() for run in by_size.get(spec.sizes[0], []) for _, loss in run.points]
    if not losses:
        raise NoPlotData(f"study {study.id} has no completed run at proxy size {spec.sizes[0]:g} yet, so there is "
                         "no scaling law to fit.")
    data = dataset_spec(spec.dataset.name, spec.dataset.args, given.settings.DATA_ROOT)
    try:
        return plan(spec, attempts, ScheduleQuery(target_loss=min(losses)), data)
    except ValueError as error:
        raise NoPlotData(f"study {study.id} cannot be planned yet: {error}.") from None


def _finite_curve(flops: np.ndarray, loss: np.ndarray) -> dict[str, list[float]]:
    keep = np.isfinite(flops) & np.isfinite(loss) & (flops > 0)
    return {"flops": flops[keep].tolist(), "loss": loss[keep].tolist()}


def scaling_data(given: PlotInput) -> dict[str, Any]:
    """Per shape: the measured (FLOPs, loss) points at the first proxy size and the law fitted to them."""
    spec = given.spec
    fits = _planned(given).fits
    runs = runs_by_shape(spec, given.attempts)
    flops = np.geomspace(min(f.flops_range[0] for f in fits.values()) / 2,
                         max(f.flops_range[1] for f in fits.values()) * 4, CURVE_POINTS)
    shapes = {label: {"form": fit.form, "params": fit.law.params(), "extrapolation_error": fit.extrapolation_error,
                      "points": sorted(list(p) for run in runs[label][spec.sizes[0]] for p in run.points),
                      "curve": _finite_curve(flops, fit.law.loss(flops))}
              for label, fit in fits.items()}
    return {"kind": "scaling", "axis": spec.axis, "size": spec.sizes[0], "shapes": shapes}


def schedule_data(given: PlotInput) -> dict[str, Any]:
    """Each shape's fitted curve and the planned segments along them, in cumulative FLOPs of the whole run."""
    planned = _planned(given)
    schedule, laws = planned.report.schedule, {label: fit.law for label, fit in planned.fits.items()}
    flops = np.geomspace(min(f.flops_range[0] for f in planned.fits.values()) / 2,
                         max(schedule.adaptive_flops, schedule.static_flops) * 1.5, CURVE_POINTS)
    paths = []
    for described, segment in zip(segments(planned.report), schedule.segments):
        law, loss = laws[segment.shape], np.linspace(segment.e_enter, segment.e_exit, PATH_POINTS)
        along = segment.c_enter + law.flops_to_reach(loss) - law.flops_to_reach(segment.e_enter)
        paths.append({**described, "path": _finite_curve(along, loss)})
    return {"kind": "schedule", "axis": given.spec.axis, "start_loss": planned.start_loss,
            "target_loss": schedule.target_loss, "adaptive_flops": schedule.adaptive_flops,
            "static": {"shape": schedule.static_shape, "flops": schedule.static_flops}, "saving": schedule.saving,
            "low_confidence": planned.report.low_confidence,
            "curves": {label: _finite_curve(flops, law.loss(flops)) for label, law in laws.items()},
            "segments": paths}


class ScheduleSummary(BaseModel):
    """A completed shape_schedule: the planned schedule to the lowest loss its first proxy size reached."""

    kind: Literal["shape_schedule"]
    target_loss: float
    shapes: list[str] = Field(description="the shapes the schedule trains in, in order")
    adaptive_flops: float
    static_shape: str
    static_flops: float
    saving: float = Field(description="predicted fraction of compute saved vs the best static shape")
    saving_interval: dict[str, Any]
    low_confidence: bool


class ShapeScheduleKind(GridKind[ResolvedShapeSchedule]):
    name = "shape_schedule"
    spec_type = ShapeScheduleSpec
    stored_type = ResolvedShapeSchedule
    summary_type = ScheduleSummary
    plots = {"scaling": DrawnPlot(scaling_data, draw_scaling), "schedule": DrawnPlot(schedule_data, draw_schedule)}

    def grid_points(self, spec: ResolvedShapeSchedule) -> list[dict[str, Any]]:
        """Seed by seed, one whole curve (every budget of a shape and size) after another, so a study cut short
        still has whole curves and a pack of neighbouring points trains each curve's budgets as one computation."""
        return [{"value_index": v, "size_index": s, "seed": seed, "budget_index": b}
                for seed in range(spec.seeds) for s in range(len(spec.sizes)) for v in range(len(spec.points()))
                for b in range(len(spec.budgets))]

    def trained_shapes(self, spec: ShapeScheduleSpec, base: Shape) -> dict[Loc, Shape]:
        return {("values", i, "sizes", j): spec.point_shape(base, i, mult)
                for i in range(len(spec.points())) for j, mult in enumerate(spec.sizes)}

    def asked_steps(self, spec: ShapeScheduleSpec) -> list[tuple[Loc, int]]:
        return [(("budgets", i), steps) for i, steps in enumerate(spec.budgets)]

    def distributions(self, spec: ResolvedShapeSchedule) -> dict[str, BaseDistribution]:
        counts = {"value_index": len(spec.points()), "size_index": len(spec.sizes), "seed": spec.seeds,
                  "budget_index": len(spec.budgets)}
        return {name: IntDistribution(0, counts[name] - 1) for name in GRID_AXES}

    def pack_size(self, spec: ResolvedShapeSchedule, data_root: Path | None) -> int:
        """The spec's ``pack``; auto sizes it for the grid's costliest shape per training step (a pack holds one
        shape and size: its members differ in budget and seed)."""
        family, data = get_family(spec.model.family), dataset_spec(spec.dataset.name, spec.dataset.args, data_root)
        points = [{"value_index": v, "size_index": s, "seed": 0, "budget_index": 0}
                  for v in range(len(spec.points())) for s in range(len(spec.sizes))]
        costliest = max(points, key=lambda p: family.train_flops_per_sample(trial_shape(spec, p), data,
                                                                            spec.model.args))
        return pack_of(spec.pack, self.trial_config(spec, costliest), data_root)

    def is_planned(self, attempt: TrialAttempt) -> bool:
        """Schedule runs, queued by POST /schedule/run once the grid has finished (so never beside grid points)."""
        return is_schedule_run(attempt.params)

    def trial_config(self, spec: ResolvedShapeSchedule, params: dict[str, Any]) -> TrialConfig:
        """A WSD run with its own cooldown ending exactly at its budget, evaluated once at the end."""
        steps = spec.budgets[int(params["budget_index"])]
        return base_config(spec, trial_shape(spec, params), spec.budget.to_budget(steps=steps, eval_every=steps,
                                                                                  schedule="wsd"),
                           dict(spec.hyperparameters), int(params["seed"]))

    def run_planned(self, spec: ResolvedShapeSchedule, attempt: TrialAttempt, settings: Settings,
                    record: Callable[[dict[str, Any]], bool]) -> TrainResult | None:
        """A schedule run (queued by POST /schedule/run) trains its planned phases; a grid point is a trial."""
        return run_planned_schedule(spec, attempt, settings, record) if self.is_planned(attempt) else None

    def summary(self, session: Session, study: Study, spec: ResolvedShapeSchedule,
                data_root: Path | None) -> dict[str, Any] | None:
        """The schedule to the lowest loss the first proxy size reached (GET /schedule plans to any other target)."""
        attempts = list(session.scalars(select(TrialAttempt).where(TrialAttempt.study_id == study.id)))
        losses = [a.value for a in attempts if a.state == TrialState.complete and a.value is not None and a.params
                  and not is_schedule_run(a.params) and int(a.params["size_index"]) == 0]
        if not losses:
            return None
        try:
            planned = plan(spec, attempts, ScheduleQuery(target_loss=min(losses)),
                           dataset_spec(spec.dataset.name, spec.dataset.args, data_root))
        except ValueError:
            return None
        schedule = planned.report.schedule
        return {"kind": "shape_schedule", "target_loss": schedule.target_loss,
                "shapes": [segment.shape for segment in schedule.segments], "adaptive_flops": schedule.adaptive_flops,
                "static_shape": schedule.static_shape, "static_flops": schedule.static_flops,
                "saving": schedule.saving, "saving_interval": planned.report.saving.to_dict(),
                "low_confidence": planned.report.low_confidence}


KIND = ShapeScheduleKind()
