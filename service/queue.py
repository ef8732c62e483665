"""The Celery client side: configure the app for our broker and send trial tasks by name (no task code imported)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from celery import Celery
from kombu import Queue

from service.settings import Settings

RUN_TRIAL_TASK = "scaletune.run_trial"
QUEUES = ("gpu", "cpu")  # a worker started without -Q consumes both

log = logging.getLogger(__name__)

Enqueue = Callable[[str, str], None]
"""Send the task for one attempt: ``enqueue(attempt_id, queue)``."""


def make_celery(settings: Settings) -> Celery:
    """One configuration for producers (API, reconciler) and workers, so both talk to the same broker the same way."""
    settings.ensure_broker_dirs()
    app = Celery("scaletune", broker=settings.BROKER_URL, set_as_current=False)
    app.conf.update(
        broker_transport_options=settings.broker_transport_options,
        broker_connection_retry_on_startup=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue="cpu",
        task_queues=[Queue(name) for name in QUEUES],
        task_ignore_result=True,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
    )
    return app


def trial_sender(app: Celery) -> Enqueue:
    def enqueue(attempt_id: str, queue: str) -> None:
        app.send_task(RUN_TRIAL_TASK, args=[attempt_id], queue=queue)
    return enqueue


def broker_reachable(app: Celery, timeout_s: float = 2.0) -> bool:
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout_s)
        return True
    except Exception as error:  # any transport failure means "not ready"
        log.warning("broker not reachable: %s", error)
        return False
