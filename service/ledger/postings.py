"""The escrow's postings: their idempotency keys, kinds and lines, built in one place.

Like :mod:`service.ledger.accounts` builds account names, this module builds the key of
every posting the escrow makes and parses it back (:func:`parse_key`) for reconciliation.
A key names the fact that caused the posting, so the same fact can never be booked twice
(the ledger refuses a key posted before with other content):

=================  ======================  ==============================================
kind               key                     lines
=================  ======================  ==============================================
funding            funding:<payment hash>  node +amount, escrow(job) -amount
release            release:<job>           escrow(job) +held, payables/refund -, income -
refund             refund:<job>            escrow(job) +held, refund(customer) -, income -
payout             payout:<payment hash>   payable(payee) +amount, node -amount
refund_payout      payout:<payment hash>   refund(customer) +amount, node -amount
routing_fee        routing_fee:<hash>      routing expense +fee, node -fee
unclaimed          unclaimed:<payout>:<n>  payable/refund +amount, unclaimed income -amount
reclaimed          reclaimed:<payout>:<n>  unclaimed income +amount, payable/refund -amount
appeal_fee         funding:<payment hash>  node +fee, appeal(job) -fee
appeal             appeal:<job>            appeal(job) +fee, payables/refund(appellant) -, income -
=================  ======================  ==============================================

An appeal fee is keyed ``funding:<hash>`` like a job's funding (reconciliation matches every
settled invoice of ours to the posting of its payment hash); ``appeal:<job>`` books the verdict's
use of it once (docs/escrow.md, "Appeals").

``<n>`` is the payout's claim round (0, then one more for each operator's reopen): each window
that ends books once, and each reopen books its way back once.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from service.ledger import accounts

Lines = tuple[tuple[str, int], ...]


class PostingKind(enum.StrEnum):
    FUNDING = "funding"
    RELEASE = "release"
    REFUND = "refund"
    PAYOUT = "payout"
    REFUND_PAYOUT = "refund_payout"
    ROUTING_FEE = "routing_fee"
    UNCLAIMED = "unclaimed"
    RECLAIMED = "reclaimed"
    APPEAL_FEE = "appeal_fee"
    APPEAL = "appeal"


class KeyPrefix(enum.StrEnum):
    """The first part of a key: what its second part is (a payment hash or a job id)."""

    FUNDING = "funding"  # payment hash of the escrow invoice
    RELEASE = "release"  # job id
    REFUND = "refund"  # job id
    PAYOUT = "payout"  # payment hash of the payout's succeeding attempt
    ROUTING_FEE = "routing_fee"  # same payment hash


BY_PAYMENT_HASH = frozenset({KeyPrefix.FUNDING, KeyPrefix.PAYOUT, KeyPrefix.ROUTING_FEE})


@dataclass(frozen=True)
class Posting:
    """A posting the escrow decided: booked by ``service.ledger.service.post`` as it is."""

    key: str
    kind: PostingKind
    job_id: str
    lines: Lines
    memo: str


@dataclass(frozen=True)
class ParsedKey:
    prefix: KeyPrefix
    ref: str  # the payment hash or job id
    rest: str | None = None  # anything after it (e.g. a reversal's suffix)

    @property
    def payment_hash(self) -> str | None:
        return self.ref if self.prefix in BY_PAYMENT_HASH else None


_KEY = re.compile(r"\A(funding|release|refund|payout|routing_fee):([0-9a-f]{1,64})(?::(.+))?\Z")


def parse_key(key: str) -> ParsedKey | None:
    """The prefix and reference of an escrow posting's key; None for any other key."""
    m = _KEY.match(key)
    if m is None:
        return None
    return ParsedKey(KeyPrefix(m.group(1)), m.group(2), m.group(3))


def funding_key(payment_hash: str) -> str:
    return f"{KeyPrefix.FUNDING}:{payment_hash}"


def release_key(job_id: str) -> str:
    return f"{KeyPrefix.RELEASE}:{job_id}"


def refund_key(job_id: str) -> str:
    return f"{KeyPrefix.REFUND}:{job_id}"


def payout_key(payment_hash: str) -> str:
    return f"{KeyPrefix.PAYOUT}:{payment_hash}"


def routing_fee_key(payment_hash: str) -> str:
    return f"{KeyPrefix.ROUTING_FEE}:{payment_hash}"


def funding(job_id: str, payment_hash: str, amount_msat: int, memo: str) -> Posting:
    """The customer's payment reached our node: we owe it to the job's escrow account."""
    return Posting(
        funding_key(payment_hash),
        PostingKind.FUNDING,
        job_id,
        ((accounts.NODE, amount_msat), (accounts.escrow(job_id), -amount_msat)),
        memo,
    )


