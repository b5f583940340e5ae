"""Escrow invoices: hold (non-custodial until settled) or regular (custodial).

A hold invoice locks the customer's money in an HTLC without taking it; it must
outlive the job. Its final CLTV delta is sized from the time the job needs
(RoboSats' rule: seconds x speed-up / pessimistic block time), plus LND's
``holdexpirydelta``, our deadline guard's margin and a safety margin. A job too
long for ``hold_max_cltv_blocks`` is escrowed custodially instead (``auto``), or
refused if the customer insisted on ``hold``.

Invoices are created in LND first, then recorded; the payment request only
leaves the service (in the offer event) after the record is committed, so no
invoice anyone can pay is unknown to us. The hold preimage is kept in the
database until settlement and never logged or returned.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.bitcoin import MAX_MSAT
from service.db import GroupCommit, table_of, utcnow
from service.lightning.client import LndClient
from service.lightning.hold import HoldSizing
from service.lightning.models import LnInvoice

__all__ = ["EscrowInvoices", "HoldSizing", "InvoiceModeError", "IssuedInvoice"]


class InvoiceModeError(ValueError):
    """The job cannot be escrowed in the requested mode."""


@dataclass(frozen=True)
class IssuedInvoice:
    """What the caller needs to publish an offer. ``preimage`` is for settling only: never log it."""

    payment_hash: str
    job_id: str | None
    mode: str
    amount_msat: int
    payment_request: str
    preimage: str | None = field(repr=False)
    cltv_expiry: int
    expires_at: int
    add_index: int


class EscrowInvoices:
    def __init__(
        self,
        lnd: LndClient,
        sizing: HoldSizing,
        *,
        expiry_seconds: int = 600,
        sessions: async_sessionmaker[AsyncSession] | None = None,
    ) -> None:
        self.lnd = lnd
        self._writer = GroupCommit(sessions, LnInvoice.__table__) if sessions is not None else None
        self.sizing = sizing
        self.expiry_seconds = expiry_seconds

    async def create(
        self,
        session: AsyncSession | None,
        *,
        job_id: str | None,
        amount_msat: int,
        mode: str,
        hold_seconds: int = 0,
        memo: str = "",
        on_deadline: str = "cancel",
        expiry_seconds: int | None = None,
        purpose: str = "job",
    ) -> IssuedInvoice:
        """Create the invoice in LND, then record it.

        With a ``session`` the record joins the caller's transaction (the caller commits).
        With ``None`` it is committed by a group commit shared with concurrent callers, and
        is durable when this returns: the payment request may then be published.
        ``mode`` is the job's, ``hold`` or ``custodial``: decided once, at intake
        (``service.lightning.hold.decide_mode``); a hold invoice too long for the CLTV limit is refused.
        ``expiry_seconds``: a payment window shorter than the configured one (at least 60 s).
        ``purpose``: ``job`` (the job's escrow invoice) or ``appeal_fee`` (``ln_invoices.purpose``).
        """
        if not 0 < amount_msat <= MAX_MSAT:
            raise ValueError("amount_msat out of range")
        if on_deadline not in ("settle", "cancel"):
            raise ValueError("on_deadline must be 'settle' or 'cancel'")
        if mode not in ("hold", "custodial"):
            raise InvoiceModeError(f"mode must be 'hold' or 'custodial' (decided at intake), got {mode!r}")
        if mode == "hold" and not self.sizing.fits(hold_seconds):
            raise InvoiceModeError(
                f"the job needs {self.sizing.cltv_blocks(hold_seconds)} blocks of HTLC lifetime; "
                f"hold invoices are limited to {self.sizing.max_cltv_blocks}"
            )
        chosen = mode
        memo = memo[:600]
        now = int(time.time())
        expiry = self.expiry_seconds if expiry_seconds is None else max(60, min(expiry_seconds, self.expiry_seconds))
        if chosen == "hold":
            preimage = os.urandom(32)
            payment_hash = hashlib.sha256(preimage).digest()
            cltv = self.sizing.cltv_blocks(hold_seconds)
            added = await self.lnd.add_hold_invoice(
                payment_hash, amount_msat, memo=memo, expiry=expiry, cltv_expiry=cltv
            )
            secret: str | None = preimage.hex()
        else:
            added = await self.lnd.add_invoice(amount_msat, memo=memo, expiry=expiry)
            payment_hash, secret, cltv = added.payment_hash, None, 0
        row = IssuedInvoice(
            payment_hash=payment_hash.hex(),
            job_id=job_id,
            mode=chosen,
            amount_msat=amount_msat,
            payment_request=added.payment_request,
            preimage=secret,
            cltv_expiry=cltv,
            expires_at=now + expiry,
            add_index=added.add_index,
        )
        stamp = utcnow()
        values = {
            "payment_hash": row.payment_hash,
            "job_id": job_id,
            "mode": chosen,
            "amount_msat": amount_msat,
            "payment_request": row.payment_request,
            "memo": memo,
            "preimage": secret,
            "cltv_expiry": cltv,
            "expires_at": row.expires_at,
            "state": "open",
            "amount_paid_msat": 0,
            "on_deadline": on_deadline,
            "purpose": purpose,
            "add_index": row.add_index,
            "settle_index": 0,
            "created_at": stamp,
            "updated_at": stamp,
        }
        if session is None:
            if self._writer is None:
                raise RuntimeError("EscrowInvoices was built without sessions: pass a session")
            await self._writer.insert(values)  # group commit: durable when this returns
        else:
            await session.execute(insert(table_of(LnInvoice)), [values])
        return row
