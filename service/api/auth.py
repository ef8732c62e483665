"""The ``require_principal`` dependency: who is calling, from a token in a header, the web page's cookie or the query.

A token is accepted from the ``Authorization: Bearer`` header, the ``scaletune_token`` cookie (the web page) or
the ``token`` query parameter (EventSource cannot set headers); any route gets authentication with
``principal: CurrentPrincipal``. The tokens themselves live in ``service.tokens``.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, status
from fastapi.concurrency import run_in_threadpool
from fastapi.security import APIKeyCookie, APIKeyQuery, HTTPAuthorizationCredentials, HTTPBearer

from service.api.state import ServiceState, service_state
from service.studies import DEFAULT_TENANT
from service.tokens import Principal, authenticate

AUTH_COOKIE = "scaletune_token"
TOKEN_QUERY = "token"
UNAUTHORIZED = {401: {"description": "no token, or an unknown, expired or revoked one"}}
NO_AUTH_PRINCIPAL = Principal(tenant=DEFAULT_TENANT, token_name="no-auth", is_admin=True)

_bearer = HTTPBearer(auto_error=False, description="an API token from `scaletune token create`")
_cookie = APIKeyCookie(name=AUTH_COOKIE, auto_error=False, description="the same token, set by the web page")
_query = APIKeyQuery(name=TOKEN_QUERY, auto_error=False, description="the same token, for EventSource")


async def require_principal(state: Annotated[ServiceState, Depends(service_state)],
                            bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
                            cookie: Annotated[str | None, Depends(_cookie)],
                            query: Annotated[str | None, Depends(_query)]) -> Principal:
    """FastAPI dependency: the caller's principal, or 401. With AUTH_DISABLED, the admin of tenant 'default'."""
    if state.settings.AUTH_DISABLED:
        return NO_AUTH_PRINCIPAL
    token = bearer.credentials if bearer is not None else cookie or query
    # one SELECT (no BEGIN, no ROLLBACK), in the thread pool; without a token the request never leaves the event loop
    principal = await run_in_threadpool(authenticate, state.read_sessions, token) if token else None
    if principal is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED,
                            "missing or invalid API token" if token is None else "invalid, expired or revoked API token",
                            headers={"WWW-Authenticate": "Bearer"})
    return principal


CurrentPrincipal = Annotated[Principal, Depends(require_principal)]
