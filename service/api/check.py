"""GET /v1/studies/{id}/check and /check.png: the analysis of a transfer_check study, as JSON and as a plot."""

from __future__ import annotations

import io
import math
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, status
from fastapi.responses import Response
from sqlalchemy import select

from scaletune.transfer_check import TransferCheckResult, draw
from service.api.lookup import study_of_kind
from service.api.schemas import Problem
from service.api.state import ServiceState, service_state
from service.auth import UNAUTHORIZED, CurrentPrincipal, Principal
from service.kinds import transfer_check
from service.models import TrialAttempt
from service.spec import TransferCheckSpec

router = APIRouter(prefix="/v1/studies", tags=["transfer check"], responses=UNAUTHORIZED)
State = Annotated[ServiceState, Depends(service_state)]
RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"model": Problem, "description": "no study with this id"},
    409: {"model": Problem, "description": "not a transfer_check study, or fewer than two sizes have results"}}


def _analysed(state: ServiceState, principal: Principal, study_id: str) -> tuple[TransferCheckSpec, list[TrialAttempt], str,
                                                            TransferCheckResult]:
    with state.session_factory() as session:
        study, spec = study_of_kind(session, study_id, principal, transfer_check.KIND,
                                    "this needs a transfer_check study")
        attempts = list(session.scalars(select(TrialAttempt).where(TrialAttempt.study_id == study_id)
                                        .order_by(TrialAttempt.number)))
        study_status = study.status
    try:
        result = transfer_check.check(spec, attempts)
    except ValueError as error:
        raise HTTPException(status.HTTP_409_CONFLICT, f"not enough finished trials yet: {error}") from None
    return spec, attempts, study_status, result


def _point(spec: TransferCheckSpec, attempt: TrialAttempt) -> dict[str, Any]:
    params = attempt.params or {}
    shape = spec.sizes[int(params["size_index"])].model_dump(exclude_none=True) if params else None
    log2_lr = (math.log2(transfer_check.tuned_lr(spec)) + float(params["log2_lr_mult"])) if params else None
    return {"number": attempt.number, "attempt": attempt.attempt, "state": attempt.state, "shape": shape,
            "seed": params.get("seed"), "log2_lr_mult": params.get("log2_lr_mult"), "log2_lr": log2_lr,
            "lr": None if log2_lr is None else 2.0 ** log2_lr, "loss": attempt.value,
            "diverged": attempt.state == "diverged"}


@router.get("/{study_id}/check", responses=RESPONSES,
            summary="Transfer check: optimum log2 LR per size with a seed bootstrap, drift, verdict, raw points")
def get_check(study_id: str, state: State, principal: CurrentPrincipal) -> dict[str, Any]:
    spec, attempts, study_status, result = _analysed(state, principal, study_id)
    return {"study_id": study_id, "status": study_status, "final": study_status == "completed",
            "tuned_lr": transfer_check.tuned_lr(spec), **result.to_dict(),
            "points": [_point(spec, a) for a in attempts]}


@router.get("/{study_id}/check.png", responses={**RESPONSES, 200: {"content": {"image/png": {}}}},
            response_class=Response, summary="Transfer check: loss vs LR per size (x = diverged)")
def get_check_png(study_id: str, state: State, principal: CurrentPrincipal) -> Response:
    from matplotlib.figure import Figure

    _, _, study_status, result = _analysed(state, principal, study_id)
    fig = Figure(figsize=(6.4, 4.4), dpi=100)
    suffix = "" if study_status == "completed" else f" (study {study_status}, partial)"
    draw(result, fig.add_subplot(), title=f"transfer check: {result.verdict}{suffix}")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return Response(buffer.getvalue(), media_type="image/png")
