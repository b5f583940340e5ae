"""One leader among replicas, by PostgreSQL advisory lock.

The leader runs what should run once (relay pool and publisher, the LND watcher and
the deadline guard); every replica runs the engine, the effect runner and the payout
worker, whose claims are compare-and-set. The lock is held by a dedicated database
connection: if the leader dies, PostgreSQL ends its session and releases the lock, and
another replica takes over within ``poll_seconds``. On SQLite (one process) the
service is always the leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

log = logging.getLogger(__name__)

LOCK_ID = 0x6665647374720001  # "fedstr" + 1


class Leadership:
    def __init__(
        self,
        engine: AsyncEngine,
        on_gain: Callable[[], Awaitable[None]],
        on_loss: Callable[[], Awaitable[None]],
        *,
        poll_seconds: float = 2.0,
    ) -> None:
        self.engine = engine
        self.on_gain = on_gain
        self.on_loss = on_loss
        self.poll_seconds = poll_seconds
        self.is_leader = False
        self._conn: AsyncConnection | None = None
        self._task: asyncio.Task | None = None

    @property
    def postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    async def start(self) -> None:
        if not self.postgres:
            self.is_leader = True
            await self.on_gain()
            return
        self._task = asyncio.create_task(self._loop(), name="leader election")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.is_leader:
            self.is_leader = False
            await self.on_loss()
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": LOCK_ID})
                await self._conn.close()
            self._conn = None

    async def _loop(self) -> None:
        while True:
            try:
                if self._conn is None:
                    self._conn = await self.engine.connect()
                if not self.is_leader:
                    got = (await self._conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": LOCK_ID})).scalar()
                    await self._conn.commit()
                    if got:
                        self.is_leader = True
                        log.info("this replica is now the leader")
                        await self.on_gain()
                else:
                    await self._conn.execute(text("SELECT 1"))  # the lock lives as long as this session
                    await self._conn.commit()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - lost the connection: lost the lock
                log.warning("leader election: %s", e)
                if self.is_leader:
                    self.is_leader = False
                    await self.on_loss()
                if self._conn is not None:
                    with contextlib.suppress(Exception):
                        await self._conn.close()
                    self._conn = None
            await asyncio.sleep(self.poll_seconds)
