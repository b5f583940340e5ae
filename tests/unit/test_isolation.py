"""One poisoned item never blocks the others, in each loop of the engine runner (SQLite and PostgreSQL).

For the inbox, the timers, LN facts and payout outcomes: two jobs in the same state, and a
fault injected for one item only (the engine's own method wrapped so that it raises for that
job; each test names what it stands for). The healthy item must be processed in the same
pass; the poisoned one is retried after its backoff (not before), quarantined after
``RetryPolicy.after`` failures, listed and counted, never retried automatically, and
processed once replayed with the fault removed. The database is real; the engine is driven
as in tests/unit/test_engine_properties.py (facts written as the watcher and the payout
worker write them).
"""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from sqlalchemy import func, select, text

from service import quarantine
from service.api import actions
from service.api.models import AdminAction
from service.db import create_engine, session_factory, utcnow
from service.escrow.engine import payout_ref
from service.escrow.models import Job
from service.escrow.runner import EngineRunner, timer_ref
from service.lightning.models import LnFact
from service.nostr.inbox import Inbox
from service.nostr.models import InboxEvent
from service.payouts.models import Payout
from service.quarantine import ItemFailure, Quarantine, RetryPolicy
from tests.unit.test_engine_properties import Clock, World

POLICY = RetryPolicy(after=3, base_seconds=10, max_seconds=15)


class Injected(RuntimeError):
    """The fault injected into one item (stands in for a bug or a hostile input meeting that item only)."""


