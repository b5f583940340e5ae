"""The validation rule: exact, short medians of bounded scores; whole-satoshi rewards; receipt order."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.escrow import rule
from service.nostr.protocol import CodecError, CodecErrorReason
from service.nostr.protocol.fields import (
    MEDIAN_PLACES,
    SCORE_INT_DIGITS,
    SCORE_PLACES,
    format_decimal,
    parse_bounded_decimal,
)

R = CodecErrorReason
LIMIT = Decimal(10) ** SCORE_INT_DIGITS - Decimal(1).scaleb(-SCORE_PLACES)
bounded = st.decimals(min_value=-LIMIT, max_value=LIMIT, places=SCORE_PLACES, allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(st.lists(bounded, min_size=1, max_size=9))
def test_the_median_of_bounded_scores_is_exact_and_short(values):
    exact = sorted(Fraction(v) for v in values)
    mid = len(exact) // 2
    want = exact[mid] if len(exact) % 2 else (exact[mid - 1] + exact[mid]) / 2
    got = rule.median(values)
    assert Fraction(got) == want  # exact: nothing was rounded
    text = format_decimal(got, R.INVALID_VERDICT, "median")
    assert "E" not in text and len(text) <= 1 + SCORE_INT_DIGITS + 1 + MEDIAN_PLACES
    # what the escrow publishes is what a verdict parser reads back
    assert parse_bounded_decimal(text, R.INVALID_VERDICT, "median", places=MEDIAN_PLACES) == got


def test_two_scores_of_sixty_four_nines_are_refused_at_the_edge():
    """The attack of the issue: two validators scoring "9" * 64. The codec refuses the value, so it
    never reaches the median (whose mean was 1E+64, 65 characters, and made the verdict unwritable)."""
    with pytest.raises(CodecError) as exc:
        parse_bounded_decimal("9" * 64, R.SCORE_OUT_OF_RANGE, "score", shape=R.INVALID_SCORE_VALUE)
    assert exc.value.reason is R.SCORE_OUT_OF_RANGE
    with pytest.raises(ArithmeticError):  # and the rule itself never rounds such a value silently
        rule.median([Decimal("9" * 64), Decimal("9" * 64)])


def test_the_largest_bounded_scores_make_a_median_of_thirteen_places():
    top = Decimal("9" * 15 + "." + "9" * 12)
    assert rule.median([top, top - Decimal("0.000000000001")]) == Decimal("999999999999999.9999999999985")


def _cands(*specs: tuple[str, int, str]) -> list[rule.CandidateScores]:
    return [rule.CandidateScores(rid, f"p-{rid}", received, {"v1": Decimal(v)}) for rid, received, v in specs]


def test_a_tie_goes_to_the_result_received_first_not_the_earlier_timestamp():
    """Receipt order is the escrow's; a backdated ``created_at`` cannot win a tie."""
    cands = _cands(("honest", 1, "0.9"), ("copy", 2, "0.9"))
    d = rule.decide(
        cands,
        quorum=1,
        threshold=Decimal("0.8"),
        direction="max",
        policy="best",
        bid_msat=3_000_000,
        fee_msat=31_000,
        validator_fee_msat=0,
        validators=("v1",),
    )
    assert d.provider_rewards == {"honest": 2_969_000}


@settings(max_examples=200, deadline=None)
@given(
    bid=st.integers(100_000, 10**12),
    fee_ppm=st.integers(0, 50_000),
    vfee=st.integers(0, 10**7),
    n_accepted=st.integers(1, 12),
    policy=st.sampled_from(["best", "split"]),
)
def test_every_payout_is_whole_satoshis_and_the_split_adds_up(bid, fee_ppm, vfee, n_accepted, policy):
    fee = 1_000 + bid * fee_ppm // 1_000_000
    validators = ("v1", "v2")
    if bid - fee - 2 * vfee <= 0:
        return
    cands = [
        rule.CandidateScores(f"r{k}", f"p{k}", k, {"v1": Decimal("0.9"), "v2": Decimal("0.95")})
        for k in range(n_accepted)
    ]
    d = rule.decide(
        cands,
        quorum=2,
        threshold=Decimal("0.5"),
        direction="max",
        policy=policy,
        bid_msat=bid,
        fee_msat=fee,
        validator_fee_msat=vfee,
        validators=validators,
    )
    assert all(v % 1_000 == 0 and v > 0 for v in [*d.provider_rewards.values(), *d.validator_fees.values()])
    assert d.total_msat == bid and d.fee_income_msat >= fee and d.remainder_msat >= 0


