"""The Celery app workers run (``celery -A workers.celery_app worker -Q gpu,cpu --concurrency 1``)."""

from __future__ import annotations

from typing import Any

from celery.signals import setup_logging, worker_init

from service.logging import configure_logging
from service.queue import make_celery
from service.settings import get_settings
from workers.preflight import check_worker_host

app = make_celery(get_settings())
app.conf.include = ["workers.tasks"]


@setup_logging.connect
def _json_logs(**_kwargs: Any) -> None:
    """Connecting here stops Celery from installing its own log format: worker lines are JSON like the API's."""
    configure_logging("worker", get_settings().LOG_LEVEL)


@worker_init.connect
def _check_host(sender: Any, **_kwargs: Any) -> None:
    """Refuse to start, saying what to fix, rather than fail the first trial (queues come from -Q by now)."""
    configure_logging("worker", get_settings().LOG_LEVEL)  # Celery sets up logging only after this signal
    check_worker_host(get_settings(), sender.app, set(sender.app.amqp.queues.consume_from or sender.app.amqp.queues))
