"""Drives the engine: feeds it pending facts and timers, and carries out its effects.

``EngineRunner.step()`` processes, once, everything that is pending: inbox events,
unconsumed LN facts, payout outcomes not yet seen, and due timers; each item in its own
transaction. ``EffectRunner`` performs effects (create the escrow invoice, settle or
cancel a hold invoice) against LND and reports back. Both are safe to run in several
replicas at once: every claim is a compare-and-set.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import timedelta

from sqlalchemy import and_, exists, literal, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.escrow.engine import Engine
from service.escrow.models import Consumed, Effect, Job, JobState
from service.lightning.errors import InvoiceStateError, LndError
from service.lightning.invoices import EscrowInvoices
from service.lightning.models import LnFact, LnInvoice, Payout
from service.lightning.settlement import SettlementWatcher
from service.nostr.inbox import Inbox
from service.db import utcnow

log = logging.getLogger(__name__)

TIMED_STATES = (JobState.OFFERED.value, JobState.COLLECTING.value, JobState.VALIDATING.value)


class EngineRunner:
    def __init__(self, engine: Engine, inbox: Inbox) -> None:
        self.engine = engine
        self.inbox = inbox
        self.sessions: async_sessionmaker[AsyncSession] = engine.sessions

    async def step(self) -> int:
        n = await self.inbox.process_pending(self.engine.handle_event, limit=200)
        n += await self._ln_facts()
        n += await self._payouts()
        n += await self._timers()
        return n

    async def _ln_facts(self) -> int:
        async with self.sessions() as s:
            facts = (await s.scalars(select(LnFact).where(LnFact.consumed_at.is_(None)).order_by(LnFact.seq)
                                     .limit(200))).all()
        done = 0
        for fact in facts:
            async with self.sessions.begin() as s:
                outcome = await self.engine.handle_ln_fact(s, fact)
            done += outcome != "already consumed"
        return done

    async def _payouts(self) -> int:
        ref = Payout.id + literal(":") + Payout.state + literal(":") + Payout.attempts.cast(Consumed.ref.type)
        seen = exists().where(and_(Consumed.source == "payout", Consumed.ref == ref))
        async with self.sessions() as s:
            rows = (await s.scalars(select(Payout).where(Payout.state.in_(("succeeded", "needs_invoice")),
                                                         Payout.job_id.is_not(None), ~seen).limit(200))).all()
        done = 0
        for p in rows:
            async with self.sessions.begin() as s:
                outcome = await self.engine.handle_payout(s, p)
            done += outcome != "already consumed"
        return done

    async def _timers(self) -> int:
        async with self.sessions() as s:
            jobs = (await s.scalars(select(Job).where(Job.state.in_(TIMED_STATES)))).all()
        done = 0
        for job in jobs:
            if self.engine.due_timer(job) is None:   # checked here first: no transaction per idle job
                continue
            async with self.sessions.begin() as s:
                fresh = await s.get(Job, job.id)
                if fresh is not None and fresh.version == job.version and await self.engine.on_timers(s, fresh):
                    done += 1
        return done


class EffectRunner:
    def __init__(self, engine: Engine, invoices: EscrowInvoices, watcher: SettlementWatcher, *,
                 max_attempts: int = 10, lease_seconds: float = 120.0) -> None:
        self.engine = engine
        self.invoices = invoices
        self.watcher = watcher
        self.lnd = watcher.lnd
        self.sessions = engine.sessions
        self.max_attempts = max_attempts
        self.lease_seconds = lease_seconds

    async def run_once(self) -> int:
        now = utcnow()
        async with self.sessions() as s:
            due = (await s.scalars(select(Effect).where(Effect.state.in_(("pending", "running")),
                                                        Effect.next_attempt_at <= now).limit(50))).all()
        done = 0
        for eff in due:
            async with self.sessions.begin() as s:   # claim: a lease, by compare-and-set
                claimed = await s.execute(update(Effect).where(Effect.id == eff.id, Effect.state == eff.state,
                                                               Effect.attempts == eff.attempts)
                                          .values(state="running", attempts=Effect.attempts + 1,
                                                  next_attempt_at=now + timedelta(seconds=self.lease_seconds)))
            if claimed.rowcount != 1:
                continue
            try:
                await self._perform(eff)
            except (LndError, DBAPIError, OSError) as e:
                await self._failed(eff, f"{type(e).__name__}: {e}"[:300])
                continue
            done += 1
        return done

    async def _failed(self, eff: Effect, error: str) -> None:
        attempts = eff.attempts + 1
        state = "failed" if attempts >= self.max_attempts else "pending"
        delay = min(300, 2 ** attempts)
        async with self.sessions.begin() as s:
            await s.execute(update(Effect).where(Effect.id == eff.id)
                            .values(state=state, last_error=error, next_attempt_at=utcnow() + timedelta(seconds=delay)))
            await self.engine.timeline(s, eff.job_id, "effect", {"kind": eff.kind, "state": state, "error": error})
        log.warning("effect %s for job %s: %s (%s)", eff.kind, eff.job_id, error, state)

    async def _done(self, s: AsyncSession, eff: Effect) -> None:
        await s.execute(update(Effect).where(Effect.id == eff.id).values(state="done", last_error=None))

    async def _perform(self, eff: Effect) -> None:
        async with self.sessions() as s:
            job = await s.get(Job, eff.job_id)
            existing = (await s.scalars(select(LnInvoice).where(LnInvoice.job_id == eff.job_id)
                                        .order_by(LnInvoice.created_at))).first()
        if eff.kind == "create_invoice":
            if existing is None:   # a retry after a crash reuses the invoice already made
                hold_seconds = max(0, job.validation_deadline - self.engine.now()) + self.engine.config.release_margin_seconds
                issued = await self.invoices.create(None, job_id=job.id, amount_msat=job.bid_msat, mode=job.mode,
                                                    hold_seconds=hold_seconds, on_deadline="settle",
                                                    memo=f"fedstr escrow for job {job.id[:16]}")
                h, pr, mode = issued.payment_hash, issued.payment_request, issued.mode
            else:
                h, pr, mode = existing.payment_hash, existing.payment_request, existing.mode
            if mode == "hold":
                self.watcher.watch(h)
            async with self.sessions.begin() as s:
                await self.engine.on_invoice_created(s, job.id, h, pr, mode, job.bid_msat)
                await self._done(s, eff)
        elif eff.kind in ("settle_hold", "cancel_invoice"):
            if existing is None:
                async with self.sessions.begin() as s:
                    await self._done(s, eff)
                return
            try:
                if eff.kind == "settle_hold":
                    await self.lnd.settle_invoice(bytes.fromhex(existing.preimage))
                else:
                    await self.lnd.cancel_invoice(bytes.fromhex(existing.payment_hash))
            except InvoiceStateError:
                pass   # already in a final state: the lookup records what it is
            await self.watcher.confirm(existing.payment_hash, f"effect:{eff.kind}")
            async with self.sessions.begin() as s:
                await self._done(s, eff)
        else:
            raise ValueError(f"unknown effect {eff.kind}")


class EscrowLoop:
    """Runs the engine runner, the effect runner and the payout worker until stopped."""

    def __init__(self, runner: EngineRunner, effects: EffectRunner | None, interval: float = 0.2) -> None:
        self.runner = runner
        self.effects = effects
        self.interval = interval
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.wake = asyncio.Event()

    async def start(self) -> None:
        self._stop.clear()
        self._task = asyncio.create_task(self._run(), name="escrow engine")

    async def stop(self) -> None:
        self._stop.set()
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                n = await self.runner.step()
                if self.effects is not None:
                    n += await self.effects.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the engine loop never dies; facts stay pending
                log.exception("engine step failed")
                n = 0
            if n == 0:
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), max(0.0, self.interval - (time.monotonic() - t0)))
