"""A payment LND keeps in flight, recovered by an operator's reissue (issue 17, part 3), on real LND.

The honest way to make a payment stay IN_FLIGHT: the payee's node holds our HTLC (a hold invoice
it never settles). While it holds it the HTLC could still settle, so the reissue is refused and
nothing changes. Once the payee cancels it LND reports the payment FAILED: the reissue goes
through, the stuck hash is never accepted again, and the payee's new invoice is paid, once.

What LND does not do on demand (keep a payment IN_FLIGHT past its HTLC's timelock, as v0.20.2
did after being stopped mid-dispatch; report it SUCCEEDED after all) is injected at the client
boundary (:class:`InjectedLnd`), named so where it is used; the block heights are real (mined).
"""

from __future__ import annotations

import contextlib
import re
import time
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import select, update

from service.api import dashboard
from service.api.models import AdminAction
from service.app import create_app
from service.config import Settings
from service.db import create_engine, session_factory, utcnow
from service.lightning.client import (
    FailureReason,
    HtlcAttemptStatus,
    HtlcState,
    InvoiceState,
    Payment,
    PaymentHtlc,
    PaymentStatus,
)
from service.nostr.nip01 import SecretKey
from service.payouts import (
    AttemptState,
    CheckReason,
    Destination,
    DestinationKind,
    InvoiceCheckError,
    InvoiceRefused,
    InvoiceSource,
    NewPayout,
    PayoutKind,
    PayoutPolicy,
    PayoutState,
    ReissueReason,
    ReissueRefused,
)
from service.payouts import store as payouts_store
from service.payouts.check import refuse_used_hash
from service.payouts.models import Payout, PayoutAttempt
from service.payouts.stuck import REISSUE_MARGIN_BLOCKS
from service.payouts.worker import Payouts
from service.reconcile import REISSUED_PAYMENT_SUCCEEDED, reconcile
from tests.conftest import Regtest, new_preimage, wait_until

pytestmark = [pytest.mark.lnd]

AMOUNT = 30_000
TIMEOUT = 5  # payout timeout (s): LND's payment timeout and how long a send is followed
TOKEN = "stuck-inflight-admin-token-0123456789"
JOB = "ee" * 32
PAYEE = "a1" * 32


async def _payout(sessions, pid: str, payreq: str) -> None:
    async with sessions.begin() as s:
        await payouts_store.create(
            s, NewPayout(pid, JOB, PayoutKind.REWARD, PAYEE, AMOUNT, Destination(DestinationKind.BOLT11, payreq))
        )


async def _get(sessions, model, key):
    async with sessions() as s:
        return await s.get(model, key)


async def _give_invoice(sessions, bolt11: str) -> Payout:
    async with sessions.begin() as s:
        return await payouts_store.accept_invoice(
            s, job_id=JOB, payee=PAYEE, bolt11=bolt11, amount_msat=None, source=InvoiceSource.REST, network="regtest"
        )


def _csrf(html: str) -> str:
    m = re.search(r'name="csrf" value="([0-9a-f]{64})"', html)
    assert m, "no CSRF field in the page"
    return m.group(1)


@pytest.mark.relay
async def test_a_held_payment_is_reissued_once_lnd_reports_it_failed_and_the_payee_is_paid_once(
    regtest: Regtest, database_url: str, relay_url: str
) -> None:
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
            admin_token=TOKEN,
            payout_timeout_seconds=TIMEOUT,
            payout_invoice_min_expiry_seconds=60,
            payout_fee_quote_seconds=0,
            # the reconciler looks only at start-up: the reissue, not its pass, resolves the payout
            payout_reconcile_seconds=3600,
            reconcile_interval_seconds=3600,
        )
    )
    if not any(getattr(r, "path", None) == "/admin" for r in app.routes):
        app.include_router(dashboard.router)
    _, h = new_preimage()
    held = await regtest.payee.add_hold_invoice(h, AMOUNT, memo="held, then canceled", cltv_expiry=80)
    try:
        await _held_then_reissued(regtest, app, h, held.payment_request, database_url)
    finally:  # a failing run must not leave our HTLC held (it would lock the channel's funds)
        with contextlib.suppress(Exception):
            await regtest.payee.cancel_invoice(h)


