"""Prometheus metrics: trial and study counts, queue depth and trial durations read from the database at scrape
time (so every worker's work counts, whichever process serves /metrics), plus this process's reconciler actions."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select

from service.api.state import ServiceState, service_state
from service.db import SessionFactory
from service.models import TERMINAL, Study, StudyStatus, TrialAttempt, TrialState

RECONCILER_ACTIONS = Counter("scaletune_reconciler_actions", "What the reconciler did, by kind "
                             "(failed_stale, retried, lease_expired, resent, dispatched)", ["kind"])
DURATION_BUCKETS_S = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 24 * 3600.0)


class DatabaseCollector(Collector):
    def __init__(self, session_factory: SessionFactory) -> None:
        self.session_factory = session_factory

    def collect(self) -> Iterator[Metric]:
        with self.session_factory() as session:
            trials = dict(session.execute(select(TrialAttempt.state, func.count()).group_by(TrialAttempt.state)).all())
            studies = dict(session.execute(select(Study.status, func.count()).group_by(Study.status)).all())
            queue = Study.spec["queue"].as_string()
            depth = dict(session.execute(select(queue, func.count()).select_from(TrialAttempt)
                                         .join(Study, Study.id == TrialAttempt.study_id)
                                         .where(TrialAttempt.state == TrialState.queued).group_by(queue)).all())
            finished = (TrialAttempt.state.in_(TERMINAL), TrialAttempt.seconds.is_not(None))
            row = session.execute(select(func.count(), func.coalesce(func.sum(TrialAttempt.seconds), 0.0),
                                         *[func.sum(case((TrialAttempt.seconds <= bound, 1), else_=0))
                                           for bound in DURATION_BUCKETS_S]).where(*finished)).one()
        by_state = GaugeMetricFamily("scaletune_trials", "Trial attempts by state", labels=["state"])
        for state in TrialState:
            by_state.add_metric([state.value], trials.get(state.value, 0))
        by_status = GaugeMetricFamily("scaletune_studies", "Studies by status", labels=["status"])
        for status in StudyStatus:
            by_status.add_metric([status.value], studies.get(status.value, 0))
        queued = GaugeMetricFamily("scaletune_queue_depth", "Attempts waiting for a worker, by queue",
                                   labels=["queue"])
        for name in ("cpu", "gpu"):
            queued.add_metric([name], depth.get(name, 0))
        count, total, *cumulative = row
        durations = HistogramMetricFamily("scaletune_trial_duration_seconds", "Training time of finished attempts")
        buckets = [(str(bound), int(n or 0)) for bound, n in zip(DURATION_BUCKETS_S, cumulative, strict=True)]
        durations.add_metric([], [*buckets, ("+Inf", int(count))], float(total))
        yield from (by_state, by_status, queued, durations)


router = APIRouter(tags=["health"])


@router.get("/metrics", summary="Prometheus metrics (aggregate counts only, no study contents)",
            response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(state: Annotated[ServiceState, Depends(service_state)]) -> Response:
    database = CollectorRegistry(auto_describe=False)
    database.register(DatabaseCollector(state.session_factory))
    return Response(generate_latest(REGISTRY) + generate_latest(database), media_type=CONTENT_TYPE_LATEST)
