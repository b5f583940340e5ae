"""item_failures: per-item retries with backoff, then a quarantine (service/quarantine.py)

Existing terminal failures become quarantined items, so an operator sees them and can
replay them: effects left ``failed`` (state ``quarantined`` now) and inbox events whose
handler failed for good (an ``error:`` outcome).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 09:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('item_failures',
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('ref', sa.String(length=400), nullable=False),
    sa.Column('job_id', sa.String(length=64), nullable=True),
    sa.Column('failures', sa.Integer(), nullable=False),
    sa.Column('last_error', sa.String(length=300), nullable=False),
    sa.Column('first_failed_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_failed_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('quarantined_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('source', 'ref', name=op.f('pk_item_failures'))
    )
    with op.batch_alter_table('item_failures') as batch:
        batch.create_index('ix_item_failures_quarantined', ['quarantined_at'], unique=False)
    # Terminal failures recorded before this table existed: quarantined, so they are listed.
    op.execute("""
        INSERT INTO item_failures (source, ref, job_id, failures, last_error, first_failed_at, last_failed_at,
                                   next_attempt_at, quarantined_at)
        SELECT 'effect', CAST(id AS VARCHAR(400)), job_id, attempts, COALESCE(SUBSTR(last_error, 1, 300), 'failed'),
               created_at, next_attempt_at, next_attempt_at, next_attempt_at
        FROM escrow_effects WHERE state = 'failed'
    """)
    op.execute("UPDATE escrow_effects SET state = 'quarantined' WHERE state = 'failed'")
    op.execute("""
        INSERT INTO item_failures (source, ref, job_id, failures, last_error, first_failed_at, last_failed_at,
                                   next_attempt_at, quarantined_at)
        SELECT 'inbox', id, NULL, attempts, SUBSTR(outcome, 8, 300), received_at, handled_at, handled_at, handled_at
        FROM nostr_inbox WHERE outcome LIKE 'error:%' AND handled_at IS NOT NULL
    """)


def downgrade() -> None:
    op.execute("UPDATE escrow_effects SET state = 'failed' WHERE state = 'quarantined'")
    op.execute("UPDATE nostr_deliveries SET state = 'gave_up' WHERE state = 'quarantined'")
    with op.batch_alter_table('item_failures') as batch:
        batch.drop_index('ix_item_failures_quarantined')
    op.drop_table('item_failures')
