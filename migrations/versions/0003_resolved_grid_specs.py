"""Grid studies (transfer_check, shape_schedule) store their spec resolved: the source tune study's setup and
tuned values written in, the submitted ``source`` kept as provenance. Until now the service re-resolved it on
every read.

The rule is the one the service applied on every read (service/kinds/setup.py at revision 0002): each setup
field the spec leaves out is the source's (the model without its proxy shape), and the hyperparameters are the
source's fixed values, then its best completed trial's params, then the spec's own. A source that cannot give
a setup (it could not at submission either) leaves the row as it is.

Downgrade keeps the rows: the release before reads a resolved spec as it reads any spec with a source (its
re-resolution keeps every field already given).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

GRID_KINDS = ("transfer_check", "shape_schedule")
SETUP_FIELDS = ("parametrization", "parametrization_options", "optimizer", "dataset", "budget")

studies = sa.table("st_studies", sa.column("id", sa.String), sa.column("kind", sa.String),
                   sa.column("spec", sa.JSON), sa.column("status", sa.String), sa.column("tenant", sa.String))
trials = sa.table("st_trials", sa.column("study_id", sa.String), sa.column("state", sa.String),
                  sa.column("params", sa.JSON), sa.column("value", sa.Float), sa.column("finished_at", sa.DateTime))


def _best_params(connection: sa.Connection, study_id: str, minimize: bool) -> dict[str, Any] | None:
    """The best completed trial's params (earliest on ties), as the service picked it; None if there is none."""
    order = trials.c.value.asc() if minimize else trials.c.value.desc()
    row = connection.execute(sa.select(trials.c.params).where(
        trials.c.study_id == study_id, trials.c.state == "complete", trials.c.value.is_not(None))
        .order_by(order, trials.c.finished_at).limit(1)).first()
    return None if row is None else dict(row.params or {})


def _resolved(connection: sa.Connection, spec: dict[str, Any], tenant: str) -> dict[str, Any] | None:
    source_id = (spec.get("source") or {}).get("study_id")
    if source_id is None:
        return None
    source = connection.execute(sa.select(studies.c.kind, studies.c.spec, studies.c.status, studies.c.tenant)
                                .where(studies.c.id == source_id)).first()
    if source is None or source.tenant != tenant or source.kind != "tune" or source.status != "completed":
        return None
    setup = source.spec
    best = _best_params(connection, source_id, setup["objective"]["direction"] == "minimize")
    if best is None:
        return None
    model = {"family": setup["model"]["family"], "base": setup["model"]["base"], "args": setup["model"]["args"]}
    tuned = {**setup.get("hyperparameters", {}), **{name: float(value) for name, value in best.items()}}
    return {**spec, "model": spec.get("model") or model,
            **{name: spec.get(name) or setup[name] for name in SETUP_FIELDS},
            "hyperparameters": {**tuned, **spec.get("hyperparameters", {})}}


def upgrade() -> None:
    connection = op.get_bind()
    rows = connection.execute(sa.select(studies.c.id, studies.c.spec, studies.c.tenant)
                              .where(studies.c.kind.in_(GRID_KINDS))).all()
    for row in rows:
        resolved = _resolved(connection, row.spec, row.tenant)
        if resolved is not None:
            connection.execute(sa.update(studies).where(studies.c.id == row.id).values(spec=resolved))


def downgrade() -> None:
    """Nothing to undo: revision 0002's service reads the resolved specs as they are (see above)."""
