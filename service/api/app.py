"""The FastAPI application factory: wiring of settings, database, Optuna storage, broker client and routers."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api import asktell, check, events, health, plots, schedule, studies, tokens, transfer, web
from service.api.body_limit import BodySizeLimit
from service.api.problems import install_problem_details
from service.api.state import ServiceState
from service.api.study_ref import resolve_study_ref
from service.db import create_db_engine, database_is_current, make_read_session_factory, make_session_factory
from service.logging import log_context
from service.metrics import router as metrics_router
from service.optuna_study import get_storage
from service.queue import make_celery, trial_sender
from service.reconcile import reconcile_forever
from service.settings import Settings


log = logging.getLogger("service.api.requests")


class RequestLog:
    """One JSON line per request: method, path (never the query, which may carry a token), status, duration.

    Plain ASGI: Starlette's BaseHTTPMiddleware would pass every response body through a memory channel and a
    task of its own, a large share of a small request's CPU.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        method, path, status = scope["method"], scope["path"], [500]

        async def send_noting_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        parts = path.split("/")
        study_id = parts[3] if len(parts) > 3 and parts[1:3] == ["v1", "studies"] else None
        with log_context(study_id=study_id):
            await self.app(scope, receive, send_noting_status)
            log.info("%s %s %s", method, path, status[0],
                     extra={"fields": {"method": method, "path": path, "status": status[0],
                                       "duration_ms": round(1000 * (time.perf_counter() - started), 1)}})


class DatabaseNotMigrated(RuntimeError):
    pass


def _open_state(settings: Settings) -> ServiceState:
    if not database_is_current(settings.DATABASE_URL):
        raise DatabaseNotMigrated(f"the database at {settings.DATABASE_URL} is not at the current schema version; "
                                  "run `scaletune migrate` first")
    engine = create_db_engine(settings.DATABASE_URL)
    celery = make_celery(settings)
    return ServiceState(settings=settings, engine=engine, session_factory=make_session_factory(engine),
                        read_sessions=make_read_session_factory(engine),
                        storage=get_storage(settings.DATABASE_URL), celery=celery, enqueue=trial_sender(celery))


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app; on startup it refuses an unmigrated database, and optionally runs the reconciler thread."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.ensure_dirs()
        state = _open_state(settings)
        # Move everything loaded at startup (torch, Optuna, SQLAlchemy: millions of objects) out of the cyclic
        # GC's view: otherwise each full collection walks them all, a ~200 ms pause every ~100 trial pages.
        gc.freeze()
        app.state.service = state
        stop = threading.Event()
        reconciler = threading.Thread(target=reconcile_forever, args=(settings, stop), name="reconciler",
                                      daemon=True)
        if settings.RECONCILE_IN_API:
            reconciler.start()
        try:
            yield
        finally:
            stop.set()
            if reconciler.is_alive():
                reconciler.join()
            state.engine.dispose()

    app = FastAPI(title="scaletune", version="0.1.0", lifespan=lifespan,
                  description="Tune hyperparameters on small proxy models and transfer them to the large target.")
    app.add_middleware(BodySizeLimit, max_bytes=settings.MAX_REQUEST_BYTES)
    app.add_middleware(RequestLog)
    install_problem_details(app)
    app.include_router(health.router)
    app.include_router(metrics_router)
    app.include_router(web.router)
    app.include_router(tokens.router)
    for about_studies in (studies, asktell, events, plots, transfer, check, schedule):  # each takes an id prefix too
        app.include_router(about_studies.router, dependencies=[Depends(resolve_study_ref)])
    return app
