"""Celery task definitions; the work itself is in ``workers.trial_task`` so it can run without Celery."""

from __future__ import annotations

from functools import lru_cache

from celery import Task

from service.queue import RUN_TRIAL_TASK, trial_sender
from service.settings import get_settings
from workers.celery_app import app
from workers.running import celery_worker_is_running
from workers.trial_task import WorkerContext, run_attempt


@lru_cache(maxsize=1)
def worker_context() -> WorkerContext:
    """Built on first use in the worker process (after fork), so no database connection crosses a fork."""
    return WorkerContext.from_settings(get_settings(), trial_sender(app), carry_on=celery_worker_is_running)


@app.task(name=RUN_TRIAL_TASK, bind=True)
def run_trial_task(self: Task, attempt_id: str) -> str | None:
    state = run_attempt(worker_context(), attempt_id, task_id=self.request.id)
    return None if state is None else str(state)
