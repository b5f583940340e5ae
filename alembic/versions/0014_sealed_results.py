"""sealed results: a result's ciphertext and key commitments, its key for the customer, when it was released

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07 22:40:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A sealed result (protocol.md §5a): model_url is its ciphertext's URL; the content key is kept
    # only re-encrypted to the customer (NIP-44 escrow -> customer), never in the clear.
    with op.batch_alter_table('escrow_results') as batch:
        batch.add_column(sa.Column('ciphertext_sha256', sa.String(length=64), nullable=True))
        batch.add_column(sa.Column('key_sha256', sa.String(length=64), nullable=True))
        batch.add_column(sa.Column('customer_key', sa.Text(), nullable=True))
        batch.add_column(sa.Column('key_released_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('escrow_results') as batch:
        batch.drop_column('key_released_at')
        batch.drop_column('customer_key')
        batch.drop_column('key_sha256')
        batch.drop_column('ciphertext_sha256')