class QClock:
    """The quarantine's clock: real time plus an offset the test moves (backoffs pass at once)."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return utcnow() + self.offset

    def skip(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
async def world(backend: str, database_url: str):
    engine = create_engine(database_url)
    sessions = session_factory(engine)
    w = World(sessions, Clock())
    w.qclock = QClock()
    w.quarantine = Quarantine(sessions, POLICY, clock=w.qclock)
    w.inbox = Inbox(sessions, quarantine=w.quarantine)
    yield w
    await engine.dispose()


async def drive(world: World, to: str, n: int = 2) -> list[str]:
    """``n`` hold jobs driven together to ``to``; their ids in creation order."""
    for _ in range(n):
        await world.job_request("best", "hold", 1_000_000)
    ids = [ev.id for ev, _ in world.jobs]
    if to == "requested":
        return ids
    await world.effects()
    if to == "offered":
        return ids
    for _ in range(n):
        await world.pay(0)
    await world.step_engine()
    for i in range(n):
        await world.result(i, 0, 0, True)
        await world.result(i, 1, 1, True)
    if to == "validating":
        return ids
    for i in range(n):
        await world.score(i, 0, False)
        await world.score(i, 1, False)
    await world.effects()  # settle_hold: the settled fact
    await world.step_engine()  # release: payouts waiting for the payees' invoices
    assert to == "releasing"
    return ids


async def state(world: World, job_id: str) -> str:
    async with world.sessions() as s:
        return (await s.get(Job, job_id)).state


async def failure(world: World, source: str, ref: str) -> ItemFailure | None:
    async with world.sessions() as s:
        return await s.get(ItemFailure, (source, ref))


async def step(world: World) -> int:
    return await EngineRunner(world.engine, world.inbox).step()


def poison(obj: object, name: str, is_poisoned) -> dict:
    """Wrap ``obj.name`` so that it raises Injected while ``switch["on"]`` and ``is_poisoned(args)``."""
    real = getattr(obj, name)
    switch = {"on": True, "calls": 0}

    async def wrapped(*args, **kw):
        if is_poisoned(*args):
            switch["calls"] += 1
            if switch["on"]:
                raise Injected(f"injected fault in {name}")
        return await real(*args, **kw)

    setattr(obj, name, wrapped)
    return switch


async def retried_then_quarantined(world: World, source: str, ref: str, switch: dict, *, job_id: str | None) -> None:
    """From its first failure: not retried before its backoff, retried after, quarantined at the
    ``after``-th failure, listed and counted, and never retried automatically again."""
    for n in range(1, POLICY.after + 1):
        row = await failure(world, source, ref)
        assert row is not None and row.failures == n, (n, row and row.failures)
        assert "Injected: injected fault" in row.last_error and row.job_id == job_id
        if n == POLICY.after:
            break
        assert row.quarantined_at is None
        calls = switch["calls"]
        await step(world)
        assert switch["calls"] == calls, "retried before its backoff"
        world.qclock.skip(POLICY.delay(n))
        await step(world)
        assert switch["calls"] == calls + 1, "not retried after its backoff"
    assert row.quarantined_at is not None
    async with world.sessions() as s:
        items, total = await quarantine.listing(s)
        assert await Quarantine.counts(s) == {**dict.fromkeys(quarantine.SOURCES, 0), source: total}
    assert any(i["source"] == source and i["ref"] == ref and i["job_id"] == job_id for i in items)
    calls = switch["calls"]
    world.qclock.skip(86_400)
    await step(world)
    assert switch["calls"] == calls, "a quarantined item is never retried automatically"


async def replay(world: World, source: str, ref: str) -> None:
    async with world.sessions.begin() as s:
        assert await actions.replay_quarantined(s, source, ref, "fixed the cause") == "pending"
    async with world.sessions() as s:
        audited = (await s.scalars(select(AdminAction).where(AdminAction.action == "replay_quarantined"))).all()
    assert [a.target for a in audited][-1] == f"{source}/{ref}"


async def test_inbox_a_poisoned_event_does_not_block_the_next(world: World) -> None:
    """Fault injected: the engine's handler raises for the first of two job requests."""
    stored: list = []

    async def store_only(event) -> None:
        stored.append(event)
        await world.inbox.store(event, "test")

    world.feed = store_only
    await world.job_request("best", "hold", 1_000_000)
    await world.job_request("best", "hold", 1_000_000)
    a, b = (ev.id for ev in stored)
    switch = poison(world.engine, "handle_event", lambda s, ev: ev.id == a)

    await step(world)
    assert await state(world, b) == "requested", "the healthy event is processed in the same pass"
    async with world.sessions() as s:
        assert await s.get(Job, a) is None
    await retried_then_quarantined(world, "inbox", a, switch, job_id=a)
    async with world.sessions() as s:
        row = await s.get(InboxEvent, a)
    assert row.handled_at is not None and row.outcome.startswith("error: Injected")

    switch["on"] = False
    await replay(world, "inbox", a)
    await step(world)
    assert await state(world, a) == "requested"
    assert await failure(world, "inbox", a) is None


async def test_inbox_failing_rows_never_fill_the_scan(world: World) -> None:
    """Fault injected: the handler raises for the first two of three events; the scan takes two
    at a time. The third is reached on the next pass, while the two wait out their backoff."""
    stored: list = []

    async def store_only(event) -> None:
        stored.append(event)
        await world.inbox.store(event, "test")

    world.feed = store_only
    for _ in range(3):
        await world.job_request("best", "hold", 1_000_000)
    bad = {stored[0].id, stored[1].id}
    poison(world.engine, "handle_event", lambda s, ev: ev.id in bad)
    assert await world.inbox.process_pending(world.engine.handle_event, limit=2) == 0
    assert await world.inbox.process_pending(world.engine.handle_event, limit=2) == 1
    assert await state(world, stored[2].id) == "requested"


async def test_inbox_an_integrity_error_of_the_item_is_the_items_failure(world: World) -> None:
    """A handler whose own write breaks a constraint (a real IntegrityError from the database; the
    handler is fault-injected to insert a duplicate job row) is that event's failure: it must not
    be taken for a database outage and stop the inbox."""
    stored: list = []

    async def store_only(event) -> None:
        stored.append(event)
        await world.inbox.store(event, "test")

    world.feed = store_only
    await world.job_request("best", "hold", 1_000_000)
    await world.job_request("best", "hold", 1_000_000)
    a, b = (ev.id for ev in stored)
    real = world.engine.handle_event

    async def duplicate_insert(s, event):
        out = await real(s, event)
        if event.id == a:
            await s.execute(text("INSERT INTO escrow_jobs SELECT * FROM escrow_jobs WHERE id = :id"), {"id": a})
        return out

    world.engine.handle_event = duplicate_insert
    await step(world)
    assert await state(world, b) == "requested"
    row = await failure(world, "inbox", a)
    assert row is not None and row.failures == 1 and row.last_error.startswith("IntegrityError")


