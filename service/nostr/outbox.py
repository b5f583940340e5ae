"""The durable publishing outbox: our signed events reach every relay, or we know why not.

``enqueue`` writes the event and one delivery row per relay inside the caller's
transaction (the engine's decision and the event that announces it commit
together). It is idempotent by event id. The :class:`Publisher` sends due
deliveries through the relay pool, waits for each relay's ``OK``, and records the
answer:

- ``OK true``, or ``OK false`` with ``duplicate:`` → ``ok``;
- ``OK false`` with a permanent prefix (``invalid:``, ``pow:``, ``blocked:``,
  ``restricted:``) → ``rejected``;
- anything else (``rate-limited:``, ``error:``, ``auth-required:``, no answer in
  time, not connected) → retried with exponential backoff and jitter, up to
  ``max_attempts``, then ``gave_up``.

An event is ``done`` when no delivery is pending. Nothing is held in memory: a
restart resumes from the table.

A failure that is ours, not the relay's (a row whose event no longer parses, an
unexpected exception while sending or recording), is the delivery's own: it is retried
with backoff and then quarantined (state ``quarantined``, ``service/quarantine.py``),
and never stops the other deliveries of the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Row, and_, exists, literal, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.db import insert_ignore, rowcount, table_of, utcnow
from service.nostr.models import Delivery, OutboxEvent
from service.nostr.nip01 import Event
from service.nostr.oneshot import publish_once
from service.nostr.pool import NotConnected, RelayPool
from service.quarantine import LoopBackoff, Quarantine, Verdict, is_outage

log = logging.getLogger(__name__)

PERMANENT = ("invalid:", "pow:", "blocked:", "restricted:")
Outcome = tuple[str, str, int, bool, str, bool]  # event id, relay, attempts, ok, message, failing before


def delivery_ref(event_id: str, relay: str) -> str:
    """A delivery's key in the quarantine (the event id has a fixed length: split at the first ':')."""
    return f"{event_id}:{relay}"


async def enqueue(session: AsyncSession, event: Event, relays: list[str], reply_relays: Sequence[str] = ()) -> bool:
    """Queue ``event`` for every relay (ours) and every reply relay (a job's customer named them,
    docs/nostr.md) in the caller's transaction; False if it was queued before."""
    res = await session.execute(
        insert_ignore(session, OutboxEvent.__table__),
        [{"id": event.id, "kind": event.kind, "raw": event.to_json(), "enqueued_at": utcnow()}],
    )
    now = utcnow()
    targets = {r: False for r in reply_relays} | {r: True for r in relays}  # ours wins a name named twice
    await session.execute(
        insert_ignore(session, Delivery.__table__),
        [
            {
                "event_id": event.id,
                "relay": r,
                "reply": not ours,
                "state": "pending",
                "attempts": 0,
                "next_attempt_at": now,
                "updated_at": now,
            }
            for r, ours in targets.items()
        ],
    )
    return rowcount(res) == 1


@dataclass
class PublisherConfig:
    max_attempts: int = 12
    base_delay: float = 1.0
    max_delay: float = 300.0
    batch: int = 100
    idle_interval: float = 0.5
    ok_timeout: float = 10.0
    # Reply relays (a job's customer named them) get one short, pinned connection per delivery;
    # dev/test only: allow them on private addresses.
    reply_relays_allow_private: bool = False
    reply_concurrency: int = 16


