"""/v1/studies: create, list, inspect, cancel studies and read their trials."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Path, Query, Response, status
from sqlalchemy.exc import IntegrityError

from service.api.auth import UNAUTHORIZED, CurrentPrincipal
from service.api.problems import InvalidField
from service.api.schemas import (STUDY_SUMMARY_COLUMNS, Problem, StudyCreated, StudyDetail,
                                 StudyPage, StudySummary, TrialOut, TrialPage, study_links)
from service.api.state import ServiceState, service_state
from service.api.trial_pages import trials_page_json
from service.dispatch import dispatch
from service.models import Study, StudyStatus, TrialState
from service.quotas import ConcurrencyQuotaExceeded, concurrent_studies_limit, spec_limits_for
from service.kinds.registry import StudySpec, check_spec, kind_of, spec_of
from service.kinds.setup import SourceError
from service.kinds.summary import finished_result
from service.spec import SpecError, SpecProblem
from service.studies import StudyAlreadyFinished, StudyNotFound, cancel_study, create_study, \
    find_by_idempotency_key, get_study, list_studies, spec_fingerprint, spec_warnings, study_visible, trial_counts
from service.study_ids import short_ids
from service.trials import BadCursor, get_trial

router = APIRouter(prefix="/v1/studies", tags=["studies"], responses=UNAUTHORIZED)
State = Annotated[ServiceState, Depends(service_state)]
NOT_FOUND = {404: {"model": Problem, "description": "no study with this id"}}
IdempotencyKey = Annotated[str | None, Header(
    alias="Idempotency-Key", min_length=1, max_length=200,
    description="retrying with the same key returns the study the first request created (200) instead of a "
                "second one; the same key with a different spec is 409")]


def _not_found(study_id: str) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, f"no study with id {study_id}")


def _replayed(state: ServiceState, tenant: str, key: str, spec: StudySpec) -> Study | None:
    """The study an earlier request with this key created, or None; 409 when that request's spec differs."""
    with state.session_factory() as session:
        earlier = find_by_idempotency_key(session, tenant, key)
    if earlier is not None and earlier.request_hash != spec_fingerprint(spec):
        raise HTTPException(status.HTTP_409_CONFLICT, f"Idempotency-Key {key!r} was already used for a different "
                                                      f"spec (study {earlier.id}); use a new key for a new study")
    return earlier


def _resolved(state: ServiceState, spec: StudySpec, tenant: str) -> Any:
    """The spec as the study stores it: a grid's setup taken from its source tune study, once, here; 422 if the
    source has none. The submitted ``source`` stays in it, as provenance."""
    with state.session_factory() as session:
        try:
            return kind_of(spec).resolve(session, spec, tenant)
        except SourceError as error:
            raise SpecError([SpecProblem(("source", "study_id"), str(error))]) from None


@router.post("", status_code=status.HTTP_201_CREATED, response_model=StudyCreated,
             responses={200: {"model": StudyCreated, "description": "a retry with the same Idempotency-Key"},
                        409: {"model": Problem, "description": "Idempotency-Key reused with a different spec"},
                        429: {"model": Problem, "description": "the tenant's concurrent-studies quota is used up"}},
             summary="Submit a study; its first trials are queued at once")
def post_study(spec: StudySpec, state: State, principal: CurrentPrincipal, response: Response,
               idempotency_key: IdempotencyKey = None) -> StudyCreated:
    settings = state.settings
    resolved = _resolved(state, spec, principal.tenant)
    check_spec(resolved, spec_limits_for(settings, principal.tenant))
    warnings = spec_warnings(resolved, settings.DATA_ROOT)
    earlier = _replayed(state, principal.tenant, idempotency_key, spec) if idempotency_key else None
    if earlier is not None:
        response.status_code = status.HTTP_200_OK
        return StudyCreated(id=earlier.id, status=earlier.status, links=study_links(earlier.id), warnings=warnings)
    try:
        study = create_study(state.session_factory, state.storage, resolved, tenant=principal.tenant,
                             idempotency_key=idempotency_key,
                             max_unfinished=concurrent_studies_limit(settings, principal.tenant),
                             request_hash=spec_fingerprint(spec))
    except ConcurrencyQuotaExceeded as error:
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, str(error)) from None
    except IntegrityError:
        # A concurrent request with the same key won the insert: answer as its retry.
        earlier = _replayed(state, principal.tenant, idempotency_key, spec) if idempotency_key else None
        if earlier is None:
            raise
        response.status_code = status.HTTP_200_OK
        return StudyCreated(id=earlier.id, status=earlier.status, links=study_links(earlier.id), warnings=warnings)
    dispatch(state.session_factory, study.id, state.enqueue)
    return StudyCreated(id=study.id, status=study.status, links=study_links(study.id), warnings=warnings)


