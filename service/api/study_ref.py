"""A router dependency that lets every route take a unique prefix wherever it takes a study id."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.api.auth import CurrentPrincipal
from service.api.state import ServiceState, service_state
from service.study_ids import resolve_study_id


def resolve_study_ref(request: Request, state: Annotated[ServiceState, Depends(service_state)],
                      principal: CurrentPrincipal) -> None:
    """Replace a ``{study_id}`` path parameter that is a unique prefix by the full id before the route reads it.

    FastAPI solves a router's dependencies before it reads the route's path parameters, so every route and
    every link it builds sees the full id; an ambiguous prefix is a 400 listing the candidates.
    """
    ref = request.path_params.get("study_id")
    if ref is None:
        return
    with state.read_sessions() as session:
        request.path_params["study_id"] = resolve_study_id(session, ref, principal.tenant_scope)
