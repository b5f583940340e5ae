"""nostr inbox rejected outbox nip98

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 05:38:49.074913
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('nostr_inbox',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.Integer(), nullable=False),
    sa.Column('pubkey', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.Column('raw', sa.Text(), nullable=False),
    sa.Column('source', sa.String(length=300), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('handled_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('outcome', sa.String(length=500), nullable=True),
    sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_nostr_inbox'))
    )
    with op.batch_alter_table('nostr_inbox', schema=None) as batch_op:
        batch_op.create_index('ix_nostr_inbox_kind_created', ['kind', 'created_at'], unique=False)
        batch_op.create_index('ix_nostr_inbox_pending', ['handled_at', 'received_at'], unique=False)

    op.create_table('nostr_nip98_seen',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('expires_at', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_nostr_nip98_seen'))
    )
    with op.batch_alter_table('nostr_nip98_seen', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_nostr_nip98_seen_expires_at'), ['expires_at'], unique=False)

    op.create_table('nostr_outbox',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.Integer(), nullable=False),
    sa.Column('raw', sa.Text(), nullable=False),
    sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('done_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_nostr_outbox'))
    )
    op.create_table('nostr_rejected',
    sa.Column('seq', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('event_id', sa.String(length=64), nullable=True),
    sa.Column('source', sa.String(length=300), nullable=False),
    sa.Column('reason', sa.String(length=64), nullable=False),
    sa.Column('detail', sa.String(length=500), nullable=False),
    sa.Column('raw', sa.Text(), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('seq', name=op.f('pk_nostr_rejected'))
    )
    op.create_table('nostr_deliveries',
    sa.Column('event_id', sa.String(length=64), nullable=False),
    sa.Column('relay', sa.String(length=300), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_message', sa.String(length=500), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['event_id'], ['nostr_outbox.id'], name=op.f('fk_nostr_deliveries_event_id_nostr_outbox'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('event_id', 'relay', name=op.f('pk_nostr_deliveries'))
    )
    with op.batch_alter_table('nostr_deliveries', schema=None) as batch_op:
        batch_op.create_index('ix_nostr_deliveries_due', ['state', 'next_attempt_at'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('nostr_deliveries', schema=None) as batch_op:
        batch_op.drop_index('ix_nostr_deliveries_due')

    op.drop_table('nostr_deliveries')
    op.drop_table('nostr_rejected')
    op.drop_table('nostr_outbox')
    with op.batch_alter_table('nostr_nip98_seen', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_nostr_nip98_seen_expires_at'))

    op.drop_table('nostr_nip98_seen')
    with op.batch_alter_table('nostr_inbox', schema=None) as batch_op:
        batch_op.drop_index('ix_nostr_inbox_pending')
        batch_op.drop_index('ix_nostr_inbox_kind_created')

    op.drop_table('nostr_inbox')
