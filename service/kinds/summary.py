"""What GET /v1/studies/{id} says about a completed grid study: a transfer check's verdict, a schedule's summary."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from scaletune.data.registry import dataset_spec
from service.kinds import shape_schedule, transfer_check
from service.kinds.setup import SourceError, resolve_source
from service.models import Study, StudyStatus, TrialAttempt, TrialState
from service.spec import STUDY_SPEC, ShapeScheduleSpec, TransferCheckSpec

CACHE_SIZE = 512
_cache: OrderedDict[str, dict[str, Any] | None] = OrderedDict()
_lock = threading.Lock()


def _check_verdict(spec: TransferCheckSpec, attempts: list[TrialAttempt]) -> dict[str, Any] | None:
    try:
        result = transfer_check.check(spec, attempts)
    except ValueError:
        return None
    return {"kind": "transfer_check", "verdict": result.verdict, "drift": result.max_drift,
            "direction": result.direction, "monotone": result.monotone, "reasons": result.reasons}


def _schedule_summary(spec: ShapeScheduleSpec, attempts: list[TrialAttempt],
                      data_root: Path | None) -> dict[str, Any] | None:
    """The schedule to the lowest loss the first proxy size reached (GET /schedule plans to any other target)."""
    losses = [a.value for a in attempts if a.state == TrialState.complete and a.value is not None and a.params
              and shape_schedule.RUN_KEY not in a.params and int(a.params["size_index"]) == 0]
    assert spec.dataset is not None
    if not losses:
        return None
    try:
        planned = shape_schedule.plan(spec, attempts, shape_schedule.ScheduleQuery(target_loss=min(losses)),
                                      dataset_spec(spec.dataset.name, spec.dataset.args, data_root))
    except ValueError:
        return None
    schedule = planned.report.schedule
    return {"kind": "shape_schedule", "target_loss": schedule.target_loss,
            "shapes": [segment.shape for segment in schedule.segments], "adaptive_flops": schedule.adaptive_flops,
            "static_shape": schedule.static_shape, "static_flops": schedule.static_flops, "saving": schedule.saving,
            "saving_interval": planned.report.saving.to_dict(), "low_confidence": planned.report.low_confidence}


def _compute(session: Session, study: Study, data_root: Path | None) -> dict[str, Any] | None:
    try:
        spec = resolve_source(session, STUDY_SPEC.validate_python(study.spec), study.tenant)
    except SourceError:
        return None
    attempts = list(session.scalars(select(TrialAttempt).where(TrialAttempt.study_id == study.id)))
    if isinstance(spec, TransferCheckSpec):
        return _check_verdict(spec, attempts)
    return _schedule_summary(spec, attempts, data_root)


def finished_result(session: Session, study: Study, data_root: Path | None) -> dict[str, Any] | None:
    """The verdict or summary of a completed grid study; None for tune studies and unfinished ones.

    Kept per study after the first call: once a study has completed its grid trials never change (schedule
    runs, which may come later, are not part of it), and nor does its completed source study.
    """
    if study.status != StudyStatus.completed or study.kind == "tune":
        return None
    with _lock:
        if study.id in _cache:
            _cache.move_to_end(study.id)
            return _cache[study.id]
    result = _compute(session, study, data_root)
    with _lock:
        _cache[study.id] = result
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return result
