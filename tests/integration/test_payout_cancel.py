"""Cancelable payouts on real LND: a send stopped before it left is sent again exactly once; one
that left is never treated as cancelled (issue 17, "cancelable payouts").

LND reports a payment with no HTLC attempted only for the few milliseconds between creating it and
launching its first HTLC on regtest, so "not yet left" is injected, each injection named:

- ``LeaseTakenAfter``: the worker's lease is taken a set delay after its send starts. The delay is
  tuned until LND reports the payment FAILED with ``FAILURE_REASON_CANCELED`` and no HTLC (too early:
  LND never created it; too late: the HTLC left and the payment succeeds). Every trial is checked,
  whichever side of the race it fell on (the delay adapts: shorter after one that left, longer
  after one LND never created).
- ``OperatorCancelsBeforeSend``: an operator cancels after the attempt is written ahead and before
  SendPaymentV2 (LND does not know the hash yet: the cancel is accepted).
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import httpx
import pytest
from sqlalchemy import select, update

from service.api import actions
from service.api.models import AdminAction
from service.app import create_app
from service.config import Settings
from service.db import aware, create_engine, session_factory, utcnow
from service.lightning.client import FailureReason, InvoiceState, PaymentStatus
from service.node import LightningService
from service.nostr.nip01 import SecretKey
from service.payouts import (
    AttemptState,
    Destination,
    DestinationKind,
    NewPayout,
    PayoutKind,
    PayoutPolicy,
    PayoutReason,
    PayoutState,
)
from service.payouts.models import Payout, PayoutAttempt
from service.payouts.store import create as create_payout
from service.payouts.worker import Outcome, Payouts
from tests.conftest import Regtest, new_preimage, wait_until

pytestmark = pytest.mark.lnd

AMOUNT = 20_000
POLICY = PayoutPolicy(
    timeout_seconds=20, fee_quote_seconds=0, retry_seconds=0.2, min_expiry_seconds=60, lease_seconds=120
)


@pytest.fixture
async def sessions(database_url: str):
    engine = create_engine(database_url)
    yield session_factory(engine)
    await engine.dispose()


class LeaseTakenAfter(Payouts):
    """Fault injection: ``delay`` seconds after a send starts, the payout's lease runs out (as if
    another replica's reconciler could take it), whatever LND is doing meanwhile."""

    delay = 0.0

    async def _watch_lease(self, payout_id: str, lease: datetime) -> None:
        await asyncio.sleep(self.delay)
        async with self.sessions.begin() as s:
            await s.execute(
                update(Payout).where(Payout.id == payout_id).values(lease_until=utcnow() - timedelta(seconds=1))
            )
        assert not await self._leased(payout_id, lease)


class OperatorCancelsBeforeSend(Payouts):
    """Fault injection: an operator's cancel (the admin action) lands after the write-ahead, before
    SendPaymentV2; ``results`` keeps what the action answered."""

    results: list[str]

    async def _send(self, payout_id, payment_hash, payreq, fee_limit):
        async with self.sessions.begin() as s:
            self.results.append(await actions.cancel_payout(s, self.lnd, payout_id, "test: stop it"))
        return await super()._send(payout_id, payment_hash, payreq, fee_limit)


async def _payout(sessions, pid: str, payreq: str) -> None:
    async with sessions.begin() as s:
        await create_payout(
            s,
            NewPayout(
                pid, "cc" * 32, PayoutKind.REWARD, "b2" * 32, AMOUNT, Destination(DestinationKind.BOLT11, payreq)
            ),
        )


async def _get(sessions, model, key):
    async with sessions() as s:
        return await s.get(model, key)


async def _pay_claimed(payouts: Payouts, pid: str) -> Outcome:
    claims = await payouts.claim_due(5)
    assert [c.payout_id for c in claims] == [pid]
    return await payouts.pay(pid)