@settings(max_examples=200, deadline=None)
@given(
    amounts=st.dictionaries(st.text(min_size=1, max_size=4), st.integers(1, 10**12), min_size=1, max_size=20),
    budget=st.integers(0, 10**9),
)
def test_routing_budgets_never_exceed_what_the_escrow_earned(amounts, budget):
    budgets = rule.routing_budgets(amounts, budget)
    assert set(budgets) == set(amounts)
    assert all(b >= 0 for b in budgets.values()) and sum(budgets.values()) <= budget


# ---- the decision rule, case by case (exact figures) ----------------------------------------


def _scored(*rows: tuple[str, dict[str, str]]) -> list[rule.CandidateScores]:
    return [
        rule.CandidateScores(rid, f"provider-{rid}", rank, {v: Decimal(x) for v, x in scores.items()})
        for rank, (rid, scores) in enumerate(rows)
    ]


@pytest.mark.parametrize(
    ("values", "median"),
    [
        (["3", "1", "2"], "2"),  # odd: the middle one
        (["1", "2", "3", "4"], "2.5"),  # even: the mean of the two middle ones
        (["0.1", "0.2"], "0.15"),
        (["5"], "5"),
        (["-1", "1"], "0"),
        (["0.3", "0.3", "0.9", "0.1"], "0.3"),  # duplicates count as themselves
    ],
)
def test_the_median_of_odd_and_even_counts(values: list[str], median: str) -> None:
    assert rule.median([Decimal(v) for v in values]) == Decimal(median)


def test_best_pays_the_best_median_and_a_tie_the_earlier_received() -> None:
    cands = _scored(
        ("a", {"v1": "0.7", "v2": "0.9"}), ("b", {"v1": "0.9", "v2": "0.9"}), ("c", {"v1": "0.9", "v2": "0.9"})
    )
    d = rule.decide(
        cands,
        quorum=2,
        threshold=Decimal("0.5"),
        direction="max",
        policy="best",
        bid_msat=1_000_000,
        fee_msat=10_000,
        validator_fee_msat=1_000,
        validators=("v1", "v2"),
    )
    assert d.provider_rewards == {"b": 988_000}  # b and c tie at 0.9: b came first
    assert d.validator_fees == {"v1": 1_000, "v2": 1_000}
    assert d.fee_income_msat == 10_000 and d.remainder_msat == 0
    assert [v.accepted for v in d.verdicts] == [True, True, True]


def test_min_direction_prefers_the_lowest_median_and_rejects_above_the_threshold() -> None:
    cands = _scored(("loss-low", {"v1": "0.2"}), ("loss-high", {"v1": "0.6"}))
    d = rule.decide(
        cands,
        quorum=1,
        threshold=Decimal("0.5"),
        direction="min",
        policy="best",
        bid_msat=100_000,
        fee_msat=1_000,
        validator_fee_msat=0,
        validators=("v1",),
    )
    assert d.provider_rewards == {"loss-low": 99_000}
    assert [v.accepted for v in d.verdicts] == [True, False]


def test_split_divides_in_whole_satoshis_and_the_remainder_is_fee_income() -> None:
    cands = _scored(("a", {"v1": "0.9"}), ("b", {"v1": "0.8"}), ("c", {"v1": "0.7"}), ("d", {"v1": "0.1"}))
    d = rule.decide(
        cands,
        quorum=1,
        threshold=Decimal("0.5"),
        direction="max",
        policy="split",
        bid_msat=1_000_000,
        fee_msat=10_000,
        validator_fee_msat=2_000,
        validators=("v1",),
    )
    share = 1_000_000 - 10_000 - 2_000  # 988,000 among three accepted
    each = share // 3 // 1000 * 1000  # 329,333 -> 329,000 (whole sats)
    assert d.provider_rewards == {"a": each, "b": each, "c": each}
    assert d.remainder_msat == share - 3 * each == 1_000
    assert d.fee_income_msat == 10_000 + 1_000
    assert d.total_msat == 1_000_000


def test_a_validator_whose_scores_did_not_count_earns_nothing_and_its_fee_goes_to_the_providers() -> None:
    cands = _scored(("a", {"v1": "0.9"}))  # v2 scored nothing that counted
    d = rule.decide(
        cands,
        quorum=1,
        threshold=Decimal("0.5"),
        direction="max",
        policy="best",
        bid_msat=1_000_000,
        fee_msat=10_000,
        validator_fee_msat=5_000,
        validators=("v1", "v2"),
    )
    assert d.validator_fees == {"v1": 5_000}
    assert d.provider_rewards == {"a": 1_000_000 - 10_000 - 5_000}  # v2's fee stays with the providers


def test_below_quorum_nothing_is_accepted_and_nobody_is_paid() -> None:
    cands = _scored(("a", {"v1": "0.9"}), ("b", {}))
    d = rule.decide(
        cands,
        quorum=2,
        threshold=Decimal("0.5"),
        direction="max",
        policy="split",
        bid_msat=1_000_000,
        fee_msat=10_000,
        validator_fee_msat=5_000,
        validators=("v1", "v2"),
    )
    assert not d.accepted and d.provider_rewards == {} and d.validator_fees == {}
    assert [(v.accepted, v.median) for v in d.verdicts] == [(False, None), (False, None)]


