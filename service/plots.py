"""A study's plots: the data as JSON-ready dicts, and PNGs rendered from that same data (matplotlib Agg).

Each plot belongs to one study kind: tune studies have history, intermediate, importance (and coord_check, see
service/coord_plot.py); transfer_check studies the loss-vs-LR landscape; shape_schedule studies the scaling fits
and the planned schedule. Rendering uses ``matplotlib.figure.Figure`` directly, never pyplot, so concurrent requests in the
API's thread pool do not share global figure state.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.importance import FanovaImportanceEvaluator, get_param_importances
from optuna.storages import RDBStorage

from scaletune.data.registry import dataset_spec
from service.kinds import shape_schedule, transfer_check
from service.models import Study, TrialAttempt, TrialState
from service.plot_drawing import draw_landscape, draw_scaling, draw_schedule
from service.spec import ShapeScheduleSpec, StudySpec, TransferCheckSpec

CURVE_POINTS = 60  # samples along a fitted curve
PATH_POINTS = 24  # samples along one schedule segment


class PlotKind(StrEnum):
    history = "history"
    intermediate = "intermediate"
    importance = "importance"
    coord_check = "coord_check"
    landscape = "landscape"
    scaling = "scaling"
    schedule = "schedule"


STUDY_KIND: dict[PlotKind, str] = {
    PlotKind.history: "tune", PlotKind.intermediate: "tune", PlotKind.importance: "tune",
    PlotKind.coord_check: "tune", PlotKind.landscape: "transfer_check", PlotKind.scaling: "shape_schedule",
    PlotKind.schedule: "shape_schedule"}


class NoPlotData(LookupError):
    """The study has no data for this plot (yet); the message says why in a sentence."""


def _finished(attempts: Sequence[TrialAttempt]) -> list[TrialAttempt]:
    """Attempts with a trial number that ended, in trial-number order."""
    done = [a for a in attempts if a.number is not None and a.state not in (TrialState.queued, TrialState.running)]
    return sorted(done, key=lambda a: (a.number, a.attempt))


def history_data(study: Study, attempts: Sequence[TrialAttempt]) -> dict[str, Any]:
    """Each finished trial's value and the best value so far, in trial-number order."""
    minimize = study.spec["objective"]["direction"] == "minimize"
    trials, best_so_far, best = [], [], None
    for a in _finished(attempts):
        trials.append({"number": a.number, "state": a.state, "value": a.value})
        if a.state == TrialState.complete and a.value is not None:
            best = a.value if best is None else (min(best, a.value) if minimize else max(best, a.value))
        best_so_far.append(best)
    if best is None:
        raise NoPlotData(f"study {study.id} has no completed trial yet, so there is no optimization history.")
    return {"kind": "history", "direction": study.spec["objective"]["direction"], "trials": trials,
            "best_so_far": best_so_far}


def intermediate_data(study: Study, attempts: Sequence[TrialAttempt]) -> dict[str, Any]:
    """Eval loss against step for every trial that reported at least once (running ones included)."""
    curves = [{"number": a.number, "state": a.state, "step": [p["step"] for p in a.intermediate],
               "eval_loss": [p.get("eval_loss") for p in a.intermediate]}
              for a in sorted(attempts, key=lambda a: (a.number is None, a.number or 0)) if a.intermediate]
    if not curves:
        raise NoPlotData(f"study {study.id} has no reported evaluations yet, so there are no intermediate curves.")
    return {"kind": "intermediate", "metric": study.spec["objective"]["metric"], "trials": curves}


def importance_data(study: Study, storage: RDBStorage) -> dict[str, Any]:
    """fANOVA importance of each searched parameter, from Optuna's record of the study in the same database."""
    optuna_study = optuna.load_study(study_name=study.optuna_study_name, storage=storage)
    complete = optuna_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    finite = [t for t in complete if t.value is not None and math.isfinite(t.value)]
    if len(finite) < 2:
        raise NoPlotData(f"study {study.id} has {len(finite)} completed trial(s) with a finite value; parameter "
                         "importance needs at least 2.")
    importances = get_param_importances(optuna_study, evaluator=FanovaImportanceEvaluator(seed=0),
                                        params=list(study.spec["search_space"]), normalize=True)
    return {"kind": "importance", "evaluator": "fanova", "n_trials": len(finite),
            "importances": {name: float(value) for name, value in importances.items()}}


