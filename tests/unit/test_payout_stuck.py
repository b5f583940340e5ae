"""The rule for reissuing a payout whose payment LND keeps in flight (service.payouts.stuck).

The rule is a pure function of LND's view (its payment record and block height) and the clock:
each case here is a view LND can report. Allowed means no HTLC of the payment can still settle
and LND can start no new one; anything else is refused with a stable code.
"""

from __future__ import annotations

import pytest

from service.lightning.client import ChannelHtlcs, FailureReason, HtlcAttemptStatus, Payment, PaymentHtlc, PaymentStatus
from service.payouts.check import may_reuse
from service.payouts.stuck import PAYMENT_LOOP_MARGIN_SECONDS, REISSUE_MARGIN_BLOCKS, LndView, reissue_refusal
from service.payouts.types import AttemptState, ReissueReason

NOW_NS = 1_800_000_000 * 10**9
TIMEOUT = 60  # the payout timeout our sends give LND
LONG_AGO = NOW_NS - 3600 * 10**9  # well past the payment loop
RECENT = NOW_NS - 10 * 10**9
HEIGHT = 500


def htlc(status: HtlcAttemptStatus, expiry: int, at: int = LONG_AGO) -> PaymentHtlc:
    return PaymentHtlc(status=status, attempt_time_ns=at, resolve_time_ns=0, expiry_height=expiry)


def view(
    status: PaymentStatus | None,
    *htlcs: PaymentHtlc,
    created: int = LONG_AGO,
    preimage: bytes | None = None,
    height: int = HEIGHT,
) -> LndView:
    if status is None:
        return LndView("ab" * 32, None, height)
    payment = Payment(
        payment_hash=bytes.fromhex("ab" * 32),
        status=status,
        value_msat=50_000,
        fee_msat=0,
        preimage=preimage,
        failure_reason=FailureReason.INCORRECT_PAYMENT_DETAILS
        if status is PaymentStatus.FAILED
        else FailureReason.NONE,
        payment_index=1,
        creation_time_ns=created,
        htlc_attempts=len(htlcs),
        htlcs=htlcs,
    )
    return LndView("ab" * 32, payment, height)


def verdict(v: LndView) -> ReissueReason | None:
    refusal = reissue_refusal(v, now_ns=NOW_NS, payment_timeout_seconds=TIMEOUT)
    return None if refusal is None else refusal[0]


IN, OK, NO = HtlcAttemptStatus.IN_FLIGHT, HtlcAttemptStatus.SUCCEEDED, HtlcAttemptStatus.FAILED
PASSED = HEIGHT - REISSUE_MARGIN_BLOCKS  # an expiry this low is far enough behind the tip


