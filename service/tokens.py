"""The API token store: create, revoke and check tokens; a token stands for a principal (tenant, admin or not).

A token reads ``st_<selector>_<secret>``. The selector (public) finds the row; only the sha256 of the
secret is stored, compared in constant time. How a request carries its token is ``service.api.auth``'s job.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from service.db import SessionFactory, write_session
from service.models import ApiToken
from service.studies import DEFAULT_TENANT

TOKEN_PREFIX = "st"


@dataclass(frozen=True)
class Principal:
    tenant: str
    token_name: str
    is_admin: bool

    @property
    def tenant_scope(self) -> str | None:
        """The tenant whose studies this caller may see; None (admin) means every tenant."""
        return None if self.is_admin else self.tenant


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


def create_token(session_factory: SessionFactory, name: str, tenant: str = DEFAULT_TENANT,
                 admin: bool = False) -> str:
    """Store a new token's hash and return the token itself: the only time it exists in clear."""
    selector, secret = secrets.token_hex(8), secrets.token_urlsafe(32)
    try:
        with write_session(session_factory) as session:
            session.add(ApiToken(id=selector, name=name, tenant=tenant, admin=admin, hash=hash_secret(secret)))
    except IntegrityError:
        raise TokenNameTaken(f"a token named {name!r} already exists; pick another name or revoke it") from None
    return f"{TOKEN_PREFIX}_{selector}_{secret}"


def revoke_token(session_factory: SessionFactory, name: str) -> bool:
    """True when a live token of that name was revoked."""
    with write_session(session_factory) as session:
        result = session.execute(update(ApiToken).where(ApiToken.name == name, ApiToken.revoked.is_(False))
                                 .values(revoked=True))
        return result.rowcount == 1  # type: ignore[attr-defined]


def authenticate(session_factory: SessionFactory, token: str) -> Principal | None:
    """The principal a token stands for, or None when it is malformed, unknown or revoked."""
    if (parts := split_token(token)) is None:
        return None
    selector, secret = parts
    with session_factory() as session:
        row = session.scalars(select(ApiToken).where(ApiToken.id == selector)).one_or_none()
    if row is None or row.revoked or not hmac.compare_digest(row.hash, hash_secret(secret)):
        return None
    return Principal(tenant=row.tenant, token_name=row.name, is_admin=row.admin)
