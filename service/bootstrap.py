"""A deployment's first admin token: taken from SCALETUNE_BOOTSTRAP_TOKEN, or created on first start and shown once.

So that a container can serve on the network with authentication from its first start, with no one running
`scaletune token create` inside it beforehand.
"""

from __future__ import annotations

import re

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from service.db import SessionFactory, write_session
from service.models import ApiToken
from service.studies import DEFAULT_TENANT
from service.tokens import TokenNameTaken, create_token, hash_secret, split_token

BOOTSTRAP_NAME = "bootstrap"
_CHOSEN = re.compile(r"st_[0-9a-z]{8,32}_[A-Za-z0-9_-]{32,}")
MAKE_ONE = "python -c \"import secrets; print(f'st_{secrets.token_hex(8)}_{secrets.token_urlsafe(32)}')\""


class BadBootstrapToken(ValueError):
    pass


def bootstrap_admin_token(session_factory: SessionFactory, chosen: str | None) -> str | None:
    """Install ``chosen`` as admin token 'bootstrap', or create one when no token exists at all.

    Returns the token only when it was just created here (the caller shows it, once); else None.
    """
    if chosen:
        install_chosen_token(session_factory, chosen)
        return None
    with session_factory() as session:
        if session.scalar(select(func.count()).select_from(ApiToken)):
            return None
    try:
        return create_token(session_factory, BOOTSTRAP_NAME, admin=True)
    except TokenNameTaken:  # another process of this deployment created it a moment ago
        return None


def install_chosen_token(session_factory: SessionFactory, chosen: str) -> None:
    """Make ``chosen`` the admin token named 'bootstrap'; a new value replaces the old one (rotation).

    A value already installed is left as it is, so a token an admin revoked stays revoked.
    """
    parts = split_token(chosen) if _CHOSEN.fullmatch(chosen) else None
    if parts is None:
        raise BadBootstrapToken(
            "SCALETUNE_BOOTSTRAP_TOKEN must look like st_<8-32 lowercase letters or digits>_<32 or more of "
            f"A-Z a-z 0-9 _ ->; make one with: {MAKE_ONE}")
    selector, secret = parts
    try:
        with write_session(session_factory) as session:
            existing = session.get(ApiToken, selector)
            if existing is not None:
                if existing.name != BOOTSTRAP_NAME or existing.hash != hash_secret(secret):
                    raise BadBootstrapToken("SCALETUNE_BOOTSTRAP_TOKEN's selector belongs to another token; "
                                            f"make a new value with: {MAKE_ONE}")
                return
            row = session.scalars(select(ApiToken).where(ApiToken.name == BOOTSTRAP_NAME)).one_or_none()
            if row is None:
                row = ApiToken(name=BOOTSTRAP_NAME)
                session.add(row)
            row.id, row.hash, row.tenant, row.admin, row.revoked = (
                selector, hash_secret(secret), DEFAULT_TENANT, True, False)
    except IntegrityError:  # another process of this deployment installed the same value a moment ago
        pass
