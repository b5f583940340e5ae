"""Job feedback (kind 7000, NIP-90): the escrow's state changes and receipts (§3, §4, §6,
§7, §8, and rejections), and the one feedback the escrow reads: a payee's invoice (§7).

Every escrow feedback carries ``["status", <NIP-90 status>, <info>]``, the job
``["e", …]`` and the addressee ``["p", …]``; the ``info`` text and, where present,
the ``["escrow", <state>, <value>]`` tag say which feedback it is:

==============================  =========================================  ==========================
status / info                   escrow tag                                 body
==============================  =========================================  ==========================
payment-required / escrow       ``["escrow","awaiting-funding",<mode>]``   :class:`EscrowOffer`
processing / escrow funded      ``["escrow","funded",<msat>]``             :class:`Funded`
processing / deadline extended  ``["extended",<which>,<unix>]`` (1 or 2)   :class:`DeadlineExtension`
processing / fallback round     ``["fallback",<unix>]``                    :class:`FallbackStarted`
success / validation complete   —                                          :class:`ValidationComplete`
success / reward claimable      —                                          :class:`RewardClaimable`
success / reward paid           —                                          :class:`RewardPaid`
success / model key             —                                          :class:`ModelKey`
error / claim expired           —                                          :class:`ClaimExpired`
processing / appeal window,     (the appeals module, §6c)                  :class:`~.appeal.AppealWindow` …
payment-required / appeal fee,
processing / appeal round
error / refunded: <code>        ``["escrow","refunded",<msat>]``           :class:`Refunded`
error / cancelled: <code>       ``["escrow","cancelled",<code>]``          :class:`Cancelled`
error / <reason>: <message>     —                                          :class:`ErrorFeedback`
==============================  =========================================  ==========================
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from service.nostr.nip01 import Event

from .appeal import (
    INFO_APPEAL_FEE,
    INFO_APPEAL_ROUND,
    INFO_APPEAL_WINDOW,
    AppealFee,
    AppealRoundStarted,
    AppealWindow,
    parse_appeal_fee,
    parse_appeal_round,
    parse_appeal_window,
)
from .errors import CodecError, CodecErrorReason
from .fields import (
    BASELINE,
    MEDIAN_PLACES,
    UNREADABLE,
    Tag,
    Tags,
    Template,
    amount_tag,
    arity,
    check_text,
    event_refs,
    event_tag,
    expect_kind,
    format_decimal,
    format_msat,
    format_timestamp,
    is_bolt11,
    named,
    parse_amount_tag,
    parse_bounded_decimal,
    parse_hex64,
    parse_msat,
    parse_score_value,
    parse_timestamp,
    parse_uint,
    placeholder_event,
    pubkey_tag,
    single,
    single_pubkey_ref,
    template,
)
from .money import MoneySplit
from .sealing import read_key_tag
from .terms import KIND_FEEDBACK, Mode

R = CodecErrorReason

STATUSES = ("payment-required", "processing", "error", "success", "partial")
MAX_INFO = 1024
_CODE = re.compile(r"[a-z0-9_]{1,64}")
NO_QUORUM = "no-quorum"
REWARD_ROLES = ("job", "result")

INFO_OFFER = "escrow"
INFO_FUNDED = "escrow funded"
INFO_DEADLINE_EXTENDED = "deadline extended"
INFO_FALLBACK = "fallback round"
#: The deadlines an extension may move (``["extended", <which>, <unix seconds>]``).
DEADLINE_RESULTS = "results"
DEADLINE_VALIDATION = "validation"
DEADLINE_FALLBACK = "fallback"
DEADLINE_APPEAL = "appeal"  # the appeal window's (§6c)
DEADLINE_APPEAL_ROUND = "appeal_round"  # an appeal round's
#: Deadlines extended alone (one round's own), never with another.
_ALONE = (DEADLINE_FALLBACK, DEADLINE_APPEAL, DEADLINE_APPEAL_ROUND)
INFO_VALIDATION_COMPLETE = "validation complete"
INFO_REWARD_CLAIMABLE = "reward claimable"
INFO_REWARD_PAID = "reward paid"
INFO_MODEL_KEY = "model key"
INFO_CLAIM_EXPIRED = "claim expired"
#: The ``reason`` of the reward claimable the escrow repeats before a claim window ends.
REASON_CLAIM_WINDOW_ENDING = "claim_window_ending"
REFUNDED_PREFIX = "refunded: "
CANCELLED_PREFIX = "cancelled: "
#: Codes that start a status info of their own feedback, never an error's.
_RESERVED_ERROR_CODES = ("refunded", "cancelled")


class RefundReason(enum.StrEnum):
    """The codes the escrow writes after ``refunded: `` (parsers accept any ``[a-z0-9_]{1,64}``)."""

    NO_RESULTS = "no_results"
    NO_ACCEPTED_RESULT = "no_accepted_result"
    NO_QUORUM = "no_quorum"
    HOLD_EXPIRED = "hold_expired"  # the hold invoice was cancelled before release
    OPERATOR = "operator"  # an operator refunded the job by hand
    PAID_AFTER_CANCEL = "paid_after_cancel"  # a custodial payment after the job was cancelled
    PAID_AFTER_OFFER_EXPIRED = "paid_after_offer_expired"
    PAID_AFTER_REQUEST_EXPIRED = "paid_after_request_expired"


class CancelReason(enum.StrEnum):
    """The codes the escrow writes after ``cancelled: `` (parsers accept any ``[a-z0-9_]{1,64}``)."""

    DELETED = "deleted_by_customer"
    OFFER_EXPIRED = "offer_expired"
    REQUEST_EXPIRED = "request_expired"


# ---------------------------------------------------------------------- bodies


@dataclass(frozen=True, slots=True)
class EscrowOffer:
    """§3: the invoice to fund the escrow; ``mode`` is the concrete mode (hold or custodial)."""

    job_id: str
    customer: str
    amount_msat: int
    bolt11: str
    mode: Mode
    job_relay: str = ""


@dataclass(frozen=True, slots=True)
class Funded:
    """§4: LND confirmed the funding; providers start now."""

    job_id: str
    customer: str
    amount_msat: int
    job_relay: str = ""


@dataclass(frozen=True, slots=True)
class DeadlineExtension:
    """§4a: the escrow was down across a deadline of the job and moved it (docs/escrow.md). Each
    deadline moved is given as its new unix time; a deadline not moved is ``None`` (at least one is
    moved). Judging happens at the new deadline; on time stays "first handed to the escrow"."""

    job_id: str
    customer: str
    results_deadline: int | None
    validation_deadline: int | None
    job_relay: str = ""
    fallback_deadline: int | None = None  # a fallback round's (§6b), moved alone
    appeal_deadline: int | None = None  # the appeal window's (§6c), moved alone
    appeal_round_deadline: int | None = None  # an appeal round's (§6c), moved alone


@dataclass(frozen=True, slots=True)
class FallbackStarted:
    """§6b: the first round missed quorum and a fallback evaluation round is out; the decision waits
    for its ``deadline``. One per addressee (the customer, each provider of a result)."""

    job_id: str
    addressee: str
    deadline: int
    job_relay: str = ""


@dataclass(frozen=True, slots=True)
class Verdict:
    """``["accepted", <result id>, <median>, <reward msat>]`` or
    ``["rejected", <result id>, <median> | "no-quorum"]``.

    ``reward_msat`` is what the accepted result's provider is paid (0 for an accepted
    result that is not the best under ``payout=best``); ``None`` when not stated.
    """

    result_id: str
    accepted: bool
    median: Decimal | None  # None: no quorum, or (``unreadable``) the sealed model did not open
    reward_msat: int | None = None
    unreadable: bool = False


@dataclass(frozen=True, slots=True)
class PublishedScore:
    """``["score", <result id>, <validator pubkey>, <value> | "unreadable"]`` in a validation complete:
    every counted score, in the clear once the decision is taken (sealed scores included)."""

    result_id: str
    validator: str
    value: Decimal | None  # None: unreadable


@dataclass(frozen=True, slots=True)
class ValidationComplete:
    """§6: the verdicts, every counted score and the money split, so anyone can recompute the decision."""

    job_id: str
    customer: str
    verdicts: tuple[Verdict, ...]
    job_relay: str = ""
    scores: tuple[PublishedScore, ...] = ()
    split: MoneySplit | None = None  # ``["split", bid, fee, validator fee, validators, provider share]``


@dataclass(frozen=True, slots=True)
class ModelKey:
    """§5a: a sealed result's content key for the customer, NIP-44-encrypted escrow → customer,
    published when that result's provider is paid (``["key", <customer>, <payload>]``)."""

    job_id: str
    customer: str
    result_id: str
    payload: str
    job_relay: str = ""


