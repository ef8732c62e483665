"""Structured JSON logs, one object per line, carrying the ids (study, trial) of the work a line is about."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

_ids: ContextVar[dict[str, str]] = ContextVar("scaletune_log_ids", default={})  # noqa: B039 - never mutated


@contextmanager
def log_context(**ids: str | None) -> Iterator[None]:
    """Every log line written inside (in this thread or task) carries these ids, e.g. study_id and trial_id."""
    token = _ids.set({**_ids.get(), **{key: value for key, value in ids.items() if value is not None}})
    try:
        yield
    finally:
        _ids.reset(token)


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "process", "logger", "msg", <ids>, "exc"?}``; ``extra={"study_id": ...}`` works too."""

    ID_FIELDS = ("study_id", "trial_id", "attempt", "tenant")

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname, "process": self.process, "logger": record.name, "msg": record.getMessage(),
            **_ids.get()}
        entry.update({key: record.__dict__[key] for key in self.ID_FIELDS if key in record.__dict__})
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(process: str, level: str = "INFO") -> None:
    """Route every logger (ours, Celery's, uvicorn's) through one JSON handler on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(process))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
