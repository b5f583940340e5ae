"""results in receipt order; a job's reply relays and NIP-40 expiration; jobs by creation time

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 22:30:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('escrow_results') as batch:
        # when the escrow first received the result (the order of ties; never the sender's created_at)
        batch.add_column(sa.Column('received_at', sa.DateTime(timezone=True), nullable=True))
        batch.create_index('ix_escrow_results_job_model', ['job_id', 'model_sha256'], unique=True)
    with op.batch_alter_table('escrow_jobs') as batch:
        batch.add_column(sa.Column('expires_at', sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column('reply_relays', sa.Text(), nullable=True))
        batch.create_index('ix_escrow_jobs_created_at', ['created_at'])
    with op.batch_alter_table('nostr_deliveries') as batch:
        batch.add_column(sa.Column('reply', sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table('nostr_deliveries') as batch:
        batch.drop_column('reply')
    with op.batch_alter_table('escrow_jobs') as batch:
        batch.drop_index('ix_escrow_jobs_created_at')
        batch.drop_column('reply_relays')
        batch.drop_column('expires_at')
    with op.batch_alter_table('escrow_results') as batch:
        batch.drop_index('ix_escrow_results_job_model')
        batch.drop_column('received_at')
