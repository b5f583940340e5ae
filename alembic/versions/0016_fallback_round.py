"""the fallback evaluation round: its request, deadline and validators on the job

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-08 03:05:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0016'
down_revision = '0015'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('escrow_jobs') as batch:
        batch.add_column(sa.Column('fallback_request_id', sa.String(length=64), nullable=True))
        # the fallback round's deadline in force (an outage may move it)
        batch.add_column(sa.Column('fallback_deadline', sa.BigInteger(), nullable=True))
        # JSON list of the pool validators it names
        batch.add_column(sa.Column('fallback_validators', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('escrow_jobs') as batch:
        batch.drop_column('fallback_validators')
        batch.drop_column('fallback_deadline')
        batch.drop_column('fallback_request_id')