def landscape_data(study: Study, spec: TransferCheckSpec, attempts: Sequence[TrialAttempt]) -> dict[str, Any]:
    """The transfer_check kind's analysis: seed-mean loss per LR and size, diverged counts, optima, verdict."""
    try:
        result = transfer_check.check(spec, attempts)
    except ValueError as error:
        raise NoPlotData(f"study {study.id} has no loss-vs-LR landscape yet: {error}.") from None
    return {"kind": "landscape", "status": study.status, "tuned_lr": transfer_check.tuned_lr(spec),
            **result.to_dict()}


def _planned(study: Study, spec: ShapeScheduleSpec, attempts: Sequence[TrialAttempt],
             data_root: Path | None) -> shape_schedule.Plan:
    """The fits per shape and the schedule to the lowest loss a proxy-size run reached (as the study detail plans)."""
    runs = shape_schedule.runs_by_shape(spec, attempts)
    losses = [loss for by_size in runs.values() for run in by_size.get(spec.sizes[0], []) for _, loss in run.points]
    if not losses:
        raise NoPlotData(f"study {study.id} has no completed run at proxy size {spec.sizes[0]:g} yet, so there is "
                         "no scaling law to fit.")
    assert spec.dataset is not None, "resolve the source first"
    data = dataset_spec(spec.dataset.name, spec.dataset.args, data_root)
    try:
        return shape_schedule.plan(spec, attempts, shape_schedule.ScheduleQuery(target_loss=min(losses)), data)
    except ValueError as error:
        raise NoPlotData(f"study {study.id} cannot be planned yet: {error}.") from None


def _finite_curve(flops: np.ndarray, loss: np.ndarray) -> dict[str, list[float]]:
    keep = np.isfinite(flops) & np.isfinite(loss) & (flops > 0)
    return {"flops": flops[keep].tolist(), "loss": loss[keep].tolist()}


def scaling_data(study: Study, spec: ShapeScheduleSpec, attempts: Sequence[TrialAttempt],
                 data_root: Path | None) -> dict[str, Any]:
    """Per shape: the measured (FLOPs, loss) points at the first proxy size and the law fitted to them."""
    fits = _planned(study, spec, attempts, data_root).fits
    runs = shape_schedule.runs_by_shape(spec, attempts)
    flops = np.geomspace(min(f.flops_range[0] for f in fits.values()) / 2,
                         max(f.flops_range[1] for f in fits.values()) * 4, CURVE_POINTS)
    shapes = {label: {"form": fit.form, "params": fit.law.params(), "extrapolation_error": fit.extrapolation_error,
                      "points": sorted(list(p) for run in runs[label][spec.sizes[0]] for p in run.points),
                      "curve": _finite_curve(flops, fit.law.loss(flops))}
              for label, fit in fits.items()}
    return {"kind": "scaling", "axis": spec.axis, "size": spec.sizes[0], "shapes": shapes}


def schedule_data(study: Study, spec: ShapeScheduleSpec, attempts: Sequence[TrialAttempt],
                  data_root: Path | None) -> dict[str, Any]:
    """Each shape's fitted curve and the planned segments along them, in cumulative FLOPs of the whole run."""
    planned = _planned(study, spec, attempts, data_root)
    schedule, laws = planned.report.schedule, {label: fit.law for label, fit in planned.fits.items()}
    flops = np.geomspace(min(f.flops_range[0] for f in planned.fits.values()) / 2,
                         max(schedule.adaptive_flops, schedule.static_flops) * 1.5, CURVE_POINTS)
    segments = []
    for described, segment in zip(shape_schedule.segments(planned.report), schedule.segments):
        law, loss = laws[segment.shape], np.linspace(segment.e_enter, segment.e_exit, PATH_POINTS)
        along = segment.c_enter + law.flops_to_reach(loss) - law.flops_to_reach(segment.e_enter)
        segments.append({**described, "path": _finite_curve(along, loss)})
    return {"kind": "schedule", "axis": spec.axis, "start_loss": planned.start_loss,
            "target_loss": schedule.target_loss, "adaptive_flops": schedule.adaptive_flops,
            "static": {"shape": schedule.static_shape, "flops": schedule.static_flops}, "saving": schedule.saving,
            "low_confidence": planned.report.low_confidence,
            "curves": {label: _finite_curve(flops, law.loss(flops)) for label, law in laws.items()},
            "segments": segments}


