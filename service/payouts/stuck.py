"""A payment LND keeps in flight: LND's view of it, and the one rule for reissuing its payout.

LND v0.20.2 stopped in the middle of dispatching a payment can keep it IN_FLIGHT for good (no
HTLC on the channel, through restarts and past its timelock). The reconciler rightly never pays
such a payout again, so its job would stay ``releasing``. An operator looks at LND's view
(:func:`lnd_view`: status, each HTLC's state, attempt time and expiry height, the current block
height) and, when :func:`reissue_refusal` allows it, reissues the payout
(:func:`service.payouts.store.reissue`): the attempt is closed as ``abandoned`` (its hash never
used again) and the payee is asked for a new invoice.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from service.lightning import errors
from service.lightning.client import (
    ChannelHtlcs,
    FailureReason,
    HtlcAttemptStatus,
    LndClient,
    Payment,
    PaymentHtlc,
    PaymentStatus,
)
from service.payouts.types import PayoutState, ReissueReason

# An HTLC past its expiry height is timed out by our node on chain (LND goes on chain for an
# outgoing HTLC at its expiry); these further blocks let that timeout confirm before the
# payout's money may go out again.
REISSUE_MARGIN_BLOCKS = 6
# After its payment timeout LND starts no new HTLC for a payment (and one it resumed after a
# restart starts none at all); this margin covers clocks and LND's own bookkeeping.
PAYMENT_LOOP_MARGIN_SECONDS = 60


@dataclass(frozen=True)
class LndView:
    """What LND says of one payment now (``TrackPaymentV2``'s first update) and its block height."""

    payment_hash: str
    payment: Payment | None  # None: LND does not know the hash
    block_height: int
    channels: ChannelHtlcs = ChannelHtlcs(frozenset(), 0, 0)  # our node's unresolved HTLCs

    @property
    def on_channel(self) -> bool:
        """An HTLC with this payment's hash is on one of our open channels."""
        return self.payment_hash in self.channels.open_hashes

    @property
    def last_activity_ns(self) -> int:
        """The payment's creation or its latest HTLC attempt, whichever is later (unix ns)."""
        if self.payment is None:
            return 0
        return max([self.payment.creation_time_ns, *(h.attempt_time_ns for h in self.payment.htlcs)])

    def as_dict(self) -> dict[str, Any]:
        """The admin API's ``lnd`` object (openapi.yaml: LndPaymentView)."""
        p = self.payment
        return {
            "payment_hash": self.payment_hash,
            "status": None if p is None else p.status.name,
            "failure_reason": None if p is None or p.failure_reason is FailureReason.NONE else p.failure_reason.name,
            "created_at": None if p is None else _iso(p.creation_time_ns),
            "block_height": self.block_height,
            "htlcs": [] if p is None else [_htlc(h) for h in p.htlcs],
            "on_channel": self.on_channel,
            "htlcs_on_chain": self.channels.on_chain_outgoing,
            "summary": self.summary(),
        }

    def summary(self) -> str:
        """One line for a person: "LND: IN_FLIGHT, 1 HTLC in flight since …, expires at height H (now h)"."""
        p = self.payment
        if p is None:
            return f"LND: does not know the payment (now height {self.block_height})"
        parts = [f"LND: {p.status.name}"]
        if p.status is PaymentStatus.FAILED:
            parts[0] += f" ({p.failure_reason.name})"
        open_ = [h for h in p.htlcs if h.status is HtlcAttemptStatus.IN_FLIGHT]
        if open_:
            since = min(h.attempt_time_ns for h in open_)
            expiry = max(h.expiry_height for h in open_)
            parts.append(
                f"{len(open_)} HTLC{'s' if len(open_) != 1 else ''} in flight since {_iso(since)}, "
                f"expires at height {expiry} (now {self.block_height})"
            )
        else:
            parts.append(f"no HTLC in flight ({len(p.htlcs)} sent), now height {self.block_height}")
        if self.on_channel:
            parts.append("an HTLC of it is on a channel")
        return ", ".join(parts)


def _iso(ns: int) -> str | None:
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="seconds") if ns else None


def _htlc(h: PaymentHtlc) -> dict[str, Any]:
    return {
        "status": h.status.name,
        "attempted_at": _iso(h.attempt_time_ns),
        "resolved_at": _iso(h.resolve_time_ns),
        "expiry_height": h.expiry_height,
    }


async def lnd_view(lnd: LndClient, payment_hash: str) -> LndView:
    """Ask LND about a payment (TrackPaymentV2 with in-flight updates, its first message only) and
    its block height. Raises :class:`~service.lightning.errors.LndError` when our node does not answer."""
    payment, info, channels = await asyncio.gather(
        lnd.current_payment(bytes.fromhex(payment_hash)), lnd.get_info(), lnd.channel_htlcs()
    )
    return LndView(payment_hash, payment, info.block_height, channels)


