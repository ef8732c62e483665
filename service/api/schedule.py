"""/v1/studies/{id}/schedule: a shape_schedule study's per-shape fits, its adaptive schedule, and runs of it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, status
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from scaletune.data.registry import dataset_spec
from service.api.auth import UNAUTHORIZED, CurrentPrincipal
from service.api.lookup import study_of_kind
from service.api.problems import InvalidField
from service.api.schemas import Problem
from service.api.state import ServiceState, service_state
from service.db import write_session
from service.dispatch import send_all
from service.kinds import schedule_run, schedule_training, shape_schedule
from service.models import StudyStatus, TrialAttempt, TrialState, new_id
from service.spec import ResolvedShapeSchedule
from service.tokens import Principal

router = APIRouter(prefix="/v1/studies", tags=["shape schedule"], responses=UNAUTHORIZED)
State = Annotated[ServiceState, Depends(service_state)]
NOT_A_SCHEDULE = {404: {"model": Problem, "description": "no study with this id"},
                  409: {"model": Problem, "description": "not a shape_schedule study, or too few runs yet"}}


def _unprocessable(msg: str, name: str, where: str = "query") -> InvalidField:
    return InvalidField((where, name), msg)


def _query(target_loss: float | None, budget_flops: float | None, target_width: int | None,
           target_depth: int | None, axes: list[str], where: str = "query") -> shape_schedule.ScheduleQuery:
    if (target_loss is None) == (budget_flops is None):
        raise _unprocessable("give exactly one of target_loss (compute to reach it) or budget_flops (loss at it)",
                             "target_loss", where)
    for axis in axes:
        if axis in ("width", "depth") and {"width": target_width, "depth": target_depth}[axis] is not None:
            raise _unprocessable(f"the schedule moves along {axis}; the target's {axis} is the schedule's to choose",
                                 f"target_{axis}", where)
    return shape_schedule.ScheduleQuery(target_loss, budget_flops, target_width, target_depth)


@dataclass(frozen=True)
class _Loaded:
    spec: ResolvedShapeSchedule
    attempts: list[TrialAttempt]
    status: str


def _load(state: ServiceState, principal: Principal, study_id: str) -> _Loaded:
    """The study's resolved spec and attempts; 404 for another tenant's study, 409 for another kind."""
    with state.session_factory() as session:
        study, spec = study_of_kind(session, study_id, principal, shape_schedule.KIND,
                                    "this needs a shape_schedule study")
        attempts = list(session.scalars(select(TrialAttempt).where(TrialAttempt.study_id == study_id)))
        return _Loaded(spec, attempts, study.status)


def _plan(state: ServiceState, loaded: _Loaded, query: shape_schedule.ScheduleQuery,
          where: str = "query") -> shape_schedule.Plan:
    data = dataset_spec(loaded.spec.dataset.name, loaded.spec.dataset.args, state.settings.DATA_ROOT)
    try:
        return shape_schedule.plan(loaded.spec, loaded.attempts, query, data)
    except shape_schedule.NotEnoughRuns as error:
        raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from None
    except ValueError as error:
        raise _unprocessable(str(error), "target_loss" if query.target_loss is not None else "budget_flops",
                             where) from None


@router.get("/{study_id}/schedule", responses=NOT_A_SCHEDULE,
            summary="Fits per shape, the adaptive shape schedule, its predicted saving, the projection tier, and "
                    "the schedule runs with their realised FLOPs")
def get_schedule(study_id: str, state: State, principal: CurrentPrincipal,
                 target_loss: Annotated[float | None, Query(gt=0)] = None,
                 budget_flops: Annotated[float | None, Query(gt=0)] = None,
                 target_width: Annotated[int | None, Query(ge=1, le=1_000_000)] = None,
                 target_depth: Annotated[int | None, Query(ge=1, le=100_000)] = None) -> dict[str, Any]:
    loaded = _load(state, principal, study_id)
    query = _query(target_loss, budget_flops, target_width, target_depth, loaded.spec.axes())
    result = shape_schedule.describe(_plan(state, loaded, query), loaded.spec.axes())
    return {"study_id": study_id, "status": loaded.status, "final": loaded.status == StudyStatus.completed, **result,
            "runs": schedule_run.runs(loaded.attempts)}


class ScheduleRunRequest(BaseModel):
    """Which schedule to run (the same query as GET /schedule, on the proxies) and the run's data seed."""

    model_config = ConfigDict(extra="forbid")
    target_loss: float | None = Field(None, gt=0, description="plan the cheapest schedule to this eval loss")
    budget_flops: float | None = Field(None, gt=0, description="plan the lowest loss at this many training FLOPs")
    seed: int = Field(0, ge=0, le=1_000_000)


@router.post("/{study_id}/schedule/run", status_code=status.HTTP_202_ACCEPTED,
             responses={**NOT_A_SCHEDULE, 409: {"model": Problem, "description": "not a completed shape_schedule "
                                                                                  "study"}},
             summary="Queue one trial that executes the planned schedule and measures its FLOPs to the target loss")
def post_schedule_run(study_id: str, body: ScheduleRunRequest, state: State,
                      principal: CurrentPrincipal) -> dict[str, Any]:
    loaded = _load(state, principal, study_id)
    if loaded.status != StudyStatus.completed:
        raise HTTPException(status.HTTP_409_CONFLICT, f"study {study_id} is {loaded.status}; a schedule can run "
                                                      "once every grid trial has finished and the study completed")
    query = _query(body.target_loss, body.budget_flops, None, None, loaded.spec.axes(), where="body")
    run_id = new_id()
    params = schedule_run.run_params(loaded.spec, _plan(state, loaded, query, where="body"), query, body.seed,
                                     run_id)
    data = dataset_spec(loaded.spec.dataset.name, loaded.spec.dataset.args, state.settings.DATA_ROOT)
    steps = schedule_training.step_ends(schedule_training.run_config(loaded.spec, params),
                                        schedule_training.phases_of(params), data)[-1]
    if steps > state.settings.MAX_STEPS:
        raise _unprocessable(f"the planned schedule needs {steps} training steps, above this server's limit of "
                             f"{state.settings.MAX_STEPS}; ask for a higher target loss or a smaller budget",
                             "target_loss" if query.target_loss is not None else "budget_flops", "body")
    attempt = TrialAttempt(id=run_id, study_id=study_id, state=TrialState.queued, params=params, intermediate=[])
    with write_session(state.session_factory) as session:
        session.add(attempt)
    send_all(state.enqueue, [run_id], loaded.spec.queue)
    return {"study_id": study_id, "run": {**schedule_run.runs([attempt])[0], "phases": params["phases"],
                                          "steps": steps},
            "links": {"schedule": f"/v1/studies/{study_id}/schedule", "trials": f"/v1/studies/{study_id}/trials"}}
