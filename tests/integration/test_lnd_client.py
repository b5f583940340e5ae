"""The LND client against real regtest LND nodes (escrow, customer, payee)."""

from __future__ import annotations

import asyncio

import pytest

from service import cursors
from service.db import create_engine, session_factory
from service.lightning import errors
from service.lightning.client import (
    FailureReason,
    Invoice,
    InvoiceState,
    LndClient,
    PaymentStatus,
)
from tests.conftest import Regtest, new_preimage, wait_until

pytestmark = pytest.mark.lnd


async def _next_state(stream, want: InvoiceState, timeout: float = 30) -> Invoice:
    async def run() -> Invoice:
        async for inv in stream:
            if inv.state == want:
                return inv
        raise AssertionError(f"stream ended before {want}")

    return await asyncio.wait_for(run(), timeout)


async def test_get_info_reports_synced_regtest_node(regtest: Regtest) -> None:
    info = await regtest.escrow.get_info()
    assert info.pubkey == regtest.node("escrow")["pubkey"]
    assert info.network == "regtest"
    assert info.synced_to_chain
    assert info.num_active_channels == 2


async def test_regular_invoice_settlement_seen_on_stream_and_by_lookup(regtest: Regtest) -> None:
    start = await regtest.escrow.add_invoice(1, memo="index probe")  # the stream starts after this one
    stream = regtest.escrow.subscribe_invoices(add_index=start.add_index)
    added = await regtest.escrow.add_invoice(21_000, memo="job funding", expiry=600)
    assert added.payment_request.startswith("lnbcrt")

    async def watch() -> Invoice:
        async for inv in stream:
            if inv.payment_hash == added.payment_hash and inv.state == InvoiceState.SETTLED:
                return inv
        raise AssertionError("stream ended")

    watcher = asyncio.create_task(asyncio.wait_for(watch(), 30))
    await asyncio.sleep(0.2)  # let the subscription reach LND before paying

    pay = await regtest.customer_pays(added.payment_request)
    assert pay.status == PaymentStatus.SUCCEEDED

    seen = await watcher
    assert seen.amt_paid_msat == 21_000 and seen.settle_index > 0
    looked = await regtest.escrow.lookup_invoice(added.payment_hash)
    assert looked.state == InvoiceState.SETTLED
    assert looked.amt_paid_msat >= looked.value_msat == 21_000
    assert looked.memo == "job funding"


async def test_hold_invoice_accepted_then_settled_payer_gets_preimage(regtest: Regtest) -> None:
    pre, h = new_preimage()
    hold = await regtest.escrow.add_hold_invoice(h, 50_000, memo="hold escrow", expiry=600, cltv_expiry=144)
    stream = regtest.escrow.subscribe_single_invoice(h)
    first = await _next_state(stream, InvoiceState.OPEN)
    assert first.value_msat == 50_000

    pay_task = asyncio.create_task(regtest.customer_pays(hold.payment_request))
    accepted = await _next_state(stream, InvoiceState.ACCEPTED)
    assert accepted.htlcs and accepted.htlcs[0].expiry_height > await regtest.block_height()
    assert not pay_task.done(), "payer must stay in flight while the HTLC is held"
    assert (await regtest.escrow.lookup_invoice(h)).state == InvoiceState.ACCEPTED

    await regtest.escrow.settle_invoice(pre)
    settled = await _next_state(stream, InvoiceState.SETTLED)
    assert settled.amt_paid_msat == 50_000
    payment = await asyncio.wait_for(pay_task, 30)
    assert payment.status == PaymentStatus.SUCCEEDED
    assert payment.preimage == pre


async def test_hold_invoice_cancelled_fails_payer_and_restores_balance(regtest: Regtest) -> None:
    before = await regtest.customer.channel_balance()
    _, h = new_preimage()
    hold = await regtest.escrow.add_hold_invoice(h, 400_000, memo="to cancel", expiry=600, cltv_expiry=144)
    stream = regtest.escrow.subscribe_single_invoice(h)
    pay_task = asyncio.create_task(regtest.customer_pays(hold.payment_request))
    await _next_state(stream, InvoiceState.ACCEPTED)
    during = await regtest.customer.channel_balance()
    assert during.local_msat <= before.local_msat - 400_000, "the HTLC locks the customer's funds"

    await regtest.escrow.cancel_invoice(h)
    await _next_state(stream, InvoiceState.CANCELED)
    payment = await asyncio.wait_for(pay_task, 30)
    assert payment.status == PaymentStatus.FAILED
    assert payment.failure_reason == FailureReason.INCORRECT_PAYMENT_DETAILS
    after = await wait_until(
        lambda: _balance_restored(regtest.customer, before.local_msat), 15, "customer balance restored"
    )
    assert after == before.local_msat


async def _balance_restored(client: LndClient, expected: int) -> int | None:
    bal = (await client.channel_balance()).local_msat
    return bal if bal == expected else None


async def test_escrow_pays_payee_invoice_and_reports_fee(regtest: Regtest) -> None:
    payreq, h = await regtest.payee_invoice(30_000, memo="provider reward")
    payment = await regtest.escrow.pay(payreq, fee_limit_msat=10_000, timeout_seconds=30)
    assert payment.status == PaymentStatus.SUCCEEDED
    assert payment.payment_hash == h
    assert payment.value_msat == 30_000
    assert payment.fee_msat == 0  # direct channel: no routing fee
    assert (await regtest.payee.lookup_invoice(h)).state == InvoiceState.SETTLED


