"""Database operations on studies: create (with its Optuna study), read, list, cancel, events."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from optuna.storages import BaseStorage
from optuna.trial import TrialState as OptunaState
from sqlalchemy import (
    ColumnElement, DateTime, Row, String, cast, column, exists, func, insert, select, table, update,
)
from sqlalchemy.orm import Session

from scaletune.data.registry import dataset_spec
from scaletune.shapes import Shape
from scaletune.transfer import parametrization_warnings
from service.db import SessionFactory, write_session
from service.models import UNFINISHED_STUDY, Event, EventType, Study, StudyStatus, TrialAttempt, TrialState, new_id, utcnow
from service.optuna_study import NAME_PREFIX, create_optuna_study, delete_optuna_study, optuna_study_name
from service.quotas import check_concurrent_studies
from service.kinds.registry import STUDY_SPEC, StudySpec, kind_of

DEFAULT_TENANT = "default"
# Optuna's own tables, in our database
OPTUNA_STUDIES = table("studies", column("study_id"), column("study_name"))
OPTUNA_TRIALS = table("trials", column("study_id"), column("number"), column("state"),
                      column("datetime_start", DateTime))


class StudyNotFound(LookupError):
    pass


class StudyAlreadyFinished(RuntimeError):
    pass


def spec_fingerprint(spec: StudySpec) -> str:
    """sha256 of the spec as canonical JSON: tells a retried request from a different one under the same key."""
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def find_by_idempotency_key(session: Session, tenant: str, key: str) -> Study | None:
    return session.scalars(select(Study).where(Study.tenant == tenant, Study.idempotency_key == key)).one_or_none()


def add_event(session: Session, study_id: str, type_: EventType, payload: dict[str, Any],
              trial_id: str | None = None) -> None:
    session.add(Event(study_id=study_id, trial_id=trial_id, type=type_, payload=payload))


def add_events(session: Session, study_id: str, type_: EventType, events: list[tuple[str, dict[str, Any]]]) -> None:
    """``add_event`` for each (trial id, payload), in one INSERT of plain rows: no ORM object per event to flush
    (a pack starts 16 trials)."""
    session.execute(insert(Event), [{"study_id": study_id, "trial_id": trial_id, "type": type_, "payload": payload}
                                    for trial_id, payload in events])


def create_study(session_factory: SessionFactory, storage: BaseStorage, spec: Any,
                 tenant: str = DEFAULT_TENANT, idempotency_key: str | None = None,
                 max_unfinished: int | None = None, request_hash: str | None = None) -> Study:
    """Create the Optuna study, then our row; if our write fails the Optuna study is deleted again.

    ``spec`` is stored as given: resolved at submission (``StudyKind.resolve``), so nothing reads it
    again through another study. ``request_hash`` fingerprints the spec as the request sent it (default: ``spec``).

    ``max_unfinished`` is the tenant's concurrent-studies quota, checked in the inserting transaction
    (ConcurrencyQuotaExceeded); a reused ``idempotency_key`` fails the insert with IntegrityError.

    Optuna writes through its own engine, so the two cannot share one SQL transaction (on SQLite the
    second writer would wait on the first). The compensation keeps "nothing half-written": a study row
    never exists without its Optuna study, and an Optuna study left by a crash in between has no row,
    so nothing ever schedules it; the reconciler removes it (``orphan_optuna_study_names``).
    """
    study_id = new_id()
    name = optuna_study_name(study_id)
    create_optuna_study(storage, name, spec.objective.direction, kind_of(spec).enqueued(spec))
    try:
        with write_session(session_factory) as session:
            if max_unfinished is not None:
                check_concurrent_studies(session, tenant, max_unfinished)
            study = Study(id=study_id, name=spec.name, kind=spec.kind, spec=spec.model_dump(mode="json"),
                          status=StudyStatus.queued, tenant=tenant, optuna_study_name=name,
                          idempotency_key=idempotency_key,
                          request_hash=request_hash or spec_fingerprint(spec))
            session.add(study)
    except BaseException:
        delete_optuna_study(storage, name)
        raise
    return study


def get_study(session: Session, study_id: str, tenant: str | None = DEFAULT_TENANT) -> Study:
    """The study if ``tenant`` may see it (None: any tenant, for admins); another tenant's study is not found."""
    study = session.get(Study, study_id)
    if study is None or (tenant is not None and study.tenant != tenant):
        raise StudyNotFound(study_id)
    return study


def study_visible(session: Session, study_id: str, tenant: str | None = DEFAULT_TENANT) -> bool:
    """``get_study``'s check without loading the study (its spec is most of the row): for routes that need only
    that it exists for ``tenant``."""
    query = select(Study.id).where(Study.id == study_id)
    return session.scalar(query if tenant is None else query.where(Study.tenant == tenant)) is not None


