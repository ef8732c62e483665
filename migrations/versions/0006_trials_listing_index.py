"""A study's trials are listed by (queued_at, id): the index carries id too, so a listing needs no sort and an
offset skips rows in the index alone.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index('ix_st_trials_study_queued_id', 'st_trials', ['study_id', 'queued_at', 'id'])
    op.drop_index('ix_st_trials_study_queued', table_name='st_trials')


def downgrade() -> None:
    op.create_index('ix_st_trials_study_queued', 'st_trials', ['study_id', 'queued_at'])
    op.drop_index('ix_st_trials_study_queued_id', table_name='st_trials')