@dataclass(frozen=True, slots=True)
class RewardClaimable:
    """§7: a reward waits for the payee's invoice; ``earned_by`` = its result or evaluation event.

    ``reason``: why the escrow asks again, when it does (``["reason", <code>]``: the payee's last
    invoice or address was refused, e.g. ``wrong_amount``, ``route_fee_exceeds_limit``; or
    ``claim_window_ending``, the reminder before ``claim_by``).
    ``claim_by``: until when the payee may give its invoice (``["claim_by", <unix>]``, our addition;
    None: no window, or an older escrow that did not say).
    """

    job_id: str
    payee: str
    amount_msat: int
    earned_by: str | None = None
    job_relay: str = ""
    reason: str | None = None
    claim_by: int | None = None


@dataclass(frozen=True, slots=True)
class ClaimExpired:
    """§7: nobody claimed the payout by ``claim_by``: it is closed, its money booked to the operator
    (``["status", "error", "claim expired"]``). An operator may reopen it (a new reward claimable)."""

    job_id: str
    payee: str
    amount_msat: int
    claim_by: int
    earned_by: str | None = None
    job_relay: str = ""


@dataclass(frozen=True, slots=True)
class PaymentProof:
    """``["payment", <payment hash>, <preimage>, <amount msat>, <routing fee msat>]``."""

    payment_hash: str
    preimage: str
    amount_msat: int
    fee_msat: int


@dataclass(frozen=True, slots=True)
class RewardPaid:
    job_id: str
    earned_by: str
    payee: str
    payment: PaymentProof
    job_relay: str = ""
    bolt11: str | None = None  # ``["bolt11", <invoice>]``: the invoice paid, for auditors


@dataclass(frozen=True, slots=True)
class Refunded:
    """§8: ``reason`` is a code such as :class:`RefundReason`; ``amount_msat`` went back."""

    job_id: str
    customer: str
    reason: str
    amount_msat: int
    job_relay: str = ""


