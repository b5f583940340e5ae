"""One bad item never blocks the others: per-item retries with backoff, then a quarantine.

Every loop of the service (the inbox, the timers, LN facts, payout outcomes, effects and
the publisher) handles each item in a transaction of its own. When one item raises, that
transaction is rolled back and the failure is recorded here, in ``item_failures``, keyed by
``(source, ref)``: how many times it failed, the last error (its type and message, cut
short, secrets masked) and when it may be tried again (exponential backoff with a cap).
After ``RetryPolicy.after`` failures the item is **quarantined**: never retried
automatically, listed for the operator (``GET /v1/admin/quarantine``, the dashboard, the
``fedstr_quarantined_items`` metric) until a replay (:func:`replay`) clears it. The scans
skip items in backoff or in quarantine in SQL (:meth:`Quarantine.due`), so they never
load the failing rows and never fill their ``LIMIT`` with them.

Whose fault is it (:func:`is_outage`)? An error of the database as a whole (unreachable,
the connection lost, SQLite locked by another process, a deadlock or serialization
failure, a missing table) is nobody's item: the loop re-raises it, backs off as a whole
(:class:`LoopBackoff`) and counts nothing. Everything else, including an integrity or data
error raised by the item's own writes, is the item's, and counts.

Where an item keeps its own due time (an effect's and a delivery's ``next_attempt_at``),
the backoff is written there and the quarantine is also a state of the item
(``quarantined``), so their existing scans need no join; the inbox marks a quarantined
event handled with an ``error: …`` outcome. For the others (timers, LN facts, payout
outcomes) the row here is the only record, and :meth:`Quarantine.due` does the skipping.
"""

from __future__ import annotations

import logging
import re
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final, Literal, TypeVar, cast, get_args

