"""Every (job state, fact) pair, table-driven, through the database: the state the engine must end in.

Each case drives a hold-mode job through the real engine (SQLite, the inbox, ln_facts rows) to
the starting state, applies one fact, and compares the resulting state with the table. A pair
missing from the table must leave the state unchanged. The pure version, every pair against
``service/escrow/machine.py`` in memory, is ``tests/unit/test_machine.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import replace
from decimal import Decimal

import pytest
from sqlalchemy import select

from service.api import queries
from service.db import create_engine, session_factory
from service.escrow.engine import appeal_of
from service.escrow.models import Job, JobState
from service.lightning.models import InvoicePurpose, LnInvoice
from service.nostr.nip01 import SecretKey, sign_event
from service.nostr.protocol import Score, build_appeal, build_deletion, build_evaluation_result
from tests.unit.test_engine_properties import CUSTOMER, ESCROW, Clock, World, _fresh_db

S = JobState
POOL_KEY = SecretKey(hashlib.sha256(b"engine states pool validator").digest()).public_key_hex  # outside every job
POOL_SECRET_2 = SecretKey(hashlib.sha256(b"engine states pool validator 2").digest())
POOL_KEY_2 = POOL_SECRET_2.public_key_hex
FACTS = (
    "effects_run",
    "funded",
    "hold_settled",
    "hold_canceled",
    "deletion",
    "results_deadline",
    "validation_deadline",
    "payouts_done",
)

# (state, fact) -> the state after; absent pairs: unchanged.
TABLE: dict[tuple[JobState, str], JobState] = {
    (S.REQUESTED, "effects_run"): S.OFFERED,  # the escrow invoice is created
    (S.REFUNDING, "effects_run"): S.REFUNDED,  # the hold invoice is cancelled
    (S.REQUESTED, "deletion"): S.CANCELLED,
    (S.OFFERED, "funded"): S.COLLECTING,
    (S.OFFERED, "deletion"): S.CANCELLED,
    # An offer closes at the results deadline at the latest: funding later could not start the job.
    (S.OFFERED, "results_deadline"): S.CANCELLED,
    (S.OFFERED, "validation_deadline"): S.CANCELLED,
    (S.COLLECTING, "hold_canceled"): S.REFUNDED,  # LND gave the money back: nothing to hold
    (S.COLLECTING, "results_deadline"): S.REFUNDING,  # no results
    (S.COLLECTING, "validation_deadline"): S.REFUNDING,
    (S.VALIDATING, "hold_canceled"): S.REFUNDED,
    (S.VALIDATING, "validation_deadline"): S.REFUNDING,  # no scores: no quorum
    # A fallback round (one of two validators scored; the escrow's pool asked): its deadline is a
    # no-quorum refund when nobody else scored; the hold HTLC going back refunds it too.
    (S.FALLBACK, "hold_canceled"): S.REFUNDED,
    (S.FALLBACK, "results_deadline"): S.REFUNDING,
    (S.FALLBACK, "validation_deadline"): S.REFUNDING,
    # Appeals announced: the decision waits for its window (50 s), then goes ahead as decided; the
    # hold HTLC going back refunds it.
    (S.APPEALABLE, "hold_canceled"): S.REFUNDED,
    (S.APPEALABLE, "results_deadline"): S.RELEASING,
    (S.APPEALABLE, "validation_deadline"): S.RELEASING,
    # The customer's paid appeal runs (100 s): nobody scores, so at its deadline the first decision
    # stands; the HTLC going back refunds the job, which waits for the appeal fee's refund to be paid.
    (S.APPEAL, "hold_canceled"): S.REFUNDING,
    (S.APPEAL, "results_deadline"): S.RELEASING,
    (S.APPEAL, "validation_deadline"): S.RELEASING,
    (S.RELEASING, "payouts_done"): S.RELEASING,  # nothing is paid before the hold is settled
    # The hold expired (LND gave the money back) before our settle: the customer has it back. (Before
    # the machine this job stayed `releasing` for ever, its settle effect failing on a cancelled invoice.)
    (S.RELEASING, "hold_canceled"): S.REFUNDED,
    (S.REFUNDING, "hold_canceled"): S.REFUNDED,
}

START_STATES = (
    S.REQUESTED,
    S.OFFERED,
    S.COLLECTING,
    S.VALIDATING,
    S.FALLBACK,
    S.APPEALABLE,
    S.APPEAL,
    S.RELEASING,
    S.CLOSED,
    S.REFUNDING,
    S.REFUNDED,
    S.REJECTED,
    S.CANCELLED,
)


async def reach(world: World, state: JobState) -> str:
    """Drive one hold job to ``state``; returns its id."""
    if state is S.REJECTED:
        await world.job_request("best", "hold", 1_000_000)
        good = world.jobs.pop()[0]
        tags = [t if t[0] != "bid" else ("bid", "5") for t in good.tags]  # a bid below the minimum
        bad = sign_event(CUSTOMER, good.kind, tags, good.content, created_at=int(world.clock()))
        await world.feed(bad)
        return bad.id
    await world.job_request("best", "hold", 1_000_000)
    job_id = world.jobs[-1][0].id
    if state is S.REQUESTED:
        return job_id
    if state is S.CANCELLED:
        await deletion(world, job_id)
        return job_id
    await world.effects()
    if state is S.OFFERED:
        return job_id
    await world.pay(0)
    await world.step_engine()
    if state is S.COLLECTING:
        return job_id
    if state in (S.REFUNDING, S.REFUNDED):
        world.clock.t += 200
        await world.step_engine()
        if state is S.REFUNDED:
            await world.effects()
            await world.step_engine()
        return job_id
    await world.result(0, 0, 0, True)
    await world.result(0, 1, 1, True)
    if state is S.VALIDATING:
        return job_id
    if state is S.FALLBACK:
        # the escrow announces a pool; one named validator scores, the other does not
        world.engine.machine_config = replace(
            world.engine.machine_config, validator_pool=(POOL_KEY,), fallback_round_seconds=100
        )
        await world.score(0, 0, False)
        world.clock.t += 201  # past the validation deadline
        await world.step_engine()
        return job_id
    if state in (S.APPEALABLE, S.APPEAL):
        # the escrow announces appeals (and a pool of two: the job's quorum); both validators score
        world.engine.machine_config = replace(
            world.engine.machine_config,
            terms=replace(world.engine.machine_config.terms, appeal_window_s=50, appeal_fee_msat=5_000),
            validator_pool=(POOL_KEY, POOL_KEY_2),
            appeal_round_seconds=100,
        )
    await world.score(0, 0, False)
    await world.score(0, 1, False)
    if state is S.APPEAL:  # the customer appeals the acceptance and pays the fee
        appeal = build_appeal(job_id=job_id, escrow=ESCROW.public_key_hex, reason="not convinced")
        await world.feed(sign_event(CUSTOMER, *appeal, created_at=int(world.clock())))
        await world.effects()
        async with world.sessions.begin() as s:
            fee = (
                await s.scalars(
                    select(LnInvoice).where(LnInvoice.job_id == job_id, LnInvoice.purpose == InvoicePurpose.APPEAL_FEE)
                )
            ).one()
            await world._fact(s, fee, "settled")
        await world.step_engine()
    if state in (S.RELEASING, S.APPEALABLE, S.APPEAL):
        return job_id
    await world.effects()
    await world.step_engine()
    await world.payouts(0, False)
    await world.step_engine()
    return job_id


async def deletion(world: World, job_id: str) -> None:
    await world.feed(
        sign_event(CUSTOMER, *build_deletion((job_id,), escrow=ESCROW.public_key_hex), created_at=int(world.clock()))
    )


async def ln_fact(world: World, job_id: str, kind: str) -> None:
    async with world.sessions.begin() as s:
        inv = (
            await s.scalars(
                select(LnInvoice).where(LnInvoice.job_id == job_id, LnInvoice.purpose == InvoicePurpose.JOB)
            )
        ).first()
        if inv is not None and (kind != "settled" or inv.state == "accepted") and inv.state in ("open", "accepted"):
            await world._fact(s, inv, kind)
    await world.step_engine()


async def apply(world: World, job_id: str, fact: str) -> None:
    if fact == "effects_run":
        await world.effects()
    elif fact == "funded":
        await world.pay(0)
    elif fact == "hold_settled":
        await ln_fact(world, job_id, "settled")
    elif fact == "hold_canceled":
        await ln_fact(world, job_id, "canceled")
    elif fact == "deletion":
        await deletion(world, job_id)
    elif fact == "results_deadline":
        world.clock.t += 161
    elif fact == "validation_deadline":
        world.clock.t += 301
    elif fact == "payouts_done":
        await world.payouts(0, False)
    await world.step_engine()


@pytest.mark.parametrize("fact", FACTS)
@pytest.mark.parametrize("state", START_STATES, ids=[s.value for s in START_STATES])
def test_state_fact_pair(tmp_path, state: JobState, fact: str) -> None:
    asyncio.run(_case(tmp_path, state, fact))


async def _case(tmp, state: JobState, fact: str) -> None:
    url = await _fresh_db(tmp)
    engine = create_engine(url)
    world = World(session_factory(engine), Clock())
    try:
        job_id = await reach(world, state)
        async with world.sessions() as s:
            assert (await s.get(Job, job_id)).state == state.value, "could not reach the starting state"
        await apply(world, job_id, fact)
        async with world.sessions() as s:
            after = (await s.get(Job, job_id)).state
        expected = TABLE.get((state, fact), state)
        assert after == expected.value, f"{state.value} + {fact} -> {after}, table says {expected.value}"
        await world.check()
    finally:
        await engine.dispose()


def test_every_state_is_covered() -> None:
    assert set(START_STATES) == set(JobState) - {JobState.NEW}  # NEW: a request not stored yet
    assert all(s in START_STATES and f in FACTS for s, f in TABLE)


def test_a_running_appeal_rounds_scores_are_hidden_in_public_until_its_verdict(tmp_path) -> None:
    asyncio.run(_hidden_appeal_scores(tmp_path))


async def _hidden_appeal_scores(tmp) -> None:
    url = await _fresh_db(tmp)
    engine = create_engine(url)
    world = World(session_factory(engine), Clock())
    try:
        job_id = await reach(world, S.APPEAL)
        async with world.sessions() as s:
            job = await s.get(Job, job_id)
            appeal = appeal_of(job.appeal, job.appeal_round_deadline)
        assert appeal is not None and POOL_KEY_2 in appeal.validators and appeal.request_id is not None
        scores = tuple(Score(rid, Decimal("0.2"), sha) for rid, sha, _ in world.results[job_id])
        ev = sign_event(
            POOL_SECRET_2,
            *build_evaluation_result(
                request_id=appeal.request_id, job_id=job_id, escrow=ESCROW.public_key_hex, scores=scores
            ),
            created_at=int(world.clock()),
        )
        await world.feed(ev)
        async with world.sessions() as s:
            assert (await s.get(Job, job_id)).state == S.APPEAL.value  # the other appeal validator has not scored
            public = await queries.public_job(s, job_id)
            admin = await queries.job_detail(s, job_id)
        assert public is not None and admin is not None
        mine = [x for x in public["scores"] if x["validator"] == POOL_KEY_2]
        assert mine and all(x["value"] is None for x in mine)  # hidden while the round runs
        assert {x["value"] for x in admin["scores"] if x["validator"] == POOL_KEY_2} == {"0.2"}
        first = [x for x in public["scores"] if x["validator"] != POOL_KEY_2]
        assert first and all(x["value"] is not None for x in first)  # the first decision's are published
        assert public["appeal"]["status"] == "running" and public["appeal"]["appellant"] == CUSTOMER.public_key_hex
    finally:
        await engine.dispose()
