"""A job's timeline (``escrow_timeline``): what happened to it, in order, for people to read.

Its own module (not the escrow's): the escrow, the payouts and the API all write it.

Entries are written in the transaction of what they describe, so a rolled-back change leaves
none. The engine writes a fact's entries in one statement (``rows`` of its plan); other
writers (the payout package, the REST API, operators' actions) call :func:`record`.
"""

from __future__ import annotations

import json
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import BigInteger, DateTime, Integer, String, Text, insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Mapped, mapped_column

from service.db import Base, table_of, utcnow

DETAIL_MAX = 4000
_SEQ = BigInteger().with_variant(Integer, "sqlite")


class TimelineEntry(Base):
    """Everything that happened to a job, in order: facts, transitions, money, ignored input."""

    __tablename__ = "escrow_timeline"

    seq: Mapped[int] = mapped_column(_SEQ, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(64), nullable=False, index=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)  # an EntryKind
    detail: Mapped[str] = mapped_column(Text, nullable=False)


class EntryKind(StrEnum):
    FACT = "fact"
    TRANSITION = "transition"
    IGNORED = "ignored"
    INVOICE = "invoice"
    PAYMENT = "payment"
    POSTING = "posting"
    PUBLISHED = "published"
    EFFECT = "effect"


def row(job_id: str, kind: EntryKind | str, detail: object) -> dict[str, Any]:
    """An entry as a row: ``detail`` as text (JSON unless it is text already), bounded."""
    text = detail if isinstance(detail, str) else json.dumps(detail, sort_keys=True, default=str)
    return {"job_id": job_id, "kind": str(kind), "detail": text[:DETAIL_MAX], "at": utcnow()}


async def record(s: AsyncSession, job_id: str, kind: EntryKind | str, detail: object) -> None:
    await s.execute(insert(table_of(TimelineEntry)), [row(job_id, kind, detail)])