async def test_two_hop_payment_reports_routing_fee(regtest: Regtest) -> None:
    """customer -> escrow -> payee: the escrow node charges its forwarding fee."""
    amount = 2_000_000
    payreq, h = await regtest.payee_invoice(amount)
    payment = await wait_until(lambda: _try_pay(regtest, payreq), 60, "a route to the payee via escrow", interval=0.5)
    # lnd's default forwarding policy: base 1000 msat + 1 ppm.
    assert payment.fee_msat == 1000 + amount * 1 // 1_000_000
    tracked = [p async for p in regtest.customer.track_payment(h)]
    assert tracked[-1].status == PaymentStatus.SUCCEEDED and tracked[-1].fee_msat == payment.fee_msat


async def _try_pay(regtest: Regtest, payreq: str):
    p = await regtest.customer_pays(payreq, fee_limit_msat=50_000)
    if p.status == PaymentStatus.FAILED and p.failure_reason == FailureReason.NO_ROUTE:
        return None  # the channel graph has not reached the customer yet
    assert p.status == PaymentStatus.SUCCEEDED, p
    return p


async def test_paying_an_already_paid_invoice_is_refused_typed(regtest: Regtest) -> None:
    payreq, _ = await regtest.payee_invoice(5_000)
    first = await regtest.escrow.pay(payreq, fee_limit_msat=1_000)
    assert first.status == PaymentStatus.SUCCEEDED
    with pytest.raises(errors.PaymentAlreadyPaid):
        await regtest.escrow.pay(payreq, fee_limit_msat=1_000)


async def test_settle_index_resume_replays_missed_settlements(regtest: Regtest, database_url: str) -> None:
    """A subscriber that stored its settle index sees what settled while it was away."""
    engine = create_engine(database_url)
    sessions = session_factory(engine)
    try:
        # A first subscriber records the newest settle index it has seen.
        marker = await regtest.escrow.add_invoice(1_000, memo="before")
        await regtest.customer_pays(marker.payment_request)
        stored = (await regtest.escrow.lookup_invoice(marker.payment_hash)).settle_index
        async with sessions.begin() as s:
            await cursors.advance(s, "lnd:settle_index", stored)

        # While nobody subscribes, two invoices settle.
        missed = [await regtest.escrow.add_invoice(2_000 + i, memo=f"missed {i}") for i in range(2)]
        for inv in missed:
            assert (await regtest.customer_pays(inv.payment_request)).status == PaymentStatus.SUCCEEDED

        # A restarted subscriber resumes from the stored index.
        async with sessions() as s:
            resume = await cursors.get(s, "lnd:settle_index")
        assert resume == stored
        seen: list[Invoice] = []

        async def collect() -> None:
            async for inv in regtest.escrow.subscribe_invoices(settle_index=resume):
                if inv.state == InvoiceState.SETTLED:
                    seen.append(inv)
                    if len(seen) == 2:
                        return

        await asyncio.wait_for(collect(), 30)
        assert [i.payment_hash for i in seen] == [i.payment_hash for i in missed]
        assert all(i.settle_index > stored for i in seen)
        async with sessions.begin() as s:
            assert await cursors.advance(s, "lnd:settle_index", seen[-1].settle_index)
    finally:
        await engine.dispose()


async def test_errors_are_typed(regtest: Regtest) -> None:
    _, unknown = new_preimage()
    with pytest.raises(errors.LndNotFound):
        await regtest.escrow.lookup_invoice(unknown)

    pre, h = new_preimage()
    await regtest.escrow.add_hold_invoice(h, 1_000, expiry=600)
    with pytest.raises(errors.InvoiceAlreadyExists):
        await regtest.escrow.add_hold_invoice(h, 1_000, expiry=600)
    await regtest.escrow.cancel_invoice(h)
    with pytest.raises(errors.InvoiceStateError):
        await regtest.escrow.settle_invoice(pre)

    with pytest.raises(errors.LndNotFound):
        async for _ in regtest.escrow.track_payment(unknown):
            pass

    own = await regtest.escrow.add_invoice(1_000)
    with pytest.raises(errors.SelfPayment):
        await regtest.escrow.pay(own.payment_request, fee_limit_msat=1_000)

    expired = await regtest.payee.add_invoice(1_000, expiry=1)
    await asyncio.sleep(2.1)
    with pytest.raises(errors.InvoiceExpired):
        await regtest.escrow.pay(expired.payment_request, fee_limit_msat=1_000)


async def test_decode_pay_req_and_channel_balance(regtest: Regtest) -> None:
    payreq, h = await regtest.payee_invoice(12_345, memo="decode me", expiry=900)
    d = await regtest.escrow.decode_pay_req(payreq)
    assert d.payment_hash == h and d.num_msat == 12_345 and d.expiry == 900
    assert d.destination == regtest.node("payee")["pubkey"]
    assert d.description == "decode me"
    bal = await regtest.escrow.channel_balance()
    assert bal.local_msat > 0 and bal.remote_msat > 0


async def test_wrong_macaroon_and_unreachable_node_are_typed(regtest: Regtest, tmp_path) -> None:
    node = regtest.node("escrow")
    other_mac = open(regtest.node("customer")["macaroon"], "rb").read()
    cert = open(node["tls_cert"], "rb").read()
    async with LndClient(node["rpc"], cert, other_mac, timeout=5) as bad:
        with pytest.raises(errors.LndAuthError) as exc:
            await bad.get_info()
        assert other_mac.hex() not in str(exc.value)
    async with LndClient("127.0.0.1:1", cert, other_mac, timeout=2) as gone:
        with pytest.raises(errors.LndUnavailable):
            await gone.get_info()
