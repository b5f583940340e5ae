"""Tables of the Lightning layer: our invoices and their settlement facts (payouts: service/payouts/models.py)."""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import BigInteger, DateTime, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from service.db import Base, StringEnum, utcnow
from service.lightning.hold import EscrowMode

_SEQ = BigInteger().with_variant(Integer, "sqlite")


class InvoiceStatus(enum.StrEnum):
    """``ln_invoices.state``: changes only on a fact confirmed by lookup."""

    OPEN = "open"
    ACCEPTED = "accepted"  # hold: the HTLC is locked at our node
    SETTLED = "settled"
    CANCELED = "canceled"


class InvoiceChange(enum.StrEnum):
    """``ln_facts.kind``: what happened to one of our invoices."""

    ACCEPTED = "accepted"
    SETTLED = "settled"
    CANCELED = "canceled"


class OnDeadline(enum.StrEnum):
    """What the deadline guard does with an accepted hold invoice near its CLTV expiry."""

    SETTLE = "settle"  # take the money into custody: the job continues custodially
    CANCEL = "cancel"  # give it back


class InvoicePurpose(enum.StrEnum):
    """``ln_invoices.purpose``: what an invoice of a job is for."""

    JOB = "job"  # the job's escrow invoice (hold or custodial)
    APPEAL_FEE = "appeal_fee"  # a plain invoice for an appeal's fee


class LnInvoice(Base):
    """An invoice the escrow issued. ``state`` changes only on a fact confirmed by lookup."""

    __tablename__ = "ln_invoices"

    payment_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    mode: Mapped[EscrowMode] = mapped_column(StringEnum(EscrowMode), nullable=False)
    amount_msat: Mapped[int] = mapped_column(BigInteger, nullable=False)
    payment_request: Mapped[str] = mapped_column(Text, nullable=False)
    memo: Mapped[str] = mapped_column(String(640), nullable=False, default="")
    # Hold mode only: our secret until we settle. Never logged, never returned by an API.
    preimage: Mapped[str | None] = mapped_column(String(64), nullable=True)
    cltv_expiry: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    expires_at: Mapped[int] = mapped_column(BigInteger, nullable=False)  # unix seconds
    state: Mapped[InvoiceStatus] = mapped_column(StringEnum(InvoiceStatus), nullable=False, default=InvoiceStatus.OPEN)
    amount_paid_msat: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    htlc_expiry_height: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # What the deadline guard does with an accepted hold invoice near its CLTV expiry.
    on_deadline: Mapped[OnDeadline] = mapped_column(StringEnum(OnDeadline), nullable=False, default=OnDeadline.CANCEL)
    # What it is for: the job's own escrow invoice, or an appeal's fee (service/escrow: its own fact).
    purpose: Mapped[InvoicePurpose] = mapped_column(
        StringEnum(InvoicePurpose), nullable=False, default=InvoicePurpose.JOB, server_default="job"
    )
    add_index: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    settle_index: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)

    __table_args__ = (Index("ix_ln_invoices_state_mode", "state", "mode"),)


class LnFact(Base):
    """A confirmed change of one of our invoices; at most one per (payment hash, kind)."""

    __tablename__ = "ln_facts"

    seq: Mapped[int] = mapped_column(_SEQ, primary_key=True, autoincrement=True)
    payment_hash: Mapped[str] = mapped_column(String(64), ForeignKey("ln_invoices.payment_hash"), nullable=False)
    kind: Mapped[InvoiceChange] = mapped_column(StringEnum(InvoiceChange), nullable=False)
    amount_msat: Mapped[int] = mapped_column(BigInteger, nullable=False)
    source: Mapped[str] = mapped_column(String(32), nullable=False)  # stream | single | sweep | webhook | guard
    observed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    consumed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    __table_args__ = (
        UniqueConstraint("payment_hash", "kind", name="uq_ln_facts_hash_kind"),
        Index("ix_ln_facts_unconsumed", "consumed_at", "seq"),
    )


class WebhookSeen(Base):
    """Signatures of accepted webhooks, kept for the replay window (replay protection)."""

    __tablename__ = "ln_webhooks_seen"

    signature: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[int] = mapped_column(BigInteger, nullable=False, index=True)
