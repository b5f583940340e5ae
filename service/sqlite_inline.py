"""SQLite for the async engine without a thread hop per call.

aiosqlite runs every call (cursor, execute, fetch, close, commit) on a worker thread and
wakes the event loop for each answer; under load those hand-offs, not SQLite, were most of
the cost of a statement (bench.escrow: about 40 hops per escrow created). SQLite in WAL
mode with ``synchronous=NORMAL`` answers the service's small indexed statements in
microseconds and commits without an fsync, so this adapter runs them on the event loop
thread itself. It offers the part of aiosqlite's interface that SQLAlchemy's aiosqlite
dialect uses, and is plugged in with ``create_async_engine(..., async_creator=...)``
(``service.db.create_engine`` does that for every SQLite URL).

The price: a statement that waits for a lock held by *another process* blocks the event
loop while it waits (SQLite's busy handler, ``busy_timeout`` below). The service is the
only writer of its SQLite file (several replicas need PostgreSQL), so this happens only
when a second process writes the same file (an operator's ``sqlite3`` shell, a test).
"""

from __future__ import annotations

import sqlite3
from typing import Any

BUSY_TIMEOUT_MS = 5_000


class Cursor:
    __slots__ = ("_cursor",)

    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self._cursor = cursor

    async def __aenter__(self) -> Cursor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._cursor.close()

    async def execute(self, sql: str, parameters: Any = None) -> Cursor:
        if parameters is None:
            self._cursor.execute(sql)
        else:
            self._cursor.execute(sql, parameters)
        return self

    async def executemany(self, sql: str, seq_of_parameters: Any) -> Cursor:
        self._cursor.executemany(sql, seq_of_parameters)
        return self

    async def fetchone(self) -> Any:
        return self._cursor.fetchone()

    async def fetchmany(self, size: int | None = None) -> list:
        return self._cursor.fetchmany(size) if size is not None else self._cursor.fetchmany()

    async def fetchall(self) -> list:
        return self._cursor.fetchall()

    async def close(self) -> None:
        self._cursor.close()

    async def setinputsizes(self, *sizes: Any) -> None:
        return None

    async def nextset(self) -> None:
        return None

    @property
    def description(self) -> Any:
        return self._cursor.description

    @property
    def rowcount(self) -> int:
        return self._cursor.rowcount

    @property
    def lastrowid(self) -> int | None:
        return self._cursor.lastrowid

    @property
    def arraysize(self) -> int:
        return self._cursor.arraysize

    @arraysize.setter
    def arraysize(self, value: int) -> None:
        self._cursor.arraysize = value


class Connection:
    """An open SQLite connection with aiosqlite's coroutine methods, run inline."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._connection: sqlite3.Connection | None = conn

    def _live(self) -> sqlite3.Connection:
        if self._connection is None:
            raise ValueError("no active connection")
        return self._connection

    def cursor(self) -> Cursor:
        return Cursor(self._live().cursor())

    async def commit(self) -> None:
        self._live().commit()

    async def rollback(self) -> None:
        self._live().rollback()

    async def close(self) -> None:
        self.stop()

    def stop(self) -> None:  # what SQLAlchemy calls to terminate a connection
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    async def create_function(self, *args: Any, **kw: Any) -> None:
        self._live().create_function(*args, **kw)

    @property
    def isolation_level(self) -> str | None:
        return self._live().isolation_level

    @property
    def in_transaction(self) -> bool:
        return self._live().in_transaction


async def connect(database: str, **kw: Any) -> Connection:
    """``aiosqlite.connect``'s signature (the dialect's connect arguments), opened inline."""
    kw["check_same_thread"] = False  # the pool may hand it to another thread at shutdown
    conn = sqlite3.connect(database, **kw)
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    return Connection(conn)
