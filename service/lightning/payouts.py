"""Payouts: checked invoices, write-ahead attempts, tracking before any resend, reconciliation.

Life of a payout (``ln_payouts``)::

    pending ──claim──► sending ──► succeeded
       ▲                  │  ├──► unknown ──(reconciler: TrackPaymentV2)──► succeeded | pending | needs_invoice
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
   may exist.
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

The fee limit is ``max(floor, amount × ppm)`` capped, and never zero.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

import bolt11
from sqlalchemy import or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.config import Settings
from service.db import insert_ignore, utcnow
from service.lightning import errors
from service.lightning.client import LndClient, Payment, PaymentStatus
from service.lightning.models import LnInvoice, Payout, PayoutAttempt

log = logging.getLogger(__name__)

MAX_MSAT = 2_100_000_000_000_000_000
NETWORK_OF = {"bc": "mainnet", "tb": "testnet", "tbs": "signet", "bcrt": "regtest", "sb": "simnet"}


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
    fee_floor_msat: int = 10_000
    fee_ppm: int = 5_000
    fee_cap_msat: int = 5_000_000
    timeout_seconds: int = 60
    max_attempts: int = 3
    retry_seconds: float = 60.0
    min_expiry_seconds: int = 300
    max_final_cltv: int = 432
    lease_seconds: float = 300.0
    lnurl_allow_private: bool = False

    @classmethod
    def from_settings(cls, s: Settings) -> PayoutPolicy:
        return cls(s.network, s.payout_fee_floor_msat, s.payout_fee_ppm, s.payout_fee_cap_msat,
                   s.payout_timeout_seconds, s.payout_max_attempts, s.payout_retry_seconds,
                   s.payout_invoice_min_expiry_seconds, s.payout_max_final_cltv,
                   lease_seconds=s.payout_lease_seconds, lnurl_allow_private=s.lnurl_allow_private)

    def fee_limit(self, amount_msat: int) -> int:
        return max(1, min(self.fee_cap_msat, max(self.fee_floor_msat, amount_msat * self.fee_ppm // 1_000_000)))


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
    if prior is not None and not (prior.payout_id == payout_id and prior.state == "failed"):
        raise InvoiceCheckError(CheckReason.HASH_REUSED, "this payment hash was used before")
    return CheckedInvoice(pr, h, node.num_msat, node.destination, expires_at, node.cltv_expiry)


# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    payout_id: str
    state: str
    detail: str = ""


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
        """Add a payout in the caller's transaction; idempotent by ``payout_id``."""
        if not 0 < amount_msat <= MAX_MSAT:
            raise ValueError("payout amount out of range")
        if destination != "none" and destination.split(":", 1)[0] not in ("bolt11", "lud16", "lnurl"):
            raise ValueError("destination must be none, bolt11:…, lud16:… or lnurl:…")
        now = utcnow()
        res = await session.execute(insert_ignore(session, Payout.__table__), [{
            "id": payout_id, "job_id": job_id, "payee": payee, "amount_msat": amount_msat,
            "destination": destination, "state": "pending" if destination != "none" else "needs_invoice",
            "attempts": 0, "next_attempt_at": now, "created_at": now, "updated_at": now}])
        return res.rowcount == 1

    async def submit_invoice(self, payout_id: str, payment_request: str) -> None:
        """The payee's own invoice for a payout waiting for one; checked now, and again before paying."""
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
        return list(await asyncio.gather(*(self._pay(pid) for pid in await self.claim_due(limit))))

    async def claim_due(self, limit: int) -> list[str]:
        """Claim up to ``limit`` due payouts (compare-and-set, a lease each); the caller pays them."""
        now = utcnow()
        claimed: list[str] = []
        async with self.sessions.begin() as s:
            q = (select(Payout.id).where(Payout.state == "pending", Payout.next_attempt_at <= now)
                 .order_by(Payout.next_attempt_at).limit(limit))
            if s.bind.dialect.name == "postgresql":
                q = q.with_for_update(skip_locked=True)   # replicas take disjoint rows without waiting
            for pid in (await s.scalars(q)).all():
                res = await s.execute(update(Payout).where(Payout.id == pid, Payout.state == "pending")
                                      .values(state="sending", updated_at=now,
                                              lease_until=now + timedelta(seconds=self.policy.lease_seconds)))
                if res.rowcount == 1:
                    claimed.append(pid)
        return claimed

    async def pay(self, payout_id: str) -> Outcome:
        """Pay one claimed payout (see ``claim_due``)."""
        return await self._pay(payout_id)

    async def _pay(self, payout_id: str) -> Outcome:
        async with self.sessions() as s:
            p = await s.get(Payout, payout_id)
        kind, _, value = p.destination.partition(":")
        try:
            if kind == "bolt11":
                payreq = value
            elif kind in ("lud16", "lnurl"):
                payreq = await self.fetch_invoice(value, p.amount_msat)
            else:
                return await self._finish(payout_id, "needs_invoice", "no destination")
        except Exception as e:  # noqa: BLE001 - a payee endpoint failing is the payee's problem, bounded
            return await self._retry_or_give_up(payout_id, p.attempts + 1, f"fetching invoice: {e}"[:300])
        try:
            async with self.sessions.begin() as s:
                checked = await check_invoice(self.lnd, s, payreq, amount_msat=p.amount_msat, policy=self.policy,
                                              our_pubkey=self.our_pubkey, payout_id=payout_id)
                fee_limit = self.policy.fee_limit(p.amount_msat)
                # Write-ahead: the attempt exists in the database before LND hears of it.
                res = await s.execute(insert_ignore(s, PayoutAttempt.__table__), [{
                    "payment_hash": checked.payment_hash, "payout_id": payout_id, "payment_request": checked.payment_request,
                    "fee_limit_msat": fee_limit, "state": "sending", "created_at": utcnow(), "updated_at": utcnow()}])
                fresh = res.rowcount == 1
                if not fresh:  # a retry of our own failed attempt with the same invoice
                    await s.execute(update(PayoutAttempt).where(PayoutAttempt.payment_hash == checked.payment_hash,
                                                                PayoutAttempt.payout_id == payout_id,
                                                                PayoutAttempt.state == "failed")
                                    .values(state="sending", updated_at=utcnow()))
                await s.execute(update(Payout).where(Payout.id == payout_id)
                                .values(attempts=Payout.attempts + 1, updated_at=utcnow()))
        except InvoiceCheckError as e:
            log.warning("payout %s: invoice refused: %s", payout_id, e)
            if kind == "bolt11":
                return await self._finish(payout_id, "needs_invoice", f"{e.reason.value}: {e.message}")
            return await self._retry_or_give_up(payout_id, p.attempts + 1, f"{e.reason.value}: {e.message}")
        except errors.LndError as e:
            # Our node did not answer a check (DecodePayReq): the write-ahead rolled back with the
            # transaction, so no payment can exist. Give the claim back now; left `sending`, the
            # payout would wait for its lease to run out and the reconciler's next pass.
            log.info("payout %s: node unavailable while checking the invoice: %s", payout_id, e)
            return await self._finish(payout_id, "pending", f"checking the invoice: {type(e).__name__}", retry=True)
        if fresh:
            self._fresh.add(checked.payment_hash)
        return await self._send(payout_id, checked.payment_hash, checked.payment_request, fee_limit)

    async def _send(self, payout_id: str, payment_hash: str, payreq: str, fee_limit: int) -> Outcome:
        # Never send what LND may already be sending: track first. Unless the write-ahead row was
        # created just now: no attempt with this hash existed, and every send of ours is preceded
        # by its committed row, so we never sent it (one paid from the node by hand shows up as
        # ALREADY_PAID / IN_TRANSITION below, and is tracked then).
        if payment_hash in self._fresh:
            self._fresh.discard(payment_hash)
        else:
            known = await self._track(payment_hash)
            if known is not None and known.status != PaymentStatus.FAILED:
                return await self._settle_attempt(payout_id, payment_hash, known)
        try:
            payment = await asyncio.wait_for(self._follow(self.lnd.send_payment(
                payreq, fee_limit_msat=fee_limit, timeout_seconds=self.policy.timeout_seconds)),
                self.policy.timeout_seconds + 30)
        except (errors.PaymentInTransition, errors.PaymentAlreadyPaid):
            payment = await self._track(payment_hash)
        except errors.InvoiceExpired:
            payment = await self._track(payment_hash)
            if payment is None:
                await self._attempt_state(payment_hash, "not_initiated", failure="invoice expired")
                return await self._finish(payout_id, "needs_invoice", "invoice expired before it was paid")
        except (errors.LndError, TimeoutError) as e:
            detail = f"{type(e).__name__}: {getattr(e, 'detail', '')}"[:300]
            await self._attempt_state(payment_hash, "unknown", failure=detail)
            return await self._finish(payout_id, "unknown", detail)
        if payment is None:
            await self._attempt_state(payment_hash, "unknown", failure="no final state")
            return await self._finish(payout_id, "unknown", "no final state from LND")
        return await self._settle_attempt(payout_id, payment_hash, payment)

    async def _follow(self, stream) -> Payment | None:  # noqa: ANN001
        last = None
        async for p in stream:
            last = p
            if p.status.final:
                break
        return last

    async def _track(self, payment_hash: str) -> Payment | None:
        """LND's final (or current) view of a payment; None if LND never initiated it."""
        try:
            return await asyncio.wait_for(self._follow(self.lnd.track_payment(bytes.fromhex(payment_hash))),
                                          self.policy.timeout_seconds + 30)
        except errors.LndNotFound:
            return None

    async def _settle_attempt(self, payout_id: str, payment_hash: str, payment: Payment) -> Outcome:
        if payment.status == PaymentStatus.SUCCEEDED:
            await self._attempt_state(payment_hash, "succeeded", fee=payment.fee_msat,
                                      preimage=payment.preimage.hex() if payment.preimage else None)
            return await self._finish(payout_id, "succeeded", "", fee=payment.fee_msat, payment_hash=payment_hash,
                                      preimage=payment.preimage.hex() if payment.preimage else None)
        if payment.status == PaymentStatus.FAILED:
            await self._attempt_state(payment_hash, "failed", failure=payment.failure_reason.name)
            async with self.sessions() as s:
                attempts = await s.scalar(select(Payout.attempts).where(Payout.id == payout_id))
            return await self._retry_or_give_up(payout_id, attempts, f"payment failed: {payment.failure_reason.name}")
        await self._attempt_state(payment_hash, "unknown", failure=f"status {payment.status.name}")
        return await self._finish(payout_id, "unknown", f"payment still {payment.status.name}")

    async def _attempt_state(self, payment_hash: str, state: str, *, fee: int | None = None,
                             preimage: str | None = None, failure: str | None = None) -> None:
        async with self.sessions.begin() as s:
            await s.execute(update(PayoutAttempt).where(PayoutAttempt.payment_hash == payment_hash,
                                                        PayoutAttempt.state != "succeeded")
                            .values(state=state, fee_msat=fee, preimage=preimage, failure=failure,
                                    updated_at=utcnow()))

    async def _retry_or_give_up(self, payout_id: str, attempts: int, detail: str) -> Outcome:
        if attempts >= self.policy.max_attempts:
            return await self._finish(payout_id, "needs_invoice", f"gave up after {attempts} attempt(s): {detail}")
        return await self._finish(payout_id, "pending", detail, retry=True, attempts=attempts)

    async def _finish(self, payout_id: str, state: str, detail: str, *, fee: int | None = None,
                      payment_hash: str | None = None, preimage: str | None = None, retry: bool = False,
                      attempts: int | None = None) -> Outcome:
        values: dict = {"state": state, "last_error": detail or None, "updated_at": utcnow(), "lease_until": None}
        if state == "needs_invoice":   # a new outcome for the engine, whatever the attempt count
            values["needs_invoice_count"] = Payout.needs_invoice_count + 1
        if state == "succeeded":
            values.update(fee_msat=fee, payment_hash=payment_hash, preimage=preimage, last_error=None)
        if retry:
            values["next_attempt_at"] = utcnow() + timedelta(seconds=self.policy.retry_seconds)
        if attempts is not None:
            values["attempts"] = attempts
        async with self.sessions.begin() as s:
            res = await s.execute(update(Payout).where(Payout.id == payout_id,
                                                       Payout.state.in_(("sending", "unknown")))
                                  .values(**values))
        if res.rowcount != 1:
            async with self.sessions() as s:
                current = await s.scalar(select(Payout.state).where(Payout.id == payout_id))
            return Outcome(payout_id, current or "missing", "state changed elsewhere")
        outcome = Outcome(payout_id, state, detail)
        if self.on_outcome is not None:
            await self.on_outcome(outcome)
        return outcome

    # ---- reconciliation ------------------------------------------------------------------
    async def reconcile(self) -> list[Outcome]:
        """Resolve every payout that may have a payment in LND: at start-up and on a schedule."""
        now = utcnow()
        async with self.sessions() as s:
            rows = (await s.execute(select(Payout.id, Payout.state, Payout.lease_until).where(or_(
                Payout.state == "unknown", Payout.state == "sending")))).all()
        outcomes = []
        for pid, state, lease_until in rows:
            if state == "sending" and lease_until is not None and _aware(lease_until) > now:
                continue  # a live worker holds it
            async with self.sessions() as s:
                paid = (await s.execute(select(PayoutAttempt.payment_hash, PayoutAttempt.fee_msat,
                                               PayoutAttempt.preimage)
                                        .where(PayoutAttempt.payout_id == pid, PayoutAttempt.state == "succeeded"))).first()
                attempt = (await s.execute(select(PayoutAttempt.payment_hash, PayoutAttempt.state)
                                           .where(PayoutAttempt.payout_id == pid,
                                                  PayoutAttempt.state.in_(("sending", "unknown")))
                                           .order_by(PayoutAttempt.created_at.desc()))).first()
            if paid is not None:
                # LND's SUCCEEDED was recorded on the attempt, then the worker died before the payout
                # row: finish it. (Sent back to pending, its invoice would be refused as used, the
                # payee asked for another one and paid twice: the sigkill drill did exactly that.)
                outcomes.append(await self._finish(pid, "succeeded", "", fee=paid.fee_msat,
                                                   payment_hash=paid.payment_hash, preimage=paid.preimage))
                continue
            if attempt is None:
                # Claimed but nothing was written ahead: no payment can exist. Back to pending.
                async with self.sessions.begin() as s:
                    await s.execute(update(Payout).where(Payout.id == pid, Payout.state.in_(("sending", "unknown")))
                                    .values(state="pending", lease_until=None, updated_at=utcnow()))
                outcomes.append(Outcome(pid, "pending", "no attempt was written"))
                continue
            payment = await self._track(attempt.payment_hash)
            if payment is None:
                # LND never initiated it: safe to send this attempt now (it was written ahead).
                async with self.sessions() as s:
                    a = await s.get(PayoutAttempt, attempt.payment_hash)
                async with self.sessions.begin() as s:
                    await s.execute(update(Payout).where(Payout.id == pid).values(state="sending", updated_at=utcnow()))
                outcomes.append(await self._send(pid, a.payment_hash, a.payment_request, a.fee_limit_msat))
            else:
                outcomes.append(await self._settle_attempt(pid, attempt.payment_hash, payment))
        return outcomes

    async def _fetch_lnurl(self, target: str, amount_msat: int) -> str:
        from service.lightning import lnurl
        fetched = await lnurl.fetch_invoice(lnurl.parse_destination(target), amount_msat,
                                            allow_private=self.policy.lnurl_allow_private,
                                            network=self.policy.network)
        return fetched.bolt11


def _aware(dt):  # noqa: ANN001, ANN202 - SQLite returns naive datetimes (stored in UTC)
    from datetime import timezone
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)
