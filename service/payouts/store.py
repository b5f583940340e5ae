"""Writes to ``ln_payouts`` from outside the worker, each in the caller's transaction: a new
payout (:func:`create`), a payee's invoice (:func:`accept_invoice`), an operator's retry
(:func:`retry`), cancel (:func:`cancel_payment`) or reissue of a stuck payment (:func:`reissue`), a claim
window's end (:func:`expire`) and an operator's reopen of it (:func:`reopen`). With the worker (``service/payouts/worker.py``) these are the only writers of
``ln_payouts`` and ``ln_payout_attempts`` (tests/unit/test_payout_writers.py checks it).

Every path that gives a payout an invoice goes through :func:`accept_invoice` (the Nostr
kind-7000 event, the NIP-98 REST route) or, for the invoice it already has, :func:`retry`: both
check it offline with :func:`check.decode_offline` and the used-hash rule, and move the payout by
compare-and-set. The full check (with our node's ``DecodePayReq``) comes again before paying.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import CursorResult, Result, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from service import timeline
from service.bitcoin import MAX_MSAT
from service.db import aware, insert_ignore, utcnow
from service.lightning.client import LndClient
from service.payouts.check import decode_offline, refuse_used_hash
from service.payouts.models import Payout, PayoutAttempt
from service.payouts.stuck import lnd_view, reissue_refusal
from service.payouts.types import (
    AcceptReason,
    AttemptState,
    CancelReason,
    CancelRefused,
    CheckReason,
    ClaimWindow,
    DestinationKind,
    InvoiceCheckError,
    InvoiceRefused,
    InvoiceSource,
    NewPayout,
    PayoutReason,
    PayoutState,
    ReissueReason,
    ReissueRefused,
    ReopenReason,
    ReopenRefused,
    RetryReason,
    RetryRefused,
    why,
)

RETRYABLE = (PayoutState.FAILED, PayoutState.NEEDS_INVOICE)


async def create(s: AsyncSession, p: NewPayout) -> bool:
    """Add a payout in the caller's transaction; idempotent by ``p.id``: True if it is new.

    One with no destination waits for the payee's invoice (``needs_invoice``); the others are due."""
    if not 0 < p.amount_msat <= MAX_MSAT:
        raise ValueError("payout amount out of range")
    if p.fee_limit_msat is not None and not 0 <= p.fee_limit_msat <= MAX_MSAT:
        raise ValueError("payout fee limit out of range")
    now = utcnow()
    waiting = p.destination.kind is DestinationKind.NONE
    res = await s.execute(
        insert_ignore(s, Payout.__table__).values(
            id=p.id,
            job_id=p.job_id,
            kind=p.kind,
            earned_by=p.earned_by,
            payee=p.payee,
            amount_msat=p.amount_msat,
            destination_kind=p.destination.kind,
            destination=p.destination.value,
            state=PayoutState.NEEDS_INVOICE if waiting else PayoutState.PENDING,
            fee_limit_msat=p.fee_limit_msat,
            claim_by=_at(p.claim_by),
            remind_at=_at(p.remind_at),
            attempts=0,
            next_attempt_at=now,
            created_at=now,
            updated_at=now,
        )
    )
    return rows_matched(res) == 1