class Publisher:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        pool: RelayPool,
        config: PublisherConfig | None = None,
        quarantine: Quarantine | None = None,
    ) -> None:
        self.sessions = sessions
        self.pool = pool
        self.config = config or PublisherConfig()
        self.quarantine = quarantine or Quarantine(sessions)
        self._wake = asyncio.Event()
        self._replying: dict[tuple[str, str], asyncio.Task] = {}  # reply-relay deliveries in flight

    def wake(self) -> None:
        """Call after enqueueing to publish without waiting for the next poll."""
        self._wake.set()

    def _delay(self, attempts: int) -> float:
        cap = min(self.config.max_delay, self.config.base_delay * 2 ** min(attempts, 20))
        return random.uniform(cap / 2, cap)

    async def run_once(self) -> int:
        """Attempt every due delivery once (concurrently); returns how many were attempted.

        The outcomes are recorded together, in one transaction, once every attempt of the
        batch has its answer (or its timeout). A delivery that fails on our side is
        recorded on its own and left out of the batch.
        """
        d = Delivery.__table__.c
        ref = d.event_id + literal(":") + d.relay
        async with self.sessions() as s:
            rows = (
                await s.execute(
                    select(d.event_id, d.relay, d.attempts, OutboxEvent.raw, self.quarantine.failing("publisher", ref))
                    .join(OutboxEvent, OutboxEvent.id == d.event_id)
                    # Only our relays: deliveries to a relay no longer configured must not fill the batch.
                    .where(
                        d.state == "pending",
                        d.next_attempt_at <= self.quarantine.now(),
                        d.reply.is_(False),
                        d.relay.in_(list(self.pool.relays)),
                    )
                    .order_by(d.next_attempt_at)
                    .limit(self.config.batch)
                )
            ).all()
        await self._start_replies()
        todo: list[tuple[Row[Any], Event]] = []
        for r in rows:
            try:
                todo.append((r, Event.from_dict(json.loads(r.raw))))
            except Exception as e:  # noqa: BLE001 - a row we cannot read is this delivery's failure
                await self._ours(r.event_id, r.relay, e)
        answers = await asyncio.gather(*(self._attempt(r.relay, ev) for r, ev in todo), return_exceptions=True)
        outcomes: list[Outcome] = []
        for (r, _), answer in zip(todo, answers, strict=True):
            if isinstance(answer, BaseException):
                if not isinstance(answer, Exception) or is_outage(answer):
                    raise answer
                await self._ours(r.event_id, r.relay, answer)
            else:
                outcomes.append((r.event_id, r.relay, r.attempts, answer[0], answer[1], bool(r.failing)))
        if outcomes:
            await self._record(outcomes)
        return len(todo)

    async def _start_replies(self) -> None:
        """Start the due reply-relay deliveries, each in the background and recorded on its own:
        a relay its customer named that never answers must not hold up our relays' batch."""
        free = self.config.reply_concurrency - len(self._replying)
        if free <= 0:
            return
        d = Delivery.__table__.c
        ref = d.event_id + literal(":") + d.relay
        async with self.sessions() as s:
            rows = (
                await s.execute(
                    select(d.event_id, d.relay, d.attempts, OutboxEvent.raw, self.quarantine.failing("publisher", ref))
                    .join(OutboxEvent, OutboxEvent.id == d.event_id)
                    .where(d.state == "pending", d.next_attempt_at <= self.quarantine.now(), d.reply.is_(True))
                    .order_by(d.next_attempt_at)
                    .limit(free + len(self._replying))
                )
            ).all()
        for r in rows:
            key = (r.event_id, r.relay)
            if key not in self._replying and len(self._replying) < self.config.reply_concurrency:
                task = asyncio.create_task(self._reply(r), name=f"reply relay {r.relay[:40]}")
                self._replying[key] = task
                task.add_done_callback(functools.partial(self._reply_done, key))

    def _reply_done(self, key: tuple[str, str], _task: asyncio.Task[None]) -> None:
        self._replying.pop(key, None)

    async def _reply(self, r: Row[Any]) -> None:
        try:
            event = Event.from_dict(json.loads(r.raw))
            ok, message = await publish_once(
                r.relay, event, timeout=self.config.ok_timeout, allow_private=self.config.reply_relays_allow_private
            )
            await self._record([(r.event_id, r.relay, r.attempts, ok, message, bool(r.failing))])
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - this delivery's failure (an outage is logged and retried later)
            try:
                await self._ours(r.event_id, r.relay, e)
            except Exception:  # noqa: BLE001 - the database is away: the row stays pending
                log.warning("reply relay delivery %s to %s not recorded: %s", r.event_id, r.relay, e)

    async def _attempt(self, relay: str, event: Event) -> tuple[bool, str]:
        try:
            return await self.pool.publish(relay, event, timeout=self.config.ok_timeout)
        except NotConnected as e:
            return False, f"not connected: {e}"
        except TimeoutError:
            return False, f"no OK within {self.config.ok_timeout:.0f} s"

    async def _ours(self, event_id: str, relay: str, exc: BaseException) -> None:
        """A failure of ours for one delivery: retried after the backoff, then quarantined."""

        async def on_failure(s: AsyncSession, v: Verdict) -> None:
            await s.execute(
                update(Delivery)
                .where(Delivery.event_id == event_id, Delivery.relay == relay, Delivery.state == "pending")
                .values(
                    state="quarantined" if v.quarantined else "pending",
                    next_attempt_at=v.retry_at,
                    last_message=f"ours: {v.error}"[:500],
                    updated_at=utcnow(),
                )
                .execution_options(synchronize_session=False)
            )

        if is_outage(exc):
            raise exc
        await self.quarantine.failed("publisher", delivery_ref(event_id, relay), exc, on_failure=on_failure)

    async def _record(self, outcomes: list[Outcome]) -> None:
        """Record the batch's outcomes in one transaction; should that fail for a reason that is
        not the database's, record them one by one, so a bad one only fails itself."""
        try:
            async with self.sessions.begin() as s:
                await self._record_in(s, outcomes)
        except Exception as e:  # isolated below
            if is_outage(e):
                raise
            for one in outcomes:
                try:
                    async with self.sessions.begin() as s:
                        await self._record_in(s, [one])
                except Exception as e1:  # noqa: BLE001 - this delivery's failure (an outage is re-raised)
                    await self._ours(one[0], one[1], e1)

    async def _record_in(self, s: AsyncSession, outcomes: list[Outcome]) -> None:
        d, o = table_of(Delivery), table_of(OutboxEvent)  # Core statements: no ORM bookkeeping
        now = utcnow()
        finished = []
        for event_id, relay, attempts, ok, message, failing in outcomes:
            attempts += 1
            if ok or message.startswith("duplicate:"):
                state = "ok"
            elif message.startswith(PERMANENT):
                state = "rejected"
            elif attempts >= self.config.max_attempts:
                state = "gave_up"
            else:
                state = "pending"
            await s.execute(
                update(d)
                .where(d.c.event_id == event_id, d.c.relay == relay, d.c.state == "pending")
                .values(
                    state=state,
                    attempts=attempts,
                    last_message=message[:500],
                    updated_at=now,
                    next_attempt_at=now + timedelta(seconds=self._delay(attempts)),
                )
            )
            if failing:  # our side works for it again: the relay's answer is what counts now
                await self.quarantine.clear(s, "publisher", delivery_ref(event_id, relay))
            if state != "pending":
                finished.append(event_id)
            if state in ("rejected", "gave_up"):
                log.warning("event %s to %s: %s after %d attempt(s): %s", event_id, relay, state, attempts, message)
        for event_id in dict.fromkeys(finished):
            # a quarantined delivery is not finished either: it goes out once replayed
            still = exists().where(and_(d.c.event_id == event_id, d.c.state.in_(("pending", "quarantined"))))
            await s.execute(update(o).where(o.c.id == event_id, o.c.done_at.is_(None), ~still).values(done_at=now))

    min_spacing = 0.005  # under load, one poll takes a batch of new events, not one each

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await self._run(stop)
        finally:  # a reply relay's delivery in flight is tried again after a restart
            for task in list(self._replying.values()):
                task.cancel()

    async def _run(self, stop: asyncio.Event) -> None:
        backoff = LoopBackoff("publisher", base=self.config.idle_interval)
        while not stop.is_set():
            t0 = time.monotonic()
            self._wake.clear()
            try:
                n = await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - a failed poll is retried; the rows are durable
                pause = backoff.failed(e)  # the database, for everyone: back off as a whole
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), pause)
                continue
            backoff.ok()
            if n:
                await asyncio.sleep(max(0.0, self.min_spacing - (time.monotonic() - t0)))
            else:
                try:
                    await asyncio.wait_for(self._wake.wait(), self.config.idle_interval)
                except TimeoutError:
                    pass

    async def deliveries(self, event_id: str) -> dict[str, tuple[str, int, str | None]]:
        async with self.sessions() as s:
            rows = await s.execute(
                select(Delivery.relay, Delivery.state, Delivery.attempts, Delivery.last_message).where(
                    Delivery.event_id == event_id
                )
            )
            return {r.relay: (r.state, r.attempts, r.last_message) for r in rows}
