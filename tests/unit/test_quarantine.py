"""The quarantine's rules: backoff, whose fault an error is, what an error may say, replay, migration."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from datetime import timedelta

import pytest
import sqlalchemy as sa
from alembic.script import ScriptDirectory
from sqlalchemy import insert, select, text
from sqlalchemy.exc import IntegrityError, OperationalError

from service import quarantine
from service.api import actions
from service.db import create_engine, session_factory, utcnow
from service.escrow.models import Effect
from service.lightning.models import LnInvoice
from service.migrate import alembic_config, downgrade, upgrade
from service.nostr.models import InboxEvent
from service.quarantine import (
    ItemFailure,
    LoopBackoff,
    NotQuarantined,
    Quarantine,
    RetryPolicy,
    describe,
    is_outage,
)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
async def sessions(backend: str, database_url: str):
    engine = create_engine(database_url)
    yield session_factory(engine)
    await engine.dispose()


def test_backoff_doubles_up_to_its_cap() -> None:
    p = RetryPolicy(after=5, base_seconds=1.0, max_seconds=300.0)
    assert [p.delay(n) for n in range(1, 11)] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]
    assert p.delay(10_000) == 300, "no overflow for an item failing for ever"
    assert RetryPolicy(base_seconds=0).delay(7) == 0


def test_the_loop_backs_off_as_a_whole_and_recovers() -> None:
    b = LoopBackoff("test", base=0.2, cap=1.0)
    assert [b.failed(OSError("down")) for _ in range(5)] == [0.2, 0.4, 0.8, 1.0, 1.0]
    b.ok()
    assert b.failed(OSError("down")) == 0.2


async def _real_integrity_error(sessions) -> IntegrityError:
    row = {
        "payment_hash": "ab" * 32,
        "mode": "hold",
        "amount_msat": 1,
        "payment_request": "lnbcrt1x",
        "preimage": "5ec7e7" * 10 + "abcd",
        "expires_at": 1,
    }
    async with sessions.begin() as s:
        await s.execute(insert(LnInvoice.__table__), [row])
    with pytest.raises(IntegrityError) as caught:
        async with sessions.begin() as s:
            await s.execute(insert(LnInvoice.__table__), [row])
    return caught.value


async def test_an_error_of_the_items_own_writes_is_the_items(sessions) -> None:
    e = await _real_integrity_error(sessions)
    assert not is_outage(e)
    assert not is_outage(KeyError("a bug")) and not is_outage(ArithmeticError("1E+64"))


async def test_an_error_message_carries_no_statement_parameters(sessions) -> None:
    """SQLAlchemy's own text of an error lists the statement's parameters: here a preimage."""
    e = await _real_integrity_error(sessions)
    secret = "5ec7e7" * 10 + "abcd"
    assert secret in str(e), "the premise: the raw text would leak it"
    text_ = describe(e)
    assert secret not in text_ and text_.startswith("IntegrityError: ") and len(text_) <= quarantine.ERROR_CHARS


def test_an_error_message_is_cut_short_and_masks_secrets() -> None:
    macaroon = "0201036c6e64" + "ab" * 60
    nsec = "nsec1" + "q" * 58
    text_ = describe(
        ValueError(
            f"macaroon {macaroon} key {nsec} preimage=" + "cd" * 32 + " token: s3cr3t-t0ken-value-1234 " + "x" * 1000
        )
    )
    assert macaroon not in text_ and nsec not in text_ and "cd" * 32 not in text_ and "s3cr3t" not in text_
    assert len(text_) == quarantine.ERROR_CHARS and text_.endswith("…")
    assert describe(KeyError("job 1234")) == "KeyError: 'job 1234'"


async def test_sqlite_cannot_find_its_table_is_an_outage(tmp_path) -> None:
    """SQLite reports a missing table (a migration not applied) and a locked file alike, as
    OperationalError: every item would fail the same way, so the loop backs off instead."""
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'empty.sqlite3'}")
    try:
        with pytest.raises(OperationalError) as caught:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT * FROM escrow_jobs"))
        assert is_outage(caught.value)
    finally:
        await engine.dispose()


@pytest.mark.postgres
async def test_postgres_down_is_an_outage_and_a_value_too_long_is_the_items(database_url: str) -> None:
    down = create_engine("postgresql+asyncpg://nobody@127.0.0.1:1/none")
    try:
        with pytest.raises(Exception) as caught:
            async with down.connect() as conn:
                await conn.execute(text("SELECT 1"))
        assert is_outage(caught.value), type(caught.value)
    finally:
        await down.dispose()
    engine = create_engine(database_url)
    try:
        with pytest.raises(Exception) as caught:
            async with session_factory(engine).begin() as s:
                await s.execute(
                    insert(InboxEvent.__table__),
                    [
                        {
                            "id": "x" * 65,
                            "kind": 1,
                            "pubkey": "p",
                            "created_at": 1,
                            "raw": "{}",
                            "source": "t",
                            "received_at": utcnow(),
                        }
                    ],
                )
        assert not is_outage(caught.value), describe(caught.value)
    finally:
        await engine.dispose()


async def test_an_outage_is_raised_and_nothing_is_counted(sessions) -> None:
    """Fault injected: the work raises the OperationalError SQLite raises for a locked file."""
    q = Quarantine(sessions, RetryPolicy(after=2))
    locked = OperationalError("UPDATE nostr_inbox …", {}, sqlite3.OperationalError("database is locked"))

    async def work(s):
        raise locked

    with pytest.raises(OperationalError):
        await q.attempt("inbox", "e1", work)
    async with sessions() as s:
        assert await s.get(ItemFailure, ("inbox", "e1")) is None

    async def bug(s):
        raise KeyError("boom")

    first = await q.attempt("inbox", "e1", bug, job_id="j1")
    second = await q.attempt("inbox", "e1", bug)
    assert (first.ok, first.verdict.failures, first.verdict.quarantined) == (False, 1, False)
    assert (second.verdict.failures, second.verdict.quarantined, second.finished) == (2, True, True)
    async with sessions() as s:
        row = await s.get(ItemFailure, ("inbox", "e1"))
    assert row.job_id == "j1", "the job named once is kept"


async def test_two_replicas_failing_one_item_count_both_failures(sessions) -> None:
    q = Quarantine(sessions, RetryPolicy(after=100))
    await asyncio.gather(*(q.failed("timer", "job:validation_deadline", KeyError("x")) for _ in range(10)))
    async with sessions() as s:
        assert (await s.get(ItemFailure, ("timer", "job:validation_deadline"))).failures == 10


async def test_replay_refusals_and_an_old_inbox_error(sessions) -> None:
    q = Quarantine(sessions, RetryPolicy(after=2))
    await q.failed("ln_fact", "7", KeyError("x"))
    async with sessions.begin() as s:
        with pytest.raises(NotQuarantined) as refused:
            await quarantine.replay(s, "ln_fact", "7")
        assert refused.value.code == "not_quarantined"
        with pytest.raises(NotQuarantined) as refused:
            await quarantine.replay(s, "ln_fact", "8")
        assert refused.value.code == "not_found"
        # An event whose handler failed for good before the quarantine existed: replayable too.
        s.add(
            InboxEvent(
                id="ee" * 32,
                kind=5701,
                pubkey="p",
                created_at=1,
                raw="{}",
                source="t",
                received_at=utcnow(),
                handled_at=utcnow(),
                outcome="error: KeyError: 'x'",
                attempts=3,
            )
        )
    async with sessions.begin() as s:
        assert await quarantine.replay(s, "inbox", "ee" * 32, actions.REPLAY_RESETS["inbox"]) is None
    async with sessions() as s:
        ev = await s.get(InboxEvent, "ee" * 32)
    assert (ev.handled_at, ev.outcome, ev.attempts) == (None, None, 0)


async def test_the_migration_quarantines_what_failed_before_it(backend: str, database_url: str) -> None:
    """Effects left `failed` and inbox events with a final `error:` outcome become quarantined items."""
    before = ScriptDirectory.from_config(alembic_config(database_url)).get_revision("0009").down_revision
    await asyncio.to_thread(downgrade, database_url, before)
    engine = create_engine(database_url)
    try:
        sessions = session_factory(engine)
        async with sessions.begin() as s:
            # A row as the schema before 0009 held it (`failed` is no longer an effect state: untyped table).
            legacy = sa.table(
                "escrow_effects",
                *(
                    sa.column(c)
                    for c in ("job_id", "kind", "state", "attempts", "last_error", "next_attempt_at", "created_at")
                ),
            )
            await s.execute(
                insert(legacy),
                [
                    {
                        "job_id": "aa" * 32,
                        "kind": "settle_hold",
                        "state": "failed",
                        "attempts": 10,
                        "last_error": "LndUnavailable: down",
                        "next_attempt_at": utcnow(),
                        "created_at": utcnow(),
                    }
                ],
            )
            await s.execute(
                insert(InboxEvent.__table__),
                [
                    {
                        "id": "bb" * 32,
                        "kind": 6701,
                        "pubkey": "p",
                        "created_at": 1,
                        "raw": json.dumps({}),
                        "source": "t",
                        "received_at": utcnow() - timedelta(minutes=1),
                        "handled_at": utcnow(),
                        "outcome": "error: KeyError: 'x'",
                        "attempts": 3,
                    }
                ],
            )
        await asyncio.to_thread(upgrade, database_url)
        async with sessions() as s:
            items, _ = await quarantine.listing(s)
            state = await s.scalar(select(Effect.state))
        assert state == "quarantined"
        assert sorted((i["source"], i["job_id"], i["last_error"]) for i in items) == [
            ("effect", "aa" * 32, "LndUnavailable: down"),
            ("inbox", None, "KeyError: 'x'"),
        ]
    finally:
        await engine.dispose()
