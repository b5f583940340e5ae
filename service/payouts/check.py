"""Invoice checks: the offline one (any path that hands a payout an invoice) and the full one
before every attempt (the worker; it asks our node too).

Both refuse with a :class:`CheckReason`. The offline check runs inside the caller's transaction
and never talks to the network (the engine's transaction must not wait on LND).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import bolt11
from sqlalchemy import String, cast, literal, select, union_all
from sqlalchemy.ext.asyncio import AsyncSession

from service.bitcoin import network_of_currency
from service.lightning import errors
from service.lightning.blinded import UnreadablePath, decode_invoice
from service.lightning.client import BlindedPath, LndClient, PayReq
from service.lightning.models import LnInvoice
from service.payouts.models import Payout, PayoutAttempt
from service.payouts.types import AttemptState, CheckReason, InvoiceCheckError, PayoutPolicy


@dataclass(frozen=True)
class DecodedInvoice:
    """What the offline check read from an invoice (our bolt11 decoder alone)."""

    payment_request: str  # without a ``lightning:`` prefix, lower case
    payment_hash: str
    amount_msat: int
    expires_at: int  # unix seconds


@dataclass(frozen=True)
class CheckedInvoice:
    payment_request: str
    payment_hash: str
    amount_msat: int
    destination: str  # a blinded invoice's is a one-time key, not the recipient's node
    expires_at: int
    final_cltv: int  # a blinded invoice's: its longest path's total CLTV delta
    blinded_paths: tuple[BlindedPath, ...] = ()


def final_cltv_of(node: PayReq) -> int:
    """The blocks the invoice's end of the route may lock our HTLC for: its final CLTV delta, or for
    a blinded invoice its longest path's total delta (its hops' deltas and the recipient's final
    one; the invoice's own ``c`` field means nothing there, bLIP 39)."""
    return max((p.total_cltv_delta for p in node.blinded_paths), default=node.cltv_expiry)


async def is_our_nodes_invoice(lnd: LndClient, node: PayReq, our_pubkey: str) -> bool:
    """Whether our node issued the invoice. A plain invoice is signed with its node's key (the
    destination). A blinded one is signed with a one-time key and its recipient is hidden behind
    the path, so our node is asked whether the payment hash is one of its invoices."""
    if node.destination == our_pubkey:
        return True
    if not node.blinded_paths:
        return False
    try:
        await lnd.lookup_invoice(node.payment_hash)
    except errors.LndNotFound:
        return False
    return True


def read_invoice(payment_request: str) -> tuple[bolt11.Bolt11, tuple[BlindedPath, ...]]:
    """Our own decoding of an invoice (no node): the ``bolt11`` library's, and the invoice's blinded
    paths (bLIP 39), which the library skips (:func:`service.lightning.blinded.decode_invoice`: a
    blinded invoice needs no payment secret). Raises InvoiceCheckError(UNDECODABLE)."""
    try:
        return decode_invoice(payment_request)
    except UnreadablePath as e:
        raise InvoiceCheckError(CheckReason.UNDECODABLE, f"unreadable blinded path ({e})") from None
    except Exception as e:  # noqa: BLE001 - the library raises several types for garbage
        raise InvoiceCheckError(CheckReason.UNDECODABLE, f"not a BOLT11 invoice ({type(e).__name__})") from None


def decoders_disagree(ours: bolt11.Bolt11, our_paths: tuple[BlindedPath, ...], node: PayReq) -> bool:
    """Whether our decoding and our node's differ in what decides the payment: the hash, the
    amount, the destination (for a blinded invoice the one-time key both recover from the
    signature) and every blinded path (introduction node, hops, fees, CLTV delta, HTLC range)."""
    return (
        node.payment_hash.hex() != ours.payment_hash
        or (ours.amount_msat or 0) != node.num_msat
        or bool(ours.payee and ours.payee != node.destination)
        or our_paths != node.blinded_paths
    )


def normalize(payment_request: str) -> str:
    """The invoice as stored and sent: trimmed, no ``lightning:`` URI prefix, lower case (BOLT11
    is case-insensitive and its checksum is computed over the lower-case form)."""
    pr = payment_request.strip().lower()
    return pr.removeprefix("lightning:")


def may_reuse(prior_payout: str, prior_state: AttemptState, payout_id: str | None) -> bool:
    """Whether a payout may send with a hash an attempt already has: only its own attempt that LND
    failed or never initiated. (A hash belongs to one payout; LND retries only a FAILED payment.)"""
    return prior_payout == payout_id and AttemptState(prior_state).reusable


def decode_offline(payment_request: str, *, network: str | None, now: int | None = None) -> DecodedInvoice:
    """Decode and check what needs no node: BOLT11 itself, the network (unless None: an invoice
    already checked once), an amount, not expired."""
    now = int(time.time()) if now is None else now
    pr = normalize(payment_request)
    ours, _ = read_invoice(pr)
    theirs = network_of_currency(ours.currency) or ours.currency
    if network is not None and theirs != network:
        raise InvoiceCheckError(CheckReason.WRONG_NETWORK, f"invoice is for {theirs}, we pay on {network}")
    if not ours.amount_msat:
        raise InvoiceCheckError(CheckReason.NO_AMOUNT, "invoice has no amount")
    expires_at = ours.date + ours.expiry
    if expires_at <= now:
        raise InvoiceCheckError(CheckReason.EXPIRED, "invoice has expired")
    return DecodedInvoice(pr, ours.payment_hash, int(ours.amount_msat), expires_at)