@dataclass(frozen=True, slots=True)
class Cancelled:
    """An unfunded job ends: deleted by its customer, or its offer or request expired unpaid
    (``reason``: a code such as :class:`CancelReason`). Nothing was taken from the customer."""

    job_id: str
    customer: str
    reason: str
    job_relay: str = ""


@dataclass(frozen=True, slots=True)
class ErrorFeedback:
    """A rejected request: ``["status","error","<reason>: <message>"]`` (``reason``: a codec reason code)."""

    job_id: str
    customer: str
    reason: str
    message: str
    job_relay: str = ""


EscrowFeedback = (
    EscrowOffer
    | Funded
    | DeadlineExtension
    | FallbackStarted
    | ValidationComplete
    | RewardClaimable
    | ClaimExpired
    | RewardPaid
    | ModelKey
    | Refunded
    | Cancelled
    | ErrorFeedback
    | AppealWindow
    | AppealFee
    | AppealRoundStarted
)


@dataclass(frozen=True, slots=True)
class Feedback:
    """A payee's ``payment-required`` feedback to the escrow: the invoice for its reward."""

    id: str
    payee: str
    created_at: int
    job_id: str
    escrow: str
    amount_msat: int
    bolt11: str
    info: str = ""


# ----------------------------------------------------------------------- helpers


def _read_status(tags: Tags) -> tuple[str, str]:
    tag = single(tags, "status", R.MISSING_STATUS)
    assert tag is not None
    arity(tag, 2, 3, R.INVALID_STATUS)
    if tag[1] not in STATUSES:
        raise CodecError(R.INVALID_STATUS, f"status must be one of {', '.join(STATUSES)}")
    info = check_text(tag[2], R.INVALID_STATUS, "status info", MAX_INFO, empty=True) if len(tag) == 3 else ""
    return tag[1], info


def _expect_status(tags: Tags, status: str, info: str | None) -> str:
    found, found_info = _read_status(tags)
    if found != status or (info is not None and found_info != info):
        raise CodecError(R.INVALID_STATUS, f"expected status {status!r}" + (f" / {info!r}" if info else ""))
    return found_info


def _read_escrow_state(tags: Tags, state: str) -> str:
    tag = single(tags, "escrow")
    if tag is None:
        raise CodecError(R.INVALID_ESCROW_STATE, f"no ['escrow', {state!r}, …] tag")
    arity(tag, 3, 3, R.INVALID_ESCROW_STATE)
    if tag[1] != state:
        raise CodecError(R.INVALID_ESCROW_STATE, f"escrow state must be {state!r}")
    return tag[2]


def _positive_msat(text: str, reason: CodecErrorReason, what: str) -> int:
    value = parse_msat(text, reason, what)
    if value == 0:
        raise CodecError(reason, f"{what} must be positive")
    return value


def _job_and_addressee(tags: Tags) -> tuple[str, str, str]:
    job = event_refs(tags, ("job",), ("job",))["job"]
    pubkey, _ = single_pubkey_ref(tags)
    return job.id, job.relay, pubkey


def _status_tag(status: str, info: str) -> Tag:
    return ("status", status, info)


def _finish(tags: list[Tag], parser: object, body: object) -> Template:
    """Template + self-check: the body's own parser must read back exactly ``body``."""
    result = template(KIND_FEEDBACK, tags, "")
    parsed = parser(placeholder_event(result))  # type: ignore[operator]
    if parsed != body:
        raise ValueError(f"{type(body).__name__} does not round-trip: check its fields' types")
    return result


def _code_and_text(info: str, prefix: str = "") -> tuple[str, str]:
    code, sep, message = info[len(prefix) :].partition(": ")
    if _CODE.fullmatch(code) is None:
        raise CodecError(R.INVALID_STATUS, "status info must be '<code>: <message>' with code [a-z0-9_]{1,64}")
    return code, message if sep else ""


# ------------------------------------------------------------------- 3. offer


def parse_escrow_offer(event: Event) -> EscrowOffer:
    expect_kind(event, KIND_FEEDBACK)
    tags = event.tags
    _expect_status(tags, "payment-required", INFO_OFFER)
    mode = _read_escrow_state(tags, "awaiting-funding")
    if mode not in ("hold", "custodial"):
        raise CodecError(R.INVALID_ESCROW_STATE, "offer mode must be 'hold' or 'custodial'")
    amount = single(tags, "amount", R.MISSING_AMOUNT)
    assert amount is not None
    amount_msat, bolt11 = parse_amount_tag(amount, bolt11_required=True)
    assert bolt11 is not None
    job_id, relay, customer = _job_and_addressee(tags)
    return EscrowOffer(
        job_id=job_id, customer=customer, amount_msat=amount_msat, bolt11=bolt11, mode=Mode(mode), job_relay=relay
    )


def build_escrow_offer(offer: EscrowOffer) -> Template:
    tags = [
        _status_tag("payment-required", INFO_OFFER),
        amount_tag(offer.amount_msat, offer.bolt11),
        event_tag(offer.job_id, offer.job_relay),
        pubkey_tag(offer.customer),
        ("escrow", "awaiting-funding", str(offer.mode)),
    ]
    return _finish(tags, parse_escrow_offer, offer)


# ------------------------------------------------------------------ 4. funded


