"""The payout worker: checked invoices, write-ahead attempts, tracking before any resend, reconciliation.

Life of a payout (``ln_payouts``)::

    pending ──claim──► sending ──► succeeded
       ▲                  │  ├──► unknown ──(reconciler: LND's current view)──► succeeded | pending | needs_invoice
       │                  │  │      ├── still in flight: looked at again later, less and less often
       │                  │  │      └── kept in flight by LND for good: an operator's reissue (store.reissue,
       │                  │  │          once LND reports it failed or it is past its timelock) ──► needs_invoice
       │                  │  └──► failed (retry after a pause, bounded) ──► needs_invoice
       └──── payee submits a new invoice (store.accept_invoice) ◄────── needs_invoice

Rules that keep money from leaving twice:

1. Every invoice is checked before any attempt (:func:`service.payouts.check.check_invoice`): both our
   decoding and our node's ``DecodePayReq`` must read it the same way (blinded paths
   included); the network matches; the amount is exactly the payout; it is not expired
   and will not expire within the payment window; its final CLTV is within the limit;
   it is not our own node's; its payment hash was never used by us before.
2. The attempt row (``ln_payout_attempts``, payment hash as primary key) is
   committed *before* ``SendPaymentV2``. After a crash, the row tells us a payment
   may exist. The primary key is also what makes a hash belong to one payout: an
   insert that did nothing is read back, and another payout's row refuses the send.
3. Before sending (and for every attempt left ``sending`` or ``unknown``) we ask
   ``TrackPaymentV2``: if LND knows the hash we follow that payment instead of
   sending again. Only LND's final answer decides; a timeout or transport error
   is ``unknown``, never ``failed``.
4. LND's own rule (one payment per hash; only a FAILED one may be retried) is the
   last line of defence, and its refusals are mapped: "payment is in transition"
   → track; "invoice is already paid" → track, then success; "invoice expired"
   with nothing initiated → the payee must send a new invoice.
5. State changes are compare-and-set on the current state, so two workers (or
   replicas) cannot both claim one payout.
6. Every send is ``cancelable``: when the stream ends (the worker lost its lease on the payout, an
   operator cancelled it, the service stops), LND stops its payment loop. What happened then is
   LND's to say (:meth:`Payouts._stopped`): only a payment it reports FAILED (``CANCELED``), or
   never initiated, may be sent again; one whose HTLC left is followed like any other.

Rules that keep a hostile payee from hurting anyone else:

- A payment is followed for one payout timeout at most; a payee that holds our HTLC leaves
  its own payout ``unknown``, and the reconciler reads LND's *current* view of it (the first
  update of ``TrackPaymentV2``), never waiting for a final state, each payout within its own
  time budget (:meth:`Payouts.reconcile`).
- ``SendPaymentV2`` gets ``cltv_limit``: no route may lock our funds for longer.
- The routing-fee limit is ``amount × ppm``, capped, and no more than the engine's own limit
  for the payout (``ln_payouts.fee_limit_msat``); no floor, and 0 means zero-fee routes only.
- Before an invoice's first send, ``EstimateRouteFee`` quotes its route (a probe: nothing paid;
  ``QueryRoutes`` to the paths of a blinded invoice, whose fees count in the limit too); one that
  costs more than that limit is handed back with the same reason as LND's own refusal.
- What a payee gets back (``needs_invoice``) always carries a stable reason code first in
  ``last_error`` (:class:`CheckReason`, :class:`PayoutReason`): the engine tells the payee.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from contextlib import aclosing
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import and_, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.db import aware, insert_ignore, utcnow
from service.lightning import errors
from service.lightning.client import FailureReason, LndClient, Payment, PaymentStatus
from service.payouts.check import CheckedInvoice, check_invoice, may_reuse
from service.payouts.models import Payout, PayoutAttempt
from service.payouts.store import rows_matched
from service.payouts.types import (
    AttemptState,
    CheckReason,
    DestinationKind,
    InvoiceCheckError,
    PayoutPolicy,
    PayoutReason,
    PayoutState,
    why,
)

log = logging.getLogger(__name__)

FOLLOW_GRACE_SECONDS = 2.0  # a send is followed for the payout timeout plus this, then left `unknown`
RECHECK_MAX_SECONDS = 600.0  # a payment still in flight is looked at again at least this often
LEASE_CHECK_SECONDS = 1.0  # while a send is followed, its lease is looked at this often
CANCEL_SETTLE_SECONDS = 5.0  # after a send is stopped, LND's final word on it is awaited this long
CANCEL_RECHECK_SECONDS = 0.5  # a stopped send LND did not know is looked up once more after this


class LeaseLost(Exception):
    """This worker's claim on the payout is gone (taken by the reconciler, revoked by an operator's
    cancel, run out) while it followed a send."""


@dataclass(frozen=True)
class Outcome:
    """What a pass did to a payout: its state afterwards ("missing": no such row)."""

    payout_id: str
    state: PayoutState | str
    detail: str = ""


def route_fee_refusal(fee_msat: int, fee_limit_msat: int) -> str:
    """What a payee is told when the route to its invoice costs more than the payout allows: by the
    fee quote before sending, or by the route query after LND's NO_ROUTE. Handed back, not retried."""
    return why(
        PayoutReason.ROUTE_FEE_EXCEEDS_LIMIT,
        f"the cheapest route to the invoice costs {fee_msat} msat in fees and this payout allows "
        f"{fee_limit_msat} msat; give an invoice reachable for less (a direct channel, or "
        "route hints or blinded paths through cheaper channels, fewer dummy hops)",
    )


