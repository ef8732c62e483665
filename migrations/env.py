"""Alembic environment for scaletune's tables only; Optuna's tables in the same database are left alone."""

from __future__ import annotations

from typing import Any

from alembic import context

from service.db import VERSION_TABLE, create_db_engine
from service.models import Base
from service.settings import get_settings, normalise_database_url

config = context.config


def _database_url() -> str:
    """Programmatic callers pass the URL in attributes; the alembic CLI may pass ``-x url=...``; else settings."""
    url = config.attributes.get("url") or context.get_x_argument(as_dictionary=True).get("url")
    return normalise_database_url(url or get_settings().DATABASE_URL)


def _include_name(name: str | None, type_: str, _parent_names: Any) -> bool:
    """Autogenerate compares only ``st_`` tables, so it never proposes dropping Optuna's."""
    if type_ == "table":
        return bool(name and name.startswith("st_"))
    return True


def _configure(**kwargs: Any) -> None:
    context.configure(target_metadata=Base.metadata, version_table=VERSION_TABLE, include_name=_include_name,
                      render_as_batch=True, compare_type=True, **kwargs)


def run_migrations_offline() -> None:
    _configure(url=_database_url(), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_db_engine(_database_url())
    try:
        with engine.connect() as connection:
            _configure(connection=connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
