"""claim window: a payout waiting for its payee's invoice expires at claim_by (reminded at remind_at);
claim_round counts an operator's reopens

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-08 03:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0017'
down_revision = '0016'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # NULL claim_by: no window (payouts created before it, or FEDSTR_CLAIM_WINDOW_SECONDS=0): never expires.
    with op.batch_alter_table('ln_payouts') as batch:
        batch.add_column(sa.Column('claim_by', sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column('remind_at', sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column('claim_round', sa.Integer(), server_default='0', nullable=False))
    op.create_index('ix_ln_payouts_claim_by', 'ln_payouts', ['state', 'claim_by'])


def downgrade() -> None:
    op.drop_index('ix_ln_payouts_claim_by', table_name='ln_payouts')
    with op.batch_alter_table('ln_payouts') as batch:
        batch.drop_column('claim_round')
        batch.drop_column('remind_at')
        batch.drop_column('claim_by')
