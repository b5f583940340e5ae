"""The inbox stores each event once and processes each exactly once, across crashes and workers."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from sqlalchemy import func, select

from service.cursors import Cursor
from service.db import create_engine, session_factory
from service.nostr.inbox import Inbox
from service.nostr.nip01 import SecretKey, sign_event
from service.quarantine import Quarantine, RetryPolicy


class Crash(BaseException):
    """Stands in for the process dying mid-handler (nothing after it runs, no except catches it)."""


@pytest.fixture
async def inbox(database_url: str):
    engine = create_engine(database_url)
    sessions = session_factory(engine)
    # No backoff, quarantined at the third failure: a failing handler's retries happen at once
    # (the backoff itself is tested in tests/unit/test_quarantine.py).
    yield Inbox(sessions, rejected_retention=10, quarantine=Quarantine(sessions, RetryPolicy(after=3, base_seconds=0)))
    await engine.dispose()


def events(n: int):
    key = SecretKey.generate()
    return [sign_event(key, 5701, [["n", str(i)]], f"event {i}") for i in range(n)]


async def effects(inbox: Inbox) -> int:
    async with inbox.sessions() as s:
        return int(await s.scalar(select(func.count()).select_from(Cursor).where(Cursor.name.like("effect:%"))))


def recording_handler(calls: Counter):
    async def handle(session, event) -> str:
        calls[event.id] += 1
        session.add(Cursor(name=f"effect:{event.id}", position=1))  # a unique side effect
        return "processed"

    return handle


async def test_store_is_idempotent_by_id(inbox: Inbox) -> None:
    evs = events(3)
    assert await inbox.store(evs[0], "ws://a")
    assert not await inbox.store(evs[0], "ws://b")
    assert await inbox.store_many([(evs[1], "api"), (evs[1], "ws://a"), (evs[2], "ws://a"), (evs[0], "api")]) == 2
    assert await inbox.count() == 3


async def test_each_event_processed_once_even_with_concurrent_workers(inbox: Inbox) -> None:
    evs = events(40)
    await inbox.store_many([(e, "ws://a") for e in evs])
    calls: Counter = Counter()
    handler = recording_handler(calls)
    done = await asyncio.gather(*(inbox.process_pending(handler, limit=100) for _ in range(4)))
    assert sum(done) == 40
    assert set(calls) == {e.id for e in evs} and set(calls.values()) == {1}
    assert await effects(inbox) == 40
    assert await inbox.process_pending(handler) == 0
    assert await inbox.count(handled=False) == 0


@pytest.mark.postgres
async def test_each_event_processed_once_with_concurrent_workers_postgres(inbox: Inbox) -> None:
    await test_each_event_processed_once_even_with_concurrent_workers(inbox)


async def test_crash_mid_handler_leaves_event_pending_then_replayed_once(inbox: Inbox, database_url: str) -> None:
    evs = events(5)
    await inbox.store_many([(e, "ws://a") for e in evs])
    calls: Counter = Counter()
    inner = recording_handler(calls)

    async def crashing(session, event) -> str:
        await inner(session, event)
        if event.id == evs[2].id:
            raise Crash()
        return "processed"

    with pytest.raises(Crash):
        await inbox.process_pending(crashing)
    assert await effects(inbox) == 2, "the crashed event's effects were rolled back"
    assert await inbox.count(handled=False) == 3

    # "Restart": a new engine and inbox on the same database replay what is pending.
    engine = create_engine(database_url)
    try:
        restarted = Inbox(session_factory(engine))
        assert await restarted.process_pending(inner) == 3
        assert await restarted.process_pending(inner) == 0
    finally:
        await engine.dispose()
    assert await effects(inbox) == 5
    assert calls[evs[2].id] == 2 and all(calls[e.id] == 1 for e in evs if e is not evs[2])


async def test_a_handler_bug_is_recorded_and_does_not_wedge_the_inbox(inbox: Inbox) -> None:
    evs = events(3)
    await inbox.store_many([(e, "ws://a") for e in evs])

    async def buggy(session, event) -> str:
        if event.id == evs[1].id:
            raise KeyError("boom")
        return "ok"

    assert await inbox.process_pending(buggy) == 2  # the buggy one is retried first
    assert await inbox.process_pending(buggy) == 0
    assert await inbox.process_pending(buggy) == 1  # third failure: quarantined, recorded as final
    async with inbox.sessions() as s:
        from service.nostr.models import InboxEvent

        outcome = await s.scalar(select(InboxEvent.outcome).where(InboxEvent.id == evs[1].id))
    assert outcome.startswith("error: KeyError")


async def test_rejected_log_is_bounded(inbox: Inbox) -> None:
    for i in range(35):
        await inbox.reject("ws://bad", "bad_signature", f"n={i}", {"i": i})
    rows = await inbox.rejected(100)
    assert len(rows) == 10
    assert rows[0].detail == "n=34" and rows[-1].detail == "n=25"
