"""A job whose results deadline falls inside an escrow outage, through the real engine and database
(SQLite and PostgreSQL): the timer scan extends the deadline and publishes it before judging, and a
result first received after the request's deadline but before the extended one is counted.

The outage is a fault this test injects: rows of ``escrow_liveness`` as two processes of the escrow
would have written them (one live until t0+90, the next from t0+200), and the inbox's receipt times
of the result and the scores, set to when the relay handed them over after the return.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from sqlalchemy import insert, select, update

from service.db import create_engine, session_factory
from service.escrow.engine import Engine, EngineConfig
from service.escrow.models import Job, JobState, Result, ScoreRow
from service.escrow.runner import EngineRunner
from service.liveness import LivenessInterval
from service.nostr.models import InboxEvent, OutboxEvent
from service.nostr.nip01 import Event, sign_event
from service.nostr.protocol import (
    Direction,
    JobSpec,
    Mode,
    ModelRef,
    PayoutPolicy,
    Score,
    Shard,
    Validation,
    build_appeal,
    build_evaluation_result,
    build_job_request,
    build_result,
    parse_deadline_extension,
    parse_job_request,
)
from tests.unit.test_engine_properties import CUSTOMER, ESCROW, PROVIDERS, TERMS, VALIDATORS, World

S = JobState
BOTH = pytest.mark.parametrize("db", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _at(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


async def _outage(sessions, t0: float, down_from: float, back_at: float) -> None:
    """Fault injection: the escrow was live until ``down_from`` and again from ``back_at``."""
    async with sessions.begin() as s:
        await s.execute(
            insert(LivenessInterval),
            [
                {"id": "a" * 32, "replica": "before", "started_at": _at(t0 - 30), "last_beat_at": _at(down_from)},
                {"id": "b" * 32, "replica": "after", "started_at": _at(back_at), "last_beat_at": _at(back_at)},
            ],
        )


async def _received(sessions, event: Event, at: float) -> None:
    """Fault injection: the relay handed ``event`` to the escrow at ``at`` (after its return)."""
    async with sessions.begin() as s:
        await s.execute(update(InboxEvent).where(InboxEvent.id == event.id).values(received_at=_at(at)))


async def _collecting_job(
    sessions, engine: Engine, t0: int, validation_window: int = 100
) -> tuple[Event, object, World]:
    world = World(sessions, engine.clock)  # type: ignore[arg-type]
    world.engine = engine
    spec = JobSpec(
        escrow=ESCROW.public_key_hex,
        bid_msat=1_000_000,
        shards=(Shard(index=0, url="https://d.example/outage/0"),),
        validation=Validation("accuracy", Direction.MAX, Decimal("0.5"), 1),
        payout=PayoutPolicy.BEST,
        results_deadline=t0 + 100,
        validation_deadline=t0 + 100 + validation_window,
        validators=(VALIDATORS[0].public_key_hex,),
        validator_fee_msat=1_000,
        mode=Mode.CUSTODIAL,
    )
    ev = sign_event(CUSTOMER, *build_job_request(spec, customer=CUSTOMER.public_key_hex), created_at=t0)
    req = parse_job_request(ev, escrow_pubkey=ESCROW.public_key_hex, terms=TERMS, now=t0)
    world.jobs.append((ev, req))
    await world.feed(ev)
    await world.effects()
    await world.pay(0)
    await EngineRunner(engine, world.inbox).step()
    async with sessions() as s:
        assert (await s.get(Job, ev.id)).state is S.COLLECTING
    return ev, req, world


def _result_event(req, provider: int, at: int) -> tuple[Event, str]:
    sha = hashlib.sha256(f"outage model {provider}".encode()).hexdigest()
    ev = sign_event(
        PROVIDERS[provider],
        *build_result(req, shard_index=0, model=ModelRef(f"https://m.example/{sha}", sha, 10)),
        created_at=at,
    )
    return ev, sha


async def _published_extensions(sessions, job_id: str) -> list:
    async with sessions() as s:
        raws = (await s.scalars(select(OutboxEvent.raw).where(OutboxEvent.kind == 7000))).all()
    out = []
    for raw in raws:
        ev = Event.from_dict(json.loads(raw))
        if ("status", "processing", "deadline extended") in [tuple(t) for t in ev.tags]:
            ext = parse_deadline_extension(ev)
            if ext.job_id == job_id:
                out.append(ext)
    return out


@BOTH
async def test_the_scan_extends_publishes_and_a_result_on_time_by_the_extension_counts(
    db: str, database_url: str
) -> None:
    t0 = int(time.time())
    engine_db = create_engine(database_url)
    sessions = session_factory(engine_db)
    clock = Clock(t0)
    engine = Engine(sessions, ESCROW, EngineConfig(terms=TERMS, relays=["ws://127.0.0.1:1"]), clock=clock)
    try:
        ev, req, world = await _collecting_job(sessions, engine, t0)
        # Down from t0+90 to t0+200: the results deadline (t0+100) and its grace (t0+160) inside.
        await _outage(sessions, t0, t0 + 90, t0 + 200)
        clock.t = t0 + 201  # back; the timer scan finds the deadline due
        await EngineRunner(engine, world.inbox).step()
        async with sessions() as s:
            job = await s.get(Job, ev.id)
        # judged deadline t0+160 -> max(t0+200 + (160-90), t0+200 + 60) = t0+270; less the grace: t0+210
        assert job.state is S.COLLECTING and job.results_deadline == t0 + 100
        assert job.results_extended_to == t0 + 210
        assert job.validation_extended_to == t0 + 310  # t0+200 -> t0+200 + 110
        [ext] = await _published_extensions(sessions, ev.id)
        assert (ext.results_deadline, ext.validation_deadline, ext.customer) == (
            t0 + 210,
            t0 + 310,
            CUSTOMER.public_key_hex,
        )
        # The provider published at t0+99 (the relay kept it); the escrow first got it at t0+205.
        result, sha = _result_event(req, 0, t0 + 99)
        await world.inbox.store(result, "relay")
        await _received(sessions, result, t0 + 205)
        clock.t = t0 + 205
        await world.inbox.process_pending(engine.handle_event)
        async with sessions() as s:
            job = await s.get(Job, ev.id)
            counted = (await s.scalars(select(Result.id).where(Result.job_id == ev.id))).all()
        assert counted == [result.id] and job.state is S.VALIDATING
        # The validator scores before the extended validation deadline; received at t0+305: counted.
        scores = sign_event(
            VALIDATORS[0],
            *build_evaluation_result(
                request_id=job.eval_request_id,
                job_id=ev.id,
                escrow=ESCROW.public_key_hex,
                scores=(Score(result.id, Decimal("0.9"), sha),),
            ),
            created_at=t0 + 300,
        )
        await world.inbox.store(scores, "relay")
        await _received(sessions, scores, t0 + 305)
        clock.t = t0 + 305
        await world.inbox.process_pending(engine.handle_event)
        async with sessions() as s:
            job = await s.get(Job, ev.id)
            scored = (await s.scalars(select(ScoreRow.validator).where(ScoreRow.job_id == ev.id))).all()
        assert scored == [VALIDATORS[0].public_key_hex] and job.state is S.RELEASING
        # The scan later finds nothing more to extend (no new outage): one extension only.
        clock.t = t0 + 400
        await EngineRunner(engine, world.inbox).step()
        assert len(await _published_extensions(sessions, ev.id)) == 1
    finally:
        await engine_db.dispose()


@BOTH
async def test_a_result_delivered_before_the_first_scan_extends_first_and_counts(db: str, database_url: str) -> None:
    """After a restart the relay pool may hand over the backlog before the timer scan ran: the
    engine applies the extension first, so the order does not decide whether on-time work counts."""
    t0 = int(time.time())
    engine_db = create_engine(database_url)
    sessions = session_factory(engine_db)
    clock = Clock(t0)
    engine = Engine(sessions, ESCROW, EngineConfig(terms=TERMS, relays=["ws://127.0.0.1:1"]), clock=clock)
    try:
        ev, req, world = await _collecting_job(sessions, engine, t0)
        await _outage(sessions, t0, t0 + 90, t0 + 200)
        clock.t = t0 + 202
        result, _ = _result_event(req, 1, t0 + 95)
        await world.inbox.store(result, "relay")
        await _received(sessions, result, t0 + 202)
        await world.inbox.process_pending(engine.handle_event)  # no timer scan yet
        async with sessions() as s:
            job = await s.get(Job, ev.id)
            counted = (await s.scalars(select(Result.id).where(Result.job_id == ev.id))).all()
        assert counted == [result.id] and job.state is S.VALIDATING
        assert job.results_extended_to == t0 + 210
        assert len(await _published_extensions(sessions, ev.id)) == 1
    finally:
        await engine_db.dispose()


@BOTH
async def test_without_an_outage_on_record_a_late_receipt_stays_late(db: str, database_url: str) -> None:
    """The control: the extension is no blanket grace. The escrow was live throughout (one interval)."""
    t0 = int(time.time())
    engine_db = create_engine(database_url)
    sessions = session_factory(engine_db)
    clock = Clock(t0)
    engine = Engine(sessions, ESCROW, EngineConfig(terms=TERMS, relays=["ws://127.0.0.1:1"]), clock=clock)
    try:
        ev, req, world = await _collecting_job(sessions, engine, t0)
        async with sessions.begin() as s:
            await s.execute(
                insert(LivenessInterval).values(
                    id="c" * 32, replica="always", started_at=_at(t0 - 30), last_beat_at=_at(t0 + 300)
                )
            )
        late, _ = _result_event(req, 2, t0 + 99)
        await world.inbox.store(late, "relay")
        await _received(sessions, late, t0 + 161)
        clock.t = t0 + 161
        await world.inbox.process_pending(engine.handle_event)
        async with sessions() as s:
            assert (await s.scalars(select(Result.id).where(Result.job_id == ev.id))).all() == []
            assert (await s.get(Job, ev.id)).results_extended_to is None
        assert await _published_extensions(sessions, ev.id) == []
    finally:
        await engine_db.dispose()


@BOTH
async def test_a_second_outage_extends_from_the_deadline_in_force(db: str, database_url: str) -> None:
    """The rule runs on the deadlines in force with the outages since they were last moved: here the
    machine pushed the validation deadline past the rule's own value (it keeps its window after the
    moved results deadline), and a second outage that begins inside that pushed window still counts.
    (Found by the deadline-outage drill: computed again from the request's deadline, it was missed
    and an on-time score was refused.)"""
    t0 = int(time.time())
    engine_db = create_engine(database_url)
    sessions = session_factory(engine_db)
    clock = Clock(t0)
    config = EngineConfig(
        terms=TERMS,
        relays=["ws://127.0.0.1:1"],
        results_grace_seconds=5,
        outage_catch_up_seconds=15,
        heartbeat_tolerance_seconds=1,
    )
    engine = Engine(sessions, ESCROW, config, clock=clock)
    try:
        ev, req, world = await _collecting_job(sessions, engine, t0, validation_window=30)
        await _outage(sessions, t0, t0 + 104, t0 + 106)  # a 2 s outage across the results grace (t0+105)
        clock.t = t0 + 107
        await EngineRunner(engine, world.inbox).step()
        async with sessions() as s:
            job = await s.get(Job, ev.id)
        # results: t0+105 -> t0+106 + 15 (catch-up), less the grace: t0+116; validation: t0+132 by the
        # rule, pushed to t0+116 + 30 to keep its window
        assert (job.results_extended_to, job.validation_extended_to) == (t0 + 116, t0 + 146)
        result, sha = _result_event(req, 0, t0 + 104)
        await world.inbox.store(result, "relay")
        await _received(sessions, result, t0 + 108)
        clock.t = t0 + 108
        await world.inbox.process_pending(engine.handle_event)
        async with sessions() as s:
            job = await s.get(Job, ev.id)
        assert job.state is S.VALIDATING
        # Down again from t0+140 to t0+170, across the validation deadline in force (t0+146).
        async with sessions.begin() as s:
            await s.execute(
                update(LivenessInterval).where(LivenessInterval.id == "b" * 32).values(last_beat_at=_at(t0 + 140))
            )
            await s.execute(
                insert(LivenessInterval).values(
                    id="d" * 32, replica="third", started_at=_at(t0 + 170), last_beat_at=_at(t0 + 170)
                )
            )
        clock.t = t0 + 171
        await EngineRunner(engine, world.inbox).step()
        async with sessions() as s:
            job = await s.get(Job, ev.id)
        assert job.state is S.VALIDATING and job.validation_extended_to == t0 + 185  # max(146 + 30, 170 + 15)
        scores = sign_event(
            VALIDATORS[0],
            *build_evaluation_result(
                request_id=job.eval_request_id,
                job_id=ev.id,
                escrow=ESCROW.public_key_hex,
                scores=(Score(result.id, Decimal("0.9"), sha),),
            ),
            created_at=t0 + 144,
        )
        await world.inbox.store(scores, "relay")
        await _received(sessions, scores, t0 + 172)
        clock.t = t0 + 172
        await world.inbox.process_pending(engine.handle_event)
        async with sessions() as s:
            assert (await s.get(Job, ev.id)).state is S.RELEASING
        assert [x.validation_deadline for x in await _published_extensions(sessions, ev.id)] == [t0 + 146, t0 + 185]
    finally:
        await engine_db.dispose()


@BOTH
async def test_an_appeal_sent_during_an_outage_across_the_appeal_deadline_counts(db: str, database_url: str) -> None:
    """Appeals announced (a 50 s window): the escrow is down across the appeal deadline; the
    customer's appeal, first received after the announced deadline but before the extended one,
    has the extension applied first and counts (its fee invoice is asked for)."""
    t0 = int(time.time())
    engine_db = create_engine(database_url)
    sessions = session_factory(engine_db)
    clock = Clock(t0)
    terms = replace(TERMS, appeal_window_s=50, appeal_fee_msat=5_000)
    engine = Engine(sessions, ESCROW, EngineConfig(terms=terms, relays=["ws://127.0.0.1:1"]), clock=clock)
    try:
        ev, req, world = await _collecting_job(sessions, engine, t0)
        result, sha = _result_event(req, 0, t0 + 10)
        await world.feed(result)
        async with sessions() as s:
            job = await s.get(Job, ev.id)
        scores = sign_event(
            VALIDATORS[0],
            *build_evaluation_result(
                request_id=job.eval_request_id,
                job_id=ev.id,
                escrow=ESCROW.public_key_hex,
                scores=(Score(result.id, Decimal("0.9"), sha),),
            ),
            created_at=t0 + 20,
        )
        clock.t = t0 + 20
        await world.feed(scores)
        async with sessions() as s:
            job = await s.get(Job, ev.id)
        assert job.state is S.APPEALABLE and job.appeal_deadline == t0 + 70
        # Down from t0+60 to t0+100: the appeal deadline (t0+70) inside; back, the appeal arrives.
        await _outage(sessions, t0, t0 + 60, t0 + 100)
        appeal = sign_event(
            CUSTOMER, *build_appeal(job_id=ev.id, escrow=ESCROW.public_key_hex, reason="x"), created_at=t0 + 65
        )
        await world.inbox.store(appeal, "relay")
        await _received(sessions, appeal, t0 + 101)
        clock.t = t0 + 101
        await world.inbox.process_pending(engine.handle_event)
        async with sessions() as s:
            job = await s.get(Job, ev.id)
        assert job.state is S.APPEALABLE and job.appeal_deadline is not None and job.appeal_deadline > t0 + 101
        assert json.loads(job.appeal or "{}").get("appellant") == CUSTOMER.public_key_hex
        [ext] = await _published_extensions(sessions, ev.id)
        assert ext.appeal_deadline == job.appeal_deadline
    finally:
        await engine_db.dispose()