def list_studies(session: Session, columns: tuple[ColumnElement[Any], ...], tenant: str | None = DEFAULT_TENANT,
                 status: StudyStatus | None = None, limit: int = 50, offset: int = 0) -> tuple[list[Row[Any]], int]:
    """Rows of ``columns`` (no ORM objects to build), newest first; served by the (tenant, status, created_at)
    indexes. ``tenant`` None lists every tenant's."""
    where = [] if tenant is None else [Study.tenant == tenant]
    if status is not None:
        where.append(Study.status == status)
    total = session.scalar(select(func.count()).select_from(Study).where(*where)) or 0
    rows = session.execute(select(*columns).where(*where).order_by(Study.created_at.desc(), Study.id).limit(limit)
                           .offset(offset)).all()
    return list(rows), total


def trial_counts(session: Session, study_id: str) -> dict[str, int]:
    """Attempts per state, every state present (zero when none)."""
    rows = session.execute(select(TrialAttempt.state, func.count()).where(TrialAttempt.study_id == study_id)
                           .group_by(TrialAttempt.state)).all()
    counts = {state.value: 0 for state in TrialState}
    counts.update({state: n for state, n in rows})
    return counts


def unfinished_study_ids(session: Session) -> list[str]:
    return list(session.scalars(select(Study.id).where(Study.status.in_(UNFINISHED_STUDY))))


def orphan_optuna_study_names(session: Session) -> list[str]:
    """Optuna studies named as ours with no study row: left by a crash between the two writes of ``create_study``
    (or being created right now: the caller leaves the young ones alone)."""
    name = OPTUNA_STUDIES.c.study_name
    return list(session.scalars(select(name).where(name.startswith(NAME_PREFIX, autoescape=True),
                                                   ~exists().where(Study.optuna_study_name == name))))


def running_optuna_trials(session: Session) -> list[tuple[Study, int, datetime | None]]:
    """The trials of our studies that Optuna counts as running: (study, trial number, when Optuna started it)."""
    trials, studies = OPTUNA_TRIALS.c, OPTUNA_STUDIES.c
    rows = session.execute(select(Study, trials.number, trials.datetime_start)
                           .join(OPTUNA_STUDIES, studies.study_name == Study.optuna_study_name)
                           .join(OPTUNA_TRIALS, trials.study_id == studies.study_id)
                           .where(cast(trials.state, String) == OptunaState.RUNNING.name)).all()
    return [(study, int(number), started) for study, number, started in rows]


def study_is_cancelled(session_factory: SessionFactory, study_id: str) -> bool:
    with session_factory() as session:
        return session.scalar(select(Study.status).where(Study.id == study_id)) == StudyStatus.cancelled


def cancel_study(session_factory: SessionFactory, study_id: str, tenant: str | None = DEFAULT_TENANT) -> Study:
    """Nothing new starts (queued attempts are cancelled); running attempts see it at their next eval."""
    with write_session(session_factory) as session:
        study = session.scalars(select(Study).where(Study.id == study_id).with_for_update()).one_or_none()
        if study is None or (tenant is not None and study.tenant != tenant):
            raise StudyNotFound(study_id)
        if study.status not in UNFINISHED_STUDY:
            raise StudyAlreadyFinished(f"study {study_id} is already {study.status}; only queued or running "
                                       "studies can be cancelled")
        now = utcnow()
        session.execute(update(TrialAttempt)
                        .where(TrialAttempt.study_id == study_id, TrialAttempt.state == TrialState.queued)
                        .values(state=TrialState.cancelled, finished_at=now))
        study.status = StudyStatus.cancelled
        study.finished_at = now
        add_event(session, study_id, EventType.study_finished, {"status": StudyStatus.cancelled})
    return study


def spec_warnings(spec: Any, data_root: Path | None) -> list[str]:
    """The core's warnings about a resolved spec's parametrization (depth_mup on multi-layer blocks)."""
    return list(_warnings_of_spec(spec.model_dump_json(), data_root))


@lru_cache(maxsize=256)
def _warnings_of_spec(spec_json: str, data_root: Path | None) -> tuple[str, ...]:
    """Memoised by the spec's JSON: the check builds and classifies a model (~10 ms), and every study GET asks."""
    spec = STUDY_SPEC.validate_json(spec_json)
    model, dataset = getattr(spec, "model", None), getattr(spec, "dataset", None)
    if model is None or dataset is None or getattr(spec, "parametrization", None) is None:
        return ()
    return tuple(parametrization_warnings(model.family, dataset_spec(dataset.name, dataset.args, data_root),
                                          model.args, Shape(**model.base.model_dump()), spec.parametrization,
                                          spec.parametrization_options))
