"""ledger: append-only postings and lines, reconciliation runs

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 06:07:48.368774
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('ledger_postings',
    sa.Column('id', sa.String(length=32), nullable=False),
    sa.Column('key', sa.String(length=200), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('job_id', sa.String(length=64), nullable=True),
    sa.Column('memo', sa.String(length=500), nullable=False),
    sa.Column('reverses', sa.String(length=32), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint('reverses IS NULL OR reverses <> id', name=op.f('ck_ledger_postings_not_self')),
    sa.ForeignKeyConstraint(['reverses'], ['ledger_postings.id'], name=op.f('fk_ledger_postings_reverses_ledger_postings')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_ledger_postings')),
    sa.UniqueConstraint('key', name=op.f('uq_ledger_postings_key')),
    sa.UniqueConstraint('reverses', name=op.f('uq_ledger_postings_reverses'))
    )
    with op.batch_alter_table('ledger_postings', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_ledger_postings_job_id'), ['job_id'], unique=False)

    op.create_table('ledger_reconciliations',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('ran_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('ok', sa.Boolean(), nullable=False),
    sa.Column('discrepancy_msat', sa.BigInteger(), nullable=False),
    sa.Column('report', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_ledger_reconciliations'))
    )
    op.create_table('ledger_lines',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('posting_id', sa.String(length=32), nullable=False),
    sa.Column('account', sa.String(length=200), nullable=False),
    sa.Column('job_id', sa.String(length=64), nullable=True),
    sa.Column('amount_msat', sa.BigInteger(), nullable=False),
    sa.CheckConstraint('amount_msat <> 0', name=op.f('ck_ledger_lines_nonzero')),
    sa.ForeignKeyConstraint(['posting_id'], ['ledger_postings.id'], name=op.f('fk_ledger_lines_posting_id_ledger_postings')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_ledger_lines'))
    )
    with op.batch_alter_table('ledger_lines', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_ledger_lines_account'), ['account'], unique=False)
        batch_op.create_index(batch_op.f('ix_ledger_lines_job_id'), ['job_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_ledger_lines_posting_id'), ['posting_id'], unique=False)

    _append_only_up()



def downgrade() -> None:
    _append_only_down()
    with op.batch_alter_table('ledger_lines', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_ledger_lines_posting_id'))
        batch_op.drop_index(batch_op.f('ix_ledger_lines_job_id'))
        batch_op.drop_index(batch_op.f('ix_ledger_lines_account'))

    op.drop_table('ledger_lines')
    op.drop_table('ledger_reconciliations')
    with op.batch_alter_table('ledger_postings', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_ledger_postings_job_id'))

    op.drop_table('ledger_postings')


# The ledger is append-only: corrections are reversal postings, never edits. These
# triggers make the database refuse UPDATE and DELETE on both ledger tables. (A
# future batch migration that recreates one of these tables on SQLite must create
# its triggers again.)
_TABLES = ("ledger_postings", "ledger_lines")


def _append_only_up() -> None:
    if op.get_context().dialect.name == "postgresql":
        op.execute("""
            CREATE FUNCTION ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION 'the ledger is append-only: % on % refused', TG_OP, TG_TABLE_NAME;
            END $$""")
        for t in _TABLES:
            op.execute(f"CREATE TRIGGER {t}_append_only BEFORE UPDATE OR DELETE ON {t} "
                       f"FOR EACH ROW EXECUTE FUNCTION ledger_append_only()")
        return
    for t in _TABLES:
        for action in ("UPDATE", "DELETE"):
            op.execute(f"CREATE TRIGGER {t}_no_{action.lower()} BEFORE {action} ON {t} "
                       f"BEGIN SELECT RAISE(ABORT, 'the ledger is append-only: {action} on {t} refused'); END")


def _append_only_down() -> None:
    if op.get_context().dialect.name == "postgresql":
        for t in _TABLES:
            op.execute(f"DROP TRIGGER IF EXISTS {t}_append_only ON {t}")
        op.execute("DROP FUNCTION IF EXISTS ledger_append_only()")
        return
    for t in _TABLES:
        for action in ("update", "delete"):
            op.execute(f"DROP TRIGGER IF EXISTS {t}_no_{action}")