def reissue_refusal(view: LndView, *, now_ns: int, payment_timeout_seconds: float) -> tuple[ReissueReason, str] | None:
    """THE rule for reissuing a payout whose payment LND keeps: None when allowed, else why not.

    Allowed only when LND knows the payment, no HTLC of it succeeded, and either

    1. LND reports it FAILED (LND fails a payment only once every HTLC of it is resolved), or
    2. LND shows no HTLC that could still settle and can start no new one: every HTLC it shows
       is FAILED, or IN_FLIGHT with its expiry height at least REISSUE_MARGIN_BLOCKS blocks behind
       the current height; no HTLC with its hash is on any of our channels, and no channel of ours
       being closed still has an HTLC out (on chain LND names no hash: any one refuses); and the
       payment's loop has run out (its last HTLC attempt, or its creation, is more than the
       payment timeout plus PAYMENT_LOOP_MARGIN_SECONDS ago).

    ``payment_timeout_seconds``: the timeout our sends give LND (``PayoutPolicy.timeout_seconds``)."""
    p = view.payment
    if p is None:
        return ReissueReason.NOT_INITIATED, (
            "LND does not know this payment; the reconciler sends its written-ahead attempt, or it never left"
        )
    if p.status is PaymentStatus.SUCCEEDED or p.preimage is not None:
        return ReissueReason.SUCCEEDED, f"LND reports the payment {p.status.name} with the payee's preimage: it is paid"
    if any(h.status is HtlcAttemptStatus.SUCCEEDED for h in p.htlcs):
        return ReissueReason.SUCCEEDED, "an HTLC of the payment succeeded: the payee has been paid"
    if p.status is PaymentStatus.FAILED:
        return None
    live = [
        h
        for h in p.htlcs
        if h.status is HtlcAttemptStatus.IN_FLIGHT and h.expiry_height + REISSUE_MARGIN_BLOCKS > view.block_height
    ]
    if live:
        expiry = max(h.expiry_height for h in live)
        return ReissueReason.MAY_STILL_SETTLE, (
            f"{len(live)} HTLC(s) in flight could still settle until height {expiry} "
            f"(reissue allowed from height {expiry + REISSUE_MARGIN_BLOCKS}, now {view.block_height}), "
            "unless LND reports the payment failed first"
        )
    if view.on_channel:
        return ReissueReason.MAY_STILL_SETTLE, "an HTLC with its hash is on one of our channels: it can still settle"
    if view.channels.on_chain_outgoing or view.channels.waiting_close:
        return ReissueReason.MAY_STILL_SETTLE, (
            f"{view.channels.on_chain_outgoing} outgoing HTLC(s) of channels being force-closed are not resolved "
            f"on chain yet ({view.channels.waiting_close} channel(s) waiting to close): one may be this payment's"
        )
    loop_ends_ns = view.last_activity_ns + int((payment_timeout_seconds + PAYMENT_LOOP_MARGIN_SECONDS) * 1e9)
    if now_ns < loop_ends_ns:
        return ReissueReason.MAY_STILL_SETTLE, (
            f"LND may still send an HTLC for the payment until {_iso(loop_ends_ns)} (its payment timeout "
            "and a margin after its last attempt)"
        )
    return None


def wants_lnd_view(state: PayoutState, lease_until: datetime | None, now: datetime) -> bool:
    """Whether a payout's payment may be stuck in LND: ``unknown``, or ``sending`` past its lease."""
    return state is PayoutState.UNKNOWN or (
        state is PayoutState.SENDING and lease_until is not None and lease_until <= now
    )


async def lnd_report(
    lnd: LndClient,
    payment_hash: str,
    *,
    state: PayoutState,
    payment_timeout_seconds: float,
    timeout: float = 5.0,
) -> dict[str, Any]:
    """LND's view of a payout's open attempt for the admin API and the dashboard, with whether a
    reissue would be allowed now (the payout must be ``unknown`` too); ``error`` when our node did
    not answer within ``timeout`` seconds."""
    try:
        async with asyncio.timeout(timeout):
            view = await lnd_view(lnd, payment_hash)
    except (errors.LndError, TimeoutError) as e:
        return {
            "payment_hash": payment_hash,
            "status": None,
            "summary": None,
            "reissue": None,
            "error": f"node_unavailable ({type(e).__name__})",
        }
    refusal = reissue_refusal(view, now_ns=time.time_ns(), payment_timeout_seconds=payment_timeout_seconds)
    if refusal is None and state is not PayoutState.UNKNOWN:
        refusal = ReissueReason.NOT_STUCK, f"payout is {state}; the reconciler takes it first"
    out = view.as_dict()
    out["error"] = None
    out["reissue"] = {
        "allowed": refusal is None,
        "code": None if refusal is None else refusal[0].value,
        "why": "LND reports the payment failed, or no HTLC of it can settle" if refusal is None else refusal[1],
    }
    return out
