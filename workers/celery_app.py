"""The Celery app workers run (``celery -A workers.celery_app worker -Q gpu,cpu --concurrency 1``)."""

from __future__ import annotations

from typing import Any

from celery.signals import setup_logging

from service.logging import configure_logging
from service.queue import make_celery
from service.settings import get_settings

app = make_celery(get_settings())
app.conf.include = ["workers.tasks"]


@setup_logging.connect
def _json_logs(**_kwargs: Any) -> None:
    """Connecting here stops Celery from installing its own log format: worker lines are JSON like the API's."""
    configure_logging("worker", get_settings().LOG_LEVEL)