def parse_funded(event: Event) -> Funded:
    expect_kind(event, KIND_FEEDBACK)
    tags = event.tags
    _expect_status(tags, "processing", INFO_FUNDED)
    amount = _positive_msat(_read_escrow_state(tags, "funded"), R.INVALID_ESCROW_STATE, "funded amount")
    job_id, relay, customer = _job_and_addressee(tags)
    return Funded(job_id=job_id, customer=customer, amount_msat=amount, job_relay=relay)


def build_funded(funded: Funded) -> Template:
    tags = [
        _status_tag("processing", INFO_FUNDED),
        ("escrow", "funded", format_msat(funded.amount_msat, R.INVALID_ESCROW_STATE, "funded amount")),
        event_tag(funded.job_id, funded.job_relay),
        pubkey_tag(funded.customer),
    ]
    return _finish(tags, parse_funded, funded)


# ------------------------------------------------------- 4a. deadline extended


def parse_deadline_extension(event: Event) -> DeadlineExtension:
    expect_kind(event, KIND_FEEDBACK)
    tags = event.tags
    _expect_status(tags, "processing", INFO_DEADLINE_EXTENDED)
    moved: dict[str, int] = {}
    for tag in named(tags, "extended"):
        arity(tag, 3, 3, R.INVALID_DEADLINE)
        if tag[1] not in (DEADLINE_RESULTS, DEADLINE_VALIDATION, *_ALONE):
            raise CodecError(
                R.INVALID_DEADLINE,
                f"an extended deadline is one of {', '.join((DEADLINE_RESULTS, DEADLINE_VALIDATION, *_ALONE))}",
            )
        if tag[1] in moved:
            raise CodecError(R.INVALID_DEADLINE, f"the {tag[1]} deadline is extended twice")
        moved[tag[1]] = parse_timestamp(tag[2], R.INVALID_DEADLINE, f"extended {tag[1]} deadline")
    if not moved:
        raise CodecError(R.INVALID_DEADLINE, "no ['extended', <which>, <unix>] tag")
    results, validation = moved.get(DEADLINE_RESULTS), moved.get(DEADLINE_VALIDATION)
    fallback = moved.get(DEADLINE_FALLBACK)
    if results is not None and validation is not None and validation <= results:
        raise CodecError(R.DEADLINE_ORDER, "the validation deadline must be after the results deadline")
    if any(moved.get(x) is not None for x in _ALONE) and len(moved) > 1:
        raise CodecError(R.INVALID_DEADLINE, "a fallback round's or an appeal's deadline is extended alone")
    job_id, relay, customer = _job_and_addressee(tags)
    return DeadlineExtension(
        job_id,
        customer,
        results,
        validation,
        relay,
        fallback,
        moved.get(DEADLINE_APPEAL),
        moved.get(DEADLINE_APPEAL_ROUND),
    )


def build_deadline_extension(ext: DeadlineExtension) -> Template:
    moved = (
        ext.results_deadline,
        ext.validation_deadline,
        ext.fallback_deadline,
        ext.appeal_deadline,
        ext.appeal_round_deadline,
    )
    if all(x is None for x in moved):
        raise ValueError("an extension moves at least one deadline")
    tags: list[Tag] = [_status_tag("processing", INFO_DEADLINE_EXTENDED)]
    if ext.results_deadline is not None:
        tags.append(
            ("extended", DEADLINE_RESULTS, format_timestamp(ext.results_deadline, R.INVALID_DEADLINE, "deadline"))
        )
    if ext.validation_deadline is not None:
        tags.append(
            ("extended", DEADLINE_VALIDATION, format_timestamp(ext.validation_deadline, R.INVALID_DEADLINE, "deadline"))
        )
    for which, value in (
        (DEADLINE_FALLBACK, ext.fallback_deadline),
        (DEADLINE_APPEAL, ext.appeal_deadline),
        (DEADLINE_APPEAL_ROUND, ext.appeal_round_deadline),
    ):
        if value is not None:
            tags.append(("extended", which, format_timestamp(value, R.INVALID_DEADLINE, "deadline")))
    tags += [event_tag(ext.job_id, ext.job_relay), pubkey_tag(ext.customer)]
    return _finish(tags, parse_deadline_extension, ext)


# ------------------------------------------------------- 6b. fallback round


def parse_fallback_started(event: Event) -> FallbackStarted:
    expect_kind(event, KIND_FEEDBACK)
    tags = event.tags
    _expect_status(tags, "processing", INFO_FALLBACK)
    tag = single(tags, "fallback", R.INVALID_DEADLINE)
    assert tag is not None
    arity(tag, 2, 2, R.INVALID_DEADLINE)
    deadline = parse_timestamp(tag[1], R.INVALID_DEADLINE, "fallback deadline")
    job_id, relay, addressee = _job_and_addressee(tags)
    return FallbackStarted(job_id, addressee, deadline, relay)


def build_fallback_started(started: FallbackStarted) -> Template:
    tags: list[Tag] = [
        _status_tag("processing", INFO_FALLBACK),
        ("fallback", format_timestamp(started.deadline, R.INVALID_DEADLINE, "fallback deadline")),
        event_tag(started.job_id, started.job_relay),
        pubkey_tag(started.addressee),
    ]
    return _finish(tags, parse_fallback_started, started)


# ----------------------------------------------------- 6. validation complete


