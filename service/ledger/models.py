"""Tables of the double-entry ledger (append-only) and of its reconciliation runs.

The ledger is written only by :func:`service.ledger.service.post` and
:func:`~service.ledger.service.reverse`; there is no update or delete API, and the
migration adds database triggers refusing UPDATE and DELETE on both ledger tables.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
)
from sqlalchemy.orm import Mapped, mapped_column

from service.db import Base, utcnow

_SEQ = BigInteger().with_variant(Integer, "sqlite")


class LedgerPosting(Base):
    """One balanced transaction; ``key`` makes posting it idempotent."""

    __tablename__ = "ledger_postings"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # uuid4 hex
    key: Mapped[str] = mapped_column(String(200), nullable=False, unique=True)  # e.g. funding:<payment_hash>
    # funding | release | payout | refund_payout | routing_fee | refund | reversal | ...
    kind: Mapped[str] = mapped_column(String(32), nullable=False)
    job_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    memo: Mapped[str] = mapped_column(String(500), nullable=False, default="")
    # The posting this one reverses; UNIQUE: a posting is reversed at most once.
    reverses: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("ledger_postings.id"), nullable=True, unique=True
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)

    __table_args__ = (CheckConstraint("reverses IS NULL OR reverses <> id", name="not_self"),)


class LedgerLine(Base):
    """One signed amount on one account: debit positive, credit negative, never zero."""

    __tablename__ = "ledger_lines"

    id: Mapped[int] = mapped_column(_SEQ, primary_key=True, autoincrement=True)
    posting_id: Mapped[str] = mapped_column(String(32), ForeignKey("ledger_postings.id"), nullable=False, index=True)
    account: Mapped[str] = mapped_column(String(200), nullable=False, index=True)
    # The job of a job-scoped account, else the posting's job (or NULL): balances per job use it.
    job_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    amount_msat: Mapped[int] = mapped_column(BigInteger, nullable=False)

    __table_args__ = (CheckConstraint("amount_msat <> 0", name="nonzero"),)


class LedgerReconciliation(Base):
    """A reconciliation run against LND (``kind='run'``) or an operator's override (``kind='override'``).

    The latest row decides whether payouts are paused: paused while it is not ok.
    """

    __tablename__ = "ledger_reconciliations"

    id: Mapped[int] = mapped_column(_SEQ, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16), nullable=False, default="run")  # run | override
    ran_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    ok: Mapped[bool] = mapped_column(Boolean, nullable=False)
    discrepancy_msat: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    report: Mapped[str] = mapped_column(Text, nullable=False)  # JSON