@router.get("", response_model=StudyPage, summary="List studies, newest first")
def get_studies(state: State, principal: CurrentPrincipal, status_: Annotated[StudyStatus | None, Query(alias="status")] = None,
                limit: Annotated[int, Query(ge=1, le=500)] = 50,
                offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0) -> StudyPage:
    with state.read_sessions() as session:
        rows, total = list_studies(session, STUDY_SUMMARY_COLUMNS, principal.tenant_scope, status=status_,
                                   limit=limit, offset=offset)
        short = short_ids(session, [s.id for s in rows], principal.tenant_scope)
        return StudyPage(items=[StudySummary.of(s, short[s.id]) for s in rows], total=total, limit=limit,
                         offset=offset)


@router.get("/{study_id}", response_model=StudyDetail, responses=NOT_FOUND,
            summary="A study: spec, status, trial counts by state, best value and params")
def get_one_study(study_id: str, state: State, principal: CurrentPrincipal) -> StudyDetail:
    with state.read_sessions() as session:
        try:
            study = get_study(session, study_id, principal.tenant_scope)
        except StudyNotFound:
            raise _not_found(study_id) from None
        return StudyDetail.of(study, trial_counts(session, study_id),
                              finished_result(session, study, state.settings.DATA_ROOT),
                              spec_warnings(spec_of(study), state.settings.DATA_ROOT))


@router.get("/{study_id}/trials", response_model=TrialPage, responses=NOT_FOUND,
            summary="A study's trial attempts in the order they were queued")
def get_trials(study_id: str, state: State, principal: CurrentPrincipal, state_: Annotated[TrialState | None, Query(alias="state")] = None,
               limit: Annotated[int, Query(ge=1, le=1000)] = 100,
               offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
               cursor: Annotated[str | None, Query(min_length=1, max_length=200, description=(
                   "the previous page's next_cursor: the page after it, found by key (as fast deep as at the "
                   "start); give offset or cursor, not both"))] = None) -> Response:
    if cursor is not None and offset:
        raise InvalidField(("query", "cursor"), "give offset or cursor, not both (a cursor already says where "
                                                "the page starts)")
    with state.read_sessions() as session:
        if not study_visible(session, study_id, principal.tenant_scope):
            raise _not_found(study_id)
        try:  # TrialPage's JSON, its trials rendered once per version of their rows (trial_pages)
            page = trials_page_json(session, study_id, limit=limit, offset=offset, state=state_, cursor=cursor)
        except BadCursor as error:
            raise InvalidField(("query", "cursor"), str(error)) from None
    return Response(page, media_type="application/json")


@router.get("/{study_id}/trials/{number}", response_model=TrialOut,
            responses={404: {"model": Problem, "description": "no such study or trial number"}},
            summary="One trial by its Optuna trial number")
def get_one_trial(study_id: str, number: Annotated[int, Path(ge=0, le=2**31 - 1)], state: State,
                  principal: CurrentPrincipal) -> TrialOut:
    with state.read_sessions() as session:
        try:
            get_study(session, study_id, principal.tenant_scope)
        except StudyNotFound:
            raise _not_found(study_id) from None
        trial = get_trial(session, study_id, number)
        if trial is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"study {study_id} has no trial number {number}")
        return TrialOut.of(trial)


@router.post("/{study_id}/cancel", response_model=StudyCreated,
             responses={**NOT_FOUND, 409: {"model": Problem, "description": "the study has already finished"}},
             summary="Cancel: nothing new starts; running trials stop at their next eval")
def post_cancel(study_id: str, state: State, principal: CurrentPrincipal) -> StudyCreated:
    try:
        study = cancel_study(state.session_factory, study_id, principal.tenant_scope)
    except StudyNotFound:
        raise _not_found(study_id) from None
    except StudyAlreadyFinished as error:
        raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from None
    return StudyCreated(id=study.id, status=study.status, links=study_links(study.id))
