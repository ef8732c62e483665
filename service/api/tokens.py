"""/v1/tokens: admins create, list and revoke API tokens over HTTP; every other caller gets 403."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, status
from pydantic import BaseModel, Field

from service.api.auth import UNAUTHORIZED, CurrentPrincipal
from service.api.schemas import Problem
from service.api.state import ServiceState, service_state
from service.models import utcnow
from service.studies import DEFAULT_TENANT
from service.tokens import Principal, TokenInfo, TokenNameTaken, TokenState, create_token, list_tokens, \
    revoke_token, token_info

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@-]*$"
MAX_EXPIRY_DAYS = 3650


async def require_admin(principal: CurrentPrincipal) -> Principal:
    if not principal.is_admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"token {principal.token_name!r} is not an admin token; "
                                                       "only an admin manages tokens")
    return principal


router = APIRouter(prefix="/v1/tokens", tags=["tokens"], dependencies=[Depends(require_admin)],
                   responses={**UNAUTHORIZED, 403: {"model": Problem, "description": "the caller is not an admin"}})
State = Annotated[ServiceState, Depends(service_state)]


class TokenCreate(BaseModel):
    name: str = Field(min_length=1, max_length=100, pattern=NAME_PATTERN,
                      description="unique; who or what uses the token (letters, digits, _ . @ -)")
    tenant: str = Field(DEFAULT_TENANT, min_length=1, max_length=100, pattern=NAME_PATTERN,
                        description="the tenant whose studies the token creates and sees")
    admin: bool = Field(False, description="sees and cancels every tenant's studies and manages tokens")
    expires_in_days: float | None = Field(None, gt=0, le=MAX_EXPIRY_DAYS,
                                          description="the token stops working after this many days; "
                                                      "absent: never")


class TokenOut(BaseModel):
    name: str
    tenant: str
    admin: bool
    created_at: datetime
    expires_at: datetime | None
    state: TokenState

    @classmethod
    def of(cls, info: TokenInfo) -> TokenOut:
        return cls(name=info.name, tenant=info.tenant, admin=info.admin, created_at=info.created_at,
                   expires_at=info.expires_at, state=info.state)


class TokenCreated(TokenOut):
    token: str = Field(description="the token itself, shown only in this answer (only its hash is stored)")


class TokenList(BaseModel):
    items: list[TokenOut]


@router.post("", status_code=status.HTTP_201_CREATED, response_model=TokenCreated, summary="Create a token",
             responses={409: {"model": Problem, "description": "a token of this name exists"}})
def create(body: TokenCreate, state: State) -> TokenCreated:
    expires_at = None if body.expires_in_days is None else utcnow() + timedelta(days=body.expires_in_days)
    try:
        token = create_token(state.session_factory, body.name, body.tenant, body.admin, expires_at)
    except TokenNameTaken as error:
        raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from None
    info = token_info(state.session_factory, body.name)
    assert info is not None
    return TokenCreated(**TokenOut.of(info).model_dump(), token=token)


@router.get("", response_model=TokenList, summary="Every token, revoked and expired ones included (no secrets)")
def list_all(state: State) -> TokenList:
    return TokenList(items=[TokenOut.of(info) for info in list_tokens(state.session_factory)])


@router.delete("/{name}", response_model=TokenOut, summary="Revoke a token: requests with it get 401 from then on",
               responses={404: {"model": Problem, "description": "no live token of this name"}})
def revoke(name: Annotated[str, Path(max_length=100)], state: State) -> TokenOut:
    if not revoke_token(state.session_factory, name):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no live token named {name!r}")
    info = token_info(state.session_factory, name)
    assert info is not None
    return TokenOut.of(info)
