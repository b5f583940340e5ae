"""The running escrow: engine, runners and the announcement, wired to the other layers."""

from __future__ import annotations

import asyncio
import contextlib
import time

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service import __version__
from service.config import Settings
from service.escrow.engine import Engine, EngineConfig, IntakeBudget
from service.escrow.models import Job, JobState
from service.escrow.runner import EffectRunner, EngineRunner, EscrowLoop
from service.lightning.invoices import HoldSizing
from service.lightning.models import InvoicePurpose, LnInvoice
from service.liveness import Heartbeat
from service.node import LightningService
from service.nostr import outbox
from service.nostr.inbox import Inbox
from service.nostr.nip01 import SecretKey, sign_event
from service.nostr.protocol import Announcement, EscrowTerms, Mode, Network, PoolValidator, build_announcement
from service.quarantine import quarantine_from_settings
from service.signals import Signals


def terms_from_settings(s: Settings) -> EscrowTerms:
    return EscrowTerms(
        fee_base_msat=s.fee_base_msat,
        fee_ppm=s.fee_ppm,
        min_bid_msat=s.min_bid_msat,
        max_bid_msat=s.max_bid_msat,
        max_validators=s.max_validators,
        max_shards=s.max_shards,
        min_results_window_s=s.min_results_window_seconds,
        max_job_duration_s=s.max_job_duration_seconds,
        modes=frozenset(Mode(m) for m in s.escrow_modes),
        network=Network.from_settings(s.network),
        max_hold_seconds=s.max_hold_seconds,
        min_payout_msat=s.min_payout_msat,
        max_results_per_shard=s.max_results_per_shard,
        routing_fee_ppm=s.payout_fee_ppm,
        claim_window_s=s.claim_window_seconds,
        appeal_window_s=s.appeal_window_seconds,
        appeal_fee_msat=s.appeal_fee_msat if s.appeal_window_seconds else 0,
    )


def validator_pool_from_settings(s: Settings) -> tuple[PoolValidator, ...]:
    """The validator pool the operator configured (FEDSTR_VALIDATOR_POOL), as announced."""
    return tuple(PoolValidator(pubkey=key, name=name) for name, key in s.validator_pool)


