"""The API token store: create, revoke and check tokens; a token stands for a principal (tenant, admin or not).

A token reads ``st_<selector>_<secret>``. The selector (public) finds the row; only the sha256 of the
secret is stored, compared in constant time. How a request carries its token is ``service.api.auth``'s job.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from service.db import SessionFactory, write_session
from service.models import ApiToken, utcnow
from service.studies import DEFAULT_TENANT

TOKEN_PREFIX = "st"
TokenState = Literal["active", "revoked", "expired"]


@dataclass(frozen=True)
class Principal:
    tenant: str
    token_name: str
    is_admin: bool

    @property
    def tenant_scope(self) -> str | None:
        """The tenant whose studies this caller may see; None (admin) means every tenant."""
        return None if self.is_admin else self.tenant


@dataclass(frozen=True)
class TokenInfo:
    """What an admin may know about a token: everything but its secret and hash."""

    name: str
    tenant: str
    admin: bool
    created_at: datetime
    expires_at: datetime | None
    revoked: bool

    @property
    def state(self) -> TokenState:
        if self.revoked:
            return "revoked"
        return "expired" if self.expires_at is not None and self.expires_at <= utcnow() else "active"


class TokenNameTaken(ValueError):
    pass


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def split_token(token: str) -> tuple[str, str] | None:
    """``st_<selector>_<secret>`` -> (selector, secret); None when the token is malformed."""
    prefix, _, rest = token.partition("_")
    selector, _, secret = rest.partition("_")
    if prefix != TOKEN_PREFIX or not selector or not secret or len(selector) > 32:
        return None
    return selector, secret


def _info(row: ApiToken) -> TokenInfo:
    return TokenInfo(name=row.name, tenant=row.tenant, admin=row.admin, created_at=row.created_at,
                     expires_at=row.expires_at, revoked=row.revoked)


def create_token(session_factory: SessionFactory, name: str, tenant: str = DEFAULT_TENANT,
                 admin: bool = False, expires_at: datetime | None = None) -> str:
    """Store a new token's hash and return the token itself: the only time it exists in clear."""
    selector, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    try:
        with write_session(session_factory) as session:
            session.add(ApiToken(id=selector, name=name, tenant=tenant, admin=admin, hash=hash_secret(secret),
                                 expires_at=expires_at))
    except IntegrityError:
        raise TokenNameTaken(f"a token named {name!r} already exists; pick another name or revoke it") from None
    return f"{TOKEN_PREFIX}_{selector}_{secret}"


def token_info(session_factory: SessionFactory, name: str) -> TokenInfo | None:
    with session_factory() as session:
        row = session.scalars(select(ApiToken).where(ApiToken.name == name)).one_or_none()
        return None if row is None else _info(row)


def list_tokens(session_factory: SessionFactory) -> list[TokenInfo]:
    """Every token, revoked and expired ones included, oldest first."""
    with session_factory() as session:
        return [_info(row) for row in session.scalars(select(ApiToken).order_by(ApiToken.created_at, ApiToken.name))]


def revoke_token(session_factory: SessionFactory, name: str) -> bool:
    """True when a live token of that name was revoked."""
    with write_session(session_factory) as session:
        result = session.execute(update(ApiToken).where(ApiToken.name == name, ApiToken.revoked.is_(False))
                                 .values(revoked=True))
        return result.rowcount == 1  # type: ignore[attr-defined]


def authenticate(session_factory: SessionFactory, token: str) -> Principal | None:
    """The principal a token stands for, or None when it is malformed, unknown, revoked or expired."""
    if (parts := split_token(token)) is None:
        return None
    selector, secret = parts
    with session_factory() as session:
        row = session.scalars(select(ApiToken).where(ApiToken.id == selector)).one_or_none()
    if row is None or _info(row).state != "active" or not hmac.compare_digest(row.hash, hash_secret(secret)):
        return None
    return Principal(tenant=row.tenant, token_name=row.name, is_admin=row.admin)
