"""Settlement verification: facts about our invoices, confirmed by LND itself.

Sources of *hints* (none is trusted alone):

- ``SubscribeInvoices`` from the persisted ``add_index``/``settle_index`` cursors (the
  first run backfills with ``ListInvoices``), which reports OPEN and SETTLED only;
- ``SubscribeSingleInvoice`` for every open or accepted hold invoice (the only
  stream that reports ACCEPTED and CANCELED), re-established at start-up;
- a periodic sweep of every open or accepted invoice (the backstop), which also deletes our
  hold invoices canceled longer ago than the retention period from LND (``prune_canceled``);
- webhooks from LND-side notifiers (``webhook.py``) and the deadline guard.

Every hint leads to :meth:`SettlementWatcher.confirm`, which asks
``LookupInvoiceV2`` and records a fact only if LND says so: the hash matches one of
our invoices, the state is ACCEPTED / SETTLED / CANCELED, and for ACCEPTED and
SETTLED the amount paid covers the amount due. The invoice's state moves by
compare-and-set, and the fact is unique per (hash, kind), so a hint seen by three
sources is one fact. Facts are what the escrow engine consumes.

When LND is unreachable the watcher backs off, reports it in :attr:`health`, and
invents nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service import cursors
from service.db import aware, insert_ignore, rowcount, utcnow
from service.lightning.client import Invoice, InvoiceState, LndClient
from service.lightning.errors import InvoiceStateError, LndError, LndNotFound
from service.lightning.models import LnFact, LnInvoice
from service.signals import Signals

log = logging.getLogger(__name__)

ADD_CURSOR = "lnd:add_index"
SETTLE_CURSOR = "lnd:settle_index"
# When (µs since the epoch) the last hold invoice deleted from LND was canceled; pruning goes on from there.
PRUNE_CURSOR = "lnd:canceled_pruned_until_us"
PRUNE_BATCH = 200  # invoices deleted from LND per sweep at most
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# Invoice state -> (fact kind, states it may move from)
_TRANSITIONS = {
    InvoiceState.ACCEPTED: ("accepted", ("open",)),
    InvoiceState.SETTLED: ("settled", ("open", "accepted")),
    InvoiceState.CANCELED: ("canceled", ("open", "accepted")),
}


@dataclass
class WatcherHealth:
    connected: bool = False
    last_error: str | None = None
    last_event_at: float | None = None
    facts_recorded: int = 0
    single_streams: int = 0
    unstreamed: int = 0  # open hold invoices over the stream budget, followed by the sweep
    backoff_seconds: float = 0.0
    started: bool = False

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class ConfirmResult:
    kind: str | None  # the fact recorded now, or None
    lnd_state: InvoiceState | None
    detail: str = ""
    facts: list[str] = field(default_factory=list)


async def record(session: AsyncSession, inv: Invoice, source: str) -> str | None:
    """Record what a lookup result proves, inside the caller's transaction; returns the new fact kind."""
    h = inv.payment_hash.hex()
    row = (
        await session.execute(
            select(LnInvoice.amount_msat, LnInvoice.state, LnInvoice.mode).where(LnInvoice.payment_hash == h)
        )
    ).first()
    if row is None or inv.state not in _TRANSITIONS:
        return None
    kind, from_states = _TRANSITIONS[inv.state]
    if inv.state == InvoiceState.ACCEPTED:
        paid = sum(x.amt_msat for x in inv.htlcs if x.state.name == "ACCEPTED")
    else:
        paid = inv.amt_paid_msat
    if kind in ("accepted", "settled") and paid < row.amount_msat:
        log.warning("invoice %s reported %s with %d msat paid of %d due: no fact", h, kind, paid, row.amount_msat)
        return None
    values: dict = {"state": kind, "updated_at": utcnow()}
    if kind in ("accepted", "settled"):
        values["amount_paid_msat"] = paid
    if kind == "accepted":
        heights = [x.expiry_height for x in inv.htlcs if x.state.name == "ACCEPTED"]
        values["htlc_expiry_height"] = min(heights) if heights else None
    if kind == "settled":
        values["settle_index"] = inv.settle_index
    moved = await session.execute(
        update(LnInvoice).where(LnInvoice.payment_hash == h, LnInvoice.state.in_(from_states)).values(**values)
    )
    res = await session.execute(
        insert_ignore(session, LnFact.__table__),
        [
            {
                "payment_hash": h,
                "kind": kind,
                "source": source,
                "observed_at": utcnow(),
                "amount_msat": paid if kind != "canceled" else 0,
            }
        ],
    )
    if rowcount(res) != 1:
        return None
    if rowcount(moved) != 1:
        # e.g. a late "accepted" after "settled" was recorded: keep the fact log, not the state.
        log.info("fact %s for %s recorded without a state change (state already %s)", kind, h, row.state)
    return kind