class EscrowService:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        settings: Settings,
        key: SecretKey,
        lightning: LightningService | None,
        signals: Signals | None = None,
    ) -> None:
        self.sessions = sessions
        self.settings = settings
        self.key = key
        self.terms = terms_from_settings(settings)
        self.validator_pool = validator_pool_from_settings(settings)
        self.engine = Engine(
            sessions,
            key,
            EngineConfig(
                terms=self.terms,
                relays=settings.relays,
                sizing=HoldSizing.from_settings(settings),
                invoice_expiry_seconds=settings.invoice_expiry_seconds,
                budget=IntakeBudget(
                    per_minute=settings.job_requests_per_minute,
                    per_minute_per_key=settings.job_requests_per_minute_per_key,
                    open_offers=settings.max_open_offers,
                    open_offers_per_key=settings.max_open_offers_per_key,
                ),
                reply_relays_max=settings.reply_relays_max,
                network=settings.network,
                results_grace_seconds=settings.results_grace_seconds,
                heartbeat_tolerance_seconds=settings.heartbeat_tolerance_seconds,
                outage_catch_up_seconds=settings.outage_catch_up_seconds,
                # the escrow never asks itself, should its own key be listed
                validator_pool=tuple(v.pubkey for v in self.validator_pool if v.pubkey != key.public_key_hex),
                fallback_round_seconds=settings.fallback_round_seconds,
                claim_reminder_seconds=settings.claim_reminder_seconds,
                appeal_round_seconds=settings.appeal_round_seconds,
            ),
        )
        # When this process is live: opened before the engine's timers first run (the gap before
        # it is the outage a restart ends), beaten every heartbeat_seconds.
        self.heartbeat = Heartbeat(
            sessions,
            interval=settings.heartbeat_seconds,
            tolerance=settings.heartbeat_tolerance_seconds,
            retention=settings.liveness_retention_seconds,
        )
        self.quarantine = quarantine_from_settings(sessions, settings)
        self.runner = EngineRunner(self.engine, Inbox(sessions, quarantine=self.quarantine))
        self.signals = signals or Signals()
        effects = (
            EffectRunner(
                self.engine,
                lightning.invoices,
                lightning.watcher,
                lease_seconds=settings.effect_lease_seconds,
                quarantine=self.quarantine,
                signals=self.signals,
            )
            if lightning
            else None
        )
        self.loop = EscrowLoop(self.runner, effects, signals=self.signals)
        self.signals.offer_made.connect(self._offer_made)
        self._offer_waiters: dict[str, tuple[asyncio.Event, int]] = {}

    def _offer_made(self, job_id: str) -> None:
        entry = self._offer_waiters.get(job_id)
        if entry is not None:
            entry[0].set()

    async def wait_offer(self, job_id: str, timeout: float, *, new: bool = False) -> dict | None:
        """The job's offer once its invoice exists (or the request was refused), waiting up to
        ``timeout`` seconds; None if it is not there in time.

        Woken at once when this replica's effect runner made the invoice; otherwise (another
        replica made it, or the request was refused) found by a look every 0.25 s.
        """
        event, n = self._offer_waiters.get(job_id, (asyncio.Event(), 0))
        self._offer_waiters[job_id] = (event, n + 1)
        deadline = time.monotonic() + timeout
        try:
            if new:  # just stored: nothing to read yet; this replica's effect runner wakes us
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), min(timeout, 0.25))
            while True:
                view = await self.offer_view(job_id)
                remaining = deadline - time.monotonic()
                if view is not None or remaining <= 0:
                    return view
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), min(remaining, 0.25))
        finally:
            event, n = self._offer_waiters[job_id]
            if n <= 1:
                del self._offer_waiters[job_id]
            else:
                self._offer_waiters[job_id] = (event, n - 1)

    async def offer_view(self, job_id: str) -> dict | None:
        """What a customer needs to pay: the job's state and invoice; None while not decided."""
        async with self.sessions() as s:
            job = (await s.execute(select(Job.state, Job.reject_reason).where(Job.id == job_id))).first()
            if job is None or job.state == JobState.REQUESTED.value:
                return None
            inv = (
                await s.execute(
                    select(
                        LnInvoice.payment_hash,
                        LnInvoice.payment_request,
                        LnInvoice.amount_msat,
                        LnInvoice.mode,
                        LnInvoice.expires_at,
                    )
                    .where(LnInvoice.job_id == job_id, LnInvoice.purpose == InvoicePurpose.JOB)
                    .order_by(LnInvoice.created_at)
                )
            ).first()
        out = {"state": job.state, "reject_reason": job.reject_reason, "invoice": None}
        if inv is not None:
            out["invoice"] = {
                "payment_hash": inv.payment_hash,
                "payment_request": inv.payment_request,
                "amount_msat": inv.amount_msat,
                "mode": inv.mode,
                "expires_at": inv.expires_at,
            }
        elif job.state != JobState.REJECTED.value:
            return None
        return out

    async def announce(self) -> None:
        """Publish the NIP-89 announcement with the current terms (replaceable, so once per start)."""
        tmpl = build_announcement(
            Announcement(
                d="fedstr-escrow",
                name="fedstr-escrow",
                about=f"Lightning escrow for FEDSTR training jobs (v{__version__})",
                terms=self.terms,
                validator_pool=self.validator_pool,
            )
        )
        event = sign_event(self.key, tmpl.kind, tmpl.tags, tmpl.content)
        if self.settings.relays:
            async with self.sessions.begin() as s:
                await outbox.enqueue(s, event, self.settings.relays)
