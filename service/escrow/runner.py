"""Drives the engine: feeds it pending facts and timers, and carries out its effects.

``EngineRunner.step()`` processes, once, everything that is pending: inbox events,
unconsumed LN facts, payout outcomes not yet seen, and due timers; each item in its own
transaction. ``EffectRunner`` performs effects (create the escrow invoice, settle or
cancel a hold invoice) against LND and reports back. Both are safe to run in several
replicas at once: every claim is a compare-and-set.

One item's failure never blocks another (``service/quarantine.py``): an item that raises
is rolled back, recorded under its ``(source, ref)``, retried with backoff and, after
``RetryPolicy.after`` failures, quarantined until an operator replays it. The scans skip
such items in SQL, so the items behind them are reached in the same pass. A database
outage is raised instead: the loop backs off as a whole and no item is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import timedelta

from sqlalchemy import String, and_, case, cast, exists, func, literal, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.sql.elements import ColumnElement

from service.db import rowcount, table_of
from service.escrow.engine import Engine, appeal_of, payout_ref
from service.escrow.models import Consumed, Effect, Job, JobState
from service.lightning.errors import InvoiceStateError
from service.lightning.invoices import EscrowInvoices
from service.lightning.models import InvoicePurpose, LnFact, LnInvoice
from service.lightning.settlement import SettlementWatcher
from service.nostr.inbox import Inbox
from service.payouts.models import Payout
from service.payouts.types import PayoutState
from service.quarantine import LoopBackoff, Quarantine, RetryPolicy, Verdict, is_outage
from service.signals import Signals

log = logging.getLogger(__name__)

# The one deadline each timed state waits for: a timer item is (job id, deadline).
DEADLINE_OF_STATE = {
    JobState.OFFERED.value: "offer_expiry",
    JobState.COLLECTING.value: "results_deadline",
    JobState.VALIDATING.value: "validation_deadline",
    JobState.FALLBACK.value: "fallback_deadline",
    JobState.APPEALABLE.value: "appeal_deadline",
    JobState.APPEAL.value: "appeal_round_deadline",
}


def timer_ref(job_id: str, state: str) -> str:
    return f"{job_id}:{DEADLINE_OF_STATE.get(state, state)}"


def _timer_ref_sql() -> ColumnElement[str]:
    """timer_ref() in SQL, for the scan's skip of items in backoff or quarantine."""
    return (
        Job.id
        + literal(":")
        + case(*((Job.state == st, literal(name)) for st, name in DEADLINE_OF_STATE.items()), else_=Job.state)
    )


def _payout_ref_sql() -> ColumnElement[str]:
    """engine.payout_ref() in SQL: the key of a payout outcome the engine consumes once."""
    return (
        Payout.id
        + literal(":")
        + Payout.state
        + literal(":")
        + Payout.attempts.cast(Consumed.ref.type)
        + case(
            (Payout.needs_invoice_count > 0, literal(":") + Payout.needs_invoice_count.cast(Consumed.ref.type)),
            else_=literal(""),
        )
        + case(
            (Payout.claim_round > 0, literal(":r") + Payout.claim_round.cast(Consumed.ref.type)),
            else_=literal(""),
        )
    )


