"""lightning invoices facts payouts

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 05:46:57.954827
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('ln_invoices',
    sa.Column('payment_hash', sa.String(length=64), nullable=False),
    sa.Column('job_id', sa.String(length=64), nullable=True),
    sa.Column('mode', sa.String(length=16), nullable=False),
    sa.Column('amount_msat', sa.BigInteger(), nullable=False),
    sa.Column('payment_request', sa.Text(), nullable=False),
    sa.Column('memo', sa.String(length=640), nullable=False),
    sa.Column('preimage', sa.String(length=64), nullable=True),
    sa.Column('cltv_expiry', sa.Integer(), nullable=False),
    sa.Column('expires_at', sa.BigInteger(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('amount_paid_msat', sa.BigInteger(), nullable=False),
    sa.Column('htlc_expiry_height', sa.Integer(), nullable=True),
    sa.Column('on_deadline', sa.String(length=16), nullable=False),
    sa.Column('add_index', sa.BigInteger(), nullable=False),
    sa.Column('settle_index', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('payment_hash', name=op.f('pk_ln_invoices'))
    )
    with op.batch_alter_table('ln_invoices', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_ln_invoices_job_id'), ['job_id'], unique=False)
        batch_op.create_index('ix_ln_invoices_state_mode', ['state', 'mode'], unique=False)

    op.create_table('ln_payouts',
    sa.Column('id', sa.String(length=200), nullable=False),
    sa.Column('job_id', sa.String(length=64), nullable=True),
    sa.Column('payee', sa.String(length=64), nullable=False),
    sa.Column('amount_msat', sa.BigInteger(), nullable=False),
    sa.Column('destination', sa.Text(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('fee_msat', sa.BigInteger(), nullable=True),
    sa.Column('payment_hash', sa.String(length=64), nullable=True),
    sa.Column('preimage', sa.String(length=64), nullable=True),
    sa.Column('last_error', sa.String(length=500), nullable=True),
    sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_ln_payouts'))
    )
    with op.batch_alter_table('ln_payouts', schema=None) as batch_op:
        batch_op.create_index('ix_ln_payouts_due', ['state', 'next_attempt_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_ln_payouts_job_id'), ['job_id'], unique=False)

    op.create_table('ln_webhooks_seen',
    sa.Column('signature', sa.String(length=64), nullable=False),
    sa.Column('expires_at', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('signature', name=op.f('pk_ln_webhooks_seen'))
    )
    with op.batch_alter_table('ln_webhooks_seen', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_ln_webhooks_seen_expires_at'), ['expires_at'], unique=False)

    op.create_table('ln_facts',
    sa.Column('seq', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('payment_hash', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('amount_msat', sa.BigInteger(), nullable=False),
    sa.Column('source', sa.String(length=32), nullable=False),
    sa.Column('observed_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('consumed_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['payment_hash'], ['ln_invoices.payment_hash'], name=op.f('fk_ln_facts_payment_hash_ln_invoices')),
    sa.PrimaryKeyConstraint('seq', name=op.f('pk_ln_facts')),
    sa.UniqueConstraint('payment_hash', 'kind', name='uq_ln_facts_hash_kind')
    )
    with op.batch_alter_table('ln_facts', schema=None) as batch_op:
        batch_op.create_index('ix_ln_facts_unconsumed', ['consumed_at', 'seq'], unique=False)

    op.create_table('ln_payout_attempts',
    sa.Column('payment_hash', sa.String(length=64), nullable=False),
    sa.Column('payout_id', sa.String(length=200), nullable=False),
    sa.Column('payment_request', sa.Text(), nullable=False),
    sa.Column('fee_limit_msat', sa.BigInteger(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('fee_msat', sa.BigInteger(), nullable=True),
    sa.Column('preimage', sa.String(length=64), nullable=True),
    sa.Column('failure', sa.String(length=200), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['payout_id'], ['ln_payouts.id'], name=op.f('fk_ln_payout_attempts_payout_id_ln_payouts')),
    sa.PrimaryKeyConstraint('payment_hash', name=op.f('pk_ln_payout_attempts'))
    )
    with op.batch_alter_table('ln_payout_attempts', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_ln_payout_attempts_payout_id'), ['payout_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('ln_payout_attempts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_ln_payout_attempts_payout_id'))

    op.drop_table('ln_payout_attempts')
    with op.batch_alter_table('ln_facts', schema=None) as batch_op:
        batch_op.drop_index('ix_ln_facts_unconsumed')

    op.drop_table('ln_facts')
    with op.batch_alter_table('ln_webhooks_seen', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_ln_webhooks_seen_expires_at'))

    op.drop_table('ln_webhooks_seen')
    with op.batch_alter_table('ln_payouts', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_ln_payouts_job_id'))
        batch_op.drop_index('ix_ln_payouts_due')

    op.drop_table('ln_payouts')
    with op.batch_alter_table('ln_invoices', schema=None) as batch_op:
        batch_op.drop_index('ix_ln_invoices_state_mode')
        batch_op.drop_index(batch_op.f('ix_ln_invoices_job_id'))

    op.drop_table('ln_invoices')
