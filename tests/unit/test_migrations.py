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
                lambda c: compare_metadata(MigrationContext.configure(c, opts={"compare_type": True}),
                                           Base.metadata))
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