async def _resend_once(regtest: Regtest, sessions, pid: str, h: bytes) -> None:
    """The stopped payout is due again after the retry pause; an ordinary worker pays it, once."""
    worker = Payouts(regtest.escrow, sessions, POLICY, our_pubkey=regtest.desc["nodes"]["escrow"]["pubkey"])
    await asyncio.sleep(POLICY.retry_seconds + 0.1)
    assert (await _pay_claimed(worker, pid)).state is PayoutState.SUCCEEDED
    assert await worker.claim_due(5) == []  # nothing left to send
    inv = await regtest.payee.lookup_invoice(h)
    assert inv.state is InvoiceState.SETTLED and inv.amt_paid_msat == AMOUNT
    lnd = await regtest.escrow.current_payment(h)
    assert lnd is not None and lnd.status is PaymentStatus.SUCCEEDED
    assert lnd.htlc_attempts == 1  # the stopped send never sent one; the second sent exactly one
    p = await _get(sessions, Payout, pid)
    assert p.state is PayoutState.SUCCEEDED and p.payment_hash == h.hex() and p.attempts == 2
    a = await _get(sessions, PayoutAttempt, h.hex())
    assert a.state is AttemptState.SUCCEEDED


async def test_a_send_whose_lease_is_lost_before_it_left_fails_canceled_and_is_sent_again_once(
    regtest: Regtest, sessions
) -> None:
    payouts = LeaseTakenAfter(regtest.escrow, sessions, POLICY, our_pubkey=regtest.desc["nodes"]["escrow"]["pubkey"])
    seen: list[str] = []
    payouts.delay = 0.004
    for trial in range(40):
        req, h = await regtest.payee_invoice(AMOUNT, memo=f"cancel trial {trial}")
        pid = f"cancel-trial-{trial}"
        await _payout(sessions, pid, req)
        outcome = await _pay_claimed(payouts, pid)
        lnd = await regtest.escrow.current_payment(h)
        attempt = await _get(sessions, PayoutAttempt, h.hex())
        if lnd is not None and lnd.status is PaymentStatus.SUCCEEDED:
            # the HTLC left before the lease was lost: paid, never taken for cancelled
            seen.append("left")
            payouts.delay *= 0.7  # take the lease sooner
            assert outcome.state is PayoutState.SUCCEEDED and attempt.state is AttemptState.SUCCEEDED
            assert (await regtest.payee.lookup_invoice(h)).state is InvoiceState.SETTLED
            continue
        assert outcome.state is PayoutState.PENDING, outcome
        assert outcome.detail.startswith(PayoutReason.CANCELED.value)
        assert (await regtest.payee.lookup_invoice(h)).state is InvoiceState.OPEN
        if lnd is None:
            seen.append("not initiated")  # stopped before LND created it
            payouts.delay = payouts.delay * 1.3 + 0.0005  # take the lease later
            assert attempt.state is AttemptState.NOT_INITIATED
            await _resend_once(regtest, sessions, pid, h)
            continue
        seen.append("canceled")
        assert lnd.status is PaymentStatus.FAILED and lnd.failure_reason is FailureReason.CANCELED
        assert lnd.htlc_attempts == 0
        assert attempt.state is AttemptState.FAILED and attempt.failure == FailureReason.CANCELED.name
        await _resend_once(regtest, sessions, pid, h)
        break
    assert seen[-1] == "canceled", f"LND never reported FAILED(CANCELED) with no HTLC in {len(seen)} trials: {seen}"


