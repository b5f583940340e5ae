"""Routing fees of payouts on real LND: the limit is a fraction of the payout, never a floor.

The attack (issue item 4): a payee puts its own hop between the escrow and the invoice (the
devstack's ``payee2`` behind ``payee`` over a private channel, reached through the invoice's
route hint) and sets a high fee on it. With a 10-sat floor on the fee limit, a 1-sat payout cost
the escrow 9.5 sat in fees. Now the limit is ``amount × ppm`` (capped, and no more than the
payout's own limit); the route is refused, nothing is paid, and the payout goes back to the
payee with the reason ``route_fee_exceeds_limit``: by the fee quote (``EstimateRouteFee``'s probe)
before anything is sent, or, without a quote, by LND's NO_ROUTE and the route query after it.
"""

from __future__ import annotations

import pytest
from sqlalchemy import select

from service.config import Settings
from service.db import create_engine, session_factory
from service.lightning import errors
from service.lightning.client import FailureReason, InvoiceState, PaymentStatus
from service.payouts import Destination, DestinationKind, NewPayout, PayoutKind, PayoutPolicy
from service.payouts.models import Payout, PayoutAttempt
from service.payouts.store import create as create_payout
from service.payouts.worker import Payouts
from tests.conftest import Regtest
from tests.support.payouts import pay_due

pytestmark = pytest.mark.lnd

HIGH_BASE_FEE_MSAT = 9_500


@pytest.fixture
async def sessions(database_url: str):
    engine = create_engine(database_url)
    yield session_factory(engine)
    await engine.dispose()


def _policy(**kw) -> PayoutPolicy:
    """The service's defaults (Settings), with a shorter invoice-expiry rule for test invoices."""
    return PayoutPolicy.from_settings(Settings(_env_file=None, payout_invoice_min_expiry_seconds=60, **kw))


@pytest.fixture(scope="module")
async def expensive_payee_hop(regtest: Regtest):
    await regtest.set_payee_hop_fee(HIGH_BASE_FEE_MSAT, 0)
    yield
    await regtest.set_payee_hop_fee(1_000, 1)  # LND's defaults, as `up` left them


async def _track_all(regtest: Regtest, h: bytes) -> list:
    return [p async for p in regtest.escrow.track_payment(h)]


async def test_fee_limit_zero_means_zero_fee_routes_only(regtest: Regtest) -> None:
    """LND's routerrpc: fee_limit_msat 0 considers zero-fee routes only (not "no limit")."""
    direct = await regtest.payee.add_invoice(2_000, memo="direct, no fee")
    p = await regtest.escrow.pay(direct.payment_request, fee_limit_msat=0, timeout_seconds=20)
    assert p.status == PaymentStatus.SUCCEEDED and p.fee_msat == 0, "a direct channel costs nothing"

    behind = await regtest.payee2.add_invoice(2_000, memo="one paid hop", private=True)
    p = await regtest.escrow.pay(behind.payment_request, fee_limit_msat=0, timeout_seconds=20)
    assert p.status == PaymentStatus.FAILED and p.failure_reason == FailureReason.NO_ROUTE
    assert (await regtest.payee2.lookup_invoice(behind.payment_hash)).state == InvoiceState.OPEN
    fee = await regtest.escrow.route_fee(behind.payment_request)
    assert fee is not None and fee > 0, "the route exists; only its fee was refused"
    p = await regtest.escrow.pay(behind.payment_request, fee_limit_msat=fee, timeout_seconds=20)
    assert p.status == PaymentStatus.SUCCEEDED and p.fee_msat == fee
    with pytest.raises(ValueError):
        async for _ in regtest.escrow.send_payment(behind.payment_request, fee_limit_msat=-1):
            pass


