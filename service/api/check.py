"""GET /v1/studies/{id}/check and /check.png: the analysis of a transfer_check study, as JSON and as a plot.

/check.png is the study's landscape plot (the same picture as /plots/landscape.png).
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, status
from fastapi.responses import Response
from sqlalchemy import select

from service.api.auth import UNAUTHORIZED, CurrentPrincipal
from service.api.lookup import study_of_kind
from service.api.schemas import Problem
from service.api.state import ServiceState, service_state
from service.kinds import transfer_check
from service.models import TrialAttempt
from service.plots import NoPlotData, PlotInput
from service.spec import TransferCheckSpec
from service.tokens import Principal

router = APIRouter(prefix="/v1/studies", tags=["transfer check"], responses=UNAUTHORIZED)
State = Annotated[ServiceState, Depends(service_state)]
RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"model": Problem, "description": "no study with this id"},
    409: {"model": Problem, "description": "not a transfer_check study, or fewer than two sizes have results"}}


def _loaded(state: ServiceState, principal: Principal, study_id: str) -> PlotInput:
    """The study, its spec and its attempts in trial-number order; 404/409 for another tenant's or kind's study."""
    with state.read_sessions() as session:
        study, spec = study_of_kind(session, study_id, principal, transfer_check.KIND,
                                    "this needs a transfer_check study")
        attempts = list(session.scalars(select(TrialAttempt).where(TrialAttempt.study_id == study_id)
                                        .order_by(TrialAttempt.number)))
    return PlotInput(study, spec, attempts, state.storage, state.settings)


def _point(spec: TransferCheckSpec, attempt: TrialAttempt) -> dict[str, Any]:
    params = attempt.params or {}
    shape = spec.sizes[int(params["size_index"])].model_dump(exclude_none=True) if params else None
    log2_value = (math.log2(transfer_check.tuned_value(spec)) + float(params["log2_mult"])) if params else None
    return {"number": attempt.number, "attempt": attempt.attempt, "state": attempt.state, "shape": shape,
            "seed": params.get("seed"), "log2_mult": params.get("log2_mult"), "log2_value": log2_value,
            "value": None if log2_value is None else 2.0 ** log2_value, "loss": attempt.value,
            "diverged": attempt.state == "diverged"}


@router.get("/{study_id}/check", responses=RESPONSES,
            summary="Transfer check: optimum log2 value (of spec.hparam, the LR by default) per size with a seed "
                    "bootstrap, drift with its interval, verdict, raw points")
def get_check(study_id: str, state: State, principal: CurrentPrincipal) -> dict[str, Any]:
    loaded = _loaded(state, principal, study_id)
    try:
        result = transfer_check.check(loaded.spec, loaded.attempts)
    except ValueError as error:
        raise HTTPException(status.HTTP_409_CONFLICT, f"not enough finished trials yet: {error}") from None
    return {"study_id": study_id, "status": loaded.study.status, "final": loaded.study.status == "completed",
            "tuned_value": transfer_check.tuned_value(loaded.spec),
            "extensions": [e.model_dump() for e in loaded.spec.extensions], **result.to_dict(),
            "points": [_point(loaded.spec, a) for a in loaded.attempts]}


@router.get("/{study_id}/check.png", responses={**RESPONSES, 200: {"content": {"image/png": {}}}},
            response_class=Response, summary="Transfer check: loss vs the checked value per size (x = diverged)")
def get_check_png(study_id: str, state: State, principal: CurrentPrincipal) -> Response:
    try:
        body = transfer_check.LANDSCAPE.png(_loaded(state, principal, study_id))
    except NoPlotData as error:
        raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from None
    return Response(body, media_type="image/png")
