"""GET /v1/studies/{id}/events: the study's persisted events as Server-Sent Events, resumable with Last-Event-ID.

The stream polls ``st_events`` (works the same on SQLite and PostgreSQL, and across API replicas):
every row is sent once in id order, ``id:`` being the row id, so a client that reconnects with
``Last-Event-ID`` continues exactly where it left off. It ends after ``study_finished``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, status
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from service.api.auth import UNAUTHORIZED, CurrentPrincipal
from service.api.state import ServiceState, service_state
from service.models import UNFINISHED_STUDY, Event, EventType, Study
from service.studies import StudyNotFound, get_study

router = APIRouter(prefix="/v1/studies", tags=["events"], responses=UNAUTHORIZED)
State = Annotated[ServiceState, Depends(service_state)]

POLL_S = 0.5
KEEPALIVE_S = 15.0
BATCH = 500
RECONNECT_MS = 2000
MAX_EVENT_ID = 2**62  # event ids are 64-bit integers in SQLite and PostgreSQL


def event_json(event: Event) -> dict[str, Any]:
    return {"id": event.id, "type": event.type, "study_id": event.study_id, "trial_id": event.trial_id,
            "created_at": event.created_at.isoformat(), "payload": event.payload}


def sse_frame(event: Event) -> str:
    return f"id: {event.id}\nevent: {event.type}\ndata: {json.dumps(event_json(event))}\n\n"


def _poll(state: ServiceState, study_id: str, after: int) -> tuple[list[Event], bool]:
    """Events after ``after``, and whether the study had already finished before they were read.

    The status is read first: the finishing transaction also writes ``study_finished``, so when the
    status says finished, every event up to the end is already visible to the query that follows.
    """
    with state.read_sessions() as session:
        study_status = session.scalar(select(Study.status).where(Study.id == study_id))
        events = session.scalars(select(Event).where(Event.study_id == study_id, Event.id > after)
                                 .order_by(Event.id).limit(BATCH)).all()
        return list(events), study_status not in UNFINISHED_STUDY


async def event_stream(state: ServiceState, study_id: str, after: int, request: Request) -> AsyncIterator[str]:
    yield f"retry: {RECONNECT_MS}\n\n"
    last_sent = time.monotonic()
    while not await request.is_disconnected():
        events, finished = await run_in_threadpool(_poll, state, study_id, after)
        for event in events:
            yield sse_frame(event)
            after = event.id
            if event.type == EventType.study_finished:
                return
        if events:
            last_sent = time.monotonic()
            continue
        if finished:
            return
        if time.monotonic() - last_sent >= KEEPALIVE_S:
            yield ": keep-alive\n\n"
            last_sent = time.monotonic()
        await asyncio.sleep(POLL_S)


@router.get("/{study_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "`id:` event row id, `event:` type, `data:` JSON"},
                       404: {"description": "no study with this id"}},
            summary="Live study events (Server-Sent Events); resume with Last-Event-ID, ends after study_finished")
async def get_events(study_id: str, request: Request, state: State, principal: CurrentPrincipal,
                     last_event_id: Annotated[int | None, Header(alias="Last-Event-ID", ge=0, le=MAX_EVENT_ID)] = None,
                     after: Annotated[int | None, Query(ge=0, le=MAX_EVENT_ID, description="same as Last-Event-ID")] = None,
                     ) -> StreamingResponse:
    def exists() -> None:
        with state.read_sessions() as session:
            get_study(session, study_id, principal.tenant_scope)

    try:
        await run_in_threadpool(exists)
    except StudyNotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no study with id {study_id}") from None
    start = last_event_id if last_event_id is not None else (after or 0)
    return StreamingResponse(event_stream(state, study_id, start, request), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
