"""``scaletune token create|list|revoke``: API tokens, written straight to the database the service uses.

Admins can do the same over HTTP (``/v1/tokens``); these commands are for the operator of the database.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

app = typer.Typer(help="Create, list and revoke API tokens (the API needs one unless started with --no-auth).\n\n"
                       "Example: scaletune token create --name alice", no_args_is_help=True)
console = Console()
error_console = Console(stderr=True)

if TYPE_CHECKING:
    from service.db import SessionFactory


def _session_factory() -> SessionFactory:
    """Service modules load here, not at import, so that --help stays instant."""
    from service.db import create_db_engine, database_is_current, make_session_factory
    from service.settings import Settings

    settings = Settings()
    if not database_is_current(settings.DATABASE_URL):
        error_console.print("The database is not migrated; run `scaletune migrate` first.", style="red")
        raise typer.Exit(1)
    return make_session_factory(create_db_engine(settings.DATABASE_URL))


@app.command("create")
def create(
    name: Annotated[str, typer.Option(help="A unique name for the token (who or what uses it).")],
    tenant: Annotated[str, typer.Option(help="The tenant whose studies the token creates and sees.")] = "default",
    admin: Annotated[bool, typer.Option("--admin", help="See and cancel every tenant's studies, manage tokens.")]
    = False,
    expires_in_days: Annotated[float | None, typer.Option(min=0.0, help="The token stops working after this many "
                                                          "days (default: never).")] = None,
) -> None:
    """Create an API token and print it once (only its hash is stored); send it as `Authorization: Bearer ...`.

    Example: scaletune token create --name alice --tenant vision --expires-in-days 90
    """
    from datetime import timedelta

    from service.models import utcnow
    from service.tokens import TokenNameTaken, create_token

    expires_at = None if expires_in_days is None else utcnow() + timedelta(days=expires_in_days)
    try:
        token = create_token(_session_factory(), name, tenant=tenant, admin=admin, expires_at=expires_at)
    except TokenNameTaken as error:
        error_console.print(str(error), style="red", markup=False)
        raise typer.Exit(1) from None
    error_console.print(f"Token {name!r} for tenant {tenant!r}{' (admin)' if admin else ''}; it is shown only "
                        "once, so store it now (e.g. export SCALETUNE_TOKEN=...):", markup=False)
    console.print(token, markup=False, soft_wrap=True)


@app.command("list")
def list_() -> None:
    """Every token with its tenant, role, expiry and state (active, revoked, expired); never a secret.

    Example: scaletune token list
    """
    from rich.table import Table

    from service.tokens import list_tokens

    table = Table("name", "tenant", "admin", "created", "expires", "state")
    for info in list_tokens(_session_factory()):
        table.add_row(info.name, info.tenant, "yes" if info.admin else "", f"{info.created_at:%Y-%m-%d %H:%M}",
                      "never" if info.expires_at is None else f"{info.expires_at:%Y-%m-%d %H:%M}", info.state)
    console.print(table)


@app.command("revoke")
def revoke(name: Annotated[str, typer.Option(help="The name the token was created with.")]) -> None:
    """Revoke a token: requests with it get 401 from then on.

    Example: scaletune token revoke --name alice
    """
    from service.tokens import revoke_token

    if not revoke_token(_session_factory(), name):
        error_console.print(f"No live token named {name!r}.", style="red", markup=False)
        raise typer.Exit(1)
    console.print(f"Revoked token {name!r}.", markup=False)