class EngineRunner:
    def __init__(self, engine: Engine, inbox: Inbox, quarantine: Quarantine | None = None) -> None:
        self.engine = engine
        self.inbox = inbox
        self.sessions: async_sessionmaker[AsyncSession] = engine.sessions
        self.quarantine = quarantine or inbox.quarantine

    async def step(self, *, facts: bool = True, payouts: bool = True, timers: bool = True) -> int:
        """Process what is pending: inbox events always; LN facts, payout outcomes and due
        timers unless told to skip them this time (the loop scans those on a schedule).
        Returns how many items it finished (processed, or quarantined)."""
        n = await self.inbox.process_pending(self.engine.handle_event, limit=200)
        if facts:
            n += await self._ln_facts()
        if payouts:
            n += await self._payouts()
        if timers:
            n += await self._timers()
            n += await self._claims()
        return n

    async def _ln_facts(self) -> int:
        q = self.quarantine
        ref = cast(LnFact.seq, String)
        async with self.sessions() as s:
            rows = (
                await s.execute(
                    select(LnFact, LnInvoice.job_id, q.failing("ln_fact", ref))
                    .outerjoin(LnInvoice, LnInvoice.payment_hash == LnFact.payment_hash)
                    .where(LnFact.consumed_at.is_(None), q.due("ln_fact", ref))
                    .order_by(LnFact.seq)
                    .limit(200)
                )
            ).all()
        done = 0
        for fact, job_id, failing in rows:

            async def work(s: AsyncSession, fact: LnFact = fact) -> str:
                return await self.engine.handle_ln_fact(s, fact)

            attempt = await q.attempt("ln_fact", str(fact.seq), work, failing=bool(failing), job_id=job_id)
            done += attempt.value != "already consumed" if attempt.ok else attempt.finished
        return done

    async def _payouts(self) -> int:
        q = self.quarantine
        ref = _payout_ref_sql()
        seen = exists().where(and_(Consumed.source == "payout", Consumed.ref == ref))
        async with self.sessions() as s:
            rows = (
                await s.execute(
                    select(Payout, q.failing("payout_outcome", ref))
                    .where(
                        Payout.state.in_(("succeeded", "needs_invoice", "expired")),
                        Payout.job_id.is_not(None),
                        ~seen,
                        q.due("payout_outcome", ref),
                    )
                    .limit(200)
                )
            ).all()
        done = 0
        for p, failing in rows:

            async def work(s: AsyncSession, p: Payout = p) -> str:
                return await self.engine.handle_payout(s, p)

            attempt = await q.attempt("payout_outcome", payout_ref(p), work, failing=bool(failing), job_id=p.job_id)
            done += attempt.value != "already consumed" if attempt.ok else attempt.finished
        return done

    async def _timers(self) -> int:
        now, cfg, q = self.engine.now(), self.engine.config, self.quarantine
        # Only jobs whose deadline may have passed (a superset of what due_timer accepts):
        # open jobs by the thousand must not be loaded on every scan.
        maybe_due = or_(
            and_(
                Job.state == JobState.OFFERED.value,
                Job.offer_expires_at.is_not(None),
                Job.offer_expires_at <= now - cfg.offer_grace_seconds,
            ),
            and_(
                Job.state == JobState.COLLECTING.value,
                func.coalesce(Job.results_extended_to, Job.results_deadline) <= now - cfg.results_grace_seconds,
            ),
            and_(
                Job.state == JobState.VALIDATING.value,
                func.coalesce(Job.validation_extended_to, Job.validation_deadline) <= now,
            ),
            and_(Job.state == JobState.FALLBACK.value, Job.fallback_deadline <= now),
            and_(Job.state == JobState.APPEALABLE.value, Job.appeal_deadline <= now),
            and_(Job.state == JobState.APPEAL.value, Job.appeal_round_deadline <= now),
        )
        ref = _timer_ref_sql()
        async with self.sessions() as s:
            rows = (
                await s.execute(select(Job, q.failing("timer", ref)).where(maybe_due, q.due("timer", ref)).limit(500))
            ).all()
        done = 0
        for job, failing in rows:
            if self.engine.due_timer(job) is None:  # checked here first: no transaction per idle job
                continue

            async def work(s: AsyncSession, job: Job = job) -> bool:
                fresh = await s.get(Job, job.id)
                return bool(
                    fresh is not None and fresh.version == job.version and await self.engine.on_timers(s, fresh)
                )

            attempt = await q.attempt("timer", timer_ref(job.id, job.state), work, failing=bool(failing), job_id=job.id)
            done += bool(attempt.value) if attempt.ok else attempt.finished
        return done

    async def _claims(self) -> int:
        """Claim windows (docs/escrow.md, "Claim window"): payouts still waiting for an invoice at
        their claim_by expire, and those whose reminder is due are reminded, each payout in its own
        transaction (a timer item: ``<payout>:claim_expiry`` / ``<payout>:claim_reminder``)."""
        q, now = self.quarantine, self.engine.clock_at()
        waiting = and_(Payout.state == PayoutState.NEEDS_INVOICE, Payout.job_id.is_not(None))
        expiry_ref = Payout.id + literal(":claim_expiry")
        reminder_ref = Payout.id + literal(":claim_reminder")
        reminded = exists().where(
            and_(
                Consumed.source == "claim_reminder",
                Consumed.ref == Payout.id + literal(":") + Payout.claim_round.cast(Consumed.ref.type),
            )
        )
        async with self.sessions() as s:
            ended = (
                await s.execute(
                    select(Payout.id, Payout.job_id, q.failing("timer", expiry_ref))
                    .where(waiting, Payout.claim_by <= now, q.due("timer", expiry_ref))
                    .order_by(Payout.claim_by)
                    .limit(200)
                )
            ).all()
            remind = (
                await s.execute(
                    select(Payout, q.failing("timer", reminder_ref))
                    .where(waiting, Payout.remind_at <= now, Payout.claim_by > now, ~reminded)
                    .where(q.due("timer", reminder_ref))
                    .order_by(Payout.remind_at)
                    .limit(200)
                )
            ).all()
        done = 0
        for pid, job_id, failing in ended:

            async def expire(s: AsyncSession, pid: str = pid) -> str:
                return await self.engine.expire_claim(s, pid)

            attempt = await q.attempt("timer", f"{pid}:claim_expiry", expire, failing=bool(failing), job_id=job_id)
            done += attempt.value != "not expired" if attempt.ok else attempt.finished
        for p, failing in remind:

            async def reminder(s: AsyncSession, p: Payout = p) -> str:
                return await self.engine.remind_claim(s, p)

            attempt = await q.attempt(
                "timer", f"{p.id}:claim_reminder", reminder, failing=bool(failing), job_id=p.job_id
            )
            done += attempt.value != "already reminded" if attempt.ok else attempt.finished
        return done


