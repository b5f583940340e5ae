"""The running Nostr layer of the service: relay pool, inbox and publisher, started together.

The pool subscribes to everything addressed to the escrow key (``#p`` = our
pubkey) in the protocol's kinds, stores it in the inbox and publishes from the
outbox. The escrow engine (a later layer) consumes the inbox.
"""

from __future__ import annotations

import asyncio
import contextlib

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.nostr.inbox import Inbox
from service.nostr.kinds import INTAKE_KINDS
from service.nostr.nip01 import SecretKey
from service.nostr.outbox import Publisher, PublisherConfig
from service.nostr.pool import PoolConfig, RelayPool, Subscription
from service.quarantine import Quarantine
from service.signals import Signals


def intake_subscription(escrow_pubkey: str) -> Subscription:
    return Subscription("escrow", ({"kinds": list(INTAKE_KINDS), "#p": [escrow_pubkey]},))


class NostrService:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        relays: list[str],
        key: SecretKey,
        *,
        pool_config: PoolConfig | None = None,
        publisher_config: PublisherConfig | None = None,
        quarantine: Quarantine | None = None,
        signals: Signals | None = None,
    ) -> None:
        self.key = key
        self.inbox = Inbox(sessions, quarantine=quarantine)
        self.pool = RelayPool(
            relays,
            self.inbox,
            subscriptions=[intake_subscription(key.public_key_hex)],
            secret_key=key,
            config=pool_config,
            signals=signals,
        )
        self.publisher = Publisher(sessions, self.pool, publisher_config, quarantine=self.inbox.quarantine)
        self._stop = asyncio.Event()
        self._publisher_task: asyncio.Task | None = None

    async def start(self) -> None:
        self._stop.clear()
        await self.pool.start()
        self._publisher_task = asyncio.create_task(self.publisher.run(self._stop), name="nostr publisher")

    async def stop(self) -> None:
        self._stop.set()
        if self._publisher_task is not None:
            self._publisher_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._publisher_task
        await self.pool.stop()