async def accept_invoice(
    s: AsyncSession,
    *,
    job_id: str,
    payee: str,
    bolt11: str,
    amount_msat: int | None,
    source: InvoiceSource,
    network: str,
    now: int | None = None,
) -> Payout:
    """Give the payee's invoice to one of its payouts of this job that waits for one; returns it,
    now ``pending``. Raises :class:`InvoiceRefused` with a stable code otherwise.

    ``amount_msat``: the amount the payee says the invoice is for (the Nostr event states it), or
    None (REST: the invoice's own amount picks the payout). ``network``: ours (``Settings.network``).
    No call to our node: the worker checks the invoice in full before paying it.

    A refused invoice for a payout this call could tell apart is noted on it (its ``last_error``
    and a new needs_invoice outcome), so a payee that is not answered directly (Nostr) is asked
    again with the reason; a caller that answers the payee itself rolls its transaction back."""
    mine: Sequence[Payout] = (
        await s.scalars(
            select(Payout).where(Payout.job_id == job_id, Payout.payee == payee).order_by(Payout.created_at, Payout.id)
        )
    ).all()
    if not mine:
        raise InvoiceRefused(AcceptReason.NO_PAYOUT, "this job owes nothing to this key")
    at = utcnow() if now is None else datetime.fromtimestamp(now, UTC)
    waiting = [p for p in mine if p.state is PayoutState.NEEDS_INVOICE and claimable(p, at)]
    if not waiting:
        if any(p.state is PayoutState.EXPIRED or p.state is PayoutState.NEEDS_INVOICE for p in mine):
            raise InvoiceRefused(
                AcceptReason.CLAIM_EXPIRED, "the claim window ended before this invoice came; ask the operator"
            )
        raise InvoiceRefused(AcceptReason.NOT_WAITING, f"the payout is {mine[0].state}; no invoice is needed now")
    if amount_msat is not None:
        waiting = [p for p in waiting if p.amount_msat == amount_msat]
        if not waiting:
            raise InvoiceRefused(
                AcceptReason.NOT_WAITING, f"no payout of {amount_msat} msat waits for this payee's invoice"
            )
    try:
        inv = decode_offline(bolt11, network=network, now=now)
        fits = [p for p in waiting if p.amount_msat == inv.amount_msat]
        if not fits:
            raise InvoiceCheckError(
                CheckReason.WRONG_AMOUNT,
                f"invoice is for {inv.amount_msat} msat, "
                f"the payout is {' or '.join(str(p.amount_msat) for p in waiting)}",
            )
        target = fits[0]
        await refuse_used_hash(s, inv.payment_hash, payout_id=target.id)
    except InvoiceCheckError as e:
        if len(waiting) == 1:
            await _note_refusal(s, waiting[0], why(e.reason, e.message))
        raise InvoiceRefused(e.reason, e.message) from None
    res = await s.execute(
        update(Payout)
        .where(Payout.id == target.id, Payout.state == PayoutState.NEEDS_INVOICE, open_claim(at))
        .values(
            destination_kind=DestinationKind.BOLT11,
            destination=inv.payment_request,
            state=PayoutState.PENDING,
            attempts=0,
            next_attempt_at=utcnow(),
            updated_at=utcnow(),
        )
        .execution_options(synchronize_session=False)  # (SQLite's naive claim_by; refreshed below)
    )
    if rows_matched(res) != 1:
        raise InvoiceRefused(AcceptReason.CONFLICT, "the payout changed meanwhile")
    await timeline.record(
        s,
        job_id,
        timeline.EntryKind.FACT,
        {
            "event": "payee invoice" if source is InvoiceSource.NOSTR else f"payee invoice ({source.value.upper()})",
            "payout": target.id,
            "payee": payee,
            "amount_msat": target.amount_msat,
        },
    )
    await s.refresh(target)
    return target


async def _note_refusal(s: AsyncSession, p: Payout, last_error: str) -> None:
    await s.execute(
        update(Payout)
        .where(Payout.id == p.id, Payout.state == PayoutState.NEEDS_INVOICE)
        .values(last_error=last_error, needs_invoice_count=Payout.needs_invoice_count + 1, updated_at=utcnow())
    )


def _at(unix: int | None) -> datetime | None:
    return None if unix is None else datetime.fromtimestamp(unix, UTC)


def claimable(p: Payout, at: datetime) -> bool:
    """Whether a payout's claim window is still open at ``at`` (none: open for ever)."""
    return p.claim_by is None or aware(p.claim_by) > at


