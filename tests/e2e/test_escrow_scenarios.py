"""End-to-end escrow scenarios over the real relay and regtest network (issue: escrow engine)."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest

from service.lightning.client import InvoiceState, PaymentStatus
from tests.conftest import Regtest, wait_until
from tests.e2e.market import Market, settle_payment, tag

pytestmark = [pytest.mark.lnd, pytest.mark.relay]

GOOD, BAD = b"a trained model", b"random weights"


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture
async def market(regtest: Regtest, relay_url: str, database_url: str):
    m = Market(regtest, relay_url, database_url)
    async with m.running():
        yield m


async def _assert_paid(regtest: Regtest, hashes: dict[str, bytes], amounts: dict[str, int]) -> None:
    for payee, h in hashes.items():
        inv = await regtest.payee.lookup_invoice(h)
        assert inv.state == InvoiceState.SETTLED and inv.amt_paid_msat == amounts[payee], (payee, inv)


async def test_a_best_of_three_winner_paid_others_not_ledger_closes(market: Market, regtest: Regtest) -> None:
    job_ev = await market.post_job(market.job_spec(policy="best"))
    pay = await market.fund(job_ev.id)
    p1, p2, p3 = market.providers
    r1 = await market.submit(job_ev, p1, 0, GOOD + b"1")
    r2 = await market.submit(job_ev, p2, 1, GOOD + b"2")
    r3 = await market.submit(job_ev, p3, 2, BAD)  # the dishonest provider
    await market.eval_request(job_ev.id)
    v1, v2 = market.validators
    await market.score(
        job_ev.id, v1, {r1.id: ("0.91", sha(GOOD + b"1")), r2.id: ("0.95", sha(GOOD + b"2")), r3.id: ("0.10", sha(BAD))}
    )
    await market.score(
        job_ev.id, v2, {r1.id: ("0.90", sha(GOOD + b"1")), r2.id: ("0.93", sha(GOOD + b"2")), r3.id: ("0.12", sha(BAD))}
    )
    await market.wait_state(job_ev.id, "releasing", "closed")
    assert (await settle_payment(pay)).status == PaymentStatus.SUCCEEDED  # hold invoice settled on release

    job = await market.job(job_ev.id)
    share = job.bid_msat - job.fee_msat - 2 * job.validator_fee_msat
    hashes = await market.claim_rewards(job_ev.id, [p2, v1, v2])
    await market.wait_state(job_ev.id, "closed")
    await _assert_paid(
        regtest,
        hashes,
        {
            p2.public_key_hex: share,
            v1.public_key_hex: job.validator_fee_msat,
            v2.public_key_hex: job.validator_fee_msat,
        },
    )
    payouts = {p.payee: p for p in await market.payouts(job_ev.id)}
    assert set(payouts) == {p2.public_key_hex, v1.public_key_hex, v2.public_key_hex}, "p1 and p3 are not paid"
    balances = await market.check_ledger(job_ev.id, closed=True)
    assert all(v == 0 for k, v in balances.items() if k.startswith("liability:")), balances
    complete = await market.wait_status(job_ev.id, "success", "validation complete")
    accepted = [t for t in complete["tags"] if t[0] == "accepted"]
    rejected = {t[1] for t in complete["tags"] if t[0] == "rejected"}
    assert r3.id in rejected and {t[1] for t in accepted} == {r1.id, r2.id}


async def test_b_split_between_two_accepted_results(market: Market, regtest: Regtest) -> None:
    job_ev = await market.post_job(
        market.job_spec(shards=2, policy="split", bid=3_000_001, validator_fee=0, validators=1, quorum=1)
    )
    pay = await market.fund(job_ev.id)
    p1, p2, _ = market.providers
    r1 = await market.submit(job_ev, p1, 0, GOOD + b"1")
    r2 = await market.submit(job_ev, p2, 1, GOOD + b"2")
    await market.score(
        job_ev.id, market.validators[0], {r1.id: ("0.9", sha(GOOD + b"1")), r2.id: ("0.85", sha(GOOD + b"2"))}
    )
    await market.wait_state(job_ev.id, "releasing", "closed")
    await settle_payment(pay)
    job = await market.job(job_ev.id)
    share = job.bid_msat - job.fee_msat
    each = share // 2 // 1000 * 1000  # whole satoshis: what every wallet can invoice
    remainder = share - 2 * each  # the split remainder and the sub-satoshi rounding
    hashes = await market.claim_rewards(job_ev.id, [p1, p2])
    await market.wait_state(job_ev.id, "closed")
    await _assert_paid(regtest, hashes, {p1.public_key_hex: each, p2.public_key_hex: each})
    await market.check_ledger(job_ev.id, closed=True)
    assert json.loads(job.decision)["remainder_msat"] == remainder > 0


async def test_c_no_result_by_the_deadline_refunds(market: Market, regtest: Regtest) -> None:
    before = (await regtest.customer.channel_balance()).local_msat
    job_ev = await market.post_job(market.job_spec(results_in=6, validation_in=20))
    pay = await market.fund(job_ev.id)
    job = await market.wait_state(job_ev.id, "refunded", timeout=90)
    assert job.refund_reason == "no_results"
    assert (await settle_payment(pay)).status == PaymentStatus.FAILED  # hold cancelled: nothing taken
    await wait_until(lambda: _balance(regtest, before), 15, "customer balance restored")
    await market.wait_status(job_ev.id, "error", "refunded")
    await market.check_ledger(job_ev.id, closed=True)


async def _balance(regtest: Regtest, expected: int) -> bool:
    return (await regtest.customer.channel_balance()).local_msat == expected


async def test_d_every_result_rejected_refunds(market: Market) -> None:
    job_ev = await market.post_job(market.job_spec(shards=2))
    pay = await market.fund(job_ev.id)
    p1, p2, _ = market.providers
    r1 = await market.submit(job_ev, p1, 0, BAD + b"1")
    r2 = await market.submit(job_ev, p2, 1, BAD + b"2")
    for v in market.validators:
        await market.score(job_ev.id, v, {r1.id: ("0.2", sha(BAD + b"1")), r2.id: ("0.3", sha(BAD + b"2"))})
    job = await market.wait_state(job_ev.id, "refunded", timeout=60)
    assert job.refund_reason == "no_accepted_result"
    assert (await settle_payment(pay)).status == PaymentStatus.FAILED
    assert await market.payouts(job_ev.id) == []


async def test_e_validators_miss_the_deadline_no_quorum_refund(market: Market) -> None:
    job_ev = await market.post_job(market.job_spec(shards=1, results_in=20, validation_in=28))
    pay = await market.fund(job_ev.id)
    r1 = await market.submit(job_ev, market.providers[0], 0, GOOD)
    await market.score(job_ev.id, market.validators[0], {r1.id: ("0.99", sha(GOOD))})  # only one of two
    job = await market.wait_state(job_ev.id, "refunded", timeout=90)
    assert job.refund_reason == "no_quorum"
    assert (await settle_payment(pay)).status == PaymentStatus.FAILED


async def test_f_cancellation_before_funding(market: Market, regtest: Regtest) -> None:
    job_ev = await market.post_job(market.job_spec())
    amount, bolt11 = await market.offer(job_ev.id)
    await market.delete(job_ev.id)
    await market.wait_state(job_ev.id, "cancelled")
    h = bytes.fromhex(await market.invoice_hash(job_ev.id))
    await wait_until(lambda: _invoice_state(regtest, h, InvoiceState.CANCELED), 20, "invoice cancelled in LND")
    p = await regtest.customer_pays(bolt11)
    assert p.status == PaymentStatus.FAILED, "a cancelled offer cannot be paid"


async def _invoice_state(regtest: Regtest, h: bytes, state: InvoiceState) -> bool:
    return (await regtest.escrow.lookup_invoice(h)).state == state


async def test_g_hold_moved_into_custody_by_the_guard_then_released(market: Market, regtest: Regtest) -> None:
    job_ev = await market.post_job(
        market.job_spec(
            shards=1, validators=1, quorum=1, validator_fee=0, results_in=120, validation_in=180, mode="hold"
        )
    )
    pay = await market.fund(job_ev.id)
    job = await market.job(job_ev.id)
    assert job.mode == "hold"
    from sqlalchemy import select

    from service.lightning.models import LnInvoice

    async with market.sessions() as s:
        expiry = await s.scalar(select(LnInvoice.htlc_expiry_height).where(LnInvoice.job_id == job.id))
    tip = await regtest.block_height()
    await regtest.mine(expiry - tip - 24)  # to the guard's threshold, well before LND's own
    await wait_until(lambda: _custody(market, job_ev.id), 30, "job moved into custody")
    assert (await settle_payment(pay)).status == PaymentStatus.SUCCEEDED  # the customer's money is now ours
    r1 = await market.submit(job_ev, market.providers[0], 0, GOOD)
    await market.score(job_ev.id, market.validators[0], {r1.id: ("0.95", sha(GOOD))})
    await market.wait_state(job_ev.id, "releasing", "closed")
    hashes = await market.claim_rewards(job_ev.id, [market.providers[0]])
    await market.wait_state(job_ev.id, "closed")
    job = await market.job(job_ev.id)
    await _assert_paid(regtest, hashes, {market.providers[0].public_key_hex: job.bid_msat - job.fee_msat})
    await market.check_ledger(job_ev.id, closed=True)


async def _custody(market: Market, job_id: str) -> bool:
    return (await market.job(job_id)).custody


async def test_h_foreign_results_and_scores_are_ignored_with_reasons(market: Market) -> None:
    allowed = market.providers[0]
    job_ev = await market.post_job(
        market.job_spec(shards=1, validators=1, quorum=1, validator_fee=0, providers=(allowed.public_key_hex,))
    )
    await market.fund(job_ev.id)
    intruder = market.providers[1]
    await market.submit(job_ev, intruder, 0, GOOD + b"x")  # key not allowed by the job
    r1 = await market.submit(job_ev, allowed, 0, GOOD)
    await market.eval_request(job_ev.id)
    stranger = market.providers[2]
    await market.score(job_ev.id, stranger, {r1.id: ("0.99", sha(GOOD))})  # not a validator
    await market.score(job_ev.id, market.validators[0], {r1.id: ("0.99", sha(b"another model"))})  # wrong hash
    await asyncio.sleep(2)
    timeline = await market.timeline(job_ev.id)
    ignored = [d["why"] if isinstance(d, dict) and "why" in d else d for k, d in timeline if k == "ignored"]
    text = " | ".join(str(x) for x in ignored)
    assert "provider_not_allowed" in text
    assert "not a designated validator" in text
    assert "another model hash" in text
    assert (await market.job(job_ev.id)).state == "validating", "none of them counted"


async def test_i_custodial_refund_is_paid_back_to_the_customer(market: Market, regtest: Regtest) -> None:
    """Custodial money comes back as a payment: the customer claims it with an invoice of its own node."""
    job_ev = await market.post_job(
        market.job_spec(shards=1, validators=1, quorum=1, validator_fee=0, mode="custodial", bid=900_000)
    )
    pay = await market.fund(job_ev.id)
    assert (await settle_payment(pay)).status == PaymentStatus.SUCCEEDED  # custodial: settled at once
    r1 = await market.submit(job_ev, market.providers[0], 0, BAD)
    await market.score(job_ev.id, market.validators[0], {r1.id: ("0.1", sha(BAD))})
    await market.wait_state(job_ev.id, "refunding")
    claim = await market.wait_status(job_ev.id, "success", "reward claimable")
    amount = int(tag(claim, "amount")[1])
    # The escrow earned nothing on a refunded job: the refund's route is paid from it. The customer
    # gets 900_000 less the routing reserve (0.5 %, rounded up) in whole satoshis: 895 sat.
    reserve = -(-900_000 * market.settings.payout_fee_ppm // 1_000_000)
    assert amount == (900_000 - reserve) // 1000 * 1000 == 895_000
    assert tag(claim, "p")[1] == market.customer.public_key_hex
    inv = await regtest.customer.add_invoice(amount, memo="my refund")
    from service.nostr.nip01 import sign_event
    from service.nostr.protocol import build_payee_invoice
    from tests.e2e.market import publish

    await publish(
        market.relay,
        sign_event(
            market.customer,
            *build_payee_invoice(job_id=job_ev.id, escrow=market.E, amount_msat=amount, bolt11=inv.payment_request),
        ),
    )
    job = await market.wait_state(job_ev.id, "refunded", timeout=60)
    assert job.refund_reason == "no_accepted_result"
    paid = await regtest.customer.lookup_invoice(inv.payment_hash)
    assert paid.state == InvoiceState.SETTLED and paid.amt_paid_msat == amount
    balances = await market.check_ledger(job_ev.id, closed=True)
    assert all(v == 0 for k, v in balances.items() if k.startswith("liability:"))
