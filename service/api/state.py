"""What the routers share, built once in the app's lifespan and reached through ``request.app.state``."""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery
from fastapi import Request
from optuna.storages import BaseStorage
from sqlalchemy import Engine

from service.db import SessionFactory
from service.queue import Enqueue
from service.settings import Settings


@dataclass(frozen=True)
class ServiceState:
    settings: Settings
    engine: Engine
    session_factory: SessionFactory
    read_sessions: SessionFactory  # for requests that write nothing (``make_read_session_factory``)
    storage: BaseStorage
    celery: Celery
    enqueue: Enqueue


async def service_state(request: Request) -> ServiceState:
    """Async because it does no I/O: a sync dependency costs each request a hop to the thread pool."""
    state: ServiceState = request.app.state.service
    return state
