"""transfer_check: sizes x multipliers x seeds around one tuned value; per-size optimum, drift and verdict.

The grid grows by octaves (up to ``max_extensions``) while a size's seed-mean minimum sits at an edge: the
dispatcher asks :meth:`TransferCheckKind.grow` once every queued point has finished.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from scaletune.data.registry import dataset_spec
from scaletune.hparams import HParams
from scaletune.models.registry import get_family
from scaletune.models.size import family_factory
from scaletune.parametrize import classify
from scaletune.runner import TrialConfig
from scaletune.shapes import Shape
from scaletune.transfer_check import TransferCheckResult, TrialRecord, analyse, check_grid, parabola_optimum
from service.kinds.base import pack_of
from service.kinds.grid import GridKind
from service.kinds.setup import base_config
from service.models import Study, TrialAttempt, TrialState
from service.plot_drawing import draw_landscape
from service.plots import DrawnPlot, NoPlotData, PlotInput
from service.settings import Settings
from service.spec import GridExtension, Loc, ResolvedTransferCheck, SpecProblem, TransferCheckSpec

FINISHED = (TrialState.complete, TrialState.diverged)
OCTAVE = 1.0  # a grid grows by whole octaves


def tuned_value(spec: TransferCheckSpec) -> float:
    """The checked value in base units: the spec's (or its source's best), else the library default."""
    return spec.hyperparameters.get(spec.hparam, getattr(HParams(), spec.hparam))


def _attention_problems(spec: TransferCheckSpec, settings: Settings) -> list[SpecProblem]:
    """attn_mult scales attention logits: a model without attention would train one landscape point per size."""
    assert spec.model is not None and spec.dataset is not None
    base = Shape(**spec.model.base.model_dump())
    data = dataset_spec(spec.dataset.name, spec.dataset.args, settings.DATA_ROOT)
    factory = family_factory(get_family(spec.model.family), base, data, spec.model.args)
    if any(module.role == "attention" for module in classify(factory, base, base).modules):
        return []
    return [SpecProblem(("hparam",), f"attn_mult scales attention logits, and the {spec.model.family} family's model "
                                     "has no attention: every multiplier would train the same model. Check lr, "
                                     "output_mult, init_std, weight_decay or warmup_frac instead, or a family with "
                                     "attention (gpt, vit).")]


def size_label(shape: Shape) -> str:
    return "x".join(f"{key[0]}{value}" for key, value in shape.to_dict().items())


def records(spec: TransferCheckSpec, attempts: Iterable[TrialAttempt]) -> list[TrialRecord]:
    """Complete and diverged attempts as analysis records (log2 of the absolute value; None loss = diverged)."""
    base = math.log2(tuned_value(spec))
    result = []
    for attempt in attempts:
        if attempt.state not in FINISHED or not attempt.params:
            continue
        shape = Shape(**spec.sizes[int(attempt.params["size_index"])].model_dump())
        result.append(TrialRecord(size=size_label(shape), shape=shape,
                                  log2_value=base + float(attempt.params["log2_mult"]),
                                  seed=int(attempt.params["seed"]),
                                  loss=attempt.value if attempt.state == TrialState.complete else None))
    return result


def check(spec: TransferCheckSpec, attempts: Iterable[TrialAttempt]) -> TransferCheckResult:
    """The analysis of the finished points so far; ValueError while fewer than two sizes have any."""
    return analyse(records(spec, attempts), hparam=spec.hparam)


def edge_extensions(spec: TransferCheckSpec, attempts: Iterable[TrialAttempt]) -> list[GridExtension]:
    """One octave beyond the edge for each size whose seed-mean minimum sits there, within ``max_extensions``.

    A high edge next to a diverged point is no edge (the optimum is bounded there), and a value the grid
    cannot train (a warmup fraction reaching 1) is not added.
    """
    losses: dict[int, dict[float, list[float]]] = {}
    for attempt in attempts:
        if attempt.state in FINISHED and attempt.params:
            loss = attempt.value if attempt.state == TrialState.complete and attempt.value is not None else math.inf
            losses.setdefault(int(attempt.params["size_index"]), {}).setdefault(
                float(attempt.params["log2_mult"]), []).append(loss)
    added = []
    for index, by_mult in sorted(losses.items()):
        xs = sorted(by_mult)
        optimum, at_edge = parabola_optimum(xs, [sum(v) / len(v) for v in (by_mult[x] for x in xs)])
        if optimum is None or not at_edge:
            continue
        new = optimum - OCTAVE if optimum == xs[0] else optimum + OCTAVE
        if abs(new) > max(spec.multipliers_log2()) + spec.max_extensions * OCTAVE:
            continue
        try:
            check_grid(spec.hparam, tuned_value(spec), [new])
        except ValueError:
            continue
        added.append(GridExtension(size_index=index, log2_mult=new))
    return added


def landscape_data(given: PlotInput) -> dict[str, Any]:
    """The analysis as a plot: seed-mean loss per value and size, diverged counts, optima, verdict."""
    try:
        result = check(given.spec, given.attempts)
    except ValueError as error:
        name = "LR" if given.spec.hparam == "lr" else given.spec.hparam
        raise NoPlotData(f"study {given.study.id} has no loss-vs-{name} landscape yet: {error}.") from None
    return {"kind": "landscape", "status": given.study.status, "tuned_value": tuned_value(given.spec),
            **result.to_dict()}


LANDSCAPE = DrawnPlot(landscape_data, draw_landscape)


class CheckVerdict(BaseModel):
    """A completed transfer_check: does the optimal value of the checked hyperparameter stay put across sizes?"""

    kind: Literal["transfer_check"]
    hparam: str = Field(description="the hyperparameter checked (lr, output_mult, init_std, weight_decay, "
                                    "warmup_frac or attn_mult)")
    verdict: Literal["holds", "drifts", "not_monotone", "inconclusive"] = Field(
        description="holds: every drift's 95% interval within the tolerance and the loss improves with size; "
                    "drifts: one interval wholly beyond it; not_monotone: within it but the loss does not improve; "
                    "inconclusive: an optimum at the grid edge, too few seeds, or an interval across the tolerance")
    drift: float | None = Field(description="the largest move of the optimal log2 value vs the smallest size, octaves")
    drift_interval: tuple[float, float] | None = Field(description="the bootstrap 95% interval of that drift")
    seeds_needed: int | None = Field(description="about how many seeds per point would settle an inconclusive "
                                                 "verdict (null when seeds are not what is missing)")
    direction: Literal["higher", "lower"] | None = Field(description="where the optimum moves with size")
    monotone: bool = Field(description="the loss at the optimum improves with every size step")
    reasons: list[str]


class TransferCheckKind(GridKind[ResolvedTransferCheck]):
    name = "transfer_check"
    spec_type = TransferCheckSpec
    stored_type = ResolvedTransferCheck
    summary_type = CheckVerdict
    plots = {"landscape": LANDSCAPE}

    def grid_points(self, spec: ResolvedTransferCheck) -> list[dict[str, Any]]:
        """Seed by seed, so a study cut short still has whole sweeps for every size; then the extensions."""
        grid = [{"size_index": i, "log2_mult": m, "seed": seed}
                for seed in range(spec.seeds) for i in range(len(spec.sizes)) for m in spec.multipliers_log2()]
        return grid + self.extension_points(spec)

    def extension_points(self, spec: ResolvedTransferCheck) -> list[dict[str, Any]]:
        return [{"size_index": e.size_index, "log2_mult": e.log2_mult, "seed": seed}
                for e in spec.extensions for seed in range(spec.seeds)]

    def grow(self, spec: ResolvedTransferCheck, attempts: list[TrialAttempt]) -> dict[str, Any] | None:
        """The stored spec's new fields once the grid grows an octave where a size's optimum sits at an edge."""
        added = edge_extensions(spec, attempts)
        if not added:
            return None
        assert spec.n_trials is not None
        return {"extensions": [e.model_dump() for e in [*spec.extensions, *added]],
                "n_trials": spec.n_trials + len(added) * spec.seeds}

    def check(self, spec: Any, settings: Settings) -> list[SpecProblem]:
        """The grid's own rules (a positive tuned value, a warmup below 1), then what every grid kind checks."""
        if spec.source is None or spec.model is not None:
            mults = spec.multipliers_log2()
            try:
                check_grid(spec.hparam, tuned_value(spec), [mults[0], mults[-1]])
            except ValueError as error:
                return [SpecProblem(("hparam",), str(error))]
        problems = super().check(spec, settings)
        if problems or spec.hparam != "attn_mult" or spec.model is None or spec.dataset is None:
            return problems
        return _attention_problems(spec, settings)

    def trained_shapes(self, spec: TransferCheckSpec, base: Shape) -> dict[Loc, Shape]:
        return {("sizes", i): Shape(**size.model_dump()) for i, size in enumerate(spec.sizes)}

    def distributions(self, spec: ResolvedTransferCheck) -> dict[str, BaseDistribution]:
        """Wide enough for every multiplier the grid may grow to."""
        reach = max(spec.multipliers_log2()) + spec.max_extensions * OCTAVE
        return {"size_index": IntDistribution(0, len(spec.sizes) - 1),
                "log2_mult": FloatDistribution(-reach, reach),
                "seed": IntDistribution(0, spec.seeds - 1)}

    def pack_size(self, spec: ResolvedTransferCheck, data_root: Path | None) -> int:
        """The spec's ``pack``; auto sizes it for the largest size (the grid runs each size's values and seeds
        next to each other, so a pack is mostly one size)."""
        largest = max(range(len(spec.sizes)), key=lambda i: (spec.sizes[i].width, spec.sizes[i].depth))
        return pack_of(spec.pack, self.trial_config(spec, {"size_index": largest, "log2_mult": 0.0, "seed": 0}),
                       data_root)

    def trial_config(self, spec: ResolvedTransferCheck, params: dict[str, Any]) -> TrialConfig:
        """One grid point: the size's shape, the tuned value times 2^log2_mult, everything else as tuned."""
        value = tuned_value(spec) * 2.0 ** float(params["log2_mult"])
        return base_config(spec, Shape(**spec.sizes[int(params["size_index"])].model_dump()), spec.budget.to_budget(),
                           {**spec.hyperparameters, spec.hparam: value}, int(params["seed"]))

    def summary(self, session: Session, study: Study, spec: ResolvedTransferCheck,
                data_root: Path | None) -> dict[str, Any] | None:
        """The verdict: does the optimal value stay put across sizes?"""
        attempts = session.scalars(select(TrialAttempt).where(TrialAttempt.study_id == study.id))
        try:
            result = check(spec, attempts)
        except ValueError:
            return None
        return {"kind": "transfer_check", "hparam": result.hparam, "verdict": result.verdict, "drift": result.max_drift,
                "drift_interval": result.max_drift_interval, "seeds_needed": result.seeds_needed,
                "direction": result.direction, "monotone": result.monotone, "reasons": result.reasons}


KIND = TransferCheckKind()