async def test_tiny_payout_through_an_expensive_payee_hop_is_refused_and_nothing_paid(
    regtest: Regtest, sessions, expensive_payee_hop
) -> None:
    """Without the fee quote (payout_fee_quote_seconds=0): SendPaymentV2's fee limit refuses it."""
    amount = 1_000  # a 1-sat validator fee: its limit at the default 5000 ppm is 5 msat
    inv = await regtest.payee2.add_invoice(amount, memo="validator fee", private=True)
    before = (await regtest.escrow.channel_balance()).local_msat
    async with sessions.begin() as s:
        await create_payout(
            s,
            NewPayout(
                "job:validator:v",
                "b2" * 32,
                PayoutKind.VALIDATOR_FEE,
                "a1" * 32,
                amount,
                Destination(DestinationKind.BOLT11, inv.payment_request),
            ),
        )
    policy = _policy(payout_fee_quote_seconds=0)
    payouts = Payouts(regtest.escrow, sessions, policy, our_pubkey=regtest.node("escrow")["pubkey"])
    [outcome] = await pay_due(payouts)
    async with sessions() as s:
        p = await s.get(Payout, "job:validator:v")
        [attempt] = (await s.scalars(select(PayoutAttempt))).all()
    assert (outcome.state, p.state, p.fee_msat) == ("needs_invoice", "needs_invoice", None), p.last_error
    assert p.last_error.startswith("route_fee_exceeds_limit: "), p.last_error
    assert f"{HIGH_BASE_FEE_MSAT} msat" in p.last_error and "allows 5 msat" in p.last_error
    assert (attempt.state, attempt.fee_limit_msat, attempt.failure) == ("failed", 5, "NO_ROUTE")
    assert (await regtest.payee2.lookup_invoice(inv.payment_hash)).state == InvoiceState.OPEN
    tracked = await _track_all(regtest, inv.payment_hash)
    assert tracked[-1].status == PaymentStatus.FAILED and tracked[-1].fee_msat == 0
    assert (await regtest.escrow.channel_balance()).local_msat == before, "the escrow paid nothing, no fee"


async def test_a_payouts_own_fee_limit_caps_the_policy(regtest: Regtest, sessions, expensive_payee_hop) -> None:
    """The engine's limit for a payout (``fee_limit_msat``) wins when lower than the policy's."""
    amount = 4_000_000  # policy limit 20,000 msat: the 9,500 msat hop fits it
    policy = _policy()
    first = await regtest.payee2.add_invoice(amount, memo="reward, own limit", private=True)
    second = await regtest.payee2.add_invoice(amount, memo="reward, policy limit", private=True)
    async with sessions.begin() as s:
        await create_payout(
            s,
            NewPayout(
                "job:reward:capped",
                None,
                PayoutKind.REWARD,
                "c3" * 32,
                amount,
                Destination(DestinationKind.BOLT11, first.payment_request),
                fee_limit_msat=9_000,
            ),
        )
        await create_payout(
            s,
            NewPayout(
                "job:reward:policy",
                None,
                PayoutKind.REWARD,
                "d4" * 32,
                amount,
                Destination(DestinationKind.BOLT11, second.payment_request),
            ),
        )
    payouts = Payouts(regtest.escrow, sessions, policy, our_pubkey=regtest.node("escrow")["pubkey"])
    outcomes = {o.payout_id: o.state for o in await pay_due(payouts)}
    assert outcomes == {"job:reward:capped": "needs_invoice", "job:reward:policy": "succeeded"}
    async with sessions() as s:
        capped, paid = await s.get(Payout, "job:reward:capped"), await s.get(Payout, "job:reward:policy")
    assert capped.last_error.startswith("route_fee_exceeds_limit: ") and "allows 9000 msat" in capped.last_error
    assert paid.fee_msat == HIGH_BASE_FEE_MSAT <= policy.fee_limit(amount)
    assert (await regtest.payee2.lookup_invoice(first.payment_hash)).state == InvoiceState.OPEN
    assert (await regtest.payee2.lookup_invoice(second.payment_hash)).state == InvoiceState.SETTLED


async def _validator_fee_payout(sessions, payout_id: str, amount: int, payment_request: str) -> None:
    async with sessions.begin() as s:
        await create_payout(
            s,
            NewPayout(
                payout_id,
                "b2" * 32,
                PayoutKind.VALIDATOR_FEE,
                "a1" * 32,
                amount,
                Destination(DestinationKind.BOLT11, payment_request),
            ),
        )


