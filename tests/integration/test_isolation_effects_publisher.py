"""One poisoned item never blocks the others: the effect runner on real LND, the publisher on the real relay.

Effects: two jobs' effects run against the regtest escrow node; a fault is injected for the first
job only (its LND call refused: stopping the shared node would fail every job, which is not the
case under test). The second job's effect is carried out for real in the same pass; the first is
retried after its backoff, quarantined after ``max_attempts``, listed, and carried out for real
once replayed without the fault. Publisher: two queued events, one of whose rows no longer parses
(fault injected into the table: a row we cannot read); the other reaches the relay in the same
poll. SQLite and PostgreSQL.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

import pytest
from sqlalchemy import select, update

from service import quarantine
from service.db import create_engine, session_factory
from service.escrow.models import Effect, Job
from service.escrow.runner import EffectRunner
from service.lightning.client import InvoiceState
from service.lightning.errors import LndUnavailable
from service.lightning.invoices import EscrowInvoices, HoldSizing
from service.lightning.models import LnInvoice
from service.lightning.settlement import SettlementWatcher
from service.nostr import outbox
from service.nostr.inbox import Inbox
from service.nostr.models import OutboxEvent
from service.nostr.nip01 import SecretKey, sign_event
from service.nostr.outbox import Publisher, PublisherConfig, delivery_ref
from service.nostr.pool import PoolConfig, RelayPool, Subscription
from service.quarantine import ItemFailure, Quarantine
from tests.conftest import Regtest, wait_until
from tests.e2e.market import query
from tests.integration.test_engine_states import deletion
from tests.unit.test_engine_properties import Clock, World
from tests.unit.test_isolation import POLICY, QClock, replay

MAX_ATTEMPTS = 3


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@asynccontextmanager
async def world_on(database_url: str):
    engine = create_engine(database_url)
    sessions = session_factory(engine)
    w = World(sessions, Clock())
    w.qclock = QClock()
    w.quarantine = Quarantine(sessions, POLICY, clock=w.qclock)
    w.inbox = Inbox(sessions, quarantine=w.quarantine)
    try:
        yield w
    finally:
        await engine.dispose()


class OneJobRefused:
    """The real LND client, except that calls about ``poisoned`` payment hashes or jobs are refused
    as if LND were unreachable (the injected fault)."""

    def __init__(self, real, poisoned_hashes: set[str]) -> None:
        self.real = real
        self.poisoned = poisoned_hashes
        self.on = True
        self.calls = 0

    def __getattr__(self, name: str):
        return getattr(self.real, name)

    async def cancel_invoice(self, payment_hash: bytes) -> None:
        if payment_hash.hex() in self.poisoned:
            self.calls += 1
            if self.on:
                raise LndUnavailable("CancelInvoice", "injected: connection refused")
        await self.real.cancel_invoice(payment_hash)


async def effect_of(world: World, job_id: str, kind: str) -> Effect:
    async with world.sessions() as s:
        return (await s.scalars(select(Effect).where(Effect.job_id == job_id, Effect.kind == kind))).one()


async def invoice_of(world: World, job_id: str) -> LnInvoice | None:
    async with world.sessions() as s:
        return (await s.scalars(select(LnInvoice).where(LnInvoice.job_id == job_id))).first()


@pytest.mark.lnd
async def test_effects_a_cancel_that_keeps_failing_is_quarantined_not_dropped(
    backend: str, database_url: str, regtest: Regtest
) -> None:
    async with world_on(database_url) as world:
        watcher = SettlementWatcher(regtest.escrow, world.sessions)
        invoices = EscrowInvoices(
            regtest.escrow, HoldSizing(margin_blocks=16), expiry_seconds=600, sessions=world.sessions
        )
        runner = EffectRunner(world.engine, invoices, watcher, max_attempts=MAX_ATTEMPTS, quarantine=world.quarantine)
        try:
            await world.job_request("best", "hold", 1_000_000)
            await world.job_request("best", "hold", 1_000_000)
            a, b = (ev.id for ev, _ in world.jobs)
            world.qclock.skip(1)
            assert await runner.run_once() == 2  # two real hold invoices
            inv_a, inv_b = await invoice_of(world, a), await invoice_of(world, b)
            for job_id in (a, b):  # the customer deletes both offers
                await deletion(world, job_id)
            lnd = OneJobRefused(regtest.escrow, {inv_a.payment_hash})
            runner.lnd = lnd
            world.qclock.skip(1)

            assert await runner.run_once() == 1
            assert (
                await regtest.escrow.lookup_invoice(bytes.fromhex(inv_b.payment_hash))
            ).state == InvoiceState.CANCELED
            assert (await regtest.escrow.lookup_invoice(bytes.fromhex(inv_a.payment_hash))).state == InvoiceState.OPEN
            eff = await effect_of(world, a, "cancel_invoice")
            ref = str(eff.id)
            policy = world.quarantine.policy_for("effect")
            for n in range(1, MAX_ATTEMPTS):
                eff = await effect_of(world, a, "cancel_invoice")
                assert eff.state == "pending" and "LndUnavailable" in eff.last_error
                calls = lnd.calls
                assert await runner.run_once() == 0 and lnd.calls == calls, "retried before its backoff"
                world.qclock.skip(policy.delay(n))
                await runner.run_once()
                assert lnd.calls == calls + 1
            eff = await effect_of(world, a, "cancel_invoice")
            assert eff.state == "quarantined"
            async with world.sessions() as s:
                items, _ = await quarantine.listing(s)
            assert [(i["source"], i["ref"], i["job_id"], i["failures"]) for i in items] == [
                ("effect", ref, a, MAX_ATTEMPTS)
            ]
            world.qclock.skip(3600)
            assert await runner.run_once() == 0, "a quarantined effect is not retried automatically"

            lnd.on = False
            await replay(world, "effect", ref)
            assert await runner.run_once() == 1
            assert (
                await regtest.escrow.lookup_invoice(bytes.fromhex(inv_a.payment_hash))
            ).state == InvoiceState.CANCELED
            assert (await effect_of(world, a, "cancel_invoice")).state == "done"
            async with world.sessions() as s:
                assert await s.get(ItemFailure, ("effect", ref)) is None
        finally:
            await watcher.stop()


@pytest.mark.lnd
async def test_effects_an_invoice_never_made_cancels_its_job_and_the_other_is_offered(
    backend: str, database_url: str, regtest: Regtest
) -> None:
    """Fault injected: LND refuses to create the first job's invoice, every time."""
    async with world_on(database_url) as world:
        watcher = SettlementWatcher(regtest.escrow, world.sessions)
        invoices = EscrowInvoices(
            regtest.escrow, HoldSizing(margin_blocks=16), expiry_seconds=600, sessions=world.sessions
        )
        runner = EffectRunner(world.engine, invoices, watcher, max_attempts=MAX_ATTEMPTS, quarantine=world.quarantine)
        try:
            await world.job_request("best", "hold", 1_000_000)
            await world.job_request("best", "hold", 1_000_000)
            a, b = (ev.id for ev, _ in world.jobs)
            real_create, refused = invoices.create, {"on": True}

            async def create(s, *, job_id: str, **kw):
                if refused["on"] and job_id == a:
                    raise LndUnavailable("AddHoldInvoice", "injected: connection refused")
                return await real_create(s, job_id=job_id, **kw)

            invoices.create = create
            policy = world.quarantine.policy_for("effect")
            world.qclock.skip(1)
            assert await runner.run_once() == 1
            assert (await world_job(world, b)).state == "offered", "the healthy job is offered in the same pass"
            for n in range(1, MAX_ATTEMPTS):
                world.qclock.skip(policy.delay(n))
                await runner.run_once()
            job_a = await world_job(world, a)
            assert job_a.state == "cancelled"
            assert (await effect_of(world, a, "create_invoice")).state == "quarantined"
            async with world.sessions() as s:
                raws = (await s.scalars(select(OutboxEvent.raw).where(OutboxEvent.raw.contains(a)))).all()
            assert any("escrow_unavailable" in r for r in raws), "the customer is told"

            refused["on"] = False
            ref = str((await effect_of(world, a, "create_invoice")).id)
            await replay(world, "effect", ref)
            assert await runner.run_once() == 1
            assert (await effect_of(world, a, "create_invoice")).state == "done"
            assert await invoice_of(world, a) is None, "no invoice for a job that was cancelled meanwhile"
        finally:
            await watcher.stop()


