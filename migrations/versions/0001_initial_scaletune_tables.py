"""Initial scaletune tables: studies, trial attempts, events.

Revision ID: 0001
Revises: (none)
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('st_studies',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('spec', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('tenant', sa.String(length=100), nullable=False),
    sa.Column('optuna_study_name', sa.String(length=200), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('best_value', sa.Float(), nullable=True),
    sa.Column('best_params', sa.JSON(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('optuna_study_name')
    )
    with op.batch_alter_table('st_studies', schema=None) as batch_op:
        batch_op.create_index('ix_st_studies_tenant_created', ['tenant', 'created_at'], unique=False)
        batch_op.create_index('ix_st_studies_tenant_status_created', ['tenant', 'status', 'created_at'], unique=False)

    op.create_table('st_trials',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('study_id', sa.String(length=36), nullable=False),
    sa.Column('number', sa.Integer(), nullable=True),
    sa.Column('attempt', sa.Integer(), nullable=False),
    sa.Column('retry_of', sa.String(length=36), nullable=True),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('params', sa.JSON(), nullable=True),
    sa.Column('value', sa.Float(), nullable=True),
    sa.Column('intermediate', sa.JSON(), nullable=False),
    sa.Column('failure_reason', sa.Text(), nullable=True),
    sa.Column('worker', sa.String(length=200), nullable=True),
    sa.Column('task_id', sa.String(length=200), nullable=True),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('queued_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('flops', sa.Float(), nullable=True),
    sa.Column('seconds', sa.Float(), nullable=True),
    sa.ForeignKeyConstraint(['retry_of'], ['st_trials.id'], ),
    sa.ForeignKeyConstraint(['study_id'], ['st_studies.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('st_trials', schema=None) as batch_op:
        batch_op.create_index('ix_st_trials_retry_of', ['retry_of'], unique=False)
        batch_op.create_index('ix_st_trials_state_heartbeat', ['state', 'heartbeat_at'], unique=False)
        batch_op.create_index('ix_st_trials_study_number', ['study_id', 'number'], unique=True)
        batch_op.create_index('ix_st_trials_study_queued', ['study_id', 'queued_at'], unique=False)
        batch_op.create_index('ix_st_trials_study_state', ['study_id', 'state'], unique=False)

    op.create_table('st_events',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('study_id', sa.String(length=36), nullable=False),
    sa.Column('trial_id', sa.String(length=36), nullable=True),
    sa.Column('type', sa.String(length=32), nullable=False),
    sa.Column('payload', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['study_id'], ['st_studies.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['trial_id'], ['st_trials.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('st_events', schema=None) as batch_op:
        batch_op.create_index('ix_st_events_study_id', ['study_id', 'id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('st_events', schema=None) as batch_op:
        batch_op.drop_index('ix_st_events_study_id')

    op.drop_table('st_events')
    with op.batch_alter_table('st_trials', schema=None) as batch_op:
        batch_op.drop_index('ix_st_trials_study_state')
        batch_op.drop_index('ix_st_trials_study_queued')
        batch_op.drop_index('ix_st_trials_study_number')
        batch_op.drop_index('ix_st_trials_state_heartbeat')
        batch_op.drop_index('ix_st_trials_retry_of')

    op.drop_table('st_trials')
    with op.batch_alter_table('st_studies', schema=None) as batch_op:
        batch_op.drop_index('ix_st_studies_tenant_status_created')
        batch_op.drop_index('ix_st_studies_tenant_created')

    op.drop_table('st_studies')
