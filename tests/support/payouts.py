"""The payout worker's own path in a test: claim what is due, pay each claim (as
``LightningService._payout_loop`` does, without its loop)."""

from __future__ import annotations

import asyncio

from service.payouts.worker import Outcome, Payouts


async def pay_due(payouts: Payouts, limit: int = 20) -> list[Outcome]:
    """Claim up to ``limit`` due payouts (one per payee) and pay them concurrently."""
    return list(await asyncio.gather(*(payouts.pay(c.payout_id) for c in await payouts.claim_due(limit))))