async def world_job(world: World, job_id: str) -> Job:
    async with world.sessions() as s:
        return await s.get(Job, job_id)


@pytest.mark.relay
async def test_publisher_a_row_we_cannot_read_does_not_stop_the_others(
    backend: str, database_url: str, relay_url: str
) -> None:
    async with world_on(database_url) as world:
        key = SecretKey.generate()
        pool = RelayPool(
            [relay_url],
            world.inbox,
            subscriptions=[Subscription("none", ({"kinds": [1], "#p": ["00" * 32]},))],
            secret_key=key,
            config=PoolConfig(backoff_base=0.05, backoff_max=0.5),
        )
        publisher = Publisher(world.sessions, pool, PublisherConfig(ok_timeout=5), quarantine=world.quarantine)
        await pool.start()
        try:
            await wait_until(lambda: pool.status()[0]["connected"], 15, "relay connected")
            bad, good = (sign_event(key, 1, [], f"isolation test {i}") for i in range(2))
            async with world.sessions.begin() as s:
                for ev in (bad, good):
                    await outbox.enqueue(s, ev, [relay_url])
                # Fault injected: the stored row of the first event is not JSON any more.
                await s.execute(update(OutboxEvent).where(OutboxEvent.id == bad.id).values(raw='{"id": "trunc'))

            assert await publisher.run_once() == 1
            assert (await publisher.deliveries(good.id))[relay_url][0] == "ok"
            assert [e["id"] for e in await query(relay_url, {"ids": [good.id]})] == [good.id]
            ref = delivery_ref(bad.id, relay_url)
            for n in range(1, POLICY.after):
                async with world.sessions() as s:
                    row = await s.get(ItemFailure, ("publisher", ref))
                assert row.failures == n and row.last_error.startswith("JSONDecodeError")
                assert await publisher.run_once() == 0
                async with world.sessions() as s:
                    assert (await s.get(ItemFailure, ("publisher", ref))).failures == n, "retried before its backoff"
                world.qclock.skip(POLICY.delay(n))
                await publisher.run_once()
            state, attempts, message = (await publisher.deliveries(bad.id))[relay_url]
            assert state == "quarantined" and attempts == 0 and message.startswith("ours: JSONDecodeError")
            async with world.sessions() as s:
                assert (await s.get(OutboxEvent, bad.id)).done_at is None
                assert (await Quarantine.counts(s))["publisher"] == 1

            async with world.sessions.begin() as s:  # the row is repaired; the operator replays
                await s.execute(update(OutboxEvent).where(OutboxEvent.id == bad.id).values(raw=bad.to_json()))
            await replay(world, "publisher", ref)
            assert await publisher.run_once() == 1
            assert (await publisher.deliveries(bad.id))[relay_url][0] == "ok"
            assert [e["id"] for e in await query(relay_url, {"ids": [bad.id]})] == [bad.id]
            async with world.sessions() as s:
                assert (await s.get(OutboxEvent, bad.id)).done_at is not None
                assert await s.get(ItemFailure, ("publisher", ref)) is None
        finally:
            await pool.stop()
