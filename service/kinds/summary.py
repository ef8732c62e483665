"""What GET /v1/studies/{id} says about a completed study beyond its best value, kept once computed."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from service.kinds.registry import kind_of, spec_of
from service.models import Study, StudyStatus

CACHE_SIZE = 512
_cache: OrderedDict[str, dict[str, Any] | None] = OrderedDict()
_lock = threading.Lock()


def finished_result(session: Session, study: Study, data_root: Path | None) -> dict[str, Any] | None:
    """The kind's summary of a completed study (a verdict, a schedule); None for unfinished ones and kinds without.

    Kept per study after the first call: once a study has completed its grid trials never change (schedule
    runs, which may come later, are not part of it).
    """
    if study.status != StudyStatus.completed:
        return None
    with _lock:
        if study.id in _cache:
            _cache.move_to_end(study.id)
            return _cache[study.id]
    result = kind_of(study).summary(session, study, spec_of(study), data_root)
    with _lock:
        _cache[study.id] = result
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return result