def open_claim(at: datetime) -> ColumnElement[bool]:
    """:func:`claimable` in SQL: the condition every move out of needs_invoice by a payee checks."""
    return or_(Payout.claim_by.is_(None), Payout.claim_by > at)


async def expire(s: AsyncSession, payout_id: str, at: datetime) -> bool:
    """The claim window ended: a payout still waiting for its payee's invoice moves to ``expired``
    (compare-and-set on needs_invoice and its claim_by having passed; one that is pending, sending or
    unknown never expires: money may be in flight). The engine books it (``PayoutExpired``) when it
    consumes the outcome. True if this call moved it."""
    res = await s.execute(
        update(Payout)
        .where(
            Payout.id == payout_id,
            Payout.state == PayoutState.NEEDS_INVOICE,
            Payout.claim_by.is_not(None),
            Payout.claim_by <= at,
        )
        .values(
            state=PayoutState.EXPIRED,
            last_error=why(PayoutReason.CLAIM_EXPIRED, "nobody gave an invoice within the claim window"),
            updated_at=utcnow(),
        )
        .execution_options(synchronize_session=False)
    )
    return rows_matched(res) == 1


async def reopen(s: AsyncSession, payout_id: str, window: ClaimWindow, *, at: datetime | None = None) -> Payout:
    """An operator's reopen of an expired claim (to honour a late claimant): back to needs_invoice
    with a fresh window from now, its round counted (a new outcome for the engine, which reverses the
    unclaimed booking and asks the payee again). Raises :class:`ReopenRefused`."""
    p = await s.get(Payout, payout_id)
    if p is None:
        raise ReopenRefused(ReopenReason.NOT_FOUND, "no such payout")
    if p.state is not PayoutState.EXPIRED:
        raise ReopenRefused(ReopenReason.NOT_EXPIRED, f"payout is {p.state}; only an expired claim is reopened")
    now = at or utcnow()
    claim_by, remind_at = window.times(int(now.timestamp()))
    res = await s.execute(
        update(Payout)
        .where(Payout.id == payout_id, Payout.state == PayoutState.EXPIRED, Payout.claim_round == p.claim_round)
        .values(
            state=PayoutState.NEEDS_INVOICE,
            claim_by=_at(claim_by),
            remind_at=_at(remind_at),
            claim_round=Payout.claim_round + 1,
            last_error=why(PayoutReason.CLAIM_REOPENED, "an operator reopened the claim"),
            updated_at=utcnow(),
        )
        .execution_options(synchronize_session=False)
    )
    if rows_matched(res) != 1:
        raise ReopenRefused(ReopenReason.CONFLICT, "the payout changed meanwhile")
    await s.refresh(p)
    return p


async def retry(s: AsyncSession, payout_id: str, *, now: int | None = None) -> PayoutState:
    """An operator's retry: a failed payout, or one handed back to its payee, is paid again with
    the destination it has. Its invoice is checked offline first, as any invoice given to a payout
    is (an expired or used one is refused here, not after a claim). Raises :class:`RetryRefused`.
    (Only ``now`` is extra: a test's clock.)"""
    p = await s.get(Payout, payout_id)
    if p is None:
        raise RetryRefused(RetryReason.NOT_FOUND, "no such payout")
    if p.state is PayoutState.UNKNOWN:
        raise RetryRefused(RetryReason.UNKNOWN, "an unknown payout is resolved by tracking it in LND, never retried")
    if p.state not in RETRYABLE:
        raise RetryRefused(RetryReason.NOT_RETRYABLE, f"payout is {p.state}")
    if p.destination_kind is DestinationKind.NONE:
        raise RetryRefused(RetryReason.NEEDS_INVOICE, "the payee has not given an invoice or address yet")
    if p.destination_kind is DestinationKind.BOLT11:
        try:
            # (its network was checked when it was given, and the worker checks it again)
            inv = decode_offline(p.destination, network=None, now=now)
            if inv.amount_msat != p.amount_msat:
                raise InvoiceCheckError(
                    CheckReason.WRONG_AMOUNT, f"invoice is for {inv.amount_msat} msat, payout is {p.amount_msat}"
                )
            await refuse_used_hash(s, inv.payment_hash, payout_id=p.id)
        except InvoiceCheckError as e:
            raise RetryRefused(e.reason, e.message) from None
    res = await s.execute(
        update(Payout)
        .where(Payout.id == payout_id, Payout.state.in_(RETRYABLE))
        .values(state=PayoutState.PENDING, attempts=0, last_error=None, next_attempt_at=utcnow(), updated_at=utcnow())
    )
    if rows_matched(res) != 1:
        raise RetryRefused(RetryReason.CONFLICT, "the payout changed meanwhile")
    if p.job_id is not None:
        await timeline.record(
            s,
            p.job_id,
            timeline.EntryKind.PAYMENT,
            {"payout": p.id, "state": PayoutState.PENDING.value, "why": "retried by an operator"},
        )
    return PayoutState.PENDING


