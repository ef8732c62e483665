"""/v1/studies: create, list, inspect, cancel studies and read their trials."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, status

from service.api.schemas import (Problem, StudyCreated, StudyDetail, StudyPage, StudySummary, TrialOut,
                                 TrialPage, study_links)
from service.api.state import ServiceState, service_state
from service.dispatch import dispatch
from service.models import StudyStatus, TrialState
from service.spec import StudySpec, check_spec
from service.studies import StudyAlreadyFinished, StudyNotFound, cancel_study, create_study, get_study, \
    list_studies, trial_counts
from service.trials import get_trial, list_trials

router = APIRouter(prefix="/v1/studies", tags=["studies"])
State = Annotated[ServiceState, Depends(service_state)]
NOT_FOUND = {404: {"model": Problem, "description": "no study with this id"}}


def _not_found(study_id: str) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, f"no study with id {study_id}")


@router.post("", status_code=status.HTTP_201_CREATED, response_model=StudyCreated,
             summary="Submit a study; its first trials are queued at once")
def post_study(spec: StudySpec, state: State) -> StudyCreated:
    check_spec(spec, state.settings)
    study = create_study(state.session_factory, state.storage, spec)
    dispatch(state.session_factory, study.id, state.enqueue)
    return StudyCreated(id=study.id, status=study.status, links=study_links(study.id))


@router.get("", response_model=StudyPage, summary="List studies, newest first")
def get_studies(state: State, status_: Annotated[StudyStatus | None, Query(alias="status")] = None,
                limit: Annotated[int, Query(ge=1, le=500)] = 50,
                offset: Annotated[int, Query(ge=0)] = 0) -> StudyPage:
    with state.session_factory() as session:
        rows, total = list_studies(session, status=status_, limit=limit, offset=offset)
        return StudyPage(items=[StudySummary.of(s) for s in rows], total=total, limit=limit, offset=offset)


@router.get("/{study_id}", response_model=StudyDetail, responses=NOT_FOUND,
            summary="A study: spec, status, trial counts by state, best value and params")
def get_one_study(study_id: str, state: State) -> StudyDetail:
    with state.session_factory() as session:
        try:
            study = get_study(session, study_id)
        except StudyNotFound:
            raise _not_found(study_id) from None
        return StudyDetail.of(study, trial_counts(session, study_id))


@router.get("/{study_id}/trials", response_model=TrialPage, responses=NOT_FOUND,
            summary="A study's trial attempts in the order they were queued")
def get_trials(study_id: str, state: State, state_: Annotated[TrialState | None, Query(alias="state")] = None,
               limit: Annotated[int, Query(ge=1, le=1000)] = 100,
               offset: Annotated[int, Query(ge=0)] = 0) -> TrialPage:
    with state.session_factory() as session:
        try:
            get_study(session, study_id)
        except StudyNotFound:
            raise _not_found(study_id) from None
        rows, total = list_trials(session, study_id, limit=limit, offset=offset, state=state_)
        return TrialPage(items=[TrialOut.of(t) for t in rows], total=total, limit=limit, offset=offset)


@router.get("/{study_id}/trials/{number}", response_model=TrialOut,
            responses={404: {"model": Problem, "description": "no such study or trial number"}},
            summary="One trial by its Optuna trial number")
def get_one_trial(study_id: str, number: int, state: State) -> TrialOut:
    with state.session_factory() as session:
        try:
            get_study(session, study_id)
        except StudyNotFound:
            raise _not_found(study_id) from None
        trial = get_trial(session, study_id, number)
        if trial is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"study {study_id} has no trial number {number}")
        return TrialOut.of(trial)


@router.post("/{study_id}/cancel", response_model=StudyCreated,
             responses={**NOT_FOUND, 409: {"model": Problem, "description": "the study has already finished"}},
             summary="Cancel: nothing new starts; running trials stop at their next eval")
def post_cancel(study_id: str, state: State) -> StudyCreated:
    try:
        study = cancel_study(state.session_factory, study_id)
    except StudyNotFound:
        raise _not_found(study_id) from None
    except StudyAlreadyFinished as error:
        raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from None
    return StudyCreated(id=study.id, status=study.status, links=study_links(study.id))
