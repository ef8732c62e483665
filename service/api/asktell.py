"""Ask/tell for external studies: the user's own code asks for a trial, reports, and tells how it ended.

    POST /v1/studies/{id}/trials/ask                 201 a trial under a lease; 409 finished/cancelled; 429 all out
    POST /v1/studies/{id}/trials/{number}/report     200 {"should_prune"}; renews the lease
    POST /v1/studies/{id}/trials/{number}/heartbeat  200 renews the lease (an agent, while the user's command runs)
    POST /v1/studies/{id}/trials/{number}/tell       200 the trial as recorded; the same answer when told again
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Header, HTTPException, Path, status
from pydantic import BaseModel, Field

from service.api.auth import UNAUTHORIZED, CurrentPrincipal
from service.api.schemas import Problem, TrialOut
from service.api.state import ServiceState, service_state
from service.leases import AllTrialsOut, NotAskable, StudyClosed, TrialEnded, TrialNotFound, ask, renew, report, tell
from service.spec import ShapeSpec, Strict
from service.studies import StudyNotFound

router = APIRouter(prefix="/v1/studies", tags=["ask/tell"], responses=UNAUTHORIZED)
State = Annotated[ServiceState, Depends(service_state)]
Number = Annotated[int, Path(ge=0, le=2**31 - 1, description="the trial number the ask answered")]
FiniteOrNull = Annotated[float | None, Field(allow_inf_nan=False)]
AskKey = Annotated[str | None, Header(
    alias="Idempotency-Key", min_length=1, max_length=200,
    description="retrying an ask with the same key answers the trial the first one handed out (while it runs) "
                "instead of a second one")]
TRIAL_CONFLICT = {404: {"model": Problem, "description": "no such study or trial number"},
                  409: {"model": Problem, "description": "not an external study, or the trial has ended (its lease "
                                                         "ran out, or it was told)"}}


class AskRequest(Strict):
    worker: str | None = Field(None, max_length=200, description="who runs the trial (shown with it), e.g. host:pid")


class AskedTrial(BaseModel):
    """A trial to run: its params (base units) and how to build the model (``Trial.build`` in the client library)."""

    number: int = Field(description="use it to report and tell")
    attempt_id: str
    params: dict[str, Any] = Field(description="sampled values, in base units")
    lease_seconds: int = Field(description="report, renew or tell within this many seconds, or the trial is failed "
                                           "and handed out again")
    lease_expires_at: datetime
    parametrization: str
    optimizer: str
    base: ShapeSpec | None = Field(description="the shape the values are expressed in (null: the spec gave no model)")
    proxy: ShapeSpec | None = Field(description="the shape to build the model at (null: the spec gave no model)")
    options: dict[str, Any] = Field(description="the study's parametrization_options")


class ReportRequest(Strict):
    step: int = Field(ge=0, le=2**62)
    value: FiniteOrNull = Field(description="the objective at this step; null when it is not finite (NaN/inf)")


class ReportAnswer(BaseModel):
    should_prune: bool = Field(description="stop this trial and tell it pruned (also true once the study is "
                                           "cancelled)")


class LeaseAnswer(BaseModel):
    lease_expires_at: datetime


class TellRequest(Strict):
    state: Literal["complete", "pruned", "failed"]
    value: FiniteOrNull = Field(None, description="the final objective; complete with null means the trial diverged "
                                                  "(its value was not finite)")
    reason: str | None = Field(None, max_length=4000, description="why a failed trial failed (e.g. an error's tail)")


@contextmanager
def _answers() -> Iterator[None]:
    """The ask/tell errors as the 4xx a person (or an agent) can act on."""
    try:
        yield
    except (StudyNotFound, TrialNotFound) as error:
        message = f"no study with id {error}" if isinstance(error, StudyNotFound) else str(error)
        raise HTTPException(status.HTTP_404_NOT_FOUND, message) from None
    except (NotAskable, StudyClosed, TrialEnded) as error:
        raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from None
    except AllTrialsOut as error:
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, str(error),
                            headers={"Retry-After": str(error.retry_after)}) from None


@router.post("/{study_id}/trials/ask", status_code=status.HTTP_201_CREATED, response_model=AskedTrial,
             responses={404: {"model": Problem, "description": "no study with this id"},
                        409: {"model": Problem, "description": "not an external study, or it has finished or was "
                                                               "cancelled: nothing is left to ask"},
                        429: {"model": Problem, "description": "parallelism trials are out; ask again after "
                                                               "Retry-After seconds"}},
             summary="Ask for the next trial of an external study (a retried trial's params first)")
def post_ask(study_id: str, state: State, principal: CurrentPrincipal,
             body: Annotated[AskRequest | None, Body()] = None, idempotency_key: AskKey = None) -> AskedTrial:
    with _answers():
        asked = ask(state.session_factory, state.storage, study_id, principal.tenant_scope,
                    body.worker if body else None, state.settings.MAX_RETRIES, key=idempotency_key)
    spec, attempt = asked.spec, asked.attempt
    assert attempt.number is not None and attempt.params is not None and attempt.lease_expires_at is not None
    return AskedTrial(number=attempt.number, attempt_id=attempt.id, params=attempt.params,
                      lease_seconds=spec.lease_seconds, lease_expires_at=attempt.lease_expires_at,
                      parametrization=spec.parametrization, optimizer=spec.optimizer,
                      base=spec.model.base if spec.model else None, proxy=spec.model.proxy if spec.model else None,
                      options=asdict(spec.parametrization_options))


@router.post("/{study_id}/trials/{number}/report", response_model=ReportAnswer, responses=TRIAL_CONFLICT,
             summary="Report an intermediate value; renews the lease and says whether to prune")
def post_report(study_id: str, number: Number, body: ReportRequest, state: State,
                principal: CurrentPrincipal) -> ReportAnswer:
    with _answers():
        prune = report(state.session_factory, state.storage, study_id, number, principal.tenant_scope, body.step,
                       body.value, state.settings.MAX_RETRIES)
    return ReportAnswer(should_prune=prune)


@router.post("/{study_id}/trials/{number}/heartbeat", response_model=LeaseAnswer, responses=TRIAL_CONFLICT,
             summary="Renew a trial's lease without reporting (what `scaletune agent` does while your command runs)")
def post_heartbeat(study_id: str, number: Number, state: State, principal: CurrentPrincipal) -> LeaseAnswer:
    with _answers():
        attempt = renew(state.session_factory, state.storage, study_id, number, principal.tenant_scope,
                        state.settings.MAX_RETRIES)
    assert attempt.lease_expires_at is not None
    return LeaseAnswer(lease_expires_at=attempt.lease_expires_at)


@router.post("/{study_id}/trials/{number}/tell", response_model=TrialOut, responses=TRIAL_CONFLICT,
             summary="Tell how a trial ended; telling again changes nothing and gives the same answer")
def post_tell(study_id: str, number: Number, body: TellRequest, state: State,
              principal: CurrentPrincipal) -> TrialOut:
    with _answers():
        attempt = tell(state.session_factory, state.storage, state.enqueue, study_id, number,
                       principal.tenant_scope, body.state, body.value, body.reason, state.settings.MAX_RETRIES)
    return TrialOut.of(attempt)
