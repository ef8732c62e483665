"""Migrations from an empty database to head and back, on SQLite and on a fresh PostgreSQL database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import insert, inspect, text

from service.db import VERSION_TABLE, _alembic_config, create_db_engine, database_is_current, \
    downgrade_database, make_session_factory, upgrade_database
from service.models import Base, Study, StudyStatus, TrialAttempt
from service.dispatch import dispatch
from service.optuna_study import get_storage
from service.kinds.registry import STUDY_SPEC, kind_of
from service.studies import create_study

OUR_TABLES = {"st_studies", "st_trials", "st_events", "st_tokens", "st_alembic_version"}


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'empty.db'}"
    return request.getfixturevalue("postgres_url")


def _tables(url: str) -> set[str]:
    engine = create_db_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_from_empty_then_downgrade_to_base(empty_database: str) -> None:
    assert not database_is_current(empty_database)

    upgrade_database(empty_database)

    tables = _tables(empty_database)
    assert OUR_TABLES <= tables
    assert {"studies", "trials", "alembic_version"} <= tables, "Optuna's storage lives beside ours"
    assert database_is_current(empty_database)

    downgrade_database(empty_database)

    tables = _tables(empty_database)
    assert not (OUR_TABLES - {"st_alembic_version"}) & tables
    assert "studies" in tables, "our downgrade leaves Optuna's tables alone"
    assert not database_is_current(empty_database)


def test_create_and_dispatch_on_postgresql(postgres_url: str, spec_dict: dict[str, Any]) -> None:
    upgrade_database(postgres_url)
    engine = create_db_engine(postgres_url)
    session_factory = make_session_factory(engine)
    sent: list[str] = []
    try:
        study = create_study(session_factory, get_storage(postgres_url), STUDY_SPEC.validate_python(spec_dict))
        first = dispatch(session_factory, study.id, lambda attempt_id, _queue: sent.append(attempt_id))
        again = dispatch(session_factory, study.id, lambda attempt_id, _queue: sent.append(attempt_id))
    finally:
        engine.dispose()
    assert len(first) == spec_dict["parallelism"] and again == [] and sent == first


def _revisions() -> list[str]:
    """Every revision, oldest first."""
    script = ScriptDirectory.from_config(_alembic_config("sqlite://"))
    return [rev.revision for rev in reversed(list(script.walk_revisions()))]


def test_upgrade_from_every_earlier_revision_keeps_the_data(empty_database: str,
                                                            spec_dict: dict[str, Any]) -> None:
    """A database left at any older revision, with a study in it, upgrades to head and downgrades back."""
    revisions = _revisions()
    assert len(revisions) >= 2
    for earlier in revisions[:-1]:
        upgrade_database(empty_database, earlier)
        engine = create_db_engine(empty_database)
        try:
            with engine.begin() as connection:
                connection.execute(text(
                    "INSERT INTO st_studies (id, name, kind, spec, status, tenant, optuna_study_name, created_at, "
                    "updated_at) VALUES (:id, 'old', 'tune', '{}', 'completed', 'default', :name, "
                    "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"), {"id": f"study-{earlier}", "name": f"optuna-{earlier}"})
        finally:
            engine.dispose()
        upgrade_database(empty_database)
        assert database_is_current(empty_database)
        engine = create_db_engine(empty_database)
        try:
            with engine.connect() as connection:
                names = set(connection.scalars(text("SELECT name FROM st_studies")))
        finally:
            engine.dispose()
        assert names == {"old"}, f"the study written at {earlier} survives the upgrade"
        downgrade_database(empty_database, earlier)
        assert not database_is_current(empty_database)
        downgrade_database(empty_database)
    assert not (OUR_TABLES - {"st_alembic_version"}) & _tables(empty_database)


def test_head_matches_the_models(empty_database: str) -> None:
    """No change to models.py is left without a migration."""
    upgrade_database(empty_database)
    engine = create_db_engine(empty_database)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={
                "version_table": VERSION_TABLE, "compare_type": True,
                "include_name": lambda name, type_, _parents: type_ != "table" or name.startswith("st_")})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_upgrade_resolves_the_grid_studies_a_release_at_0002_stored(empty_database: str,
                                                                    spec_dict: dict[str, Any]) -> None:
    """0002 stored a grid study's spec as submitted and resolved its source on every read; head stores it resolved,
    exactly as submitting it now would, and leaves a grid without a (usable) source as it was."""
    upgrade_database(empty_database, "0002")
    engine = create_db_engine(empty_database)
    session_factory = make_session_factory(engine)
    sizes = [{"width": 16, "depth": 1}, {"width": 32, "depth": 1}, {"width": 64, "depth": 1}]
    submitted = {
        "check": {"name": "check", "kind": "transfer_check", "source": {"study_id": "tuned"}, "sizes": sizes},
        "schedule": {"name": "schedule", "kind": "shape_schedule", "source": {"study_id": "tuned"},
                     "hyperparameters": {"lr": 0.5}, "budget": {"steps": 40, "batch_size": 8, "eval_every": 40},
                     "axis": "width", "values": [16, 32], "budgets": [10, 20]},
        "orphan": {"name": "orphan", "kind": "transfer_check", "source": {"study_id": "no-such-study"},
                   "sizes": sizes},
    }
    stored = {key: STUDY_SPEC.validate_python(spec).model_dump(mode="json") for key, spec in submitted.items()}
    try:
        with session_factory() as session, session.begin():
            session.add(Study(id="tuned", name="tuned", kind="tune", status=StudyStatus.completed,
                              spec=STUDY_SPEC.validate_python(spec_dict).model_dump(mode="json"),
                              optuna_study_name="optuna-tuned"))
            session.flush()
            # Column by column, as 0002 had them (the ORM would also write columns later revisions added).
            session.execute(insert(TrialAttempt), [
                {"study_id": "tuned", "number": number, "state": state, "value": value, "params": {"lr": lr},
                 "intermediate": []}
                for number, (state, value, lr) in enumerate([("complete", 2.0, 0.01), ("complete", 1.5, 0.003),
                                                             ("failed", None, 0.1)])])
            for key, spec in stored.items():
                session.add(Study(id=key, name=key, kind=spec["kind"], status=StudyStatus.queued, spec=spec,
                                  optuna_study_name=f"optuna-{key}"))
        upgrade_database(empty_database)
        with session_factory() as session:
            migrated = {key: session.get_one(Study, key).spec for key in submitted}
            expected = {key: kind_of(spec).resolve(session, spec, "default").model_dump(mode="json")
                        for key in ("check", "schedule") for spec in [STUDY_SPEC.validate_python(submitted[key])]}
    finally:
        engine.dispose()
    assert migrated["check"] == expected["check"] and migrated["schedule"] == expected["schedule"]
    assert migrated["check"]["source"] == {"study_id": "tuned"}, "the submitted source is kept as provenance"
    assert migrated["check"]["hyperparameters"]["lr"] == 0.003, "the best completed trial's values"
    assert migrated["check"]["model"]["family"] == spec_dict["model"]["family"]
    assert migrated["schedule"]["hyperparameters"]["lr"] == 0.5 and migrated["schedule"]["budget"]["steps"] == 40
    assert migrated["orphan"] == stored["orphan"]
