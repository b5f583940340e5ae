"""Migrations: upgrade from empty, downgrade one step and up again, no drift from the models."""

from __future__ import annotations

import asyncio

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from service.db import Base, create_engine
from service.migrate import alembic_config, downgrade, upgrade
from service.tables import import_models


async def _current(url: str) -> str | None:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(lambda c: MigrationContext.configure(c).get_current_revision())
    finally:
        await engine.dispose()


async def _drift(url: str) -> list:
    import_models()
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(
                lambda c: compare_metadata(MigrationContext.configure(c, opts={"compare_type": True}), Base.metadata)
            )
    finally:
        await engine.dispose()


async def _check(url: str) -> None:
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    assert await _current(url) == head  # the fixture upgraded from empty
    assert await _drift(url) == [], "models and migrations differ: write a migration"
    revs = list(ScriptDirectory.from_config(alembic_config(url)).walk_revisions())
    prev = revs[0].down_revision or "base"
    await asyncio.to_thread(downgrade, url, "-1")
    assert await _current(url) == (None if prev == "base" else prev)
    await asyncio.to_thread(upgrade, url)
    assert await _current(url) == head
    assert await _drift(url) == []


async def test_migrations_sqlite(database_url: str) -> None:
    await _check(database_url)


@pytest.mark.postgres
async def test_migrations_postgres(database_url: str) -> None:
    await _check(database_url)


async def test_migration_0012_types_payout_kind_and_destination(tmp_path) -> None:
    """0012 reads the kind, a reward's result and the destination's kind out of 0011's strings,
    and its downgrade writes the strings back."""
    from sqlalchemy import text

    url = f"sqlite+aiosqlite:///{tmp_path / 'm.sqlite3'}"
    await asyncio.to_thread(upgrade, url, "0011")
    job = "ab" * 32
    rows = {
        f"{job}:reward:{'cd' * 32}": "bolt11:lnbcrt1abc",
        f"{job}:validator:{'ef' * 32}": "none",
        f"{job}:refund": "lud16:carol@example.org",
        f"{job}:overpaid": "lnurl:lnurl1xyz",
    }
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            for pid, dest in rows.items():
                await conn.execute(
                    text(
                        "INSERT INTO ln_payouts (id, job_id, payee, amount_msat, destination, state, attempts, "
                        "needs_invoice_count, next_attempt_at, created_at, updated_at) VALUES (:id, :job, :payee, 1000, "
                        ":dest, 'pending', 0, 0, '2026-01-01', '2026-01-01', '2026-01-01')"
                    ),
                    {"id": pid, "job": job, "payee": "12" * 32, "dest": dest},
                )
        await asyncio.to_thread(upgrade, url, "0012")
        async with engine.connect() as conn:
            got = {
                r[0]: tuple(r[1:])
                for r in (
                    await conn.execute(
                        text("SELECT id, kind, earned_by, destination_kind, destination FROM ln_payouts")
                    )
                ).all()
            }
        assert got == {
            f"{job}:reward:{'cd' * 32}": ("reward", "cd" * 32, "bolt11", "lnbcrt1abc"),
            f"{job}:validator:{'ef' * 32}": ("validator_fee", None, "none", ""),
            f"{job}:refund": ("refund", None, "lud16", "carol@example.org"),
            f"{job}:overpaid": ("overpaid", None, "lnurl", "lnurl1xyz"),
        }
        await asyncio.to_thread(downgrade, url, "0011")
        async with engine.connect() as conn:
            back = dict((await conn.execute(text("SELECT id, destination FROM ln_payouts"))).all())
        assert back == rows
    finally:
        await engine.dispose()
