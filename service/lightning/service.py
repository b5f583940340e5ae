"""The running Lightning layer: settlement watcher, deadline guard and payout worker."""
from __future__ import annotations

import asyncio
import contextlib
import logging

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.config import Settings
from service.lightning.client import LndClient
from service.lightning.errors import LndError
from service.lightning.guard import guard_once
from service.lightning.invoices import EscrowInvoices, HoldSizing
from service.lightning.payouts import PayoutPolicy, Payouts
from service.lightning.settlement import SettlementWatcher
from service.ledger.reconcile import ReconciliationReport, payouts_paused, reconcile, store_report

log = logging.getLogger(__name__)


class LightningService:
    def __init__(self, lnd: LndClient, sessions: async_sessionmaker[AsyncSession], settings: Settings) -> None:
        self.lnd = lnd
        self.settings = settings
        self.watcher = SettlementWatcher(lnd, sessions, sweep_interval=settings.sweep_interval_seconds)
        self.invoices = EscrowInvoices(lnd, HoldSizing.from_settings(settings),
                                       expiry_seconds=settings.invoice_expiry_seconds, sessions=sessions)
        self.payouts: Payouts | None = None
        self.sessions = sessions
        self._stop = asyncio.Event()
        self._payouts_wake = asyncio.Event()
        self.on_payout_outcome: list = []   # callables taking the Outcome (the engine's wake)
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
        self._leader_tasks = [asyncio.create_task(self._guard_loop(), name="hold deadline guard"),
                              asyncio.create_task(self._reconcile_loop(), name="ledger reconciliation")]

    async def stop_leader(self) -> None:
        for t in self._leader_tasks:
            t.cancel()
        await asyncio.gather(*self._leader_tasks, return_exceptions=True)
        self._leader_tasks = []
        await self.watcher.stop()

    async def start_workers(self) -> None:
        """What every replica runs: the payout worker (claims are compare-and-set)."""
        self._stop.clear()
        self._tasks = [asyncio.create_task(self._payout_loop(), name="payout worker")]

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
                await guard_once(self.watcher, hold_expiry_delta=self.settings.hold_expiry_delta,
                                 margin_blocks=self.settings.guard_margin_blocks)
            except LndError as e:
                log.info("deadline guard skipped a round: %s", e)
            except Exception:  # noqa: BLE001 - keep guarding
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
            except Exception:  # noqa: BLE001
                log.exception("reconciliation failed")
            await self._sleep(self.settings.reconcile_interval_seconds)

    async def _payout_loop(self) -> None:
        reconciled_at = 0.0
        while not self._stop.is_set():
            polled = asyncio.get_running_loop().time()
            try:
                if self.payouts is None:  # needs our node's pubkey, known once LND answers
                    info = await self.lnd.get_info()
                    self.payouts = Payouts(self.lnd, self.sessions, PayoutPolicy.from_settings(self.settings),
                                           our_pubkey=info.pubkey, on_outcome=self._outcome)
                loop = asyncio.get_running_loop()
                if loop.time() - reconciled_at > 60:   # at start-up, then every minute
                    await self.payouts.reconcile()
                    reconciled_at = loop.time()
                async with self.sessions() as s:
                    paused = await payouts_paused(s)
                if paused:
                    self.paused = True   # the ledger disagrees with LND: an operator must look first
                else:
                    self.paused = False
                    self._payouts_wake.clear()
                    if await self.payouts.process_due():
                        continue   # a backlog is worked through without pausing
            except LndError as e:
                log.info("payout worker waiting for LND: %s", e)
            except Exception:  # noqa: BLE001 - keep paying
                log.exception("payout worker failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._payouts_wake.wait(), 2)
            # woken by the engine's progress: at most ten polls a second
            await self._sleep(max(0.0, 0.1 - (asyncio.get_running_loop().time() - polled)))

    async def _outcome(self, outcome) -> None:  # noqa: ANN001
        for callback in self.on_payout_outcome:
            callback(outcome)

    def wake_payouts(self) -> None:
        """Look for due payouts now (called when the engine did work), not at the next poll."""
        self._payouts_wake.set()
