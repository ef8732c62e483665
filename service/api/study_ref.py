"""A router dependency that lets every route take a unique prefix wherever it takes a study id."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool

from service.api.auth import CurrentPrincipal
from service.api.state import ServiceState, service_state
from service.study_ids import ID_LENGTH, resolve_study_id


async def resolve_study_ref(request: Request, state: Annotated[ServiceState, Depends(service_state)],
                            principal: CurrentPrincipal) -> None:
    """Replace a ``{study_id}`` path parameter that is a unique prefix by the full id before the route reads it.

    FastAPI solves a router's dependencies before it reads the route's path parameters, so every route and
    every link it builds sees the full id; an ambiguous prefix is a 400 listing the candidates.
    """
    ref = request.path_params.get("study_id")
    if ref is None or len(ref) >= ID_LENGTH:  # a full id names itself (most requests): no query, no thread
        return
    request.path_params["study_id"] = await run_in_threadpool(_resolve, state, ref, principal.tenant_scope)


def _resolve(state: ServiceState, ref: str, tenant: str | None) -> str:
    with state.read_sessions() as session:
        return resolve_study_id(session, ref, tenant)
