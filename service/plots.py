"""A study's plots: the data as JSON-ready dicts, and PNGs rendered from that same data (matplotlib Agg).

Rendering uses ``matplotlib.figure.Figure`` directly, never pyplot, so concurrent requests in the
API's thread pool do not share global figure state.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Any

import optuna
from optuna.importance import FanovaImportanceEvaluator, get_param_importances
from optuna.storages import RDBStorage

from service.models import Study, TrialAttempt, TrialState


class PlotKind(StrEnum):
    history = "history"
    intermediate = "intermediate"
    importance = "importance"


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


def plot_data(kind: PlotKind, study: Study, attempts: Sequence[TrialAttempt], storage: RDBStorage) -> dict[str, Any]:
    if study.kind != "tune":
        raise NoPlotData(f"study {study.id} is a {study.kind} study; these plots are for tune studies (a "
                         f"transfer_check study's loss-vs-LR plot is at /v1/studies/{study.id}/check.png).")
    if kind == PlotKind.history:
        return history_data(study, attempts)
    if kind == PlotKind.intermediate:
        return intermediate_data(study, attempts)
    return importance_data(study, storage)


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
    PlotKind.importance: _draw_importance}


def render_png(kind: PlotKind, data: dict[str, Any]) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    ax = fig.add_subplot()
    DRAW[kind](ax, data)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
