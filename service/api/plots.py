"""GET /v1/studies/{id}/plots/{kind}.png and .json: a study's plots rendered server-side, and their data.

Each study kind lists the plots it serves (``StudyKind.plots``). Endpoints are plain ``def``: FastAPI runs them
in its thread pool, so fitting, rendering and a first coordinate check do not block the event loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, status
from fastapi.responses import Response

from service.api.auth import UNAUTHORIZED, CurrentPrincipal
from service.api.state import ServiceState, service_state
from service.kinds.registry import KINDS, kind_of, spec_of
from service.plots import NoPlotData, Plot, PlotInput
from service.studies import StudyNotFound, get_study
from service.tokens import Principal
from service.trials import list_trials

router = APIRouter(prefix="/v1/studies", tags=["plots"], responses=UNAUTHORIZED)
State = Annotated[ServiceState, Depends(service_state)]
MAX_PLOTTED_TRIALS = 10_000
RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such study or plot kind, a plot of another study kind, or no data for it yet"}}
OWNER = {plot: " and ".join(name for name, kind in KINDS.items() if plot in kind.plots)  # plot -> the kinds with it
         for kind in KINDS.values() for plot in kind.plots}
PLOTS = ", ".join(OWNER)


@contextmanager
def _not_found() -> Iterator[None]:
    try:
        yield
    except NoPlotData as error:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(error)) from None


def _load(state: ServiceState, principal: Principal, study_id: str, name: str) -> tuple[Plot, PlotInput]:
    """The plot of this study's kind and what it is computed from; 404 naming what exists otherwise."""
    if name not in OWNER:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"there is no plot kind {name!r}; available: {PLOTS}.")
    with state.read_sessions() as session:
        try:
            study = get_study(session, study_id, principal.tenant_scope)
        except StudyNotFound:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no study with id {study_id}") from None
        plots = kind_of(study).plots
        if name not in plots:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"study {study.id} is a {study.kind} study; the {name} "
                                                           f"plot is for {OWNER[name]} studies only (a {study.kind} "
                                                           f"study has: {', '.join(plots)}).")
        attempts, _, _ = list_trials(session, study_id, limit=MAX_PLOTTED_TRIALS)
    return plots[name], PlotInput(study, spec_of(study), attempts, state.storage, state.settings)


@router.get("/{study_id}/plots/{kind}.png", response_class=Response, responses={
    **RESPONSES, 200: {"content": {"image/png": {}}}},
    summary=f"A study plot as PNG ({PLOTS}; each for one study kind)")
def get_plot_png(study_id: str, kind: str, state: State, principal: CurrentPrincipal) -> Response:
    plot, given = _load(state, principal, study_id, kind)
    with _not_found():
        body = plot.png(given)
    return Response(body, media_type="image/png", headers={"Cache-Control": "no-store"})


@router.get("/{study_id}/plots/{kind}.json", responses=RESPONSES, summary="The data behind a study plot")
def get_plot_json(study_id: str, kind: str, state: State, principal: CurrentPrincipal) -> dict[str, Any]:
    plot, given = _load(state, principal, study_id, kind)
    with _not_found():
        return plot.data(given)
