"""Claim windows through the real engine, runner and database (SQLite and PostgreSQL), on the
engine's clock (no LND: the funding is injected as in tests/integration/test_deadline_outage.py).

- the runner's scan reminds a waiting payee once per window, whichever replica scans and however
  often (``escrow_consumed`` decides), then expires the payouts at ``claim_by``: booked to
  ``income:unclaimed``, the payees told, the job closed;
- an invoice after ``claim_by`` is refused ``claim_expired``, even before the scan has run;
- a payout that is pending, sending or unknown never expires (money may be in flight);
- an operator's reopen: only of an expired claim, a fresh window, the booking reversed, once.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from sqlalchemy import select, update

from service.db import create_engine, session_factory
from service.escrow.engine import Engine, EngineConfig
from service.escrow.models import Job, JobState
from service.escrow.runner import EngineRunner
from service.ledger import accounts
from service.ledger import service as ledger
from service.nostr.models import OutboxEvent
from service.nostr.nip01 import Event, sign_event
from service.nostr.protocol import Score, build_evaluation_result, parse_escrow_feedback
from service.nostr.protocol.feedback import ClaimExpired, RewardClaimable
from service.payouts import (
    AcceptReason,
    ClaimWindow,
    Destination,
    InvoiceRefused,
    InvoiceSource,
    NewPayout,
    PayoutKind,
    PayoutState,
    ReopenReason,
    ReopenRefused,
    store,
)
from service.payouts.models import Payout
from tests.integration.test_deadline_outage import Clock, _collecting_job, _result_event
from tests.unit.test_engine_properties import ESCROW, FAKE_BOLT11, TERMS, VALIDATORS

S = JobState
BOTH = pytest.mark.parametrize("db", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
WINDOW, REMINDER = 1_000, 100
STATES = (PayoutState.PENDING, PayoutState.SENDING, PayoutState.UNKNOWN, PayoutState.NEEDS_INVOICE)


def _config() -> EngineConfig:
    return EngineConfig(
        terms=replace(TERMS, claim_window_s=WINDOW),
        relays=["ws://127.0.0.1:1"],
        claim_reminder_seconds=REMINDER,
    )


async def _feedback(sessions, job_id: str) -> list:
    async with sessions() as s:
        raws = (await s.scalars(select(OutboxEvent.raw).where(OutboxEvent.kind == 7000))).all()
    out = []
    for raw in raws:
        body = parse_escrow_feedback(Event.from_dict(json.loads(raw)))
        if getattr(body, "job_id", None) == job_id:
            out.append(body)
    return out


async def _released_job(sessions, engine: Engine, t0: int):
    """A custodial job released at t0+20: provider 0's reward and the validator's fee wait for invoices."""
    ev, req, world = await _collecting_job(sessions, engine, t0)
    engine.clock.t = t0 + 10  # type: ignore[attr-defined]
    result, sha = _result_event(req, 0, t0 + 10)
    await world.feed(result)
    engine.clock.t = t0 + 20  # type: ignore[attr-defined]
    async with sessions() as s:
        eval_id = (await s.get(Job, ev.id)).eval_request_id
    scores = sign_event(
        VALIDATORS[0],
        *build_evaluation_result(
            request_id=eval_id,
            job_id=ev.id,
            escrow=ESCROW.public_key_hex,
            scores=(Score(result.id, Decimal("0.9"), sha),),
        ),
        created_at=t0 + 20,
    )
    await world.feed(scores)
    async with sessions() as s:
        assert (await s.get(Job, ev.id)).state is S.RELEASING
        payouts = (await s.scalars(select(Payout).where(Payout.job_id == ev.id))).all()
    assert len(payouts) == 2 and all(p.state is PayoutState.NEEDS_INVOICE for p in payouts)
    return ev, world, payouts


@BOTH
async def test_reminded_once_whichever_replica_scans_then_expired_to_unclaimed_and_closed(
    db: str, database_url: str
) -> None:
    t0 = int(time.time())
    engine_db = create_engine(database_url)
    sessions = session_factory(engine_db)
    clock = Clock(t0)
    engine, replica = Engine(sessions, ESCROW, _config(), clock=clock), Engine(sessions, ESCROW, _config(), clock=clock)
    try:
        ev, world, payouts = await _released_job(sessions, engine, t0)
        claim_by = t0 + 20 + WINDOW
        announced = [b for b in await _feedback(sessions, ev.id) if isinstance(b, RewardClaimable)]
        assert sorted(b.claim_by for b in announced) == [claim_by, claim_by]
        runners = [EngineRunner(engine, world.inbox), EngineRunner(replica, world.inbox)]
        before = len(await _feedback(sessions, ev.id))
        clock.t = claim_by - REMINDER - 1
        for r in runners:
            await r.step()
        assert len(await _feedback(sessions, ev.id)) == before  # nothing new: not due yet
        clock.t = claim_by - REMINDER
        for _ in range(2):
            for r in runners:  # both replicas, twice (a restart is a new runner on the same rows)
                await r.step()
        reminders = [
            b
            for b in await _feedback(sessions, ev.id)
            if isinstance(b, RewardClaimable) and b.reason == "claim_window_ending"
        ]
        assert sorted(b.payee for b in reminders) == sorted(p.payee for p in payouts)
        assert all(b.claim_by == claim_by for b in reminders)

        # The window has ended, the scan has not run yet: an invoice is refused claim_expired all the same.
        async with sessions.begin() as s:
            with pytest.raises(InvoiceRefused) as refused:
                await store.accept_invoice(
                    s,
                    job_id=ev.id,
                    payee=payouts[0].payee,
                    bolt11=FAKE_BOLT11,
                    amount_msat=None,
                    source=InvoiceSource.REST,
                    network="regtest",
                    now=claim_by,
                )
        assert refused.value.code is AcceptReason.CLAIM_EXPIRED

        clock.t = claim_by
        await runners[1].step()
        async with sessions() as s:
            job = await s.get(Job, ev.id)
            rows = (await s.scalars(select(Payout).where(Payout.job_id == ev.id))).all()
            unclaimed = (await ledger.balances(s, prefix=accounts.UNCLAIMED)).get(accounts.UNCLAIMED, 0)
            problems = await ledger.check_invariants(s, closed_job_ids=[ev.id])
        assert job.state is S.CLOSED and all(p.state is PayoutState.EXPIRED for p in rows)
        assert -unclaimed == sum(p.amount_msat for p in rows) and problems == []
        expired = [b for b in await _feedback(sessions, ev.id) if isinstance(b, ClaimExpired)]
        assert sorted((b.payee, b.amount_msat, b.claim_by) for b in expired) == sorted(
            (p.payee, p.amount_msat, claim_by) for p in rows
        )
        await runners[0].step()  # nothing happens twice
        assert len([b for b in await _feedback(sessions, ev.id) if isinstance(b, ClaimExpired)]) == 2

        # The operator reopens one: owed again (the job releasing), a fresh window, and only once.
        clock.t = claim_by + 50
        async with sessions.begin() as s:
            plan = await engine.reopen_claim(s, rows[0].id)
        assert plan.state is S.RELEASING
        async with sessions.begin() as s:
            with pytest.raises(ReopenRefused) as again:
                await engine.reopen_claim(s, rows[0].id)
        assert again.value.code is ReopenReason.NOT_EXPIRED
        async with sessions() as s:
            p = await s.get(Payout, rows[0].id)
            unclaimed = (await ledger.balances(s, prefix=accounts.UNCLAIMED)).get(accounts.UNCLAIMED, 0)
            assert await ledger.check_invariants(s) == []
        assert p.state is PayoutState.NEEDS_INVOICE and p.claim_round == 1
        assert int(p.claim_by.replace(tzinfo=UTC).timestamp()) == claim_by + 50 + WINDOW
        assert -unclaimed == rows[1].amount_msat
        # Its new window ends unclaimed too: expired again, booked again (its round's key), closed again.
        clock.t = claim_by + 50 + WINDOW
        await runners[0].step()
        async with sessions() as s:
            assert (await s.get(Job, ev.id)).state is S.CLOSED
            unclaimed = (await ledger.balances(s, prefix=accounts.UNCLAIMED)).get(accounts.UNCLAIMED, 0)
        assert -unclaimed == rows[0].amount_msat + rows[1].amount_msat
    finally:
        await engine_db.dispose()


@BOTH
async def test_a_payout_with_money_possibly_in_flight_never_expires(db: str, database_url: str) -> None:
    engine_db = create_engine(database_url)
    sessions = session_factory(engine_db)
    past = datetime.fromtimestamp(time.time() - 10, UTC)
    try:
        async with sessions.begin() as s:
            for i, state in enumerate(STATES):
                pid = f"{'ab' * 32}:reward:{i}"
                await store.create(
                    s,
                    NewPayout(pid, "ab" * 32, PayoutKind.REWARD, "cd" * 32, 1_000, Destination.none(), claim_by=1),
                )
                await s.execute(update(Payout).where(Payout.id == pid).values(state=state))
        async with sessions.begin() as s:
            moved = {
                state: await store.expire(s, f"{'ab' * 32}:reward:{i}", past) for i, state in enumerate(PayoutState)
            }
        assert moved[PayoutState.PENDING] is moved[PayoutState.SENDING] is moved[PayoutState.UNKNOWN] is False
        async with sessions() as s:
            states = sorted((await s.scalars(select(Payout.state))).all())
        assert states.count(PayoutState.EXPIRED) == 1
        async with sessions.begin() as s:
            with pytest.raises(ReopenRefused) as refused:
                await store.reopen(s, f"{'ab' * 32}:reward:0", ClaimWindow(WINDOW, REMINDER))
        assert refused.value.code is ReopenReason.NOT_EXPIRED
    finally:
        await engine_db.dispose()
