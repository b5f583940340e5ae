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
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import and_, exists, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.db import insert_ignore, utcnow
from service.nostr.models import Delivery, OutboxEvent
from service.nostr.nip01 import Event
from service.nostr.oneshot import publish_once
from service.nostr.pool import NotConnected, RelayPool

log = logging.getLogger(__name__)

PERMANENT = ("invalid:", "pow:", "blocked:", "restricted:")


async def enqueue(session: AsyncSession, event: Event, relays: list[str]) -> bool:
    """Queue ``event`` for every relay in the caller's transaction; False if it was queued before."""
    res = await session.execute(insert_ignore(session, OutboxEvent.__table__),
                                [{"id": event.id, "kind": event.kind, "raw": event.to_json(),
                                  "enqueued_at": utcnow()}])
    now = utcnow()
    await session.execute(insert_ignore(session, Delivery.__table__),
                          [{"event_id": event.id, "relay": r, "state": "pending", "attempts": 0,
                            "next_attempt_at": now, "updated_at": now} for r in relays])
    return res.rowcount == 1


@dataclass
class PublisherConfig:
    max_attempts: int = 12
    base_delay: float = 1.0
    max_delay: float = 300.0
    batch: int = 100
    idle_interval: float = 0.5
    ok_timeout: float = 10.0
    # A job's reply relays (not ours) are published to by a short connection each; dev/test only:
    # allow them on private addresses.
    reply_relays_allow_private: bool = False


class Publisher:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], pool: RelayPool,
                 config: PublisherConfig | None = None) -> None:
        self.sessions = sessions
        self.pool = pool
        self.config = config or PublisherConfig()
        self._wake = asyncio.Event()
        self._foreign: set[tuple[str, str]] = set()        # reply-relay deliveries in flight
        self._foreign_tasks: set[asyncio.Task] = set()

    def wake(self) -> None:
        """Call after enqueueing to publish without waiting for the next poll."""
        self._wake.set()

    def _delay(self, attempts: int) -> float:
        cap = min(self.config.max_delay, self.config.base_delay * 2 ** min(attempts, 20))
        return random.uniform(cap / 2, cap)

    async def run_once(self) -> int:
        """Attempt every due delivery once (concurrently); returns how many were attempted.

        The outcomes are recorded together, in one transaction, once every attempt of the
        batch has its answer (or its timeout).
        """
        async with self.sessions() as s:
            rows = (await s.execute(
                select(Delivery.event_id, Delivery.relay, Delivery.attempts, OutboxEvent.raw)
                .join(OutboxEvent, OutboxEvent.id == Delivery.event_id)
                .where(Delivery.state == "pending", Delivery.next_attempt_at <= utcnow())
                .order_by(Delivery.next_attempt_at).limit(self.config.batch))).all()
        known = set(self.pool.relays)
        todo = [r for r in rows if r.relay in known]
        # A job's reply relays (its customer chose them) are published to in the background, each
        # recorded on its own: a relay that never answers must not hold up our relays' batch.
        for r in rows:
            if r.relay not in known and (r.event_id, r.relay) not in self._foreign:
                self._foreign.add((r.event_id, r.relay))
                task = asyncio.create_task(self._foreign_delivery(r.event_id, r.relay, r.attempts, r.raw))
                self._foreign_tasks.add(task)
                task.add_done_callback(self._foreign_tasks.discard)
        answers = await asyncio.gather(*(self._attempt(r.relay, r.raw) for r in todo))
        if todo:
            await self._record([(r.event_id, r.relay, r.attempts, ok, message)
                                for r, (ok, message) in zip(todo, answers)])
        return len(todo)

    async def _foreign_delivery(self, event_id: str, relay: str, attempts: int, raw: str) -> None:
        try:
            ok, message = await publish_once(relay, Event.from_dict(json.loads(raw)), timeout=self.config.ok_timeout,
                                             allow_private=self.config.reply_relays_allow_private)
            await self._record([(event_id, relay, attempts, ok, message)])
        except Exception:  # noqa: BLE001 - one reply relay's delivery never stops the publisher
            log.exception("delivery of %s to reply relay %s failed", event_id, relay)
        finally:
            self._foreign.discard((event_id, relay))

    async def _attempt(self, relay: str, raw: str) -> tuple[bool, str]:
        event = Event.from_dict(json.loads(raw))
        try:
            return await self.pool.publish(relay, event, timeout=self.config.ok_timeout)
        except NotConnected as e:
            return False, f"not connected: {e}"
        except TimeoutError:
            return False, f"no OK within {self.config.ok_timeout:.0f} s"

    async def _record(self, outcomes: list[tuple[str, str, int, bool, str]]) -> None:
        d, o = Delivery.__table__, OutboxEvent.__table__   # Core statements: no ORM bookkeeping
        now = utcnow()
        finished = []
        async with self.sessions.begin() as s:
            for event_id, relay, attempts, ok, message in outcomes:
                attempts += 1
                if ok or message.startswith("duplicate:"):
                    state = "ok"
                elif message.startswith(PERMANENT):
                    state = "rejected"
                elif attempts >= self.config.max_attempts:
                    state = "gave_up"
                else:
                    state = "pending"
                await s.execute(update(d)
                                .where(d.c.event_id == event_id, d.c.relay == relay, d.c.state == "pending")
                                .values(state=state, attempts=attempts, last_message=message[:500], updated_at=now,
                                        next_attempt_at=now + timedelta(seconds=self._delay(attempts))))
                if state != "pending":
                    finished.append(event_id)
                if state in ("rejected", "gave_up"):
                    log.warning("event %s to %s: %s after %d attempt(s): %s", event_id, relay, state, attempts,
                                message)
            for event_id in dict.fromkeys(finished):
                still = exists().where(and_(d.c.event_id == event_id, d.c.state == "pending"))
                await s.execute(update(o).where(o.c.id == event_id, o.c.done_at.is_(None), ~still)
                                .values(done_at=now))

    min_spacing = 0.005   # under load, one poll takes a batch of new events, not one each

    async def run(self, stop: asyncio.Event) -> None:
        try:
            await self._run(stop)
        finally:
            for task in list(self._foreign_tasks):   # a reply relay's delivery is retried after a restart
                task.cancel()

    async def _run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            self._wake.clear()
            try:
                n = await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a failed poll is retried; the rows are durable
                log.exception("publisher poll failed")
                n = 0
            if n:
                await asyncio.sleep(max(0.0, self.min_spacing - (time.monotonic() - t0)))
            else:
                try:
                    await asyncio.wait_for(self._wake.wait(), self.config.idle_interval)
                except TimeoutError:
                    pass

    async def deliveries(self, event_id: str) -> dict[str, tuple[str, int, str | None]]:
        async with self.sessions() as s:
            rows = await s.execute(select(Delivery.relay, Delivery.state, Delivery.attempts, Delivery.last_message)
                                   .where(Delivery.event_id == event_id))
            return {r.relay: (r.state, r.attempts, r.last_message) for r in rows}