from sqlalchemy import (
    DateTime,
    Index,
    Integer,
    String,
    and_,
    delete,
    exists,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import (
    DBAPIError,
    DisconnectionError,
    InterfaceError,
    OperationalError,
    StatementError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Mapped, QueryableAttribute, mapped_column
from sqlalchemy.sql.elements import ColumnElement

from service.config import Settings
from service.db import Base, utcnow

log = logging.getLogger(__name__)

Source = Literal["inbox", "timer", "ln_fact", "payout_outcome", "effect", "publisher"]
SOURCES: Final[tuple[str, ...]] = get_args(Source)
ERROR_CHARS: Final = 300


class ItemFailure(Base):
    """An item that failed: retried with backoff, then quarantined until an operator replays it."""

    __tablename__ = "item_failures"

    source: Mapped[str] = mapped_column(String(16), primary_key=True)  # one of SOURCES
    ref: Mapped[str] = mapped_column(String(400), primary_key=True)  # the item's key within its source
    job_id: Mapped[str | None] = mapped_column(String(64), nullable=True)  # when known, for the operator
    failures: Mapped[int] = mapped_column(Integer, nullable=False)
    last_error: Mapped[str] = mapped_column(String(ERROR_CHARS), nullable=False)
    first_failed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    last_failed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    quarantined_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    __table_args__ = (Index("ix_item_failures_quarantined", "quarantined_at"),)


# ---- the rules ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """After the n-th failure an item waits ``min(max_seconds, base_seconds * 2**(n-1))``; the
    ``after``-th failure quarantines it."""

    after: int = 5
    base_seconds: float = 1.0
    max_seconds: float = 300.0

    def delay(self, failures: int) -> float:
        return min(self.max_seconds, self.base_seconds * 2.0 ** min(max(failures - 1, 0), 40))


# PostgreSQL error classes (SQLSTATE's first two characters) that say "the database, not this
# item": connection exception, transaction rollback (serialization failure, deadlock),
# insufficient resources, operator intervention (shutdown), system error; and lock not available.
_TRANSIENT_SQLSTATE_CLASSES: Final = frozenset({"08", "40", "53", "57", "58"})
_TRANSIENT_SQLSTATES: Final = frozenset({"55P03"})


def is_outage(exc: BaseException) -> bool:
    """True when ``exc`` is the database's (or the connection's) fault, not the item's.

    Outages: SQLAlchemy's OperationalError (SQLite: locked, cannot open, no such table),
    InterfaceError and DisconnectionError (the connection), the pool's TimeoutError, any error
    that invalidated its connection, PostgreSQL's transient SQLSTATE classes, and OSError
    (asyncpg raises ConnectionRefusedError unwrapped when PostgreSQL is down). The item's:
    IntegrityError and DataError from its own writes, every other SQLSTATE, and every
    non-database exception (a bug or a bad input meeting this item).
    """
    if isinstance(exc, OperationalError | InterfaceError | DisconnectionError | PoolTimeoutError | OSError):
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        state = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
        if isinstance(state, str) and (state[:2] in _TRANSIENT_SQLSTATE_CLASSES or state in _TRANSIENT_SQLSTATES):
            return True
    return False


_LONG_HEX = re.compile(r"[0-9a-fA-F]{65,}")  # macaroons, raw keys: longer than any id we show
_NSEC = re.compile(r"nsec1[02-9ac-hj-np-z]{20,}")
_SECRET_WORDS = re.compile(r"(?i)(preimage|macaroon|secret|token)(\W{0,3})[0-9a-zA-Z+/=_-]{16,}")


def describe(exc: BaseException) -> str:
    """``Type: message`` for operators, at most ERROR_CHARS characters, without secrets.

    A database error is described by the driver's message only: SQLAlchemy's own text carries
    the statement's parameters, which may hold a preimage.
    """
    if isinstance(exc, StatementError) and exc.orig is not None:
        text = f"{type(exc).__name__}: {type(exc.orig).__name__}: {exc.orig}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    text = _SECRET_WORDS.sub(r"\1\2<redacted>", text)
    text = _NSEC.sub("<nsec redacted>", _LONG_HEX.sub("<hex redacted>", text))
    text = " ".join(text.split())
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 1] + "…"


def where(exc: BaseException) -> str:
    """Where it was raised: the traceback's frames (file, line, code) without the message."""
    return "".join(traceback.format_tb(exc.__traceback__)[-6:]).rstrip()


class LoopBackoff:
    """A whole loop's pause after a failed pass (the database is down): doubling, capped,
    back to nothing after a pass that worked. Logs the first failure of a run and then
    every tenth, so an outage does not flood the log."""

    def __init__(self, name: str, base: float = 0.2, cap: float = 5.0) -> None:
        self.name = name
        self.base = base
        self.cap = cap
        self.failures = 0

    def failed(self, exc: BaseException) -> float:
        self.failures += 1
        if self.failures == 1 or self.failures % 10 == 0:
            log.warning(
                "%s: pass failed (%d in a row, backing off): %s\n%s",
                self.name,
                self.failures,
                describe(exc),
                where(exc),
            )
        return min(self.cap, self.base * 2.0 ** min(self.failures - 1, 20))

    def ok(self) -> None:
        if self.failures:
            log.info("%s: working again after %d failed pass(es)", self.name, self.failures)
        self.failures = 0


# ---- recording ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one more failure means for the item."""

    failures: int
    quarantined: bool
    retry_at: datetime
    error: str


T = TypeVar("T")
OnFailure = Callable[[AsyncSession, Verdict], Awaitable[None]]
JobId = str | Callable[[], str | None] | None  # the job an item concerns, or how to find it


@dataclass(frozen=True, slots=True)
class Attempt:
    """The outcome of :meth:`Quarantine.attempt`: ``value`` if the work committed, else the verdict."""

    ok: bool
    value: object = None
    verdict: Verdict | None = None

    @property
    def finished(self) -> bool:
        """The item left the queue: processed, or quarantined just now."""
        return self.ok or (self.verdict is not None and self.verdict.quarantined)


def _upsert(session: AsyncSession) -> postgresql.Insert | sqlite.Insert:
    if session.get_bind().dialect.name == "postgresql":
        return postgresql.insert(ItemFailure)
    return sqlite.insert(ItemFailure)


def _rowcount(result: object) -> int:
    return cast(CursorResult[Any], result).rowcount


Ref = ColumnElement[str] | QueryableAttribute[str]  # the item's key, as SQL in a scan


class Quarantine:
    """Records item failures and answers which items are due; one per service, shared by every loop."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        policy: RetryPolicy | None = None,
        *,
        policies: dict[str, RetryPolicy] | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.sessions = sessions
        self.policy = policy or RetryPolicy()
        self.policies = dict(policies or {})  # a source's own policy (effects ride out an LND restart)
        self.clock = clock
        self.failures: Counter[str] = Counter()  # failures recorded through this quarantine, per source

    def policy_for(self, source: str) -> RetryPolicy:
        return self.policies.get(source, self.policy)

    def now(self) -> datetime:
        return self.clock()

    # -- SQL for the scans: correlated on the item's ref, probing the primary key -------------
    def due(self, source: Source, ref: Ref, now: datetime | None = None) -> ColumnElement[bool]:
        """The item is neither waiting out a backoff nor quarantined."""
        f = ItemFailure
        return ~exists().where(
            f.source == source,
            f.ref == ref,
            or_(f.quarantined_at.is_not(None), f.next_attempt_at > (now or self.now())),
        )

    @staticmethod
    def failing(source: Source, ref: Ref) -> ColumnElement[bool]:
        """The item has a failure row (select it with the item: its success must clear the row)."""
        f = ItemFailure
        return exists().where(f.source == source, f.ref == ref).label("failing")

    # -- writes --------------------------------------------------------------------------------
    async def clear(self, s: AsyncSession, source: Source, ref: str) -> None:
        """Forget an item's failures, in the transaction in which it finally succeeded."""
        await s.execute(
            delete(ItemFailure)
            .where(ItemFailure.source == source, ItemFailure.ref == ref)
            .execution_options(synchronize_session=False)
        )

    async def failed(
        self, source: Source, ref: str, exc: BaseException, *, job_id: JobId = None, on_failure: OnFailure | None = None
    ) -> Verdict:
        """Record one failure of an item, in a transaction of its own (the item's was rolled back).

        ``job_id`` may be a function, called only now (finding it costs, failures are rare).
        ``on_failure`` runs in that transaction with the verdict, for what the item keeps itself
        (an effect's state and due time, the inbox's outcome)."""
        if callable(job_id):
            job_id = job_id()
        self.failures[source] += 1  # the fedstr_item_failures_total counter
        now = self.now()
        error = describe(exc)
        policy = self.policy_for(source)
        f = ItemFailure
        async with self.sessions.begin() as s:
            ins = _upsert(s).values(
                source=source,
                ref=ref[:400],
                job_id=job_id,
                failures=1,
                last_error=error,
                first_failed_at=now,
                last_failed_at=now,
                next_attempt_at=now,
            )
            stmt = ins.on_conflict_do_update(
                index_elements=[f.source, f.ref],
                set_={
                    "failures": f.failures + 1,
                    "last_error": error,
                    "last_failed_at": now,
                    "job_id": func.coalesce(ins.excluded.job_id, f.job_id),
                },
            ).returning(f.failures)
            n = int((await s.execute(stmt)).scalar_one())
            quarantined = n >= policy.after
            retry_at = now + timedelta(seconds=policy.delay(n))
            await s.execute(
                update(f)
                .where(f.source == source, f.ref == ref[:400])
                .values(next_attempt_at=retry_at, quarantined_at=now if quarantined else None)
                .execution_options(synchronize_session=False)
            )
            verdict = Verdict(n, quarantined, retry_at, error)
            if on_failure is not None:
                await on_failure(s, verdict)
        if quarantined:
            log.error(
                "%s %s%s quarantined after %d failure(s): %s\n%s",
                source,
                ref,
                f" (job {job_id})" if job_id else "",
                n,
                error,
                where(exc),
            )
        else:
            log.warning(
                "%s %s failed (%d of %d, retried in %.1f s): %s%s",
                source,
                ref,
                n,
                policy.after,
                policy.delay(n),
                error,
                "\n" + where(exc) if n == 1 else "",
            )
        return verdict

    async def attempt(
        self,
        source: Source,
        ref: str,
        work: Callable[[AsyncSession], Awaitable[T]],
        *,
        failing: bool = False,
        job_id: JobId = None,
        on_failure: OnFailure | None = None,
    ) -> Attempt:
        """Run ``work`` for one item in its own transaction; on an error of the item's, record it.

        An outage (:func:`is_outage`) is re-raised unrecorded: the loop backs off as a whole.
        ``failing``: the item has a failure row (from the scan), cleared when the work commits.
        """
        try:
            async with self.sessions.begin() as s:
                value = await work(s)
                if failing:
                    await self.clear(s, source, ref)
            return Attempt(True, value)
        except Exception as e:  # one item's failure must never stop the loop
            if is_outage(e):
                raise
            return Attempt(False, verdict=await self.failed(source, ref, e, job_id=job_id, on_failure=on_failure))

    # -- reads -------------------------------------------------------------------------------
    @staticmethod
    async def counts(s: AsyncSession) -> dict[str, int]:
        """Quarantined items per source (every source, zeros included)."""
        f = ItemFailure
        rows = (
            await s.execute(select(f.source, func.count()).where(f.quarantined_at.is_not(None)).group_by(f.source))
        ).all()
        out = dict.fromkeys(SOURCES, 0)
        out.update({src: int(n) for src, n in rows})
        return out


def quarantine_from_settings(sessions: async_sessionmaker[AsyncSession], settings: Settings) -> Quarantine:
    """The service's quarantine: FEDSTR_QUARANTINE_AFTER failures, FEDSTR_ITEM_RETRY_* backoff."""
    return Quarantine(
        sessions,
        RetryPolicy(
            after=settings.quarantine_after,
            base_seconds=settings.item_retry_base_seconds,
            max_seconds=settings.item_retry_max_seconds,
        ),
    )


def view(row: ItemFailure) -> dict:
    """The operator's view of a failure row (the error text is already cut short and masked)."""
    return {
        "source": row.source,
        "ref": row.ref,
        "job_id": row.job_id,
        "failures": row.failures,
        "last_error": row.last_error,
        "since": row.first_failed_at.isoformat(),
        "last_failed_at": row.last_failed_at.isoformat(),
        "quarantined_at": row.quarantined_at.isoformat() if row.quarantined_at else None,
        "next_attempt_at": None if row.quarantined_at else row.next_attempt_at.isoformat(),
    }


async def listing(
    s: AsyncSession, *, source: str | None = None, limit: int = 100, offset: int = 0, quarantined: bool = True
) -> tuple[list[dict], int]:
    """Quarantined items (or, with ``quarantined=False``, items still being retried), newest first."""
    f = ItemFailure
    cond: list[ColumnElement[bool]] = [f.quarantined_at.is_not(None) if quarantined else f.quarantined_at.is_(None)]
    if source is not None:
        cond.append(f.source == source)
    total = int(await s.scalar(select(func.count()).select_from(ItemFailure).where(and_(*cond))) or 0)
    rows = (
        await s.scalars(
            select(ItemFailure)
            .where(and_(*cond))
            .order_by(ItemFailure.last_failed_at.desc(), ItemFailure.source, ItemFailure.ref)
            .limit(limit)
            .offset(offset)
        )
    ).all()
    return [view(r) for r in rows], total


# ---- replay -------------------------------------------------------------------------------


class NotQuarantined(Exception):
    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


Reset = Callable[[AsyncSession, str], Awaitable[int]]


async def replay(s: AsyncSession, source: str, ref: str, reset: Reset | None = None) -> ItemFailure | None:
    """Clear an item's quarantine in the caller's transaction: the loop processes it at its next pass.

    The failure count starts again from zero. Returns the row as it was; raises
    :class:`NotQuarantined` (``not_found`` or ``not_quarantined``) when there is nothing to
    replay. An inbox event whose handler failed before this table existed (an ``error:``
    outcome, no row) is replayable too. ``reset``: what the replay must undo in the item itself,
    for sources whose items keep a state of their own (their owners know it: ``service/api/actions.py``).
    """
    f = ItemFailure
    row = await s.get(ItemFailure, (source, ref))
    if row is not None and row.quarantined_at is None:
        raise NotQuarantined(
            "not_quarantined", f"the item is retried automatically (failure {row.failures}); it is not quarantined"
        )
    if row is not None:
        res = await s.execute(
            delete(f)
            .where(f.source == source, f.ref == ref, f.quarantined_at.is_not(None))
            .execution_options(synchronize_session=False)
        )
        if _rowcount(res) != 1:
            raise NotQuarantined("conflict", "the item changed meanwhile")
    changed = await reset(s, ref) if reset is not None else 0
    if row is None and not changed:
        raise NotQuarantined("not_found", "no quarantined item with this source and ref")
    return row
