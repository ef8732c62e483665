"""scaletune's own tables (prefixed ``st_``; Optuna's RDB storage owns the unprefixed names in the same database)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on both backends (SQLite drops tzinfo; we put it back)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class StudyStatus(StrEnum):
    queued = "queued"
    running = "running"
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"


UNFINISHED_STUDY = (StudyStatus.queued, StudyStatus.running)


class TrialState(StrEnum):
    queued = "queued"
    running = "running"
    complete = "complete"
    pruned = "pruned"
    failed = "failed"
    diverged = "diverged"
    cancelled = "cancelled"


IN_FLIGHT = (TrialState.queued, TrialState.running)
TERMINAL = (TrialState.complete, TrialState.pruned, TrialState.failed, TrialState.diverged, TrialState.cancelled)


class EventType(StrEnum):
    trial_started = "trial_started"
    trial_reported = "trial_reported"
    trial_finished = "trial_finished"
    study_finished = "study_finished"


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON, list[Any]: JSON}


class Study(Base):
    __tablename__ = "st_studies"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(32))
    spec: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16), default=StudyStatus.queued)
    tenant: Mapped[str] = mapped_column(String(100), default="default")
    optuna_study_name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None]
    best_value: Mapped[float | None] = mapped_column(Float)
    best_params: Mapped[dict[str, Any] | None]
    error: Mapped[str | None] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str | None] = mapped_column(String(64), doc="sha256 of the submitted spec, canonical JSON")

    __table_args__ = (
        Index("ix_st_studies_tenant_created", "tenant", "created_at"),
        Index("ix_st_studies_tenant_status_created", "tenant", "status", "created_at"),
        Index("ix_st_studies_tenant_idempotency_key", "tenant", "idempotency_key", unique=True),
    )


class TrialAttempt(Base):
    """One row per attempt; a retry is a new row pointing at the attempt it replaces."""

    __tablename__ = "st_trials"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    study_id: Mapped[str] = mapped_column(ForeignKey("st_studies.id", ondelete="CASCADE"))
    number: Mapped[int | None] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    retry_of: Mapped[str | None] = mapped_column(ForeignKey("st_trials.id"))
    state: Mapped[str] = mapped_column(String(16), default=TrialState.queued)
    params: Mapped[dict[str, Any] | None]
    value: Mapped[float | None] = mapped_column(Float)
    intermediate: Mapped[list[Any]] = mapped_column(default=list)
    failure_reason: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(200))
    task_id: Mapped[str | None] = mapped_column(
        String(200), doc="the request that started it: the Celery task's id, or an ask's Idempotency-Key")
    heartbeat_at: Mapped[datetime | None]
    lease_expires_at: Mapped[datetime | None] = mapped_column(
        doc="set for trials handed out over ask/tell: failed as lease_expired unless renewed by then")
    queued_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    flops: Mapped[float | None] = mapped_column(Float)
    seconds: Mapped[float | None] = mapped_column(Float)

    __table_args__ = (
        Index("ix_st_trials_study_queued_id", "study_id", "queued_at", "id"),  # a listing's order, to the last key
        Index("ix_st_trials_study_state", "study_id", "state"),
        Index("ix_st_trials_study_number", "study_id", "number", unique=True),
        Index("ix_st_trials_state_heartbeat", "state", "heartbeat_at"),
        Index("ix_st_trials_state_lease", "state", "lease_expires_at"),
        Index("ix_st_trials_retry_of", "retry_of"),
    )


class Event(Base):
    __tablename__ = "st_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_id: Mapped[str] = mapped_column(ForeignKey("st_studies.id", ondelete="CASCADE"))
    trial_id: Mapped[str | None] = mapped_column(ForeignKey("st_trials.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(32))
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_st_events_study_id", "study_id", "id"),)


class ApiToken(Base):
    """An API token: ``id`` is the public selector inside the token, ``hash`` the sha256 of its secret part."""

    __tablename__ = "st_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    tenant: Mapped[str] = mapped_column(String(100))
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    expires_at: Mapped[datetime | None] = mapped_column(default=None)  # None: never
