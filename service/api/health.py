"""Liveness and readiness probes."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from sqlalchemy import text

from service.api.state import ServiceState, service_state
from service.process_status import read_given_up
from service.queue import broker_reachable

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is alive")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _database_reachable(state: ServiceState) -> bool:
    try:
        with state.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return True
    except Exception:
        return False


@router.get("/readyz", summary="Database and broker are reachable and no process is in a crash loop (503 otherwise)",
            responses={503: {"description": "a dependency is down or a process gave up; the body says which"}})
def readyz(state: Annotated[ServiceState, Depends(service_state)]) -> JSONResponse:
    checks = {name: "ok" if ok else "unreachable" for name, ok in
              {"database": _database_reachable(state), "broker": broker_reachable(state.celery)}.items()}
    if state.settings.PROCESS_STATUS_FILE is not None:
        checks |= read_given_up(state.settings.PROCESS_STATUS_FILE)
    ready = all(check == "ok" for check in checks.values())
    return JSONResponse({"status": "ready" if ready else "not ready", "checks": checks},
                        status_code=200 if ready else 503)
