"""Tables of the payouts: what the escrow owes someone (``ln_payouts``) and each payment sent for it.

Written only by this package (``store.py`` and ``worker.py``); a test checks it.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from service.db import Base, StringEnum, utcnow
from service.payouts.types import AttemptState, DestinationKind, PayoutKind, PayoutState


class Payout(Base):
    """Money the escrow owes someone: paid through one or more attempts, at most one succeeding.
    Written only by ``service/payouts/`` (tests/unit/test_payout_writers.py checks it)."""

    __tablename__ = "ln_payouts"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)  # idempotency key from the engine
    job_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    kind: Mapped[PayoutKind] = mapped_column(StringEnum(PayoutKind), nullable=False)
    # a reward's result event id (what earned it); NULL for the others
    earned_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    payee: Mapped[str] = mapped_column(String(64), nullable=False)  # payee's Nostr pubkey
    amount_msat: Mapped[int] = mapped_column(BigInteger, nullable=False)
    # none (waiting for the payee's invoice) | bolt11 | lud16 | lnurl; `destination` is the value
    # (the invoice, address or link), '' for none: see service.payouts.types.Destination
    destination_kind: Mapped[DestinationKind] = mapped_column(
        StringEnum(DestinationKind), nullable=False, default=DestinationKind.NONE
    )
    destination: Mapped[str] = mapped_column(Text, nullable=False, default="")
    state: Mapped[PayoutState] = mapped_column(StringEnum(PayoutState), nullable=False, default=PayoutState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    # times the worker sent it back to needs_invoice (a refused or expired invoice, given up):
    # each is a new outcome for the engine to announce, even with an unchanged attempt count
    needs_invoice_count: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    # the engine's own routing-fee limit for this payout (the worker uses the lower of it and the policy's)
    fee_limit_msat: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    fee_msat: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # of the succeeding attempt; unique: one payment pays one payout (two payouts marked paid by one
    # payment made every later ledger scan fail with key_conflict)
    payment_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    preimage: Mapped[str | None] = mapped_column(String(64), nullable=True)
    last_error: Mapped[str | None] = mapped_column(String(500), nullable=True)
    # The claim window (docs/escrow.md, "Claim window"): while it waits for an invoice, the payout
    # expires at claim_by and its payee is reminded at remind_at (both NULL: no window); claim_round
    # counts an operator's reopens (each a fresh window: its outcomes and reminder are new ones).
    claim_by: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    remind_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    claim_round: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)

    __table_args__ = (
        Index("ix_ln_payouts_due", "state", "next_attempt_at"),
        Index("ix_ln_payouts_claim_by", "state", "claim_by"),
        Index("uq_ln_payouts_payment_hash", "payment_hash", unique=True),
    )


class PayoutAttempt(Base):
    """One payment sent (or about to be sent) for a payout; the hash is never used twice."""

    __tablename__ = "ln_payout_attempts"

    payment_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    payout_id: Mapped[str] = mapped_column(String(200), ForeignKey("ln_payouts.id"), nullable=False, index=True)
    payment_request: Mapped[str] = mapped_column(Text, nullable=False)
    fee_limit_msat: Mapped[int] = mapped_column(BigInteger, nullable=False)
    state: Mapped[AttemptState] = mapped_column(StringEnum(AttemptState), nullable=False, default=AttemptState.SENDING)
    fee_msat: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    preimage: Mapped[str | None] = mapped_column(String(64), nullable=True)
    failure: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
