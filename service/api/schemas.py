"""Response bodies of the HTTP API (typed, so /docs documents them)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, Field
from sqlalchemy import Row
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

from service.models import Study, TrialAttempt
from service.kinds.registry import STUDY_SPEC, SUMMARY_KINDS, StudyResult, StudySpec


class StudyLinks(BaseModel):
    self: str
    trials: str
    cancel: str


def study_links(study_id: str) -> StudyLinks:
    base = f"/v1/studies/{study_id}"
    return StudyLinks(self=base, trials=f"{base}/trials", cancel=f"{base}/cancel")


class StudyCreated(BaseModel):
    id: str
    status: str
    links: StudyLinks
    warnings: list[str] = Field(default_factory=list, description="what to know about this spec before it runs "
                                                                  "(e.g. depth_mup with multi-layer blocks)")


class StudySummary(BaseModel):
    id: str
    short_id: str = Field(description="the shortest prefix of id (8 characters or more) that no other study you "
                                      "can see shares; every route and CLI command takes it in place of the id")
    name: str
    kind: str
    status: str
    n_trials: int
    best_value: float | None
    created_at: datetime
    finished_at: datetime | None
    links: StudyLinks

    @classmethod
    def of(cls, study: Row[Any], short_id: str) -> StudySummary:
        """From a row of ``STUDY_SUMMARY_COLUMNS``."""
        return cls(id=study.id, short_id=short_id, name=study.name, kind=study.kind, status=study.status,
                   n_trials=study.spec["n_trials"], best_value=study.best_value, created_at=study.created_at,
                   finished_at=study.finished_at, links=study_links(study.id))


# What StudySummary.of reads: a list selects just these rather than whole ORM objects. (The spec is read whole:
# a JSON path in SQL made PostgreSQL's generic plan for LIMIT $n evaluate it on every row of a full sort.)
STUDY_SUMMARY_COLUMNS = (Study.id, Study.name, Study.kind, Study.status, Study.spec, Study.best_value,
                         Study.created_at, Study.finished_at)


class StudyPage(BaseModel):
    items: list[StudySummary]
    total: int = Field(description="studies matching the filter, over all pages")
    limit: int
    offset: int


class StudyDetail(BaseModel):
    id: str
    name: str
    kind: str
    status: str
    spec: StudySpec
    trial_counts: dict[str, int] = Field(description="attempts per state (a retried trial counts once per attempt)")
    best_value: float | None
    best_params: dict[str, Any] | None
    error: str | None
    optuna_study_name: str = Field(description="open it with optuna-dashboard on the same database")
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    result: StudyResult | None = Field(
        None, description=f"once a {' or '.join(SUMMARY_KINDS)} study has completed: its kind's summary")
    links: StudyLinks
    warnings: list[str] = Field(default_factory=list, description="what to know about this spec "
                                                                  "(e.g. depth_mup with multi-layer blocks)")

    @classmethod
    def of(cls, study: Study, counts: dict[str, int], result: dict[str, Any] | None = None,
           warnings: list[str] | None = None) -> StudyDetail:
        return cls(id=study.id, name=study.name, kind=study.kind, status=study.status, warnings=warnings or [],
                   spec=STUDY_SPEC.validate_python(study.spec), trial_counts=counts, best_value=study.best_value,
                   best_params=study.best_params, error=study.error, optuna_study_name=study.optuna_study_name,
                   created_at=study.created_at, updated_at=study.updated_at, finished_at=study.finished_at,
                   result=result, links=study_links(study.id))


# A TypedDict, not a model (same schema, same JSON): a trials page validates 1,000 eval points, and a dict costs a
# third of a model instance. A docstring here would become the schema's description.
class EvalPointOut(TypedDict):
    step: int
    samples: Annotated[int | None, Field(None)]
    flops: Annotated[float | None, Field(None)]
    train_loss: Annotated[float | None, Field(None)]
    eval_loss: Annotated[float | None, Field(None)]
    value: Annotated[float | None, Field(None, description="what an external trial's own code reported at this step")]
    phase: Annotated[int | None, Field(None, description="a schedule run's phase at this eval")]
    shape: Annotated[dict[str, int] | None, Field(None, description="a schedule run's shape at this eval")]


class TrialOut(BaseModel):
    id: str = Field(description="the attempt's id")
    number: int | None = Field(description="Optuna's trial number; null until a worker has started it")
    attempt: int
    retry_of: str | None
    state: str
    params: dict[str, Any] | None
    value: float | None
    intermediate: list[EvalPointOut]
    failure_reason: str | None
    worker: str | None
    queued_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    duration_s: float | None = Field(description="training time in seconds")
    flops: float | None

    @classmethod
    def of(cls, attempt: TrialAttempt | Row[Any]) -> TrialOut:
        """From an attempt, or a row of its ``TRIAL_OUT_COLUMNS``."""
        return cls(id=attempt.id, number=attempt.number, attempt=attempt.attempt, retry_of=attempt.retry_of,
                   state=attempt.state, params=attempt.params, value=attempt.value,
                   intermediate=attempt.intermediate,
                   failure_reason=attempt.failure_reason, worker=attempt.worker, queued_at=attempt.queued_at,
                   started_at=attempt.started_at, finished_at=attempt.finished_at, duration_s=attempt.seconds,
                   flops=attempt.flops)


# What TrialOut.of reads of an attempt: a page selects just these rather than whole ORM objects.
TRIAL_OUT_COLUMNS = (TrialAttempt.id, TrialAttempt.number, TrialAttempt.attempt, TrialAttempt.retry_of,
                     TrialAttempt.state, TrialAttempt.params, TrialAttempt.value, TrialAttempt.intermediate,
                     TrialAttempt.failure_reason, TrialAttempt.worker, TrialAttempt.queued_at, TrialAttempt.started_at,
                     TrialAttempt.finished_at, TrialAttempt.seconds, TrialAttempt.flops)


class TrialPage(BaseModel):
    items: list[TrialOut]
    total: int
    limit: int
    offset: int
    next_cursor: str | None = Field(None, description="pass as cursor for the next page; null on the last page")


class FieldError(BaseModel):
    """One invalid field: where (``loc``, from the top of the request: body, query or path), why, which check."""

    loc: list[str | int]
    msg: str
    type: str


class Problem(BaseModel):
    """RFC 9457 problem details, the body of every error (media type ``application/problem+json``)."""

    type: str = Field("about:blank", description="about:blank: the status code says what kind of problem")
    title: str = Field(description="the HTTP status phrase")
    status: int
    detail: str = Field(description="what went wrong and what to do, in one readable sentence")
    instance: str | None = Field(None, description="the request path")
    errors: list[FieldError] | None = Field(None, description="a 422's invalid fields, each at its location")
    candidates: list[str] | None = Field(None, description="an ambiguous id prefix's matches (400)")
