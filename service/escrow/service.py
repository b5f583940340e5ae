"""The running escrow: engine, runners and the announcement, wired to the other layers."""
from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service import __version__
from service.config import Settings
from service.escrow.engine import Engine, EngineConfig
from service.escrow.runner import EffectRunner, EngineRunner, EscrowLoop
from service.lightning.invoices import HoldSizing
from service.lightning.service import LightningService
from service.nostr import outbox
from service.nostr.inbox import Inbox
from service.nostr.nip01 import SecretKey, sign_event
from service.nostr.protocol import Announcement, EscrowTerms, Mode, Network, build_announcement


def terms_from_settings(s: Settings) -> EscrowTerms:
    return EscrowTerms(fee_base_msat=s.fee_base_msat, fee_ppm=s.fee_ppm, min_bid_msat=s.min_bid_msat,
                       max_bid_msat=s.max_bid_msat, max_validators=s.max_validators, max_shards=s.max_shards,
                       min_results_window_s=s.min_results_window_seconds,
                       max_job_duration_s=s.max_job_duration_seconds,
                       modes=frozenset(Mode(m) for m in s.escrow_modes), network=Network.from_settings(s.network),
                       max_hold_seconds=s.max_hold_seconds)


class EscrowService:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], settings: Settings, key: SecretKey,
                 lightning: LightningService | None) -> None:
        self.sessions = sessions
        self.settings = settings
        self.key = key
        self.terms = terms_from_settings(settings)
        self.engine = Engine(sessions, key, EngineConfig(
            terms=self.terms, relays=settings.relays, sizing=HoldSizing.from_settings(settings),
            invoice_expiry_seconds=settings.invoice_expiry_seconds))
        self.runner = EngineRunner(self.engine, Inbox(sessions))
        effects = (EffectRunner(self.engine, lightning.invoices, lightning.watcher,
                                lease_seconds=settings.effect_lease_seconds) if lightning else None)
        self.loop = EscrowLoop(self.runner, effects)

    async def announce(self) -> None:
        """Publish the NIP-89 announcement with the current terms (replaceable, so once per start)."""
        tmpl = build_announcement(Announcement(d="fedstr-escrow", name="fedstr-escrow",
                                               about=f"Lightning escrow for FEDSTR training jobs (v{__version__})",
                                               terms=self.terms))
        event = sign_event(self.key, tmpl.kind, tmpl.tags, tmpl.content)
        if self.settings.relays:
            async with self.sessions.begin() as s:
                await outbox.enqueue(s, event, self.settings.relays)