async def cancel_payment(s: AsyncSession, lnd: LndClient, payout_id: str) -> str:
    """An operator's cancel of a payout's payment that has not left: its worker's lease is revoked
    (compare-and-set), the worker ends its cancelable ``SendPaymentV2`` stream within a second, LND
    stops the payment, and what LND then reports decides (FAILED ``CANCELED``: sent again after the
    retry pause). Refused (:class:`CancelRefused`) unless the payout is ``sending`` and LND reports no
    HTLC of its payment (not initiated, or initiated with none attempted). An HTLC can still leave
    between LND's answer and the worker's cancel: then the payment goes on, and is followed as any.
    Raises :class:`~service.lightning.errors.LndError` when our node does not answer."""
    p = await s.get(Payout, payout_id)
    if p is None:
        raise CancelRefused(CancelReason.NOT_FOUND, "no such payout")
    if p.state is not PayoutState.SENDING or p.lease_until is None:
        hint = " (the reconciler follows its payment in LND)" if p.state is PayoutState.UNKNOWN else ""
        raise CancelRefused(CancelReason.NOT_SENDING, f"payout is {p.state}{hint}; no payment of it is being sent")
    lease = p.lease_until
    attempt = (
        await s.scalars(
            select(PayoutAttempt)
            .where(PayoutAttempt.payout_id == payout_id, PayoutAttempt.state == AttemptState.SENDING)
            .order_by(PayoutAttempt.created_at.desc())
        )
    ).first()
    detail = "nothing sent yet"
    if attempt is not None:
        payment = await lnd.current_payment(bytes.fromhex(attempt.payment_hash))
        if payment is not None and payment.left:
            raise CancelRefused(
                CancelReason.PAYMENT_LEFT,
                f"the payment has left (LND: {payment.status.name}, {payment.htlc_attempts} HTLC(s)); "
                "it can no longer be cancelled",
            )
        detail = "not initiated in LND" if payment is None else f"LND: {payment.status.name}, no HTLC"
    res = await s.execute(
        update(Payout)
        .where(Payout.id == payout_id, Payout.state == PayoutState.SENDING, Payout.lease_until == lease)
        .values(lease_until=utcnow(), updated_at=utcnow())
    )
    if rows_matched(res) != 1:
        raise CancelRefused(CancelReason.CONFLICT, "the payout changed meanwhile")
    if p.job_id is not None:
        await timeline.record(
            s,
            p.job_id,
            timeline.EntryKind.PAYMENT,
            {"payout": p.id, "state": PayoutState.SENDING.value, "why": "cancel requested by an operator"},
        )
    return f"cancel_requested ({detail})"


