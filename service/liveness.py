"""When the escrow was live: a heartbeat per process, and the outages it leaves (docs/escrow.md,
"Deadlines that survive the escrow's outages").

Every process opens an *interval* when it starts (``escrow_liveness``: id, replica, started_at,
last_beat_at) and moves its own row's ``last_beat_at`` every ``heartbeat_seconds`` by
compare-and-set on the id and on the beat being recent: a process that could not beat for longer
than the tolerance (its database away, its loop stalled) opens a new interval instead, so the
stretch it missed is an outage too. :class:`Heartbeat` is the only writer of the table.

The escrow was **down** wherever no interval of any replica covers a stretch longer than
``heartbeat_tolerance_seconds`` (:func:`outages`). A deadline that such an outage touched is
extended by the rule of :func:`extend_deadline`; the timer scan applies it
(``Engine.on_timers``) as a fact of the machine (``DeadlineExtended``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import DateTime, String, delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Mapped, mapped_column

from service.db import Base, aware, rowcount, utcnow

log = logging.getLogger(__name__)


class LivenessInterval(Base):
    """A stretch of time one process of the escrow was live (written only by :class:`Heartbeat`)."""

    __tablename__ = "escrow_liveness"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    replica: Mapped[str] = mapped_column(String(64), nullable=False)  # the process that beats it
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    last_beat_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, index=True)


# ---------------------------------------------------------------------------- the pure rules


@dataclass(frozen=True, order=True)
class Outage:
    """The escrow was down from ``start`` to ``end`` (unix seconds)."""

    start: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


def outages(intervals: Iterable[tuple[float, float]], tolerance: float) -> list[Outage]:
    """The gaps, longer than ``tolerance``, between live intervals ``(started_at, last_beat_at)``
    of any replica, in time order. Only a gap with a live interval after it is an outage: the
    present belongs to the process asking (it opened its interval before it asks)."""
    out: list[Outage] = []
    covered: float | None = None
    for start, end in sorted(intervals):
        if covered is not None and start - covered > tolerance:
            out.append(Outage(covered, start))
        covered = end if covered is None else max(covered, end)
    return out


def extend_deadline(deadline: int, window_start: float, down: Sequence[Outage], catch_up: float = 0) -> int:
    """The deadline ``deadline`` of a window that started at ``window_start``, extended for ``down``.

    For each outage (a, b) in time order with a < d' (a clamped to the window's start):
    d' = max(d', b) + (min(b, d') - a). An outage inside the window adds its length; one that
    swallows the deadline gives back, after the escrow returns, the part of the window it took.
    (Both cases are d' + (b - a): an outage that begins before the deadline adds its whole length.)
    And d' is at least ``catch_up`` after the return: what was sent during the outage waits on the
    relays, and reading that backlog takes the escrow a while once it is back (without this, an
    outage that began a second before the deadline would give back one second, less than the
    backlog takes to arrive). Outages wholly before the window or after the deadline change
    nothing. Rounded up to a second.
    """
    d = float(deadline)
    for o in sorted(down):
        a, b = max(o.start, float(window_start)), o.end
        if b <= a or a >= d:
            continue
        d = max(max(d, b) + (min(b, d) - a), b + catch_up)
    return math.ceil(d) if d != deadline else deadline


async def outages_since(s: AsyncSession, since: float, tolerance: float) -> list[Outage]:
    """The outages that ended after ``since`` (unix seconds), from the liveness table."""
    start = datetime.fromtimestamp(since, UTC)
    rows = (
        await s.execute(
            select(LivenessInterval.started_at, LivenessInterval.last_beat_at).where(
                LivenessInterval.last_beat_at >= start - timedelta(seconds=tolerance)
            )
        )
    ).all()
    # The interval that covers `since` (or ended just before it) bounds the first gap; older ones
    # cannot start a gap that ends after `since`.
    spans = [(aware(a).timestamp(), aware(b).timestamp()) for a, b in rows]
    if spans:
        before = (
            await s.execute(
                select(LivenessInterval.started_at, LivenessInterval.last_beat_at)
                .where(LivenessInterval.last_beat_at < start - timedelta(seconds=tolerance))
                .order_by(LivenessInterval.last_beat_at.desc())
                .limit(1)
            )
        ).first()
        if before is not None:
            spans.append((aware(before[0]).timestamp(), aware(before[1]).timestamp()))
    return [o for o in outages(spans, tolerance) if o.end > since]


# ---------------------------------------------------------------------------- the one writer


class Heartbeat:
    """This process's liveness interval: opened by :meth:`open`, beaten every ``interval`` seconds
    by :meth:`run` (a task), old intervals pruned after ``retention`` seconds."""

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        interval: float = 5.0,
        tolerance: float = 15.0,
        retention: float = 90 * 86_400,
        replica: str | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.sessions = sessions
        self.interval = interval
        self.tolerance = tolerance
        self.retention = retention
        self.replica = replica or uuid.uuid4().hex
        self.clock = clock
        self.current: str | None = None  # this process's interval id
        self._task: asyncio.Task | None = None

    async def open(self) -> str:
        """Start a new interval for this process (at start, or after a beat came too late)."""
        now = self.clock()
        interval_id = uuid.uuid4().hex
        async with self.sessions.begin() as s:
            await s.execute(
                insert(LivenessInterval).values(id=interval_id, replica=self.replica, started_at=now, last_beat_at=now)
            )
        self.current = interval_id
        return interval_id

    async def beat(self) -> None:
        """Move this interval's last beat to now: compare-and-set on the id and on the last beat
        being within the tolerance; otherwise the stretch since was not live: a new interval."""
        if self.current is None:
            await self.open()
            return
        now = self.clock()
        async with self.sessions.begin() as s:
            res = await s.execute(
                update(LivenessInterval)
                .where(
                    LivenessInterval.id == self.current,
                    LivenessInterval.last_beat_at >= now - timedelta(seconds=self.tolerance),
                )
                .values(last_beat_at=now)
            )
            fresh = rowcount(res) == 1
        if not fresh:
            log.warning("liveness: no beat for more than %.0f s; opening a new interval", self.tolerance)
            await self.open()

    async def prune(self) -> int:
        cutoff = self.clock() - timedelta(seconds=self.retention)
        async with self.sessions.begin() as s:
            res = await s.execute(delete(LivenessInterval).where(LivenessInterval.last_beat_at < cutoff))
        return rowcount(res)

    async def run(self) -> None:
        pruned_at = float("-inf")
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.beat()
                if loop.time() - pruned_at > 3600:
                    pruned_at = loop.time()
                    await self.prune()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - a missed beat is an outage on record, never a crash
                log.warning("liveness: heartbeat failed: %s", type(e).__name__)

    async def start(self) -> None:
        """Open this process's interval (before the engine's timers run), then beat in a task."""
        await self.open()
        self._task = asyncio.create_task(self.run(), name="liveness heartbeat")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