async def test_an_operator_cancel_before_the_send_sends_nothing_then_the_payout_is_paid_once(
    regtest: Regtest, sessions
) -> None:
    payouts = OperatorCancelsBeforeSend(
        regtest.escrow, sessions, POLICY, our_pubkey=regtest.desc["nodes"]["escrow"]["pubkey"]
    )
    payouts.results = []
    req, h = await regtest.payee_invoice(AMOUNT, memo="operator cancel")
    await _payout(sessions, "op-cancel", req)
    outcome = await _pay_claimed(payouts, "op-cancel")
    assert payouts.results == ["cancel_requested (not initiated in LND)"]
    assert outcome.state is PayoutState.PENDING and outcome.detail.startswith(PayoutReason.CANCELED.value)
    assert await regtest.escrow.current_payment(h) is None  # nothing was sent
    assert (await _get(sessions, PayoutAttempt, h.hex())).state is AttemptState.NOT_INITIATED
    async with sessions() as s:
        audited = (await s.scalars(select(AdminAction).where(AdminAction.target == "op-cancel"))).all()
    assert [(a.action, a.outcome) for a in audited] == [("cancel_payout", "cancel_requested (not initiated in LND)")]
    await _resend_once(regtest, sessions, "op-cancel", h)
    # paid: nothing is being sent, so a cancel now is refused
    with pytest.raises(actions.ActionRefused) as refused:
        async with sessions.begin() as s:
            await actions.cancel_payout(s, regtest.escrow, "op-cancel", "test: too late")
    assert refused.value.code == "payout_not_sending"


async def test_an_operator_cancel_of_a_payment_that_left_is_refused_and_the_payment_completes(
    regtest: Regtest, sessions
) -> None:
    preimage, h = new_preimage()
    held = await regtest.payee.add_hold_invoice(h, AMOUNT, memo="held, then settled", cltv_expiry=80)
    await _payout(sessions, "op-left", held.payment_request)
    payouts = Payouts(regtest.escrow, sessions, POLICY, our_pubkey=regtest.desc["nodes"]["escrow"]["pubkey"])
    claims = await payouts.claim_due(5)
    paying = asyncio.create_task(payouts.pay(claims[0].payout_id))
    try:

        async def held_by_payee() -> bool:
            return (await regtest.payee.lookup_invoice(h)).state is InvoiceState.ACCEPTED

        await wait_until(held_by_payee, 30, "the escrow's HTLC held by the payee")
        with pytest.raises(actions.ActionRefused) as refused:
            async with sessions.begin() as s:
                await actions.cancel_payout(s, regtest.escrow, "op-left", "test: stop it")
        assert refused.value.code == "payment_left"
        p = await _get(sessions, Payout, "op-left")
        assert p.state is PayoutState.SENDING and p.lease_until is not None  # the worker keeps its lease
        await asyncio.sleep(1.5)  # a lease check of the worker's comes and goes: nothing stops it
        assert not paying.done()
        await regtest.payee.settle_invoice(preimage)
        outcome = await asyncio.wait_for(paying, 30)
    finally:
        if not paying.done():
            paying.cancel()
    assert outcome.state is PayoutState.SUCCEEDED
    inv = await regtest.payee.lookup_invoice(h)
    assert inv.state is InvoiceState.SETTLED and inv.amt_paid_msat == AMOUNT
    lnd = await regtest.escrow.current_payment(h)
    assert lnd is not None and lnd.status is PaymentStatus.SUCCEEDED and lnd.htlc_attempts == 1


