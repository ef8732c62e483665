"""Per-tenant quotas: server-wide settings, overridden per tenant by ``SCALETUNE_TENANT_QUOTAS`` (JSON)."""

from __future__ import annotations

import hashlib

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.models import UNFINISHED_STUDY, Study
from service.settings import Settings


class ConcurrencyQuotaExceeded(RuntimeError):
    """The tenant already runs as many studies as it may (the API answers 429)."""


def spec_limits_for(settings: Settings, tenant: str) -> Settings:
    """Settings whose spec limits (trials per study, proxy parameters, steps) are this tenant's."""
    override = settings.TENANT_QUOTAS.get(tenant)
    if override is None:
        return settings
    changes = {"MAX_TRIALS": override.trials_per_study, "MAX_PROXY_PARAMS": override.proxy_params,
               "MAX_STEPS": override.steps}
    return settings.model_copy(update={key: value for key, value in changes.items() if value is not None})


def concurrent_studies_limit(settings: Settings, tenant: str) -> int:
    override = settings.TENANT_QUOTAS.get(tenant)
    if override is not None and override.concurrent_studies is not None:
        return override.concurrent_studies
    return settings.MAX_CONCURRENT_STUDIES


def _tenant_lock_key(tenant: str) -> int:
    """A stable signed 64-bit key for PostgreSQL's advisory locks, one per tenant."""
    digest = hashlib.sha256(f"scaletune.concurrent_studies:{tenant}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def check_concurrent_studies(session: Session, tenant: str, limit: int) -> None:
    """Raise when the tenant has ``limit`` unfinished studies; call inside the transaction that inserts the next.

    The count and the insert must not interleave with another submit of the same tenant. SQLite's writers are
    serial already (``write_session`` begins IMMEDIATE); on PostgreSQL a transaction-scoped advisory lock per
    tenant makes the next submitter wait here until this transaction ends, so its count sees this insert.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(_tenant_lock_key(tenant))))
    unfinished = session.scalar(select(func.count()).where(Study.tenant == tenant,
                                                           Study.status.in_(UNFINISHED_STUDY))) or 0
    if unfinished >= limit:
        raise ConcurrencyQuotaExceeded(
            f"tenant {tenant!r} already has {unfinished} unfinished studies and its limit of concurrent studies "
            f"is {limit}; wait for one to finish or cancel one")
