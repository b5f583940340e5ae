"""Tables of the Nostr layer: the inbox, the rejected-events log and the publishing outbox."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, Boolean, DateTime, ForeignKey, Index, Integer, String, Text
from sqlalchemy import false as sa_false
from sqlalchemy.orm import Mapped, mapped_column

from service.db import Base, utcnow


class InboxEvent(Base):
    """A verified event, stored once (by id) before anything processes it."""

    __tablename__ = "nostr_inbox"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[int] = mapped_column(Integer, nullable=False)
    pubkey: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[int] = mapped_column(BigInteger, nullable=False)
    raw: Mapped[str] = mapped_column(Text, nullable=False)
    source: Mapped[str] = mapped_column(String(300), nullable=False)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    # Set in the same transaction as the handler's effects; NULL = still to process.
    handled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # The handler's verdict for operators, e.g. "ignored: result after deadline".
    outcome: Mapped[str | None] = mapped_column(String(500), nullable=True)
    # Handler failures so far (an unexpected exception is retried before it is recorded as final).
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")

    __table_args__ = (
        Index("ix_nostr_inbox_pending", "handled_at", "received_at"),
        Index("ix_nostr_inbox_kind_created", "kind", "created_at"),
    )


class RejectedEvent(Base):
    """An event refused at the edge, with the reason; retention is bounded."""

    __tablename__ = "nostr_rejected"

    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    event_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    source: Mapped[str] = mapped_column(String(300), nullable=False)
    reason: Mapped[str] = mapped_column(String(64), nullable=False)
    detail: Mapped[str] = mapped_column(String(500), nullable=False)
    raw: Mapped[str] = mapped_column(Text, nullable=False)  # truncated
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)


class OutboxEvent(Base):
    """A signed event of ours to publish to every configured relay."""

    __tablename__ = "nostr_outbox"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[int] = mapped_column(Integer, nullable=False)
    raw: Mapped[str] = mapped_column(Text, nullable=False)
    enqueued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    # Set when every relay has answered OK true, or rejected it for good.
    done_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Delivery(Base):
    """One event to one relay: state, attempts and the relay's last answer."""

    __tablename__ = "nostr_deliveries"

    event_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("nostr_outbox.id", ondelete="CASCADE"), primary_key=True
    )
    relay: Mapped[str] = mapped_column(String(300), primary_key=True)
    # a job's reply relay (its customer named it): published to by a short connection, not the pool
    reply: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False, server_default=sa_false())
    # pending -> ok | rejected (relay said OK false for a permanent reason) | gave_up
    #         | quarantined (a failure of ours, retried until quarantined; replayable)
    state: Mapped[str] = mapped_column(String(16), nullable=False, default="pending")
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    last_message: Mapped[str | None] = mapped_column(String(500), nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)

    __table_args__ = (Index("ix_nostr_deliveries_due", "state", "next_attempt_at"),)


class Nip98Seen(Base):
    """NIP-98 authorization events already used, kept until they expire (replay protection)."""

    __tablename__ = "nostr_nip98_seen"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[int] = mapped_column(BigInteger, nullable=False, index=True)
