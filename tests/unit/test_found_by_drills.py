"""Regressions for what the fault drills (bench/drills) found in the service.

1. The reconciliation loop ran a dry run, and when it agreed ran *again* to store the result:
   a payout that succeeded between the two runs (its posting not booked yet) was stored as a
   disagreement and paused every payout for a whole interval (300 s). Seen in the replicas drill:
   the new leader reconciled right after the takeover, while payouts were completing
   (payout_missing for a payout booked 60 ms later; three jobs stayed `releasing`).
2. A payout claimed while our LND node was unreachable (DecodePayReq failing in the checks) stayed
   `sending` with nothing written ahead, until its lease ran out and the reconciler's next pass
   (a minute later) gave it back. Seen in the lnd-outage drill (a job `releasing` for 60 s after
   LND was back).
3. While LND starts, its RPC server answers "the RPC server is in the process of starting up, but
   not yet ready to accept calls" with code UNKNOWN, which the invoice checks took for the node
   refusing the payee's invoice (`node_cannot_decode`): the payout went to `needs_invoice`, and
   (4) was never announced again. Seen in the lnd-outage drill (seed 20260101, small run).
5. A DUPLICATE PAYMENT: the worker recorded LND's SUCCEEDED on the attempt row, then was killed
   before it marked the payout succeeded. The payout reconciler found no attempt `sending` or
   `unknown`, concluded "nothing was written ahead" and put the payout back to `pending`; its
   invoice was then refused as used (`payment_hash_used_before`), the payee asked for another one,
   and paid again. Seen three times in one full sigkill drill (seed 955957: validators of jobs
   e9fdee08…, dcc05cb6…, e0b7ff6c… each received 10000 msat twice).
4. A payout that returned to `needs_invoice` with the same attempt count it had before (a
   refused invoice adds no attempt) had the same `escrow_consumed` key
   (`<payout>:needs_invoice:<attempts>`) as its first "waiting for an invoice"; the engine took
   it for consumed and never published a new "reward claimable": the job stayed `releasing`.
   Fixed by `ln_payouts.needs_invoice_count` (migration 0007), part of the key once non-zero.
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
from sqlalchemy import func, select, update

import service.node as lightning_service
from service.config import Settings
from service.db import create_engine, session_factory, utcnow
from service.escrow.models import JobState, TimelineEntry
from service.ledger.models import LedgerReconciliation
from service.lightning import errors
from service.migrate import upgrade_async
from service.nostr.protocol.examples import regtest_invoice
from service.payouts import Destination, DestinationKind, NewPayout, PayoutKind, PayoutPolicy
from service.payouts.models import Payout, PayoutAttempt
from service.payouts.store import create as create_payout
from service.payouts.worker import Payouts
from service.reconcile import Discrepancy, ReconciliationReport, payouts_paused, store_report
from tests.support.payouts import pay_due

H1, H2 = "a1" * 32, "b2" * 32


@pytest.fixture
async def sessions(tmp_path: Path):
    url = f"sqlite+aiosqlite:///{tmp_path / 'drills.sqlite3'}"
    await upgrade_async(url)
    engine = create_engine(url)
    yield session_factory(engine)
    await engine.dispose()


def scripted(monkeypatch: pytest.MonkeyPatch, runs: list[list[tuple[str, str]]]) -> list[bool]:
    """Replace reconcile() by runs finding the given (kind, payment hash) discrepancies, in order."""
    persisted: list[bool] = []
    it = iter(runs)

    async def fake(session, lnd, *, threshold_msat=0, call_timeout=None, persist=True):
        found = [Discrepancy(kind, h, 10_000, 0) for kind, h in next(it)]
        report = ReconciliationReport(
            ran_at=utcnow(),
            ok=not found,
            threshold_msat=threshold_msat,
            discrepancy_msat=10_000 * len(found),
            discrepancies=found,
            invoices_checked=1,
            payments_checked=1,
            ledger_node_msat=0,
            lnd_settled_msat=0,
            lnd_paid_msat=0,
            lnd_fees_msat=0,
        )
        persisted.append(persist)
        if persist:
            await store_report(session, report)
        return report

    monkeypatch.setattr(lightning_service, "reconcile", fake)
    return persisted


def service_for(sessions) -> lightning_service.LightningService:
    svc = lightning_service.LightningService(object(), sessions, Settings(_env_file=None))

    async def no_pause(_seconds: float) -> None:
        return None

    svc._sleep = no_pause
    return svc


async def stored(sessions) -> list[bool]:
    async with sessions() as s:
        return list((await s.scalars(select(LedgerReconciliation.ok).order_by(LedgerReconciliation.id))).all())


@pytest.mark.parametrize(
    ("runs", "rows", "paused"),
    [
        # agreement, then a payout completes (posting not booked yet): the agreeing run is stored
        ([[], [("payout_missing", H1)]], [True], False),
        # two different facts in transit, one per run: nothing is stored, nothing pauses
        ([[("payout_missing", H1)], [("payout_missing", H2)]], [], False),
        # the same discrepancy 5 s later: a real disagreement, stored, payouts pause
        ([[("payout_missing", H1)], [("payout_missing", H1), ("funding_missing", H2)]], [False], True),
        # a fact in transit that was booked meanwhile: the second, agreeing run is stored
        ([[("funding_missing", H2)], []], [True], False),
    ],
)
async def test_reconciliation_stores_only_what_it_checked(
    sessions, monkeypatch: pytest.MonkeyPatch, runs, rows, paused
) -> None:
    persisted = scripted(monkeypatch, runs)
    await service_for(sessions).reconcile_once()
    assert await stored(sessions) == rows
    assert not any(persisted), "every run is a dry run; what is stored is a report that was checked"
    async with sessions() as s:
        assert await payouts_paused(s) is paused


class UnreachableLnd:
    timeout = 1.0

    async def decode_pay_req(self, payment_request: str):
        raise errors.LndUnavailable("DecodePayReq", "failed to connect to all addresses", grpc.StatusCode.UNAVAILABLE)


async def test_a_payout_claimed_while_lnd_is_unreachable_is_given_back_at_once(sessions) -> None:
    payreq = regtest_invoice("payee", 5_000, "c3" * 32, "reward", int(time.time()))
    async with sessions.begin() as s:
        await create_payout(
            s,
            NewPayout(
                "job:reward:r1",
                "e5" * 32,
                PayoutKind.REWARD,
                "d4" * 32,
                5_000,
                Destination(DestinationKind.BOLT11, payreq),
            ),
        )
    payouts = Payouts(
        UnreachableLnd(), sessions, PayoutPolicy(network="regtest", retry_seconds=1.0), our_pubkey="02" + "11" * 32
    )
    before = utcnow()
    outcomes = await pay_due(payouts)
    assert [o.state for o in outcomes] == ["pending"]
    async with sessions() as s:
        p = await s.get(Payout, "job:reward:r1")
        attempts = await s.scalar(select(func.count()).select_from(PayoutAttempt))
    assert (p.state, p.lease_until, p.attempts, attempts) == ("pending", None, 0, 0)
    assert p.next_attempt_at.replace(tzinfo=before.tzinfo) > before, "retried after the pause, not in a loop"


class RpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


STARTING = "the RPC server is in the process of starting up, but not yet ready to accept calls"


@pytest.mark.parametrize("details", [STARTING, "wallet locked, unlock it to enable full RPC access"])
def test_lnd_starting_up_is_unavailable(details: str) -> None:
    e = errors.from_rpc_error("DecodePayReq", RpcError(grpc.StatusCode.UNKNOWN, details))
    assert isinstance(e, errors.LndUnavailable)


class StartingLnd:
    timeout = 1.0

    async def decode_pay_req(self, payment_request: str):
        raise errors.from_rpc_error("DecodePayReq", RpcError(grpc.StatusCode.UNKNOWN, STARTING))


class RefusingLnd:
    timeout = 1.0

    async def decode_pay_req(self, payment_request: str):
        raise errors.from_rpc_error("DecodePayReq", RpcError(grpc.StatusCode.UNKNOWN, "checksum failed"))


@pytest.mark.parametrize(("lnd", "state"), [(StartingLnd(), "pending"), (RefusingLnd(), "needs_invoice")])
async def test_a_starting_node_is_not_a_refused_invoice(sessions, lnd, state: str) -> None:
    payreq = regtest_invoice("payee", 5_000, "f6" * 32, "reward", int(time.time()))
    async with sessions.begin() as s:
        await create_payout(
            s,
            NewPayout(
                "job:validator:v1",
                "e5" * 32,
                PayoutKind.VALIDATOR_FEE,
                "d4" * 32,
                5_000,
                Destination(DestinationKind.BOLT11, payreq),
            ),
        )
    payouts = Payouts(lnd, sessions, PayoutPolicy(network="regtest"), our_pubkey="02" + "11" * 32)
    assert [o.state for o in await pay_due(payouts)] == [state]


async def test_a_refused_payee_invoice_is_announced_again(tmp_path: Path) -> None:
    from tests.integration.test_engine_states import reach
    from tests.unit.test_engine_properties import Clock, World, _fresh_db

    engine = create_engine(await _fresh_db(tmp_path))
    world = World(session_factory(engine), Clock())
    try:
        job_id = await reach(world, JobState.RELEASING)
        await world.effects()  # the hold invoice is settled: release, payouts waiting for invoices
        await world.step_engine()
        async with world.sessions() as s:
            p = (await s.scalars(select(Payout).where(Payout.job_id == job_id))).first()
        assert p.state == "needs_invoice" and p.attempts == 0
        payouts = Payouts(None, world.sessions, PayoutPolicy(network="regtest"), our_pubkey="00" * 33)
        for refusal in range(2):  # twice: each refusal is announced, not only the first
            async with world.sessions.begin() as s:  # the payee's invoice arrives (kind 7000 or REST), claimed
                await s.execute(
                    update(Payout)
                    .where(Payout.id == p.id)
                    .values(
                        destination_kind=DestinationKind.BOLT11, destination=f"lnbcrt1invoice{refusal}", state="sending"
                    )
                )
            # ... and the worker's checks refuse it (no attempt made: the attempt count is unchanged)
            out = await payouts._finish(p.id, "needs_invoice", "invoice_expires_too_soon: invoice expires in 20 s")
            assert out.state == "needs_invoice"
            await world.step_engine()
            async with world.sessions() as s:
                asked = [
                    t.detail
                    for t in (
                        await s.scalars(
                            select(TimelineEntry).where(TimelineEntry.job_id == job_id, TimelineEntry.kind == "payment")
                        )
                    ).all()
                    if '"needs_invoice"' in t.detail and p.id in t.detail
                ]
            assert len(asked) == refusal + 1, f"refusal {refusal + 1} must be announced"
    finally:
        await engine.dispose()


class NoLnd:
    timeout = 1.0

    def __getattr__(self, name: str):
        raise AssertionError(f"LND must not be asked ({name}): the attempt row already has its answer")


async def test_a_payout_whose_attempt_succeeded_is_finished_not_paid_again(sessions) -> None:
    from datetime import timedelta

    payreq = regtest_invoice("payee", 10_000, "a7" * 32, "validator fee", int(time.time()))
    async with sessions.begin() as s:
        await create_payout(
            s,
            NewPayout(
                "job:validator:v",
                "c9" * 32,
                PayoutKind.VALIDATOR_FEE,
                "b8" * 32,
                10_000,
                Destination(DestinationKind.BOLT11, payreq),
            ),
        )
        # killed between _attempt_state(succeeded) and _finish(succeeded): lease run out
        await s.execute(
            update(Payout)
            .where(Payout.id == "job:validator:v")
            .values(state="sending", attempts=1, lease_until=utcnow() - timedelta(seconds=1))
        )
        s.add(
            PayoutAttempt(
                payment_hash="a7" * 32,
                payout_id="job:validator:v",
                payment_request=payreq,
                fee_limit_msat=10_000,
                state="succeeded",
                fee_msat=0,
                preimage="d0" * 32,
            )
        )
    payouts = Payouts(NoLnd(), sessions, PayoutPolicy(network="regtest"), our_pubkey="02" + "11" * 32)
    assert [o.state for o in await payouts.reconcile()] == ["succeeded"]
    async with sessions() as s:
        p = await s.get(Payout, "job:validator:v")
        n = await s.scalar(select(func.count()).select_from(PayoutAttempt))
    assert (p.state, p.payment_hash, p.preimage, p.fee_msat, n) == ("succeeded", "a7" * 32, "d0" * 32, 0, 1)


async def test_a_job_whose_invoice_cannot_be_made_is_cancelled_and_the_customer_told(tmp_path: Path) -> None:
    """LND away longer than every retry of create_invoice (fault injected: an LND that only
    answers UNAVAILABLE): the job must not wait in `requested` for ever."""
    from service.escrow.models import Effect, Job
    from service.escrow.runner import EffectRunner
    from service.lightning.invoices import EscrowInvoices, HoldSizing
    from service.lightning.settlement import SettlementWatcher
    from service.nostr.models import OutboxEvent
    from tests.integration.test_engine_states import reach
    from tests.unit.test_engine_properties import Clock, World, _fresh_db

    class AwayLnd:
        async def add_hold_invoice(self, *_a, **_k):
            raise errors.LndUnavailable("AddHoldInvoice", "connection refused")

        add_invoice = add_hold_invoice

    engine = create_engine(await _fresh_db(tmp_path))
    world = World(session_factory(engine), Clock())
    try:
        job_id = await reach(world, JobState.REQUESTED)
        runner = EffectRunner(
            world.engine,
            EscrowInvoices(AwayLnd(), HoldSizing()),
            SettlementWatcher(AwayLnd(), world.sessions),
            max_attempts=3,
        )
        for attempt in range(3):
            async with world.sessions.begin() as s:  # skip the backoff
                await s.execute(update(Effect).where(Effect.job_id == job_id).values(next_attempt_at=utcnow()))
            await runner.run_once()
            async with world.sessions() as s:
                job = await s.get(Job, job_id)
            assert job.state == ("requested" if attempt < 2 else "cancelled"), (attempt, job.state)
        async with world.sessions() as s:
            raws = (await s.scalars(select(OutboxEvent.raw).where(OutboxEvent.raw.contains(job_id)))).all()
        assert any("escrow_unavailable" in r for r in raws), "the customer is told, and may post again"
    finally:
        await engine.dispose()