def release(job_id: str, held_msat: int, owed: Lines, fee_income_msat: int, memo: str) -> Posting:
    """The decided split: the escrow account empties into what is owed (``owed``: credits,
    negative amounts, to payable/refund accounts) and the escrow's fee income."""
    lines: list[tuple[str, int]] = [(accounts.escrow(job_id), held_msat), *owed]
    if fee_income_msat:
        lines.append((accounts.FEE_INCOME, -fee_income_msat))
    return Posting(release_key(job_id), PostingKind.RELEASE, job_id, tuple(lines), memo)


def refund(job_id: str, customer: str, held_msat: int, back_msat: int, memo: str) -> Posting:
    """Nothing accepted: the escrow account empties into the customer's refund (``back_msat``)
    and fee income (the refund route's reserve and the sub-satoshi rounding)."""
    lines: list[tuple[str, int]] = [(accounts.escrow(job_id), held_msat)]
    if back_msat:
        lines.append((accounts.refund(customer, job_id), -back_msat))
    if held_msat - back_msat:
        lines.append((accounts.FEE_INCOME, -(held_msat - back_msat)))
    return Posting(refund_key(job_id), PostingKind.REFUND, job_id, tuple(lines), memo)


def payout(
    job_id: str, payment_hash: str, liability: str, amount_msat: int, *, to_customer: bool, memo: str
) -> Posting:
    """A payout succeeded: the liability it settles is paid from the node."""
    return Posting(
        payout_key(payment_hash),
        PostingKind.REFUND_PAYOUT if to_customer else PostingKind.PAYOUT,
        job_id,
        ((liability, amount_msat), (accounts.NODE, -amount_msat)),
        memo,
    )


def routing_fee(job_id: str, payment_hash: str, fee_msat: int, memo: str) -> Posting:
    """What the payout's route cost: the escrow's expense."""
    return Posting(
        routing_fee_key(payment_hash),
        PostingKind.ROUTING_FEE,
        job_id,
        ((accounts.ROUTING_EXPENSE, fee_msat), (accounts.NODE, -fee_msat)),
        memo,
    )


def unclaimed_key(payout_id: str, claim_round: int) -> str:
    return f"{PostingKind.UNCLAIMED}:{payout_id}:{claim_round}"


def reclaimed_key(payout_id: str, claim_round: int) -> str:
    return f"{PostingKind.RECLAIMED}:{payout_id}:{claim_round}"


def unclaimed(job_id: str, payout_id: str, claim_round: int, liability: str, amount_msat: int, memo: str) -> Posting:
    """Nobody claimed a payout within its window: what the job owed (``liability``: the payee's
    payable or the customer's refund) becomes the operator's unclaimed income."""
    return Posting(
        unclaimed_key(payout_id, claim_round),
        PostingKind.UNCLAIMED,
        job_id,
        ((liability, amount_msat), (accounts.UNCLAIMED, -amount_msat)),
        memo,
    )


def reclaimed(job_id: str, payout_id: str, claim_round: int, liability: str, amount_msat: int, memo: str) -> Posting:
    """An operator reopened an expired claim (its round ``claim_round``): owed to its payee again."""
    return Posting(
        reclaimed_key(payout_id, claim_round),
        PostingKind.RECLAIMED,
        job_id,
        ((accounts.UNCLAIMED, amount_msat), (liability, -amount_msat)),
        memo,
    )


def appeal_key(job_id: str) -> str:
    return f"{PostingKind.APPEAL}:{job_id}"


def appeal_fee(job_id: str, payment_hash: str, amount_msat: int, memo: str) -> Posting:
    """An appellant paid the appeal fee invoice: held for the job's appeal."""
    return Posting(
        funding_key(payment_hash),
        PostingKind.APPEAL_FEE,
        job_id,
        ((accounts.NODE, amount_msat), (accounts.appeal(job_id), -amount_msat)),
        memo,
    )


def appeal(job_id: str, held_msat: int, owed: Lines, fee_income_msat: int, memo: str) -> Posting:
    """The appeal's verdict empties the held fee (``held_msat``) into what is owed (``owed``: credits
    to the appeal validators' payables, or the appellant's refund) and fee income (the rest)."""
    lines: list[tuple[str, int]] = [(accounts.appeal(job_id), held_msat), *owed]
    if fee_income_msat:
        lines.append((accounts.FEE_INCOME, -fee_income_msat))
    return Posting(appeal_key(job_id), PostingKind.APPEAL, job_id, tuple(lines), memo)
