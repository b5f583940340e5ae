"""The engine's side of payouts: what it asks the payout package to do, and how it reads one.

TEMPORARY adapter over service/lightning/payouts.py until the payouts package (its own
typed columns and ``accept_invoice``) lands; then these three calls go to it directly.
"""
from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from service.db import utcnow
from service.escrow import timeline
from service.escrow.machine import PayoutView
from service.lightning.models import Payout
from service.lightning.payouts import Payouts
from service.payouts.types import DestinationKind, NewPayout, PayoutKind, PayoutState


async def create(s: AsyncSession, p: NewPayout) -> bool:
    dest = "none" if p.destination.kind is DestinationKind.NONE else f"{p.destination.kind}:{p.destination.value}"
    return await Payouts.create(s, payout_id=p.id, payee=p.payee, amount_msat=p.amount_msat, destination=dest,
                                job_id=p.job_id, fee_limit_msat=p.fee_limit_msat)


def _kind(payout_id: str) -> PayoutKind:
    if ":reward:" in payout_id:
        return PayoutKind.REWARD
    if payout_id.endswith(":refund"):
        return PayoutKind.REFUND
    if payout_id.endswith(":overpaid"):
        return PayoutKind.OVERPAID
    return PayoutKind.VALIDATOR_FEE


def view(p: Payout) -> PayoutView:
    kind = _kind(p.id)
    return PayoutView(id=p.id, kind=kind, payee=p.payee, amount_msat=p.amount_msat, state=PayoutState(p.state),
                      destination=DestinationKind(p.destination.split(":", 1)[0]), attempts=p.attempts,
                      fee_msat=p.fee_msat or 0, payment_hash=p.payment_hash, preimage=p.preimage,
                      earned_by=p.id.rsplit(":", 1)[1] if kind is PayoutKind.REWARD else None,
                      last_error=p.last_error)


async def accept_nostr_invoice(s: AsyncSession, *, job_id: str, payee: str, amount_msat: int, bolt11: str) -> str | None:
    """Give the waiting payout of ``payee`` for ``amount_msat`` this invoice; why not, or None."""
    res = await s.execute(update(Payout).where(Payout.job_id == job_id, Payout.payee == payee,
                                               Payout.amount_msat == amount_msat, Payout.state == "needs_invoice")
                          .values(destination="bolt11:" + bolt11, state="pending", attempts=0,
                                  next_attempt_at=utcnow(), updated_at=utcnow()))
    if res.rowcount == 0:
        return "no payout of that amount waits for this payee's invoice"
    await timeline.record(s, job_id, timeline.EntryKind.FACT,
                          {"event": "payee invoice", "payee": payee, "amount_msat": amount_msat})
    return None
