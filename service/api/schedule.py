"""GET /v1/studies/{id}/schedule: per-shape scaling fits of a shape_schedule study and the adaptive schedule."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, status
from sqlalchemy import select

from scaletune.data.registry import dataset_spec
from service.api.schemas import Problem
from service.api.state import ServiceState, service_state
from service.kinds import shape_schedule
from service.kinds.setup import SourceError, resolve_source
from service.models import TrialAttempt
from service.spec import STUDY_SPEC, ShapeScheduleSpec
from service.studies import StudyNotFound, get_study

router = APIRouter(prefix="/v1/studies", tags=["shape schedule"])
State = Annotated[ServiceState, Depends(service_state)]


def _unprocessable(msg: str, name: str) -> HTTPException:
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, [{"type": "value_error", "loc": ["query", name],
                                                                  "msg": msg}])


def _query(target_loss: float | None, budget_flops: float | None, target_width: int | None,
           target_depth: int | None, axis: str) -> shape_schedule.ScheduleQuery:
    if (target_loss is None) == (budget_flops is None):
        raise _unprocessable("give exactly one of target_loss (compute to reach it) or budget_flops (loss at it)",
                             "target_loss")
    if axis in ("width", "depth") and {"width": target_width, "depth": target_depth}[axis] is not None:
        raise _unprocessable(f"the schedule moves along {axis}; the target's {axis} is the schedule's to choose",
                             f"target_{axis}")
    return shape_schedule.ScheduleQuery(target_loss, budget_flops, target_width, target_depth)


@router.get("/{study_id}/schedule",
            responses={404: {"model": Problem, "description": "no study with this id"},
                       409: {"model": Problem, "description": "not a shape_schedule study, or too few runs yet"}},
            summary="Fits per shape, the adaptive shape schedule, its predicted saving and the projection tier")
def get_schedule(study_id: str, state: State,
                 target_loss: Annotated[float | None, Query(gt=0)] = None,
                 budget_flops: Annotated[float | None, Query(gt=0)] = None,
                 target_width: Annotated[int | None, Query(ge=1, le=1_000_000)] = None,
                 target_depth: Annotated[int | None, Query(ge=1, le=100_000)] = None) -> dict[str, Any]:
    with state.session_factory() as session:
        try:
            study = get_study(session, study_id)
        except StudyNotFound:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no study with id {study_id}") from None
        spec = STUDY_SPEC.validate_python(study.spec)
        if not isinstance(spec, ShapeScheduleSpec):
            raise HTTPException(status.HTTP_409_CONFLICT, f"study {study_id} is a {study.kind} study, "
                                                          "not a shape_schedule")
        try:
            spec = resolve_source(session, spec, study.tenant)
        except SourceError as error:
            raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from None
        attempts = list(session.scalars(select(TrialAttempt).where(TrialAttempt.study_id == study_id)))
        study_status = study.status
    query = _query(target_loss, budget_flops, target_width, target_depth, spec.axis)
    assert spec.dataset is not None
    data = dataset_spec(spec.dataset.name, spec.dataset.args, state.settings.DATA_ROOT)
    try:
        result = shape_schedule.schedule(spec, attempts, query, data)
    except shape_schedule.NotEnoughRuns as error:
        raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from None
    except ValueError as error:
        raise _unprocessable(str(error), "target_loss" if target_loss is not None else "budget_flops") from None
    return {"study_id": study_id, "status": study_status, "final": study_status == "completed", **result}