def _read_verdicts(tags: Tags) -> tuple[Verdict, ...]:
    verdicts: list[Verdict] = []
    for tag in tags:
        if tag[0] not in ("accepted", "rejected"):
            continue
        accepted = tag[0] == "accepted"
        arity(tag, 3, 4 if accepted else 3, R.INVALID_VERDICT)
        result_id = parse_hex64(tag[1], R.INVALID_VERDICT, "verdict result id")
        unreadable = not accepted and tag[2] == UNREADABLE
        if not accepted and tag[2] in (NO_QUORUM, UNREADABLE):
            median = None
        else:
            median = parse_bounded_decimal(tag[2], R.INVALID_VERDICT, "median", places=MEDIAN_PLACES)
        reward = parse_msat(tag[3], R.INVALID_VERDICT, "reward") if len(tag) == 4 else None
        if any(v.result_id == result_id for v in verdicts):
            raise CodecError(R.INVALID_VERDICT, "a result has two verdicts")
        verdicts.append(Verdict(result_id, accepted, median, reward, unreadable))
    if not verdicts:
        raise CodecError(R.INVALID_VERDICT, "no 'accepted' or 'rejected' tag")
    return tuple(verdicts)


def parse_validation_complete(event: Event) -> ValidationComplete:
    expect_kind(event, KIND_FEEDBACK)
    tags = event.tags
    _expect_status(tags, "success", INFO_VALIDATION_COMPLETE)
    verdicts = _read_verdicts(tags)
    job_id, relay, customer = _job_and_addressee(tags)
    return ValidationComplete(
        job_id=job_id,
        customer=customer,
        verdicts=verdicts,
        job_relay=relay,
        scores=_read_published_scores(tags, {v.result_id for v in verdicts}),
        split=_read_split(tags),
    )


def _read_published_scores(tags: Tags, results: set[str]) -> tuple[PublishedScore, ...]:
    scores: list[PublishedScore] = []
    for tag in named(tags, "score"):
        arity(tag, 4, 4, R.INVALID_SCORE)
        result_id = tag[1] if tag[1] == BASELINE else parse_hex64(tag[1], R.INVALID_SCORE, "scored result id")
        validator = parse_hex64(tag[2], R.INVALID_SCORE, "validator pubkey")
        if result_id not in results and result_id != BASELINE:
            raise CodecError(R.INVALID_SCORE, "a published score is for a result without a verdict")
        value = parse_score_value(tag[3])  # None: unreadable
        if any(x.result_id == result_id and x.validator == validator for x in scores):
            raise CodecError(R.DUPLICATE_SCORE, "one validator's score of one result is published twice")
        scores.append(PublishedScore(result_id, validator, value))
    return tuple(scores)


def _read_split(tags: Tags) -> MoneySplit | None:
    tag = single(tags, "split")
    if tag is None:
        return None
    arity(tag, 6, 6, R.INVALID_SPLIT)
    bid, fee, each, count, share = (
        parse_msat(tag[1], R.INVALID_SPLIT, "bid"),
        parse_msat(tag[2], R.INVALID_SPLIT, "fee"),
        parse_msat(tag[3], R.INVALID_SPLIT, "validator fee"),
        parse_uint(tag[4], R.INVALID_SPLIT, "validator count", 999_999),
        parse_msat(tag[5], R.INVALID_SPLIT, "provider share"),
    )
    if fee + each * count + share != bid or share <= 0:
        raise CodecError(R.INVALID_SPLIT, "fee + validator fees + provider share must be the bid")
    return MoneySplit(bid, fee, each, count, share)


def _split_tag(split: MoneySplit) -> Tag:
    return (
        "split",
        format_msat(split.bid_msat, R.INVALID_SPLIT, "bid"),
        format_msat(split.fee_msat, R.INVALID_SPLIT, "fee"),
        format_msat(split.validator_fee_msat, R.INVALID_SPLIT, "validator fee"),
        str(split.validator_count),
        format_msat(split.provider_share_msat, R.INVALID_SPLIT, "provider share"),
    )


def _published_score_tag(score: PublishedScore) -> Tag:
    value = UNREADABLE if score.value is None else format_decimal(score.value, R.INVALID_SCORE_VALUE, "score")
    return ("score", score.result_id, score.validator, value)


def _verdict_tag(verdict: Verdict) -> Tag:
    if verdict.accepted:
        if verdict.median is None:
            raise CodecError(R.INVALID_VERDICT, "an accepted verdict needs its median")
        tag: Tag = ("accepted", verdict.result_id, format_decimal(verdict.median, R.INVALID_VERDICT, "median"))
        if verdict.reward_msat is not None:
            tag += (format_msat(verdict.reward_msat, R.INVALID_VERDICT, "reward"),)
        return tag
    if verdict.reward_msat is not None:
        raise CodecError(R.INVALID_VERDICT, "a rejected result earns no reward")
    if verdict.unreadable:
        if verdict.median is not None:
            raise CodecError(R.INVALID_VERDICT, "an unreadable verdict has no median")
        return ("rejected", verdict.result_id, UNREADABLE)
    median = NO_QUORUM if verdict.median is None else format_decimal(verdict.median, R.INVALID_VERDICT, "median")
    return ("rejected", verdict.result_id, median)


def build_validation_complete(complete: ValidationComplete) -> Template:
    tags = [
        _status_tag("success", INFO_VALIDATION_COMPLETE),
        event_tag(complete.job_id, complete.job_relay),
        pubkey_tag(complete.customer),
        *(_verdict_tag(v) for v in complete.verdicts),
        *(_published_score_tag(x) for x in complete.scores),
    ]
    if complete.split is not None:
        tags.append(_split_tag(complete.split))
    return _finish(tags, parse_validation_complete, complete)


