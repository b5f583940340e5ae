"""The malformed-event corpus: every case must be refused with exactly its reason code.

Each case starts from a valid event built by the codec, changes one thing, and
names the reason the change must produce. ``test_every_reason_has_a_case`` keeps
the corpus complete when a reason code is added.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal

import pytest

from service.nostr import nip40, nip44
from service.nostr.protocol import (
    MAX_MSAT,
    Announcement,
    Candidate,
    Capabilities,
    ClaimExpired,
    CodecError,
    CodecErrorReason,
    ErrorFeedback,
    EscrowOffer,
    EvalRound,
    EvaluationRequest,
    Funded,
    Mode,
    ModelKey,
    ModelRef,
    MoneySplit,
    PaymentProof,
    PoolValidator,
    PublishedScore,
    Refunded,
    RewardClaimable,
    RewardPaid,
    Score,
    Sealing,
    Shard,
    TaskOffer,
    ValidationComplete,
    Verdict,
    build_announcement,
    build_appeal,
    build_capabilities,
    build_claim_expired,
    build_deletion,
    build_error_feedback,
    build_escrow_offer,
    build_evaluation_request,
    build_evaluation_result,
    build_funded,
    build_job_request,
    build_model_key,
    build_payee_invoice,
    build_refunded,
    build_result,
    build_reward_claimable,
    build_reward_paid,
    build_validation_complete,
    decrypt_shard,
    open_scores,
    parse_announcement,
    parse_appeal,
    parse_capabilities,
    parse_claim_expired,
    parse_deletion,
    parse_error_feedback,
    parse_escrow_feedback,
    parse_escrow_offer,
    parse_evaluation_request,
    parse_evaluation_result,
    parse_feedback,
    parse_funded,
    parse_model_key,
    parse_refunded,
    parse_result,
    parse_reward_claimable,
    parse_reward_paid,
    parse_validation_complete,
    seal,
    sealed_model,
    wrap_key,
)
from service.nostr.protocol.fields import Template

from .test_codec_support import (
    BOLT11,
    CUSTODIAL_ONLY,
    CUSTOMER,
    ESCROW,
    HOLD_ONLY,
    NOW,
    OTHER_ESCROW,
    P1,
    P2,
    P3,
    PRIVATE_SHARD,
    RELAY,
    TERMS,
    V1,
    V2,
    V3,
    C,
    E,
    Mutation,
    add,
    base_job,
    base_spec,
    chain,
    drop,
    dup,
    h,
    key,
    mutated,
    parse_job,
    private_shard,
    set_tag,
    unsigned,
)

R = CodecErrorReason
JOB_TMPL = build_job_request(base_spec())
JOB = base_job()
P1K, P2K, V1K, V2K = P1.public_key_hex, P2.public_key_hex, V1.public_key_hex, V2.public_key_hex
OTHER = key("other escrow").public_key_hex
MODEL = ModelRef("https://models.example.org/m.onnx", h("model"), 1000)
SHARD0 = ("i", "https://data.example.org/s0.npz", "url", "", "shard-0")

CASES: list = []


def case(reason: CodecErrorReason, name: str, thunk: Callable[[], object]) -> None:
    CASES.append(pytest.param(reason, thunk, id=f"{reason.value}-{name}"))


# ---------------------------------------------------------------- job request


def job_case(
    reason: CodecErrorReason,
    name: str,
    mutation: Mutation,
    *,
    terms=TERMS,
    now=NOW,
    kind: int | None = None,
    signer: str | None = None,
    tmpl: Template = JOB_TMPL,
) -> None:
    case(
        reason,
        f"job-{name}",
        lambda: parse_job(mutated(tmpl, mutation, kind=kind, pubkey=signer), terms=terms, now=now),
    )


def spec_case(reason: CodecErrorReason, name: str, terms=TERMS, now=NOW, **changes) -> None:
    """A job the builder accepts (its shape is fine) that the escrow must refuse."""
    tmpl = build_job_request(base_spec(**changes))
    case(reason, f"job-{name}", lambda: parse_job(unsigned(tmpl.kind, tmpl.tags), terms=terms, now=now))


def keep(tags):
    return tags


def shard_tag(*items: str) -> Mutation:
    return chain(drop("i", lambda t: t[-1] == "shard-0"), add(("i", *items)))


job_case(R.WRONG_KIND, "kind-5702", keep, kind=5702)
job_case(R.WRONG_KIND, "kind-6701", keep, kind=6701)
job_case(R.NOT_FOR_US, "no-escrow-tag", drop("escrow"))
job_case(R.NOT_FOR_US, "other-escrow", set_tag("escrow", OTHER))
job_case(R.NOT_FOR_US, "uppercase-escrow-key", set_tag("escrow", E.upper()))
job_case(R.NOT_FOR_US, "empty-escrow-tag", set_tag("escrow"))
for name in ("bid", "escrow", "validation", "payout", "deadline", "mode", "validator_fee"):
    job_case(R.DUPLICATE_TAG, f"two-{name}", dup(name))
job_case(R.DUPLICATE_TAG, "escrow-ours-and-other", add(("escrow", OTHER)))
job_case(R.DUPLICATE_TAG, "two-refund", add(("refund", "a@b.example"), ("refund", "c@d.example")))
job_case(R.DUPLICATE_TAG, "two-expiration", add(("expiration", str(NOW + 60)), ("expiration", str(NOW + 90))))
job_case(R.DUPLICATE_TAG, "two-relays", add(("relays", RELAY), ("relays", RELAY)))
job_case(R.DUPLICATE_TAG, "two-previous-rounds", add(("i", h("a"), "job"), ("i", h("b"), "job")))
job_case(R.INVALID_ESCROW, "http-relay-hint", set_tag("escrow", E, "https://relay.example.org"))
job_case(R.INVALID_ESCROW, "four-items", set_tag("escrow", E, "", "extra"))
job_case(R.EXPIRED, "expires-now", add(("expiration", str(NOW))))
job_case(R.EXPIRED, "expired-long-ago", add(("expiration", "0")))
job_case(R.INVALID_EXPIRATION, "not-a-number", add(("expiration", "tomorrow")))
job_case(R.INVALID_EXPIRATION, "leading-zero", add(("expiration", "01767225700")))
job_case(R.INVALID_EXPIRATION, "no-value", add(("expiration",)))
job_case(R.UNSUPPORTED_INPUT, "text-input", add(("i", "hello", "text")))
job_case(R.UNSUPPORTED_INPUT, "event-input", add(("i", h("x"), "event", "")))
job_case(R.UNSUPPORTED_INPUT, "untyped-input", add(("i", "https://x.example/d")))
job_case(R.MISSING_SHARDS, "no-i-tags", drop("i"))
job_case(R.MISSING_SHARDS, "only-previous-round", chain(drop("i"), add(("i", h("r1"), "job"))))
job_case(R.INVALID_SHARD, "url-without-scheme", shard_tag("data.example.org/s0.npz", "url", "", "shard-0"))
job_case(R.INVALID_SHARD, "url-with-space", shard_tag("https://data.example.org/a b", "url", "", "shard-0"))
job_case(R.INVALID_SHARD, "url-with-unicode", shard_tag("https://dаta.example.org/s0", "url", "", "shard-0"))
job_case(R.INVALID_SHARD, "url-with-newline", shard_tag("https://d.example.org/\n", "url", "", "shard-0"))
job_case(R.INVALID_SHARD, "url-too-long", shard_tag("https://d.example.org/" + "a" * 2048, "url", "", "shard-0"))
job_case(R.INVALID_SHARD, "four-items", shard_tag("https://d.example.org/s0", "url", "shard-0"))
job_case(
    R.INVALID_SHARD, "http-relay-hint", shard_tag("https://d.example.org/s0", "url", "http://r.example", "shard-0")
)
job_case(R.INVALID_SHARD, "nip44-not-base64", shard_tag("%" * 200, "nip44", P1K, "shard-0"))
job_case(R.INVALID_SHARD, "nip44-too-short", shard_tag("AgAA", "nip44", P1K, "shard-0"))
job_case(
    R.INVALID_SHARD,
    "nip44-wrong-version",
    shard_tag(base64.b64encode(b"\x01" + bytes(130)).decode(), "nip44", P1K, "shard-0"),
)
job_case(R.INVALID_SHARD, "nip44-provider-uppercase", shard_tag(PRIVATE_SHARD.payload, "nip44", P1K.upper(), "shard-0"))
for label in ("shard-01", "shard--1", "shard-1a", "Shard-1", "shard-١", "shard-1000000", "shard-", "0"):
    job_case(R.INVALID_SHARD_INDEX, f"label-{label!r}", shard_tag("https://d.example.org/s0", "url", "", label))
job_case(R.DUPLICATE_SHARD, "index-0-twice", add(("i", "https://d.example.org/other", "url", "", "shard-0")))
job_case(
    R.DUPLICATE_SHARD,
    "plain-and-private-same-index",
    add(("i", PRIVATE_SHARD.payload, "nip44", P3.public_key_hex, "shard-0")),
)
job_case(
    R.TOO_MANY_SHARDS,
    "nine-of-eight",
    add(*[("i", f"https://d.example.org/{k}", "url", "", f"shard-{k}") for k in range(2, 9)]),
)
job_case(R.INVALID_PREVIOUS_JOB, "bad-id", add(("i", "round-1", "job")))
job_case(R.INVALID_PREVIOUS_JOB, "bad-relay", add(("i", h("r"), "job", "nostr.example")))
job_case(R.INVALID_PREVIOUS_JOB, "too-long", add(("i", h("r"), "job", "", "x")))
job_case(R.INVALID_PARAM, "two-items", add(("param", "epochs")))
job_case(R.INVALID_PARAM, "name-with-space", add(("param", "learning rate", "0.1")))
job_case(R.INVALID_PARAM, "unicode-name", add(("param", "épochs", "1")))
job_case(R.INVALID_PARAM, "value-with-control", add(("param", "lr", "0.1\x00")))
job_case(R.INVALID_PARAM, "empty-value", add(("param", "lr", "")))
job_case(R.INVALID_PARAM, "value-too-long", add(("param", "lr", "1" * 1025)))
job_case(R.INVALID_PARAM, "65-params", add(*[("param", f"p{k}", "1") for k in range(65)]))
job_case(R.DUPLICATE_PARAM, "epochs-twice", add(("param", "epochs", "6")))
job_case(R.MISSING_BID, "no-bid", drop("bid"))
for bad in (
    "-1",
    "+1",
    " 1",
    "1 ",
    "01",
    "00",
    "1.0",
    "1e6",
    "",
    "１２３",
    "٣٠٠٠٠٠",
    "1_000",
    "0x10",
    "2100000000000000001",
    "99999999999999999999",
    "NaN",
    "5000000\n",
):
    job_case(R.INVALID_BID, f"bid-{bad!r}", set_tag("bid", bad))
job_case(R.INVALID_BID, "three-items", set_tag("bid", "50000000", "msat"))
job_case(R.INVALID_BID, "no-value", set_tag("bid"))
spec_case(R.BID_TOO_LOW, "below-min", bid_msat=TERMS.min_bid_msat - 1, validator_fee_msat=0)
spec_case(R.BID_TOO_LOW, "zero", bid_msat=0, validator_fee_msat=0)
spec_case(R.BID_TOO_HIGH, "above-max", bid_msat=TERMS.max_bid_msat + 1)
spec_case(R.BID_TOO_HIGH, "all-the-bitcoin", bid_msat=2_100_000_000_000_000_000)
job_case(R.INVALID_VALIDATOR, "uppercase", add(("validator", V3.public_key_hex.upper())))
job_case(R.INVALID_VALIDATOR, "short", add(("validator", V3.public_key_hex[:63])))
job_case(R.INVALID_VALIDATOR, "npub", add(("validator", "npub1" + "q" * 58)))
job_case(R.INVALID_VALIDATOR, "with-relay", add(("validator", V3.public_key_hex, RELAY)))
job_case(R.DUPLICATE_VALIDATOR, "v1-twice", add(("validator", V1K)))
spec_case(
    R.TOO_MANY_VALIDATORS,
    "six-of-five",
    validators=tuple(key(f"v{k}").public_key_hex for k in range(6)),
    validator_fee_msat=0,
)
job_case(R.VALIDATOR_IS_CUSTOMER, "customer-validates-by-name", add(("validator", C)))
job_case(R.VALIDATOR_IS_ESCROW, "escrow-validates", add(("validator", E)))
job_case(R.MISSING_VALIDATION, "no-validation", drop("validation"))
job_case(R.INVALID_VALIDATION, "four-items", set_tag("validation", "accuracy", "max", "0.85"))
job_case(R.INVALID_VALIDATION, "six-items", set_tag("validation", "accuracy", "max", "0.85", "2", "x"))
for metric in ("", "acc uracy", "ácc", "a" * 65, "acc\n"):
    job_case(R.INVALID_METRIC, f"metric-{metric[:8]!r}", set_tag("validation", metric, "max", "0.85", "2"))
for direction in ("MAX", "up", "", "maximize"):
    job_case(R.INVALID_DIRECTION, f"direction-{direction!r}", set_tag("validation", "accuracy", direction, "0.85", "2"))
for threshold in (
    "NaN",
    "inf",
    "1e-3",
    ".5",
    "0.",
    "00.5",
    "+0.5",
    "0,5",
    "",
    "1" * 65,
    "٠.٥",
    "0.5 ",
    "9" * 16,
    "0." + "1" * 13,
    "9" * 64,
):
    job_case(
        R.INVALID_THRESHOLD, f"threshold-{threshold[:10]!r}", set_tag("validation", "accuracy", "max", threshold, "2")
    )
for quorum in ("two", "01", "-1", "1.0", "", "1000000"):
    job_case(R.INVALID_QUORUM, f"quorum-{quorum!r}", set_tag("validation", "accuracy", "max", "0.85", quorum))
job_case(R.QUORUM_OUT_OF_RANGE, "zero", set_tag("validation", "accuracy", "max", "0.85", "0"))
job_case(R.QUORUM_OUT_OF_RANGE, "three-of-two", set_tag("validation", "accuracy", "max", "0.85", "3"))
job_case(
    R.QUORUM_OUT_OF_RANGE,
    "two-when-customer-validates",
    chain(drop("validator"), drop("validator_fee"), set_tag("validation", "loss", "min", "0.1", "2")),
)
job_case(R.MISSING_PAYOUT, "no-payout", drop("payout"))
job_case(R.INVALID_PAYOUT, "all", set_tag("payout", "all"))
job_case(R.INVALID_PAYOUT, "BEST", set_tag("payout", "BEST"))
job_case(R.INVALID_PAYOUT, "three-items", set_tag("payout", "best", "now"))
job_case(R.INVALID_VALIDATOR_FEE, "negative", set_tag("validator_fee", "-5"))
job_case(R.INVALID_VALIDATOR_FEE, "decimal", set_tag("validator_fee", "0.5"))
job_case(
    R.VALIDATOR_FEE_WITHOUT_VALIDATORS,
    "fee-but-customer-validates",
    chain(drop("validator"), set_tag("validation", "accuracy", "max", "0.85", "1")),
)
spec_case(R.FEES_EXCEED_BID, "validator-fees-eat-the-bid", bid_msat=1_000_000, validator_fee_msat=600_000)
spec_case(R.FEES_EXCEED_BID, "exactly-nothing-left", bid_msat=1_000_000, validator_fee_msat=494_500)
spec_case(
    R.FEES_EXCEED_BID,
    "escrow-fee-alone",
    terms=replace(TERMS, fee_base_msat=200_000),
    bid_msat=150_000,
    validator_fee_msat=0,
)
job_case(R.MISSING_DEADLINE, "no-deadline", drop("deadline"))
job_case(R.INVALID_DEADLINE, "one-value", set_tag("deadline", str(NOW + 3600)))
job_case(R.INVALID_DEADLINE, "words", set_tag("deadline", "soon", "later"))
job_case(R.INVALID_DEADLINE, "float", set_tag("deadline", f"{NOW + 3600}.5", str(NOW + 7200)))
job_case(R.INVALID_DEADLINE, "beyond-int64", set_tag("deadline", str(NOW + 3600), str(2**63)))
job_case(R.DEADLINE_PASSED, "results-now", set_tag("deadline", str(NOW), str(NOW + 7200)))
job_case(R.DEADLINE_PASSED, "results-in-the-past", set_tag("deadline", "100", str(NOW + 7200)))
job_case(
    R.DEADLINE_TOO_SOON,
    "one-second-short",
    set_tag("deadline", str(NOW + TERMS.min_results_window_s - 1), str(NOW + 7200)),
)
job_case(R.DEADLINE_ORDER, "equal", set_tag("deadline", str(NOW + 3600), str(NOW + 3600)))
job_case(R.DEADLINE_ORDER, "reversed", set_tag("deadline", str(NOW + 7200), str(NOW + 3600)))
job_case(
    R.DEADLINE_TOO_FAR,
    "one-second-too-far",
    set_tag("deadline", str(NOW + 3600), str(NOW + TERMS.max_job_duration_s + 1)),
)
for mode in ("HOLD", "escrow", "", "custodial "):
    job_case(R.INVALID_MODE, f"mode-{mode!r}", set_tag("mode", mode))
job_case(R.MODE_NOT_OFFERED, "hold-from-custodial-escrow", set_tag("mode", "hold"), terms=CUSTODIAL_ONLY)
job_case(R.MODE_NOT_OFFERED, "custodial-from-hold-escrow", set_tag("mode", "custodial"), terms=HOLD_ONLY)
job_case(
    R.HOLD_WINDOW_EXCEEDED,
    "hold-beyond-max",
    chain(set_tag("mode", "hold"), set_tag("deadline", str(NOW + 3600), str(NOW + TERMS.max_hold_seconds + 1))),
)
job_case(
    R.HOLD_WINDOW_EXCEEDED,
    "auto-on-hold-only-escrow",
    set_tag("deadline", str(NOW + 3600), str(NOW + TERMS.max_hold_seconds + 1)),
    terms=HOLD_ONLY,
)
# NIP-40: relays drop the request at its expiration; it must outlive the job's deadlines.
job_case(R.EXPIRES_BEFORE_DEADLINE, "expires-between-the-deadlines", add(("expiration", str(NOW + 5000))))
job_case(
    R.EXPIRES_BEFORE_DEADLINE,
    "expires-one-second-before-validation",
    chain(set_tag("deadline", str(NOW + 3600), str(NOW + 7200)), add(("expiration", str(NOW + 7199)))),
)
job_case(R.VALIDATOR_FEE_TOO_LOW, "one-msat-per-validator", set_tag("validator_fee", "1"))
job_case(
    R.VALIDATOR_FEE_TOO_LOW, "one-msat-below-the-minimum", set_tag("validator_fee", str(TERMS.min_payout_msat - 1))
)
job_case(
    R.REWARD_TOO_SMALL,
    "split-among-many-possible-results",
    # 1_000_000 - 11_000 fee - 2 x 100_000 validator fees = 789_000 among 2 shards x 4 results
    chain(set_tag("payout", "split"), set_tag("bid", "1000000")),
    terms=replace(TERMS, min_payout_msat=100_000),
)
for refund in (
    "not an address",
    "Alice@Example.com",
    "alice@",
    "@example.com",
    "lnurl1XYZabc",
    "lnurl1",
    "bc1qxyz",
    "alice@exa mple.com",
    "alice@example.com\n",
):
    job_case(R.INVALID_REFUND, f"refund-{refund!r}", set_tag("refund", refund))
job_case(R.INVALID_PROVIDER, "bad-key", add(("p", "nobody")))
job_case(R.INVALID_PROVIDER, "bad-relay-hint", add(("p", P1K, "relay.example.org")))
job_case(R.INVALID_PROVIDER, "four-items", add(("p", P1K, "", "x")))
job_case(R.DUPLICATE_PROVIDER, "p1-twice", add(("p", P1K), ("p", P1K, RELAY)))
job_case(R.TOO_MANY_PROVIDERS, "257", add(*[("p", h(f"provider {k}")) for k in range(257)]))
job_case(R.PROVIDER_CONFLICT, "customer-as-provider", add(("p", C)))
job_case(R.PROVIDER_CONFLICT, "validator-as-provider", add(("p", V2K)))
job_case(
    R.PROVIDER_CONFLICT,
    "shard-encrypted-to-validator",
    add(("i", private_shard(5, V1).payload, "nip44", V1K, "shard-5")),
)
job_case(R.INVALID_RELAY, "http-relay", add(("relays", "https://relay.example.org")))
job_case(R.INVALID_RELAY, "empty-relays", add(("relays",)))
job_case(R.INVALID_RELAY, "repeated-relay", add(("relays", RELAY, RELAY)))
job_case(R.INVALID_RELAY, "17-relays", add(("relays", *[f"wss://r{k}.example.org" for k in range(17)])))


# ------------------------------------------------------------------------ result


def result_tmpl(shard_index: int = 0, job=JOB) -> Template:
    return build_result(job, shard_index=shard_index, model=MODEL)


def result_case(
    reason: CodecErrorReason,
    name: str,
    mutation: Mutation = keep,
    *,
    signer: str = P1K,
    shard_index: int = 0,
    job=JOB,
    kind: int | None = None,
) -> None:
    tmpl = result_tmpl(shard_index, job)
    case(reason, f"result-{name}", lambda: parse_result(mutated(tmpl, mutation, pubkey=signer, kind=kind), job))


result_case(R.WRONG_KIND, "kind-6702", kind=6702)
result_case(R.DUPLICATE_TAG, "two-models", add(("model", MODEL.url, MODEL.sha256, "1")))
result_case(R.DUPLICATE_TAG, "two-shards", add(SHARD0))
result_case(R.DUPLICATE_TAG, "two-payouts", add(("payout", "lud16", "a@b.example"), ("payout", "lud16", "a@b.example")))
result_case(R.MISSING_EVENT_REF, "no-e", drop("e"))
result_case(R.INVALID_EVENT_REF, "bad-id", set_tag("e", "x" * 64))
result_case(R.INVALID_EVENT_REF, "five-items", set_tag("e", JOB.id, "", "job", "x"))
result_case(R.INVALID_EVENT_REF, "nip10-marker", set_tag("e", JOB.id, "", "root"))
result_case(R.INVALID_EVENT_REF, "bad-relay-hint", set_tag("e", JOB.id, "relay"))
result_case(R.AMBIGUOUS_EVENT_REFS, "two-unmarked", add(("e", h("other"))))
result_case(
    R.AMBIGUOUS_EVENT_REFS, "two-marked-job", chain(set_tag("e", JOB.id, "", "job"), add(("e", h("x"), "", "job")))
)
result_case(R.WRONG_JOB, "other-job", set_tag("e", h("another job")))
result_case(R.MISSING_PUBKEY_REF, "no-p", drop("p"))
result_case(R.INVALID_PUBKEY_REF, "bad-p", set_tag("p", "customer"))
result_case(R.DUPLICATE_TAG, "two-p", add(("p", C)))
result_case(R.WRONG_CUSTOMER, "other-customer", set_tag("p", P3.public_key_hex))
result_case(R.SIGNER_IS_CUSTOMER, "customer-signs", signer=C)
result_case(R.SIGNER_IS_ESCROW, "escrow-signs", signer=E)
result_case(R.SIGNER_IS_VALIDATOR, "validator-signs", signer=V2K)
result_case(R.MISSING_SHARD_REF, "no-i", drop("i"))
result_case(R.UNKNOWN_SHARD, "shard-7", set_tag("i", "https://data.example.org/s0.npz", "url", "", "shard-7"))
result_case(R.UNKNOWN_SHARD, "no-label", set_tag("i", "https://data.example.org/s0.npz", "url"))
result_case(R.SHARD_MISMATCH, "other-url", set_tag("i", "https://evil.example.org/s0.npz", "url", "", "shard-0"))
result_case(R.SHARD_MISMATCH, "relay-added", set_tag("i", "https://data.example.org/s0.npz", "url", RELAY, "shard-0"))
result_case(
    R.PROVIDER_NOT_ALLOWED, "not-in-p-tags", signer=P3.public_key_hex, job=base_job(base_spec(providers=(P1K,)))
)
result_case(R.SHARD_NOT_ASSIGNED, "private-shard-of-p2", signer=P1K, shard_index=1)
result_case(R.MISSING_MODEL, "no-model", drop("model"))
result_case(R.INVALID_MODEL, "three-items", set_tag("model", MODEL.url, MODEL.sha256))
result_case(R.INVALID_MODEL, "url-with-space", set_tag("model", "https://m.example.org/a b", MODEL.sha256, "1"))
result_case(R.INVALID_MODEL_SHA256, "uppercase", set_tag("model", MODEL.url, MODEL.sha256.upper(), "1"))
result_case(R.INVALID_MODEL_SHA256, "sha1", set_tag("model", MODEL.url, "a" * 40, "1"))
for size in ("0", "-1", "1.5", str(2**53), "1e6", "one"):
    result_case(R.INVALID_MODEL_SIZE, f"size-{size!r}", set_tag("model", MODEL.url, MODEL.sha256, size))
for payout in (
    ("lud16", "not-an-address"),
    ("paypal", "me@example.com"),
    ("lnurl", "lnurl1bad!"),
    ("lud16",),
    ("lud16", "a@b.example", "extra"),
):
    result_case(R.INVALID_PAYOUT_DESTINATION, f"payout-{'-'.join(payout)[:20]}", set_tag("payout", *payout))
result_case(R.INVALID_AMOUNT, "zero", add(("amount", "0", BOLT11)))
result_case(R.INVALID_AMOUNT, "not-a-number", add(("amount", "lots", BOLT11)))
result_case(R.INVALID_AMOUNT, "amount-zero-no-invoice", add(("amount", "0")))
result_case(R.INVALID_AMOUNT, "too-many-items", add(("amount", "1000", BOLT11, "x")))
result_case(R.INVALID_BOLT11, "lnurl-is-not-an-invoice", add(("amount", "1000", "lnurl1dp68gurn8ghj7um9")))
result_case(R.INVALID_BOLT11, "bitcoin-uri", add(("amount", "1000", "bitcoin:bcrt1qxyz")))
result_case(R.INVALID_BOLT11, "mixed-case", add(("amount", "1000", BOLT11[:10] + BOLT11[10:].upper())))
result_case(R.INVALID_BOLT11, "with-space", add(("amount", "1000", BOLT11 + " ")))


# ------------------------------------------------------------ evaluation request

EVAL_REQ = build_evaluation_request(
    EvaluationRequest(
        job_id=JOB.id, candidates=(Candidate(h("r1")),), validators=(V1K, V2K), metric="accuracy", deadline=NOW + 7200
    )
)


def eval_request_case(reason: CodecErrorReason, name: str, mutation: Mutation, kind: int | None = None) -> None:
    case(reason, f"evalreq-{name}", lambda: parse_evaluation_request(mutated(EVAL_REQ, mutation, pubkey=E, kind=kind)))


eval_request_case(R.WRONG_KIND, "kind-5701", keep, kind=5701)
eval_request_case(R.MISSING_CANDIDATES, "no-i", drop("i"))
eval_request_case(R.INVALID_CANDIDATE, "url-type", set_tag("i", h("r1"), "url", ""))
eval_request_case(R.INVALID_CANDIDATE, "bad-id", set_tag("i", "r1", "event", ""))
eval_request_case(R.INVALID_CANDIDATE, "bad-relay", set_tag("i", h("r1"), "event", "relay"))
eval_request_case(R.DUPLICATE_CANDIDATE, "r1-twice", add(("i", h("r1"), "event", RELAY)))
eval_request_case(R.MISSING_PUBKEY_REF, "no-validator", drop("p"))
# a fallback round (§6b): the round param, its previous link, the keys it hands on
eval_request_case(R.INVALID_ROUND_PARAM, "round-second", add(("param", "round", "second")))
eval_request_case(R.INVALID_FALLBACK_REQUEST, "fallback-without-previous", add(("param", "round", "fallback")))
eval_request_case(R.INVALID_FALLBACK_REQUEST, "first-with-a-key", add(("key", h("r1"), V1K, "A" * 100)))
FALLBACK_REQ = build_evaluation_request(
    EvaluationRequest(
        job_id=JOB.id,
        candidates=(Candidate(h("r1")),),
        validators=(V1K,),
        metric="accuracy",
        deadline=NOW + 7800,
        round=EvalRound.FALLBACK,
        previous=h("first request"),
    )
)
for name, key_tag in (
    ("key-for-no-candidate", ("key", h("r2"), V1K, "A" * 100)),
    ("key-for-no-validator", ("key", h("r1"), V2K, "A" * 100)),
    ("key-not-nip44", ("key", h("r1"), V1K, "not a payload")),
    ("key-three-items", ("key", h("r1"), V1K)),
):
    case(
        R.INVALID_FALLBACK_REQUEST,
        f"evalreq-{name}",
        lambda key_tag=key_tag: parse_evaluation_request(mutated(FALLBACK_REQ, add(key_tag), pubkey=E)),
    )
job_case(R.INVALID_ROUND_PARAM, "round-twice", add(("param", "round", "twice")))
eval_request_case(R.DUPLICATE_VALIDATOR, "v1-twice", add(("p", V1K)))
eval_request_case(R.INVALID_PARAM, "no-metric", drop("param", lambda t: t[1] == "metric"))
eval_request_case(R.INVALID_PARAM, "two-deadlines", add(("param", "deadline", "1")))
eval_request_case(
    R.INVALID_METRIC,
    "metric-with-space",
    chain(drop("param", lambda t: t[1] == "metric"), add(("param", "metric", "top 1"))),
)
eval_request_case(
    R.INVALID_DEADLINE,
    "deadline-words",
    chain(drop("param", lambda t: t[1] == "deadline"), add(("param", "deadline", "soon"))),
)
eval_request_case(R.MISSING_EVENT_REF, "no-job", drop("e"))


# ------------------------------------------------------------- evaluation result

EVAL_RES = build_evaluation_result(
    request_id=h("req"), job_id=JOB.id, escrow=E, scores=(Score(h("r1"), Decimal("0.9"), h("m1")),)
)


def eval_result_case(reason: CodecErrorReason, name: str, mutation: Mutation, kind: int | None = None) -> None:
    case(
        reason,
        f"evalres-{name}",
        lambda: parse_evaluation_result(mutated(EVAL_RES, mutation, pubkey=V1K, kind=kind), escrow_pubkey=E),
    )


def score(value: str, result: str | None = None, sha: str | None = None) -> Mutation:
    return set_tag("score", result or h("r1"), value, sha or h("m1"))


eval_result_case(R.WRONG_KIND, "kind-7000", keep, kind=7000)
eval_result_case(R.NOT_FOR_US, "other-escrow", set_tag("p", OTHER))
eval_result_case(R.MISSING_PUBKEY_REF, "no-p", drop("p"))
eval_result_case(R.MISSING_SCORES, "no-score", drop("score"))
eval_result_case(R.INVALID_SCORE, "three-items", set_tag("score", h("r1"), "0.9"))
eval_result_case(R.INVALID_SCORE, "bad-result-id", score("0.9", result="r1"))
eval_result_case(R.INVALID_SCORE, "bad-sha", score("0.9", sha="M" * 64))
for value in ("1e5", "abc", "", "0.9.1", ".9", "0x1", "½", "９"):
    eval_result_case(R.INVALID_SCORE_VALUE, f"value-{value!r}", score(value))
for value in ("NaN", "nan", "inf", "-Infinity", "+inf", "sNaN"):
    eval_result_case(R.NON_FINITE_SCORE, f"value-{value}", score(value))
# Bounded: at most 15 digits before the point and 12 after (a median of two is then exact and short).
for value in ("9" * 64, "9" * 16, "-" + "9" * 16, "0." + "0" * 12 + "1", "1." + "5" * 13):
    eval_result_case(R.SCORE_OUT_OF_RANGE, f"value-{value[:20]}", score(value))
eval_result_case(R.DUPLICATE_SCORE, "r1-twice", add(("score", h("r1"), "0.8", h("m1"))))
eval_result_case(
    R.AMBIGUOUS_EVENT_REFS, "marked-and-unmarked", chain(drop("e", lambda t: t[3] == "job"), add(("e", JOB.id)))
)
eval_result_case(
    R.AMBIGUOUS_EVENT_REFS,
    "same-id-both-roles",
    chain(drop("e"), add(("e", h("x"), "", "request"), ("e", h("x"), "", "job"))),
)
eval_result_case(
    R.AMBIGUOUS_EVENT_REFS, "three-unmarked", chain(drop("e"), add(("e", h("a")), ("e", h("b")), ("e", h("c"))))
)
eval_result_case(R.AMBIGUOUS_EVENT_REFS, "two-request-markers", add(("e", h("y"), "", "request")))
eval_result_case(R.MISSING_EVENT_REF, "only-request-unmarked", chain(drop("e"), add(("e", h("req")))))
eval_result_case(R.MISSING_EVENT_REF, "only-job-marked", drop("e", lambda t: t[3] == "request"))


# ------------------------------------------------------------ payee invoice (7000)

PAYEE = build_payee_invoice(job_id=JOB.id, escrow=E, amount_msat=1000, bolt11=BOLT11)


def payee_case(reason: CodecErrorReason, name: str, mutation: Mutation, kind: int | None = None) -> None:
    case(
        reason,
        f"payee-{name}",
        lambda: parse_feedback(mutated(PAYEE, mutation, pubkey=P1K, kind=kind), escrow_pubkey=E),
    )


payee_case(R.WRONG_KIND, "kind-6701", keep, kind=6701)
payee_case(R.NOT_FOR_US, "to-the-customer", set_tag("p", C))
payee_case(R.MISSING_STATUS, "no-status", drop("status"))
payee_case(R.INVALID_STATUS, "bogus-status", set_tag("status", "pay-me"))
payee_case(R.INVALID_STATUS, "four-items", set_tag("status", "payment-required", "x", "y"))
payee_case(R.INVALID_STATUS, "control-in-info", set_tag("status", "payment-required", "pay\x1bme"))
payee_case(R.UNSUPPORTED_FEEDBACK, "processing", set_tag("status", "processing"))
payee_case(R.UNSUPPORTED_FEEDBACK, "partial", set_tag("status", "partial", "half done"))
payee_case(R.MISSING_AMOUNT, "no-amount", drop("amount"))
payee_case(R.INVALID_AMOUNT, "negative", set_tag("amount", "-1000", BOLT11))
payee_case(R.INVALID_AMOUNT, "no-invoice", set_tag("amount", "1000"))
payee_case(R.INVALID_BOLT11, "not-an-invoice", set_tag("amount", "1000", "please pay me"))
payee_case(R.MISSING_EVENT_REF, "no-job", drop("e"))
payee_case(R.DUPLICATE_TAG, "two-amounts", add(("amount", "2000", BOLT11)))


# ------------------------------------------------------------ escrow feedback (7000)

PREIMAGE = h("preimage")
PAYMENT_HASH = hashlib.sha256(bytes.fromhex(PREIMAGE)).hexdigest()
OFFER = build_escrow_offer(EscrowOffer(JOB.id, C, 50_000_000, BOLT11, Mode.HOLD))
FUNDED = build_funded(Funded(JOB.id, C, 50_000_000))
COMPLETE = build_validation_complete(ValidationComplete(JOB.id, C, (Verdict(h("r1"), True, Decimal("0.9"), 5),)))
CLAIMABLE = build_reward_claimable(RewardClaimable(JOB.id, P1K, 5, h("r1")))
EXPIRED = build_claim_expired(ClaimExpired(JOB.id, P1K, 5, NOW, h("r1")))
PAID = build_reward_paid(RewardPaid(JOB.id, h("r1"), P1K, PaymentProof(PAYMENT_HASH, PREIMAGE, 5, 1)))
REFUNDED = build_refunded(Refunded(JOB.id, C, "no_results", 50_000_000))
ERROR = build_error_feedback(ErrorFeedback(JOB.id, C, "bid_too_low", "bid must be at least 1 msat"))


def fb_case(reason: CodecErrorReason, name: str, tmpl: Template, parse: Callable, mutation: Mutation) -> None:
    case(reason, f"feedback-{name}", lambda: parse(mutated(tmpl, mutation, pubkey=E)))


fb_case(
    R.INVALID_STATUS,
    "offer-with-processing-status",
    OFFER,
    parse_escrow_offer,
    set_tag("status", "processing", "escrow"),
)
fb_case(
    R.INVALID_ESCROW_STATE, "offer-auto-mode", OFFER, parse_escrow_offer, set_tag("escrow", "awaiting-funding", "auto")
)
fb_case(R.INVALID_ESCROW_STATE, "offer-without-state", OFFER, parse_escrow_offer, drop("escrow"))
fb_case(R.INVALID_ESCROW_STATE, "offer-two-items", OFFER, parse_escrow_offer, set_tag("escrow", "awaiting-funding"))
fb_case(R.MISSING_AMOUNT, "offer-no-amount", OFFER, parse_escrow_offer, drop("amount"))
fb_case(R.INVALID_ESCROW_STATE, "funded-zero", FUNDED, parse_funded, set_tag("escrow", "funded", "0"))
fb_case(R.INVALID_ESCROW_STATE, "funded-wrong-state", FUNDED, parse_funded, set_tag("escrow", "refunded", "5"))
fb_case(R.INVALID_VERDICT, "no-verdict", COMPLETE, parse_validation_complete, drop("accepted"))
fb_case(
    R.INVALID_VERDICT,
    "accepted-no-quorum",
    COMPLETE,
    parse_validation_complete,
    set_tag("accepted", h("r1"), "no-quorum"),
)
fb_case(
    R.INVALID_VERDICT,
    "rejected-with-reward",
    COMPLETE,
    parse_validation_complete,
    add(("rejected", h("r2"), "0.1", "5")),
)
fb_case(
    R.INVALID_VERDICT,
    "two-verdicts-one-result",
    COMPLETE,
    parse_validation_complete,
    add(("rejected", h("r1"), "no-quorum")),
)
fb_case(R.INVALID_VERDICT, "bad-reward", COMPLETE, parse_validation_complete, set_tag("accepted", h("r1"), "0.9", "-5"))
fb_case(
    R.INVALID_VERDICT,
    "median-of-65-characters",
    COMPLETE,
    parse_validation_complete,
    set_tag("accepted", h("r1"), "1" + "0" * 64, "5"),
)
fb_case(
    R.INVALID_VERDICT,
    "median-with-14-places",
    COMPLETE,
    parse_validation_complete,
    set_tag("accepted", h("r1"), "0." + "1" * 14, "5"),
)
fb_case(R.INVALID_AMOUNT, "claimable-with-invoice", CLAIMABLE, parse_reward_claimable, set_tag("amount", "5", BOLT11))
fb_case(R.MISSING_AMOUNT, "claimable-no-amount", CLAIMABLE, parse_reward_claimable, drop("amount"))
fb_case(R.INVALID_CLAIM_BY, "claimable-claim-by-word", CLAIMABLE, parse_reward_claimable, add(("claim_by", "soon")))
# an appeal (by the appellant, §6c): its reason is bounded text
APPEAL = build_appeal(job_id=JOB.id, escrow=E, result_id="c" * 64, reason="scored on the wrong split")
case(R.INVALID_APPEAL_REASON, "appeal-reason-too-long", lambda: parse_appeal(mutated(APPEAL, keep, content="x" * 1001)))
case(R.INVALID_APPEAL_REASON, "appeal-reason-control", lambda: parse_appeal(mutated(APPEAL, keep, content="a\x07b")))
fb_case(R.INVALID_CLAIM_BY, "claimable-claim-by-float", CLAIMABLE, parse_reward_claimable, add(("claim_by", "1.5")))
fb_case(R.INVALID_CLAIM_BY, "claimable-claim-by-empty", CLAIMABLE, parse_reward_claimable, add(("claim_by",)))
fb_case(R.INVALID_CLAIM_BY, "claimable-claim-by-two", CLAIMABLE, parse_reward_claimable, add(("claim_by", "1", "2")))
fb_case(
    R.INVALID_CLAIM_BY, "claimable-claim-by-int64", CLAIMABLE, parse_reward_claimable, add(("claim_by", str(2**63)))
)
fb_case(R.INVALID_CLAIM_BY, "expired-no-claim-by", EXPIRED, parse_claim_expired, drop("claim_by"))
fb_case(R.INVALID_CLAIM_BY, "expired-claim-by-negative", EXPIRED, parse_claim_expired, set_tag("claim_by", "-1"))
fb_case(R.MISSING_AMOUNT, "expired-no-amount", EXPIRED, parse_claim_expired, drop("amount"))
fb_case(
    R.INVALID_STATUS, "expired-as-success", EXPIRED, parse_claim_expired, set_tag("status", "success", "claim expired")
)
fb_case(
    R.INVALID_PAYMENT,
    "preimage-mismatch",
    PAID,
    parse_reward_paid,
    set_tag("payment", PAYMENT_HASH, h("other preimage"), "5", "1"),
)
fb_case(
    R.INVALID_PAYMENT, "negative-fee", PAID, parse_reward_paid, set_tag("payment", PAYMENT_HASH, PREIMAGE, "5", "-1")
)
fb_case(R.INVALID_PAYMENT, "zero-amount", PAID, parse_reward_paid, set_tag("payment", PAYMENT_HASH, PREIMAGE, "0", "1"))
fb_case(R.INVALID_PAYMENT, "no-payment", PAID, parse_reward_paid, drop("payment"))
fb_case(R.INVALID_PAYMENT, "four-items", PAID, parse_reward_paid, set_tag("payment", PAYMENT_HASH, PREIMAGE, "5"))
fb_case(R.MISSING_EVENT_REF, "paid-without-result", PAID, parse_reward_paid, drop("e", lambda t: t[3] == "result"))
fb_case(
    R.INVALID_STATUS, "refund-bad-code", REFUNDED, parse_refunded, set_tag("status", "error", "refunded: No Results")
)
fb_case(
    R.INVALID_STATUS,
    "refund-with-text",
    REFUNDED,
    parse_refunded,
    set_tag("status", "error", "refunded: no_results: and more"),
)
fb_case(R.INVALID_ESCROW_STATE, "refund-without-amount", REFUNDED, parse_refunded, drop("escrow"))
fb_case(
    R.INVALID_STATUS, "error-without-message", ERROR, parse_error_feedback, set_tag("status", "error", "bid_too_low")
)
fb_case(R.INVALID_STATUS, "error-with-state", ERROR, parse_error_feedback, add(("escrow", "funded", "5")))
fb_case(R.UNSUPPORTED_FEEDBACK, "dispatch-partial", ERROR, parse_escrow_feedback, set_tag("status", "partial", "x"))
fb_case(
    R.UNSUPPORTED_FEEDBACK,
    "dispatch-unknown-success",
    ERROR,
    parse_escrow_feedback,
    set_tag("status", "success", "job done"),
)
fb_case(R.MISSING_STATUS, "dispatch-no-status", ERROR, parse_escrow_feedback, drop("status"))


# ----------------------------------------------------------------------- deletion

DELETION = build_deletion((JOB.id,), kinds=(5701,))


def deletion_case(reason: CodecErrorReason, name: str, mutation: Mutation, kind: int | None = None) -> None:
    case(reason, f"deletion-{name}", lambda: parse_deletion(mutated(DELETION, mutation, kind=kind)))


deletion_case(R.WRONG_KIND, "kind-7000", keep, kind=7000)
deletion_case(R.MISSING_EVENT_REF, "only-a-tags", chain(drop("e"), add(("a", "5701:abc:d"))))
deletion_case(R.INVALID_EVENT_REF, "bad-id", add(("e", "note1abc")))
deletion_case(R.INVALID_EVENT_REF, "marker", add(("e", h("x"), "", "reply")))
deletion_case(R.INVALID_KIND_REF, "words", add(("k", "job")))
deletion_case(R.INVALID_KIND_REF, "too-big", add(("k", "65536")))


# ------------------------------------------------------------------- announcement

ANNOUNCE = build_announcement(Announcement(d="main", name="E", about="", terms=TERMS))
BODY = json.loads(ANNOUNCE.content)


def announce_case(
    name: str, mutation: Mutation = keep, content: str | None = None, reason: CodecErrorReason = R.INVALID_ANNOUNCEMENT
) -> None:
    case(
        reason,
        f"announcement-{name}",
        lambda: parse_announcement(mutated(ANNOUNCE, mutation, pubkey=E, content=content)),
    )


def body(**changes) -> str:
    return json.dumps({k: v for k, v in {**BODY, **changes}.items() if v is not ...})


announce_case("not-json", content="{terms}")
announce_case("array", content="[1,2]")
announce_case("deep-nesting", content="[" * 100_000 + "]" * 100_000)
announce_case("huge-int-literal", content='{"fee_ppm": ' + "9" * 5000 + "}")
announce_case("missing-fee", content=body(fee_base_msat=...))
announce_case("bool-for-int", content=body(fee_ppm=True))
announce_case("float-for-int", content=body(fee_ppm=10000.0))
announce_case("auto-mode", content=body(modes=["auto", "hold"]))
announce_case("duplicate-modes", content=body(modes=["hold", "hold"]))
announce_case("mainnet-is-bitcoin", content=body(network="mainnet"))
announce_case("min-above-max", content=body(min_bid_msat=10, max_bid_msat=5))
announce_case("name-not-string", content=body(name=5))
announce_case("no-d", drop("d"))
announce_case("k-words", set_tag("k", "job"))
announce_case("two-d", add(("d", "x")), reason=R.DUPLICATE_TAG)
case(R.WRONG_KIND, "announcement-kind-0", lambda: parse_announcement(mutated(ANNOUNCE, keep, kind=0)))


# ------------------------------------------------------------- shards and NIP-40


def _undecryptable_non_url():
    conv = nip44.conversation_key(CUSTOMER.secret_bytes, P2K)
    return decrypt_shard(P2, C, nip44.encrypt("not a url at all", conv))


case(R.UNDECRYPTABLE_SHARD, "shard-wrong-key", lambda: decrypt_shard(P1, C, PRIVATE_SHARD.payload))
case(R.UNDECRYPTABLE_SHARD, "shard-wrong-customer", lambda: decrypt_shard(P2, P3.public_key_hex, PRIVATE_SHARD.payload))
case(
    R.UNDECRYPTABLE_SHARD,
    "shard-tampered",
    lambda: decrypt_shard(
        P2,
        C,
        PRIVATE_SHARD.payload[:-8]
        + ("A" * 7 if PRIVATE_SHARD.payload[-8] != "A" else "B" * 7)
        + PRIVATE_SHARD.payload[-1],
    ),
)
case(R.UNDECRYPTABLE_SHARD, "shard-not-a-url", _undecryptable_non_url)
case(R.INVALID_EXPIRATION, "nip40-negative", lambda: nip40.expiration(unsigned(1, [("expiration", "-5")])))
case(R.INVALID_EXPIRATION, "nip40-float", lambda: nip40.is_expired(unsigned(1, [("expiration", "1.5")]), NOW))
case(R.DUPLICATE_TAG, "nip40-twice", lambda: nip40.expiration(unsigned(1, [("expiration", "5"), ("expiration", "5")])))
case(R.INVALID_SHARD, "encrypt-to-bad-key", lambda: Shard.for_provider(CUSTOMER, "zz" * 32, 0, "https://x.example/a"))
case(
    R.INVALID_SHARD,
    "encrypt-to-off-curve-key",
    lambda: Shard.for_provider(CUSTOMER, "ff" * 32, 0, "https://x.example/a"),
)


# ------------------------------------------------------------- sealed results (§5a)

SEALING_JOB_TMPL = build_job_request(base_spec(sealing=Sealing.REQUIRED))
SEALING_JOB = base_job(base_spec(sealing=Sealing.REQUIRED))
# The customer validates: it names no validator (quorum 1, no validator fee).
CV_SPEC = base_spec(validators=(), validator_fee_msat=0, validation=replace(base_spec().validation, quorum=1))
CV_JOB_TMPL = build_job_request(CV_SPEC)
CV_JOB = base_job(CV_SPEC)
SEALED = seal(b"a trained model, sealed " * 40, key=hashlib.sha256(b"codec test content key").digest(), nonce=bytes(12))
SEALED_MODEL = sealed_model(P1, SEALED, url="https://blobs.example.org/c0.bin", recipients=(E, V1K, V2K))
SEALED_TMPL = build_result(JOB, shard_index=0, model=SEALED_MODEL)
SEALED_REQUIRED_TMPL = build_result(SEALING_JOB, shard_index=0, model=SEALED_MODEL)
SEALED_TAG = next(t for t in SEALED_TMPL.tags if t[0] == "sealed")
KEY_TAGS = [t for t in SEALED_TMPL.tags if t[0] == "key"]
PAYLOAD = SEALED_MODEL.keys[0].payload  # a well-formed NIP-44 payload (the codec checks shapes only)
P3K = P3.public_key_hex


def sealed_case(reason: CodecErrorReason, name: str, mutation: Mutation, *, tmpl=SEALED_TMPL, job=JOB) -> None:
    case(reason, f"sealed-{name}", lambda: parse_result(mutated(tmpl, mutation, pubkey=P1K), job))


def sealed_items(**changes: str) -> Mutation:
    """The ``sealed`` tag with some of its items changed (``url``, ``c_sha``, ``c_size``, ``m_sha``, ``m_size``, ``k_sha``)."""
    items = dict(zip(("url", "c_sha", "c_size", "m_sha", "m_size", "k_sha"), SEALED_TAG[1:], strict=True))
    return set_tag("sealed", *{**items, **changes}.values())


def key_for(recipient: str) -> Callable[[tuple[str, ...]], bool]:
    return lambda t: len(t) > 1 and t[1] == recipient


def replace_key(recipient: str, *items: str) -> Mutation:
    return chain(drop("key", key_for(recipient)), add(("key", *items)))


S = SEALED_MODEL
sealed_case(R.INVALID_SEALED_MODEL, "six-items", set_tag("sealed", *SEALED_TAG[1:-1]))
sealed_case(R.INVALID_SEALED_MODEL, "eight-items", set_tag("sealed", *SEALED_TAG[1:], "x"))
sealed_case(R.INVALID_SEALED_MODEL, "url-without-scheme", sealed_items(url="blobs.example.org/c0.bin"))
sealed_case(R.INVALID_SEALED_MODEL, "url-with-space", sealed_items(url="https://blobs.example.org/c 0.bin"))
sealed_case(R.INVALID_SEALED_MODEL, "ciphertext-sha-uppercase", sealed_items(c_sha=S.ciphertext_sha256.upper()))
sealed_case(R.INVALID_SEALED_MODEL, "model-sha-63-hex", sealed_items(m_sha=S.sha256[:63]))
sealed_case(R.INVALID_SEALED_MODEL, "key-sha-not-hex", sealed_items(k_sha="g" * 64))
sealed_case(R.INVALID_SEALED_MODEL, "zero-model-size", sealed_items(m_size="0", c_size="28"))
sealed_case(R.INVALID_SEALED_MODEL, "model-size-leading-zero", sealed_items(m_size=f"0{S.size_bytes}"))
sealed_case(R.INVALID_SEALED_MODEL, "model-size-words", sealed_items(m_size="big"))
sealed_case(R.INVALID_SEALED_MODEL, "model-size-2^53", sealed_items(m_size=str(2**53), c_size=str(2**53 + 28)))
sealed_case(R.INVALID_SEALED_MODEL, "ciphertext-model+27", sealed_items(c_size=str(S.size_bytes + 27)))
sealed_case(R.INVALID_SEALED_MODEL, "ciphertext-model+29", sealed_items(c_size=str(S.size_bytes + 29)))
sealed_case(R.INVALID_SEALED_MODEL, "ciphertext-as-big-as-model", sealed_items(c_size=str(S.size_bytes)))
sealed_case(R.INVALID_SEALED_MODEL, "ciphertext-hash-is-model-hash", sealed_items(c_sha=S.sha256))
sealed_case(R.MODEL_AND_SEALED, "plus-a-model", add(("model", MODEL.url, MODEL.sha256, "1000")))
sealed_case(R.DUPLICATE_TAG, "two-sealed", dup("sealed"))
sealed_case(R.INVALID_KEY, "two-items", replace_key(V2K, V2K))
sealed_case(R.INVALID_KEY, "four-items", replace_key(V2K, V2K, PAYLOAD, "x"))
sealed_case(R.INVALID_KEY, "recipient-uppercase", replace_key(V2K, V2K.upper(), PAYLOAD))
sealed_case(R.INVALID_KEY, "recipient-npub", replace_key(V2K, "npub1" + "q" * 58, PAYLOAD))
sealed_case(R.INVALID_KEY, "payload-not-base64", replace_key(V2K, V2K, "%" * 200))
sealed_case(R.INVALID_KEY, "payload-too-short", replace_key(V2K, V2K, "AgAA"))
sealed_case(R.INVALID_KEY, "payload-version-1", replace_key(V2K, V2K, base64.b64encode(b"\x01" + bytes(130)).decode()))
sealed_case(R.INVALID_KEY, "66-keys", add(*[("key", h(f"recipient {k}"), PAYLOAD) for k in range(63)]))
sealed_case(R.DUPLICATE_KEY, "escrow-twice", dup("key"))
sealed_case(R.DUPLICATE_KEY, "v1-twice-other-payload", add(("key", V1K, SEALED_MODEL.keys[2].payload)))
sealed_case(R.MISSING_KEY, "none-for-the-escrow", drop("key", key_for(E)))
sealed_case(R.MISSING_KEY, "none-for-validator-1", drop("key", key_for(V1K)))
sealed_case(R.MISSING_KEY, "no-key-at-all", drop("key"))
sealed_case(R.KEY_RECIPIENT_NOT_ALLOWED, "for-the-customer", add(("key", C, PAYLOAD)))
sealed_case(R.KEY_RECIPIENT_NOT_ALLOWED, "for-a-stranger", add(("key", P3K, PAYLOAD)))
sealed_case(R.KEY_RECIPIENT_NOT_ALLOWED, "for-the-provider-itself", add(("key", P1K, PAYLOAD)))
sealed_case(R.KEY_RECIPIENT_NOT_ALLOWED, "customer-instead-of-escrow", replace_key(E, C, PAYLOAD))
sealed_case(
    R.SEALING_REQUIRED,
    "plain-result",
    chain(drop("sealed"), drop("key"), add(("model", MODEL.url, MODEL.sha256, "1000"))),
    tmpl=SEALED_REQUIRED_TMPL,
    job=SEALING_JOB,
)
sealed_case(
    R.SEALING_REQUIRED,
    "plain-result-keeping-its-keys",
    chain(drop("sealed"), add(("model", MODEL.url, MODEL.sha256, "1000"))),
    tmpl=SEALED_REQUIRED_TMPL,
    job=SEALING_JOB,
)
sealed_case(
    R.SEALING_NEEDS_VALIDATORS,
    "customer-validates",
    chain(drop("model"), add(SEALED_TAG, *KEY_TAGS)),
    tmpl=build_result(CV_JOB, shard_index=0, model=MODEL),
    job=CV_JOB,
)
sealed_case(
    R.SEALING_NEEDS_VALIDATORS,
    "customer-validates-key-for-escrow-only",
    chain(drop("model"), add(SEALED_TAG, KEY_TAGS[0])),
    tmpl=build_result(CV_JOB, shard_index=0, model=MODEL),
    job=CV_JOB,
)
job_case(
    R.SEALING_NEEDS_VALIDATORS, "sealing-required-customer-validates", add(("sealing", "required")), tmpl=CV_JOB_TMPL
)
for sealing in ("REQUIRED", "maybe", "", "required "):
    job_case(R.INVALID_SEALING, f"sealing-{sealing!r}", add(("sealing", sealing)))
job_case(R.INVALID_SEALING, "sealing-no-value", add(("sealing",)))
job_case(R.INVALID_SEALING, "sealing-three-items", add(("sealing", "required", "now")))
job_case(R.DUPLICATE_TAG, "two-sealing", dup("sealing"), tmpl=SEALING_JOB_TMPL)
GOOD_SHA = "ab" * 32
for name, tag in (
    ("baseline-short", ("baseline", GOOD_SHA, "https://m.example.org/g")),
    ("baseline-long", ("baseline", GOOD_SHA, "https://m.example.org/g", "0", "x")),
    ("baseline-sha", ("baseline", "xyz", "https://m.example.org/g", "0")),
    ("baseline-url", ("baseline", GOOD_SHA, "not a url", "0")),
    ("baseline-negative", ("baseline", GOOD_SHA, "https://m.example.org/g", "-0.1")),
    ("baseline-nan", ("baseline", GOOD_SHA, "https://m.example.org/g", "NaN")),
    ("baseline-exponent", ("baseline", GOOD_SHA, "https://m.example.org/g", "1e3")),
):
    job_case(R.INVALID_BASELINE, name, add(tag))
job_case(
    R.DUPLICATE_TAG,
    "two-baselines",
    add(("baseline", GOOD_SHA, "https://m.example.org/g", "0"), ("baseline", GOOD_SHA, "https://m.example.org/h", "0")),
)


# ------------------------------------------------------------------ sealed scores (§6)

SEALED_SCORES = (Score(h("r1"), Decimal("0.9"), h("m1")), Score(h("r2"), None, h("m2")))
EVAL_SEALED = build_evaluation_result(
    request_id=h("req"), job_id=JOB.id, escrow=E, scores=SEALED_SCORES, seal_with=V1, nonce=bytes(32)
)


def to_escrow(plaintext: str, sender=V1, escrow: str = E) -> str:
    return nip44.encrypt(plaintext, nip44.conversation_key(sender.secret_bytes, escrow))


def opened(content: str | None = None, *, signer: str = V1K, escrow=ESCROW):
    """``open_scores`` of the sealed evaluation result, its content or signer changed."""
    parsed = parse_evaluation_result(mutated(EVAL_SEALED, keep, pubkey=signer, content=content), escrow_pubkey=E)
    return open_scores(parsed, escrow)


def scores_case(reason: CodecErrorReason, name: str, thunk: Callable[[], object]) -> None:
    case(reason, f"sealed-scores-{name}", thunk)


def tampered(payload: str) -> str:
    middle = len(payload) // 2
    return payload[:middle] + ("A" if payload[middle] != "A" else "B") + payload[middle + 1 :]


scores_case(R.UNDECRYPTABLE_SCORES, "content-in-the-clear", lambda: opened('[["score"]]'))
scores_case(R.UNDECRYPTABLE_SCORES, "content-empty", lambda: opened(""))
scores_case(
    R.UNDECRYPTABLE_SCORES, "content-version-1", lambda: opened(base64.b64encode(b"\x01" + bytes(130)).decode())
)
scores_case(R.UNDECRYPTABLE_SCORES, "to-another-escrow", lambda: opened(to_escrow("[]", escrow=OTHER)))
scores_case(R.UNDECRYPTABLE_SCORES, "opened-with-another-key", lambda: opened(escrow=OTHER_ESCROW))
scores_case(R.UNDECRYPTABLE_SCORES, "signed-by-another-validator", lambda: opened(signer=V2K))
scores_case(R.UNDECRYPTABLE_SCORES, "tampered", lambda: opened(tampered(EVAL_SEALED.content)))
for body_name, body_text in (
    ("object", '{"score": [["score"]]}'),
    ("string", '"score"'),
    ("number", "42"),
    ("null", "null"),
    ("not-json", "score r1 0.9"),
    ("list-of-objects", '[{"score": 1}]'),
    ("list-of-strings", '["score"]'),
    ("number-in-a-tag", f'[["score", "{h("r1")}", 0.9, "{h("m1")}"]]'),
    ("other-tag", f'[["p", "{E}"]]'),
    ("empty-tag", "[[]]"),
    ("deep-nesting", "[" * 30_000 + "]" * 30_000),
):
    scores_case(R.UNDECRYPTABLE_SCORES, f"decrypts-to-{body_name}", lambda t=body_text: opened(to_escrow(t)))
# Opened scores get the checks of scores in the clear.
scores_case(R.MISSING_SCORES, "decrypts-to-empty-list", lambda: opened(to_escrow("[]")))
scores_case(R.INVALID_SCORE, "three-items", lambda: opened(to_escrow(f'[["score", "{h("r1")}", "0.9"]]')))
scores_case(R.NON_FINITE_SCORE, "nan", lambda: opened(to_escrow(f'[["score", "{h("r1")}", "NaN", "{h("m1")}"]]')))
scores_case(
    R.DUPLICATE_SCORE,
    "r1-twice",
    lambda: opened(
        to_escrow(json.dumps([["score", h("r1"), "0.9", h("m1")], ["score", h("r1"), "unreadable", h("m1")]]))
    ),
)
eval_sealed = EVAL_SEALED
case(
    R.SCORES_AND_ENCRYPTED,
    "sealed-scores-plus-a-score-in-the-clear",
    lambda: parse_evaluation_result(
        mutated(eval_sealed, add(("score", h("r1"), "0.9", h("m1"))), pubkey=V1K), escrow_pubkey=E
    ),
)
eval_result_case(R.SCORES_AND_ENCRYPTED, "clear-scores-marked-encrypted", add(("encrypted",)))
eval_result_case(R.INVALID_SCORE, "unreadable-bad-sha", score("unreadable", sha="M" * 64))
eval_result_case(R.INVALID_SCORE_VALUE, "value-Unreadable", score("Unreadable"))


# ---------------------------------------------------- validation complete: scores and split

COMPLETE_FULL = build_validation_complete(
    ValidationComplete(
        JOB.id,
        C,
        (Verdict(h("r1"), True, Decimal("0.905"), 5), Verdict(h("r2"), False, None, unreadable=True)),
        scores=(
            PublishedScore(h("r1"), V1K, Decimal("0.9")),
            PublishedScore(h("r1"), V2K, Decimal("0.91")),
            PublishedScore(h("r2"), V1K, None),
        ),
        split=JOB.split,
    )
)
SPLIT = JOB.split
assert SPLIT == MoneySplit(50_000_000, 501_000, 100_000, 2, 49_299_000)


def complete_case(reason: CodecErrorReason, name: str, mutation: Mutation) -> None:
    fb_case(reason, f"complete-{name}", COMPLETE_FULL, parse_validation_complete, mutation)


def split(*items: object) -> Mutation:
    return set_tag("split", *map(str, items))


complete_case(R.INVALID_SPLIT, "five-items", split(50_000_000, 501_000, 100_000, 2))
complete_case(R.INVALID_SPLIT, "seven-items", split(50_000_000, 501_000, 100_000, 2, 49_299_000, 0))
complete_case(R.INVALID_SPLIT, "share-one-too-many", split(50_000_000, 501_000, 100_000, 2, 49_299_001))
complete_case(R.INVALID_SPLIT, "share-one-too-few", split(50_000_000, 501_000, 100_000, 2, 49_298_999))
complete_case(R.INVALID_SPLIT, "one-validator-fee-missing", split(50_000_000, 501_000, 100_000, 1, 49_299_000))
complete_case(R.INVALID_SPLIT, "nothing-for-providers", split(701_000, 501_000, 100_000, 2, 0))
complete_case(R.INVALID_SPLIT, "negative-fee", split(50_000_000, -501_000, 100_000, 2, 50_301_000))
complete_case(R.INVALID_SPLIT, "bid-leading-zero", split("050000000", 501_000, 100_000, 2, 49_299_000))
complete_case(R.INVALID_SPLIT, "count-words", split(50_000_000, 501_000, 100_000, "two", 49_299_000))
complete_case(R.DUPLICATE_TAG, "two-splits", dup("split"))
complete_case(R.INVALID_SCORE, "score-three-items", add(("score", h("r1"), V1K)))
complete_case(R.INVALID_SCORE, "score-for-a-result-without-verdict", add(("score", h("r9"), V1K, "0.5")))
complete_case(R.INVALID_SCORE, "score-validator-uppercase", add(("score", h("r1"), V3.public_key_hex.upper(), "0.5")))
complete_case(R.DUPLICATE_SCORE, "v1-scores-r1-twice", add(("score", h("r1"), V1K, "0.8")))
complete_case(R.INVALID_SCORE_VALUE, "score-words", add(("score", h("r2"), V2K, "good")))
complete_case(R.SCORE_OUT_OF_RANGE, "score-16-digits", add(("score", h("r2"), V2K, "9" * 16)))
complete_case(
    R.NON_FINITE_SCORE, "score-nan", add(("score", h("r2"), V2K, "NaN"))
)  # the same rule as an evaluation result


# ------------------------------------------------------------------ model key (§5a)

MODEL_KEY_PAYLOAD = wrap_key(ESCROW, C, SEALED.key, nonce=bytes(32)).payload
MODEL_KEY = build_model_key(ModelKey(JOB.id, C, h("r1"), MODEL_KEY_PAYLOAD))


def model_key_case(reason: CodecErrorReason, name: str, mutation: Mutation, parse: Callable = parse_model_key) -> None:
    fb_case(reason, f"model-key-{name}", MODEL_KEY, parse, mutation)


model_key_case(R.KEY_RECIPIENT_NOT_ALLOWED, "key-for-the-provider", set_tag("key", P1K, MODEL_KEY_PAYLOAD))
model_key_case(R.KEY_RECIPIENT_NOT_ALLOWED, "p-is-not-the-key-recipient", set_tag("p", P1K))
model_key_case(
    R.KEY_RECIPIENT_NOT_ALLOWED,
    "dispatched-key-for-a-stranger",
    set_tag("key", P3K, MODEL_KEY_PAYLOAD),
    parse_escrow_feedback,
)
model_key_case(R.MISSING_KEY, "no-key", drop("key"))
model_key_case(R.MISSING_KEY, "dispatched-no-key", drop("key"), parse_escrow_feedback)
model_key_case(R.DUPLICATE_TAG, "two-keys", dup("key"))
model_key_case(R.INVALID_KEY, "key-two-items", set_tag("key", C))
model_key_case(R.INVALID_KEY, "key-payload-not-nip44", set_tag("key", C, SEALED.key.hex()))
model_key_case(R.INVALID_KEY, "key-recipient-uppercase", set_tag("key", C.upper(), MODEL_KEY_PAYLOAD))
model_key_case(R.MISSING_EVENT_REF, "no-result-ref", drop("e", lambda t: t[3] == "result"))
model_key_case(R.INVALID_STATUS, "wrong-info", set_tag("status", "success", "model keys"))


# --------------------------------------------------------------- receipt with its invoice (§7)

PAID_WITH_INVOICE = build_reward_paid(
    RewardPaid(JOB.id, h("r1"), P1K, PaymentProof(PAYMENT_HASH, PREIMAGE, 5, 1), bolt11=BOLT11)
)


def receipt_case(reason: CodecErrorReason, name: str, mutation: Mutation) -> None:
    fb_case(reason, f"receipt-{name}", PAID_WITH_INVOICE, parse_reward_paid, mutation)


receipt_case(R.INVALID_BOLT11, "bolt11-words", set_tag("bolt11", "please pay me"))
receipt_case(R.INVALID_BOLT11, "bolt11-lnurl", set_tag("bolt11", "lnurl1dp68gurn8ghj7um9wfmxjcm99e3k7mf0"))
receipt_case(R.INVALID_BOLT11, "bolt11-mixed-case", set_tag("bolt11", BOLT11[:10] + BOLT11[10:].upper()))
receipt_case(R.INVALID_BOLT11, "bolt11-with-space", set_tag("bolt11", BOLT11 + " "))
receipt_case(R.INVALID_BOLT11, "bolt11-empty", set_tag("bolt11", ""))
receipt_case(R.INVALID_BOLT11, "bolt11-no-value", set_tag("bolt11"))
receipt_case(R.INVALID_BOLT11, "bolt11-three-items", set_tag("bolt11", BOLT11, "paid"))
receipt_case(R.DUPLICATE_TAG, "two-bolt11", dup("bolt11"))


# ---------------------------------------------------------- announcement: validator pool (§1)

POOL = (PoolValidator(V1K, "validator one"), PoolValidator(V2K, "validator two"))
ANNOUNCE_POOL = build_announcement(Announcement(d="main", name="E", about="", terms=TERMS, validator_pool=POOL))
POOL_BODY = json.loads(ANNOUNCE_POOL.content)


def pool_case(name: str, validators: object) -> None:
    content = json.dumps({**POOL_BODY, "validators": validators})
    case(
        R.INVALID_POOL,
        f"announcement-pool-{name}",
        lambda: parse_announcement(mutated(ANNOUNCE_POOL, keep, pubkey=E, content=content)),
    )


ONE = POOL_BODY["validators"][0]
pool_case("object", ONE)
pool_case("string", V1K)
pool_case("null", None)
pool_case("65-validators", [{"pubkey": h(f"pool {k}"), "name": f"v{k}"} for k in range(65)])
pool_case("pubkey-string-item", [V1K])
pool_case("list-item", [[V1K, "validator one"]])
pool_case("pubkey-uppercase", [{**ONE, "pubkey": V1K.upper()}])
pool_case("pubkey-63-hex", [{**ONE, "pubkey": V1K[:63]}])
pool_case("pubkey-number", [{**ONE, "pubkey": 1}])
pool_case("no-pubkey", [{"name": "validator one"}])
pool_case("no-name", [{"pubkey": V1K}])
pool_case("name-number", [{**ONE, "name": 1}])
pool_case("name-empty", [{**ONE, "name": ""}])
pool_case("name-65-characters", [{**ONE, "name": "n" * 65}])
pool_case("name-with-newline", [{**ONE, "name": "validator\none"}])
pool_case("same-validator-twice", [ONE, {**ONE, "name": "again"}])


# ---------------------------------------------------------- provider capabilities (§1a)

CAPS = Capabilities(
    name="alice",
    tasks=(TaskOffer("sklearn-digits/logreg", h("digits code")), TaskOffer("diloco/tinylm-bytes", h("lm code"))),
    hardware="cpu:2",
    max_model_bytes=1_000_000,
    price_msat_per_shard=100_000,
    escrows=(E,),
)
CAPS_TMPL = build_capabilities(CAPS)
CAPS_BODY = json.loads(CAPS_TMPL.content)
TASK0 = CAPS_BODY["tasks"][0]


def caps_case(label: str, mutation: Mutation = keep, content: str | None = None, **changes: object) -> None:
    if changes:
        content = json.dumps({k: v for k, v in {**CAPS_BODY, **changes}.items() if v is not ...})
    case(
        R.INVALID_CAPABILITIES,
        f"capabilities-{label}",
        lambda: parse_capabilities(mutated(CAPS_TMPL, mutation, pubkey=P1K, content=content)),
    )


caps_case("not-json", content="{caps")
caps_case("array", content="[]")
caps_case("deep-nesting", content="[" * 100_000 + "]" * 100_000)
caps_case("no-d", drop("d"))
caps_case("other-d", set_tag("d", "fedstr-escrow"))
caps_case("d-arity", set_tag("d", "fedstr-provider", "extra"))
caps_case("no-k", drop("k"))
case(
    R.DUPLICATE_TAG,
    "capabilities-two-d",
    lambda: parse_capabilities(mutated(CAPS_TMPL, add(("d", "fedstr-provider")), pubkey=P1K)),
)
caps_case("k-words", set_tag("k", "job"))
caps_case("no-t", drop("t"))
caps_case("t-other-topic", set_tag("t", "nostr"))
caps_case("t-arity", set_tag("t", "fedstr-provider", "x"))
caps_case("no-name", name=...)
caps_case("name-empty", name="")
caps_case("name-129-characters", name="n" * 129)
caps_case("name-with-newline", name="al\nice")
caps_case("no-tasks", tasks=...)
caps_case("tasks-empty", tasks=[])
caps_case("tasks-object", tasks=TASK0)
caps_case("tasks-33", tasks=[{"task": f"t{k}", "code_sha256": h(f"c{k}")} for k in range(33)])
caps_case("task-string-item", tasks=["sklearn-digits/logreg"])
caps_case("task-no-name", tasks=[{"code_sha256": h("c")}])
caps_case("task-name-number", tasks=[{**TASK0, "task": 5}])
caps_case("task-name-empty", tasks=[{**TASK0, "task": ""}])
caps_case("task-name-65-characters", tasks=[{**TASK0, "task": "t" * 65}])
caps_case("task-no-code", tasks=[{"task": "x"}])
caps_case("task-code-uppercase", tasks=[{**TASK0, "code_sha256": TASK0["code_sha256"].upper()}])
caps_case("task-code-63-hex", tasks=[{**TASK0, "code_sha256": TASK0["code_sha256"][:63]}])
caps_case("task-twice", tasks=[TASK0, {**TASK0, "code_sha256": h("other code")}])
caps_case("no-hardware", hardware=...)
caps_case("hardware-number", hardware=2)
caps_case("hardware-65-characters", hardware="h" * 65)
caps_case("no-max-model-bytes", max_model_bytes=...)
caps_case("max-model-bytes-zero", max_model_bytes=0)
caps_case("max-model-bytes-float", max_model_bytes=1e6)
caps_case("max-model-bytes-bool", max_model_bytes=True)
caps_case("max-model-bytes-string", max_model_bytes="1000000")
caps_case("max-model-bytes-2^63", max_model_bytes=2**63)
caps_case("no-price", price_msat_per_shard=...)
caps_case("price-negative", price_msat_per_shard=-1)
caps_case("price-above-max-msat", price_msat_per_shard=MAX_MSAT + 1)
caps_case("price-bool", price_msat_per_shard=False)
caps_case("escrows-empty", escrows=[])
caps_case("escrows-null", escrows=None)
caps_case("escrows-string", escrows=E)
caps_case("escrows-bad-key", escrows=[E[:63]])
caps_case("escrows-twice", escrows=[E, E])
caps_case("escrows-65", escrows=[h(f"escrow {k}") for k in range(65)])
# an escrow's announcement is not a provider's capabilities (no fedstr-provider d or t)...
case(
    R.INVALID_CAPABILITIES,
    "capabilities-from-an-escrow-announcement",
    lambda: parse_capabilities(mutated(ANNOUNCE, keep, pubkey=E)),
)
case(R.WRONG_KIND, "capabilities-kind-0", lambda: parse_capabilities(mutated(CAPS_TMPL, keep, kind=0)))
# ...and a provider's capabilities are not an escrow's announcement, whatever their content
case(
    R.PROVIDER_CAPABILITIES,
    "announcement-from-provider-capabilities",
    lambda: parse_announcement(mutated(CAPS_TMPL, keep, pubkey=P1K)),
)
case(
    R.PROVIDER_CAPABILITIES,
    "announcement-with-escrow-terms-and-a-provider-topic",
    lambda: parse_announcement(mutated(ANNOUNCE, add(("t", "fedstr-provider")), pubkey=E)),
)
case(
    R.PROVIDER_CAPABILITIES,
    "announcement-with-escrow-terms-and-the-provider-d",
    lambda: parse_announcement(mutated(ANNOUNCE, set_tag("d", "fedstr-provider"), pubkey=E)),
)


@pytest.mark.parametrize("reason, thunk", CASES)
def test_refused_with_exactly_this_reason(reason, thunk):
    with pytest.raises(CodecError) as exc:
        thunk()
    assert exc.value.reason is reason, exc.value
    assert exc.value.message and str(exc.value).startswith(f"{reason.value}: ")


def test_every_reason_has_a_case():
    covered = {param.values[0] for param in CASES}
    assert set(CodecErrorReason) - covered == set()


def test_corpus_is_large():
    assert len(CASES) >= 200


def test_the_unmutated_bases_are_valid():
    """Guards the corpus: each case must fail because of its change, not because its base is bad."""
    assert parse_job(unsigned(JOB_TMPL.kind, JOB_TMPL.tags)).spec == base_spec()
    assert parse_result(mutated(result_tmpl(), keep, pubkey=P1K), JOB).shard_index == 0
    assert parse_result(mutated(result_tmpl(1), keep, pubkey=P2K), JOB).shard_index == 1
    parse_evaluation_request(mutated(EVAL_REQ, keep, pubkey=E))
    parse_evaluation_result(mutated(EVAL_RES, keep, pubkey=V1K), escrow_pubkey=E)
    parse_feedback(mutated(PAYEE, keep, pubkey=P1K), escrow_pubkey=E)
    for tmpl in (OFFER, FUNDED, COMPLETE, CLAIMABLE, PAID, REFUNDED, ERROR):
        parse_escrow_feedback(mutated(tmpl, keep, pubkey=E))
    parse_deletion(mutated(DELETION, keep))
    assert parse_announcement(mutated(ANNOUNCE, keep, pubkey=E)).terms == TERMS
    assert decrypt_shard(P2, C, PRIVATE_SHARD.payload) == "https://data.example.org/s1.npz"
    assert V2K and V3 and ESCROW  # keys used by the corpus exist


def test_the_unmutated_sealed_bases_are_valid():
    """Guards the sealed cases as the test above guards the others."""
    assert parse_job(unsigned(SEALING_JOB_TMPL.kind, SEALING_JOB_TMPL.tags)).spec.sealing is Sealing.REQUIRED
    assert parse_job(unsigned(CV_JOB_TMPL.kind, CV_JOB_TMPL.tags)).customer_validates
    for tmpl, job in ((SEALED_TMPL, JOB), (SEALED_REQUIRED_TMPL, SEALING_JOB)):
        assert parse_result(mutated(tmpl, keep, pubkey=P1K), job).sealed == SEALED_MODEL
    assert parse_result(mutated(build_result(CV_JOB, shard_index=0, model=MODEL), keep, pubkey=P1K), CV_JOB).model
    assert opened().scores == SEALED_SCORES
    complete = parse_validation_complete(mutated(COMPLETE_FULL, keep, pubkey=E))
    assert complete.split == SPLIT and len(complete.scores) == 3
    assert parse_model_key(mutated(MODEL_KEY, keep, pubkey=E)).payload == MODEL_KEY_PAYLOAD
    assert parse_reward_paid(mutated(PAID_WITH_INVOICE, keep, pubkey=E)).bolt11 == BOLT11
    assert parse_announcement(mutated(ANNOUNCE_POOL, keep, pubkey=E)).validator_pool == POOL
    assert parse_capabilities(mutated(CAPS_TMPL, keep, pubkey=P1K)) == CAPS
