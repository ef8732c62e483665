"""GET /v1/studies/{id}/plots/{kind}.png and .json: a study's plots rendered server-side, and their data.

Endpoints are plain ``def``: FastAPI runs them in its thread pool, so fitting, rendering and a first
coordinate check do not block the event loop.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, status
from fastapi.responses import Response

from service.api.state import ServiceState, service_state
from service.auth import UNAUTHORIZED, CurrentPrincipal, Principal
from service.coord_plot import CoordCheckFiles, coord_check_files
from service.kinds.setup import SourceError, resolve_source
from service.models import Study, TrialAttempt
from service.plots import NoPlotData, PlotKind, plot_data, render_png, require_applies
from service.spec import STUDY_SPEC, ShapeScheduleSpec, StudySpec, TransferCheckSpec, TuneSpec
from service.studies import StudyNotFound, get_study
from service.trials import list_trials

router = APIRouter(prefix="/v1/studies", tags=["plots"], responses=UNAUTHORIZED)
State = Annotated[ServiceState, Depends(service_state)]
MAX_PLOTTED_TRIALS = 10_000
RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such study or plot kind, a plot of another study kind, or no data for it yet"}}
KINDS = ", ".join(PlotKind)


@contextmanager
def _not_found() -> Iterator[None]:
    try:
        yield
    except NoPlotData as error:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(error)) from None


@dataclass(frozen=True)
class _Loaded:
    kind: PlotKind
    study: Study
    spec: StudySpec  # a grid study's with its setup taken from its source study
    attempts: list[TrialAttempt]


def _load(state: ServiceState, principal: Principal, study_id: str, kind: str) -> _Loaded:
    try:
        plot_kind = PlotKind(kind)
    except ValueError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"there is no plot kind {kind!r}; available: {KINDS}.") from None
    with state.session_factory() as session:
        try:
            study = get_study(session, study_id, principal.tenant_scope)
        except StudyNotFound:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no study with id {study_id}") from None
        with _not_found():
            require_applies(plot_kind, study)
        spec = STUDY_SPEC.validate_python(study.spec)
        if isinstance(spec, TransferCheckSpec | ShapeScheduleSpec):
            try:
                spec = resolve_source(session, spec, study.tenant)
            except SourceError as error:
                raise HTTPException(status.HTTP_404_NOT_FOUND, str(error)) from None
        attempts, _ = list_trials(session, study_id, limit=MAX_PLOTTED_TRIALS)
    return _Loaded(plot_kind, study, spec, attempts)


def _coord_check(state: ServiceState, loaded: _Loaded) -> CoordCheckFiles:
    assert isinstance(loaded.spec, TuneSpec) and state.settings.ARTIFACTS_DIR is not None
    return coord_check_files(state.settings.ARTIFACTS_DIR, loaded.study.id, loaded.spec, state.settings.DATA_ROOT,
                             state.settings.MAX_PROXY_PARAMS)


def _data(state: ServiceState, loaded: _Loaded) -> dict[str, Any]:
    return plot_data(loaded.kind, loaded.study, loaded.spec, loaded.attempts, state.storage, state.settings.DATA_ROOT)


@router.get("/{study_id}/plots/{kind}.png", response_class=Response, responses={
    **RESPONSES, 200: {"content": {"image/png": {}}}},
    summary=f"A study plot as PNG ({KINDS}; each for one study kind)")
def get_plot_png(study_id: str, kind: str, state: State, principal: CurrentPrincipal) -> Response:
    loaded = _load(state, principal, study_id, kind)
    with _not_found():
        if loaded.kind == PlotKind.coord_check:
            body = _coord_check(state, loaded).png.read_bytes()
        else:
            body = render_png(loaded.kind, _data(state, loaded))
    return Response(body, media_type="image/png", headers={"Cache-Control": "no-store"})


@router.get("/{study_id}/plots/{kind}.json", responses=RESPONSES, summary="The data behind a study plot")
def get_plot_json(study_id: str, kind: str, state: State, principal: CurrentPrincipal) -> dict[str, Any]:
    loaded = _load(state, principal, study_id, kind)
    with _not_found():
        if loaded.kind == PlotKind.coord_check:
            return dict(json.loads(_coord_check(state, loaded).json.read_text()))
        return _data(state, loaded)
