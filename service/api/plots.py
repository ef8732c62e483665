"""GET /v1/studies/{id}/plots/{kind}.png and .json: a study's plots rendered server-side, and their data."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, status
from fastapi.responses import Response

from service.api.state import ServiceState, service_state
from service.auth import UNAUTHORIZED, CurrentPrincipal, Principal
from service.plots import NoPlotData, PlotKind, plot_data, render_png
from service.studies import StudyNotFound, get_study
from service.trials import list_trials

router = APIRouter(prefix="/v1/studies", tags=["plots"], responses=UNAUTHORIZED)
State = Annotated[ServiceState, Depends(service_state)]
MAX_PLOTTED_TRIALS = 10_000
RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such study or plot kind, or the study has no data for this plot yet"}}


def _data(state: ServiceState, principal: Principal, study_id: str, kind: str) -> tuple[PlotKind, dict[str, Any]]:
    try:
        plot_kind = PlotKind(kind)
    except ValueError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"there is no plot kind {kind!r}; available: "
                                                       f"{', '.join(PlotKind)}.") from None
    with state.session_factory() as session:
        try:
            study = get_study(session, study_id, principal.tenant_scope)
        except StudyNotFound:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no study with id {study_id}") from None
        attempts, _ = list_trials(session, study_id, limit=MAX_PLOTTED_TRIALS)
    try:
        return plot_kind, plot_data(plot_kind, study, attempts, state.storage)
    except NoPlotData as error:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(error)) from None


@router.get("/{study_id}/plots/{kind}.png", response_class=Response, responses={
    **RESPONSES, 200: {"content": {"image/png": {}}}}, summary="A study plot as PNG (history, intermediate, importance)")
def get_plot_png(study_id: str, kind: str, state: State, principal: CurrentPrincipal) -> Response:
    plot_kind, data = _data(state, principal, study_id, kind)
    return Response(render_png(plot_kind, data), media_type="image/png", headers={"Cache-Control": "no-store"})


@router.get("/{study_id}/plots/{kind}.json", responses=RESPONSES, summary="The data behind a study plot")
def get_plot_json(study_id: str, kind: str, state: State, principal: CurrentPrincipal) -> dict[str, Any]:
    return _data(state, principal, study_id, kind)[1]
