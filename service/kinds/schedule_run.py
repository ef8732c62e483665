"""Schedule runs of a shape_schedule study: one trial that executes the planned schedule, measured against it.

A run is an attempt whose params hold the planned phases (fixed when it is queued, so a retry resumes the very
same schedule from its checkpoint), the prediction, and the run's id (``schedule_training.RUN_KEY``). Each eval
point records the phase and shape it was taken in (``schedule_training`` trains it).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from scaletune.adaptive import Phase, phases_from_schedule
from scaletune.shapes import Shape
from service.kinds.schedule_training import RUN_KEY, is_schedule_run
from service.kinds.shape_schedule import Plan, ScheduleQuery, base_shape, shape_label
from service.models import TrialAttempt
from service.spec import ResolvedShapeSchedule


def proxy_shapes(spec: ResolvedShapeSchedule) -> dict[str, Shape]:
    """Each shape along the axis (or both axes) at the first proxy size: the shapes the planned schedule moves through."""
    return {shape_label(spec, i): spec.point_shape(base_shape(spec), i, spec.sizes[0])
            for i in range(len(spec.points()))}


def run_params(spec: ResolvedShapeSchedule, planned: Plan, query: ScheduleQuery, seed: int, run_id: str) -> dict[str, Any]:
    """What an attempt of this run needs and what it is measured against, planned once at submit."""
    schedule = planned.report.schedule
    phases = _trainable(phases_from_schedule(schedule, proxy_shapes(spec), schedule.adaptive_flops))
    return {RUN_KEY: run_id, "seed": seed, "target_loss": query.target_loss, "budget_flops": query.budget_flops,
            "phases": [p.to_dict() for p in phases], "loss_target": schedule.target_loss,
            "predicted_flops": schedule.adaptive_flops, "static_shape": schedule.static_shape,
            "static_flops": schedule.static_flops, "saving_predicted": schedule.saving}


def _trainable(phases: list[Phase]) -> list[Phase]:
    """Without the phases the plan gives no compute (a segment that ends where it starts)."""
    kept: list[Phase] = []
    for phase in phases:
        if phase.until_flops > (kept[-1].until_flops if kept else 0.0):
            kept.append(phase)
    return kept


def _curve(attempts: list[TrialAttempt]) -> list[dict[str, Any]]:
    """The run's eval points over all its attempts; a resumed attempt's points replace the ones it redid."""
    by_step: dict[int, dict[str, Any]] = {}
    for attempt in sorted(attempts, key=lambda a: a.attempt):
        by_step.update({int(point["step"]): point for point in attempt.intermediate})
    return [by_step[step] for step in sorted(by_step)]


def _summary(attempts: list[TrialAttempt]) -> dict[str, Any]:
    latest = max(attempts, key=lambda a: a.attempt)
    params = latest.params or {}
    curve = _curve(attempts)
    reached = [p for p in curve if p.get("eval_loss") is not None and p["eval_loss"] <= params["loss_target"]]
    realised = float(reached[0]["flops"]) if reached else None
    static = params["static_flops"]
    last = curve[-1] if curve else None
    return {"id": params[RUN_KEY], "seed": params["seed"], "target_loss": params["loss_target"],
            "query": {"target_loss": params["target_loss"], "budget_flops": params["budget_flops"]},
            "predicted_flops": params["predicted_flops"], "realised_flops": realised,
            "saving_predicted": params["saving_predicted"],
            "saving_realised": None if realised is None or static <= 0 else 1.0 - realised / static,
            "static_shape": params["static_shape"], "status": latest.state, "attempts": len(attempts),
            "step": None if last is None else last["step"], "shape": None if last is None else last.get("shape"),
            "final_loss": latest.value}


def runs(attempts: Iterable[TrialAttempt]) -> list[dict[str, Any]]:
    """Each schedule run, in the order they were queued: predicted vs realised FLOPs to its target loss.

    ``saving_realised`` compares the realised FLOPs with the best static shape's predicted FLOPs to the same loss;
    ``realised_flops`` is null until an eval reaches the target loss (and stays null if the run ends above it).
    """
    by_run: dict[str, list[TrialAttempt]] = {}
    for attempt in sorted(attempts, key=lambda a: (a.queued_at, a.attempt)):
        if is_schedule_run(attempt.params):
            assert attempt.params is not None
            by_run.setdefault(str(attempt.params[RUN_KEY]), []).append(attempt)
    return [_summary(run_attempts) for run_attempts in by_run.values()]
