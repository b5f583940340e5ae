"""Job request (kind 5701, signed by the customer): protocol.md §2.

:func:`parse_job_request` reads an already signature-verified event in three phases,
each reporting the first fault it meets:

1. *addressing*: the kind, the ``escrow`` tag (``not_for_us`` when absent or naming
   another key: the caller drops these silently), single-tag duplicates, NIP-40 expiry;
2. *shape*: every tag, in this order: ``i`` (shards, previous round), ``param``,
   ``bid``, ``validator``, ``validation``, ``payout``, ``validator_fee``, ``deadline``,
   ``mode``, ``refund``, ``p``, ``relays`` (see :func:`read_job_spec`);
3. *consistency and terms*: roles (validators vs customer/escrow, quorum, named
   providers), then the escrow's :class:`~.terms.EscrowTerms` at time ``now``
   (bid bounds, limits, mode, deadlines, the fee split).

Unknown tag names are ignored (forward compatibility); the content is not read.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from decimal import Decimal

from service.nostr import nip40
from service.nostr.nip01 import Event

from .errors import CodecError, CodecErrorReason
from .fields import (
    Tag,
    Tags,
    Template,
    arity,
    check_singles,
    check_text,
    expect_kind,
    format_decimal,
    format_msat,
    format_timestamp,
    format_uint,
    is_lnurl,
    is_lud16,
    is_relay_url,
    is_url,
    named,
    parse_bounded_decimal,
    parse_hex64,
    parse_msat,
    parse_pubkey_ref,
    parse_relay_hint,
    parse_timestamp,
    parse_uint,
    single,
    template,
)
from .money import MoneySplit, money_split
from .shards import Shard, parse_shard
from .terms import (
    KIND_JOB_REQUEST,
    RESULT_KIND_OFFSET,
    Direction,
    EscrowTerms,
    Mode,
    PayoutPolicy,
    Sealing,
)

R = CodecErrorReason

#: Tags a request may carry at most once (``relays`` too: NIP-90 has one list).
SINGLE_TAGS = (
    "bid",
    "escrow",
    "validation",
    "payout",
    "deadline",
    "mode",
    "refund",
    "validator_fee",
    "expiration",
    "relays",
    "sealing",
    "baseline",
)
MAX_PARAMS = 64
MAX_PARAM_VALUE = 1024
MAX_PROVIDERS = 256
MAX_RELAYS = 16
MAX_QUORUM = 999_999
_PARAM_NAME = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")
_METRIC = re.compile(r"[A-Za-z0-9_.:@/+\-]{1,64}")


# ------------------------------------------------------------------- job data types


@dataclass(frozen=True, slots=True)
class Validation:
    """``["validation", metric, "max"|"min", threshold, quorum]``.

    A candidate passes when the median of its counted scores is ``>= threshold``
    (``max``) or ``<= threshold`` (``min``): the threshold itself passes.
    """

    metric: str
    direction: Direction
    threshold: Decimal
    quorum: int

    def passes(self, value: Decimal) -> bool:
        if self.direction is Direction.MAX:
            return value >= self.threshold
        return value <= self.threshold

    def better(self, a: Decimal, b: Decimal) -> bool:
        """Whether score ``a`` is strictly better than ``b`` in this direction."""
        return a > b if self.direction is Direction.MAX else a < b


class RoundParam(enum.StrEnum):
    """``["param", "round", …]``: whether the job may get a fallback evaluation round (protocol.md §2)."""

    FALLBACK = "fallback"  # opt in: a fallback round from the escrow's pool if quorum is missed
    SINGLE = "single"  # opt out: one round only; missed quorum is a refund


ROUND_PARAM = "round"


def _read_round(params: tuple[tuple[str, str], ...]) -> RoundParam | None:
    value = dict(params).get(ROUND_PARAM)
    if value is None:
        return None
    if value not in {r.value for r in RoundParam}:
        raise CodecError(R.INVALID_ROUND_PARAM, "the 'round' param must be 'fallback' or 'single'")
    return RoundParam(value)


@dataclass(frozen=True, slots=True)
class Baseline:
    """``["baseline", <model sha256>, <url>, <min improvement>]``: relative acceptance (§6).

    The model a result must beat, typically the round's starting (global) model: validators
    score it too, and a result is accepted only if its median is better than the baseline's
    median by more than 0 and by at least ``min_improvement`` (in the metric's units), besides
    passing the threshold. A provider that returns the baseline unchanged never beats it.
    """

    model_sha256: str
    url: str
    min_improvement: Decimal = Decimal(0)

    def to_tag(self) -> Tag:
        return (
            "baseline",
            parse_hex64(self.model_sha256, R.INVALID_BASELINE, "baseline model sha256"),
            self.url,
            format_decimal(self.min_improvement, R.INVALID_BASELINE, "minimum improvement"),
        )


def _read_baseline(tags: Tags) -> Baseline | None:
    tag = single(tags, "baseline")
    if tag is None:
        return None
    arity(tag, 4, 4, R.INVALID_BASELINE)
    _, sha256, url, margin = tag
    parse_hex64(sha256, R.INVALID_BASELINE, "baseline model sha256")
    if not is_url(url):
        raise CodecError(R.INVALID_BASELINE, "the baseline url must be a printable-ASCII URL with a scheme")
    improvement = parse_bounded_decimal(margin, R.INVALID_BASELINE, "minimum improvement")
    if improvement < 0:
        raise CodecError(R.INVALID_BASELINE, "the minimum improvement must not be negative")
    return Baseline(sha256, url, improvement)


@dataclass(frozen=True, slots=True)
class JobSpec:
    """Everything the customer writes in a job request (the build input, the parse output)."""

    escrow: str
    bid_msat: int
    shards: tuple[Shard, ...]
    validation: Validation
    payout: PayoutPolicy
    results_deadline: int
    validation_deadline: int
    validators: tuple[str, ...] = ()
    validator_fee_msat: int = 0
    mode: Mode = Mode.AUTO
    params: tuple[tuple[str, str], ...] = ()
    providers: tuple[str, ...] = ()
    refund: str | None = None
    expiration: int | None = None
    relays: tuple[str, ...] = ()
    escrow_relay: str = ""
    previous_job: str | None = None
    sealing: Sealing = Sealing.OPTIONAL
    baseline: Baseline | None = None

    @property
    def round(self) -> RoundParam | None:
        """The request's ``round`` param (checked when it was read); None: the escrow's default."""
        return _read_round(self.params)


@dataclass(frozen=True, slots=True)
class JobRequest:
    """A checked job request: the event's identity, the customer's spec and the fee split."""

    id: str
    customer: str
    created_at: int
    kind: int
    spec: JobSpec
    split: MoneySplit

    @property
    def customer_validates(self) -> bool:
        return not self.spec.validators

    @property
    def validators(self) -> tuple[str, ...]:
        """The designated validators; the customer alone when it named none."""
        return self.spec.validators or (self.customer,)

    @property
    def result_kind(self) -> int:
        return self.kind + RESULT_KIND_OFFSET

    def shard(self, index: int) -> Shard | None:
        for shard in self.spec.shards:
            if shard.index == index:
                return shard
        return None

    def submit_refusal(self, provider: str, index: int) -> CodecErrorReason | None:
        """Why ``provider`` may not submit for shard ``index`` (``None``: it may).

        A private shard admits only its recipient; a plain shard admits anyone when the
        job names no ``p`` provider, else only the named ones.
        """
        shard = self.shard(index)
        if shard is None:
            return R.UNKNOWN_SHARD
        if shard.encrypted:
            return None if provider == shard.provider else R.SHARD_NOT_ASSIGNED
        if self.spec.providers and provider not in self.spec.providers:
            return R.PROVIDER_NOT_ALLOWED
        return None


# ----------------------------------------------------------------------------- parse


def _read_escrow(tags: Tags, escrow_pubkey: str) -> str:
    found = named(tags, "escrow")
    if not any(len(tag) >= 2 and tag[1] == escrow_pubkey for tag in found):
        raise CodecError(R.NOT_FOR_US, "the request does not name this escrow")
    if len(found) > 1:
        raise CodecError(R.DUPLICATE_TAG, "more than one 'escrow' tag")
    tag = found[0]
    arity(tag, 2, 3, R.INVALID_ESCROW)
    return parse_relay_hint(tag[2], R.INVALID_ESCROW, "escrow relay hint") if len(tag) == 3 else ""


def _read_inputs(tags: Tags) -> tuple[tuple[Shard, ...], str | None]:
    shards: list[Shard] = []
    seen: set[int] = set()
    previous: str | None = None
    for tag in named(tags, "i"):
        if len(tag) < 3:
            raise CodecError(R.UNSUPPORTED_INPUT, "an 'i' tag needs a value and a type")
        kind = tag[2]
        if kind in ("url", "nip44"):
            shard = parse_shard(tag)
            if shard.index in seen:
                raise CodecError(R.DUPLICATE_SHARD, "two shards carry the same index")
            seen.add(shard.index)
            shards.append(shard)
        elif kind == "job":
            arity(tag, 3, 4, R.INVALID_PREVIOUS_JOB)
            parse_hex64(tag[1], R.INVALID_PREVIOUS_JOB, "previous job id")
            if len(tag) == 4:
                parse_relay_hint(tag[3], R.INVALID_PREVIOUS_JOB, "previous job relay hint")
            if previous is not None:
                raise CodecError(R.DUPLICATE_TAG, "more than one previous-round ('job') input")
            previous = tag[1]
        else:
            raise CodecError(R.UNSUPPORTED_INPUT, "input type must be 'url', 'nip44' or 'job'")
    if not shards:
        raise CodecError(R.MISSING_SHARDS, "no shard input")
    return tuple(shards), previous


def _read_params(tags: Tags) -> tuple[tuple[str, str], ...]:
    found = named(tags, "param")
    if len(found) > MAX_PARAMS:
        raise CodecError(R.INVALID_PARAM, f"more than {MAX_PARAMS} 'param' tags")
    params: list[tuple[str, str]] = []
    names: set[str] = set()
    for tag in found:
        arity(tag, 3, 3, R.INVALID_PARAM)
        if _PARAM_NAME.fullmatch(tag[1]) is None:
            raise CodecError(R.INVALID_PARAM, "param name must match [A-Za-z0-9_.:-]{1,64}")
        check_text(tag[2], R.INVALID_PARAM, "param value", MAX_PARAM_VALUE)
        if tag[1] in names:
            raise CodecError(R.DUPLICATE_PARAM, "two 'param' tags share a name")
        names.add(tag[1])
        params.append((tag[1], tag[2]))
    return tuple(params)


def _read_validators(tags: Tags) -> tuple[str, ...]:
    validators: list[str] = []
    for tag in named(tags, "validator"):
        arity(tag, 2, 2, R.INVALID_VALIDATOR)
        pubkey = parse_hex64(tag[1], R.INVALID_VALIDATOR, "validator pubkey")
        if pubkey in validators:
            raise CodecError(R.DUPLICATE_VALIDATOR, "a validator is named twice")
        validators.append(pubkey)
    return tuple(validators)


def _read_validation(tags: Tags) -> Validation:
    tag = single(tags, "validation", R.MISSING_VALIDATION)
    assert tag is not None
    arity(tag, 5, 5, R.INVALID_VALIDATION)
    _, metric, direction, threshold, quorum = tag
    if _METRIC.fullmatch(metric) is None:
        raise CodecError(R.INVALID_METRIC, "metric must match [A-Za-z0-9_.:@/+-]{1,64}")
    if direction not in ("max", "min"):
        raise CodecError(R.INVALID_DIRECTION, "direction must be 'max' or 'min'")
    return Validation(
        metric=metric,
        direction=Direction(direction),
        threshold=parse_bounded_decimal(threshold, R.INVALID_THRESHOLD, "threshold"),
        quorum=parse_uint(quorum, R.INVALID_QUORUM, "quorum", MAX_QUORUM),
    )


def _read_one(tags: Tags, name: str, reason: CodecErrorReason, missing: CodecErrorReason | None = None) -> str | None:
    tag = single(tags, name, missing)
    if tag is None:
        return None
    arity(tag, 2, 2, reason)
    return tag[1]


def _read_deadlines(tags: Tags) -> tuple[int, int]:
    tag = single(tags, "deadline", R.MISSING_DEADLINE)
    assert tag is not None
    arity(tag, 3, 3, R.INVALID_DEADLINE)
    results = parse_timestamp(tag[1], R.INVALID_DEADLINE, "results deadline")
    validation = parse_timestamp(tag[2], R.INVALID_DEADLINE, "validation deadline")
    if validation <= results:
        raise CodecError(R.DEADLINE_ORDER, "the validation deadline must be after the results deadline")
    return results, validation


def _read_providers(tags: Tags, escrow: str) -> tuple[str, ...]:
    # ["p", <escrow>] routes the request to the escrow (relays index single-letter tags);
    # it does not name a provider.
    found = [t for t in named(tags, "p") if not (len(t) >= 2 and t[1] == escrow)]
    if len(found) > MAX_PROVIDERS:
        raise CodecError(R.TOO_MANY_PROVIDERS, f"more than {MAX_PROVIDERS} 'p' tags")
    providers: list[str] = []
    for tag in found:
        pubkey, _ = parse_pubkey_ref(tag, R.INVALID_PROVIDER)
        if pubkey in providers:
            raise CodecError(R.DUPLICATE_PROVIDER, "a provider is named twice")
        providers.append(pubkey)
    return tuple(providers)


def _read_relays(tags: Tags) -> tuple[str, ...]:
    tag = single(tags, "relays")
    if tag is None:
        return ()
    relays = tag[1:]
    if not 1 <= len(relays) <= MAX_RELAYS:
        raise CodecError(R.INVALID_RELAY, f"'relays' must list 1..{MAX_RELAYS} relays")
    if len(set(relays)) != len(relays):
        raise CodecError(R.INVALID_RELAY, "'relays' lists a relay twice")
    for relay in relays:
        if not is_relay_url(relay):
            raise CodecError(R.INVALID_RELAY, "each relay must be a ws:// or wss:// URL")
    return tuple(relays)


def read_job_spec(tags: Tags, escrow: str, escrow_relay: str = "") -> JobSpec:
    """Phase 2: the shape of every tag (no roles, no terms, no clock)."""
    shards, previous = _read_inputs(tags)
    params = _read_params(tags)
    _read_round(params)
    bid = parse_msat(_read_one(tags, "bid", R.INVALID_BID, R.MISSING_BID) or "", R.INVALID_BID, "bid")
    validators = _read_validators(tags)
    validation = _read_validation(tags)
    payout = _read_one(tags, "payout", R.INVALID_PAYOUT, R.MISSING_PAYOUT)
    if payout not in ("best", "split"):
        raise CodecError(R.INVALID_PAYOUT, "payout policy must be 'best' or 'split'")
    fee_text = _read_one(tags, "validator_fee", R.INVALID_VALIDATOR_FEE)
    validator_fee = 0 if fee_text is None else parse_msat(fee_text, R.INVALID_VALIDATOR_FEE, "validator_fee")
    results_deadline, validation_deadline = _read_deadlines(tags)
    mode = _read_one(tags, "mode", R.INVALID_MODE)
    if mode is not None and mode not in ("hold", "custodial", "auto"):
        raise CodecError(R.INVALID_MODE, "mode must be 'hold', 'custodial' or 'auto'")
    refund = _read_one(tags, "refund", R.INVALID_REFUND)
    if refund is not None and not (is_lud16(refund) or is_lnurl(refund)):
        raise CodecError(R.INVALID_REFUND, "refund must be a lud16 address (name@domain) or an lnurl1… string")
    providers = _read_providers(tags, escrow)
    relays = _read_relays(tags)
    sealing = _read_one(tags, "sealing", R.INVALID_SEALING)
    if sealing is not None and sealing not in ("required", "optional"):
        raise CodecError(R.INVALID_SEALING, "sealing must be 'required' or 'optional'")
    return JobSpec(
        escrow=escrow,
        bid_msat=bid,
        shards=shards,
        validation=validation,
        payout=PayoutPolicy(payout),
        results_deadline=results_deadline,
        validation_deadline=validation_deadline,
        validators=validators,
        validator_fee_msat=validator_fee,
        mode=Mode(mode) if mode is not None else Mode.AUTO,
        params=params,
        providers=providers,
        refund=refund,
        expiration=nip40.expiration_from_tags(tags),
        relays=relays,
        escrow_relay=escrow_relay,
        previous_job=previous,
        sealing=Sealing(sealing) if sealing is not None else Sealing.OPTIONAL,
        baseline=_read_baseline(tags),
    )


def check_roles(spec: JobSpec, customer: str | None) -> None:
    """Phase 3a: who is who. ``customer=None`` skips the checks that need the signer."""
    for validator in spec.validators:
        if validator == customer:
            raise CodecError(
                R.VALIDATOR_IS_CUSTOMER,
                "the customer cannot be a named validator (name no validator to validate yourself)",
            )
        if validator == spec.escrow:
            raise CodecError(R.VALIDATOR_IS_ESCROW, "the escrow cannot be a validator")
    limit = len(spec.validators) or 1
    if not 1 <= spec.validation.quorum <= limit:
        raise CodecError(R.QUORUM_OUT_OF_RANGE, f"quorum must be within 1..{limit}")
    if not spec.validators and spec.validator_fee_msat:
        raise CodecError(R.VALIDATOR_FEE_WITHOUT_VALIDATORS, "a validator fee needs named validators")
    if not spec.validators and spec.sealing is Sealing.REQUIRED:
        raise CodecError(R.SEALING_NEEDS_VALIDATORS, "sealed results need named validators")
    barred = {spec.escrow, *spec.validators}
    if customer is not None:
        barred.add(customer)
    named_providers = [*spec.providers, *(s.provider for s in spec.shards if s.provider is not None)]
    if any(provider in barred for provider in named_providers):
        raise CodecError(R.PROVIDER_CONFLICT, "a named provider is the customer, the escrow or a validator")


def check_terms(spec: JobSpec, terms: EscrowTerms, now: int) -> MoneySplit:
    """Phase 3b: the escrow's terms at receipt time ``now``; returns the fee split."""
    if spec.bid_msat < terms.min_bid_msat:
        raise CodecError(R.BID_TOO_LOW, f"bid must be at least {terms.min_bid_msat} msat")
    if spec.bid_msat > terms.max_bid_msat:
        raise CodecError(R.BID_TOO_HIGH, f"bid must be at most {terms.max_bid_msat} msat")
    if len(spec.shards) > terms.max_shards:
        raise CodecError(R.TOO_MANY_SHARDS, f"at most {terms.max_shards} shards")
    if len(spec.validators) > terms.max_validators:
        raise CodecError(R.TOO_MANY_VALIDATORS, f"at most {terms.max_validators} validators")
    if not terms.offers(spec.mode):
        raise CodecError(R.MODE_NOT_OFFERED, f"mode {spec.mode.value!r} is not offered")
    if spec.results_deadline <= now:
        raise CodecError(R.DEADLINE_PASSED, "the results deadline has passed")
    if spec.results_deadline < now + terms.min_results_window_s:
        raise CodecError(
            R.DEADLINE_TOO_SOON, f"the results deadline must be at least {terms.min_results_window_s}s away"
        )
    if spec.validation_deadline > now + terms.max_job_duration_s:
        raise CodecError(
            R.DEADLINE_TOO_FAR, f"the validation deadline must be at most {terms.max_job_duration_s}s away"
        )
    hold_only = spec.mode is Mode.HOLD or (spec.mode is Mode.AUTO and terms.modes == {Mode.HOLD})
    if hold_only and spec.validation_deadline > now + terms.max_hold_seconds:
        raise CodecError(
            R.HOLD_WINDOW_EXCEEDED, f"hold mode needs the validation deadline within {terms.max_hold_seconds}s"
        )
    if spec.expiration is not None and spec.expiration < spec.validation_deadline:
        # Relays drop an expired event (NIP-40): providers and validators would no longer find
        # the request while the job still runs.
        raise CodecError(
            R.EXPIRES_BEFORE_DEADLINE, "the request's NIP-40 expiration must not be before its validation deadline"
        )
    if spec.validator_fee_msat and spec.validator_fee_msat < terms.min_payout_msat:
        raise CodecError(R.VALIDATOR_FEE_TOO_LOW, f"a validator fee must be 0 or at least {terms.min_payout_msat} msat")
    split = money_split(
        spec.bid_msat,
        fee_base_msat=terms.fee_base_msat,
        fee_ppm=terms.fee_ppm,
        validator_fee_msat=spec.validator_fee_msat,
        validator_count=len(spec.validators),
    )
    most_rewards = len(spec.shards) * terms.max_results_per_shard if spec.payout is PayoutPolicy.SPLIT else 1
    if split.provider_share_msat // most_rewards < terms.min_payout_msat:
        raise CodecError(
            R.REWARD_TOO_SMALL,
            f"the provider share split among up to {most_rewards} result(s) would pay less than "
            f"{terms.min_payout_msat} msat each: raise the bid or use fewer shards",
        )
    return split


def parse_job_request(
    event: Event, *, escrow_pubkey: str, terms: EscrowTerms, now: int, kind: int = KIND_JOB_REQUEST
) -> JobRequest:
    """Check a signature-verified kind-5701 event against this escrow's key, terms and clock."""
    expect_kind(event, kind)
    escrow_relay = _read_escrow(event.tags, escrow_pubkey)
    check_singles(event.tags, SINGLE_TAGS)
    expires = nip40.expiration_from_tags(event.tags)
    if expires is not None and now >= expires:
        raise CodecError(R.EXPIRED, "the request has expired (NIP-40)")
    spec = read_job_spec(event.tags, escrow_pubkey, escrow_relay)
    check_roles(spec, event.pubkey)
    split = check_terms(spec, terms, now)
    return JobRequest(
        id=event.id, customer=event.pubkey, created_at=event.created_at, kind=event.kind, spec=spec, split=split
    )


# ----------------------------------------------------------------------------- build


def build_job_request(
    spec: JobSpec, *, content: str = "", kind: int = KIND_JOB_REQUEST, customer: str | None = None
) -> Template:
    """The customer's request. Refuses (``CodecError``) anything the escrow would refuse for its
    shape or roles; terms and deadlines vs the clock are the escrow's to judge.
    ``customer`` (the signer's pubkey), if given, enables the customer-role checks too."""
    tags: list[Tag] = [shard.to_tag() for shard in spec.shards]
    if spec.previous_job is not None:
        tags.append(("i", parse_hex64(spec.previous_job, R.INVALID_PREVIOUS_JOB, "previous job id"), "job"))
    tags += [("param", name, value) for name, value in spec.params]
    tags.append(("bid", format_msat(spec.bid_msat, R.INVALID_BID, "bid")))
    parse_hex64(spec.escrow, R.INVALID_ESCROW, "escrow pubkey")
    tags.append(("escrow", spec.escrow, spec.escrow_relay) if spec.escrow_relay else ("escrow", spec.escrow))
    tags += [("validator", validator) for validator in spec.validators]
    validation = spec.validation
    tags.append(
        (
            "validation",
            validation.metric,
            str(validation.direction),
            format_decimal(validation.threshold, R.INVALID_THRESHOLD, "threshold"),
            format_uint(validation.quorum, R.INVALID_QUORUM, "quorum", MAX_QUORUM),
        )
    )
    tags.append(("payout", str(spec.payout)))
    if spec.validator_fee_msat:
        tags.append(("validator_fee", format_msat(spec.validator_fee_msat, R.INVALID_VALIDATOR_FEE, "validator_fee")))
    tags.append(
        (
            "deadline",
            format_timestamp(spec.results_deadline, R.INVALID_DEADLINE, "results deadline"),
            format_timestamp(spec.validation_deadline, R.INVALID_DEADLINE, "validation deadline"),
        )
    )
    tags.append(("mode", str(spec.mode)))
    if spec.refund is not None:
        tags.append(("refund", spec.refund))
    tags.append(("p", spec.escrow))  # routing: the escrow subscribes to #p = its key
    tags += [("p", provider) for provider in spec.providers]
    if spec.expiration is not None:
        tags.append(nip40.expiration_tag(spec.expiration))
    if spec.relays:
        tags.append(("relays", *spec.relays))
    if spec.sealing is Sealing.REQUIRED:
        tags.append(("sealing", str(spec.sealing)))
    if spec.baseline is not None:
        tags.append(spec.baseline.to_tag())
    for tag in tags:
        if any(type(item) is not str for item in tag):
            raise TypeError(f"{tag[0]!r} tag items must be strings")
    frozen = tuple(tags)
    check_singles(frozen, SINGLE_TAGS)
    parsed = read_job_spec(frozen, spec.escrow, _read_escrow(frozen, spec.escrow))
    check_roles(parsed, customer)
    if type(content) is not str:
        raise TypeError("content must be a string")
    return template(kind, frozen, content)