@pytest.mark.parametrize(
    ("case", "v", "expected"),
    [
        ("LND does not know the hash", view(None), ReissueReason.NOT_INITIATED),
        ("LND failed it (payee canceled)", view(PaymentStatus.FAILED, htlc(NO, HEIGHT + 80)), None),
        ("LND failed it before any HTLC", view(PaymentStatus.FAILED), None),
        ("succeeded", view(PaymentStatus.SUCCEEDED, htlc(OK, HEIGHT + 80)), ReissueReason.SUCCEEDED),
        (
            "in flight, but an HTLC already succeeded",
            view(PaymentStatus.IN_FLIGHT, htlc(OK, PASSED - 100), htlc(IN, PASSED - 100)),
            ReissueReason.SUCCEEDED,
        ),
        (
            "in flight with the preimage known",
            view(PaymentStatus.IN_FLIGHT, htlc(IN, PASSED - 100), preimage=b"\x01" * 32),
            ReissueReason.SUCCEEDED,
        ),
        (
            "held by the payee, before its expiry",
            view(PaymentStatus.IN_FLIGHT, htlc(IN, HEIGHT + 80)),
            ReissueReason.MAY_STILL_SETTLE,
        ),
        (
            "past its expiry, within the margin",
            view(PaymentStatus.IN_FLIGHT, htlc(IN, PASSED + 1)),
            ReissueReason.MAY_STILL_SETTLE,
        ),
        ("past its expiry by the margin", view(PaymentStatus.IN_FLIGHT, htlc(IN, PASSED)), None),
        (
            "one HTLC past, another still live",
            view(PaymentStatus.IN_FLIGHT, htlc(IN, PASSED - 50), htlc(IN, HEIGHT + 10)),
            ReissueReason.MAY_STILL_SETTLE,
        ),
        ("in flight, HTLCs failed, loop over", view(PaymentStatus.IN_FLIGHT, htlc(NO, HEIGHT + 80)), None),
        (
            "in flight, HTLCs failed, LND may still send another",
            view(PaymentStatus.IN_FLIGHT, htlc(NO, HEIGHT + 80, at=RECENT)),
            ReissueReason.MAY_STILL_SETTLE,
        ),
        ("in flight, no HTLC, loop over (the drill's stuck case)", view(PaymentStatus.IN_FLIGHT), None),
        (
            "in flight, no HTLC yet, just created",
            view(PaymentStatus.IN_FLIGHT, created=RECENT),
            ReissueReason.MAY_STILL_SETTLE,
        ),
        ("initiated, just created", view(PaymentStatus.INITIATED, created=RECENT), ReissueReason.MAY_STILL_SETTLE),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_the_reissue_rule(case: str, v: LndView, expected: ReissueReason | None) -> None:
    assert verdict(v) == expected, case


def test_an_htlc_on_a_channel_or_unresolved_on_chain_refuses_the_timelock_path() -> None:
    """Past its expiry by the margin, but our node still has the HTLC on a channel (by its hash), or a
    channel being force-closed still has an outgoing HTLC on chain (LND names no hash there)."""
    past = view(PaymentStatus.IN_FLIGHT, htlc(IN, PASSED))
    assert verdict(past) is None
    on_channel = LndView(past.payment_hash, past.payment, HEIGHT, ChannelHtlcs(frozenset({past.payment_hash}), 0, 0))
    assert verdict(on_channel) is ReissueReason.MAY_STILL_SETTLE
    assert on_channel.summary().endswith("an HTLC of it is on a channel")
    other_hash = LndView(past.payment_hash, past.payment, HEIGHT, ChannelHtlcs(frozenset({"cd" * 32}), 0, 0))
    assert verdict(other_hash) is None
    for channels in (ChannelHtlcs(frozenset(), 1, 0), ChannelHtlcs(frozenset(), 0, 1)):
        assert verdict(LndView(past.payment_hash, past.payment, HEIGHT, channels)) is ReissueReason.MAY_STILL_SETTLE
    # LND's FAILED needs none of it: it fails a payment only once every HTLC of it is resolved
    failed = view(PaymentStatus.FAILED, htlc(NO, HEIGHT + 80))
    assert verdict(LndView(failed.payment_hash, failed.payment, HEIGHT, ChannelHtlcs(frozenset(), 2, 1))) is None


def test_the_payment_loop_bound_is_the_timeout_plus_the_margin_after_the_last_attempt() -> None:
    edge = NOW_NS - (TIMEOUT + PAYMENT_LOOP_MARGIN_SECONDS) * 10**9
    assert verdict(view(PaymentStatus.IN_FLIGHT, created=edge)) is None
    assert verdict(view(PaymentStatus.IN_FLIGHT, created=edge + 1)) is ReissueReason.MAY_STILL_SETTLE
    # a late HTLC attempt counts, not the creation
    late = view(PaymentStatus.IN_FLIGHT, htlc(NO, HEIGHT, at=edge + 1), created=LONG_AGO)
    assert verdict(late) is ReissueReason.MAY_STILL_SETTLE


def test_a_refusal_says_when_a_reissue_becomes_possible() -> None:
    refusal = reissue_refusal(
        view(PaymentStatus.IN_FLIGHT, htlc(IN, HEIGHT + 80)), now_ns=NOW_NS, payment_timeout_seconds=TIMEOUT
    )
    assert refusal is not None
    assert f"until height {HEIGHT + 80}" in refusal[1]
    assert f"from height {HEIGHT + 80 + REISSUE_MARGIN_BLOCKS}, now {HEIGHT}" in refusal[1]


def test_the_summary_an_operator_reads() -> None:
    v = view(PaymentStatus.IN_FLIGHT, htlc(IN, 580, at=LONG_AGO))
    assert v.summary() == (
        "LND: IN_FLIGHT, 1 HTLC in flight since 2027-01-15T07:00:00+00:00, expires at height 580 (now 500)"
    )
    assert view(PaymentStatus.FAILED).summary() == (
        "LND: FAILED (INCORRECT_PAYMENT_DETAILS), no HTLC in flight (0 sent), now height 500"
    )
    assert view(None).summary() == "LND: does not know the payment (now height 500)"


def test_an_abandoned_attempt_is_never_reusable() -> None:
    """The hash of a reissued payout's stuck payment is never sent again, by that payout or another
    (check.may_reuse allows only an attempt LND failed or never initiated)."""
    assert not AttemptState.ABANDONED.reusable
    assert not may_reuse("p1", AttemptState.ABANDONED, "p1")
    assert not may_reuse("p1", AttemptState.ABANDONED, "p2")
