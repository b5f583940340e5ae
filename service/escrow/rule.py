"""The validation rule and the payout split: pure functions, exact arithmetic.

A candidate result is **accepted** when at least ``quorum`` designated validators
scored it and the median of their scores passes the threshold in the job's
direction (``max``: median >= threshold; ``min``: median <= threshold). The median of
an even number of scores is the mean of the two middle ones. Scores are bounded by the
codec (at most 15 digits before the point, 12 after), so the median is computed exactly
in a local decimal context and has at most 13 places (:func:`median`); no score a
validator chooses can make it long, inexact or an exponent.

A score may be **unreadable** (protocol.md §6: a sealed model that did not open to its
commitment): it sorts as the worst value in the job's direction, so one dishonest validator
cannot reject a readable model alone; when the median is (or is the mean with) an unreadable
score, the result is rejected ``unreadable`` (:func:`median_score`).

**Relative acceptance** (a job with a ``baseline``, protocol.md §6): the validators score the
baseline model too, and a result is accepted only if, besides the threshold, its median is
better than the baseline's median by more than 0 and by at least the job's minimum improvement
(:func:`improves`). A baseline with fewer than ``quorum`` scores rejects every result (nothing
can be shown to improve on it); an unreadable baseline median is beaten by any readable one.
A provider that returns the baseline unchanged has the baseline's scores, so it never passes.

Money (integer msat): the bid splits into the escrow fee, validator fees and the
provider share (``MoneySplit``). Every payout is a whole number of **satoshis**, because
that is what ordinary wallets invoice (LNbits, phoenixd, most mobile wallets); what the
rounding leaves is the escrow's, booked as fee income and shown in the decision:

- ``best``: the accepted result with the best median gets the whole provider share,
  rounded down to whole satoshis. A tie goes to the result the escrow **received first**
  (its receipt order, never a timestamp the sender chose), then the smaller id;
- ``split``: every accepted result gets ``share // n`` rounded down to whole satoshis;
- each validator whose scores counted gets its fee, rounded down to whole satoshis;
  the fee of a validator that scored nothing that counted is added to the providers'
  share (the customer paid for validation of the work it bought; docs/escrow.md).

:func:`routing_budgets` divides what the escrow earned on a job among the job's payouts,
so that routing fees can never cost the escrow more than it earned (docs/escrow.md).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Context, Decimal, Inexact, localcontext
from typing import Final

from service.nostr.protocol.fields import MEDIAN_PLACES
from service.nostr.protocol.money import whole_sats

# Sums and halves of two bounded scores (15 + 12 digits) are exact with this precision.
_EXACT = Context(prec=60, traps=[Inexact])
_MEDIAN_QUANTUM = Decimal(1).scaleb(-MEDIAN_PLACES)


class Unreadable(enum.Enum):
    """The score ``unreadable``: a typed value of its own, never a Decimal and never None (which
    means "not counted" where scores are stored)."""

    UNREADABLE = "unreadable"

    def __str__(self) -> str:
        return self.value


UNREADABLE: Final = Unreadable.UNREADABLE
#: A counted score: a bounded decimal, or unreadable.
ScoreValue = Decimal | Unreadable


@dataclass(frozen=True)
class CandidateScores:
    result_id: str
    provider: str
    received: int  # the escrow's receipt order (lower = received earlier)
    scores: dict[str, ScoreValue]  # validator -> value (the counted ones)


@dataclass(frozen=True)
class Verdict:
    result_id: str
    provider: str
    accepted: bool
    median: Decimal | None  # None: fewer than quorum scores, or unreadable
    reward_msat: int = 0
    unreadable: bool = False  # rejected because the median is (or is the mean with) an unreadable score
    below_baseline: bool = False  # rejected because it does not improve on the job's baseline (or it has no quorum)


@dataclass(frozen=True)
class Decision:
    verdicts: tuple[Verdict, ...]
    provider_rewards: dict[str, int]  # result id -> msat (whole satoshis)
    validator_fees: dict[str, int]  # validator pubkey -> msat (whole satoshis)
    fee_income_msat: int  # escrow fee + remainders
    remainder_msat: int  # the split remainder and the sub-satoshi rounding (part of fee income)
    baseline_median: ScoreValue | None = None  # None: no baseline, or fewer than quorum scores of it

    @property
    def accepted(self) -> tuple[Verdict, ...]:
        return tuple(v for v in self.verdicts if v.accepted)

    @property
    def total_msat(self) -> int:
        return sum(self.provider_rewards.values()) + sum(self.validator_fees.values()) + self.fee_income_msat


def median(values: list[Decimal]) -> Decimal:
    """The exact median, quantized to :data:`MEDIAN_PLACES` places and written without trailing zeros.

    Computed in a local context whose precision holds every sum of two bounded scores, with
    ``Inexact`` trapped: values outside the codec's bounds (which the engine never passes)
    raise instead of being rounded silently.
    """
    if not values:
        raise ValueError("median of nothing")
    s = sorted(values)
    mid = len(s) // 2
    with localcontext(_EXACT):
        exact = s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2
        return _plain(exact.quantize(_MEDIAN_QUANTUM, rounding=ROUND_HALF_EVEN))


def median_score(values: list[ScoreValue], direction: str) -> ScoreValue:
    """The median of counted scores where an unreadable one sorts as the worst in ``direction``
    (lowest for ``max``, highest for ``min``): :data:`UNREADABLE` when the median position (or
    one of the two middle ones) is unreadable, else the exact :func:`median`."""
    if not values:
        raise ValueError("median of nothing")
    readable = sorted(v for v in values if isinstance(v, Decimal))
    worst = [UNREADABLE] * (len(values) - len(readable))
    ordered: list[ScoreValue] = [*worst, *readable] if direction == "max" else [*readable, *worst]
    mid = len(ordered) // 2
    middle = ordered[mid : mid + 1] if len(ordered) % 2 else ordered[mid - 1 : mid + 1]
    decimals = [v for v in middle if isinstance(v, Decimal)]
    if len(decimals) != len(middle):
        return UNREADABLE
    return median(decimals)


def _plain(value: Decimal) -> Decimal:
    """``value`` without trailing fractional zeros, as an exponent-free decimal (``1.50`` -> ``1.5``, ``100`` stays)."""
    if value == value.to_integral_value():
        return value.quantize(Decimal(1))
    return value.normalize()


def passes(value: Decimal, threshold: Decimal, direction: str) -> bool:
    return value >= threshold if direction == "max" else value <= threshold


def better(a: Decimal, b: Decimal, direction: str) -> bool:
    return a > b if direction == "max" else a < b


def improves(value: Decimal, baseline: ScoreValue, min_improvement: Decimal, direction: str) -> bool:
    """Whether a median beats the baseline's median by more than 0 and by at least
    ``min_improvement`` in ``direction`` (an unreadable baseline is beaten by any number)."""
    if isinstance(baseline, Unreadable):
        return True
    with localcontext(_EXACT):
        gain = value - baseline if direction == "max" else baseline - value
    return gain > 0 and gain >= min_improvement


def decide(
    candidates: list[CandidateScores],
    *,
    quorum: int,
    threshold: Decimal,
    direction: str,
    policy: str,
    bid_msat: int,
    fee_msat: int,
    validator_fee_msat: int,
    validators: tuple[str, ...],
    baseline: dict[str, ScoreValue] | None = None,
    min_improvement: Decimal = Decimal(0),
    kept_validator_fees: dict[str, int] | None = None,
) -> Decision:
    """``baseline``: the counted scores of the job's baseline model (validator -> value), None
    for a job without one (absolute acceptance only). ``kept_validator_fees``: an appeal's final
    decision, whose scores are the appeal round's but whose validator fees (on release) are the ones
    the first decision gave (the appeal validators are paid by :func:`appeal_money`)."""
    if direction not in ("max", "min") or policy not in ("best", "split") or quorum < 1 or min_improvement < 0:
        raise ValueError("bad rule")
    base: ScoreValue | None = None
    if baseline is not None and len(baseline) >= quorum:
        base = median_score(list(baseline.values()), direction)
    verdicts: list[Verdict] = []
    for c in candidates:
        if len(c.scores) < quorum:
            verdicts.append(Verdict(c.result_id, c.provider, False, None))
            continue
        m = median_score(list(c.scores.values()), direction)
        if isinstance(m, Unreadable):
            verdicts.append(Verdict(c.result_id, c.provider, False, None, unreadable=True))
            continue
        below = baseline is not None and (base is None or not improves(m, base, min_improvement, direction))
        ok = passes(m, threshold, direction) and not below
        verdicts.append(Verdict(c.result_id, c.provider, ok, m, below_baseline=below))
    accepted = [v for v in verdicts if v.accepted]
    # (a validator that scored only the baseline scored no candidate: it earns nothing)
    counted_validators = [v for v in validators if any(v in c.scores for c in candidates)]
    validator_fees = {v: whole_sats(validator_fee_msat) for v in counted_validators if whole_sats(validator_fee_msat)}
    if kept_validator_fees is not None:
        validator_fees = dict(kept_validator_fees)
    share = bid_msat - fee_msat - validator_fee_msat * len(validator_fees)
    rewards: dict[str, int] = {}
    if accepted:
        if policy == "best":
            order = {c.result_id: (c.received, c.result_id) for c in candidates}
            winner = accepted[0]
            for v in accepted[1:]:
                assert v.median is not None and winner.median is not None
                if better(v.median, winner.median, direction) or (
                    v.median == winner.median and order[v.result_id] < order[winner.result_id]
                ):
                    winner = v
            rewards[winner.result_id] = whole_sats(share)
        else:
            each = whole_sats(share // len(accepted))
            rewards = {v.result_id: each for v in accepted}
        rewards = {k: v for k, v in rewards.items() if v > 0}
    else:
        validator_fees = {}
    final = tuple(
        Verdict(
            v.result_id, v.provider, v.accepted, v.median, rewards.get(v.result_id, 0), v.unreadable, v.below_baseline
        )
        for v in verdicts
    )
    if not accepted:
        return Decision(final, {}, {}, 0, 0, base)
    paid = sum(rewards.values()) + sum(validator_fees.values())
    fee_income = bid_msat - paid
    decision = Decision(final, rewards, validator_fees, fee_income, fee_income - fee_msat, base)
    if decision.total_msat != bid_msat or decision.remainder_msat < 0:
        raise AssertionError(f"split does not add up: {decision.total_msat} != {bid_msat}")
    return decision


def refundable(amount_msat: int, routing_fee_ppm: int) -> int:
    """What a payment back to the customer of ``amount_msat`` carries: the amount less the routing
    reserve of its own route (``routing_fee_ppm`` of it, rounded up), in whole satoshis. The
    escrow earned nothing on that money, so the route cannot be paid from anything else."""
    reserve = -(-amount_msat * routing_fee_ppm // 1_000_000)
    return max(0, whole_sats(amount_msat - reserve))


def routing_budgets(amounts: dict[str, int], budget_msat: int) -> dict[str, int]:
    """Divide ``budget_msat`` (what the escrow earned on a job) among its payouts, in proportion
    to their amounts and rounded down, so that the routing fees of all of them together can
    never exceed it. (The Lightning layer also caps each by a fraction of its own amount.)"""
    total = sum(amounts.values())
    if total <= 0 or budget_msat <= 0:
        return {k: 0 for k in amounts}
    return {k: budget_msat * amount // total for k, amount in amounts.items()}


@dataclass(frozen=True)
class AppealMoney:
    """Where an appeal's money goes (:func:`appeal_money`)."""

    validator_fees: dict[str, int]  # appeal validator -> msat (whole satoshis)
    from_appeal_fee: bool  # True: the fees come out of the appeal fee; False: the escrow's income on the job
    fee_refund_msat: int  # the appeal fee going back to the appellant (before its route's reserve)
    fee_income_msat: int  # of the appeal fee, what the escrow keeps


def appeal_money(
    *, won: bool, scorers: tuple[str, ...], validator_fee_msat: int, appeal_fee_msat: int, job_income_msat: int
) -> AppealMoney:
    """The appeal's money (docs/escrow.md, "Appeals"): each appeal validator who scored (``scorers``,
    in key order) earns the job's validator fee in whole satoshis. An appeal that **loses** pays them
    from its fee (the appellant asked for the round) and the escrow keeps the rest of the fee; one
    that **wins** has its fee refunded in full, and they are paid from the escrow's income on the job
    (``job_income_msat``: the escrow fee and remainders of the final decision; 0 when it refunds),
    because the escrow's first round was wrong. Either way each fee is capped at what its source
    still holds, in key order, so no source is overdrawn."""
    each = whole_sats(validator_fee_msat)
    left = appeal_fee_msat if not won else max(0, job_income_msat)
    fees: dict[str, int] = {}
    for v in scorers:
        fee = min(each, whole_sats(left))
        if fee <= 0:
            break
        fees[v] = fee
        left -= fee
    if won:
        return AppealMoney(fees, False, appeal_fee_msat, 0)
    return AppealMoney(fees, True, 0, appeal_fee_msat - sum(fees.values()))
