"""The claim window in the protocol (§1, §7): the announced ``claim_window_s``, the reward
claimable's ``["claim_by", <unix>]`` and its ``claim_window_ending`` reminder, and the claim
expired feedback; older events without them still parse."""

from __future__ import annotations

import json
from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from service.nostr.protocol import (
    Announcement,
    ClaimExpired,
    RewardClaimable,
    build_announcement,
    build_claim_expired,
    build_reward_claimable,
    parse_announcement,
    parse_claim_expired,
    parse_escrow_feedback,
    parse_reward_claimable,
)
from service.nostr.protocol.feedback import REASON_CLAIM_WINDOW_ENDING
from service.nostr.protocol.fields import MAX_TIMESTAMP

from .test_codec_support import ESCROW, P1, TERMS, h, sign

JOB = h("a job")
times = st.integers(0, MAX_TIMESTAMP)
amounts = st.integers(1, 21_000_000 * 10**11)
earned = st.one_of(st.none(), st.just(h("a result")))


@given(claim_by=st.one_of(st.none(), times), amount=amounts, earned_by=earned, reminder=st.booleans())
def test_a_reward_claimable_round_trips_with_or_without_claim_by(
    claim_by: int | None, amount: int, earned_by: str | None, reminder: bool
) -> None:
    body = RewardClaimable(
        JOB,
        P1.public_key_hex,
        amount,
        earned_by,
        reason=REASON_CLAIM_WINDOW_ENDING if reminder else None,
        claim_by=claim_by,
    )
    event = sign(ESCROW, build_reward_claimable(body))
    assert parse_reward_claimable(event) == body
    assert (["claim_by", str(claim_by)] in [list(t) for t in event.tags]) is (claim_by is not None)


@given(claim_by=times, amount=amounts, earned_by=earned)
def test_a_claim_expired_round_trips_and_is_recognised_as_escrow_feedback(
    claim_by: int, amount: int, earned_by: str | None
) -> None:
    body = ClaimExpired(JOB, P1.public_key_hex, amount, claim_by, earned_by)
    event = sign(ESCROW, build_claim_expired(body))
    assert parse_claim_expired(event) == body
    assert parse_escrow_feedback(event) == body
    assert ["status", "error", "claim expired"] in [list(t) for t in event.tags]


@given(window=st.integers(0, 10**9))
def test_the_announced_claim_window_round_trips(window: int) -> None:
    announcement = Announcement(d="main", name="E", about="", terms=replace(TERMS, claim_window_s=window))
    assert parse_announcement(sign(ESCROW, build_announcement(announcement))) == announcement


def test_an_older_announcement_without_a_claim_window_parses_as_none_announced() -> None:
    tmpl = build_announcement(Announcement(d="main", name="E", about="", terms=replace(TERMS, claim_window_s=86_400)))
    body = json.loads(tmpl.content)
    del body["claim_window_s"]
    older = sign(ESCROW, (tmpl.kind, tmpl.tags, json.dumps(body)))
    assert parse_announcement(older).terms.claim_window_s == 0


def test_a_mistyped_claim_window_is_refused() -> None:
    from service.nostr.protocol import CodecError, CodecErrorReason

    tmpl = build_announcement(Announcement(d="main", name="E", about="", terms=TERMS))
    for bad in ("30", 1.5, None, -1):
        body = {**json.loads(tmpl.content), "claim_window_s": bad}
        try:
            parse_announcement(sign(ESCROW, (tmpl.kind, tmpl.tags, json.dumps(body))))
        except CodecError as e:
            assert e.reason is CodecErrorReason.INVALID_ANNOUNCEMENT
        else:  # pragma: no cover
            raise AssertionError(f"claim_window_s={bad!r} was accepted")
