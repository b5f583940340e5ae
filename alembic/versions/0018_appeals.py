"""appeals: the appeal window's deadline, the appeal (JSON) and its round's deadline on the job; an
invoice's purpose (the job's own, or an appeal fee)

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-08 04:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0018'
down_revision = '0017'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL appeal_deadline: decided without an appeal window (or before appeals existed).
    with op.batch_alter_table('escrow_jobs') as batch:
        batch.add_column(sa.Column('appeal_deadline', sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column('appeal_round_deadline', sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column('appeal', sa.Text(), nullable=True))
    with op.batch_alter_table('ln_invoices') as batch:
        batch.add_column(sa.Column('purpose', sa.String(length=16), server_default='job', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('ln_invoices') as batch:
        batch.drop_column('purpose')
    with op.batch_alter_table('escrow_jobs') as batch:
        batch.drop_column('appeal')
        batch.drop_column('appeal_round_deadline')
        batch.drop_column('appeal_deadline')
