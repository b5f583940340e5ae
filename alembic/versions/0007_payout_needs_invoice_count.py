"""payout needs_invoice_count: every return to needs_invoice is a new outcome

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28 09:05:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('ln_payouts') as batch:
        batch.add_column(sa.Column('needs_invoice_count', sa.Integer(), server_default='0', nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('ln_payouts') as batch:
        batch.drop_column('needs_invoice_count')