class EffectRunner:
    """Performs effects. A failing effect (LND refusing or unreachable counts: an effect *is* an
    LND call) is retried with backoff, 2 s doubling to 5 min, then quarantined after
    ``max_attempts`` (about 18 minutes of LND away): a quarantined create_invoice cancels its
    job and tells the customer (``Engine.on_invoice_failed``); a quarantined settle_hold or
    cancel_invoice waits, listed for the operator, until replayed."""

    def __init__(
        self,
        engine: Engine,
        invoices: EscrowInvoices,
        watcher: SettlementWatcher,
        *,
        max_attempts: int = 10,
        lease_seconds: float = 120.0,
        concurrency: int = 32,
        quarantine: Quarantine | None = None,
        signals: Signals | None = None,
    ) -> None:
        self.engine = engine
        self.invoices = invoices
        self.watcher = watcher
        self.lnd = watcher.lnd
        self.sessions = engine.sessions
        self.max_attempts = max_attempts
        self.lease_seconds = lease_seconds
        self.concurrency = concurrency
        self.quarantine = quarantine or Quarantine(self.sessions)
        # Effects' own budget in the shared quarantine (unless the service set one): LND may be
        # away for a restart, and a create_invoice given up on cancels its job.
        self.quarantine.policies.setdefault(
            "effect", RetryPolicy(after=max_attempts, base_seconds=2.0, max_seconds=300.0)
        )
        self.signals = signals or Signals()  # offer_made(job id) once its offer invoice is committed

    async def run_once(self) -> int:
        """Claim due effects and perform them: jobs concurrently, one job's effects in order.

        Returns how many it finished (done, or quarantined). A database outage met by any of
        them is raised once every job's task has ended (the loop backs off)."""
        now = self.quarantine.now()
        ref = cast(Effect.id, String)
        async with self.sessions() as s:
            due = (
                await s.execute(
                    select(Effect, self.quarantine.failing("effect", ref))
                    .where(Effect.state.in_(("pending", "running")), Effect.next_attempt_at <= now)
                    .order_by(Effect.id)
                    .limit(4 * self.concurrency)
                )
            ).all()
        if not due:
            return 0
        claimed: dict[str, list[Effect]] = {}
        failing = {eff.id for eff, was_failing in due if was_failing}
        async with self.sessions.begin() as s:  # claim: a lease, by compare-and-set, one transaction
            t = table_of(Effect)
            for eff, _ in due:
                res = await s.execute(
                    update(t)
                    .where(t.c.id == eff.id, t.c.state == eff.state, t.c.attempts == eff.attempts)
                    .values(
                        state="running",
                        attempts=t.c.attempts + 1,
                        next_attempt_at=now + timedelta(seconds=self.lease_seconds),
                    )
                )
                if rowcount(res) == 1:
                    claimed.setdefault(eff.job_id, []).append(eff)
        gate = asyncio.Semaphore(self.concurrency)
        outages: list[BaseException] = []

        async def job_effects(effects: list[Effect]) -> int:
            async with gate:
                for k, eff in enumerate(effects):
                    try:
                        await self._perform(eff, eff.id in failing)
                    except Exception as e:  # noqa: BLE001 - one effect's failure never stops the others
                        if is_outage(e):
                            outages.append(e)
                            for later in effects[k:]:  # not its fault: given back, not counted
                                await self._release(later)
                            return k
                        quarantined = await self._failed(eff, e)
                        for later in effects[k + 1 :]:  # keep the order: retried after this one
                            await self._release(later)
                        return k + quarantined
                return len(effects)

        done = sum(await asyncio.gather(*(job_effects(effs) for effs in claimed.values())))
        if outages:
            raise outages[0]
        return done

    async def _release(self, eff: Effect) -> None:
        """Give back a claimed effect unperformed (its job's earlier effect failed, or the database is away)."""
        with contextlib.suppress(Exception):  # the database may be what failed: the lease then runs out
            async with self.sessions.begin() as s:
                await s.execute(
                    update(Effect)
                    .where(Effect.id == eff.id, Effect.state == "running")
                    .values(
                        state="pending",
                        attempts=Effect.attempts - 1,
                        next_attempt_at=self.quarantine.now() + timedelta(seconds=1),
                    )
                )

    async def _failed(self, eff: Effect, exc: BaseException) -> bool:
        """Record the effect's failure: back to pending after the backoff, or quarantined."""

        async def on_failure(s: AsyncSession, v: Verdict) -> None:
            state = "quarantined" if v.quarantined else "pending"
            await s.execute(
                update(Effect)
                .where(Effect.id == eff.id, Effect.state == "running")
                .values(state=state, last_error=v.error, next_attempt_at=v.retry_at)
                .execution_options(synchronize_session=False)
            )
            await self.engine.timeline(
                s, eff.job_id, "effect", {"kind": eff.kind, "state": state, "error": v.error, "failures": v.failures}
            )
            if v.quarantined and eff.kind == "create_invoice":
                await self.engine.on_invoice_failed(s, eff.job_id, v.error)

        verdict = await self.quarantine.failed("effect", str(eff.id), exc, job_id=eff.job_id, on_failure=on_failure)
        return verdict.quarantined

    async def _done(self, s: AsyncSession, eff: Effect, failing: bool) -> None:
        t = table_of(Effect)
        await s.execute(update(t).where(t.c.id == eff.id).values(state="done", last_error=None))
        if failing:
            await self.quarantine.clear(s, "effect", str(eff.id))

    async def _perform(self, eff: Effect, failing: bool = False) -> None:
        async with self.sessions() as s:
            job = await s.get(Job, eff.job_id)
            existing = (
                await s.scalars(
                    select(LnInvoice)
                    .where(LnInvoice.job_id == eff.job_id, LnInvoice.purpose == InvoicePurpose.JOB)
                    .order_by(LnInvoice.created_at)
                )
            ).first()
        if eff.kind == "appeal_invoice":
            await self._appeal_invoice(eff, job, failing)
        elif eff.kind == "create_invoice":
            if job is None or (existing is None and job.state is not JobState.REQUESTED):
                # Cancelled meanwhile (deleted, or this effect was quarantined and is replayed):
                # an invoice now would be one nobody may pay.
                async with self.sessions.begin() as s:
                    await self._done(s, eff, failing)
                return
            if existing is None:  # a retry after a crash reuses the invoice already made
                assert job.mode is not None, "a requested job has its mode (decided at intake)"
                hold_seconds = (
                    max(0, job.validation_deadline - self.engine.now()) + self.engine.config.release_margin_seconds
                )
                now = self.engine.now()
                issued = await self.invoices.create(
                    None,
                    job_id=job.id,
                    amount_msat=job.bid_msat,
                    mode=job.mode.value,
                    hold_seconds=hold_seconds,
                    on_deadline="settle",
                    memo=f"fedstr escrow for job {job.id[:16]}",
                    expiry_seconds=self.engine.offer_deadline(job, now) - now,
                )
                h, pr, mode = issued.payment_hash, issued.payment_request, issued.mode
            else:
                h, pr, mode = existing.payment_hash, existing.payment_request, existing.mode
            if mode == "hold":
                self.watcher.watch(h)
            async with self.sessions.begin() as s:
                await self.engine.on_invoice_created(s, job.id, h, pr, mode, job.bid_msat, customer=job.customer)
                await self._done(s, eff, failing)
            self.signals.offer_made.emit(job.id)
        elif eff.kind in ("settle_hold", "cancel_invoice"):
            if existing is None:
                async with self.sessions.begin() as s:
                    await self._done(s, eff, failing)
                return
            try:
                if eff.kind == "settle_hold":
                    if existing.preimage is None:
                        raise ValueError(f"invoice {existing.payment_hash} has no preimage: not a hold invoice")
                    await self.lnd.settle_invoice(bytes.fromhex(existing.preimage))
                else:
                    await self.lnd.cancel_invoice(bytes.fromhex(existing.payment_hash))
            except InvoiceStateError:
                pass  # already in a final state: the lookup records what it is
            await self.watcher.confirm(existing.payment_hash, f"effect:{eff.kind}")
            async with self.sessions.begin() as s:
                await self._done(s, eff, failing)
        else:
            raise ValueError(f"unknown effect {eff.kind}")

    async def _appeal_invoice(self, eff: Effect, job: Job | None, failing: bool) -> None:
        """The appeal fee's plain invoice, expiring at the appeal deadline; a retry after a crash reuses
        the one recorded (one appeal per job, so one fee invoice)."""
        async with self.sessions() as s:
            existing = (
                await s.scalars(
                    select(LnInvoice).where(
                        LnInvoice.job_id == eff.job_id, LnInvoice.purpose == InvoicePurpose.APPEAL_FEE
                    )
                )
            ).first()
        appeal = appeal_of(job.appeal, job.appeal_round_deadline) if job is not None else None
        now = self.engine.now()
        if existing is None:
            if (
                job is None
                or appeal is None
                or job.state is not JobState.APPEALABLE
                or job.appeal_deadline is None
                or job.appeal_deadline <= now
            ):
                async with self.sessions.begin() as s:  # the window closed meanwhile: nobody may pay it
                    await self._done(s, eff, failing)
                return
            issued = await self.invoices.create(
                None,
                job_id=job.id,
                amount_msat=appeal.fee_msat,
                mode="custodial",
                memo=f"fedstr appeal fee for job {job.id[:16]}",
                expiry_seconds=job.appeal_deadline - now,
                purpose=InvoicePurpose.APPEAL_FEE.value,
            )
            h, pr, amount = issued.payment_hash, issued.payment_request, appeal.fee_msat
        else:
            h, pr, amount = existing.payment_hash, existing.payment_request, existing.amount_msat
        async with self.sessions.begin() as s:
            await self.engine.on_appeal_invoice_created(s, eff.job_id, h, pr, amount)
            await self._done(s, eff, failing)