async def test_the_fee_quote_refuses_an_expensive_route_before_anything_is_sent(
    regtest: Regtest, sessions, expensive_payee_hop
) -> None:
    """EstimateRouteFee's probe (a random hash: nothing can be paid) finds the payee's 9.5-sat hop;
    the payout goes back to the payee with the same reason as LND's refusal, and LND never saw the
    invoice's hash."""
    amount = 1_000
    inv = await regtest.payee2.add_invoice(amount, memo="validator fee, quoted", private=True)
    quote = await regtest.escrow.estimate_route_fee(inv.payment_request, timeout_seconds=10)
    assert (quote.failure_reason, quote.fee_msat) == (FailureReason.NONE, HIGH_BASE_FEE_MSAT)
    before = (await regtest.escrow.channel_balance()).local_msat
    await _validator_fee_payout(sessions, "job:validator:quoted", amount, inv.payment_request)
    payouts = Payouts(regtest.escrow, sessions, _policy(), our_pubkey=regtest.node("escrow")["pubkey"])
    [outcome] = await pay_due(payouts)
    async with sessions() as s:
        p = await s.get(Payout, "job:validator:quoted")
        attempt = await s.get(PayoutAttempt, inv.payment_hash.hex())
    assert (outcome.state, p.state, p.fee_msat) == ("needs_invoice", "needs_invoice", None), p.last_error
    assert p.last_error.startswith("route_fee_exceeds_limit: "), p.last_error
    assert f"{HIGH_BASE_FEE_MSAT} msat" in p.last_error and "allows 5 msat" in p.last_error
    assert (attempt.state, attempt.fee_limit_msat) == ("not_initiated", 5)
    with pytest.raises(errors.LndNotFound):
        await _track_all(regtest, inv.payment_hash)  # never sent: the payee may give this invoice again
    assert (await regtest.payee2.lookup_invoice(inv.payment_hash)).state == InvoiceState.OPEN
    assert (await regtest.escrow.channel_balance()).local_msat == before, "the escrow paid nothing, no fee"


async def test_a_quote_that_finds_no_route_leaves_the_decision_to_the_send(regtest: Regtest, sessions) -> None:
    """payee2 is reachable only through its route hint; an invoice without one has no route. The
    probe says NO_ROUTE, which decides nothing: the payment is sent with the fee limit, LND fails
    it NO_ROUTE, the route query finds none at all, and the payout is retried (``no_route``)."""
    amount = 2_000
    inv = await regtest.payee2.add_invoice(amount, memo="no route hint")
    quote = await regtest.escrow.estimate_route_fee(inv.payment_request, timeout_seconds=10)
    assert quote.failure_reason == FailureReason.NO_ROUTE
    await _validator_fee_payout(sessions, "job:validator:unroutable", amount, inv.payment_request)
    payouts = Payouts(regtest.escrow, sessions, _policy(), our_pubkey=regtest.node("escrow")["pubkey"])
    [outcome] = await pay_due(payouts)
    async with sessions() as s:
        p = await s.get(Payout, "job:validator:unroutable")
        attempt = await s.get(PayoutAttempt, inv.payment_hash.hex())
    assert (outcome.state, p.state) == ("pending", "pending"), p.last_error
    assert p.last_error.startswith("no_route: "), p.last_error
    assert (attempt.state, attempt.failure) == ("failed", "NO_ROUTE"), "SendPaymentV2 ran and LND failed it"
    tracked = await _track_all(regtest, inv.payment_hash)
    # LND's own record: failed with nothing sent. Sends are cancelable, and when our stream ends
    # right as LND fails the payment NO_ROUTE, LND v0.20.2 may record it CANCELED instead (seen
    # once in CI); either way no HTLC left, which is what the payee's money depends on.
    final = tracked[-1]
    assert final.status == PaymentStatus.FAILED and final.htlc_attempts == 0, final
    assert final.failure_reason in (FailureReason.NO_ROUTE, FailureReason.CANCELED), final