async def _held_then_reissued(regtest: Regtest, app, h: bytes, held_request: str, database_url: str) -> None:
    async with app.router.lifespan_context(app):
        sessions = app.state.sessions
        await _payout(sessions, "stuck:reward", held_request)
        app.state.lightning.wake_payouts()

        async def held_by_payee() -> bool:
            return (await regtest.payee.lookup_invoice(h)).state is InvoiceState.ACCEPTED

        async def unknown() -> bool:
            return (await _get(sessions, Payout, "stuck:reward")).state is PayoutState.UNKNOWN

        await wait_until(held_by_payee, 30, "the escrow's HTLC held by the payee")
        await wait_until(unknown, TIMEOUT + 30, "the payout left unknown after its payout timeout")
        transport = httpx.ASGITransport(app=app)
        async with (
            httpx.AsyncClient(
                transport=transport, base_url="http://escrow", headers={"Authorization": f"Bearer {TOKEN}"}
            ) as api,
            httpx.AsyncClient(transport=transport, base_url="http://escrow") as browser,
        ):
            # LND's view, while the payee holds the HTLC: in flight, it could still settle
            height = await regtest.block_height()
            r = await api.get("/v1/admin/payouts/stuck:reward")
            assert r.status_code == 200, r.text
            lnd = r.json()["lnd"]
            assert lnd["payment_hash"] == h.hex() and lnd["status"] == "IN_FLIGHT", lnd
            [htlc] = lnd["htlcs"]
            assert htlc["status"] == "IN_FLIGHT" and htlc["attempted_at"] and htlc["resolved_at"] is None
            assert htlc["expiry_height"] > height and lnd["block_height"] >= height
            assert lnd["on_channel"] is True and lnd["htlcs_on_chain"] == 0  # held by the payee: on our channel
            assert lnd["summary"].startswith("LND: IN_FLIGHT, 1 HTLC in flight since ")
            assert f"expires at height {htlc['expiry_height']} (now " in lnd["summary"]
            assert lnd["reissue"] == {
                "allowed": False,
                "code": "payment_may_still_settle",
                "why": lnd["reissue"]["why"],
            }

            r = await browser.post("/admin/login", data={"token": TOKEN})
            assert r.status_code == 303, r.text
            page = (await browser.get("/admin/payouts")).text
            assert lnd["summary"].split(" since ")[0] in page and "reissue not allowed yet" in page
            assert "/reissue" not in page, "no reissue button while the payment may settle"

            r = await api.post("/v1/admin/payouts/stuck:reward/reissue", json={"reason": "test: too early"})
            assert r.status_code == 409 and r.json()["code"] == "payment_may_still_settle", r.text
            p = await _get(sessions, Payout, "stuck:reward")
            a = await _get(sessions, PayoutAttempt, h.hex())
            assert (p.state, a.state, p.needs_invoice_count) == (PayoutState.UNKNOWN, AttemptState.UNKNOWN, 0)

            # The payee gives up holding: LND reports the payment FAILED; the reissue is allowed
            await regtest.payee.cancel_invoice(h)

            async def failed_in_lnd() -> bool:
                got = await regtest.escrow.current_payment(h)
                return got is not None and got.status is PaymentStatus.FAILED

            await wait_until(failed_in_lnd, 30, "LND reports the payment failed")
            lnd = (await api.get("/v1/admin/payouts/stuck:reward")).json()["lnd"]
            assert lnd["status"] == "FAILED" and lnd["reissue"]["allowed"] is True, lnd
            assert lnd["on_channel"] is False
            page = (await browser.get("/admin/payouts")).text
            assert "LND: FAILED" in page and 'action="/admin/payouts/stuck%3Areward/reissue"' in page

            # the operator reissues it from the dashboard (CSRF, a reason)
            r = await browser.post(
                "/admin/payouts/stuck%3Areward/reissue",
                data={"csrf": _csrf(page), "reason": "LND failed the held payment; payee asked again"},
            )
            assert r.status_code == 303, r.text
            assert "reissued" in (await browser.get("/admin/payouts")).text

            # twice is refused: the payout is no longer unknown
            r = await api.post("/v1/admin/payouts/stuck:reward/reissue", json={"reason": "test: again"})
            assert r.status_code == 409 and r.json()["code"] == "payout_not_unknown", r.text

        p = await _get(sessions, Payout, "stuck:reward")
        a = await _get(sessions, PayoutAttempt, h.hex())
        assert p.state is PayoutState.NEEDS_INVOICE and p.needs_invoice_count == 1
        assert p.last_error.startswith("payment_failed: "), p.last_error  # the payee is told payment_failed
        assert p.destination_kind is DestinationKind.NONE and p.payment_hash is None
        assert a.state is AttemptState.ABANDONED and a.failure.startswith("reissued by an operator; LND: FAILED")
        async with sessions() as s:
            audited = [
                (x.reason, x.outcome.split(" ")[0])
                for x in (
                    await s.scalars(
                        select(AdminAction).where(AdminAction.action == "reissue_payout").order_by(AdminAction.id)
                    )
                ).all()
            ]
        assert audited == [
            ("test: too early", "refused:"),
            ("LND failed the held payment; payee asked again", "needs_invoice"),
            ("test: again", "refused:"),
        ]

        # the stuck invoice is never accepted again; a new one is paid
        with pytest.raises(InvoiceRefused) as refused:
            await _give_invoice(sessions, held_request)
        assert refused.value.code is CheckReason.HASH_REUSED
        new_req, new_h = await regtest.payee_invoice(AMOUNT, memo="the new invoice")
        assert (await _give_invoice(sessions, new_req)).state is PayoutState.PENDING
        app.state.lightning.wake_payouts()

        async def paid() -> bool:
            return (await _get(sessions, Payout, "stuck:reward")).state is PayoutState.SUCCEEDED

        await wait_until(paid, TIMEOUT + 30, "the payout paid with the new invoice")
        p = await _get(sessions, Payout, "stuck:reward")
        assert p.payment_hash == new_h.hex()

    # paid exactly once, as the payee's node sees it
    new_inv, old_inv = await regtest.payee.lookup_invoice(new_h), await regtest.payee.lookup_invoice(h)
    assert (new_inv.state, new_inv.amt_paid_msat) == (InvoiceState.SETTLED, AMOUNT)
    # (LND keeps amt_paid_msat of a canceled hold invoice as it was while held: its HTLC says it)
    assert old_inv.state is InvoiceState.CANCELED and [x.state for x in old_inv.htlcs] == [HtlcState.CANCELED]
    assert (await regtest.escrow.current_payment(h)).status is PaymentStatus.FAILED
    engine = create_engine(database_url)
    try:
        async with session_factory(engine)() as s:
            attempts = dict((await s.execute(select(PayoutAttempt.payment_hash, PayoutAttempt.state))).all())
            report = await reconcile(s, regtest.escrow, persist=False)
    finally:
        await engine.dispose()
    assert attempts == {h.hex(): AttemptState.ABANDONED, new_h.hex(): AttemptState.SUCCEEDED}
    assert not [d for d in report.discrepancies if d.payment_hash == h.hex()], report.discrepancies


