"""escrow jobs results scores effects timeline

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28 06:08:30.430938
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('escrow_consumed',
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('ref', sa.String(length=200), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('source', 'ref', name=op.f('pk_escrow_consumed'))
    )
    op.create_table('escrow_effects',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('last_error', sa.String(length=300), nullable=True),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_escrow_effects')),
    sa.UniqueConstraint('job_id', 'kind', name='uq_escrow_effects_job_kind')
    )
    with op.batch_alter_table('escrow_effects', schema=None) as batch_op:
        batch_op.create_index('ix_escrow_effects_due', ['state', 'next_attempt_at'], unique=False)

    op.create_table('escrow_jobs',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('customer', sa.String(length=64), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('mode', sa.String(length=16), nullable=True),
    sa.Column('custody', sa.Boolean(), nullable=False),
    sa.Column('funded', sa.Boolean(), nullable=False),
    sa.Column('bid_msat', sa.BigInteger(), nullable=False),
    sa.Column('fee_msat', sa.BigInteger(), nullable=False),
    sa.Column('validator_fee_msat', sa.BigInteger(), nullable=False),
    sa.Column('payout_policy', sa.String(length=8), nullable=False),
    sa.Column('results_deadline', sa.BigInteger(), nullable=False),
    sa.Column('validation_deadline', sa.BigInteger(), nullable=False),
    sa.Column('offer_expires_at', sa.BigInteger(), nullable=True),
    sa.Column('payment_hash', sa.String(length=64), nullable=True),
    sa.Column('eval_request_id', sa.String(length=64), nullable=True),
    sa.Column('refund_reason', sa.String(length=64), nullable=True),
    sa.Column('reject_reason', sa.String(length=300), nullable=True),
    sa.Column('decision', sa.Text(), nullable=True),
    sa.Column('request_raw', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_escrow_jobs')),
    sa.UniqueConstraint('payment_hash', name=op.f('uq_escrow_jobs_payment_hash'))
    )
    with op.batch_alter_table('escrow_jobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_escrow_jobs_customer'), ['customer'], unique=False)
        batch_op.create_index(batch_op.f('ix_escrow_jobs_state'), ['state'], unique=False)

    op.create_table('escrow_results',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('job_id', sa.String(length=64), nullable=False),
    sa.Column('provider', sa.String(length=64), nullable=False),
    sa.Column('shard_index', sa.Integer(), nullable=False),
    sa.Column('model_url', sa.Text(), nullable=False),
    sa.Column('model_sha256', sa.String(length=64), nullable=False),
    sa.Column('destination', sa.Text(), nullable=False),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_escrow_results')),
    sa.UniqueConstraint('job_id', 'provider', name='uq_escrow_results_job_provider')
    )
    with op.batch_alter_table('escrow_results', schema=None) as batch_op:
        batch_op.create_index('ix_escrow_results_job', ['job_id'], unique=False)

    op.create_table('escrow_scores',
    sa.Column('job_id', sa.String(length=64), nullable=False),
    sa.Column('result_id', sa.String(length=64), nullable=False),
    sa.Column('validator', sa.String(length=64), nullable=False),
    sa.Column('value', sa.String(length=64), nullable=False),
    sa.Column('event_id', sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint('job_id', 'result_id', 'validator', name=op.f('pk_escrow_scores'))
    )
    op.create_table('escrow_timeline',
    sa.Column('seq', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.String(length=64), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('detail', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('seq', name=op.f('pk_escrow_timeline'))
    )
    with op.batch_alter_table('escrow_timeline', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_escrow_timeline_job_id'), ['job_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('escrow_timeline', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_escrow_timeline_job_id'))

    op.drop_table('escrow_timeline')
    op.drop_table('escrow_scores')
    with op.batch_alter_table('escrow_results', schema=None) as batch_op:
        batch_op.drop_index('ix_escrow_results_job')

    op.drop_table('escrow_results')
    with op.batch_alter_table('escrow_jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_escrow_jobs_state'))
        batch_op.drop_index(batch_op.f('ix_escrow_jobs_customer'))

    op.drop_table('escrow_jobs')
    with op.batch_alter_table('escrow_effects', schema=None) as batch_op:
        batch_op.drop_index('ix_escrow_effects_due')

    op.drop_table('escrow_effects')
    op.drop_table('escrow_consumed')
