"""Payouts: checked invoices, write-ahead attempts, tracking before any resend, reconciliation.

Life of a payout (``ln_payouts``)::

    pending ──claim──► sending ──► succeeded
       ▲                  │  ├──► unknown ──(reconciler: LND's current view)──► succeeded | pending | needs_invoice
       │                  │  │      └── still in flight: looked at again later, less and less often
       │                  │  └──► failed (retry after a pause, bounded) ──► needs_invoice
       └──── payee submits a new invoice ◄───────────────────── needs_invoice

Rules that keep money from leaving twice:

1. Every invoice is checked before any attempt (:func:`check_invoice`): both our
   bolt11 decoder and our node's ``DecodePayReq`` must read it the same way; the
   network matches; the amount is exactly the payout; it is not expired and will
   not expire within the payment window; its final CLTV is within the limit; it is
   not our own node's; its payment hash was never used by us before.
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

Rules that keep a hostile payee from hurting anyone else:

- A payment is followed for one payout timeout at most; a payee that holds our HTLC leaves
  its own payout ``unknown``, and the reconciler reads LND's *current* view of it (the first
  update of ``TrackPaymentV2``), never waiting for a final state, each payout within its own
  time budget (:meth:`Payouts.reconcile`).
- ``SendPaymentV2`` gets ``cltv_limit``: no route may lock our funds for longer.
- The routing-fee limit is ``amount × ppm``, capped, and no more than the engine's own limit
  for the payout (``ln_payouts.fee_limit_msat``); no floor, and 0 means zero-fee routes only.
- What a payee gets back (``needs_invoice``) always carries a stable reason code first in
  ``last_error`` (:class:`CheckReason`, :class:`PayoutReason`): the engine tells the payee.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from contextlib import aclosing
from dataclasses import dataclass
from datetime import timedelta
from typing import NamedTuple, cast

import bolt11
from sqlalchemy import CursorResult, Result, and_, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.config import Settings
from service.db import aware, insert_ignore, utcnow
from service.lightning import errors
from service.lightning.client import FailureReason, LndClient, Payment, PaymentStatus
from service.lightning.models import LnInvoice, Payout, PayoutAttempt

log = logging.getLogger(__name__)

MAX_MSAT = 2_100_000_000_000_000_000
NETWORK_OF = {"bc": "mainnet", "tb": "testnet", "tbs": "signet", "bcrt": "regtest", "sb": "simnet"}
FOLLOW_GRACE_SECONDS = 2.0    # a send is followed for the payout timeout plus this, then left `unknown`
RECHECK_MAX_SECONDS = 600.0   # a payment still in flight is looked at again at least this often


class CheckReason(enum.StrEnum):
    UNDECODABLE = "invoice_undecodable"
    NODE_REFUSED = "node_cannot_decode"
    DECODERS_DISAGREE = "decoders_disagree"
    WRONG_NETWORK = "wrong_network"
    NO_AMOUNT = "amountless_invoice"
    WRONG_AMOUNT = "wrong_amount"
    EXPIRED = "invoice_expired"
    EXPIRES_TOO_SOON = "invoice_expires_too_soon"
    CLTV_TOO_LARGE = "final_cltv_too_large"
    SELF_PAYMENT = "own_node_invoice"
    HASH_REUSED = "payment_hash_used_before"


class PayoutReason(enum.StrEnum):
    """Why the worker handed a payout back (``needs_invoice``), retries it or left it ``unknown``,
    besides the :class:`CheckReason` values; always the first word of ``Payout.last_error``."""
    NO_DESTINATION = "no_destination"                    # no invoice yet: the payee must give one
    ROUTE_FEE_EXCEEDS_LIMIT = "route_fee_exceeds_limit"  # handed back: a cheaper route is the payee's to offer
    PAYEE_REJECTED = "payee_rejected_payment"            # handed back: its node refused (invoice canceled, unknown)
    NO_ROUTE = "no_route"                                # retried: no route at all (liquidity, offline payee)
    PAYMENT_FAILED = "payment_failed"                    # retried: LND's other failure reasons
    INVOICE_FETCH_FAILED = "invoice_fetch_failed"        # retried: the LNURL service did not give an invoice
    GAVE_UP = "gave_up"                                  # handed back after payout_max_attempts
    IN_FLIGHT = "payment_in_flight"                      # unknown: LND has not finished it (e.g. a held HTLC)
    OUTCOME_UNKNOWN = "payment_outcome_unknown"          # unknown: LND did not answer in time
    NODE_UNAVAILABLE = "node_unavailable"                # pending: our node could not check the invoice


def why(reason: CheckReason | PayoutReason, message: str) -> str:
    """A ``last_error``: the stable reason code, then what a person needs to know (no secret)."""
    return f"{reason.value}: {message}"[:300]


def _may_reuse(prior_payout: str, prior_state: str, payout_id: str | None) -> bool:
    """Whether a payout may send with a hash an attempt already has: only its own attempt that LND
    failed or never initiated. (A hash belongs to one payout; LND retries only a FAILED payment.)"""
    return prior_payout == payout_id and prior_state in ("failed", "not_initiated")


class InvoiceCheckError(Exception):
    def __init__(self, reason: CheckReason, message: str) -> None:
        self.reason = reason
        self.message = message
        super().__init__(f"{reason.value}: {message}")


@dataclass(frozen=True)
class CheckedInvoice:
    payment_request: str
    payment_hash: str
    amount_msat: int
    destination: str
    expires_at: int
    final_cltv: int


@dataclass(frozen=True)
class PayoutPolicy:
    network: str = "regtest"
    fee_ppm: int = 5_000
    fee_cap_msat: int = 5_000_000
    timeout_seconds: int = 60
    max_attempts: int = 3
    retry_seconds: float = 60.0
    min_expiry_seconds: int = 300
    max_final_cltv: int = 288
    cltv_limit: int = 432
    lease_seconds: float = 300.0
    lnurl_allow_private: bool = False
    reconcile_budget_seconds: float = 5.0

    @classmethod
    def from_settings(cls, s: Settings) -> PayoutPolicy:
        return cls(network=s.network, fee_ppm=s.payout_fee_ppm, fee_cap_msat=s.payout_fee_cap_msat,
                   timeout_seconds=s.payout_timeout_seconds, max_attempts=s.payout_max_attempts,
                   retry_seconds=s.payout_retry_seconds, min_expiry_seconds=s.payout_invoice_min_expiry_seconds,
                   max_final_cltv=s.payout_max_final_cltv, cltv_limit=s.payout_cltv_limit,
                   lease_seconds=s.payout_lease_seconds, lnurl_allow_private=s.lnurl_allow_private,
                   reconcile_budget_seconds=s.payout_reconcile_budget_seconds)

    def fee_limit(self, amount_msat: int, payout_limit_msat: int | None = None) -> int:
        """The most a payout may spend on routing: its fraction (ppm), capped, and never more than
        the engine's own limit for it. No floor: a 10-sat floor let a payee's route take 9.5 sat
        from a 1-sat payout. 0 allows zero-fee routes only (a direct channel, for instance)."""
        limit = min(self.fee_cap_msat, amount_msat * self.fee_ppm // 1_000_000)
        return limit if payout_limit_msat is None else max(0, min(limit, payout_limit_msat))


async def check_invoice(lnd: LndClient, session: AsyncSession, payment_request: str, *, amount_msat: int,
                        policy: PayoutPolicy, our_pubkey: str, now: int | None = None,
                        payout_id: str | None = None) -> CheckedInvoice:
    """Every check before any attempt; raises InvoiceCheckError with the first failing reason."""
    now = int(time.time()) if now is None else now
    pr = payment_request.strip()
    if pr.lower().startswith("lightning:"):
        pr = pr[len("lightning:"):]
    try:
        ours = bolt11.decode(pr)
    except Exception as e:  # noqa: BLE001 - the library raises several types for garbage
        raise InvoiceCheckError(CheckReason.UNDECODABLE, f"not a BOLT11 invoice ({type(e).__name__})") from None
    network = NETWORK_OF.get(ours.currency, ours.currency)
    if network != policy.network:
        raise InvoiceCheckError(CheckReason.WRONG_NETWORK, f"invoice is for {network}, we pay on {policy.network}")
    try:
        node = await lnd.decode_pay_req(pr)
    except errors.LndInvalidArgument as e:
        raise InvoiceCheckError(CheckReason.NODE_REFUSED, e.detail[:200]) from None
    except errors.LndError as e:
        # An unclassified error (code UNKNOWN) is the node refusing this invoice; a classified one
        # (unavailable, starting up, timeout, ...) is about the node, not the invoice: raised.
        if type(e) is errors.LndError and e.code is not None and e.code.name == "UNKNOWN":
            raise InvoiceCheckError(CheckReason.NODE_REFUSED, e.detail[:200]) from None
        raise
    if (node.payment_hash.hex() != ours.payment_hash or (ours.amount_msat or 0) != node.num_msat
            or (ours.payee and ours.payee != node.destination)):
        raise InvoiceCheckError(CheckReason.DECODERS_DISAGREE, "our decoder and the node read the invoice differently")
    if not node.num_msat:
        raise InvoiceCheckError(CheckReason.NO_AMOUNT, "invoice has no amount")
    if node.num_msat != amount_msat:
        raise InvoiceCheckError(CheckReason.WRONG_AMOUNT, f"invoice is for {node.num_msat} msat, payout is {amount_msat}")
    expires_at = node.timestamp + node.expiry
    if expires_at <= now:
        raise InvoiceCheckError(CheckReason.EXPIRED, "invoice has expired")
    if expires_at < now + policy.min_expiry_seconds:
        raise InvoiceCheckError(CheckReason.EXPIRES_TOO_SOON,
                                f"invoice expires in {expires_at - now} s; at least {policy.min_expiry_seconds} s needed")
    if node.cltv_expiry > policy.max_final_cltv:
        raise InvoiceCheckError(CheckReason.CLTV_TOO_LARGE,
                                f"final CLTV {node.cltv_expiry} is over the limit {policy.max_final_cltv}")
    if node.destination == our_pubkey:
        raise InvoiceCheckError(CheckReason.SELF_PAYMENT, "the invoice is our own node's")
    h = node.payment_hash.hex()
    if await session.scalar(select(LnInvoice.payment_hash).where(LnInvoice.payment_hash == h)) is not None:
        raise InvoiceCheckError(CheckReason.HASH_REUSED, "the payment hash is one of our own invoices")
    prior = (await session.execute(select(PayoutAttempt.payout_id, PayoutAttempt.state)
                                   .where(PayoutAttempt.payment_hash == h))).first()
    if prior is not None and not _may_reuse(prior.payout_id, prior.state, payout_id):
        raise InvoiceCheckError(CheckReason.HASH_REUSED, "this payment hash was used before")
    return CheckedInvoice(pr, h, node.num_msat, node.destination, expires_at, node.cltv_expiry)


# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    payout_id: str
    state: str
    detail: str = ""


class Claim(NamedTuple):
    payout_id: str
    payee: str


class Payouts:
    def __init__(self, lnd: LndClient, sessions: async_sessionmaker[AsyncSession], policy: PayoutPolicy,
                 *, our_pubkey: str,
                 fetch_invoice: Callable[[str, int], Awaitable[str]] | None = None,
                 on_outcome: Callable[[Outcome], Awaitable[None]] | None = None) -> None:
        self.lnd = lnd
        self.sessions = sessions
        self.policy = policy
        self.our_pubkey = our_pubkey
        self.fetch_invoice = fetch_invoice or self._fetch_lnurl
        self.on_outcome = on_outcome
        self._fresh: set[str] = set()   # hashes whose write-ahead row this process just created

    # ---- creating and feeding payouts ------------------------------------------------
    @staticmethod
    async def create(session: AsyncSession, *, payout_id: str, payee: str, amount_msat: int,
                     destination: str = "none", job_id: str | None = None,
                     fee_limit_msat: int | None = None) -> bool:
        """Add a payout in the caller's transaction; idempotent by ``payout_id``.

        ``fee_limit_msat``: the most this payout may spend on routing (the worker uses the lower of
        it and the policy's limit); None: the policy's alone."""
        if not 0 < amount_msat <= MAX_MSAT:
            raise ValueError("payout amount out of range")
        if fee_limit_msat is not None and not 0 <= fee_limit_msat <= MAX_MSAT:
            raise ValueError("payout fee limit out of range")
        if destination != "none" and destination.split(":", 1)[0] not in ("bolt11", "lud16", "lnurl"):
            raise ValueError("destination must be none, bolt11:…, lud16:… or lnurl:…")
        now = utcnow()
        res = await session.execute(insert_ignore(session, Payout.__table__).values(
            id=payout_id, job_id=job_id, payee=payee, amount_msat=amount_msat, destination=destination,
            state="pending" if destination != "none" else "needs_invoice", fee_limit_msat=fee_limit_msat,
            attempts=0, next_attempt_at=now, created_at=now, updated_at=now))
        return _rows(res) == 1

    async def submit_invoice(self, payout_id: str, payment_request: str) -> None:
        """The payee's own invoice for a payout waiting for one; checked now, and again before paying.

        A hash that another payout is paying with is refused by the worker (the attempt row is the
        rule); this check only refuses early what it can already see."""
        async with self.sessions.begin() as s:
            p = await s.get(Payout, payout_id)
            if p is None:
                raise KeyError(payout_id)
            if p.state not in ("needs_invoice", "pending"):
                raise InvoiceCheckError(CheckReason.HASH_REUSED, f"payout is {p.state}; no new invoice accepted")
            await check_invoice(self.lnd, s, payment_request, amount_msat=p.amount_msat, policy=self.policy,
                                our_pubkey=self.our_pubkey, payout_id=payout_id)
            await s.execute(update(Payout).where(Payout.id == payout_id,
                                                 Payout.state.in_(("needs_invoice", "pending")))
                            .values(destination="bolt11:" + payment_request.strip(), state="pending", attempts=0,
                                    last_error=None, next_attempt_at=utcnow(), updated_at=utcnow()))

    # ---- the worker -------------------------------------------------------------------
    async def process_due(self, limit: int = 20) -> list[Outcome]:
        """Claim due payouts (compare-and-set) and pay them concurrently."""
        return list(await asyncio.gather(*(self._pay(c.payout_id) for c in await self.claim_due(limit))))

    async def claim_due(self, limit: int, *, busy_payees: Collection[str] = ()) -> list[Claim]:
        """Claim up to ``limit`` due payouts (compare-and-set, a lease each) for the caller to pay:
        at most one per payee, and none for ``busy_payees`` (those with a payment in flight here), so
        one payee's held payments cannot take every slot while other payees wait."""
        now = utcnow()
        claimed: list[Claim] = []
        async with self.sessions.begin() as s:
            q = (select(Payout.id, Payout.payee).where(Payout.state == "pending", Payout.next_attempt_at <= now)
                 .order_by(Payout.next_attempt_at).limit(limit))
            if busy_payees:
                q = q.where(Payout.payee.not_in(list(busy_payees)))
            if s.bind.dialect.name == "postgresql":
                q = q.with_for_update(skip_locked=True)   # replicas take disjoint rows without waiting
            for pid, payee in (await s.execute(q)).all():
                if any(c.payee == payee for c in claimed):
                    continue   # its next payout waits for this one (the caller claims again when it is done)
                res = await s.execute(update(Payout).where(Payout.id == pid, Payout.state == "pending")
                                      .values(state="sending", updated_at=now,
                                              lease_until=now + timedelta(seconds=self.policy.lease_seconds)))
                if _rows(res) == 1:
                    claimed.append(Claim(pid, payee))
        return claimed

    async def pay(self, payout_id: str) -> Outcome:
        """Pay one claimed payout (see ``claim_due``)."""
        return await self._pay(payout_id)

    async def _pay(self, payout_id: str) -> Outcome:
        async with self.sessions() as s:
            p = await s.get(Payout, payout_id)
        if p is None:   # claimed by us a moment ago; payouts are never deleted
            raise LookupError(f"no payout {payout_id}")
        kind, _, value = p.destination.partition(":")
        try:
            if kind == "bolt11":
                payreq = value
            elif kind in ("lud16", "lnurl"):
                payreq = await self.fetch_invoice(value, p.amount_msat)
            else:
                return await self._finish(payout_id, "needs_invoice",
                                          why(PayoutReason.NO_DESTINATION, "no invoice for this payout yet"))
        except Exception as e:  # noqa: BLE001 - a payee endpoint failing is the payee's problem, bounded
            return await self._retry_or_give_up(payout_id, p.attempts + 1,
                                                why(PayoutReason.INVOICE_FETCH_FAILED, str(e)))
        try:
            async with self.sessions.begin() as s:
                checked = await check_invoice(self.lnd, s, payreq, amount_msat=p.amount_msat, policy=self.policy,
                                              our_pubkey=self.our_pubkey, payout_id=payout_id)
                fee_limit = self.policy.fee_limit(p.amount_msat, p.fee_limit_msat)
                fresh = await self._write_ahead(s, payout_id, checked, fee_limit)
                await s.execute(update(Payout).where(Payout.id == payout_id)
                                .values(attempts=Payout.attempts + 1, updated_at=utcnow()))
        except InvoiceCheckError as e:
            log.warning("payout %s: invoice refused: %s", payout_id, e)
            if kind == "bolt11":
                return await self._finish(payout_id, "needs_invoice", why(e.reason, e.message))
            return await self._retry_or_give_up(payout_id, p.attempts + 1, why(e.reason, e.message))
        except errors.LndError as e:
            # Our node did not answer a check (DecodePayReq): the write-ahead rolled back with the
            # transaction, so no payment can exist. Give the claim back now; left `sending`, the
            # payout would wait for its lease to run out and the reconciler's next pass.
            log.info("payout %s: node unavailable while checking the invoice: %s", payout_id, e)
            return await self._finish(payout_id, "pending",
                                      why(PayoutReason.NODE_UNAVAILABLE, f"checking the invoice: {type(e).__name__}"),
                                      retry=True)
        if fresh:
            self._fresh.add(checked.payment_hash)
        return await self._send(payout_id, checked.payment_hash, checked.payment_request, fee_limit)

    async def _write_ahead(self, s: AsyncSession, payout_id: str, checked: CheckedInvoice, fee_limit: int) -> bool:
        """Insert the attempt row in the caller's transaction; True if this call created it.

        The hash is the row's primary key, so it is what makes a hash belong to one payout: an insert
        that did nothing is read back (after the other transaction committed) and refused, nothing
        sent, unless it is this payout's own failed or never-initiated attempt, which is armed again.
        (Two payouts given one invoice at the same moment were both marked paid by its one payment.)"""
        now = utcnow()
        res = await s.execute(insert_ignore(s, PayoutAttempt.__table__).values(
            payment_hash=checked.payment_hash, payout_id=payout_id, payment_request=checked.payment_request,
            fee_limit_msat=fee_limit, state="sending", created_at=now, updated_at=now))
        if _rows(res) == 1:
            return True
        prior = (await s.execute(select(PayoutAttempt.payout_id, PayoutAttempt.state)
                                 .where(PayoutAttempt.payment_hash == checked.payment_hash))).one()
        if _may_reuse(prior.payout_id, prior.state, payout_id):
            res = await s.execute(update(PayoutAttempt).where(PayoutAttempt.payment_hash == checked.payment_hash,
                                                              PayoutAttempt.payout_id == payout_id,
                                                              PayoutAttempt.state == prior.state)
                                  .values(state="sending", fee_limit_msat=fee_limit, failure=None, updated_at=now))
            if _rows(res) == 1:
                return False
        raise InvoiceCheckError(CheckReason.HASH_REUSED,
                                "this payment hash is another payout's" if prior.payout_id != payout_id
                                else f"this payout's attempt with this hash is {prior.state}")

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
        refused: errors.LndError | None = None
        try:
            # Followed for one payout timeout at most: a payee that holds the HTLC keeps its own
            # payout `unknown` (the reconciler looks again), not a slot of ours.
            payment = await asyncio.wait_for(self._follow(self.lnd.send_payment(
                payreq, fee_limit_msat=fee_limit, timeout_seconds=self.policy.timeout_seconds,
                cltv_limit=self.policy.cltv_limit)), self.policy.timeout_seconds + FOLLOW_GRACE_SECONDS)
        except (errors.PaymentInTransition, errors.PaymentAlreadyPaid, errors.InvoiceExpired) as e:
            refused, payment = e, None   # LND refused this send: what it knows of the hash decides
        except (errors.LndError, TimeoutError) as e:
            return await self._unknown(payout_id, payment_hash, e)
        if payment is None:
            try:
                payment = await self._current(payment_hash)
            except (errors.LndError, TimeoutError) as e:
                return await self._unknown(payout_id, payment_hash, e)
        if payment is None and isinstance(refused, errors.InvoiceExpired):
            await self._attempt_state(payment_hash, "not_initiated", failure="invoice expired")
            return await self._finish(payout_id, "needs_invoice",
                                      why(CheckReason.EXPIRED, "the invoice expired before it was paid"))
        if payment is None:
            return await self._unknown(payout_id, payment_hash, refused)
        return await self._settle_attempt(payout_id, payment_hash, payment)

    async def _unknown(self, payout_id: str, payment_hash: str, e: BaseException | None) -> Outcome:
        """LND did not tell us the payment's fate in time: `unknown`, never `failed` (the reconciler asks)."""
        detail = why(PayoutReason.OUTCOME_UNKNOWN,
                     "no final state from LND" if e is None else f"{type(e).__name__}: {getattr(e, 'detail', '')}")
        await self._attempt_state(payment_hash, "unknown", failure=detail[:200])
        return await self._finish(payout_id, "unknown", detail)

    async def _follow(self, stream) -> Payment | None:  # noqa: ANN001
        last = None
        async for p in stream:
            last = p
            if p.status.final:
                break
        return last

    async def _current(self, payment_hash: str) -> Payment | None:
        """LND's current view of a payment: the first update of ``TrackPaymentV2``, which is the
        payment's state now (never waiting for a final one); None if LND never initiated it."""
        try:
            async with aclosing(self.lnd.track_payment(bytes.fromhex(payment_hash))) as stream, \
                    asyncio.timeout(self.lnd.timeout):
                async for p in stream:
                    return p
        except errors.LndNotFound:
            return None
        raise errors.LndError("TrackPaymentV2", "the stream ended without a payment update")

    async def _settle_attempt(self, payout_id: str, payment_hash: str, payment: Payment) -> Outcome:
        if payment.status == PaymentStatus.SUCCEEDED:
            await self._attempt_state(payment_hash, "succeeded", fee=payment.fee_msat,
                                      preimage=payment.preimage.hex() if payment.preimage else None)
            return await self._finish(payout_id, "succeeded", "", fee=payment.fee_msat, payment_hash=payment_hash,
                                      preimage=payment.preimage.hex() if payment.preimage else None)
        if payment.status == PaymentStatus.FAILED:
            await self._attempt_state(payment_hash, "failed", failure=payment.failure_reason.name)
            async with self.sessions() as s:
                attempts = await s.scalar(select(Payout.attempts).where(Payout.id == payout_id)) or 0
            if payment.failure_reason == FailureReason.NO_ROUTE:
                hand_back, detail = await self._why_no_route(payment_hash)
                if hand_back:
                    return await self._finish(payout_id, "needs_invoice", detail)
                return await self._retry_or_give_up(payout_id, attempts, detail)
            if payment.failure_reason == FailureReason.INCORRECT_PAYMENT_DETAILS:
                return await self._finish(payout_id, "needs_invoice", why(
                    PayoutReason.PAYEE_REJECTED, "the payee's node refused the payment (its invoice is unknown "
                                                 "to it, canceled or for another amount)"))
            return await self._retry_or_give_up(payout_id, attempts, why(
                PayoutReason.PAYMENT_FAILED, f"LND's failure reason {payment.failure_reason.name}"))
        await self._attempt_state(payment_hash, "unknown", failure=f"status {payment.status.name}")
        return await self._finish(payout_id, "unknown", why(PayoutReason.IN_FLIGHT, f"payment {payment.status.name}"))

    async def _why_no_route(self, payment_hash: str) -> tuple[bool, str]:
        """LND's NO_ROUTE covers "none within the fee limit" and "none at all": ask which (QueryRoutes
        with no fee limit; nothing sent). (True, reason) when the payee must offer a cheaper route."""
        async with self.sessions() as s:
            a = await s.get(PayoutAttempt, payment_hash)
        if a is None:   # the caller has just updated it: cannot happen
            raise LookupError(f"no attempt {payment_hash}")
        try:
            fee = await self.lnd.route_fee(a.payment_request, cltv_limit=self.policy.cltv_limit)
        except errors.LndError as e:
            return False, why(PayoutReason.NO_ROUTE, f"no route within the fee limit {a.fee_limit_msat} msat "
                                                     f"(asking for one without it failed: {type(e).__name__})")
        if fee is not None and fee > a.fee_limit_msat:
            return True, why(PayoutReason.ROUTE_FEE_EXCEEDS_LIMIT,
                             f"the cheapest route to the invoice costs {fee} msat in fees and this payout allows "
                             f"{a.fee_limit_msat} msat; give an invoice reachable for less (a direct channel, or "
                             "route hints through cheaper channels)")
        return False, why(PayoutReason.NO_ROUTE, f"no route to the invoice's node within {self.policy.cltv_limit} "
                                                 "blocks of time lock" + ("" if fee is None else
                                                                          f" that worked (one costs {fee} msat)"))

    async def _attempt_state(self, payment_hash: str, state: str, *, fee: int | None = None,
                             preimage: str | None = None, failure: str | None = None) -> None:
        async with self.sessions.begin() as s:
            await s.execute(update(PayoutAttempt).where(PayoutAttempt.payment_hash == payment_hash,
                                                        PayoutAttempt.state != "succeeded")
                            .values(state=state, fee_msat=fee, preimage=preimage, failure=failure,
                                    updated_at=utcnow()))

    async def _retry_or_give_up(self, payout_id: str, attempts: int, detail: str) -> Outcome:
        if attempts >= self.policy.max_attempts:
            return await self._finish(payout_id, "needs_invoice",
                                      why(PayoutReason.GAVE_UP, f"after {attempts} attempt(s); the last: {detail}"))
        return await self._finish(payout_id, "pending", detail, retry=True, attempts=attempts)

    async def _finish(self, payout_id: str, state: str, detail: str, *, fee: int | None = None,
                      payment_hash: str | None = None, preimage: str | None = None, retry: bool = False,
                      attempts: int | None = None) -> Outcome:
        values: dict = {"state": state, "last_error": detail or None, "updated_at": utcnow(), "lease_until": None}
        if state == "needs_invoice":   # a new outcome for the engine, whatever the attempt count
            values["needs_invoice_count"] = Payout.needs_invoice_count + 1
        if state == "succeeded":
            values.update(fee_msat=fee, payment_hash=payment_hash, preimage=preimage, last_error=None)
        if state == "unknown":       # the reconciler's next pass looks at it
            values["next_attempt_at"] = utcnow()
        if retry:
            values["next_attempt_at"] = utcnow() + timedelta(seconds=self.policy.retry_seconds)
        if attempts is not None:
            values["attempts"] = attempts
        async with self.sessions.begin() as s:
            res = await s.execute(update(Payout).where(Payout.id == payout_id,
                                                       Payout.state.in_(("sending", "unknown")))
                                  .values(**values))
        if _rows(res) != 1:
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
            rows = (await s.scalars(select(Payout.id).where(or_(
                and_(Payout.state == "unknown", Payout.next_attempt_at <= now),
                and_(Payout.state == "sending", or_(Payout.lease_until.is_(None), Payout.lease_until <= now))))
                .order_by(Payout.next_attempt_at).limit(limit))).all()
        outcomes = []
        for pid in rows:
            try:
                async with asyncio.timeout(self.policy.reconcile_budget_seconds):
                    outcome = await self._reconcile_one(pid, allow_send)
            except errors.LndUnavailable as e:
                log.info("payout reconciliation: our node is unreachable (%s); the rest waits for the next pass", e)
                break
            except (errors.LndError, TimeoutError) as e:
                log.warning("payout %s: not resolved within its budget (%s); looked at again next pass", pid,
                            type(e).__name__)
                continue
            except Exception:  # noqa: BLE001 - one payout's trouble must not keep the others unresolved
                log.exception("payout %s: reconciliation failed; the others go on", pid)
                continue
            if outcome is not None:
                outcomes.append(outcome)
        return outcomes

    async def _reconcile_one(self, pid: str, allow_send: bool) -> Outcome | None:
        now = utcnow()
        # Taken for this pass (compare-and-set): another replica's reconciler skips it meanwhile. A
        # dead worker's `sending` becomes `unknown`, so a cut-short pass leaves it for the next.
        hold = now + timedelta(seconds=2 * self.policy.reconcile_budget_seconds)
        async with self.sessions.begin() as s:
            taken = await s.execute(update(Payout).where(Payout.id == pid, or_(
                and_(Payout.state == "unknown", Payout.next_attempt_at <= now),
                and_(Payout.state == "sending", or_(Payout.lease_until.is_(None), Payout.lease_until <= now))))
                .values(state="unknown", lease_until=None, next_attempt_at=hold, updated_at=now))
        if _rows(taken) != 1:
            return None
        async with self.sessions() as s:
            paid = (await s.execute(select(PayoutAttempt.payment_hash, PayoutAttempt.fee_msat, PayoutAttempt.preimage)
                                    .where(PayoutAttempt.payout_id == pid, PayoutAttempt.state == "succeeded"))).first()
            attempt = (await s.execute(select(PayoutAttempt)
                                       .where(PayoutAttempt.payout_id == pid,
                                              PayoutAttempt.state.in_(("sending", "unknown")))
                                       .order_by(PayoutAttempt.created_at.desc()))).scalars().first()
        if paid is not None:
            # LND's SUCCEEDED was recorded on the attempt, then the worker died before the payout
            # row: finish it. (Sent back to pending, its invoice would be refused as used, the
            # payee asked for another one and paid twice: the sigkill drill did exactly that.)
            return await self._finish(pid, "succeeded", "", fee=paid.fee_msat, payment_hash=paid.payment_hash,
                                      preimage=paid.preimage)
        if attempt is None:
            # Claimed but nothing was written ahead: no payment can exist. Back to pending.
            async with self.sessions.begin() as s:
                await s.execute(update(Payout).where(Payout.id == pid, Payout.state == "unknown")
                                .values(state="pending", next_attempt_at=utcnow(), updated_at=utcnow()))
            return Outcome(pid, "pending", "no attempt was written")
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
            await s.execute(update(Payout).where(Payout.id == pid, Payout.state == "unknown").values(
                next_attempt_at=now + timedelta(seconds=min(RECHECK_MAX_SECONDS, max(0.0, age / 4)))))
        status = "not sent (payouts paused)" if payment is None else payment.status.name
        return Outcome(pid, "unknown", why(PayoutReason.IN_FLIGHT, f"payment {status}"))

    async def _fetch_lnurl(self, target: str, amount_msat: int) -> str:
        from service.lightning import lnurl
        fetched = await lnurl.fetch_invoice(lnurl.parse_destination(target), amount_msat,
                                            allow_private=self.policy.lnurl_allow_private,
                                            network=self.policy.network)
        return fetched.bolt11


def _rows(result: Result) -> int:
    """The rows an UPDATE or INSERT matched (the result of a DML statement is a CursorResult)."""
    return cast(CursorResult, result).rowcount

