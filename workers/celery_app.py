"""The Celery app workers run (``celery -A workers.celery_app worker -Q gpu,cpu --concurrency 1``)."""

from __future__ import annotations

from service.queue import make_celery
from service.settings import get_settings

app = make_celery(get_settings())
app.conf.include = ["workers.tasks"]
