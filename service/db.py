"""Database engine, sessions and the declarative base.

The boundary commits (one transaction per request, task or fact); services only
flush. SQLite gets WAL, foreign keys and a busy timeout so several tasks of one
process can share it; PostgreSQL is used for multi-replica deployments.
"""

from __future__ import annotations

import asyncio
import enum
import os
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar, cast

from sqlalchemy import CursorResult, Dialect, MetaData, Result, String, Table, event, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.sql.dml import Insert
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time, timezone-aware UTC: the one clock of every table's timestamps."""
    return datetime.now(UTC)


def aware(dt: datetime) -> datetime:
    """A timestamp read back from a table, timezone-aware (SQLite returns naive datetimes, stored in UTC)."""
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


E = TypeVar("E", bound=enum.StrEnum)


class StringEnum(TypeDecorator[E], Generic[E]):
    """A column holding a closed ``StrEnum``: stored as its text (a plain VARCHAR, so no
    migration and no database enum type), read back as the enum member. A value outside the
    enum fails on write (a typo never reaches a table) and on read (a row no code knows)."""

    impl = String
    cache_ok = True

    def __init__(self, enum_type: type[E], length: int = 16) -> None:
        super().__init__(length)
        self.enum_type = enum_type

    def process_bind_param(self, value: Any, dialect: Dialect) -> str | None:
        if value is None:
            return None
        return self.enum_type(value).value

    def process_result_value(self, value: Any, dialect: Dialect) -> E | None:
        return None if value is None else self.enum_type(value)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def inline_sqlite() -> bool:
    """SQLite statements run inline (default) unless FEDSTR_SQLITE_THREAD=1 asks for aiosqlite's thread."""
    return os.environ.get("FEDSTR_SQLITE_THREAD", "") not in ("1", "true", "yes")


def create_engine(url: str, *, sqlite_inline: bool | None = None, **kw) -> AsyncEngine:
    """The async engine for ``url``. SQLite: one connection, statements inline (see
    ``service/sqlite_inline.py``) unless ``sqlite_inline=False`` or FEDSTR_SQLITE_THREAD=1."""
    if url.startswith("sqlite"):
        # One connection per process: SQLite admits one writer at a time anyway, and waiting
        # in the pool's queue (FIFO, woken at once) beats SQLite's busy handler, which sleeps
        # with backoff, by a factor of two in bench.escrow. Other processes on the same file
        # (a CLI, a second service) still meet the busy handler (busy_timeout below).
        kw.setdefault("pool_size", 1)
        kw.setdefault("max_overflow", 0)
        kw.setdefault("pool_timeout", 60)
        inline = inline_sqlite() if sqlite_inline is None else sqlite_inline
        if inline:
            # Statements run on the event loop thread (service/sqlite_inline.py), not through
            # aiosqlite's worker thread: half the CPU per job request in the engine (4.1 -> 2.0 ms).
            from sqlalchemy.dialects.sqlite.aiosqlite import SQLiteDialect_aiosqlite
            from sqlalchemy.engine import make_url

            from service import sqlite_inline as inline_driver

            cargs, cparams = SQLiteDialect_aiosqlite().create_connect_args(make_url(url))
            kw.setdefault("async_creator", lambda: inline_driver.connect(*cargs, **cparams))
        engine = create_async_engine(url, connect_args={"timeout": 30}, **kw)

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:  # pragma: no cover - exercised by every SQLite test
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            # inline statements wait on the event loop: a shorter wait for another process's lock
            cur.execute(f"PRAGMA busy_timeout={5000 if inline else 30000}")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    return create_async_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10, **kw)


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


async def ping(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))


def rowcount(result: Result[Any]) -> int:
    """The rows an INSERT, UPDATE or DELETE matched (``execute`` is typed as a plain ``Result``)."""
    return cast(CursorResult[Any], result).rowcount


def table_of(model: type[Base]) -> Table:
    """A model's Core table, for statements without ORM bookkeeping (``__table__`` is typed as a
    ``FromClause``)."""
    return cast(Table, model.__table__)


def insert_ignore(session: AsyncSession, table: Any) -> Insert:
    """``INSERT … ON CONFLICT DO NOTHING`` for the session's dialect (SQLite or PostgreSQL)."""
    assert session.bind is not None, "sessions come from session_factory(engine): always bound"
    if session.bind.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table).on_conflict_do_nothing()
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table).on_conflict_do_nothing()


class GroupCommit:
    """Insert rows from many concurrent callers with one transaction per batch.

    ``await insert(row)`` returns only once the row is committed (or raises what the
    commit raised), so a caller may act on the row being durable. While one batch
    commits, new rows queue and go out together in the next: under load the cost of
    a transaction is shared, and alone a row is committed at once.
    """

    def __init__(self, sessions: async_sessionmaker[AsyncSession], table, *, max_batch: int = 500) -> None:
        self.sessions = sessions
        self.table = table
        self.max_batch = max_batch
        self._pending: list[tuple[dict, asyncio.Future[None]]] = []
        self._flushing = False

    async def insert(self, row: dict) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((row, fut))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().create_task(self._flush())
        await fut

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
                try:
                    async with self.sessions.begin() as s:
                        await s.execute(self.table.insert(), [row for row, _ in batch])
                except BaseException as e:  # every waiter learns the outcome
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(e if isinstance(e, Exception) else RuntimeError("commit cancelled"))
                    if not isinstance(e, Exception):
                        raise
                else:
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_result(None)
        finally:
            self._flushing = False