# ------------------------------------------------------------ 5a. model key


def parse_model_key(event: Event) -> ModelKey:
    expect_kind(event, KIND_FEEDBACK)
    tags = event.tags
    _expect_status(tags, "success", INFO_MODEL_KEY)
    refs = event_refs(tags, REWARD_ROLES, REWARD_ROLES)
    customer, _ = single_pubkey_ref(tags)
    key = single(tags, "key", R.MISSING_KEY)
    assert key is not None
    envelope = read_key_tag(key)
    if envelope.recipient != customer:
        raise CodecError(R.KEY_RECIPIENT_NOT_ALLOWED, "a model key is for the job's customer")
    return ModelKey(
        job_id=refs["job"].id,
        customer=customer,
        result_id=refs["result"].id,
        payload=envelope.payload,
        job_relay=refs["job"].relay,
    )


def build_model_key(model_key: ModelKey) -> Template:
    tags = [
        _status_tag("success", INFO_MODEL_KEY),
        event_tag(model_key.job_id, model_key.job_relay, "job"),
        event_tag(model_key.result_id, "", "result"),
        pubkey_tag(model_key.customer),
        ("key", model_key.customer, model_key.payload),
    ]
    return _finish(tags, parse_model_key, model_key)


# --------------------------------------------------------------- 7. rewards


def parse_reward_claimable(event: Event) -> RewardClaimable:
    expect_kind(event, KIND_FEEDBACK)
    tags = event.tags
    _expect_status(tags, "success", INFO_REWARD_CLAIMABLE)
    amount = single(tags, "amount", R.MISSING_AMOUNT)
    assert amount is not None
    arity(amount, 2, 2, R.INVALID_AMOUNT)
    amount_msat, _ = parse_amount_tag(amount, bolt11_required=False)
    refs = event_refs(tags, REWARD_ROLES, ("job",))
    payee, _ = single_pubkey_ref(tags)
    earned_by = refs["result"].id if "result" in refs else None
    return RewardClaimable(
        job_id=refs["job"].id,
        payee=payee,
        amount_msat=amount_msat,
        earned_by=earned_by,
        job_relay=refs["job"].relay,
        reason=_read_reason(tags),
        claim_by=_read_claim_by(tags, required=False),
    )


def _read_claim_by(tags: Tags, *, required: bool) -> int | None:
    tag = single(tags, "claim_by", R.INVALID_CLAIM_BY if required else None)
    if tag is None:
        return None
    arity(tag, 2, 2, R.INVALID_CLAIM_BY)
    return parse_timestamp(tag[1], R.INVALID_CLAIM_BY, "claim_by")


def _reward_refs(job_id: str, job_relay: str, earned_by: str | None) -> list[Tag]:
    if earned_by is None:
        return [event_tag(job_id, job_relay)]
    return [event_tag(job_id, job_relay, "job"), event_tag(earned_by, "", "result")]


def _read_reason(tags: Tags) -> str | None:
    tag = single(tags, "reason")
    if tag is None:
        return None
    arity(tag, 2, 2, R.INVALID_STATUS)
    if _CODE.fullmatch(tag[1]) is None:
        raise CodecError(R.INVALID_STATUS, "a 'reason' tag carries one code [a-z0-9_]{1,64}")
    return tag[1]


def build_reward_claimable(claimable: RewardClaimable) -> Template:
    tags = [
        _status_tag("success", INFO_REWARD_CLAIMABLE),
        amount_tag(claimable.amount_msat),
        *_reward_refs(claimable.job_id, claimable.job_relay, claimable.earned_by),
        pubkey_tag(claimable.payee),
    ]
    if claimable.reason is not None:
        tags.append(("reason", claimable.reason))
    if claimable.claim_by is not None:
        tags.append(("claim_by", format_timestamp(claimable.claim_by, R.INVALID_CLAIM_BY, "claim_by")))
    return _finish(tags, parse_reward_claimable, claimable)


def parse_claim_expired(event: Event) -> ClaimExpired:
    expect_kind(event, KIND_FEEDBACK)
    tags = event.tags
    _expect_status(tags, "error", INFO_CLAIM_EXPIRED)
    amount = single(tags, "amount", R.MISSING_AMOUNT)
    assert amount is not None
    arity(amount, 2, 2, R.INVALID_AMOUNT)
    amount_msat, _ = parse_amount_tag(amount, bolt11_required=False)
    refs = event_refs(tags, REWARD_ROLES, ("job",))
    payee, _ = single_pubkey_ref(tags)
    claim_by = _read_claim_by(tags, required=True)
    assert claim_by is not None
    return ClaimExpired(
        job_id=refs["job"].id,
        payee=payee,
        amount_msat=amount_msat,
        claim_by=claim_by,
        earned_by=refs["result"].id if "result" in refs else None,
        job_relay=refs["job"].relay,
    )


def build_claim_expired(expired: ClaimExpired) -> Template:
    tags = [
        _status_tag("error", INFO_CLAIM_EXPIRED),
        amount_tag(expired.amount_msat),
        *_reward_refs(expired.job_id, expired.job_relay, expired.earned_by),
        pubkey_tag(expired.payee),
        ("claim_by", format_timestamp(expired.claim_by, R.INVALID_CLAIM_BY, "claim_by")),
    ]
    return _finish(tags, parse_claim_expired, expired)


