"""Escrow invoices, settlement facts, the deadline guard, webhooks and payouts on real LND."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import time
from datetime import timedelta

import bolt11
import pytest
from bolt11 import Bolt11, MilliSatoshi, TagChar, Tags
from sqlalchemy import select

from service.db import aware, create_engine, session_factory, utcnow
from service.escrow.mode import ModeRefused, decide_mode
from service.lightning import errors, webhook
from service.lightning.client import InvoiceState, PaymentStatus
from service.lightning.guard import guard_once
from service.lightning.invoices import EscrowInvoices, HoldSizing, InvoiceModeError
from service.lightning.models import LnFact, LnInvoice
from service.lightning.settlement import SettlementWatcher
from service.nostr.protocol import EscrowTerms, Mode, Network
from service.payouts import (
    CheckReason,
    Destination,
    DestinationKind,
    InvoiceCheckError,
    InvoiceRefused,
    InvoiceSource,
    NewPayout,
    PayoutKind,
    PayoutPolicy,
)
from service.payouts.check import check_invoice
from service.payouts.models import Payout, PayoutAttempt
from service.payouts.store import accept_invoice
from service.payouts.store import create as create_payout
from service.payouts.worker import Payouts
from tests.conftest import Regtest, wait_until
from tests.support.payouts import pay_due

pytestmark = pytest.mark.lnd

POLICY = PayoutPolicy(
    network="regtest",
    fee_ppm=5_000,
    fee_cap_msat=1_000_000,
    timeout_seconds=30,
    max_attempts=2,
    retry_seconds=0,
    min_expiry_seconds=60,
)


class Ln:
    def __init__(self, regtest: Regtest, url: str) -> None:
        self.regtest = regtest
        self.engine = create_engine(url)
        self.sessions = session_factory(self.engine)
        self.invoices = EscrowInvoices(regtest.escrow, HoldSizing(margin_blocks=16), expiry_seconds=600)
        self.watcher = SettlementWatcher(regtest.escrow, self.sessions, sweep_interval=2.0)
        self.payouts = Payouts(regtest.escrow, self.sessions, POLICY, our_pubkey=regtest.node("escrow")["pubkey"])

    async def invoice(self, amount: int, mode: str, **kw) -> LnInvoice:
        async with self.sessions.begin() as s:
            row = await self.invoices.create(
                s, job_id=kw.pop("job_id", "job-" + secrets.token_hex(4)), amount_msat=amount, mode=mode, **kw
            )
        if row.mode == "hold":
            self.watcher.watch(row.payment_hash)
        return row

    async def facts(self, h: str) -> list[tuple[str, str]]:
        async with self.sessions() as s:
            return [
                (f.kind, f.source)
                for f in (await s.scalars(select(LnFact).where(LnFact.payment_hash == h).order_by(LnFact.seq))).all()
            ]

    async def state(self, h: str) -> str:
        async with self.sessions() as s:
            return await s.scalar(select(LnInvoice.state).where(LnInvoice.payment_hash == h))

    async def wait_fact(self, h: str, kind: str, timeout: float = 20) -> None:
        await wait_until(lambda: _has(self, h, kind), timeout, f"fact {kind} for {h[:12]}")

    async def payout(self, pid: str) -> Payout:
        async with self.sessions() as s:
            return await s.get(Payout, pid)


async def _has(ln: Ln, h: str, kind: str) -> bool:
    return kind in [k for k, _ in await ln.facts(h)]


@pytest.fixture
async def ln(regtest: Regtest, database_url: str):
    ln = Ln(regtest, database_url)
    await ln.watcher.start()
    await wait_until(lambda: ln.watcher.health.connected, 60, "invoice stream subscribed (after the backfill)")
    yield ln
    await ln.watcher.stop()
    await ln.engine.dispose()


async def test_hold_funding_settle_then_payout_to_payee(ln: Ln, regtest: Regtest) -> None:
    inv = await ln.invoice(150_000, "hold", hold_seconds=3600, memo="escrow for job A", on_deadline="settle")
    assert inv.mode == "hold" and inv.cltv_expiry == HoldSizing(margin_blocks=16).cltv_blocks(3600)
    pay = asyncio.create_task(regtest.customer_pays(inv.payment_request))
    await ln.wait_fact(inv.payment_hash, "accepted")
    assert await ln.state(inv.payment_hash) == "accepted"
    assert not pay.done(), "the customer's money is locked, not taken"

    await regtest.escrow.settle_invoice(bytes.fromhex(inv.preimage))
    await ln.watcher.confirm(inv.payment_hash, "release")
    assert await ln.state(inv.payment_hash) == "settled"
    assert (await asyncio.wait_for(pay, 30)).status == PaymentStatus.SUCCEEDED
    kinds = [k for k, _ in await ln.facts(inv.payment_hash)]
    assert kinds == ["accepted", "settled"], "each fact once, whatever saw it"

    payreq, h = await regtest.payee_invoice(120_000, memo="reward")
    async with ln.sessions.begin() as s:
        assert await create_payout(
            s,
            NewPayout(
                "job-A:provider-1",
                inv.job_id,
                PayoutKind.REWARD,
                "ab" * 32,
                120_000,
                Destination(DestinationKind.BOLT11, payreq),
            ),
        )
        assert not await create_payout(
            s,
            NewPayout(
                "job-A:provider-1",
                None,
                PayoutKind.REWARD,
                "ab" * 32,
                120_000,
                Destination(DestinationKind.BOLT11, payreq),
            ),
        ), "idempotent by payout id"
    [outcome] = await pay_due(ln.payouts)
    assert outcome.state == "succeeded", outcome
    p = await ln.payout("job-A:provider-1")
    assert p.state == "succeeded" and p.fee_msat == 0 and p.payment_hash == h.hex()
    assert hashlib.sha256(bytes.fromhex(p.preimage)).digest() == h
    assert (await regtest.payee.lookup_invoice(h)).state == InvoiceState.SETTLED
    assert await pay_due(ln.payouts) == [], "nothing left to pay"


async def test_hold_cancel_restores_customer_balance(ln: Ln, regtest: Regtest) -> None:
    before = (await regtest.customer.channel_balance()).local_msat
    inv = await ln.invoice(300_000, "hold", hold_seconds=600)
    pay = asyncio.create_task(regtest.customer_pays(inv.payment_request))
    await ln.wait_fact(inv.payment_hash, "accepted")
    await regtest.escrow.cancel_invoice(bytes.fromhex(inv.payment_hash))
    await ln.wait_fact(inv.payment_hash, "canceled")
    assert (await asyncio.wait_for(pay, 30)).status == PaymentStatus.FAILED
    await wait_until(lambda: _balance_is(regtest, before), 15, "customer balance restored")
    assert await ln.state(inv.payment_hash) == "canceled"


async def test_canceled_hold_invoices_are_deleted_from_lnd_after_the_retention(ln: Ln, regtest: Regtest) -> None:
    """DeleteCanceledInvoice: a hold invoice canceled longer ago than the retention is gone from LND,
    ours stays recorded as canceled; one canceled since, and an open one, stay in LND."""
    old, recent, still_open = [await ln.invoice(10_000, "hold", hold_seconds=600) for _ in range(3)]
    for inv in (old, recent):
        await regtest.escrow.cancel_invoice(bytes.fromhex(inv.payment_hash))
        await ln.wait_fact(inv.payment_hash, "canceled")
        await asyncio.sleep(0.01)
    async with ln.sessions() as s:
        canceled_at = {r.payment_hash: aware(r.updated_at) for r in (await s.scalars(select(LnInvoice))).all()}
    assert canceled_at[old.payment_hash] < canceled_at[recent.payment_hash]
    pruner = SettlementWatcher(regtest.escrow, ln.sessions, canceled_retention=3600)
    retention = timedelta(seconds=3600)

    async def in_lnd(inv: LnInvoice) -> str | None:
        try:
            return (await regtest.escrow.lookup_invoice(bytes.fromhex(inv.payment_hash))).state.name
        except errors.LndNotFound:
            return None

    # The moment just before `recent` has been canceled for the whole retention period:
    assert (
        await pruner.prune_canceled(now=canceled_at[recent.payment_hash] + retention - timedelta(microseconds=1)) == 1
    )
    assert [await in_lnd(i) for i in (old, recent, still_open)] == [None, "CANCELED", "OPEN"]
    assert await pruner.prune_canceled(now=canceled_at[recent.payment_hash] + retention) == 1
    assert [await in_lnd(i) for i in (old, recent, still_open)] == [None, None, "OPEN"]
    assert await pruner.prune_canceled(now=utcnow() + retention) == 0, "each is deleted once"
    assert [await ln.state(i.payment_hash) for i in (old, recent, still_open)] == ["canceled", "canceled", "open"]
    assert await SettlementWatcher(regtest.escrow, ln.sessions).prune_canceled() == 0, "retention 0: off"


async def _balance_is(regtest: Regtest, expected: int) -> bool:
    return (await regtest.customer.channel_balance()).local_msat == expected


async def test_custodial_invoice_settlement_is_a_fact_from_the_stream(ln: Ln, regtest: Regtest) -> None:
    inv = await ln.invoice(42_000, "custodial")
    assert inv.mode == "custodial" and inv.preimage is None
    assert (await regtest.customer_pays(inv.payment_request)).status == PaymentStatus.SUCCEEDED
    await ln.wait_fact(inv.payment_hash, "settled")
    assert await ln.facts(inv.payment_hash) == [("settled", "stream")]


async def test_auto_mode_chooses_custodial_for_long_jobs_and_hold_refuses(ln: Ln) -> None:
    # The mode is decided once, at intake (decide_mode); the invoice layer only refuses what
    # it cannot make: `auto` (undecided) and a hold invoice longer than the CLTV limit.
    long_job = 30 * 24 * 3600
    terms = EscrowTerms(
        fee_base_msat=0,
        fee_ppm=0,
        min_bid_msat=1_000,
        max_bid_msat=10**9,
        max_validators=3,
        max_shards=3,
        min_results_window_s=0,
        max_job_duration_s=long_job * 2,
        modes=frozenset({Mode.HOLD, Mode.CUSTODIAL}),
        network=Network.REGTEST,
        max_hold_seconds=long_job * 2,
    )
    assert decide_mode(Mode.AUTO, long_job, 3600, terms, ln.invoices.sizing) is Mode.CUSTODIAL
    with pytest.raises(ModeRefused):
        decide_mode(Mode.HOLD, long_job, 3600, terms, ln.invoices.sizing)
    inv = await ln.invoice(10_000, "custodial", hold_seconds=long_job)
    assert inv.mode == "custodial"
    with pytest.raises(InvoiceModeError):
        await ln.invoice(10_000, "hold", hold_seconds=long_job)
    with pytest.raises(InvoiceModeError):
        await ln.invoice(10_000, "auto", hold_seconds=3600)


async def test_settlement_while_watcher_down_is_found_at_restart(ln: Ln, regtest: Regtest) -> None:
    inv = await ln.invoice(33_000, "custodial")
    await ln.watcher.stop()
    assert (await regtest.customer_pays(inv.payment_request)).status == PaymentStatus.SUCCEEDED
    await asyncio.sleep(0.5)
    assert await ln.facts(inv.payment_hash) == []
    restarted = SettlementWatcher(regtest.escrow, ln.sessions, sweep_interval=60)
    await restarted.start()
    try:
        await ln.wait_fact(inv.payment_hash, "settled")
    finally:
        await restarted.stop()
    await ln.watcher.start()


async def test_hold_invoices_over_the_stream_budget_are_found_by_the_sweep(ln: Ln, regtest: Regtest) -> None:
    """With thousands of open escrows, per-invoice streams are capped; the rest are found by
    the (list-based) sweep: acceptance, then cancellation, each recorded once."""
    await ln.watcher.stop()
    capped = SettlementWatcher(regtest.escrow, ln.sessions, sweep_interval=60, max_streams=1, overflow_interval=0.5)
    await capped.start()
    try:
        first = await ln.invoice(11_000, "hold", hold_seconds=600)
        second = await ln.invoice(12_000, "hold", hold_seconds=600)
        capped.watch(first.payment_hash)
        capped.watch(second.payment_hash)
        assert capped.health.single_streams == 1 and capped.health.unstreamed == 1
        pay = asyncio.create_task(regtest.customer_pays(second.payment_request))
        await wait_until(lambda: _has(ln, second.payment_hash, "accepted"), 20, "accepted found by the sweep")
        assert await ln.facts(second.payment_hash) == [("accepted", "sweep")]
        await regtest.escrow.cancel_invoice(bytes.fromhex(second.payment_hash))
        await wait_until(lambda: _has(ln, second.payment_hash, "canceled"), 20, "cancellation found by the sweep")
        assert (await asyncio.wait_for(pay, 30)).status == PaymentStatus.FAILED
        assert await ln.facts(first.payment_hash) == [], "an open invoice nobody paid: no fact"
        await regtest.escrow.cancel_invoice(bytes.fromhex(first.payment_hash))
        await wait_until(lambda: _has(ln, first.payment_hash, "canceled"), 20, "the streamed one too")
        await wait_until(lambda: capped.health.unstreamed == 0, 10, "nothing left over the budget")
    finally:
        await capped.stop()
        await ln.watcher.start()


# ---- webhooks -------------------------------------------------------------------------


async def _webhook(ln: Ln, secret: bytes, body: bytes, *, ts: int | None = None, sig: str | None = None):
    ts = ts or int(time.time())
    headers = {webhook.TS_HEADER: str(ts), webhook.SIG_HEADER: sig or webhook.sign(secret, ts, body)}
    h, signature = webhook.verify(secret, headers, body, now=int(time.time()), window=300)
    async with ln.sessions.begin() as s:
        await webhook.consume(s, signature, now=int(time.time()), window=300)
    return await ln.watcher.confirm(h, "webhook")


async def test_forged_settled_webhook_for_unpaid_invoice_changes_nothing(ln: Ln, regtest: Regtest) -> None:
    secret = os.urandom(32)
    inv = await ln.invoice(21_000, "custodial")
    body = json.dumps({"payment_hash": inv.payment_hash, "state": "SETTLED", "amt_paid_msat": 21000}).encode()
    result = await _webhook(ln, secret, body)  # correctly signed, but the invoice is unpaid
    assert result.kind is None and result.lnd_state == InvoiceState.OPEN
    assert await ln.state(inv.payment_hash) == "open" and await ln.facts(inv.payment_hash) == []

    with pytest.raises(webhook.WebhookError) as exc:
        await _webhook(ln, secret, body, sig="sha256=" + "0" * 64)
    assert exc.value.reason == webhook.WebhookReason.BAD_SIGNATURE
    with pytest.raises(webhook.WebhookError) as exc:
        await _webhook(ln, secret, body, ts=int(time.time()) - 3600)
    assert exc.value.reason == webhook.WebhookReason.STALE

    # After a real payment, a valid hint makes the service look and record the fact.
    await ln.watcher.stop()  # so only the webhook can tell us
    assert (await regtest.customer_pays(inv.payment_request)).status == PaymentStatus.SUCCEEDED
    ts = int(time.time()) + 1
    result = await _webhook(ln, secret, body, ts=ts)
    assert result.kind == "settled"
    assert await ln.facts(inv.payment_hash) == [("settled", "webhook")]
    with pytest.raises(webhook.WebhookError) as exc:
        await _webhook(ln, secret, body, ts=ts)
    assert exc.value.reason == webhook.WebhookReason.REPLAYED
    await ln.watcher.start()


# ---- deadline guard -------------------------------------------------------------------------


@pytest.mark.parametrize("on_deadline", ["settle", "cancel"])
async def test_deadline_guard_acts_before_lnd_auto_cancel(ln: Ln, regtest: Regtest, on_deadline: str) -> None:
    sizing = HoldSizing(margin_blocks=16)
    inv = await ln.invoice(55_000, "hold", hold_seconds=0, on_deadline=on_deadline)
    assert inv.cltv_expiry == 16 + sizing.hold_expiry_delta + sizing.guard_margin_blocks  # 40 blocks
    pay = asyncio.create_task(regtest.customer_pays(inv.payment_request))
    await ln.wait_fact(inv.payment_hash, "accepted")
    async with ln.sessions() as s:
        expiry = await s.scalar(select(LnInvoice.htlc_expiry_height).where(LnInvoice.payment_hash == inv.payment_hash))
    tip = await regtest.block_height()
    threshold = sizing.hold_expiry_delta + sizing.guard_margin_blocks
    assert expiry - tip > threshold
    assert await guard_once(ln.watcher, hold_expiry_delta=12, margin_blocks=12) == []

    await regtest.mine(expiry - tip - threshold)  # exactly at our threshold, well before LND's (12)
    actions = await guard_once(ln.watcher, hold_expiry_delta=12, margin_blocks=12)
    assert [(a.payment_hash, a.action) for a in actions] == [(inv.payment_hash, on_deadline)]
    assert actions[0].remaining_blocks == threshold
    payment = await asyncio.wait_for(pay, 30)
    if on_deadline == "settle":
        assert actions[0].outcome == "settled" and payment.status == PaymentStatus.SUCCEEDED
    else:
        assert actions[0].outcome == "canceled" and payment.status == PaymentStatus.FAILED
    assert await ln.state(inv.payment_hash) == actions[0].outcome
    assert [k for k, _ in await ln.facts(inv.payment_hash)] == ["accepted", actions[0].outcome]


# ---- payout checks ---------------------------------------------------------------------------


def foreign_invoice(currency: str, amount_msat: int) -> str:
    tags = Tags()
    tags.add(TagChar.payment_hash, os.urandom(32).hex())
    tags.add(TagChar.payment_secret, os.urandom(32).hex())
    tags.add(TagChar.description, "elsewhere")
    tags.add(TagChar.expire_time, 3600)
    return bolt11.encode(
        Bolt11(currency=currency, date=int(time.time()), tags=tags, amount_msat=MilliSatoshi(amount_msat)),
        os.urandom(32).hex(),
    )


async def test_payout_refused_for_each_bad_invoice_and_nothing_is_sent(ln: Ln, regtest: Regtest) -> None:
    amount = 25_000
    paid_req, paid_hash = await regtest.payee_invoice(amount)
    async with ln.sessions.begin() as s:
        await create_payout(
            s,
            NewPayout(
                "first", None, PayoutKind.REWARD, "cd" * 32, amount, Destination(DestinationKind.BOLT11, paid_req)
            ),
        )
    assert (await pay_due(ln.payouts))[0].state == "succeeded"

    wrong_amount, wa_hash = await regtest.payee_invoice(amount + 1)
    expired = await regtest.payee.add_invoice(amount, expiry=1)
    soon = await regtest.payee.add_invoice(amount, expiry=30)
    own = await regtest.escrow.add_invoice(amount)
    await asyncio.sleep(1.5)
    cases = [
        (CheckReason.WRONG_AMOUNT, wrong_amount),
        (CheckReason.EXPIRED, expired.payment_request),
        (CheckReason.EXPIRES_TOO_SOON, soon.payment_request),
        (CheckReason.WRONG_NETWORK, foreign_invoice("bc", amount)),  # mainnet
        (CheckReason.WRONG_NETWORK, foreign_invoice("tb", amount)),  # testnet
        (CheckReason.SELF_PAYMENT, own.payment_request),
        (CheckReason.HASH_REUSED, paid_req),
        (CheckReason.UNDECODABLE, "lnbcrt1notaninvoice"),
    ]
    for i, (expected, payreq) in enumerate(cases):
        pid = f"bad-{i}"
        async with ln.sessions.begin() as s:
            await create_payout(
                s,
                NewPayout(pid, None, PayoutKind.REWARD, "cd" * 32, amount, Destination(DestinationKind.BOLT11, payreq)),
            )
        [outcome] = await pay_due(ln.payouts)
        p = await ln.payout(pid)
        assert p.state == "needs_invoice" and p.last_error.startswith(expected.value), (expected, p.last_error)
        async with ln.sessions() as s:
            assert await s.scalar(select(PayoutAttempt).where(PayoutAttempt.payout_id == pid)) is None
    # No payment was ever initiated for the refused invoices.
    for payreq in (wrong_amount, soon.payment_request):
        h = bolt11.decode(payreq).payment_hash
        with pytest.raises(errors.LndNotFound):
            async for _ in regtest.escrow.track_payment(bytes.fromhex(h)):
                pass
    assert (await regtest.payee.lookup_invoice(wa_hash)).state == InvoiceState.OPEN


async def test_check_invoice_refuses_amountless(ln: Ln, regtest: Regtest) -> None:
    # LND cannot create an amountless invoice through AddInvoice(value_msat=0) via our client (it refuses
    # non-positive amounts), so build one with the bolt11 library signed by a random key.
    tags = Tags()
    tags.add(TagChar.payment_hash, os.urandom(32).hex())
    tags.add(TagChar.payment_secret, os.urandom(32).hex())
    tags.add(TagChar.description, "any amount")
    pr = bolt11.encode(Bolt11(currency="bcrt", date=int(time.time()), tags=tags), os.urandom(32).hex())
    async with ln.sessions() as s:
        with pytest.raises(InvoiceCheckError) as exc:
            await check_invoice(
                regtest.escrow, s, pr, amount_msat=1000, policy=POLICY, our_pubkey=regtest.node("escrow")["pubkey"]
            )
    assert exc.value.reason == CheckReason.NO_AMOUNT


async def test_payee_submits_new_invoice_after_refusal(ln: Ln, regtest: Regtest) -> None:
    async with ln.sessions.begin() as s:
        await create_payout(s, NewPayout("later", "job", PayoutKind.REWARD, "ef" * 32, 7_000, Destination.none()))
    assert (await ln.payout("later")).state == "needs_invoice"
    wrong, _ = await regtest.payee_invoice(6_999)
    with pytest.raises(InvoiceRefused) as refused:
        async with ln.sessions.begin() as s:
            await accept_invoice(
                s,
                job_id="job",
                payee="ef" * 32,
                bolt11=wrong,
                amount_msat=None,
                source=InvoiceSource.REST,
                network=POLICY.network,
            )
    assert refused.value.code == CheckReason.WRONG_AMOUNT
    good, h = await regtest.payee_invoice(7_000)
    async with ln.sessions.begin() as s:
        await accept_invoice(
            s,
            job_id="job",
            payee="ef" * 32,
            bolt11=good,
            amount_msat=None,
            source=InvoiceSource.REST,
            network=POLICY.network,
        )
    [outcome] = await pay_due(ln.payouts)
    assert outcome.state == "succeeded" and (await ln.payout("later")).payment_hash == h.hex()


# ---- crash and restart -------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["after_write_ahead", "in_flight"])
async def test_worker_killed_mid_payout_pays_exactly_once_after_restart(
    ln: Ln, regtest: Regtest, where: str, database_url: str
) -> None:
    import subprocess
    import sys
    from pathlib import Path

    amount = 64_000
    payreq, h = await regtest.payee_invoice(amount)
    pid = f"crash-{where}"
    async with ln.sessions.begin() as s:
        await create_payout(
            s, NewPayout(pid, None, PayoutKind.REWARD, "aa" * 32, amount, Destination(DestinationKind.BOLT11, payreq))
        )
    stack_json = str(Path(regtest.desc["dir"]) / "stack.json")
    r = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "tests.support.payout_crash", database_url, stack_json, where],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 9, r.stderr
    p = await ln.payout(pid)
    assert p.state == "sending" and p.attempts == 1
    async with ln.sessions() as s:
        [attempt] = (await s.scalars(select(PayoutAttempt).where(PayoutAttempt.payout_id == pid))).all()
    assert attempt.state == "sending" and attempt.payment_hash == h.hex()

    await asyncio.sleep(1.2)  # the dead worker's lease runs out
    outcomes = await ln.payouts.reconcile()
    assert [(o.payout_id, o.state) for o in outcomes] == [(pid, "succeeded")]
    assert await ln.payouts.reconcile() == [] and await pay_due(ln.payouts) == []
    settled = await regtest.payee.lookup_invoice(h)
    assert settled.state == InvoiceState.SETTLED and settled.amt_paid_msat == amount, "paid once, not twice"
    tracked = [x async for x in regtest.escrow.track_payment(h)]
    assert tracked[-1].status == PaymentStatus.SUCCEEDED
    p = await ln.payout(pid)
    assert p.state == "succeeded" and p.attempts == 1 and p.payment_hash == h.hex()
