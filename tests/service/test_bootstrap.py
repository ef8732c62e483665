"""The first admin token: from SCALETUNE_BOOTSTRAP_TOKEN (installed, rotated, never resurrected) or made once."""

from __future__ import annotations

import pytest

from service.tokens import authenticate, create_token, revoke_token
from service.bootstrap import BadBootstrapToken, bootstrap_admin_token
from service.db import SessionFactory

CHOSEN = "st_0123456789abcdef_" + "a" * 40
ROTATED = "st_fedcba9876543210_" + "b" * 40


def test_first_start_creates_an_admin_token_once(session_factory: SessionFactory) -> None:
    token = bootstrap_admin_token(session_factory, None)
    assert token is not None
    principal = authenticate(session_factory, token)
    assert principal is not None and principal.is_admin and principal.token_name == "bootstrap"
    assert bootstrap_admin_token(session_factory, None) is None, "later starts create nothing"


def test_no_token_is_made_when_the_operator_already_made_one(session_factory: SessionFactory) -> None:
    create_token(session_factory, "alice")
    revoke_token(session_factory, "alice")
    assert bootstrap_admin_token(session_factory, None) is None, "a revoked admin is not replaced behind its back"


def test_a_chosen_token_becomes_the_admin_and_a_new_value_replaces_it(session_factory: SessionFactory) -> None:
    assert bootstrap_admin_token(session_factory, CHOSEN) is None, "a chosen token is never shown"
    assert authenticate(session_factory, CHOSEN) is not None and authenticate(session_factory, CHOSEN).is_admin
    bootstrap_admin_token(session_factory, CHOSEN)  # every start installs it again: nothing changes
    assert authenticate(session_factory, CHOSEN) is not None

    bootstrap_admin_token(session_factory, ROTATED)
    assert authenticate(session_factory, CHOSEN) is None
    assert authenticate(session_factory, ROTATED) is not None


def test_a_revoked_chosen_token_stays_revoked(session_factory: SessionFactory) -> None:
    bootstrap_admin_token(session_factory, CHOSEN)
    assert revoke_token(session_factory, "bootstrap")
    bootstrap_admin_token(session_factory, CHOSEN)
    assert authenticate(session_factory, CHOSEN) is None


@pytest.mark.parametrize("value", ["hunter2", "st_short_" + "a" * 40, "st_0123456789abcdef_tooshort",
                                   "xx_0123456789abcdef_" + "a" * 40])
def test_a_malformed_chosen_token_is_refused_with_how_to_make_one(session_factory: SessionFactory,
                                                                   value: str) -> None:
    with pytest.raises(BadBootstrapToken, match="secrets.token_hex"):
        bootstrap_admin_token(session_factory, value)


def test_a_chosen_token_cannot_take_over_another_tokens_selector(session_factory: SessionFactory) -> None:
    selector = create_token(session_factory, "alice").split("_")[1]
    with pytest.raises(BadBootstrapToken, match="belongs to another token"):
        bootstrap_admin_token(session_factory, f"st_{selector}_" + "c" * 40)