def _read_payment(tags: Tags) -> PaymentProof:
    tag = single(tags, "payment")
    if tag is None:
        raise CodecError(R.INVALID_PAYMENT, "no 'payment' tag")
    arity(tag, 5, 5, R.INVALID_PAYMENT)
    payment_hash = parse_hex64(tag[1], R.INVALID_PAYMENT, "payment hash")
    preimage = parse_hex64(tag[2], R.INVALID_PAYMENT, "preimage")
    amount = _positive_msat(tag[3], R.INVALID_PAYMENT, "paid amount")
    fee = parse_msat(tag[4], R.INVALID_PAYMENT, "routing fee")
    if hashlib.sha256(bytes.fromhex(preimage)).hexdigest() != payment_hash:
        raise CodecError(R.INVALID_PAYMENT, "the preimage does not hash to the payment hash")
    return PaymentProof(payment_hash, preimage, amount, fee)


def parse_reward_paid(event: Event) -> RewardPaid:
    expect_kind(event, KIND_FEEDBACK)
    tags = event.tags
    _expect_status(tags, "success", INFO_REWARD_PAID)
    refs = event_refs(tags, REWARD_ROLES, REWARD_ROLES)
    payee, _ = single_pubkey_ref(tags)
    invoice = single(tags, "bolt11")
    bolt11 = None
    if invoice is not None:
        arity(invoice, 2, 2, R.INVALID_BOLT11)
        if not is_bolt11(invoice[1]):
            raise CodecError(R.INVALID_BOLT11, "the receipt's invoice does not have the shape of a BOLT11 invoice")
        bolt11 = invoice[1]
    return RewardPaid(
        job_id=refs["job"].id,
        earned_by=refs["result"].id,
        payee=payee,
        payment=_read_payment(tags),
        job_relay=refs["job"].relay,
        bolt11=bolt11,
    )


def build_reward_paid(paid: RewardPaid) -> Template:
    proof = paid.payment
    tags = [
        _status_tag("success", INFO_REWARD_PAID),
        event_tag(paid.job_id, paid.job_relay, "job"),
        event_tag(paid.earned_by, "", "result"),
        pubkey_tag(paid.payee),
        (
            "payment",
            proof.payment_hash,
            proof.preimage,
            format_msat(proof.amount_msat, R.INVALID_PAYMENT, "paid amount"),
            format_msat(proof.fee_msat, R.INVALID_PAYMENT, "routing fee"),
        ),
    ]
    if paid.bolt11 is not None:
        tags.append(("bolt11", paid.bolt11))
    return _finish(tags, parse_reward_paid, paid)


# ---------------------------------------------------------------- 8. refund


def parse_refunded(event: Event) -> Refunded:
    expect_kind(event, KIND_FEEDBACK)
    tags = event.tags
    info = _expect_status(tags, "error", None)
    if not info.startswith(REFUNDED_PREFIX):
        raise CodecError(R.INVALID_STATUS, "a refund's status info must be 'refunded: <code>'")
    code, rest = _code_and_text(info, REFUNDED_PREFIX)
    if rest or info != REFUNDED_PREFIX + code:
        raise CodecError(R.INVALID_STATUS, "a refund's status info must be 'refunded: <code>'")
    amount = _positive_msat(_read_escrow_state(tags, "refunded"), R.INVALID_ESCROW_STATE, "refunded amount")
    job_id, relay, customer = _job_and_addressee(tags)
    return Refunded(job_id=job_id, customer=customer, reason=code, amount_msat=amount, job_relay=relay)


def build_refunded(refunded: Refunded) -> Template:
    tags = [
        _status_tag("error", f"{REFUNDED_PREFIX}{refunded.reason}"),
        ("escrow", "refunded", format_msat(refunded.amount_msat, R.INVALID_ESCROW_STATE, "refunded amount")),
        event_tag(refunded.job_id, refunded.job_relay),
        pubkey_tag(refunded.customer),
    ]
    return _finish(tags, parse_refunded, refunded)


# ------------------------------------------------------------- cancelled


def parse_cancelled(event: Event) -> Cancelled:
    expect_kind(event, KIND_FEEDBACK)
    tags = event.tags
    info = _expect_status(tags, "error", None)
    if not info.startswith(CANCELLED_PREFIX):
        raise CodecError(R.INVALID_STATUS, "a cancellation's status info must be 'cancelled: <code>'")
    code, rest = _code_and_text(info, CANCELLED_PREFIX)
    if rest or info != CANCELLED_PREFIX + code or _read_escrow_state(tags, "cancelled") != code:
        raise CodecError(R.INVALID_STATUS, "a cancellation is 'cancelled: <code>' with ['escrow','cancelled',<code>]")
    job_id, relay, customer = _job_and_addressee(tags)
    return Cancelled(job_id=job_id, customer=customer, reason=code, job_relay=relay)


def build_cancelled(cancelled: Cancelled) -> Template:
    tags = [
        _status_tag("error", f"{CANCELLED_PREFIX}{cancelled.reason}"),
        ("escrow", "cancelled", cancelled.reason),
        event_tag(cancelled.job_id, cancelled.job_relay),
        pubkey_tag(cancelled.customer),
    ]
    return _finish(tags, parse_cancelled, cancelled)


# ------------------------------------------------------------------ errors


