"""A study's trials page as JSON, each trial rendered once per version of its row and kept for the next page.

Rendering a trial (decoding its params and eval points, building ``TrialOut``, encoding it) was most of a page's
API CPU, and a trial's row stays the same from one poll to the next far more often than not. On PostgreSQL a row's
``xmin`` (the transaction that wrote this version of it) says whether it changed: a page reads its rows with their
``xmin`` and their JSON columns as text, and decodes and renders only the rows this process has not rendered at
that version. SQLite has no row version, so there every trial is rendered each time (the embedded default serves
one person).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from types import SimpleNamespace
from typing import Any

from pydantic import TypeAdapter
from pydantic_core import from_json, to_json
from sqlalchemy import ColumnElement, Text, cast, literal_column
from sqlalchemy.orm import Session

from service.api.schemas import TRIAL_OUT_COLUMNS, TrialOut
from service.models import TrialAttempt, TrialState
from service.trials import list_trials

MAX_CACHED_BYTES = 64 * 2**20  # per API process; a 10-point trial renders to ~1.7 KB
_TRIAL_JSON = TypeAdapter(TrialOut)
_JSON_COLUMNS = ("params", "intermediate")
# TRIAL_OUT_COLUMNS with the JSON ones as their stored text: decoded only for a trial that is rendered
_UNDECODED_COLUMNS = tuple(cast(c, Text).label(c.key) if c.key in _JSON_COLUMNS else c for c in TRIAL_OUT_COLUMNS)


class RenderedTrials:
    """Rendered trials by (attempt id, row version), least recently used first out past ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._entries: OrderedDict[tuple[str, str], bytes] = OrderedDict()
        self._lock = threading.Lock()  # sync endpoints run in the thread pool

    def get(self, key: tuple[str, str]) -> bytes | None:
        with self._lock:
            rendered = self._entries.get(key)
            if rendered is not None:
                self._entries.move_to_end(key)
            return rendered

    def put(self, key: tuple[str, str], rendered: bytes) -> None:
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = rendered
            self.size += len(rendered)
            while self.size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.size -= len(evicted)


RENDERED = RenderedTrials(MAX_CACHED_BYTES)


def render(row: Any) -> bytes:
    """One trial as the page's JSON shows it (a row of ``TRIAL_OUT_COLUMNS``)."""
    return _TRIAL_JSON.dump_json(TrialOut.of(row))


def row_version(session: Session) -> ColumnElement[str] | None:
    """What changes whenever a trial's row does, where the database has it (PostgreSQL's ``xmin``)."""
    if session.get_bind().dialect.name != "postgresql":
        return None
    return cast(literal_column(f"{TrialAttempt.__tablename__}.xmin"), Text).label("version")


def _render_undecoded(row: Any) -> bytes:
    """``render`` for a row of ``_UNDECODED_COLUMNS``."""
    decoded = {key: None if row._mapping[key] is None else from_json(row._mapping[key]) for key in _JSON_COLUMNS}
    return render(SimpleNamespace(**{**row._mapping, **decoded}))


def _rendered(row: Any) -> bytes:
    """The row's trial as rendered at this version of the row: kept from an earlier page, or rendered and kept."""
    key = (row.id, row.version)
    rendered = RENDERED.get(key)
    if rendered is None:
        rendered = _render_undecoded(row)
        RENDERED.put(key, rendered)
    return rendered


def trials_page_json(session: Session, study_id: str, limit: int, offset: int, state: TrialState | None,
                     cursor: str | None) -> bytes:
    """``TrialPage``'s JSON, byte for byte as pydantic encodes it; raises ``BadCursor`` as ``list_trials`` does."""
    version = row_version(session)
    columns = TRIAL_OUT_COLUMNS if version is None else (*_UNDECODED_COLUMNS, version)
    rows, total, next_cursor = list_trials(session, study_id, limit=limit, offset=offset, state=state,
                                           cursor=cursor, columns=columns)
    items = [render(row) if version is None else _rendered(row) for row in rows]
    return (b'{"items":[' + b",".join(items) + b'],"total":' + to_json(total) + b',"limit":' + to_json(limit)
            + b',"offset":' + to_json(offset) + b',"next_cursor":' + to_json(next_cursor) + b"}")
