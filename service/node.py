"""The running Lightning side (service/node.py): settlement watcher, deadline guard, payout worker and reconcilers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.config import Settings
from service.lightning.client import LndClient
from service.lightning.errors import LndError
from service.lightning.guard import guard_once
from service.lightning.invoices import EscrowInvoices, HoldSizing
from service.lightning.settlement import SettlementWatcher
from service.payouts.types import PayoutPolicy
from service.payouts.worker import Outcome, Payouts
from service.reconcile import ReconciliationReport, payouts_paused, reconcile, store_report
from service.signals import Signals

log = logging.getLogger(__name__)


@dataclass
class ReconcilerHealth:
    """What the payout reconciler did: passes completed, when the last one ended (unix time)."""

    passes: int = 0
    last_pass_at: float | None = None
    last_error: str | None = None


class LightningService:
    def __init__(
        self,
        lnd: LndClient,
        sessions: async_sessionmaker[AsyncSession],
        settings: Settings,
        signals: Signals | None = None,
    ) -> None:
        self.lnd = lnd
        self.signals = signals or Signals()  # emits fact_recorded (watcher) and payout_changed
        self.settings = settings
        self.watcher = SettlementWatcher(
            lnd,
            sessions,
            sweep_interval=settings.sweep_interval_seconds,
            canceled_retention=settings.canceled_invoice_retention_seconds,
            max_streams=settings.max_invoice_streams,
            overflow_interval=settings.unstreamed_sweep_seconds,
            signals=self.signals,
        )
        self.invoices = EscrowInvoices(
            lnd, HoldSizing.from_settings(settings), expiry_seconds=settings.invoice_expiry_seconds, sessions=sessions
        )
        self.payouts: Payouts | None = None
        self._payouts_made = asyncio.Lock()
        self.payout_reconciler = ReconcilerHealth()
        self.sessions = sessions
        self._stop = asyncio.Event()
        self._payouts_wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._leader_tasks: list[asyncio.Task] = []
        self.paused = False

    async def start(self) -> None:
        """Everything, for a single process."""
        await self.start_leader()
        await self.start_workers()

    async def start_leader(self) -> None:
        """What runs once among replicas: the invoice watcher and the deadline guard."""
        self._stop.clear()
        await self.watcher.start()
        self._leader_tasks = [
            asyncio.create_task(self._guard_loop(), name="hold deadline guard"),
            asyncio.create_task(self._reconcile_loop(), name="ledger reconciliation"),
        ]

    async def stop_leader(self) -> None:
        for t in self._leader_tasks:
            t.cancel()
        await asyncio.gather(*self._leader_tasks, return_exceptions=True)
        self._leader_tasks = []
        await self.watcher.stop()

    async def start_workers(self) -> None:
        """What every replica runs: the payout worker and its reconciler (claims are compare-and-set)."""
        self._stop.clear()
        self._tasks = [
            asyncio.create_task(self._payout_loop(), name="payout worker"),
            asyncio.create_task(self._payout_reconcile_loop(), name="payout reconciler"),
        ]

    async def stop(self) -> None:
        self._stop.set()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self.stop_leader()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _guard_loop(self) -> None:
        while not self._stop.is_set():
            try:
                await guard_once(
                    self.watcher,
                    hold_expiry_delta=self.settings.hold_expiry_delta,
                    margin_blocks=self.settings.guard_margin_blocks,
                )
            except LndError as e:
                log.info("deadline guard skipped a round: %s", e)
            except Exception:  # keep guarding
                log.exception("deadline guard failed")
            await self._sleep(self.settings.guard_interval_seconds)

    async def reconcile_once(self) -> ReconciliationReport | None:
        """One reconciliation; returns the report it stored (None: nothing stored).

        A fact may be on its way between LND and the ledger (a payment succeeded, its posting not
        yet booked by the engine). So a disagreement is stored, which pauses payouts, only when a
        second run 5 s later finds one of the same discrepancies (kind and payment hash) again;
        and an agreeing run is stored as it is (running again to store it could meet a new fact
        in transit, and pause payouts for a whole interval: seen in the replicas drill).
        """
        threshold = self.settings.reconcile_threshold_msat
        async with self.sessions() as s:
            report = await reconcile(s, self.lnd, threshold_msat=threshold, persist=False)
        if not report.ok:
            await self._sleep(5)
            first = {(d.kind, d.payment_hash) for d in report.discrepancies}
            async with self.sessions() as s:
                report = await reconcile(s, self.lnd, threshold_msat=threshold, persist=False)
            if not report.ok and first.isdisjoint((d.kind, d.payment_hash) for d in report.discrepancies):
                log.info("reconciliation: differences in transit only (none seen twice); nothing stored")
                return None
        async with self.sessions.begin() as s:
            await store_report(s, report)
        if not report.ok:
            log.error("RECONCILIATION ALERT: ledger and LND disagree; payouts are paused: %s", report)
        return report

    async def _reconcile_loop(self) -> None:
        """Compare the ledger with LND on a schedule; a disagreement pauses payouts."""
        while not self._stop.is_set():
            try:
                await self.reconcile_once()
            except LndError as e:
                log.info("reconciliation skipped: %s", e)
            except Exception:
                log.exception("reconciliation failed")
            await self._sleep(self.settings.reconcile_interval_seconds)

    async def _payouts(self) -> Payouts:
        """The payout worker's Payouts: made once LND tells us our node's pubkey (it answers)."""
        async with self._payouts_made:
            if self.payouts is None:
                info = await self.lnd.get_info()
                self.payouts = Payouts(
                    self.lnd,
                    self.sessions,
                    PayoutPolicy.from_settings(self.settings),
                    our_pubkey=info.pubkey,
                    on_outcome=self._outcome,
                )
            return self.payouts

    async def _payout_reconcile_loop(self) -> None:
        """Resolve `unknown` payouts and those a dead worker left `sending`: at start-up, then every
        ``payout_reconcile_seconds``. Its own task, so claiming due payouts never waits for it: one
        pass may spend up to its per-payout budget on each payout (a slow node, a held HTLC), and
        a payee that holds our HTLC must not hold up anybody else's payout."""
        while not self._stop.is_set():
            try:
                payouts = await self._payouts()
                async with self.sessions() as s:
                    paused = await payouts_paused(s)
                await payouts.reconcile(allow_send=not paused)
                self.payout_reconciler.passes += 1
                self.payout_reconciler.last_pass_at = time.time()
                self.payout_reconciler.last_error = None
            except LndError as e:
                self.payout_reconciler.last_error = str(e)
                log.info("payout reconciler waiting for LND: %s", e)
            except Exception as e:  # keep reconciling
                self.payout_reconciler.last_error = type(e).__name__
                log.exception("payout reconciler failed")
            await self._sleep(self.settings.payout_reconcile_seconds)

    async def _payout_loop(self) -> None:
        """Keep up to ``payout_concurrency`` payments in flight: a slot freed is refilled at
        once (no batch waits for its slowest payment); idle, it polls every second or when woken.

        At most one payment in flight per payee (its Nostr key) in this process: one payee's held
        payments cannot take every slot. Per process, not per database: with N replicas a payee
        may have N at once; each is followed for one payout timeout at most, then left `unknown`
        to the reconciler, so no payee holds a slot for longer."""
        inflight: dict[asyncio.Task, str] = {}  # task -> its payee
        slot_freed = asyncio.Event()

        def done(task: asyncio.Task) -> None:
            inflight.pop(task, None)
            slot_freed.set()
            if not task.cancelled() and task.exception() is not None:
                log.error("payout failed unexpectedly: %r", task.exception())

        try:
            while not self._stop.is_set():
                polled = asyncio.get_running_loop().time()
                claimed = 0
                try:
                    payouts = await self._payouts()
                    async with self.sessions() as s:
                        paused = await payouts_paused(s)
                    self.paused = paused  # the ledger disagrees with LND: an operator must look first
                    free = self.settings.payout_concurrency - len(inflight)
                    if not paused and free > 0:
                        self._payouts_wake.clear()
                        for c in await payouts.claim_due(free, busy_payees=set(inflight.values())):
                            task = asyncio.create_task(payouts.pay(c.payout_id), name=f"payout {c.payout_id[:24]}")
                            inflight[task] = c.payee
                            task.add_done_callback(done)
                            claimed += 1
                except LndError as e:
                    log.info("payout worker waiting for LND: %s", e)
                except Exception:  # keep paying
                    log.exception("payout worker failed")
                if claimed and len(inflight) < self.settings.payout_concurrency:
                    continue  # maybe more are due: claim until the slots are full or none is left
                slot_freed.clear()
                waits = [asyncio.ensure_future(self._payouts_wake.wait()), asyncio.ensure_future(slot_freed.wait())]
                try:
                    await asyncio.wait(waits, timeout=1, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waits:
                        w.cancel()
                # woken by the engine's progress: at most fifty polls a second
                await self._sleep(max(0.0, 0.02 - (asyncio.get_running_loop().time() - polled)))
        finally:
            for task in list(inflight):
                task.cancel()
            if inflight:
                await asyncio.gather(*inflight, return_exceptions=True)

    async def _outcome(self, outcome: Outcome) -> None:
        self.signals.payout_changed.emit()

    def wake_payouts(self) -> None:
        """Look for due payouts now (called when the engine did work), not at the next poll."""
        self._payouts_wake.set()