async def reissue(s: AsyncSession, lnd: LndClient, payout_id: str, *, payment_timeout_seconds: float) -> str:
    """An operator's reissue of an ``unknown`` payout whose payment LND keeps in flight: allowed only
    as :func:`service.payouts.stuck.reissue_refusal` says (LND reports it FAILED, or no HTLC of it
    can settle any more and LND starts no new one). Then, in the caller's transaction, its attempt
    is closed as ``abandoned`` (the row stays: the write-ahead record; its hash is never sent or
    accepted again) and the payout goes back to ``needs_invoice`` with ``payment_failed``: the
    engine asks the payee for a new invoice, and the ledger is booked only when a payment succeeds.
    Refused (:class:`ReissueRefused`) otherwise, nothing changed; also while a reconciler pass holds
    the payout. Raises :class:`~service.lightning.errors.LndError` when our node does not answer."""
    p = await s.get(Payout, payout_id)
    if p is None:
        raise ReissueRefused(ReissueReason.NOT_FOUND, "no such payout")
    if p.state is not PayoutState.UNKNOWN:
        raise ReissueRefused(
            ReissueReason.NOT_STUCK, f"payout is {p.state}; only an unknown payout's payment can be stuck in LND"
        )
    now = utcnow()
    if p.lease_until is not None and aware(p.lease_until) > now:
        raise ReissueRefused(
            ReissueReason.BEING_RECONCILED, "the reconciler is looking at this payout now; try again in a few seconds"
        )
    attempt = (
        await s.scalars(
            select(PayoutAttempt)
            .where(
                PayoutAttempt.payout_id == payout_id,
                PayoutAttempt.state.in_((AttemptState.SENDING, AttemptState.UNKNOWN)),
            )
            .order_by(PayoutAttempt.created_at.desc())
        )
    ).first()
    if attempt is None:
        raise ReissueRefused(ReissueReason.NO_ATTEMPT, "no attempt of it is open; the reconciler resolves it")
    view = await lnd_view(lnd, attempt.payment_hash)
    refusal = reissue_refusal(view, now_ns=time.time_ns(), payment_timeout_seconds=payment_timeout_seconds)
    if refusal is not None:
        raise ReissueRefused(refusal[0], f"{refusal[1]} ({view.summary()})")
    res = await s.execute(
        update(PayoutAttempt)
        .where(PayoutAttempt.payment_hash == attempt.payment_hash, PayoutAttempt.state == attempt.state)
        .values(
            state=AttemptState.ABANDONED, failure=f"reissued by an operator; {view.summary()}"[:200], updated_at=now
        )
    )
    if rows_matched(res) != 1:
        raise ReissueRefused(ReissueReason.CONFLICT, "the attempt changed meanwhile")
    values: dict[str, Any] = {
        "state": PayoutState.NEEDS_INVOICE,
        "last_error": why(
            PayoutReason.PAYMENT_FAILED, f"the payment LND kept in flight was closed by an operator; {view.summary()}"
        ),
        "needs_invoice_count": Payout.needs_invoice_count + 1,
        "lease_until": None,
        "updated_at": now,
    }
    if p.destination_kind is DestinationKind.BOLT11:  # its hash is never paid again: the payee gives another
        values.update(destination_kind=DestinationKind.NONE, destination="")
    res = await s.execute(
        update(Payout)
        .where(
            Payout.id == payout_id,
            Payout.state == PayoutState.UNKNOWN,
            or_(Payout.lease_until.is_(None), Payout.lease_until <= now),
        )
        .values(**values)
    )
    if rows_matched(res) != 1:
        raise ReissueRefused(ReissueReason.CONFLICT, "the payout changed meanwhile")
    if p.job_id is not None:
        await timeline.record(
            s,
            p.job_id,
            timeline.EntryKind.PAYMENT,
            {"payout": p.id, "state": PayoutState.NEEDS_INVOICE.value, "why": "reissued by an operator"},
        )
    return f"needs_invoice ({view.summary()})"


def rows_matched(result: Result[Any]) -> int:
    """The rows an UPDATE or INSERT matched (the result of a DML statement is a CursorResult)."""
    return result.rowcount if isinstance(result, CursorResult) else 0
