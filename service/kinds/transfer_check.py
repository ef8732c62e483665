"""transfer_check: sizes x LR multipliers x seeds around the tuned LR; per-size optimum, drift and verdict."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution
from sqlalchemy import select
from sqlalchemy.orm import Session

from scaletune.hparams import HParams
from scaletune.runner import TrialConfig
from scaletune.shapes import Shape
from scaletune.transfer_check import TransferCheckResult, TrialRecord, analyse
from service.kinds.grid import GridKind
from service.kinds.setup import base_config
from service.models import Study, TrialAttempt, TrialState
from service.plot_drawing import draw_landscape
from service.plots import DrawnPlot, NoPlotData, PlotInput
from service.spec import Loc, ResolvedTransferCheck, TransferCheckSpec

FINISHED = (TrialState.complete, TrialState.diverged)


def tuned_lr(spec: TransferCheckSpec) -> float:
    return spec.hyperparameters.get("lr", HParams().lr)


def size_label(shape: Shape) -> str:
    return "x".join(f"{key[0]}{value}" for key, value in shape.to_dict().items())


def records(spec: TransferCheckSpec, attempts: Iterable[TrialAttempt]) -> list[TrialRecord]:
    """Complete and diverged attempts as analysis records (log2 of the absolute LR; None loss = diverged)."""
    base = math.log2(tuned_lr(spec))
    result = []
    for attempt in attempts:
        if attempt.state not in FINISHED or not attempt.params:
            continue
        shape = Shape(**spec.sizes[int(attempt.params["size_index"])].model_dump())
        result.append(TrialRecord(size=size_label(shape), shape=shape,
                                  log2_value=base + float(attempt.params["log2_lr_mult"]),
                                  seed=int(attempt.params["seed"]),
                                  loss=attempt.value if attempt.state == TrialState.complete else None))
    return result


def check(spec: TransferCheckSpec, attempts: Iterable[TrialAttempt]) -> TransferCheckResult:
    """The analysis of the finished points so far; ValueError while fewer than two sizes have any."""
    return analyse(records(spec, attempts))


def landscape_data(given: PlotInput) -> dict[str, Any]:
    """The analysis as a plot: seed-mean loss per LR and size, diverged counts, optima, verdict."""
    try:
        result = check(given.spec, given.attempts)
    except ValueError as error:
        raise NoPlotData(f"study {given.study.id} has no loss-vs-LR landscape yet: {error}.") from None
    return {"kind": "landscape", "status": given.study.status, "tuned_lr": tuned_lr(given.spec), **result.to_dict()}


LANDSCAPE = DrawnPlot(landscape_data, draw_landscape)


class TransferCheckKind(GridKind[ResolvedTransferCheck]):
    name = "transfer_check"
    spec_type = TransferCheckSpec
    stored_type = ResolvedTransferCheck
    plots = {"landscape": LANDSCAPE}

    def grid_points(self, spec: ResolvedTransferCheck) -> list[dict[str, Any]]:
        """Seed by seed, so a study cut short still has whole LR sweeps for every size."""
        return [{"size_index": i, "log2_lr_mult": m, "seed": seed}
                for seed in range(spec.seeds) for i in range(len(spec.sizes)) for m in spec.lr_multipliers_log2()]

    def trained_shapes(self, spec: TransferCheckSpec, base: Shape) -> dict[Loc, Shape]:
        return {("sizes", i): Shape(**size.model_dump()) for i, size in enumerate(spec.sizes)}

    def distributions(self, spec: ResolvedTransferCheck) -> dict[str, BaseDistribution]:
        mults = spec.lr_multipliers_log2()
        return {"size_index": IntDistribution(0, len(spec.sizes) - 1),
                "log2_lr_mult": FloatDistribution(mults[0], mults[-1]),
                "seed": IntDistribution(0, spec.seeds - 1)}

    def trial_config(self, spec: ResolvedTransferCheck, params: dict[str, Any]) -> TrialConfig:
        """One grid point: the size's shape, the tuned LR times 2^log2_lr_mult, everything else as tuned."""
        lr = tuned_lr(spec) * 2.0 ** float(params["log2_lr_mult"])
        return base_config(spec, Shape(**spec.sizes[int(params["size_index"])].model_dump()), spec.budget.to_budget(),
                           {**spec.hyperparameters, "lr": lr}, int(params["seed"]))

    def summary(self, session: Session, study: Study, spec: ResolvedTransferCheck,
                data_root: Path | None) -> dict[str, Any] | None:
        """The verdict: does the optimal LR stay put across sizes?"""
        attempts = session.scalars(select(TrialAttempt).where(TrialAttempt.study_id == study.id))
        try:
            result = check(spec, attempts)
        except ValueError:
            return None
        return {"kind": "transfer_check", "verdict": result.verdict, "drift": result.max_drift,
                "direction": result.direction, "monotone": result.monotone, "reasons": result.reasons}


KIND = TransferCheckKind()