class EscrowLoop:
    """Runs the engine runner and the effect runner, each in its own task, until stopped.

    The engine's decisions (database only) and the effects (LND calls) overlap: each
    wakes the other when it did work, and ``signals.progress`` (the publisher's and the
    payout worker's wake) is emitted whenever anything was done, so the outbox goes out
    without a poll delay.

    Inbox events are processed at every step. LN facts and payout outcomes are scanned
    when the watcher or the payout worker says there is something new
    (``signals.fact_recorded``/``signals.payout_changed``), and otherwise every ``scan_interval`` (facts
    recorded by another replica's watcher are found that way); deadlines every
    ``timer_interval``. Under load, steps are at least ``min_spacing`` apart, so one step
    takes a batch of arrivals instead of paying its fixed queries per event.
    """

    timer_interval = 0.5  # deadlines have one-second resolution
    scan_interval = 0.25
    min_spacing = 0.005

    def __init__(
        self, runner: EngineRunner, effects: EffectRunner | None, interval: float = 0.2, signals: Signals | None = None
    ) -> None:
        self.runner = runner
        self.effects = effects
        self.interval = interval
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.wake = asyncio.Event()
        self.wake_effects = asyncio.Event()
        self.signals = signals or Signals()  # emits progress; fact_recorded/payout_changed wake it
        self.signals.fact_recorded.connect(self.notify_fact)
        self.signals.payout_changed.connect(self.notify_payout)
        self.signals.event_stored.connect(self.wake.set)
        self._timers_at = self._scan_at = float("-inf")
        self._facts_due = self._payouts_due = False

    @property
    def running(self) -> bool:
        """Every task of the loop is alive (none has died or been stopped)."""
        return bool(self._tasks) and not any(t.done() for t in self._tasks)

    def notify_fact(self, *_args: object) -> None:
        self._facts_due = True
        self.wake.set()

    def notify_payout(self, *_args: object) -> None:
        self._payouts_due = True
        self.wake.set()

    def notify_replay(self, source: str) -> None:
        """An operator replayed a quarantined item of ``source``: scan for it at the next step."""
        if source == "effect":
            self.wake_effects.set()
            return
        if source == "timer":
            self._timers_at = float("-inf")
        elif source == "ln_fact":
            self._facts_due = True
        elif source == "payout_outcome":
            self._payouts_due = True
        self.wake.set()

    async def start(self) -> None:
        self._stop.clear()
        self._tasks = [asyncio.create_task(self._run(self._engine_step, self.wake), name="escrow engine")]
        if self.effects is not None:
            self._tasks.append(
                asyncio.create_task(self._run(self._effects_step, self.wake_effects), name="escrow effects")
            )

    async def stop(self) -> None:
        self._stop.set()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []

    async def _engine_step(self) -> int:
        now = time.monotonic()
        timers = now - self._timers_at >= self.timer_interval
        scan = now - self._scan_at >= self.scan_interval
        if timers:
            self._timers_at = now
        if scan:
            self._scan_at = now
        facts, payouts = scan or self._facts_due, scan or self._payouts_due
        self._facts_due = self._payouts_due = False
        n = await self.runner.step(facts=facts, payouts=payouts, timers=timers)
        if n:
            self.wake_effects.set()
        return n

    async def _effects_step(self) -> int:
        assert self.effects is not None, "started only with an effect runner"
        n = await self.effects.run_once()
        if n:
            self.wake.set()
        return n

    def _progress(self) -> None:
        self.signals.progress.emit()  # a subscriber that fails is logged by the signal, never stops the engine

    async def _run(self, step, wake: asyncio.Event) -> None:
        backoff = LoopBackoff(f"escrow loop ({step.__name__.strip('_')})", base=self.interval)
        while not self._stop.is_set():
            t0 = time.monotonic()
            wake.clear()
            try:
                n = await step()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the loop never dies; facts stay pending
                # Items isolate their own failures: what reaches here is the database (or a scan)
                # failing for everyone. Back off as a whole, doubling; a wake still cuts it short.
                pause = backoff.failed(e)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), max(0.0, pause - (time.monotonic() - t0)))
                continue
            backoff.ok()
            if n:
                self._progress()
                await asyncio.sleep(max(0.0, self.min_spacing - (time.monotonic() - t0)))
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), max(0.0, self.interval - (time.monotonic() - t0)))
