"""liveness intervals (the escrow's heartbeat) and the jobs' extended deadlines

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-07 23:50:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # When the escrow was live (service/liveness.py): the gaps between intervals are its outages.
    op.create_table(
        'escrow_liveness',
        sa.Column('id', sa.String(length=32), nullable=False),
        sa.Column('replica', sa.String(length=64), nullable=False),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('last_beat_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_escrow_liveness_last_beat_at', 'escrow_liveness', ['last_beat_at'])
    # A deadline moved by an outage (null: the request's own, in results_deadline / validation_deadline).
    with op.batch_alter_table('escrow_jobs') as batch:
        batch.add_column(sa.Column('results_extended_to', sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column('validation_extended_to', sa.BigInteger(), nullable=True))
        # when they were last moved: the outages before it are in them already
        batch.add_column(sa.Column('deadlines_extended_at', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('escrow_jobs') as batch:
        batch.drop_column('deadlines_extended_at')
        batch.drop_column('validation_extended_to')
        batch.drop_column('results_extended_to')
    op.drop_index('ix_escrow_liveness_last_beat_at', table_name='escrow_liveness')
    op.drop_table('escrow_liveness')
