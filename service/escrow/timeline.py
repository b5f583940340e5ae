"""A job's timeline (``escrow_timeline``): what happened to it, in order, for people to read.

Entries are written in the transaction of what they describe, so a rolled-back change leaves
none. The engine writes a fact's entries in one statement (``rows`` of its plan); other
writers (the payout package, the REST API, operators' actions) call :func:`record`.
"""
from __future__ import annotations

import json
from enum import StrEnum
from typing import Any

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession

from service.db import table_of, utcnow
from service.escrow.models import TimelineEntry

DETAIL_MAX = 4000


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
