"""The decision, recomputed from what the escrow published: the job's ``validation`` and ``payout``
tags, the validation complete's scores (every counted one) and its money split.

The rule itself is the engine's (:func:`service.escrow.rule.decide`): the audit must apply the
rule the escrow applies, never a copy of it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal

from service.escrow import rule
from service.nostr.protocol.job import Validation
from service.nostr.protocol.money import MoneySplit


@dataclass(frozen=True, slots=True)
class Scored:
    """One candidate, in the escrow's receipt order (= the evaluation request's candidate order)."""

    result_id: str
    provider: str  # "" when the result event was not found (only a reward's payee check needs it)
    scores: Mapping[str, Decimal | None]  # validator -> value; None = "unreadable"


@dataclass(frozen=True, slots=True)
class Recomputed:
    decision: rule.Decision
    unreadable: frozenset[str]  # the results rejected "unreadable" (their verdict's median is None)

    def verdict(self, result_id: str) -> rule.Verdict | None:
        return next((v for v in self.decision.verdicts if v.result_id == result_id), None)


# --- UNREADABLE SHIM (protocol.md §6 rule 5) -------------------------------------------------
# rule.decide reads readable scores only. Until it reads "unreadable" itself, an unreadable
# score is handed to it as a value worse than any score or threshold the codec admits (at most
# 15 digits before the point): it then sorts as the worst value, still counts towards the quorum
# and the validator's fee, and a median that is (or is the mean with) one can never pass. Such a
# verdict is then reported as "unreadable" with no median, as the escrow publishes it.
_WORSE_THAN_ANY = {"max": Decimal("-1e30"), "min": Decimal("1e30")}


def _median_is_unreadable(values: Sequence[Decimal | None]) -> bool:
    """Whether the median position(s) hold an unreadable score (which sorts worst, so first)."""
    bad, n = sum(v is None for v in values), len(values)
    middle = (n // 2,) if n % 2 else (n // 2 - 1, n // 2)
    return any(p < bad for p in middle)


# --- end of the shim ---------------------------------------------------------------------------


def recompute(
    candidates: Sequence[Scored],
    *,
    validation: Validation,
    policy: str,
    split: MoneySplit,
    validators: tuple[str, ...],
) -> Recomputed:
    """``rule.decide`` over the published scores and split. Raises ``ValueError`` (or
    ``AssertionError``, the rule's own check) when they cannot make a decision."""
    direction = str(validation.direction)
    worst = _WORSE_THAN_ANY[direction]
    unreadable = frozenset(
        c.result_id
        for c in candidates
        if len(c.scores) >= validation.quorum and _median_is_unreadable(list(c.scores.values()))
    )
    decision = rule.decide(
        [
            rule.CandidateScores(
                c.result_id,
                c.provider,
                rank,
                {validator: worst if value is None else value for validator, value in c.scores.items()},
            )
            for rank, c in enumerate(candidates)
        ],
        quorum=validation.quorum,
        threshold=validation.threshold,
        direction=direction,
        policy=policy,
        bid_msat=split.bid_msat,
        fee_msat=split.fee_msat,
        validator_fee_msat=split.validator_fee_msat,
        validators=validators,
    )
    verdicts = tuple(replace(v, median=None) if v.result_id in unreadable else v for v in decision.verdicts)
    return Recomputed(replace(decision, verdicts=verdicts), unreadable)
