"""The decision, recomputed from what the escrow published: the job's ``validation`` and ``payout``
tags, the validation complete's scores (every counted one) and its money split.

The rule itself is the engine's (:func:`service.escrow.rule.decide`): the audit must apply the
rule the escrow applies, never a copy of it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal

from service.escrow import rule
from service.nostr.protocol.job import Baseline, Validation
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


def recompute(
    candidates: Sequence[Scored],
    *,
    validation: Validation,
    policy: str,
    split: MoneySplit,
    validators: tuple[str, ...],
    baseline: Baseline | None = None,
    baseline_scores: Mapping[str, Decimal | None] | None = None,
    kept_validator_fees: dict[str, int] | None = None,
) -> Recomputed:
    """``rule.decide`` over the published scores and split (and, for a job with a ``baseline``,
    the published scores of the baseline model). Raises ``ValueError`` (or ``AssertionError``,
    the rule's own check) when they cannot make a decision. ``kept_validator_fees``: an appeal's final
    decision keeps the first one's validator fees (``rule.decide``)."""
    direction = str(validation.direction)
    base = None
    if baseline is not None:
        base = {v: rule.UNREADABLE if value is None else value for v, value in (baseline_scores or {}).items()}
    decision = rule.decide(
        [
            rule.CandidateScores(
                c.result_id,
                c.provider,
                rank,
                {validator: rule.UNREADABLE if value is None else value for validator, value in c.scores.items()},
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
        baseline=base,
        min_improvement=Decimal(0) if baseline is None else baseline.min_improvement,
        kept_validator_fees=kept_validator_fees,
    )
    return Recomputed(decision, frozenset(v.result_id for v in decision.verdicts if v.unreadable))
