"""Read-only requests' sessions: on PostgreSQL no transaction is held open (no BEGIN or ROLLBACK round trips), and
the sessions that write stay atomic on the same engine."""

from __future__ import annotations

import pytest
from psycopg.pq import TransactionStatus
from sqlalchemy import func, select

from service.db import create_db_engine, make_read_session_factory, make_session_factory, upgrade_database, \
    write_session
from service.models import Study


def _study(study_id: str) -> Study:
    return Study(id=study_id, name=study_id, kind="tune", spec={}, status="queued", tenant="default",
                 optuna_study_name=f"scaletune-{study_id}")


def test_a_read_session_holds_no_transaction_and_sees_each_commit_while_writes_stay_atomic(postgres_url: str) -> None:
    upgrade_database(postgres_url)
    engine = create_db_engine(postgres_url)
    reads, writes = make_read_session_factory(engine), make_session_factory(engine)
    count = select(func.count()).select_from(Study)

    with reads() as session:
        assert session.scalar(count) == 0
        driver = session.connection().connection.dbapi_connection
        assert driver.info.transaction_status == TransactionStatus.IDLE, "no transaction left open by the read"
        with write_session(writes) as other:
            other.add(_study("s1"))
        assert session.scalar(count) == 1, "the next statement sees what was committed meanwhile"

    with pytest.raises(RuntimeError), write_session(writes) as session:
        session.add(_study("s2"))
        session.flush()
        raise RuntimeError("the request failed half-way")
    with reads() as session:
        assert session.scalars(select(Study.id)).all() == ["s1"], "a failed write leaves nothing behind"
    engine.dispose()

