"""The validation rule and the payout split: pure functions, exact arithmetic.

A candidate result is **accepted** when at least ``quorum`` designated validators
scored it and the median of their scores passes the threshold in the job's
direction (``max``: median >= threshold; ``min``: median <= threshold). The median of
an even number of scores is the mean of the two middle ones, computed exactly with
``Decimal``.

Money (integer msat): the bid splits into the escrow fee, validator fees and the
provider share (``MoneySplit``). On release:

- ``best``: the accepted result with the best median gets the whole provider share
  (a tie goes to the earlier result, then the smaller id);
- ``split``: every accepted result gets ``share // n``; the remainder (< n msat) goes to
  the escrow's fee account, recorded as such;
- each validator whose scores counted gets its fee; the fee of a validator that scored
  nothing that counted is added to the providers' share (the customer paid for
  validation of the work it bought; documented in docs/escrow.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

DEC_CONTEXT_PLACES = 40


@dataclass(frozen=True)
class CandidateScores:
    result_id: str
    provider: str
    created_at: int
    scores: dict[str, Decimal]          # validator -> value (the counted ones)


@dataclass(frozen=True)
class Verdict:
    result_id: str
    provider: str
    accepted: bool
    median: Decimal | None               # None: fewer than quorum scores
    reward_msat: int = 0


@dataclass(frozen=True)
class Decision:
    verdicts: tuple[Verdict, ...]
    provider_rewards: dict[str, int]     # result id -> msat
    validator_fees: dict[str, int]       # validator pubkey -> msat
    fee_income_msat: int                 # escrow fee + split remainder
    remainder_msat: int                  # the split remainder alone (part of fee income)

    @property
    def accepted(self) -> tuple[Verdict, ...]:
        return tuple(v for v in self.verdicts if v.accepted)

    @property
    def total_msat(self) -> int:
        return sum(self.provider_rewards.values()) + sum(self.validator_fees.values()) + self.fee_income_msat


def median(values: list[Decimal]) -> Decimal:
    if not values:
        raise ValueError("median of nothing")
    s = sorted(values)
    mid = len(s) // 2
    if len(s) % 2:
        return s[mid]
    return (s[mid - 1] + s[mid]) / 2


def passes(value: Decimal, threshold: Decimal, direction: str) -> bool:
    return value >= threshold if direction == "max" else value <= threshold


def better(a: Decimal, b: Decimal, direction: str) -> bool:
    return a > b if direction == "max" else a < b


def decide(candidates: list[CandidateScores], *, quorum: int, threshold: Decimal, direction: str,
           policy: str, bid_msat: int, fee_msat: int, validator_fee_msat: int,
           validators: tuple[str, ...]) -> Decision:
    if direction not in ("max", "min") or policy not in ("best", "split") or quorum < 1:
        raise ValueError("bad rule")
    verdicts: list[Verdict] = []
    for c in candidates:
        if len(c.scores) < quorum:
            verdicts.append(Verdict(c.result_id, c.provider, False, None))
            continue
        m = median(list(c.scores.values()))
        verdicts.append(Verdict(c.result_id, c.provider, passes(m, threshold, direction), m))
    accepted = [v for v in verdicts if v.accepted]
    counted_validators = [v for v in validators if any(v in c.scores for c in candidates)]
    validator_fees = {v: validator_fee_msat for v in counted_validators if validator_fee_msat}
    share = bid_msat - fee_msat - sum(validator_fees.values())
    rewards: dict[str, int] = {}
    remainder = 0
    if accepted:
        if policy == "best":
            order = {c.result_id: (c.created_at, c.result_id) for c in candidates}
            winner = accepted[0]
            for v in accepted[1:]:
                assert v.median is not None and winner.median is not None
                if better(v.median, winner.median, direction) or (
                        v.median == winner.median and order[v.result_id] < order[winner.result_id]):
                    winner = v
            rewards[winner.result_id] = share
        else:
            each, remainder = divmod(share, len(accepted))
            rewards = {v.result_id: each for v in accepted}
    else:
        validator_fees = {}
    final = tuple(Verdict(v.result_id, v.provider, v.accepted, v.median, rewards.get(v.result_id, 0))
                  for v in verdicts)
    fee_income = fee_msat + remainder if accepted else 0
    decision = Decision(final, rewards, validator_fees, fee_income, remainder)
    if accepted and decision.total_msat != bid_msat:
        raise AssertionError(f"split does not add up: {decision.total_msat} != {bid_msat}")
    return decision
