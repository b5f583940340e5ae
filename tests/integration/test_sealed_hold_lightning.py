"""A sealed hold-mode job on real LND: the customer's money is locked, the key is released only
once the hold invoice is settled, and the provider's receipt names the invoice that was paid.

The engine, the effect runner (real hold invoice, real settle) and the invoice watcher run against
the regtest escrow node; the customer pays from its node; the provider's reward is paid by the
payout worker to an invoice of the payee node. Events are real signed events through the inbox
(tests/unit/test_engine_sealed.py's world). SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import hashlib

import bolt11
import pytest
from sqlalchemy import select

from service.api import queries
from service.db import create_engine, session_factory
from service.escrow.models import Job, Result
from service.escrow.runner import EffectRunner
from service.lightning.client import InvoiceState, PaymentStatus
from service.lightning.invoices import EscrowInvoices, HoldSizing
from service.lightning.models import LnInvoice
from service.lightning.settlement import SettlementWatcher
from service.nostr.protocol import parse_model_key, parse_reward_paid
from service.nostr.protocol.feedback import INFO_MODEL_KEY, INFO_REWARD_PAID
from service.nostr.protocol.sealing import unwrap_key
from service.payouts import InvoiceSource
from service.payouts.models import Payout
from service.payouts.store import accept_invoice
from service.payouts.worker import Payouts
from tests.conftest import Regtest, wait_until
from tests.integration.test_escrow_lightning import POLICY
from tests.support.payouts import pay_due
from tests.unit.test_engine_properties import Clock
from tests.unit.test_engine_sealed import CUSTOMER, ESCROW, PROVIDERS, SealedWorld

pytestmark = pytest.mark.lnd


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


async def _state(world: SealedWorld, job_id: str) -> str:
    async with world.sessions() as s:
        job = await s.get(Job, job_id)
        assert job is not None
        return str(job.state)


async def test_a_sealed_hold_job_releases_its_key_only_after_the_settle(
    backend: str, database_url: str, regtest: Regtest
) -> None:
    engine = create_engine(database_url)
    world = SealedWorld(session_factory(engine), Clock())
    watcher = SettlementWatcher(regtest.escrow, world.sessions, sweep_interval=2.0)
    invoices = EscrowInvoices(regtest.escrow, HoldSizing(margin_blocks=16), expiry_seconds=600, sessions=world.sessions)
    runner = EffectRunner(world.engine, invoices, watcher)
    payouts = Payouts(regtest.escrow, world.sessions, POLICY, our_pubkey=regtest.node("escrow")["pubkey"])
    await watcher.start()
    pay: asyncio.Task | None = None
    try:
        await wait_until(lambda: watcher.health.connected, 60, "invoice stream subscribed")
        await world.job_request("best", "hold", 1_000_000)
        job_id = world.jobs[0][0].id
        assert await runner.run_once() == 1  # a real hold invoice
        async with world.sessions() as s:
            inv = (await s.scalars(select(LnInvoice).where(LnInvoice.job_id == job_id))).one()
        assert inv.mode == "hold"
        pay = asyncio.create_task(regtest.customer_pays(inv.payment_request))

        async def collecting() -> bool:
            await world.step_engine()
            return await _state(world, job_id) == "collecting"

        await wait_until(collecting, 30, "the hold HTLC accepted and the job collecting")

        good, sealed = await world.sealed_result(0, 0)
        plain = await world.plain_result(2, 1)
        plain_sha = hashlib.sha256(b"plain 2").hexdigest()
        for v in (0, 1):
            await world.sealed_scores(v, {good.id: (sealed.model_sha256, "0.9"), plain.id: (plain_sha, "0.7")})
        assert await _state(world, job_id) == "releasing"
        # Decided, but the customer's money is still only locked: no key, and the payment still pending.
        assert await world.published(INFO_MODEL_KEY) == []
        assert (await regtest.escrow.lookup_invoice(bytes.fromhex(inv.payment_hash))).state == InvoiceState.ACCEPTED
        assert not pay.done()

        assert await runner.run_once() == 1  # the settle effect, on LND

        async def key_out() -> bool:
            await world.step_engine()
            return bool(await world.published(INFO_MODEL_KEY))

        await wait_until(key_out, 30, "the settled fact consumed and the key released")
        assert (await asyncio.wait_for(pay, 30)).status == PaymentStatus.SUCCEEDED
        [key_event] = await world.published(INFO_MODEL_KEY)
        released = parse_model_key(key_event)
        assert released.result_id == good.id
        assert unwrap_key(CUSTOMER, ESCROW.public_key_hex, released.payload, sealed.key_sha256) == sealed.key
        async with world.sessions() as s:
            assert [k["result_id"] for k in await queries.released_keys(s, job_id)] == [good.id]
            row = await s.get(Result, good.id)
            assert row is not None and row.key_released_at is not None

        # The provider gives its invoice; the payout worker pays it on LND; the receipt names it.
        async with world.sessions() as s:
            reward = (await s.scalars(select(Payout).where(Payout.job_id == job_id, Payout.earned_by == good.id))).one()
        payreq, payment_hash = await regtest.payee_invoice(reward.amount_msat)
        async with world.sessions.begin() as s:
            await accept_invoice(
                s,
                job_id=job_id,
                payee=PROVIDERS[0].public_key_hex,
                bolt11=payreq,
                amount_msat=None,
                source=InvoiceSource.REST,
                network=POLICY.network,
            )
        outcomes = await pay_due(payouts)
        assert [o.state for o in outcomes] == ["succeeded"], outcomes
        await world.step_engine()
        [paid_event] = await world.published(INFO_REWARD_PAID)
        paid = parse_reward_paid(paid_event)
        assert paid.bolt11 == payreq and paid.earned_by == good.id
        decoded = bolt11.decode(payreq)
        assert decoded.payment_hash == paid.payment.payment_hash == payment_hash.hex()
        assert decoded.amount_msat == paid.payment.amount_msat == reward.amount_msat
        assert len(await world.published(INFO_MODEL_KEY)) == 1  # nothing released twice
    finally:
        if pay is not None and not pay.done():
            pay.cancel()
        await watcher.stop()
        await engine.dispose()
