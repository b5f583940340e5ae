"""payouts: kind, earned_by and destination_kind columns (no more parsing of ids and destinations)

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-08 10:00:00

Backfilled from what 0011 kept in strings: the kind and a reward's result from the id
(``<job>:reward:<result>``, ``<job>:validator:<pubkey>``, ``<job>:refund``, ``<job>:overpaid``), the
destination's kind from ``<kind>:<value>`` / ``none`` (the column keeps only the value).
"""
from __future__ import annotations

import sqlalchemy as sa

from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None

_payouts = sa.table('ln_payouts', sa.column('id', sa.String), sa.column('kind', sa.String),
                    sa.column('earned_by', sa.String), sa.column('destination_kind', sa.String),
                    sa.column('destination', sa.Text))


def _kind_of_id(payout_id: str) -> str:
    if ':reward:' in payout_id:
        return 'reward'
    if ':validator:' in payout_id:
        return 'validator_fee'
    if payout_id.endswith(':refund'):
        return 'refund'
    if payout_id.endswith(':overpaid'):
        return 'overpaid'
    raise ValueError(f"payout {payout_id!r}: no kind can be read from its id")


def upgrade() -> None:
    with op.batch_alter_table('ln_payouts') as batch:
        batch.add_column(sa.Column('kind', sa.String(16), nullable=True))
        batch.add_column(sa.Column('earned_by', sa.String(64), nullable=True))
        batch.add_column(sa.Column('destination_kind', sa.String(16), nullable=True))
    conn = op.get_bind()
    # Row by row in Python: the rules above read the same on SQLite and PostgreSQL (a table of
    # payouts is small next to a migration's downtime).
    for pid, dest in conn.execute(sa.select(_payouts.c.id, _payouts.c.destination)).all():
        kind = _kind_of_id(pid)
        dkind, _, value = ('none', '', '') if dest == 'none' else dest.partition(':')
        conn.execute(_payouts.update().where(_payouts.c.id == pid).values(
            kind=kind, earned_by=pid.rsplit(':', 1)[1][:64] if kind == 'reward' else None,
            destination_kind=dkind, destination=value))
    with op.batch_alter_table('ln_payouts') as batch:
        batch.alter_column('kind', existing_type=sa.String(16), nullable=False)
        batch.alter_column('destination_kind', existing_type=sa.String(16), nullable=False)


def downgrade() -> None:
    conn = op.get_bind()
    for pid, dkind, value in conn.execute(sa.select(_payouts.c.id, _payouts.c.destination_kind,
                                                    _payouts.c.destination)).all():
        conn.execute(_payouts.update().where(_payouts.c.id == pid).values(
            destination='none' if dkind == 'none' else f"{dkind}:{value}"))
    with op.batch_alter_table('ln_payouts') as batch:
        batch.drop_column('destination_kind')
        batch.drop_column('earned_by')
        batch.drop_column('kind')
