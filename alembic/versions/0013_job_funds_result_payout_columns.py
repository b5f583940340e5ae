"""a job's funds as one typed column (instead of custody + funded); results' payout destination typed

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 16:30:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('escrow_jobs') as batch:
        batch.add_column(sa.Column('funds', sa.String(length=16), server_default='none', nullable=False))
    # Where the money is: in our ledger once funded; a hold HTLC locked while a hold job runs unfunded.
    op.execute("UPDATE escrow_jobs SET funds = 'held' WHERE funded")
    op.execute("UPDATE escrow_jobs SET funds = 'locked' WHERE NOT funded AND mode = 'hold' "
               "AND state IN ('collecting', 'validating', 'releasing', 'refunding')")
    with op.batch_alter_table('escrow_jobs') as batch:
        batch.drop_constraint('uq_escrow_jobs_payment_hash', type_='unique')
        batch.drop_column('payment_hash')   # the invoice is found by ln_invoices.job_id
        batch.drop_column('custody')
        batch.drop_column('funded')

    with op.batch_alter_table('escrow_results') as batch:
        batch.add_column(sa.Column('payout_kind', sa.String(length=16), server_default='none', nullable=False))
        batch.add_column(sa.Column('payout_address', sa.Text(), nullable=True))
        batch.add_column(sa.Column('invoice_bolt11', sa.Text(), nullable=True))
        batch.add_column(sa.Column('invoice_msat', sa.BigInteger(), nullable=True))
    results = sa.table('escrow_results', sa.column('id', sa.String), sa.column('destination', sa.Text),
                       sa.column('payout_kind', sa.String), sa.column('payout_address', sa.Text),
                       sa.column('invoice_bolt11', sa.Text), sa.column('invoice_msat', sa.BigInteger))
    conn = op.get_bind()
    for rid, dest in conn.execute(sa.select(results.c.id, results.c.destination)
                                  .where(results.c.destination != 'none')).all():
        kind, _, value = dest.partition(':')
        if kind == 'bolt11-offer':
            amount, _, bolt11 = value.partition(':')
            values = {'invoice_bolt11': bolt11, 'invoice_msat': int(amount)}
        elif kind in ('lud16', 'lnurl'):
            values = {'payout_kind': kind, 'payout_address': value}
        else:
            continue
        conn.execute(results.update().where(results.c.id == rid).values(**values))
    with op.batch_alter_table('escrow_results') as batch:
        batch.drop_column('destination')


def downgrade() -> None:
    with op.batch_alter_table('escrow_results') as batch:
        batch.add_column(sa.Column('destination', sa.Text(), server_default='none', nullable=False))
    op.execute("UPDATE escrow_results SET destination = payout_kind || ':' || payout_address "
               "WHERE payout_kind IN ('lud16', 'lnurl')")
    op.execute("UPDATE escrow_results SET destination = 'bolt11-offer:' || CAST(invoice_msat AS VARCHAR) || ':' "
               "|| invoice_bolt11 WHERE payout_kind = 'none' AND invoice_bolt11 IS NOT NULL")
    with op.batch_alter_table('escrow_results') as batch:
        batch.drop_column('invoice_msat')
        batch.drop_column('invoice_bolt11')
        batch.drop_column('payout_address')
        batch.drop_column('payout_kind')
    with op.batch_alter_table('escrow_jobs') as batch:
        batch.add_column(sa.Column('custody', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch.add_column(sa.Column('funded', sa.Boolean(), server_default=sa.false(), nullable=False))
        batch.add_column(sa.Column('payment_hash', sa.String(length=64), nullable=True))
    op.execute("UPDATE escrow_jobs SET funded = (funds = 'held')")
    op.execute("UPDATE escrow_jobs SET custody = (funds = 'held' AND mode = 'hold' "
               "AND state IN ('collecting', 'validating'))")
    op.execute("UPDATE escrow_jobs SET payment_hash = (SELECT payment_hash FROM ln_invoices "
               "WHERE ln_invoices.job_id = escrow_jobs.id ORDER BY created_at LIMIT 1)")
    with op.batch_alter_table('escrow_jobs') as batch:
        batch.create_unique_constraint('uq_escrow_jobs_payment_hash', ['payment_hash'])
        batch.drop_column('funds')