async def refuse_used_hash(session: AsyncSession, payment_hash: str, *, payout_id: str | None) -> None:
    """A hash that is one of our own invoices', another payout's attempt's or a paid payout's is
    refused. (Two payouts waiting with one invoice are both accepted: the write-ahead attempt row,
    whose primary key is the hash, lets only one of them send.)"""
    h = payment_hash
    # One round trip for the three places a hash may already be (this runs before every send).
    found = (
        await session.execute(
            union_all(
                select(literal("invoice"), literal(None, String), literal(None, String)).where(
                    LnInvoice.payment_hash == h
                ),
                select(literal("attempt"), PayoutAttempt.payout_id, cast(PayoutAttempt.state, String)).where(
                    PayoutAttempt.payment_hash == h
                ),
                select(literal("paid"), Payout.id, literal(None, String)).where(Payout.payment_hash == h),
            )
        )
    ).all()
    if any(where == "invoice" for where, _, _ in found):
        raise InvoiceCheckError(CheckReason.HASH_REUSED, "the payment hash is one of our own invoices")
    for where, other_payout, state in found:
        if where == "attempt" and not may_reuse(other_payout, AttemptState(state), payout_id):
            raise InvoiceCheckError(CheckReason.HASH_REUSED, "this payment hash was used before")
    for where, other_payout, _ in found:
        if where == "paid" and other_payout != payout_id:
            raise InvoiceCheckError(CheckReason.HASH_REUSED, "this payment hash paid another payout")


async def check_invoice(
    lnd: LndClient,
    session: AsyncSession,
    payment_request: str,
    *,
    amount_msat: int,
    policy: PayoutPolicy,
    our_pubkey: str,
    now: int | None = None,
    payout_id: str | None = None,
) -> CheckedInvoice:
    """Every check before any attempt; raises InvoiceCheckError with the first failing reason.

    Both our decoding (:func:`read_invoice`) and our node's ``DecodePayReq`` must read the invoice
    the same way, blinded paths included; the network matches; the amount is exactly the payout; it
    is not expired and will not expire within the payment window; its final CLTV (a blinded
    invoice's: its longest path's) is within the limit; it is not our own node's; a blinded one has
    a path that does not start at our node; its payment hash was never used by us before."""
    now = int(time.time()) if now is None else now
    pr = payment_request.strip()
    pr = pr[len("lightning:") :] if pr.lower().startswith("lightning:") else pr
    ours, our_paths = read_invoice(pr)
    network = network_of_currency(ours.currency) or ours.currency
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
    if decoders_disagree(ours, our_paths, node):
        raise InvoiceCheckError(CheckReason.DECODERS_DISAGREE, "our decoder and the node read the invoice differently")
    if not node.num_msat:
        raise InvoiceCheckError(CheckReason.NO_AMOUNT, "invoice has no amount")
    if node.num_msat != amount_msat:
        raise InvoiceCheckError(
            CheckReason.WRONG_AMOUNT, f"invoice is for {node.num_msat} msat, payout is {amount_msat}"
        )
    expires_at = node.timestamp + node.expiry
    if expires_at <= now:
        raise InvoiceCheckError(CheckReason.EXPIRED, "invoice has expired")
    if expires_at < now + policy.min_expiry_seconds:
        raise InvoiceCheckError(
            CheckReason.EXPIRES_TOO_SOON,
            f"invoice expires in {expires_at - now} s; at least {policy.min_expiry_seconds} s needed",
        )
    final_cltv = final_cltv_of(node)
    if final_cltv > policy.max_final_cltv:
        what = "a blinded path's total CLTV delta" if node.blinded_paths else "final CLTV"
        raise InvoiceCheckError(
            CheckReason.CLTV_TOO_LARGE, f"{what} {final_cltv} is over the limit {policy.max_final_cltv}"
        )
    if await is_our_nodes_invoice(lnd, node, our_pubkey):
        raise InvoiceCheckError(CheckReason.SELF_PAYMENT, "the invoice is our own node's")
    if node.blinded_paths and all(p.introduction_node == our_pubkey for p in node.blinded_paths):
        # LND v0.20.2 refuses a route to a blinded path that starts at itself ("introduction point
        # as own node not supported"; its payment fails NO_ROUTE): ask for another one now
        raise InvoiceCheckError(
            CheckReason.PATHS_START_AT_US,
            "every blinded path of the invoice starts at our node, which our node cannot pay; give an "
            "invoice with a path that starts at another node (your own, or another peer of yours), "
            "or one without blinded paths",
        )
    h = node.payment_hash.hex()
    await refuse_used_hash(session, h, payout_id=payout_id)
    return CheckedInvoice(pr, h, node.num_msat, node.destination, expires_at, final_cltv, node.blinded_paths)
