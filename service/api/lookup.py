"""Finding the caller's study of the kind an endpoint needs, with the 404/409 a person can act on."""

from __future__ import annotations

from typing import TypeVar

from fastapi import HTTPException, status
from sqlalchemy.orm import Session

from service.kinds.base import StudyKind
from service.kinds.registry import kind_of, spec_of
from service.models import Study
from service.studies import StudyNotFound, get_study
from service.tokens import Principal

SpecT = TypeVar("SpecT")


def study_of_kind(session: Session, study_id: str, principal: Principal, kind: StudyKind[SpecT],
                  needed: str) -> tuple[Study, SpecT]:
    """The study and its spec; 404 for a study the caller cannot see, 409 naming what the endpoint needs for another
    kind."""
    try:
        study = get_study(session, study_id, principal.tenant_scope)
    except StudyNotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no study with id {study_id}") from None
    if kind_of(study) is not kind:
        raise HTTPException(status.HTTP_409_CONFLICT, f"study {study_id} is a {study.kind} study; {needed}")
    spec: SpecT = spec_of(study)
    return study, spec
