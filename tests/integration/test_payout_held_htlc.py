"""A payee that holds the escrow's HTLC delays nobody else's payout (issue item 1), on real LND.

The attack: a payee gives a HOLD invoice of its own node for its reward and never settles it.
The escrow's payment stays IN_FLIGHT for as long as the payee likes (up to the HTLC's CLTV
expiry). Before, the payout reconciler waited for that payment's final state, timed out, let
the TimeoutError out, started again, and no other payout was claimed meanwhile: another job's
honest payout stayed `pending` until the attacker settled.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from service.config import Settings
from service.db import create_engine, session_factory, utcnow
from service.lightning import errors
from service.lightning.client import InvoiceState, PaymentStatus
from service.node import LightningService
from service.payouts import Destination, DestinationKind, NewPayout, PayoutKind, PayoutPolicy
from service.payouts.models import Payout, PayoutAttempt
from service.payouts.store import create as create_payout
from service.payouts.worker import Payouts
from tests.conftest import Regtest, new_preimage, wait_until

pytestmark = pytest.mark.lnd

TIMEOUT = 5  # payout timeout (s): LND's SendPaymentV2 timeout, and how long a send is followed
SLACK = 4  # claim, invoice checks, LND's own work, on 2 busy cores
AMOUNT = 50_000


@pytest.fixture
async def sessions(database_url: str):
    engine = create_engine(database_url)
    yield session_factory(engine)
    await engine.dispose()


async def _payout(sessions, pid: str, payee: str, payreq: str) -> None:
    async with sessions.begin() as s:
        await create_payout(
            s, NewPayout(pid, "ee" * 32, PayoutKind.REWARD, payee, AMOUNT, Destination(DestinationKind.BOLT11, payreq))
        )


async def _state(sessions, pid: str) -> Payout:
    async with sessions() as s:
        return await s.get(Payout, pid)


async def _held(regtest: Regtest, h: bytes) -> bool:
    return (await regtest.payee.lookup_invoice(h)).state == InvoiceState.ACCEPTED


async def test_a_held_payout_delays_no_other_payee(regtest: Regtest, sessions) -> None:
    settings = Settings(
        _env_file=None,
        payout_timeout_seconds=TIMEOUT,
        payout_reconcile_seconds=1.0,
        payout_reconcile_budget_seconds=2.0,
        payout_retry_seconds=1.0,
        payout_invoice_min_expiry_seconds=60,
    )
    svc = LightningService(regtest.escrow, sessions, settings)
    await svc.start_workers()
    try:
        # X: the attacker's hold invoice, never settled by its node
        _, hx = new_preimage()
        held = await regtest.payee.add_hold_invoice(hx, AMOUNT, memo="held reward", cltv_expiry=80)
        await _payout(sessions, "job-x:reward:x", "a1" * 32, held.payment_request)
        svc.wake_payouts()
        await wait_until(lambda: _held(regtest, hx), 30, "the escrow's HTLC held by the payee")

        # Y1, another payee's honest invoice, right after: paid within one payout timeout
        y1_req, y1 = await regtest.payee_invoice(AMOUNT, memo="honest reward 1")
        await _payout(sessions, "job-y:reward:y1", "b2" * 32, y1_req)
        svc.wake_payouts()
        await wait_until(
            lambda: _is(sessions, "job-y:reward:y1", "succeeded"), TIMEOUT + SLACK, "Y1 paid within one payout timeout"
        )
        assert await _held(regtest, hx), "X's HTLC is still held meanwhile"

        # X is left `unknown` to the reconciler once its send was followed for one timeout
        await wait_until(
            lambda: _is(sessions, "job-x:reward:x", "unknown"),
            TIMEOUT + 30 + SLACK,
            "X unknown after its payout timeout",
        )
        unknown_at, passes = utcnow(), svc.payout_reconciler.passes

        # Y2, created while X is unknown and held: the reconciler must not hold up the claims
        y2_req, y2 = await regtest.payee_invoice(AMOUNT, memo="honest reward 2")
        await _payout(sessions, "job-y2:reward:y2", "c3" * 32, y2_req)
        svc.wake_payouts()
        await wait_until(
            lambda: _is(sessions, "job-y2:reward:y2", "succeeded"),
            TIMEOUT + SLACK,
            "Y2 paid within one payout timeout while X is unknown",
        )
        assert await _held(regtest, hx)
        # two more passes: the second began after X went unknown (the first may have begun before)
        await wait_until(lambda: svc.payout_reconciler.passes >= passes + 2, 10, "a pass begun after X went unknown")
        x = await _state(sessions, "job-x:reward:x")
        assert x.state == "unknown" and x.next_attempt_at.replace(tzinfo=unknown_at.tzinfo) > unknown_at, (
            "the reconciler looked at X (its next look is scheduled) and left it unknown"
        )

        # The payee gives up holding: X's payment fails, and X goes back to the payee
        await regtest.payee.cancel_invoice(hx)
        await wait_until(lambda: _is(sessions, "job-x:reward:x", "needs_invoice"), 30, "X handed back")
    finally:
        await svc.stop()
    x = await _state(sessions, "job-x:reward:x")
    assert x.last_error.startswith("payee_rejected_payment: "), x.last_error
    async with sessions() as s:
        attempts = {a.payout_id: a.state for a in (await s.scalars(select(PayoutAttempt))).all()}
    assert attempts == {"job-x:reward:x": "failed", "job-y:reward:y1": "succeeded", "job-y2:reward:y2": "succeeded"}
    for h in (y1, y2):
        inv = await regtest.payee.lookup_invoice(h)
        assert inv.state == InvoiceState.SETTLED and inv.amt_paid_msat == AMOUNT, "paid once"
    assert (await regtest.payee.lookup_invoice(hx)).state == InvoiceState.CANCELED
    assert [p.status async for p in regtest.escrow.track_payment(hx)][-1] == PaymentStatus.FAILED


async def _is(sessions, pid: str, state: str) -> bool:
    return (await _state(sessions, pid)).state == state


class TrackFaults:
    """The real escrow client, except TrackPaymentV2 for two hashes (fault injection: one hangs
    past any budget, one fails with LND's deadline error; real LND answers either at once)."""

    def __init__(self, real, hang: str, fail: str) -> None:
        self.real, self.hang, self.fail = real, hang, fail

    def __getattr__(self, name: str):
        return getattr(self.real, name)

    async def track_payment(self, payment_hash: bytes, **kw):
        if payment_hash.hex() == self.hang:
            await asyncio.Event().wait()
        if payment_hash.hex() == self.fail:
            raise errors.LndTimeout("TrackPaymentV2", "context deadline exceeded")
        async for p in self.real.track_payment(payment_hash, **kw):
            yield p


async def test_one_payouts_track_failing_or_held_does_not_stop_the_pass(regtest: Regtest, sessions) -> None:
    """Four `unknown` payouts as a dead worker left them, in this order: one whose payment the payee
    holds (real), one whose track hangs and one whose track fails (fault injection), and one whose
    payment succeeded (real). The pass resolves the last, leaving the others for later."""
    _, hx = new_preimage()
    held = await regtest.payee.add_hold_invoice(hx, AMOUNT, memo="held", cltv_expiry=80)
    holding = asyncio.create_task(regtest.escrow.pay(held.payment_request, fee_limit_msat=1_000, timeout_seconds=30))
    await wait_until(lambda: _held(regtest, hx), 30, "HTLC held")
    ok_req, ok = await regtest.payee_invoice(AMOUNT, memo="paid, not recorded")
    assert (await regtest.escrow.pay(ok_req, fee_limit_msat=1_000)).status == PaymentStatus.SUCCEEDED
    hang, fail = "d4" * 32, "e5" * 32
    rows = [
        ("held", hx.hex(), held.payment_request),
        ("hang", hang, ok_req),
        ("fail", fail, ok_req),
        ("paid", ok.hex(), ok_req),
    ]
    t0 = utcnow() - timedelta(minutes=5)
    async with sessions.begin() as s:
        for i, (pid, h, req) in enumerate(rows):
            s.add(
                Payout(
                    id=pid,
                    kind=PayoutKind.REWARD,
                    payee=f"{i:064x}",
                    amount_msat=AMOUNT,
                    destination_kind=DestinationKind.BOLT11,
                    destination=req,
                    state="unknown",
                    attempts=1,
                    next_attempt_at=t0 + timedelta(seconds=i),
                )
            )
            await s.flush()
            s.add(
                PayoutAttempt(
                    payment_hash=h, payout_id=pid, payment_request=req, fee_limit_msat=0, state="unknown", updated_at=t0
                )
            )
    policy = PayoutPolicy.from_settings(
        Settings(_env_file=None, payout_timeout_seconds=TIMEOUT, payout_reconcile_budget_seconds=1.0)
    )
    payouts = Payouts(
        TrackFaults(regtest.escrow, hang, fail), sessions, policy, our_pubkey=regtest.node("escrow")["pubkey"]
    )
    try:
        outcomes = {o.payout_id: o.state for o in await asyncio.wait_for(payouts.reconcile(), 30)}
        assert outcomes == {"held": "unknown", "paid": "succeeded"}
        states = {pid: (await _state(sessions, pid)).state for pid, *_ in rows}
        assert states == {"held": "unknown", "hang": "unknown", "fail": "unknown", "paid": "succeeded"}
        held_row = await _state(sessions, "held")
        assert held_row.next_attempt_at.replace(tzinfo=t0.tzinfo) > utcnow() + timedelta(seconds=30), (
            "a payment held for minutes is looked at less often (a quarter of its age)"
        )
        # the two whose track failed are due again soon: the next pass retries them
        async with sessions.begin() as s:
            await s.execute(update(Payout).where(Payout.id.in_(("hang", "fail"))).values(next_attempt_at=t0))
        assert await asyncio.wait_for(payouts.reconcile(), 30) == []
    finally:
        await regtest.payee.cancel_invoice(hx)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(holding, 30)