class SettlementWatcher:
    def __init__(
        self,
        lnd: LndClient,
        sessions: async_sessionmaker[AsyncSession],
        *,
        sweep_interval: float = 30.0,
        backoff_max: float = 30.0,
        max_streams: int = 1000,
        overflow_interval: float = 2.0,
        canceled_retention: float = 0.0,
        signals: Signals | None = None,
    ) -> None:
        self.lnd = lnd
        self.canceled_retention = canceled_retention  # seconds; 0: canceled invoices stay in LND
        self.max_streams = max_streams
        self.overflow_interval = overflow_interval
        self._overflow: set[str] = set()  # open hold invoices over the stream budget
        self._overflow_added = asyncio.Event()
        self.sessions = sessions
        self.sweep_interval = sweep_interval
        self.backoff_max = backoff_max
        self.signals = signals or Signals()  # emits fact_recorded
        self.health = WatcherHealth()
        self._singles: dict[str, asyncio.Task] = {}
        self._tasks: list[asyncio.Task] = []
        self._stop = asyncio.Event()
        self._cursor_add = self._cursor_settle = 0
        self._cursor_saved = (0, 0)
        self._cursors_saved_at = float("-inf")
        self._cursor_timer: asyncio.Task | None = None

    cursor_delay = 0.5  # seconds an addition's cursor may wait to be saved with the next ones

    # ---- confirmation ----------------------------------------------------------
    async def confirm(self, payment_hash: str, source: str) -> ConfirmResult:
        """Look the invoice up in LND and record whatever fact that proves."""
        try:
            inv = await self.lnd.lookup_invoice(bytes.fromhex(payment_hash))
        except LndNotFound:
            return ConfirmResult(None, None, "LND does not know this invoice")
        if inv.payment_hash.hex() != payment_hash:
            return ConfirmResult(None, inv.state, "lookup returned another hash")
        async with self.sessions.begin() as s:
            kind = await record(s, inv, source)
        if kind:
            self.health.facts_recorded += 1
            self.health.last_event_at = time.time()
            self.signals.fact_recorded.emit()
        if inv.state in (InvoiceState.SETTLED, InvoiceState.CANCELED):
            self._stop_single(payment_hash)
        return ConfirmResult(kind, inv.state)

    # ---- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        self._stop.clear()
        self.health.started = True
        self._tasks = [
            asyncio.create_task(self._global_loop(), name="lnd invoices stream"),
            asyncio.create_task(self._sweep_loop(), name="lnd sweep"),
        ]

    async def stop(self) -> None:
        self._stop.set()
        if self._cursor_timer is not None:
            self._cursor_timer.cancel()
        try:
            await self._save_cursors()
        except Exception as e:  # noqa: BLE001 - best effort: the stream replays from the saved point
            log.warning("saving the invoice cursors at stop failed: %s", type(e).__name__)
        tasks = self._tasks + list(self._singles.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks, self._singles = [], {}
        self.health.started = False

    def watch(self, payment_hash: str) -> None:
        """Follow one hold invoice with SubscribeSingleInvoice (idempotent), within the budget of
        ``max_streams``; beyond it the invoice is left to the sweep, which then runs every
        ``overflow_interval`` seconds (each stream costs memory: about 30 KB in this process)."""
        task = self._singles.get(payment_hash)
        if task is None or task.done():
            if task is None and len(self._singles) >= self.max_streams:
                self._overflow.add(payment_hash)
                self._overflow_added.set()
                self.health.unstreamed = len(self._overflow)
                return
            self._overflow.discard(payment_hash)
            self._singles[payment_hash] = asyncio.create_task(
                self._single_loop(payment_hash), name=f"lnd invoice {payment_hash[:12]}"
            )
        self.health.single_streams = len(self._singles)
        self.health.unstreamed = len(self._overflow)

    def _stop_single(self, payment_hash: str) -> None:
        task = self._singles.pop(payment_hash, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        self.health.single_streams = len(self._singles)

    def _backoff(self, attempt: int) -> float:
        cap = min(self.backoff_max, 0.25 * 2 ** min(attempt, 10))
        return random.uniform(cap / 2, cap)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    # ---- the global stream --------------------------------------------------------
    async def _global_loop(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                await self.lnd.get_info()  # the stream itself says nothing until an invoice changes
                add_index, settle_index = await self._resume_point()
                self.health.connected = True
                self.health.last_error = None
                self.health.backoff_seconds = 0
                attempt = 0
                async for inv in self.lnd.subscribe_invoices(add_index=add_index, settle_index=settle_index):
                    await self._on_stream_update(inv)
            except asyncio.CancelledError:
                raise
            except LndError as e:
                self.health.last_error = f"{type(e).__name__}: {e.detail}"[:300]
            except Exception as e:  # the watcher must survive anything and retry
                log.exception("invoice stream failed")
                self.health.last_error = f"{type(e).__name__}: {e}"[:300]
            self.health.connected = False
            delay = self._backoff(attempt)
            attempt += 1
            self.health.backoff_seconds = round(delay, 2)
            await self._sleep(delay)

    async def _resume_point(self) -> tuple[int, int]:
        async with self.sessions() as s:
            add_index = await cursors.get(s, ADD_CURSOR, default=-1)
            settle_index = await cursors.get(s, SETTLE_CURSOR, default=-1)
        if add_index >= 0 and settle_index >= 0:
            return add_index, settle_index
        return await self._backfill()

    async def _backfill(self) -> tuple[int, int]:
        """First run: read every invoice LND has, confirm ours, and start the cursors at the end."""
        offset, max_add, max_settle = 0, 0, 0
        async with self.sessions() as s:
            mine = set((await s.scalars(select(LnInvoice.payment_hash))).all())
        while True:
            invoices, last = await self.lnd.list_invoices(index_offset=offset, max_invoices=1000)
            for inv in invoices:
                max_add = max(max_add, inv.add_index)
                max_settle = max(max_settle, inv.settle_index)
                if inv.payment_hash.hex() in mine and inv.state != InvoiceState.OPEN:
                    await self.confirm(inv.payment_hash.hex(), "backfill")
            if not invoices or last <= offset:
                break
            offset = last
        async with self.sessions.begin() as s:
            await cursors.advance(s, ADD_CURSOR, max_add)
            await cursors.advance(s, SETTLE_CURSOR, max_settle)
        return max_add, max_settle

    async def _on_stream_update(self, inv: Invoice) -> None:
        self.health.last_event_at = time.time()
        h = inv.payment_hash.hex()
        ours = False
        if inv.state == InvoiceState.SETTLED:
            async with self.sessions() as s:
                ours = await s.scalar(select(LnInvoice.payment_hash).where(LnInvoice.payment_hash == h)) is not None
            if ours:
                await self.confirm(h, "stream")
        # Cursors move after the fact is recorded: a crash in between replays the update.
        self._cursor_add = max(self._cursor_add, inv.add_index or 0)
        self._cursor_settle = max(self._cursor_settle, inv.settle_index or 0)
        if inv.state != InvoiceState.OPEN or time.monotonic() - self._cursors_saved_at >= self.cursor_delay:
            await self._save_cursors()
        elif self._cursor_timer is None or self._cursor_timer.done():
            # A new (open) invoice proves nothing: its cursor may wait a moment and go out with
            # the next ones (replaying an addition after a crash records nothing).
            self._cursor_timer = asyncio.create_task(self._save_cursors_later(), name="lnd invoice cursors")

    async def _save_cursors(self) -> None:
        self._cursors_saved_at = time.monotonic()
        add, settle = self._cursor_add, self._cursor_settle
        if add <= self._cursor_saved[0] and settle <= self._cursor_saved[1]:
            return
        async with self.sessions.begin() as s:
            if add:
                await cursors.advance(s, ADD_CURSOR, add)
            if settle:
                await cursors.advance(s, SETTLE_CURSOR, settle)
        self._cursor_saved = (max(add, self._cursor_saved[0]), max(settle, self._cursor_saved[1]))

    async def _save_cursors_later(self) -> None:
        await asyncio.sleep(self.cursor_delay)
        try:
            await self._save_cursors()
        except Exception as e:  # noqa: BLE001 - the next update or start-up saves them
            log.warning("saving the invoice cursors failed: %s", type(e).__name__)

    # ---- single-invoice streams ------------------------------------------------------
    async def _single_loop(self, payment_hash: str) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                async for inv in self.lnd.subscribe_single_invoice(bytes.fromhex(payment_hash)):
                    attempt = 0
                    if inv.state != InvoiceState.OPEN:
                        result = await self.confirm(payment_hash, "single")
                        if result.lnd_state in (InvoiceState.SETTLED, InvoiceState.CANCELED):
                            return
            except asyncio.CancelledError:
                raise
            except LndNotFound:
                await self.confirm(payment_hash, "single")
                return
            except Exception as e:  # noqa: BLE001 - resubscribe after a backoff
                self.health.last_error = f"single {payment_hash[:12]}: {type(e).__name__}"[:300]
            await self._sleep(self._backoff(attempt))
            attempt += 1

    # ---- sweep -------------------------------------------------------------------
    async def sweep(self) -> int:
        """Compare every open or accepted invoice of ours with LND and confirm those that moved;
        re-follow hold invoices. Returns the facts recorded.

        LND's pending invoices are listed a page of 1,000 at a time (``pending_only``, from the
        oldest of ours), so a sweep over thousands of open escrows costs a few calls; only an
        invoice whose state differs, or which is no longer pending, is looked up and recorded.
        """
        async with self.sessions() as s:
            rows = (
                await s.execute(
                    select(LnInvoice.payment_hash, LnInvoice.state, LnInvoice.mode, LnInvoice.add_index).where(
                        LnInvoice.state.in_(("open", "accepted"))
                    )
                )
            ).all()
        if not rows:
            self._overflow.clear()
            return 0
        ours = {r.payment_hash: r.state for r in rows}
        pending: dict[str, str] = {}
        offset = max(0, min(r.add_index or 0 for r in rows) - 1)
        while True:
            page, last = await self.lnd.list_invoices(index_offset=offset, max_invoices=1000, pending_only=True)
            for inv in page:
                h = inv.payment_hash.hex()
                if h in ours:
                    pending[h] = "accepted" if inv.state == InvoiceState.ACCEPTED else "open"
            if not page or last <= offset:
                break
            offset = last
        recorded = 0
        for h, state in ours.items():
            if pending.get(h) != state:  # accepted now, or no longer pending (settled, canceled, gone)
                result = await self.confirm(h, "sweep")
                recorded += result.kind is not None
        self._overflow &= set(pending)
        for r in rows:
            if r.mode == "hold" and r.payment_hash in pending:
                self.watch(r.payment_hash)
        self.health.unstreamed = len(self._overflow)
        return recorded

    async def prune_canceled(self, *, now: datetime | None = None) -> int:
        """Delete from LND (``DeleteCanceledInvoice``) our hold invoices that were canceled more than
        ``canceled_retention`` seconds ago; our rows and facts stay. Oldest first, from a cursor, at
        most PRUNE_BATCH per call; returns how many LND deleted. Nothing when the retention is 0."""
        if self.canceled_retention <= 0:
            return 0
        until = (now or utcnow()) - timedelta(seconds=self.canceled_retention)
        async with self.sessions() as s:
            since = await cursors.get(s, PRUNE_CURSOR)
            rows = (
                await s.execute(
                    select(LnInvoice.payment_hash, LnInvoice.updated_at)
                    .where(
                        LnInvoice.mode == "hold",
                        LnInvoice.state == "canceled",  # recorded from LND's CANCELED, never changed after
                        # >=: the last one of the previous pass again (LND: not found), so a tie is never skipped
                        LnInvoice.updated_at >= _EPOCH + timedelta(microseconds=since),
                        LnInvoice.updated_at <= until,
                    )
                    .order_by(LnInvoice.updated_at)
                    .limit(PRUNE_BATCH)
                )
            ).all()
        deleted, position = 0, since
        try:
            for r in rows:
                try:
                    await self.lnd.delete_canceled_invoice(bytes.fromhex(r.payment_hash))
                    deleted += 1
                except LndNotFound:
                    pass  # gone already (an earlier pass, or by hand)
                except InvoiceStateError as e:  # LND's state is not canceled: it keeps the invoice
                    log.warning("invoice %s: recorded canceled, LND refuses to delete it: %s", r.payment_hash, e.detail)
                position = (aware(r.updated_at) - _EPOCH) // timedelta(microseconds=1)
        finally:
            if position > since:  # what was done stays done when LND stops answering mid-batch
                async with self.sessions.begin() as s:
                    await cursors.advance(s, PRUNE_CURSOR, position)
        if deleted:
            log.info("deleted %d canceled hold invoice(s) from LND", deleted)
        return deleted

    async def _sweep_loop(self) -> None:
        attempt = 0
        while not self._stop.is_set():
            try:
                await self.sweep()
                try:
                    await self.prune_canceled()
                except LndError as e:  # housekeeping: the next sweep goes on from the cursor
                    log.info("pruning canceled invoices: %s", e)
                attempt = 0
                # hold invoices without a stream of their own are found by the sweep: sooner
                # (and an invoice going over the budget cuts the long wait short)
                self._overflow_added.clear()
                wait = min(self.sweep_interval, self.overflow_interval) if self._overflow else self.sweep_interval
                try:
                    await asyncio.wait_for(self._overflow_added.wait(), wait)
                    await self._sleep(self.overflow_interval)  # woken: let a few gather first
                except TimeoutError:
                    pass
            except asyncio.CancelledError:
                raise
            except LndError as e:
                self.health.last_error = f"sweep: {type(e).__name__}: {e.detail}"[:300]
                await self._sleep(self._backoff(attempt))
                attempt += 1
            except Exception:
                log.exception("sweep failed")
                await self._sleep(self._backoff(attempt))
                attempt += 1
