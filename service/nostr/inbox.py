"""The inbox: every verified event is stored once, by id, before anything processes it.

- ``store``/``store_many`` insert with ``ON CONFLICT DO NOTHING`` on the event id, so
  the same event from several relays, a relay's replay after a reconnect, or the
  REST API and a relay at once, lands exactly once.
- ``process_pending`` hands each unhandled event to a handler inside one
  transaction and marks it handled in that same transaction with a
  compare-and-set (``UPDATE … WHERE handled_at IS NULL``): the handler's effects
  and the mark commit together or not at all, and two workers (or replicas) can
  never both process one event. Unhandled events are simply processed at the next
  start-up: that is the replay. A handler that raises (or an event row that no longer
  parses) is rolled back and retried with backoff, then quarantined
  (``service/quarantine.py``): the event is marked handled with an ``error: …`` outcome
  and listed for the operator, who replays it after a fix. Events in backoff are skipped
  by the pending scan itself, so they never hold back the events behind them.
- ``reject`` records refused events with their reason for operators; the log keeps
  at most ``rejected_retention`` rows.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.db import insert_ignore, rowcount, table_of, utcnow
from service.nostr.models import InboxEvent, RejectedEvent
from service.nostr.nip01 import Event
from service.quarantine import Quarantine, Verdict

log = logging.getLogger(__name__)

RAW_KEEP = 4096  # bytes of a rejected payload kept for inspection

# A handler gets the open session (its writes join the transaction) and the event,
# and returns a short outcome for the operator ("processed", "ignored: …").
Handler = Callable[[AsyncSession, Event], Awaitable[str]]


@dataclass(frozen=True, slots=True)
class Pending:
    id: str
    raw: str
    source: str
    failing: bool = False  # it failed before: its success clears the failure row


def _row(event: Event, source: str) -> dict:
    return {
        "id": event.id,
        "kind": event.kind,
        "pubkey": event.pubkey,
        "created_at": event.created_at,
        "raw": event.to_json(),
        "source": source[:300],
        "received_at": utcnow(),
    }


class Inbox:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        rejected_retention: int = 10_000,
        quarantine: Quarantine | None = None,
    ) -> None:
        self.sessions = sessions
        self.quarantine = quarantine or Quarantine(sessions)
        self.rejected_retention = rejected_retention
        self._rejects_since_prune = 0

    async def store(self, event: Event, source: str) -> bool:
        """Store one verified event; True if it was new."""
        return await self.store_many([(event, source)]) == 1

    async def store_many(self, items: Sequence[tuple[Event, str]]) -> int:
        """Store verified events in one transaction; returns how many were new."""
        if not items:
            return 0
        async with self.sessions.begin() as s:
            return await self.store_in(s, items)

    async def store_in(self, session: AsyncSession, items: Iterable[tuple[Event, str]]) -> int:
        """Store within the caller's transaction (flush only)."""
        rows: dict[str, dict[str, object]] = {}
        for event, source in items:
            rows.setdefault(event.id, _row(event, source))  # the same id twice in one batch: keep the first
        if not rows:
            return 0
        res = await session.execute(insert_ignore(session, InboxEvent.__table__), list(rows.values()))
        return max(rowcount(res), 0)

    async def reject(self, source: str, reason: str, detail: str, raw: object, event_id: str | None = None) -> None:
        text = raw if isinstance(raw, str) else json.dumps(raw, ensure_ascii=False, default=str)
        async with self.sessions.begin() as s:
            s.add(
                RejectedEvent(
                    event_id=event_id if isinstance(event_id, str) and len(event_id) == 64 else None,
                    source=source[:300],
                    reason=reason[:64],
                    detail=detail[:500],
                    raw=text[:RAW_KEEP],
                    received_at=utcnow(),
                )
            )
            self._rejects_since_prune += 1
            if self._rejects_since_prune >= max(1, self.rejected_retention // 10):
                self._rejects_since_prune = 0
                await self._prune(s)

    async def _prune(self, s: AsyncSession) -> None:
        cutoff = await s.scalar(
            select(RejectedEvent.seq).order_by(RejectedEvent.seq.desc()).offset(self.rejected_retention).limit(1)
        )
        if cutoff is not None:
            await s.execute(delete(RejectedEvent).where(RejectedEvent.seq <= cutoff))

    async def rejected(self, limit: int = 100) -> list[RejectedEvent]:
        async with self.sessions() as s:
            return list((await s.scalars(select(RejectedEvent).order_by(RejectedEvent.seq.desc()).limit(limit))).all())

    async def pending(self, limit: int = 100) -> list[Pending]:
        """Unhandled events in arrival order, without those waiting out a backoff."""
        q = self.quarantine
        async with self.sessions() as s:
            rows = await s.execute(
                select(InboxEvent.id, InboxEvent.raw, InboxEvent.source, q.failing("inbox", InboxEvent.id))
                .where(InboxEvent.handled_at.is_(None), q.due("inbox", InboxEvent.id))
                .order_by(InboxEvent.received_at, InboxEvent.id)
                .limit(limit)
            )
            return [Pending(r.id, r.raw, r.source, bool(r.failing)) for r in rows]

    async def count(self, *, handled: bool | None = None) -> int:
        q = select(func.count()).select_from(InboxEvent)
        if handled is not None:
            q = q.where(InboxEvent.handled_at.is_not(None) if handled else InboxEvent.handled_at.is_(None))
        async with self.sessions() as s:
            return int(await s.scalar(q) or 0)

    async def process_one(self, item: Pending, handler: Handler) -> bool:
        """Handle one event exactly once; True if this call finished it (processed, or quarantined).

        A database outage is raised (the event stays pending, the caller backs off); any other
        error is the event's: rolled back, recorded, retried with backoff, then quarantined.
        """

        async def work(s: AsyncSession) -> bool:
            event = Event.from_dict(json.loads(item.raw))
            inbox = table_of(InboxEvent)  # Core statements: no ORM bookkeeping on the hot path
            claimed = await s.execute(
                update(inbox)
                .where(inbox.c.id == item.id, inbox.c.handled_at.is_(None))
                .values(handled_at=utcnow(), outcome="processing")
            )
            if rowcount(claimed) != 1:
                return False  # another worker or replica has it
            outcome = await handler(s, event)
            await s.execute(update(inbox).where(inbox.c.id == item.id).values(outcome=(outcome or "processed")[:500]))
            return True

        async def on_failure(s: AsyncSession, v: Verdict) -> None:
            values: dict[str, object] = {"attempts": v.failures}
            if v.quarantined:  # out of the pending scan until a replay
                values.update(handled_at=utcnow(), outcome=f"error: {v.error}"[:500])
            await s.execute(
                update(InboxEvent)
                .where(InboxEvent.id == item.id, InboxEvent.handled_at.is_(None))
                .values(**values)
                .execution_options(synchronize_session=False)
            )

        attempt = await self.quarantine.attempt(
            "inbox", item.id, work, failing=item.failing, job_id=lambda: _job_of(item.raw), on_failure=on_failure
        )
        return bool(attempt.value) if attempt.ok else attempt.finished

    async def process_pending(self, handler: Handler, *, limit: int = 100) -> int:
        """Process up to ``limit`` due events in arrival order; returns how many it finished."""
        done = 0
        for item in await self.pending(limit):
            done += await self.process_one(item, handler)
        return done


def _job_of(raw: str) -> str | None:
    """The job an event is about, for the operator's list: a job request is the job; other
    kinds name it in their first ``e`` tag. None when the row does not say (or not parse)."""
    try:
        data = json.loads(raw)
        if data.get("kind") == 5701:
            return str(data["id"])[:64]
        ref = next((t[1] for t in data.get("tags", []) if isinstance(t, list) and len(t) > 1 and t[0] == "e"), None)
        return ref[:64] if isinstance(ref, str) else None
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
