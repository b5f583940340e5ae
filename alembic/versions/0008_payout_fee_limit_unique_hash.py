"""payouts: the engine's own fee limit per payout; a payment hash belongs to one payout

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 10:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('ln_payouts') as batch:
        batch.add_column(sa.Column('fee_limit_msat', sa.BigInteger(), nullable=True))
        # NULL (not paid yet) may repeat; a hash that paid a payout pays no other. An existing
        # database with two payouts sharing a hash (the bug this closes) must be repaired first.
        batch.create_index('uq_ln_payouts_payment_hash', ['payment_hash'], unique=True)


def downgrade() -> None:
    with op.batch_alter_table('ln_payouts') as batch:
        batch.drop_index('uq_ln_payouts_payment_hash')
        batch.drop_column('fee_limit_msat')
