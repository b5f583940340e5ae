"""Tables of the escrow engine: jobs, results, scores, effects, timeline, service leases."""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import BigInteger, DateTime, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from service.db import Base, StringEnum, utcnow
from service.escrow.machine import FINAL_STATES, EffectKind, EscrowMode, Funds, JobState
from service.payouts.types import DestinationKind
from service.timeline import TimelineEntry

__all__ = [
    "FINAL_STATES",
    "Consumed",
    "Effect",
    "EffectKind",
    "EffectState",
    "Job",
    "JobState",
    "Result",
    "ScoreRow",
    "TimelineEntry",
]

_SEQ = BigInteger().with_variant(Integer, "sqlite")


class EffectState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"  # claimed by a worker (a lease until next_attempt_at)
    DONE = "done"
    QUARANTINED = "quarantined"  # failed too often: waits for an operator (service/quarantine.py)


class Job(Base):
    __tablename__ = "escrow_jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the job request's event id
    customer: Mapped[str] = mapped_column(String(64), nullable=False, index=True)
    # Written only by Engine.apply (service/escrow/engine.py), by compare-and-set on (state, version).
    state: Mapped[JobState] = mapped_column(StringEnum(JobState), nullable=False, index=True)
    version: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    mode: Mapped[EscrowMode | None] = mapped_column(StringEnum(EscrowMode), nullable=True)
    funds: Mapped[Funds] = mapped_column(
        StringEnum(Funds), nullable=False, default=Funds.NONE, server_default=Funds.NONE.value
    )
    bid_msat: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    fee_msat: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    validator_fee_msat: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    payout_policy: Mapped[str] = mapped_column(String(8), nullable=False, default="best")
    results_deadline: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    validation_deadline: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    # A deadline moved by an escrow outage (the machine's DeadlineExtended; null: not moved). The two
    # above stay the request's own, so the public view and the audit show both.
    results_extended_to: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    validation_extended_to: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # When they were last moved (unix seconds): the outages that ended before it are in them already.
    deadlines_extended_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    offer_expires_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    eval_request_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # A fallback evaluation round (docs/escrow.md): its request, its deadline in force (an outage may
    # move it) and the pool validators it names (JSON list; they are the only ones whose scores count then).
    fallback_request_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    fallback_deadline: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    fallback_validators: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The appeal (docs/escrow.md, "Appeals"): until when one may be made (set when the decision opens
    # the window), the appeal round's deadline, and the appeal itself (JSON: appellant, status, fee,
    # result, fee invoice's payment hash, the round's request and validators).
    appeal_deadline: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    appeal_round_deadline: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    appeal: Mapped[str | None] = mapped_column(Text, nullable=True)
    refund_reason: Mapped[str | None] = mapped_column(String(64), nullable=True)
    reject_reason: Mapped[str | None] = mapped_column(String(300), nullable=True)
    decision: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON
    request_raw: Mapped[str] = mapped_column(Text, nullable=False)
    expires_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)  # the request's NIP-40 expiration
    reply_relays: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON: the request's checked relays
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)

    @property
    def results_due(self) -> int:
        """The results deadline in force (extended or the request's)."""
        return self.results_extended_to if self.results_extended_to is not None else self.results_deadline

    @property
    def validation_due(self) -> int:
        """The validation deadline in force (extended or the request's)."""
        return self.validation_extended_to if self.validation_extended_to is not None else self.validation_deadline

    @property
    def custody(self) -> bool:
        """A hold job whose invoice was settled before release (the deadline guard): now custodial."""
        return (
            self.mode is EscrowMode.HOLD
            and self.funds is Funds.HELD
            and self.state
            in (JobState.COLLECTING, JobState.VALIDATING, JobState.FALLBACK, JobState.APPEALABLE, JobState.APPEAL)
        )


class Result(Base):
    """A counted result: the first valid one of each provider for a job."""

    __tablename__ = "escrow_results"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # result event id
    job_id: Mapped[str] = mapped_column(String(64), nullable=False)
    provider: Mapped[str] = mapped_column(String(64), nullable=False)
    shard_index: Mapped[int] = mapped_column(Integer, nullable=False)
    model_url: Mapped[str] = mapped_column(Text, nullable=False)
    model_sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    # Where its reward goes: an address from the result (lud16 / lnurl), or an invoice it came with
    # (paid only if it is for exactly the reward), or neither (the provider is asked at release).
    payout_kind: Mapped[DestinationKind] = mapped_column(
        StringEnum(DestinationKind), nullable=False, default=DestinationKind.NONE, server_default="none"
    )
    payout_address: Mapped[str | None] = mapped_column(Text, nullable=True)
    invoice_bolt11: Mapped[str | None] = mapped_column(Text, nullable=True)
    invoice_msat: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger, nullable=False)  # the sender's claim: shown, never used
    # When the escrow first received it (inbox): the order of results, never the sender's created_at.
    received_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # A sealed result (protocol.md §5a; null for a plain one): model_url is its ciphertext's URL.
    ciphertext_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    key_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # Its content key NIP-44-encrypted escrow -> customer (the plaintext key is never stored). Shown
    # only to the customer (GET /v1/jobs/{id}/keys), and only once released (key_released_at).
    customer_key: Mapped[str | None] = mapped_column(Text, nullable=True)
    key_released_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    # One result per provider and job; a model (by hash) is credited once per job: a copy earns nothing.
    __table_args__ = (
        UniqueConstraint("job_id", "provider", name="uq_escrow_results_job_provider"),
        Index("ix_escrow_results_job", "job_id"),
        Index("ix_escrow_results_job_model", "job_id", "model_sha256", unique=True),
    )


class ScoreRow(Base):
    """A counted score: the first of each validator for each candidate."""

    __tablename__ = "escrow_scores"

    job_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    result_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    validator: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(64), nullable=False)  # exact decimal text, or "unreadable"
    event_id: Mapped[str] = mapped_column(String(64), nullable=False)


class Effect(Base):
    """A side effect the engine decided (in the same transaction), carried out by a worker."""

    __tablename__ = "escrow_effects"

    id: Mapped[int] = mapped_column(_SEQ, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(64), nullable=False)
    kind: Mapped[EffectKind] = mapped_column(StringEnum(EffectKind), nullable=False)
    state: Mapped[EffectState] = mapped_column(StringEnum(EffectState), nullable=False, default=EffectState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    last_error: Mapped[str | None] = mapped_column(String(300), nullable=True)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)

    __table_args__ = (
        UniqueConstraint("job_id", "kind", name="uq_escrow_effects_job_kind"),
        Index("ix_escrow_effects_due", "state", "next_attempt_at"),
    )


class Consumed(Base):
    """Facts from other tables (LN facts, payout outcomes, effects) consumed by the engine, once."""

    __tablename__ = "escrow_consumed"

    source: Mapped[str] = mapped_column(String(16), primary_key=True)  # ln_fact | payout | effect
    ref: Mapped[str] = mapped_column(String(200), primary_key=True)  # its id (+ state)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