class InjectedLnd:
    """The real escrow client, except LND's record of one payment (fault injection): kept IN_FLIGHT
    with one HTLC whose expiry height is ``expiry`` (as LND v0.20.2 did past the timelock), or, once
    ``succeeded`` is set, reported SUCCEEDED after all. Block heights, sends, invoices: real."""

    def __init__(self, real, payment_hash: bytes, expiry: int) -> None:
        self.real, self.h, self.expiry, self.succeeded, self.failed = real, payment_hash, expiry, False, False

    def __getattr__(self, name: str):
        return getattr(self.real, name)

    def _injected(self) -> Payment:
        long_ago = time.time_ns() - 3600 * 10**9
        status, htlc = PaymentStatus.IN_FLIGHT, HtlcAttemptStatus.IN_FLIGHT
        if self.succeeded:
            status, htlc = PaymentStatus.SUCCEEDED, HtlcAttemptStatus.SUCCEEDED
        elif self.failed:
            status, htlc = PaymentStatus.FAILED, HtlcAttemptStatus.FAILED
        return Payment(
            payment_hash=self.h,
            status=status,
            value_msat=AMOUNT,
            fee_msat=0,
            preimage=b"\x07" * 32 if self.succeeded else None,
            failure_reason=FailureReason.TIMEOUT if self.failed else FailureReason.NONE,
            payment_index=1,
            creation_time_ns=long_ago,
            htlc_attempts=1,
            htlcs=(PaymentHtlc(htlc, long_ago, 0, self.expiry),),
        )

    async def track_payment(self, payment_hash: bytes, **kw):
        if payment_hash == self.h:
            yield self._injected()
            return
        async for p in self.real.track_payment(payment_hash, **kw):
            yield p

    async def current_payment(self, payment_hash: bytes) -> Payment | None:
        return self._injected() if payment_hash == self.h else await self.real.current_payment(payment_hash)


