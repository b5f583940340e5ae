"""Resume points only move forward, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio

import pytest

from service import cursors
from service.db import create_engine, session_factory


async def _check_forward_only(url: str) -> None:
    engine = create_engine(url)
    sessions = session_factory(engine)
    try:
        async with sessions.begin() as s:
            assert await cursors.get(s, "lnd:settle_index") == 0
            assert await cursors.advance(s, "lnd:settle_index", 5)
        async with sessions.begin() as s:
            assert not await cursors.advance(s, "lnd:settle_index", 3), "a cursor never moves back"
            assert not await cursors.advance(s, "lnd:settle_index", 5)
            assert await cursors.advance(s, "lnd:settle_index", 9)
        async with sessions() as s:
            assert await cursors.get(s, "lnd:settle_index") == 9
        with pytest.raises(ValueError):
            async with sessions.begin() as s:
                await cursors.advance(s, "x", -1)

        # Concurrent writers (separate transactions) end at the maximum.
        async def bump(v: int) -> None:
            async with sessions.begin() as s:
                await cursors.advance(s, "relay:ws://r", v)

        await asyncio.gather(*(bump(v) for v in (4, 17, 8, 12, 1)))
        async with sessions() as s:
            assert await cursors.get(s, "relay:ws://r") == 17
        # A rolled-back transaction leaves the cursor where it was.
        with pytest.raises(RuntimeError):
            async with sessions.begin() as s:
                await cursors.advance(s, "relay:ws://r", 99)
                raise RuntimeError("crash before commit")
        async with sessions() as s:
            assert await cursors.get(s, "relay:ws://r") == 17
    finally:
        await engine.dispose()


async def test_forward_only_sqlite(database_url: str) -> None:
    await _check_forward_only(database_url)


@pytest.mark.postgres
async def test_forward_only_postgres(database_url: str) -> None:
    await _check_forward_only(database_url)