class Claim(NamedTuple):
    payout_id: str
    payee: str


class Payouts:
    def __init__(
        self,
        lnd: LndClient,
        sessions: async_sessionmaker[AsyncSession],
        policy: PayoutPolicy,
        *,
        our_pubkey: str,
        fetch_invoice: Callable[[str, int], Awaitable[str]] | None = None,
        on_outcome: Callable[[Outcome], Awaitable[None]] | None = None,
    ) -> None:
        self.lnd = lnd
        self.sessions = sessions
        self.policy = policy
        self.our_pubkey = our_pubkey
        self.fetch_invoice = fetch_invoice or self._fetch_lnurl
        self.on_outcome = on_outcome
        self._fresh: set[str] = set()  # hashes whose write-ahead row this process just created
        self._leases: dict[str, datetime] = {}  # payout id -> the lease this process's claim holds

    # ---- the worker -------------------------------------------------------------------
    async def claim_due(self, limit: int, *, busy_payees: Collection[str] = ()) -> list[Claim]:
        """Claim up to ``limit`` due payouts (compare-and-set, a lease each) for the caller to pay:
        at most one per payee, and none for ``busy_payees`` (those with a payment in flight here), so
        one payee's held payments cannot take every slot while other payees wait."""
        now = utcnow()
        claimed: list[Claim] = []
        async with self.sessions.begin() as s:
            q = (
                select(Payout.id, Payout.payee)
                .where(Payout.state == PayoutState.PENDING, Payout.next_attempt_at <= now)
                .order_by(Payout.next_attempt_at)
                .limit(limit)
            )
            if busy_payees:
                q = q.where(Payout.payee.not_in(list(busy_payees)))
            if s.get_bind().dialect.name == "postgresql":
                q = q.with_for_update(skip_locked=True)  # replicas take disjoint rows without waiting
            for pid, payee in (await s.execute(q)).all():
                if any(c.payee == payee for c in claimed):
                    continue  # its next payout waits for this one (the caller claims again when it is done)
                res = await s.execute(
                    update(Payout)
                    .where(Payout.id == pid, Payout.state == PayoutState.PENDING)
                    .values(
                        state=PayoutState.SENDING,
                        updated_at=now,
                        lease_until=now + timedelta(seconds=self.policy.lease_seconds),
                    )
                )
                if rows_matched(res) == 1:
                    claimed.append(Claim(pid, payee))
        return claimed

    async def pay(self, payout_id: str) -> Outcome:
        """Pay one claimed payout (see ``claim_due``)."""
        async with self.sessions() as s:
            p = await s.get(Payout, payout_id)
        if p is None:  # claimed by us a moment ago; payouts are never deleted
            raise LookupError(f"no payout {payout_id}")
        if p.state is PayoutState.SENDING and p.lease_until is not None:
            self._leases[payout_id] = aware(p.lease_until)  # what the send's lease watch compares
        try:
            return await self._pay(p)
        finally:
            self._leases.pop(payout_id, None)

    async def _pay(self, p: Payout) -> Outcome:
        payout_id, kind = p.id, p.destination_kind
        try:
            if kind is DestinationKind.BOLT11:
                payreq = p.destination
            elif kind in (DestinationKind.LUD16, DestinationKind.LNURL):
                payreq = await self.fetch_invoice(p.destination, p.amount_msat)
            else:
                return await self._finish(
                    payout_id,
                    PayoutState.NEEDS_INVOICE,
                    why(PayoutReason.NO_DESTINATION, "no invoice for this payout yet"),
                )
        except Exception as e:  # noqa: BLE001 - a payee endpoint failing is the payee's problem, bounded
            return await self._retry_or_give_up(
                payout_id, p.attempts + 1, why(PayoutReason.INVOICE_FETCH_FAILED, str(e))
            )
        try:
            async with self.sessions.begin() as s:
                checked = await check_invoice(
                    self.lnd,
                    s,
                    payreq,
                    amount_msat=p.amount_msat,
                    policy=self.policy,
                    our_pubkey=self.our_pubkey,
                    payout_id=payout_id,
                )
                fee_limit = self.policy.fee_limit(p.amount_msat, p.fee_limit_msat)
                fresh = await self._write_ahead(s, payout_id, checked, fee_limit)
                await s.execute(
                    update(Payout)
                    .where(Payout.id == payout_id)
                    .values(attempts=Payout.attempts + 1, updated_at=utcnow())
                )
        except InvoiceCheckError as e:
            log.warning("payout %s: invoice refused: %s", payout_id, e)
            if kind is DestinationKind.BOLT11:
                return await self._finish(payout_id, PayoutState.NEEDS_INVOICE, why(e.reason, e.message))
            return await self._retry_or_give_up(payout_id, p.attempts + 1, why(e.reason, e.message))
        except errors.LndError as e:
            # Our node did not answer a check (DecodePayReq): the write-ahead rolled back with the
            # transaction, so no payment can exist. Give the claim back now; left `sending`, the
            # payout would wait for its lease to run out and the reconciler's next pass.
            log.info("payout %s: node unavailable while checking the invoice: %s", payout_id, e)
            return await self._finish(
                payout_id,
                PayoutState.PENDING,
                why(PayoutReason.NODE_UNAVAILABLE, f"checking the invoice: {type(e).__name__}"),
                retry=True,
            )
        if fresh:
            # The first send of this hash: LND cannot know it, so the quote may refuse it. (A re-armed
            # attempt of this payout goes without: the send's fee limit and NO_ROUTE check still hold.)
            refusal = await self._quote(checked, fee_limit)
            if refusal is not None:
                await self._attempt_state(checked.payment_hash, AttemptState.NOT_INITIATED, failure=refusal[:200])
                return await self._finish(payout_id, PayoutState.NEEDS_INVOICE, refusal)
            self._fresh.add(checked.payment_hash)
        return await self._send(payout_id, checked.payment_hash, checked.payment_request, fee_limit)

    async def _quote(self, checked: CheckedInvoice, fee_limit: int) -> str | None:
        """``EstimateRouteFee`` before the first send: the reason to hand the payout back if the route
        its probe found costs more than ``fee_limit``, else None. A probe that finds no route, fails
        or runs out of time decides nothing: SendPaymentV2 runs with the fee limit, which still bounds
        the fee, and its NO_ROUTE is told apart as before (``_why_no_route``).

        A blinded invoice is quoted by ``QueryRoutes`` instead (nothing sent; the paths' own fees
        included): LND v0.20.2's probe goes to the invoice's destination, for a blinded invoice a
        one-time key no graph knows, and always finds no route."""
        if self.policy.fee_quote_seconds <= 0:
            return None
        payreq = checked.payment_request
        if checked.blinded_paths:
            try:
                fee = await self.lnd.route_fee(payreq, cltv_limit=self.policy.cltv_limit)
            except errors.LndError as e:
                log.info("blinded route fee query failed (%s); the send's fee limit decides", type(e).__name__)
                return None
            return route_fee_refusal(fee, fee_limit) if fee is not None and fee > fee_limit else None
        try:
            quote = await self.lnd.estimate_route_fee(payreq, timeout_seconds=self.policy.fee_quote_seconds)
        except errors.LndError as e:
            log.info("route fee quote failed (%s); the send's fee limit decides", type(e).__name__)
            return None
        if quote.failure_reason is not FailureReason.NONE:
            log.info("route fee quote found no route (%s); the send decides", quote.failure_reason.name)
            return None
        return route_fee_refusal(quote.fee_msat, fee_limit) if quote.fee_msat > fee_limit else None

    async def _write_ahead(self, s: AsyncSession, payout_id: str, checked: CheckedInvoice, fee_limit: int) -> bool:
        """Insert the attempt row in the caller's transaction; True if this call created it.

        The hash is the row's primary key, so it is what makes a hash belong to one payout: an insert
        that did nothing is read back (after the other transaction committed) and refused, nothing
        sent, unless it is this payout's own failed or never-initiated attempt, which is armed again.
        (Two payouts given one invoice at the same moment were both marked paid by its one payment.)"""
        now = utcnow()
        res = await s.execute(
            insert_ignore(s, PayoutAttempt.__table__).values(
                payment_hash=checked.payment_hash,
                payout_id=payout_id,
                payment_request=checked.payment_request,
                fee_limit_msat=fee_limit,
                state=AttemptState.SENDING,
                created_at=now,
                updated_at=now,
            )
        )
        if rows_matched(res) == 1:
            return True
        prior = (
            await s.execute(
                select(PayoutAttempt.payout_id, PayoutAttempt.state).where(
                    PayoutAttempt.payment_hash == checked.payment_hash
                )
            )
        ).one()
        if may_reuse(prior.payout_id, prior.state, payout_id):
            res = await s.execute(
                update(PayoutAttempt)
                .where(
                    PayoutAttempt.payment_hash == checked.payment_hash,
                    PayoutAttempt.payout_id == payout_id,
                    PayoutAttempt.state == prior.state,
                )
                .values(state=AttemptState.SENDING, fee_limit_msat=fee_limit, failure=None, updated_at=now)
            )
            if rows_matched(res) == 1:
                return False
        raise InvoiceCheckError(
            CheckReason.HASH_REUSED,
            "this payment hash is another payout's"
            if prior.payout_id != payout_id
            else f"this payout's attempt with this hash is {prior.state}",
        )

    async def _send(self, payout_id: str, payment_hash: str, payreq: str, fee_limit: int) -> Outcome:
        # (This signature is a fault-injection hook: bench.drills.faulty_service, tests.support.payout_crash.)
        # Never send what LND may already be sending: look first. Unless the write-ahead row was
        # created just now: no attempt with this hash existed, and every send of ours is preceded
        # by its committed row, so we never sent it (one paid from the node by hand shows up as
        # ALREADY_PAID / IN_TRANSITION below, and is looked at then).
        if payment_hash in self._fresh:
            self._fresh.discard(payment_hash)
        else:
            try:
                known = await self._current(payment_hash)
            except (errors.LndError, TimeoutError) as e:
                return await self._unknown(payout_id, payment_hash, e)
            if known is not None and known.status != PaymentStatus.FAILED:
                return await self._settle_attempt(payout_id, payment_hash, known)
        lease = self._leases.get(payout_id)  # None: the reconciler's send (its own time budget)
        if lease is not None and not await self._leased(payout_id, lease):
            return await self._stopped(payout_id, payment_hash, sent=False)
        refused: errors.LndError | None = None
        try:
            # Followed for one payout timeout at most: a payee that holds the HTLC keeps its own
            # payout `unknown` (the reconciler looks again), not a slot of ours. Cancelable: when we
            # stop following, LND stops trying (an HTLC already out still settles or fails).
            payment = await asyncio.wait_for(
                self._follow_leased(
                    payout_id,
                    lease,
                    self.lnd.send_payment(
                        payreq,
                        fee_limit_msat=fee_limit,
                        timeout_seconds=self.policy.timeout_seconds,
                        cltv_limit=self.policy.cltv_limit,
                        cancelable=True,
                    ),
                ),
                self.policy.timeout_seconds + FOLLOW_GRACE_SECONDS,
            )
        except LeaseLost:
            return await self._stopped(payout_id, payment_hash, sent=True)
        except asyncio.CancelledError:
            if lease is not None:  # the service stops: the reconciler's next pass looks at it at once
                with contextlib.suppress(Exception):
                    await self._release_lease(payout_id, lease)
            raise
        except (errors.PaymentInTransition, errors.PaymentAlreadyPaid, errors.InvoiceExpired) as e:
            refused, payment = e, None  # LND refused this send: what it knows of the hash decides
        except (errors.LndError, TimeoutError) as e:
            return await self._unknown(payout_id, payment_hash, e)
        if payment is None:
            try:
                payment = await self._current(payment_hash)
            except (errors.LndError, TimeoutError) as e:
                return await self._unknown(payout_id, payment_hash, e)
        if payment is None and isinstance(refused, errors.InvoiceExpired):
            await self._attempt_state(payment_hash, AttemptState.NOT_INITIATED, failure="invoice expired")
            return await self._finish(
                payout_id, PayoutState.NEEDS_INVOICE, why(CheckReason.EXPIRED, "the invoice expired before it was paid")
            )
        if payment is None:
            return await self._unknown(payout_id, payment_hash, refused)
        return await self._settle_attempt(payout_id, payment_hash, payment)

    async def _unknown(self, payout_id: str, payment_hash: str, e: BaseException | None) -> Outcome:
        """LND did not tell us the payment's fate in time: `unknown`, never `failed` (the reconciler asks)."""
        detail = why(
            PayoutReason.OUTCOME_UNKNOWN,
            "no final state from LND" if e is None else f"{type(e).__name__}: {getattr(e, 'detail', '')}",
        )
        await self._attempt_state(payment_hash, AttemptState.UNKNOWN, failure=detail[:200])
        return await self._finish(payout_id, PayoutState.UNKNOWN, detail)

    async def _follow(self, stream: AsyncIterator[Payment]) -> Payment | None:
        last = None
        async for p in stream:
            last = p
            if p.status.final:
                break
        return last

    async def _follow_leased(
        self, payout_id: str, lease: datetime | None, stream: AsyncIterator[Payment]
    ) -> Payment | None:
        """``_follow`` while this worker holds its lease on the payout; raises :class:`LeaseLost`
        once it does not, after ending the stream (which stops a cancelable payment in LND)."""
        if lease is None:
            return await self._follow(stream)
        follow = asyncio.ensure_future(self._follow(stream))
        watch = asyncio.ensure_future(self._watch_lease(payout_id, lease))
        try:
            await asyncio.wait((follow, watch), return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when cancelled (timeout, shutdown): the gRPC call ends before we go on
            watch.cancel()
            if not follow.done():
                follow.cancel()
            await asyncio.gather(follow, watch, return_exceptions=True)
        if follow.cancelled():
            raise LeaseLost(payout_id)
        return follow.result()

    async def _watch_lease(self, payout_id: str, lease: datetime) -> None:
        """Return once this worker's claim on the payout is gone (fault-injection hook:
        tests/integration/test_payout_cancel.py)."""
        while True:
            await asyncio.sleep(LEASE_CHECK_SECONDS)
            try:
                if not await self._leased(payout_id, lease):
                    return
            except Exception as e:  # noqa: BLE001 - a database hiccup is not a lost lease
                log.warning("payout %s: lease check failed (%s); the send goes on", payout_id, type(e).__name__)

    async def _leased(self, payout_id: str, lease: datetime) -> bool:
        """Whether the payout is still ours: ``sending`` with the lease our claim set, not run out.
        (The reconciler takes one whose lease ran out; an operator's cancel revokes it.)"""
        async with self.sessions() as s:
            row = (
                await s.execute(select(Payout.state, Payout.lease_until).where(Payout.id == payout_id))
            ).one_or_none()
        return (
            row is not None
            and row.state is PayoutState.SENDING
            and row.lease_until is not None
            and aware(row.lease_until) == lease
            and lease > utcnow()
        )

    async def _release_lease(self, payout_id: str, lease: datetime) -> None:
        async with self.sessions.begin() as s:
            await s.execute(
                update(Payout)
                .where(Payout.id == payout_id, Payout.state == PayoutState.SENDING, Payout.lease_until == lease)
                .values(lease_until=utcnow())
            )

    async def _stopped(self, payout_id: str, payment_hash: str, *, sent: bool) -> Outcome:
        """The claim was lost: before the send (``sent=False``: nothing went to LND), or while it was
        followed, and ending the cancelable stream stopped LND's payment loop. LND's report decides:
        FAILED (``CANCELED``, no HTLC left) or unknown to LND is sent again later; SUCCEEDED is paid;
        an HTLC still out is followed (``unknown``). Never assumed cancelled."""
        payment = None
        if sent:
            try:
                payment = await self._after_cancel(payment_hash)
            except (errors.LndError, TimeoutError) as e:
                return await self._unknown(payout_id, payment_hash, e)
        if payment is not None:
            log.info("payout %s: send stopped (lease lost); LND reports %s", payout_id, payment.status.name)
            return await self._settle_attempt(payout_id, payment_hash, payment)
        await self._attempt_state(payment_hash, AttemptState.NOT_INITIATED, failure="canceled before LND initiated it")
        async with self.sessions() as s:
            attempts = await s.scalar(select(Payout.attempts).where(Payout.id == payout_id)) or 0
        return await self._retry_or_give_up(
            payout_id, attempts, why(PayoutReason.CANCELED, "the payment was stopped before LND initiated it")
        )

    async def _after_cancel(self, payment_hash: str) -> Payment | None:
        """LND's word on a payment whose cancelable stream we ended: followed until it is final, for
        CANCEL_SETTLE_SECONDS at most (then its last state, in flight: an HTLC of it is out, or LND
        has not marked it failed yet; the reconciler looks again); None if LND never initiated it."""
        last = None
        try:
            async with (
                aclosing(self.lnd.track_payment(bytes.fromhex(payment_hash))) as stream,
                asyncio.timeout(CANCEL_SETTLE_SECONDS),
            ):
                async for p in stream:
                    last = p
                    if p.status.final:
                        break
        except errors.LndNotFound:
            # The stream may have ended before LND created the payment; if it did create it, it fails
            # it at once (its context is gone). One more look, so the attempt row says what LND did.
            await asyncio.sleep(CANCEL_RECHECK_SECONDS)
            again = await self._current(payment_hash)
            return again if again is None or again.status.final else await self._after_cancel(payment_hash)
        except TimeoutError:
            if last is None:
                raise
        if last is None:
            raise errors.LndError("TrackPaymentV2", "the stream ended without a payment update")
        return last

    async def _current(self, payment_hash: str) -> Payment | None:
        """LND's current view of a payment: the first update of ``TrackPaymentV2``, which is the
        payment's state now (never waiting for a final one); None if LND never initiated it."""
        try:
            async with (
                aclosing(self.lnd.track_payment(bytes.fromhex(payment_hash))) as stream,
                asyncio.timeout(self.lnd.timeout),
            ):
                async for p in stream:
                    return p
        except errors.LndNotFound:
            return None
        raise errors.LndError("TrackPaymentV2", "the stream ended without a payment update")

    async def _settle_attempt(self, payout_id: str, payment_hash: str, payment: Payment) -> Outcome:
        if payment.status == PaymentStatus.SUCCEEDED:
            await self._attempt_state(
                payment_hash,
                AttemptState.SUCCEEDED,
                fee=payment.fee_msat,
                preimage=payment.preimage.hex() if payment.preimage else None,
            )
            return await self._finish(
                payout_id,
                PayoutState.SUCCEEDED,
                "",
                fee=payment.fee_msat,
                payment_hash=payment_hash,
                preimage=payment.preimage.hex() if payment.preimage else None,
            )
        if payment.status == PaymentStatus.FAILED:
            await self._attempt_state(payment_hash, AttemptState.FAILED, failure=payment.failure_reason.name)
            async with self.sessions() as s:
                attempts = await s.scalar(select(Payout.attempts).where(Payout.id == payout_id)) or 0
            if payment.failure_reason == FailureReason.NO_ROUTE:
                hand_back, detail = await self._why_no_route(payment_hash)
                if hand_back:
                    return await self._finish(payout_id, PayoutState.NEEDS_INVOICE, detail)
                return await self._retry_or_give_up(payout_id, attempts, detail)
            if payment.failure_reason == FailureReason.CANCELED:
                # stopped before it left (a FAILED payment has no HTLC out): LND lets it be sent again
                return await self._retry_or_give_up(
                    payout_id, attempts, why(PayoutReason.CANCELED, "the payment was stopped before it left")
                )
            if payment.failure_reason == FailureReason.INCORRECT_PAYMENT_DETAILS:
                return await self._finish(
                    payout_id,
                    PayoutState.NEEDS_INVOICE,
                    why(
                        PayoutReason.PAYEE_REJECTED,
                        "the payee's node refused the payment (its invoice is unknown "
                        "to it, canceled or for another amount)",
                    ),
                )
            return await self._retry_or_give_up(
                payout_id,
                attempts,
                why(PayoutReason.PAYMENT_FAILED, f"LND's failure reason {payment.failure_reason.name}"),
            )
        await self._attempt_state(payment_hash, AttemptState.UNKNOWN, failure=f"status {payment.status.name}")
        return await self._finish(
            payout_id, PayoutState.UNKNOWN, why(PayoutReason.IN_FLIGHT, f"payment {payment.status.name}")
        )

    async def _why_no_route(self, payment_hash: str) -> tuple[bool, str]:
        """LND's NO_ROUTE covers "none within the fee limit" and "none at all": ask which (QueryRoutes
        with no fee limit; nothing sent). (True, reason) when the payee must offer a cheaper route."""
        async with self.sessions() as s:
            a = await s.get(PayoutAttempt, payment_hash)
        if a is None:  # the caller has just updated it: cannot happen
            raise LookupError(f"no attempt {payment_hash}")
        try:
            fee = await self.lnd.route_fee(a.payment_request, cltv_limit=self.policy.cltv_limit)
        except errors.LndError as e:
            return False, why(
                PayoutReason.NO_ROUTE,
                f"no route within the fee limit {a.fee_limit_msat} msat "
                f"(asking for one without it failed: {type(e).__name__})",
            )
        if fee is not None and fee > a.fee_limit_msat:
            return True, route_fee_refusal(fee, a.fee_limit_msat)
        return False, why(
            PayoutReason.NO_ROUTE,
            f"no route to the invoice's node within {self.policy.cltv_limit} "
            "blocks of time lock" + ("" if fee is None else f" that worked (one costs {fee} msat)"),
        )

    async def _attempt_state(
        self,
        payment_hash: str,
        state: AttemptState,
        *,
        fee: int | None = None,
        preimage: str | None = None,
        failure: str | None = None,
    ) -> None:
        async with self.sessions.begin() as s:
            await s.execute(
                update(PayoutAttempt)
                # an abandoned attempt (an operator's reissue) stays so: its hash is never sent again
                .where(
                    PayoutAttempt.payment_hash == payment_hash,
                    PayoutAttempt.state.not_in((AttemptState.SUCCEEDED, AttemptState.ABANDONED)),
                )
                .values(state=state, fee_msat=fee, preimage=preimage, failure=failure, updated_at=utcnow())
            )

    async def _retry_or_give_up(self, payout_id: str, attempts: int, detail: str) -> Outcome:
        if attempts >= self.policy.max_attempts:
            return await self._finish(
                payout_id,
                PayoutState.NEEDS_INVOICE,
                why(PayoutReason.GAVE_UP, f"after {attempts} attempt(s); the last: {detail}"),
            )
        return await self._finish(payout_id, PayoutState.PENDING, detail, retry=True, attempts=attempts)

    async def _finish(
        self,
        payout_id: str,
        state: PayoutState,
        detail: str,
        *,
        fee: int | None = None,
        payment_hash: str | None = None,
        preimage: str | None = None,
        retry: bool = False,
        attempts: int | None = None,
    ) -> Outcome:
        state = PayoutState(state)
        values: dict[str, Any] = {
            "state": state,
            "last_error": detail or None,
            "updated_at": utcnow(),
            "lease_until": None,
        }
        if state is PayoutState.NEEDS_INVOICE:  # a new outcome for the engine, whatever the attempt count
            values["needs_invoice_count"] = Payout.needs_invoice_count + 1
        if state is PayoutState.SUCCEEDED:
            values.update(fee_msat=fee, payment_hash=payment_hash, preimage=preimage, last_error=None)
        if state is PayoutState.UNKNOWN:  # the reconciler's next pass looks at it
            values["next_attempt_at"] = utcnow()
        if retry:
            values["next_attempt_at"] = utcnow() + timedelta(seconds=self.policy.retry_seconds)
        if attempts is not None:
            values["attempts"] = attempts
        async with self.sessions.begin() as s:
            res = await s.execute(
                update(Payout)
                .where(Payout.id == payout_id, Payout.state.in_((PayoutState.SENDING, PayoutState.UNKNOWN)))
                .values(**values)
            )
        if rows_matched(res) != 1:
            async with self.sessions() as s:
                current = await s.scalar(select(Payout.state).where(Payout.id == payout_id))
            return Outcome(payout_id, current or "missing", "state changed elsewhere")
        outcome = Outcome(payout_id, state, detail)
        if self.on_outcome is not None:
            await self.on_outcome(outcome)
        return outcome

    # ---- reconciliation ------------------------------------------------------------------
    async def reconcile(self, *, allow_send: bool = True, limit: int = 500) -> list[Outcome]:
        """Resolve payouts that may have a payment in LND: every ``unknown`` one that is due for a
        look, and every ``sending`` one whose lease ran out (its worker died).

        Each payout on its own, within ``policy.reconcile_budget_seconds``: LND's current view is
        read (a payment still in flight stays ``unknown`` and is looked at again later, less and less
        often), an error or a timeout is logged and the next payout is looked at. Only when our node
        is unreachable does the pass end early (no answer can come). ``allow_send=False`` (payouts
        paused) looks without sending a written-ahead attempt LND never heard of."""
        now = utcnow()
        async with self.sessions() as s:
            rows = (
                await s.scalars(
                    select(Payout.id)
                    .where(
                        or_(
                            and_(Payout.state == PayoutState.UNKNOWN, Payout.next_attempt_at <= now),
                            and_(
                                Payout.state == PayoutState.SENDING,
                                or_(Payout.lease_until.is_(None), Payout.lease_until <= now),
                            ),
                        )
                    )
                    .order_by(Payout.next_attempt_at)
                    .limit(limit)
                )
            ).all()
        outcomes = []
        for pid in rows:
            try:
                async with asyncio.timeout(self.policy.reconcile_budget_seconds):
                    outcome = await self._reconcile_one(pid, allow_send)
            except errors.LndUnavailable as e:
                log.info("payout reconciliation: our node is unreachable (%s); the rest waits for the next pass", e)
                break
            except (errors.LndError, TimeoutError) as e:
                log.warning(
                    "payout %s: not resolved within its budget (%s); looked at again next pass", pid, type(e).__name__
                )
                continue
            except Exception:  # one payout's trouble must not keep the others unresolved
                log.exception("payout %s: reconciliation failed; the others go on", pid)
                continue
            if outcome is not None:
                outcomes.append(outcome)
        return outcomes

    async def _reconcile_one(self, pid: str, allow_send: bool) -> Outcome | None:
        now = utcnow()
        # Taken for this pass (compare-and-set): another replica's reconciler skips it meanwhile, and
        # an operator's reissue waits for the pass (its lease). A dead worker's `sending` becomes
        # `unknown`, so a cut-short pass leaves it for the next.
        hold = now + timedelta(seconds=2 * self.policy.reconcile_budget_seconds)
        async with self.sessions.begin() as s:
            taken = await s.execute(
                update(Payout)
                .where(
                    Payout.id == pid,
                    or_(
                        and_(Payout.state == PayoutState.UNKNOWN, Payout.next_attempt_at <= now),
                        and_(
                            Payout.state == PayoutState.SENDING,
                            or_(Payout.lease_until.is_(None), Payout.lease_until <= now),
                        ),
                    ),
                )
                .values(state=PayoutState.UNKNOWN, lease_until=hold, next_attempt_at=hold, updated_at=now)
            )
        if rows_matched(taken) != 1:
            return None
        async with self.sessions() as s:
            paid = (
                await s.execute(
                    select(PayoutAttempt.payment_hash, PayoutAttempt.fee_msat, PayoutAttempt.preimage).where(
                        PayoutAttempt.payout_id == pid, PayoutAttempt.state == AttemptState.SUCCEEDED
                    )
                )
            ).first()
            attempt = (
                (
                    await s.execute(
                        select(PayoutAttempt)
                        .where(
                            PayoutAttempt.payout_id == pid,
                            PayoutAttempt.state.in_((AttemptState.SENDING, AttemptState.UNKNOWN)),
                        )
                        .order_by(PayoutAttempt.created_at.desc())
                    )
                )
                .scalars()
                .first()
            )
        if paid is not None:
            # LND's SUCCEEDED was recorded on the attempt, then the worker died before the payout
            # row: finish it. (Sent back to pending, its invoice would be refused as used, the
            # payee asked for another one and paid twice: the sigkill drill did exactly that.)
            return await self._finish(
                pid,
                PayoutState.SUCCEEDED,
                "",
                fee=paid.fee_msat,
                payment_hash=paid.payment_hash,
                preimage=paid.preimage,
            )
        if attempt is None:
            # Claimed but nothing was written ahead: no payment can exist. Back to pending.
            async with self.sessions.begin() as s:
                await s.execute(
                    update(Payout)
                    .where(Payout.id == pid, Payout.state == PayoutState.UNKNOWN)
                    .values(state=PayoutState.PENDING, lease_until=None, next_attempt_at=utcnow(), updated_at=utcnow())
                )
            return Outcome(pid, PayoutState.PENDING, "no attempt was written")
        payment = await self._current(attempt.payment_hash)
        if payment is None and allow_send:
            # LND never initiated it: safe to send this attempt now (it was written ahead). Within
            # this payout's budget: cut short, it stays `unknown` and the next pass looks again.
            return await self._send(pid, attempt.payment_hash, attempt.payment_request, attempt.fee_limit_msat)
        if payment is not None and payment.status.final:
            return await self._settle_attempt(pid, attempt.payment_hash, payment)
        # Still in flight (a payee may hold the HTLC until its CLTV expiry; cltv_limit bounds that):
        # look again after a quarter of its age so far, at least every RECHECK_MAX_SECONDS.
        age = (now - aware(attempt.updated_at)).total_seconds()
        async with self.sessions.begin() as s:
            await s.execute(
                update(Payout)
                .where(Payout.id == pid, Payout.state == PayoutState.UNKNOWN)
                .values(
                    lease_until=None,
                    next_attempt_at=now + timedelta(seconds=min(RECHECK_MAX_SECONDS, max(0.0, age / 4))),
                )
            )
        status = "not sent (payouts paused)" if payment is None else payment.status.name
        return Outcome(pid, PayoutState.UNKNOWN, why(PayoutReason.IN_FLIGHT, f"payment {status}"))

    async def _fetch_lnurl(self, target: str, amount_msat: int) -> str:
        from service.lightning import lnurl

        fetched = await lnurl.fetch_invoice(
            lnurl.parse_destination(target),
            amount_msat,
            allow_private=self.policy.lnurl_allow_private,
            network=self.policy.network,
        )
        return fetched.bolt11