def parse_error_feedback(event: Event) -> ErrorFeedback:
    expect_kind(event, KIND_FEEDBACK)
    tags = event.tags
    info = _expect_status(tags, "error", None)
    if single(tags, "escrow") is not None:
        raise CodecError(R.INVALID_STATUS, "an error feedback carries no 'escrow' state tag")
    code, message = _code_and_text(info)
    if not message:
        raise CodecError(R.INVALID_STATUS, "status info must be '<code>: <message>'")
    if code in _RESERVED_ERROR_CODES:  # as build_error_feedback: those are feedbacks of their own
        raise CodecError(R.INVALID_STATUS, f"'{code}' is a feedback of its own, not an error code")
    job_id, relay, customer = _job_and_addressee(tags)
    return ErrorFeedback(job_id=job_id, customer=customer, reason=code, message=message, job_relay=relay)


def build_error_feedback(error: ErrorFeedback) -> Template:
    if error.reason in _RESERVED_ERROR_CODES:
        raise CodecError(R.INVALID_STATUS, f"'{error.reason}' is a feedback of its own, not an error code")
    tags = [
        _status_tag("error", f"{error.reason}: {error.message}"),
        event_tag(error.job_id, error.job_relay),
        pubkey_tag(error.customer),
    ]
    return _finish(tags, parse_error_feedback, error)


def build_rejection(job: Event, error: CodecError, *, job_relay: str = "") -> Template:
    """The answer to a refused job request (never for ``not_for_us``, which is dropped silently)."""
    if error.reason is R.NOT_FOR_US:
        raise ValueError("requests for another escrow are ignored, not answered")
    return build_error_feedback(
        ErrorFeedback(
            job_id=job.id, customer=job.pubkey, reason=error.reason.value, message=error.message, job_relay=job_relay
        )
    )


# ----------------------------------------------------------------- dispatch


_BY_INFO: dict[tuple[str, str], Callable[[Event], Any]] = {
    ("payment-required", INFO_OFFER): parse_escrow_offer,
    ("processing", INFO_FUNDED): parse_funded,
    ("processing", INFO_DEADLINE_EXTENDED): parse_deadline_extension,
    ("processing", INFO_FALLBACK): parse_fallback_started,
    ("success", INFO_VALIDATION_COMPLETE): parse_validation_complete,
    ("success", INFO_REWARD_CLAIMABLE): parse_reward_claimable,
    ("success", INFO_REWARD_PAID): parse_reward_paid,
    ("success", INFO_MODEL_KEY): parse_model_key,
    ("error", INFO_CLAIM_EXPIRED): parse_claim_expired,
    ("processing", INFO_APPEAL_WINDOW): parse_appeal_window,
    ("payment-required", INFO_APPEAL_FEE): parse_appeal_fee,
    ("processing", INFO_APPEAL_ROUND): parse_appeal_round,
}


def parse_escrow_feedback(event: Event) -> EscrowFeedback:
    """Any escrow feedback, recognised by its status and info (the caller checks the author is the escrow)."""
    expect_kind(event, KIND_FEEDBACK)
    status, info = _read_status(event.tags)
    parser = _BY_INFO.get((status, info))
    if parser is not None:
        return parser(event)  # type: ignore[no-any-return]
    if status == "error":
        if info.startswith(REFUNDED_PREFIX):
            return parse_refunded(event)
        if info.startswith(CANCELLED_PREFIX):
            return parse_cancelled(event)
        return parse_error_feedback(event)
    raise CodecError(R.UNSUPPORTED_FEEDBACK, "not an escrow feedback")


# --------------------------------------------------------------- payee invoice


def parse_feedback(event: Event, *, escrow_pubkey: str | None = None) -> Feedback:
    """A payee's invoice for its reward: ``payment-required`` + ``["amount", msat, bolt11]``.

    ``escrow_pubkey``, if given, must be the ``p`` tag (else ``not_for_us``); any other
    status is ``unsupported_feedback`` (the escrow ignores it).
    """
    expect_kind(event, KIND_FEEDBACK)
    tags = event.tags
    escrow, _ = single_pubkey_ref(tags)
    if escrow_pubkey is not None and escrow != escrow_pubkey:
        raise CodecError(R.NOT_FOR_US, "the feedback is addressed to someone else")
    status, info = _read_status(tags)
    if status != "payment-required":
        raise CodecError(R.UNSUPPORTED_FEEDBACK, "the escrow only reads 'payment-required' feedback")
    job = event_refs(tags, ("job",), ("job",))["job"]
    amount = single(tags, "amount", R.MISSING_AMOUNT)
    assert amount is not None
    amount_msat, bolt11 = parse_amount_tag(amount, bolt11_required=True)
    assert bolt11 is not None
    return Feedback(
        id=event.id,
        payee=event.pubkey,
        created_at=event.created_at,
        job_id=job.id,
        escrow=escrow,
        amount_msat=amount_msat,
        bolt11=bolt11,
        info=info,
    )


def build_payee_invoice(
    *, job_id: str, escrow: str, amount_msat: int, bolt11: str, info: str = "", job_relay: str = ""
) -> Template:
    status: Tag = ("status", "payment-required", info) if info else ("status", "payment-required")
    tags = [status, amount_tag(amount_msat, bolt11), event_tag(job_id, job_relay), pubkey_tag(escrow)]
    result = template(KIND_FEEDBACK, tags, "")
    parse_feedback(placeholder_event(result))
    return result