async def test_the_admin_cancel_over_http_refuses_a_payment_that_left_with_409_and_audits_it(
    regtest: Regtest, database_url: str, relay_url: str
) -> None:
    """On the running service (its own payout worker): a held HTLC has left, so the operator's
    cancel is `409 payment_left`, the refusal is audited, and the payment completes."""
    token = "t" * 40
    node = regtest.desc["nodes"]["escrow"]
    app = create_app(
        Settings(
            _env_file=None,
            network="regtest",
            database_url=database_url,
            lnd_grpc_host=node["rpc"],
            lnd_tls_cert_path=node["tls_cert"],
            lnd_macaroon_path=node["macaroon"],
            relays=[relay_url],
            nostr_secret_key=SecretKey.generate().to_hex(),
            admin_token=token,
            payout_invoice_min_expiry_seconds=60,
            payout_fee_quote_seconds=0,
        )
    )
    preimage, h = new_preimage()
    held = await regtest.payee.add_hold_invoice(h, AMOUNT, memo="held, over http", cltv_expiry=80)
    async with app.router.lifespan_context(app):
        sessions = app.state.sessions
        await _payout(sessions, "http-left", held.payment_request)
        app.state.lightning.wake_payouts()

        async def held_by_payee() -> bool:
            return (await regtest.payee.lookup_invoice(h)).state is InvoiceState.ACCEPTED

        await wait_until(held_by_payee, 30, "the escrow's HTLC held by the payee")
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://escrow",
            headers={"Authorization": f"Bearer {token}"},
        ) as api:
            r = await api.post("/v1/admin/payouts/http-left/cancel", json={"reason": "test: stop it"})
            assert r.status_code == 409, r.text
            assert r.json()["code"] == "payment_left"
            r = await api.post("/v1/admin/payouts/no-such/cancel", json={"reason": "test: stop it"})
            assert r.status_code == 404 and r.json()["code"] == "not_found"
        async with sessions() as s:
            audited = (await s.scalars(select(AdminAction).where(AdminAction.action == "cancel_payout"))).all()
        assert sorted((a.target, a.outcome) for a in audited) == [
            ("http-left", "refused: payment_left"),
            ("no-such", "refused: not_found"),
        ]
        await regtest.payee.settle_invoice(preimage)

        async def paid() -> bool:
            return (await _get(sessions, Payout, "http-left")).state is PayoutState.SUCCEEDED

        await wait_until(paid, 30, "the payout recorded as succeeded")
    assert (await regtest.payee.lookup_invoice(h)).amt_paid_msat == AMOUNT


async def test_a_service_stopping_mid_payment_ends_its_stream_and_leaves_the_outcome_to_lnd(
    regtest: Regtest, sessions
) -> None:
    """The service stops while a payment's HTLC is out (held by the payee): its lease is given up
    at once (the next reconciler pass looks without waiting for it to run out), LND goes on with
    the HTLC, and the payout is recorded as LND reports: in flight, then succeeded, paid once."""
    settings = Settings(
        _env_file=None,
        payout_timeout_seconds=30,
        payout_lease_seconds=300,
        payout_fee_quote_seconds=0,
        payout_invoice_min_expiry_seconds=60,
    )
    preimage, h = new_preimage()
    held = await regtest.payee.add_hold_invoice(h, AMOUNT, memo="held while stopping", cltv_expiry=80)
    await _payout(sessions, "stopping", held.payment_request)
    svc = LightningService(regtest.escrow, sessions, settings)
    await svc.start_workers()
    try:

        async def held_by_payee() -> bool:
            return (await regtest.payee.lookup_invoice(h)).state is InvoiceState.ACCEPTED

        await wait_until(held_by_payee, 30, "the escrow's HTLC held by the payee")
    finally:
        await svc.stop()
    p = await _get(sessions, Payout, "stopping")
    assert p.state is PayoutState.SENDING and p.lease_until is not None and aware(p.lease_until) <= utcnow()
    lnd = await regtest.escrow.current_payment(h)
    assert lnd is not None and lnd.status is PaymentStatus.IN_FLIGHT and lnd.htlc_attempts == 1
    payouts = Payouts(regtest.escrow, sessions, POLICY, our_pubkey=regtest.desc["nodes"]["escrow"]["pubkey"])
    [outcome] = await payouts.reconcile()
    assert outcome.state is PayoutState.UNKNOWN and outcome.detail.startswith(PayoutReason.IN_FLIGHT.value)
    await regtest.payee.settle_invoice(preimage)

    async def settled() -> bool:
        return (await regtest.escrow.current_payment(h)).status is PaymentStatus.SUCCEEDED

    await wait_until(settled, 30, "LND's payment succeeded")
    async with sessions.begin() as s:  # its next look is due now (not after a quarter of its age)
        await s.execute(update(Payout).where(Payout.id == "stopping").values(next_attempt_at=utcnow()))
    [outcome] = await payouts.reconcile()
    assert outcome.state is PayoutState.SUCCEEDED
    assert (await regtest.payee.lookup_invoice(h)).amt_paid_msat == AMOUNT
