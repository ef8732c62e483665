"""A study's plots: the data as JSON-ready dicts, and PNGs rendered from that same data (matplotlib Agg).

Each study kind lists the plots it serves (``StudyKind.plots``); the data of the plots any trial-by-trial study
has (history, intermediate values, importance) is here, each kind's own analyses in its module, and every
drawing in service/plot_drawing.py. Rendering uses ``matplotlib.figure.Figure`` directly, never pyplot, so
concurrent requests in the API's thread pool do not share global figure state.
"""

from __future__ import annotations

import io
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.storages import BaseStorage

from service.models import Study, TrialAttempt, TrialState
from service.settings import Settings

Draw = Callable[[Any, dict[str, Any]], None]


class NoPlotData(LookupError):
    """The study has no data for this plot (yet); the message says why in a sentence."""


@dataclass(frozen=True)
class PlotInput:
    """What a plot is computed from: the study, its spec (parsed by its kind), its attempts and the server's setup."""

    study: Study
    spec: Any
    attempts: Sequence[TrialAttempt]
    storage: BaseStorage
    settings: Settings


class Plot(ABC):
    """One plot a study kind serves, as JSON data and as a PNG."""

    @abstractmethod
    def data(self, given: PlotInput) -> dict[str, Any]:
        """The data behind the plot; NoPlotData when there is none yet."""

    @abstractmethod
    def png(self, given: PlotInput) -> bytes:
        """The plot as a PNG; NoPlotData when there is nothing to draw yet."""


@dataclass(frozen=True)
class DrawnPlot(Plot):
    """A plot whose PNG is drawn from its JSON data, so the two always show the same thing."""

    compute: Callable[[PlotInput], dict[str, Any]]
    draw: Draw

    def data(self, given: PlotInput) -> dict[str, Any]:
        return self.compute(given)

    def png(self, given: PlotInput) -> bytes:
        return render_png(self.draw, self.data(given))


def render_png(draw: Draw, data: dict[str, Any]) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    ax = fig.add_subplot()
    draw(ax, data)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _finished(attempts: Sequence[TrialAttempt]) -> list[TrialAttempt]:
    """Attempts with a trial number that ended, in trial-number order."""
    done = [a for a in attempts if a.number is not None and a.state not in (TrialState.queued, TrialState.running)]
    return sorted(done, key=lambda a: (a.number, a.attempt))


def history_data(given: PlotInput) -> dict[str, Any]:
    """Each finished trial's value and the best value so far, in trial-number order."""
    study, attempts = given.study, given.attempts
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


def intermediate_data(given: PlotInput) -> dict[str, Any]:
    """The objective's metric against step for every trial that reported at least once (running ones included).

    Workers report ``eval_loss``; an external study's own code reports a ``value`` (its objective names no metric).
    """
    study, attempts = given.study, given.attempts
    metric = study.spec["objective"].get("metric", "value")
    curves = [{"number": a.number, "state": a.state, "step": [p["step"] for p in a.intermediate],
               metric: [p.get(metric) for p in a.intermediate]}
              for a in sorted(attempts, key=lambda a: (a.number is None, a.number or 0)) if a.intermediate]
    if not curves:
        raise NoPlotData(f"study {study.id} has no reported evaluations yet, so there are no intermediate curves.")
    return {"kind": "intermediate", "metric": metric, "trials": curves}


def importance_data(given: PlotInput) -> dict[str, Any]:
    """fANOVA importance of each searched parameter, from Optuna's record of the study in the same database."""
    # Imported here: fANOVA pulls in scikit-learn (1.3 s), which every API, worker and reconciler start paid for.
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances
    study = given.study
    optuna_study = optuna.load_study(study_name=study.optuna_study_name, storage=given.storage)
    complete = optuna_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    finite = [t for t in complete if t.value is not None and math.isfinite(t.value)]
    if len(finite) < 2:
        raise NoPlotData(f"study {study.id} has {len(finite)} completed trial(s) with a finite value; parameter "
                         "importance needs at least 2.")
    importances = get_param_importances(optuna_study, evaluator=FanovaImportanceEvaluator(seed=0),
                                        params=list(study.spec["search_space"]), normalize=True)
    return {"kind": "importance", "evaluator": "fanova", "n_trials": len(finite),
            "importances": {name: float(value) for name, value in importances.items()}}