def test_a_passing_median_at_exactly_the_threshold_is_accepted() -> None:
    cands = _scored(("a", {"v1": "0.4", "v2": "0.6"}))  # median 0.5 == threshold
    d = rule.decide(
        cands,
        quorum=2,
        threshold=Decimal("0.5"),
        direction="max",
        policy="best",
        bid_msat=100_000,
        fee_msat=1_000,
        validator_fee_msat=0,
        validators=("v1", "v2"),
    )
    assert d.provider_rewards == {"a": 99_000}


# ----------------------------------------------------------------------------- unreadable scores (§6)

U = rule.UNREADABLE


def _decide_one(scores: dict[str, rule.ScoreValue], direction: str = "max", quorum: int = 2) -> rule.Verdict:
    d = rule.decide(
        [rule.CandidateScores("a", "provider-a", 0, scores)],
        quorum=quorum,
        threshold=Decimal("0.5"),
        direction=direction,
        policy="best",
        bid_msat=1_000_000,
        fee_msat=10_000,
        validator_fee_msat=1_000,
        validators=tuple(scores),
    )
    return d.verdicts[0]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.decimals(min_value=Decimal("0.5"), max_value=1, places=3), min_size=2, max_size=2),
    st.sampled_from(["max", "min"]),
)
def test_one_lying_validator_cannot_reject_a_readable_model_that_two_of_three_read(good, direction) -> None:
    # Both honest scores pass the threshold in the job's direction; the third validator says unreadable.
    honest = good if direction == "max" else [1 - g for g in good]
    v = _decide_one({"v1": honest[0], "v2": U, "v3": honest[1]}, direction)
    assert v.accepted and not v.unreadable
    assert v.median == (max(honest) if direction == "min" else min(honest))  # the worse of the two readable


@settings(max_examples=200, deadline=None)
@given(st.decimals(min_value=-10, max_value=10, places=3), st.sampled_from(["max", "min"]), st.integers(0, 2))
def test_two_of_three_unreadable_rejects_the_result_unreadable(score, direction, where) -> None:
    values: list[rule.ScoreValue] = [U, U]
    values.insert(where, score)
    v = _decide_one({f"v{k}": x for k, x in enumerate(values)}, direction)
    assert not v.accepted and v.unreadable and v.median is None and v.reward_msat == 0


@pytest.mark.parametrize(
    ("values", "direction", "median"),
    [
        (["0.9", U], "max", U),  # even: the mean with an unreadable one
        (["0.9", U], "min", U),
        (["0.9", "0.8", U], "max", Decimal("0.8")),  # unreadable is the lowest under max
        (["0.1", "0.2", U], "min", Decimal("0.2")),  # and the highest under min
        (["0.1", "0.2", "0.3", U], "max", Decimal("0.15")),  # even, the two middle ones readable
        (["0.1", "0.2", "0.3", U], "min", Decimal("0.25")),
        ([U], "max", U),
    ],
)
def test_an_unreadable_score_sorts_as_the_worst_in_the_jobs_direction(values, direction, median) -> None:
    scores = [x if x is U else Decimal(x) for x in values]
    assert rule.median_score(scores, direction) == median


def test_unreadable_scores_count_towards_quorum_and_earn_their_validators_fees() -> None:
    d = rule.decide(
        [
            rule.CandidateScores("a", "provider-a", 0, {"v1": Decimal("0.9"), "v2": Decimal("0.8"), "v3": U}),
            rule.CandidateScores("b", "provider-b", 1, {"v1": U, "v2": U}),
        ],
        quorum=2,
        threshold=Decimal("0.5"),
        direction="max",
        policy="split",
        bid_msat=1_000_000,
        fee_msat=10_000,
        validator_fee_msat=1_000,
        validators=("v1", "v2", "v3"),
    )
    a, b = d.verdicts
    assert a.accepted and a.median == Decimal("0.8") and a.reward_msat > 0
    assert not b.accepted and b.unreadable and b.median is None and b.reward_msat == 0
    assert d.provider_rewards == {"a": a.reward_msat}
    assert set(d.validator_fees) == {"v1", "v2", "v3"}  # each scored, unreadable included


# ------------------------------------------------------------------ relative acceptance


def _relative(cands, baseline, *, direction="min", threshold="5", margin="0", quorum=2):
    return rule.decide(
        cands,
        quorum=quorum,
        threshold=Decimal(threshold),
        direction=direction,
        policy="split",
        bid_msat=1_000_000,
        fee_msat=10_000,
        validator_fee_msat=5_000,
        validators=("v1", "v2", "v3"),
        baseline=None if baseline is None else {k: Decimal(v) for k, v in baseline.items()},
        min_improvement=Decimal(margin),
    )