def require_applies(kind: PlotKind, study: Study) -> None:
    """A plot of another study kind is not found, with a sentence naming the kind that has it."""
    if STUDY_KIND[kind] != study.kind:
        own = ", ".join(k for k, study_kind in STUDY_KIND.items() if study_kind == study.kind)
        raise NoPlotData(f"study {study.id} is a {study.kind} study; the {kind} plot is for {STUDY_KIND[kind]} "
                         f"studies only (a {study.kind} study has: {own}).")


def plot_data(kind: PlotKind, study: Study, spec: StudySpec, attempts: Sequence[TrialAttempt], storage: RDBStorage,
              data_root: Path | None) -> dict[str, Any]:
    """The data of every plot rendered from data (coord_check, computed by training, is in service/coord_plot.py)."""
    require_applies(kind, study)
    if kind == PlotKind.history:
        return history_data(study, attempts)
    if kind == PlotKind.intermediate:
        return intermediate_data(study, attempts)
    if kind == PlotKind.importance:
        return importance_data(study, storage)
    if kind == PlotKind.landscape:
        assert isinstance(spec, TransferCheckSpec)
        return landscape_data(study, spec, attempts)
    assert isinstance(spec, ShapeScheduleSpec) and kind in (PlotKind.scaling, PlotKind.schedule)
    return (scaling_data if kind == PlotKind.scaling else schedule_data)(study, spec, attempts, data_root)


def _draw_history(ax: Any, data: dict[str, Any]) -> None:
    numbers = [t["number"] for t in data["trials"]]
    done = [(t["number"], t["value"]) for t in data["trials"] if t["state"] == TrialState.complete and t["value"]
            is not None]
    ax.scatter([n for n, _ in done], [v for _, v in done], s=14, label="trial value")
    ax.step(numbers, data["best_so_far"], where="post", color="tab:red", label="best so far")
    others = [t["number"] for t in data["trials"] if t["state"] != TrialState.complete]
    if others:
        top = max(v for _, v in done)
        ax.scatter(others, [top] * len(others), marker="x", color="gray", label="pruned / failed / diverged")
    ax.set_xlabel("trial number")
    ax.set_ylabel(f"objective ({data['direction']})")
    ax.set_title("optimization history")
    ax.legend(fontsize=7)


def _draw_intermediate(ax: Any, data: dict[str, Any]) -> None:
    colors = {TrialState.complete: "tab:blue", TrialState.pruned: "tab:orange", TrialState.running: "tab:green"}
    for trial in data["trials"]:
        points = [(s, v) for s, v in zip(trial["step"], trial["eval_loss"]) if v is not None]
        ax.plot([s for s, _ in points], [v for _, v in points], marker=".", ms=3, lw=1, alpha=0.8,
                color=colors.get(trial["state"], "gray"))
    ax.set_xlabel("step")
    ax.set_ylabel(data["metric"])
    ax.set_title("intermediate values (blue complete, orange pruned, green running, gray other)", fontsize=9)


def _draw_importance(ax: Any, data: dict[str, Any]) -> None:
    items = sorted(data["importances"].items(), key=lambda kv: kv[1])
    ax.barh([name for name, _ in items], [value for _, value in items], color="tab:blue")
    ax.set_xlabel("importance (fANOVA, normalised)")
    ax.set_title(f"parameter importance over {data['n_trials']} completed trials")


DRAW: dict[PlotKind, Callable[[Any, dict[str, Any]], None]] = {
    PlotKind.history: _draw_history, PlotKind.intermediate: _draw_intermediate,
    PlotKind.importance: _draw_importance, PlotKind.landscape: draw_landscape, PlotKind.scaling: draw_scaling,
    PlotKind.schedule: draw_schedule}


def render_png(kind: PlotKind, data: dict[str, Any]) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    ax = fig.add_subplot()
    DRAW[kind](ax, data)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