BOTH = pytest.mark.parametrize("db", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])


@BOTH
async def test_past_the_timelock_the_reissue_is_allowed_and_a_late_success_is_flagged_never_booked(
    regtest: Regtest, database_url: str, db: str
) -> None:
    """INJECTED: LND keeps the payment IN_FLIGHT past its HTLC's expiry (blocks are mined for real),
    then reports it SUCCEEDED after the payout was reissued and paid. The reissue is refused until the
    expiry is REISSUE_MARGIN_BLOCKS behind the tip; the late success leaves the payout as it is (paid
    once, by its new invoice) and the ledger reconciliation flags it for the operator."""
    engine = create_engine(database_url)
    sessions = session_factory(engine)
    _, h = new_preimage()
    stuck = await regtest.payee.add_hold_invoice(h, AMOUNT, memo="stuck in LND", cltv_expiry=80)
    height = await regtest.block_height()
    lnd = InjectedLnd(regtest.escrow, h, expiry=height + 2)
    policy = PayoutPolicy(timeout_seconds=TIMEOUT, fee_quote_seconds=0, min_expiry_seconds=60, retry_seconds=1.0)
    worker = Payouts(lnd, sessions, policy, our_pubkey=regtest.node("escrow")["pubkey"])
    try:
        # as the worker leaves a send it could not finish: the write-ahead attempt and the payout unknown
        await _payout(sessions, "late:reward", stuck.payment_request)
        async with sessions.begin() as s:
            p = await s.get(Payout, "late:reward")
            p.state, p.attempts = PayoutState.UNKNOWN, 1
            s.add(
                PayoutAttempt(
                    payment_hash=h.hex(),
                    payout_id="late:reward",
                    payment_request=stuck.payment_request,
                    fee_limit_msat=0,
                    state=AttemptState.UNKNOWN,
                )
            )

        async def reissue() -> str:
            async with sessions.begin() as s:
                return await payouts_store.reissue(s, lnd, "late:reward", payment_timeout_seconds=TIMEOUT)

        # before the expiry, and within the margin after it: refused, nothing changed
        for blocks in (0, 2 + REISSUE_MARGIN_BLOCKS - 1 - (await regtest.block_height() - height)):
            if blocks > 0:
                await regtest.mine(blocks)
            with pytest.raises(ReissueRefused) as refused:
                await reissue()
            assert refused.value.code is ReissueReason.MAY_STILL_SETTLE, refused.value
            assert (await _get(sessions, Payout, "late:reward")).state is PayoutState.UNKNOWN
            assert (await _get(sessions, PayoutAttempt, h.hex())).state is AttemptState.UNKNOWN
        # the reconciler's pass leaves it unknown (LND says in flight) and does not block the reissue after
        assert [o.state for o in await worker.reconcile()] == [PayoutState.UNKNOWN]

        await regtest.mine(1)  # the expiry is now REISSUE_MARGIN_BLOCKS behind the tip
        # while a reconciler pass holds the payout (its lease), the reissue waits for it
        async with sessions.begin() as s:
            held_until = utcnow() + timedelta(seconds=30)
            await s.execute(update(Payout).where(Payout.id == "late:reward").values(lease_until=held_until))
        with pytest.raises(ReissueRefused) as busy:
            await reissue()
        assert busy.value.code is ReissueReason.BEING_RECONCILED
        async with sessions.begin() as s:
            await s.execute(update(Payout).where(Payout.id == "late:reward").values(lease_until=None))
        result = await reissue()
        assert result.startswith("needs_invoice (LND: IN_FLIGHT, 1 HTLC in flight since "), result
        assert (await _get(sessions, PayoutAttempt, h.hex())).state is AttemptState.ABANDONED

        # never two payments that could both succeed: the stuck hash is refused everywhere
        with pytest.raises(InvoiceRefused) as again:
            await _give_invoice(sessions, stuck.payment_request)
        assert again.value.code is CheckReason.HASH_REUSED
        for payout_id in ("late:reward", "another:payout"):
            async with sessions() as s:
                with pytest.raises(InvoiceCheckError):
                    await refuse_used_hash(s, h.hex(), payout_id=payout_id)

        new_req, new_h = await regtest.payee_invoice(AMOUNT, memo="after the reissue")
        await _give_invoice(sessions, new_req)
        [claim] = await worker.claim_due(5)
        assert (await worker.pay(claim.payout_id)).state is PayoutState.SUCCEEDED

        # LND now says the abandoned payment succeeded after all (injected)
        lnd.succeeded = True
        assert await worker.reconcile() == [], "nothing for the payout reconciler: the payout is paid"
        p = await _get(sessions, Payout, "late:reward")
        assert (p.state, p.payment_hash) == (PayoutState.SUCCEEDED, new_h.hex())
        async with sessions() as s:
            states = dict((await s.execute(select(PayoutAttempt.payment_hash, PayoutAttempt.state))).all())
            report = await reconcile(s, lnd, persist=False)
        assert states == {h.hex(): AttemptState.ABANDONED, new_h.hex(): AttemptState.SUCCEEDED}
        flagged = [d for d in report.discrepancies if d.kind == REISSUED_PAYMENT_SUCCEEDED]
        assert [(d.payment_hash, d.expected_msat, d.actual_msat) for d in flagged] == [(h.hex(), AMOUNT, 0)]
        assert not report.ok, "payouts pause until the operator has looked"
        new_inv = await regtest.payee.lookup_invoice(new_h)
        assert (new_inv.state, new_inv.amt_paid_msat) == (InvoiceState.SETTLED, AMOUNT)
    finally:
        await regtest.payee.cancel_invoice(h)
        await engine.dispose()