def test_a_lazy_result_equal_to_the_baseline_is_rejected_and_the_improvers_share_the_reward() -> None:
    baseline = {"v1": "2.50", "v2": "2.60", "v3": "2.55"}
    cands = _scored(
        ("lazy", dict(baseline)),  # the global model returned unchanged: the same scores
        ("good", {"v1": "2.40", "v2": "2.45", "v3": "2.44"}),
    )
    d = _relative(cands, baseline)
    by = {v.result_id: v for v in d.verdicts}
    assert not by["lazy"].accepted and by["lazy"].below_baseline and by["lazy"].median == Decimal("2.55")
    assert by["good"].accepted and not by["good"].below_baseline
    assert d.baseline_median == Decimal("2.55")
    assert set(d.provider_rewards) == {"good"}
    # without a baseline the same lazy result passes the absolute threshold: the hole this closes
    assert {v.result_id for v in _relative(cands, None).accepted} == {"lazy", "good"}


@pytest.mark.parametrize(
    ("direction", "base", "value", "margin", "accepted"),
    [
        ("min", "2.5", "2.49", "0.01", True),  # exactly the margin
        ("min", "2.5", "2.495", "0.01", False),  # better, but by less than the margin
        ("min", "2.5", "2.5", "0", False),  # equal is not better, even with no margin
        ("min", "2.5", "2.6", "0", False),  # worse
        ("max", "0.80", "0.85", "0.05", True),
        ("max", "0.80", "0.84", "0.05", False),
        ("max", "0.80", "0.80", "0", False),
        ("max", "0.80", "0.8000001", "0", True),
    ],
)
def test_a_result_must_beat_the_baselines_median_by_the_margin(direction, base, value, margin, accepted) -> None:
    threshold = "100" if direction == "min" else "0"
    cands = _scored(("r", {"v1": value, "v2": value}))
    d = _relative(cands, {"v1": base, "v2": base}, direction=direction, threshold=threshold, margin=margin)
    assert d.verdicts[0].accepted is accepted
    assert d.verdicts[0].below_baseline is not accepted


def test_the_threshold_still_applies_with_a_baseline() -> None:
    cands = _scored(("r", {"v1": "6", "v2": "6"}))  # much better than the baseline, worse than the threshold
    d = _relative(cands, {"v1": "9", "v2": "9"}, threshold="5")
    assert not d.verdicts[0].accepted and not d.verdicts[0].below_baseline


def test_a_baseline_short_of_quorum_rejects_everything_and_only_candidates_earn_validator_fees() -> None:
    cands = _scored(("r", {"v1": "1.0", "v2": "1.0"}))
    d = _relative(cands, {"v1": "2.0"})  # one baseline score, quorum 2: no improvement can be shown
    assert not d.accepted and d.verdicts[0].below_baseline and d.baseline_median is None
    # v3 scored only the baseline: it scored no candidate, so it earns no fee
    d = _relative(_scored(("r", {"v1": "1.0", "v2": "1.0"})), {"v1": "2.0", "v2": "2.0", "v3": "2.0"})
    assert d.accepted and set(d.validator_fees) == {"v1", "v2"}


def test_an_unreadable_baseline_is_beaten_by_any_readable_median() -> None:
    cands = _scored(("r", {"v1": "3.0", "v2": "3.0"}))
    d = rule.decide(
        cands,
        quorum=2,
        threshold=Decimal("5"),
        direction="min",
        policy="best",
        bid_msat=1_000_000,
        fee_msat=10_000,
        validator_fee_msat=0,
        validators=("v1", "v2"),
        baseline={"v1": rule.UNREADABLE, "v2": rule.UNREADABLE},
        min_improvement=Decimal("0.5"),
    )
    assert d.accepted and d.baseline_median is rule.UNREADABLE


@settings(max_examples=200, deadline=None)
@given(
    st.lists(bounded, min_size=2, max_size=5),
    st.sampled_from(["max", "min"]),
    st.decimals(min_value=0, max_value=10, places=3),
)
def test_whoever_returns_the_baseline_unchanged_is_never_accepted(scores, direction, margin) -> None:
    validators = tuple(f"v{i}" for i in range(len(scores)))
    same = dict(zip(validators, scores, strict=True))
    d = rule.decide(
        [rule.CandidateScores("lazy", "p", 0, dict(same))],
        quorum=len(scores),
        threshold=-LIMIT if direction == "max" else LIMIT,  # any median passes the threshold
        direction=direction,
        policy="best",
        bid_msat=1_000_000,
        fee_msat=0,
        validator_fee_msat=0,
        validators=validators,
        baseline=dict(same),
        min_improvement=margin,
    )
    assert not d.accepted