async def test_timers_a_poisoned_deadline_does_not_stop_the_others(world: World) -> None:
    """The reported bug: fault injected in the engine's decision for the first job (it stands in
    for build_validation_complete raising on the 65-character median of two '9'*64 scores, which
    the codec now refuses): the second job's validation deadline must still be acted on."""
    a, b = await drive(world, "validating")
    switch = poison(world.engine, "on_timers", lambda s, job: job.id == a)  # the validation deadline's decision
    world.clock.t += 201  # both validation deadlines passed
    await step(world)
    assert await state(world, b) == "refunding", "the healthy job is decided in the same pass (no scores)"
    assert await state(world, a) == "validating"
    ref = timer_ref(a, "validating")
    assert ref == f"{a}:validation_deadline"
    await retried_then_quarantined(world, "timer", ref, switch, job_id=a)

    switch["on"] = False
    await replay(world, "timer", ref)
    await step(world)
    assert await state(world, a) == "refunding"
    assert await failure(world, "timer", ref) is None


async def test_ln_facts_a_poisoned_fact_does_not_block_the_next(world: World) -> None:
    """Fault injected: the engine raises on the first job's funding fact (accepted)."""
    a, b = await drive(world, "offered")
    await world.pay(0)
    await world.pay(0)
    async with world.sessions() as s:
        facts = {f.seq: f for f in (await s.scalars(select(LnFact).where(LnFact.consumed_at.is_(None)))).all()}
    hash_a = await invoice_hash(world, a)
    seq_a = next(seq for seq, f in facts.items() if f.payment_hash == hash_a)
    switch = poison(world.engine, "handle_ln_fact", lambda s, fact: fact.seq == seq_a)
    await step(world)
    assert await state(world, b) == "collecting"
    assert await state(world, a) == "offered"
    await retried_then_quarantined(world, "ln_fact", str(seq_a), switch, job_id=a)

    switch["on"] = False
    await replay(world, "ln_fact", str(seq_a))
    await step(world)
    assert await state(world, a) == "collecting"


async def invoice_hash(world: World, job_id: str) -> str:
    from service.lightning.models import LnInvoice

    async with world.sessions() as s:
        return await s.scalar(select(LnInvoice.payment_hash).where(LnInvoice.job_id == job_id))


async def world_job(world: World, job_id: str) -> Job:
    async with world.sessions() as s:
        return await s.get(Job, job_id)


async def test_payout_outcomes_a_poisoned_outcome_does_not_block_the_next(world: World) -> None:
    """Fault injected: the engine raises on the first job's reward outcome; its validators' outcomes
    and the second job's are booked, and the second job closes."""
    a, b = await drive(world, "releasing")
    await world.payouts(0, False)  # every payout succeeded
    async with world.sessions() as s:
        reward = (await s.scalars(select(Payout).where(Payout.job_id == a, Payout.id.contains(":reward:")))).one()
    ref = payout_ref(reward)
    switch = poison(world.engine, "handle_payout", lambda s, p: p.id == reward.id)
    await step(world)
    assert await state(world, b) == "closed", "the healthy job's outcomes are booked in the same pass"
    assert await state(world, a) == "releasing"
    await retried_then_quarantined(world, "payout_outcome", ref, switch, job_id=a)

    switch["on"] = False
    await replay(world, "payout_outcome", ref)
    await step(world)
    assert await state(world, a) == "closed"
    async with world.sessions() as s:
        assert await s.scalar(select(func.count()).select_from(ItemFailure)) == 0