@BOTH
async def test_a_stuck_payment_lnd_fails_on_its_own_needs_no_operator(
    regtest: Regtest, database_url: str, db: str
) -> None:
    """INJECTED: LND's record of the payment IN_FLIGHT, then FAILED (TIMEOUT) on its own; LND never
    sent it for real. The reconciler's existing path resolves it with no operator: the attempt is
    failed, the payout sent again (LND retries a FAILED hash) and paid, once."""
    engine = create_engine(database_url)
    sessions = session_factory(engine)
    req, h = await regtest.payee_invoice(AMOUNT, memo="stuck, then failed by LND")
    lnd = InjectedLnd(regtest.escrow, h, expiry=await regtest.block_height() + 80)
    policy = PayoutPolicy(timeout_seconds=TIMEOUT, fee_quote_seconds=0, min_expiry_seconds=60, retry_seconds=0.1)
    worker = Payouts(lnd, sessions, policy, our_pubkey=regtest.node("escrow")["pubkey"])
    try:
        await _payout(sessions, "failed:reward", req)
        async with sessions.begin() as s:
            p = await s.get(Payout, "failed:reward")
            p.state, p.attempts = PayoutState.UNKNOWN, 1
            s.add(
                PayoutAttempt(
                    payment_hash=h.hex(),
                    payout_id="failed:reward",
                    payment_request=req,
                    fee_limit_msat=0,
                    state=AttemptState.UNKNOWN,
                )
            )
        assert [o.state for o in await worker.reconcile()] == [PayoutState.UNKNOWN]  # in flight: left alone
        lnd.failed = True
        assert [o.state for o in await worker.reconcile()] == [PayoutState.PENDING]
        assert (await _get(sessions, PayoutAttempt, h.hex())).state is AttemptState.FAILED

        async def claimed() -> list:
            return await worker.claim_due(5)

        [claim] = await wait_until(claimed, 10, "the payout due again after the retry pause")
        assert (await worker.pay(claim.payout_id)).state is PayoutState.SUCCEEDED
        inv = await regtest.payee.lookup_invoice(h)
        assert (inv.state, inv.amt_paid_msat) == (InvoiceState.SETTLED, AMOUNT)
        p = await _get(sessions, Payout, "failed:reward")
        assert (p.state, p.payment_hash, p.needs_invoice_count) == (PayoutState.SUCCEEDED, h.hex(), 0)
    finally:
        await engine.dispose()
