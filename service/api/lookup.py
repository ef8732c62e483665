"""Finding the caller's study of the kind an endpoint needs, with the 404/409 a person can act on."""

from __future__ import annotations

from typing import TypeVar

from fastapi import HTTPException, status
from sqlalchemy.orm import Session

from service.auth import Principal
from service.kinds.setup import SourceError, resolve_source
from service.models import Study
from service.spec import STUDY_SPEC, StudySpec
from service.studies import StudyNotFound, get_study

SpecT = TypeVar("SpecT", bound=StudySpec)


def study_of_kind(session: Session, study_id: str, principal: Principal, kind: type[SpecT],
                  needed: str) -> tuple[Study, SpecT]:
    """404 for a study the caller cannot see, 409 naming what the endpoint needs for another kind."""
    try:
        study = get_study(session, study_id, principal.tenant_scope)
    except StudyNotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no study with id {study_id}") from None
    spec = STUDY_SPEC.validate_python(study.spec)
    if not isinstance(spec, kind):
        raise HTTPException(status.HTTP_409_CONFLICT, f"study {study_id} is a {study.kind} study; {needed}")
    return study, spec


def with_source(session: Session, study: Study, spec: SpecT) -> SpecT:
    """The spec with its source study's setup filled in; 409 if that source no longer qualifies."""
    try:
        return resolve_source(session, spec, study.tenant)
    except SourceError as error:
        raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from None
