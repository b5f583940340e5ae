"""The escrow node's LND stops and restarts around a funding: the funding is still detected.

(Named to run last in the session: it restarts the shared escrow node.)
"""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import select

from service.db import create_engine, session_factory
from service.lightning.client import PaymentStatus
from service.lightning.invoices import EscrowInvoices, HoldSizing
from service.lightning.models import LnFact
from service.lightning.settlement import SettlementWatcher
from tests.conftest import Regtest, wait_until

pytestmark = pytest.mark.lnd


async def _kinds(sessions, h: str) -> list[str]:
    async with sessions() as s:
        return list((await s.scalars(select(LnFact.kind).where(LnFact.payment_hash == h).order_by(LnFact.seq))).all())


async def test_funding_detected_across_an_lnd_restart(regtest: Regtest, database_url: str) -> None:
    engine = create_engine(database_url)
    sessions = session_factory(engine)
    watcher = SettlementWatcher(regtest.escrow, sessions, sweep_interval=1.0, backoff_max=2.0)
    invoices = EscrowInvoices(regtest.escrow, HoldSizing(), expiry_seconds=900)
    await watcher.start()
    try:
        async with sessions.begin() as s:
            hold = await invoices.create(s, job_id="restart-hold", amount_msat=80_000, mode="hold", hold_seconds=3600)
            custodial = await invoices.create(s, job_id="restart-cust", amount_msat=70_000, mode="custodial")
        watcher.watch(hold.payment_hash)
        await wait_until(lambda: watcher.health.connected, 10, "watcher connected")

        await regtest.stop_node("escrow")
        await wait_until(
            lambda: not watcher.health.connected or watcher.health.last_error, 30, "watcher notices LND is gone"
        )
        assert await _kinds(sessions, hold.payment_hash) == []  # nothing invented while LND is down
        await regtest.start_node("escrow")

        # Funding arrives after the restart; the watcher reconnects by itself.
        pay_hold = asyncio.create_task(regtest.customer_pays(hold.payment_request))
        assert (await regtest.customer_pays(custodial.payment_request)).status == PaymentStatus.SUCCEEDED
        await wait_until(lambda: _has(sessions, custodial.payment_hash, "settled"), 30, "custodial funding")
        await wait_until(lambda: _has(sessions, hold.payment_hash, "accepted"), 30, "hold funding")
        assert watcher.health.connected
        await regtest.escrow.cancel_invoice(bytes.fromhex(hold.payment_hash))
        assert (await asyncio.wait_for(pay_hold, 30)).status == PaymentStatus.FAILED
    finally:
        await watcher.stop()
        await engine.dispose()


async def _has(sessions, h: str, kind: str) -> bool:
    return kind in await _kinds(sessions, h)


async def test_settlement_made_before_an_lnd_outage_is_recorded_after_it(regtest: Regtest, database_url: str) -> None:
    """Paid while the watcher was down; LND then down when the watcher starts; both come back."""
    engine = create_engine(database_url)
    sessions = session_factory(engine)
    invoices = EscrowInvoices(regtest.escrow, HoldSizing(), expiry_seconds=900)
    first = SettlementWatcher(regtest.escrow, sessions, sweep_interval=60)
    await first.start()
    await wait_until(lambda: first.health.connected, 10, "watcher connected")  # cursors initialised
    await first.stop()
    async with sessions.begin() as s:
        inv = await invoices.create(s, job_id="outage", amount_msat=45_000, mode="custodial")
    assert (await regtest.customer_pays(inv.payment_request)).status == PaymentStatus.SUCCEEDED
    await regtest.stop_node("escrow")
    watcher = SettlementWatcher(regtest.escrow, sessions, sweep_interval=60, backoff_max=2.0)
    await watcher.start()
    try:
        await wait_until(lambda: watcher.health.last_error, 20, "the outage is visible in health")
        assert not watcher.health.connected and await _kinds(sessions, inv.payment_hash) == []
        await regtest.start_node("escrow")
        await wait_until(lambda: _has(sessions, inv.payment_hash, "settled"), 60, "settlement after the outage")
    finally:
        await watcher.stop()
        await engine.dispose()
