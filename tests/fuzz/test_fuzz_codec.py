"""Fuzz target 2: the escrow-protocol codec (service/nostr/protocol), every ``parse_*``.

Inputs: valid events built with the ``build_*`` functions from hypothesis-generated
fields (job request, result, evaluation request and result, payee invoice, every escrow
feedback, deletion, announcement), then structurally mutated: tags dropped, duplicated,
reordered, truncated, extended, renamed; values replaced with negatives, overflows
(> 2^64), floats, exponent notation, empty strings, unicode digits, wrong hex lengths,
other escrows' and other roles' pubkeys; the signer, the kind and the content changed.
``codec_job`` mutates job requests; ``codec_events`` every other kind.

Property, for every parser on every input: a ``CodecError`` whose reason is documented
(``REASON_DESCRIPTIONS``, the table in docs/protocol.md) and whose message does not echo
the input, or a parsed object that satisfies the rules docs/protocol.md states for it
(re-derived in ``check_rules``: bid and deadline windows, roles, distinct validators and
shards, the exact money split, who may submit a result, ...) and round-trips (built
again → parsed → equal). An unmutated event parses to what was built. Never another
exception.
"""

from __future__ import annotations

import base64
import hashlib
import time
from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import assume
from hypothesis import strategies as st

from service.nostr import nip40
from service.nostr.nip01 import Event, SecretKey
from service.nostr.protocol import (
    MAX_MSAT,
    REASON_DESCRIPTIONS,
    Announcement,
    Candidate,
    CodecError,
    CodecErrorReason,
    Deletion,
    Direction,
    ErrorFeedback,
    EscrowOffer,
    EscrowTerms,
    EvaluationRequest,
    EvaluationResult,
    Feedback,
    Funded,
    Invoice,
    JobRequest,
    JobResult,
    JobSpec,
    Mode,
    ModelRef,
    Network,
    PaymentProof,
    PayoutAddress,
    PayoutPolicy,
    Refunded,
    RewardClaimable,
    RewardPaid,
    Score,
    Shard,
    Validation,
    ValidationComplete,
    Verdict,
    build_announcement,
    build_deletion,
    build_error_feedback,
    build_escrow_offer,
    build_evaluation_request,
    build_evaluation_result,
    build_funded,
    build_job_request,
    build_payee_invoice,
    build_refunded,
    build_result,
    build_reward_claimable,
    build_reward_paid,
    build_validation_complete,
    parse_announcement,
    parse_deletion,
    parse_error_feedback,
    parse_escrow_feedback,
    parse_escrow_offer,
    parse_evaluation_request,
    parse_evaluation_result,
    parse_feedback,
    parse_funded,
    parse_job_request,
    parse_refunded,
    parse_result,
    parse_reward_claimable,
    parse_reward_paid,
    parse_validation_complete,
)
from service.nostr.protocol.examples import regtest_invoice
from service.nostr.protocol.fields import Template

from . import harness
from .strategies import choose, short_text, weighted

pytestmark = pytest.mark.timeout(harness.TIMEOUT)
R = CodecErrorReason
NOW = 1_767_225_600
CANARY = "CANARY"  # planted in values; error messages must never echo input text


def _key(role: str) -> SecretKey:
    return SecretKey(hashlib.sha256(f"fedstr fuzz codec {role}".encode()).digest())


def h(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


E = _key("escrow").public_key_hex
OTHER_E = _key("other escrow").public_key_hex
C = _key("customer").public_key_hex
PROVIDERS = [_key(f"provider {i}").public_key_hex for i in range(4)]
VALIDATORS = [_key(f"validator {i}").public_key_hex for i in range(3)]
STRANGER = _key("stranger").public_key_hex
ALL_KEYS = [E, OTHER_E, C, *PROVIDERS, *VALIDATORS, STRANGER]

_BASE_TERMS = EscrowTerms(
    fee_base_msat=1_000,
    fee_ppm=10_000,
    min_bid_msat=100_000,
    max_bid_msat=10**15,
    max_validators=3,
    max_shards=6,
    min_results_window_s=600,
    max_job_duration_s=30 * 86_400,
    modes=frozenset({Mode.HOLD, Mode.CUSTODIAL}),
    network=Network.REGTEST,
    max_hold_seconds=30 * 86_400,
)
TERMS = {
    "both": _BASE_TERMS,
    "hold": replace(_BASE_TERMS, modes=frozenset({Mode.HOLD}), max_hold_seconds=2 * 86_400),
    "custodial": replace(_BASE_TERMS, modes=frozenset({Mode.CUSTODIAL}), fee_ppm=0, fee_base_msat=0),
}
INVOICES = [regtest_invoice(f"fuzz {i}", 10_000 * (i + 1), h(f"fuzz invoice {i}"), "reward", NOW) for i in range(3)]
INVOICES.append(INVOICES[0].upper())

# --------------------------------------------------------------------------- values

hex64 = st.one_of(st.binary(min_size=32, max_size=32).map(bytes.hex), st.sampled_from(ALL_KEYS))
relay = st.sampled_from(
    ["", "wss://relay.example.org", "ws://127.0.0.1:7777", "wss://nos.example.com/p?x=1", "wss://[::1]:7000"]
)
url = st.one_of(
    st.sampled_from(["https://data.example.org/s0.npz", "s3://bucket/key", "ipfs://bafy/x", "http://10.0.0.1/a"]),
    st.builds(
        lambda host, path: f"https://{host}.example.org/{path}",
        st.from_regex(r"[a-z0-9]{1,12}", fullmatch=True),
        st.from_regex(r"[A-Za-z0-9._~/%-]{0,30}", fullmatch=True),
    ),
)
metric = st.one_of(
    st.sampled_from(["accuracy", "f1", "loss", "auc@10", "a/b+c:d.e-f_g"]),
    st.from_regex(r"[A-Za-z0-9_.:@/+-]{1,64}", fullmatch=True),
)
decimals = st.one_of(
    st.decimals(allow_nan=False, allow_infinity=False, min_value=-(10**6), max_value=10**6, places=6),
    st.sampled_from(
        [Decimal("0"), Decimal("-0"), Decimal("0.85"), Decimal("1E+3"), Decimal("9" * 15 + "." + "9" * 12)]
    ),
)  # the largest a score may be
msat = st.one_of(st.integers(1, 10**12), st.integers(1, MAX_MSAT), st.sampled_from([1, MAX_MSAT]))
printable = st.characters(exclude_categories=["Cc", "Cs", "Zl", "Zp"])  # what check_text admits
message_text = st.text(printable, min_size=1, max_size=60)
name_text = st.text(printable, min_size=1, max_size=30)
free_text = st.one_of(
    st.text(printable, max_size=40), st.sampled_from(["", "模型 🚀", "\u202eevil", "e\u0301", f"x{CANARY}x"])
)
code = st.from_regex(r"[a-z0-9_]{1,64}", fullmatch=True)
bolt11 = st.sampled_from(INVOICES)


def nip44_payload(body: bytes) -> str:
    return base64.b64encode(b"\x02" + body).decode()


def shards(draw, recipients: list[str]) -> tuple[Shard, ...]:
    indices = draw(st.lists(st.one_of(st.integers(0, 8), st.integers(0, 999_999)), min_size=1, max_size=4, unique=True))
    out = []
    for index in indices:
        if draw(st.booleans()) or not recipients:
            out.append(Shard(index=index, url=draw(url), relay=draw(relay)))
        else:
            out.append(
                Shard(
                    index=index,
                    payload=nip44_payload(draw(st.binary(min_size=97, max_size=160))),
                    provider=draw(st.sampled_from(recipients)),
                )
            )
    return tuple(out)


def job_spec(draw, terms: EscrowTerms) -> JobSpec:
    validators = tuple(draw(st.permutations(VALIDATORS))[: draw(st.integers(0, terms.max_validators))])
    providers = tuple(draw(st.permutations(PROVIDERS[:3]))[: draw(st.integers(0, 3))])
    bid = draw(st.integers(terms.min_bid_msat, min(terms.max_bid_msat, 10**13)))
    fee = terms.fee_base_msat + bid * terms.fee_ppm // 1_000_000
    assume(fee < bid)
    validator_fee = draw(st.integers(0, (bid - fee - 1) // len(validators))) if validators else 0
    window = terms.max_job_duration_s
    if terms.modes == frozenset({Mode.HOLD}):
        window = min(window, terms.max_hold_seconds)
    results = draw(st.integers(NOW + terms.min_results_window_s, NOW + window - 1))
    validation_deadline = draw(st.integers(results + 1, NOW + window))
    modes = [Mode.AUTO, *sorted(terms.modes)]
    names = draw(st.lists(st.from_regex(r"[A-Za-z0-9_.:-]{1,20}", fullmatch=True), max_size=3, unique=True))
    return JobSpec(
        escrow=E,
        escrow_relay=draw(relay),
        bid_msat=bid,
        shards=shards(draw, [*providers, PROVIDERS[3]] if not providers else list(providers)),
        validation=Validation(
            draw(metric),
            draw(st.sampled_from(Direction)),
            draw(decimals),
            draw(st.integers(1, max(1, len(validators)))),
        ),
        payout=draw(st.sampled_from(PayoutPolicy)),
        results_deadline=results,
        validation_deadline=validation_deadline,
        validators=validators,
        validator_fee_msat=validator_fee,
        mode=draw(st.sampled_from(modes)),
        params=tuple((n, draw(free_text.filter(bool))) for n in names),
        providers=providers,
        refund=draw(st.sampled_from([None, "alice@pay.example.org", "lnurl1dp68gurn8ghj7um9wfmxjcm99e3k7mf0"])),
        expiration=draw(st.one_of(st.none(), st.integers(NOW + 1, 2**63 - 1))),
        relays=tuple(draw(st.lists(relay.filter(bool), max_size=3, unique=True))),
        previous_job=draw(st.one_of(st.none(), hex64)),
    )


def raw(pubkey: str, tmpl: Template, created_at: int = NOW) -> dict[str, Any]:
    return {
        "pubkey": pubkey,
        "created_at": created_at,
        "kind": tmpl.kind,
        "tags": [list(t) for t in tmpl.tags],
        "content": tmpl.content,
    }


def to_event(doc: dict[str, Any]) -> Event:
    """An Event with exactly these fields; parsers never look at the id or signature."""
    return Event(
        id=h(repr(sorted(doc.items()))),
        pubkey=doc["pubkey"],
        created_at=doc["created_at"],
        kind=doc["kind"],
        tags=tuple(tuple(t) for t in doc["tags"]),
        content=doc["content"],
        sig="0" * 128,
    )


def parse_job(doc: dict[str, Any], terms: str, now: int) -> JobRequest:
    return parse_job_request(to_event(doc), escrow_pubkey=E, terms=TERMS[terms], now=now)


# ------------------------------------------------------------------ valid events per kind


def job_request(draw) -> dict[str, Any]:
    terms = draw(st.sampled_from(sorted(TERMS)))
    spec = job_spec(draw, TERMS[terms])
    try:
        tmpl = build_job_request(spec, customer=C, content=draw(free_text))
    except CodecError:
        assume(False)
        raise
    return {"family": "job", "event": raw(C, tmpl), "terms": terms, "now": NOW, "job": None}


job_requests = st.composite(job_request)


@st.composite
def results(draw) -> dict[str, Any]:
    base = job_request(draw)
    job = parse_job(base["event"], base["terms"], NOW)
    shard = draw(st.sampled_from(job.spec.shards))
    if shard.encrypted:
        signer = shard.provider
    elif job.spec.providers:
        signer = draw(st.sampled_from(job.spec.providers))
    else:
        signer = draw(st.sampled_from([PROVIDERS[3], STRANGER]))
    model = ModelRef(draw(url), draw(hex64), draw(st.one_of(st.integers(1, 10**9), st.just(2**53 - 1))))
    payout = draw(
        st.one_of(
            st.none(),
            st.builds(PayoutAddress, st.just("lud16"), st.just("bob@pay.example.org")),
            st.builds(PayoutAddress, st.just("lnurl"), st.just("LNURL1DP68GURN8GHJ7UM9WFMXJCM99E3K7MF0")),
        )
    )
    invoice = draw(st.one_of(st.none(), st.builds(Invoice, msat, bolt11)))
    tmpl = build_result(
        job,
        shard_index=shard.index,
        model=model,
        payout_address=payout,
        invoice=invoice,
        content=draw(free_text),
        job_relay=draw(relay),
    )
    return {"family": "result", "event": raw(signer, tmpl), "terms": base["terms"], "now": NOW, "job": base["event"]}


@st.composite
def evaluation_requests(draw) -> dict[str, Any]:
    candidates = tuple(Candidate(i, draw(relay)) for i in draw(st.lists(hex64, min_size=1, max_size=4, unique=True)))
    request = EvaluationRequest(
        job_id=draw(hex64),
        candidates=candidates,
        validators=tuple(draw(st.lists(st.sampled_from(VALIDATORS + [C]), min_size=1, max_size=4, unique=True))),
        metric=draw(metric),
        deadline=draw(st.integers(0, 2**63 - 1)),
        job_relay=draw(relay),
    )
    return {"family": "eval_request", "event": raw(E, build_evaluation_request(request)), "now": NOW}


@st.composite
def evaluation_results(draw) -> dict[str, Any]:
    ids = draw(st.lists(hex64, min_size=1, max_size=4, unique=True))
    scores = tuple(Score(i, draw(decimals), draw(hex64)) for i in ids)
    try:
        tmpl = build_evaluation_result(
            request_id=draw(hex64),
            job_id=draw(hex64),
            escrow=E,
            scores=scores,
            request_relay=draw(relay),
            job_relay=draw(relay),
            content=draw(free_text),
        )
    except CodecError:  # the request and the job drew the same id
        assume(False)
        raise
    return {"family": "eval_result", "event": raw(draw(st.sampled_from(VALIDATORS)), tmpl), "now": NOW}


@st.composite
def payee_invoices(draw) -> dict[str, Any]:
    tmpl = build_payee_invoice(
        job_id=draw(hex64),
        escrow=E,
        amount_msat=draw(msat),
        bolt11=draw(bolt11),
        info=draw(free_text),
        job_relay=draw(relay),
    )
    return {"family": "payee_invoice", "event": raw(draw(st.sampled_from(PROVIDERS + VALIDATORS)), tmpl), "now": NOW}


def _verdicts(draw) -> tuple[Verdict, ...]:
    out = []
    for result_id in draw(st.lists(hex64, min_size=1, max_size=4, unique=True)):
        if draw(st.booleans()):
            out.append(Verdict(result_id, True, draw(decimals), draw(st.one_of(st.none(), st.integers(0, MAX_MSAT)))))
        else:
            out.append(Verdict(result_id, False, draw(st.one_of(st.none(), decimals))))
    return tuple(out)


@st.composite
def escrow_feedbacks(draw) -> dict[str, Any]:
    job_id, addressee, job_relay = draw(hex64), draw(st.sampled_from([C, *PROVIDERS, *VALIDATORS])), draw(relay)
    which = draw(st.integers(0, 6))
    if which == 0:
        tmpl = build_escrow_offer(
            EscrowOffer(
                job_id,
                addressee,
                draw(msat),
                draw(bolt11),
                draw(st.sampled_from([Mode.HOLD, Mode.CUSTODIAL])),
                job_relay,
            )
        )
    elif which == 1:
        tmpl = build_funded(Funded(job_id, addressee, draw(msat), job_relay))
    elif which == 2:
        tmpl = build_validation_complete(ValidationComplete(job_id, addressee, _verdicts(draw), job_relay))
    elif which == 3:
        earned = draw(st.one_of(st.none(), hex64))
        assume(earned != job_id)
        tmpl = build_reward_claimable(RewardClaimable(job_id, addressee, draw(msat), earned, job_relay))
    elif which == 4:
        preimage = draw(st.binary(min_size=32, max_size=32))
        earned = draw(hex64)
        assume(earned != job_id)
        proof = PaymentProof(
            hashlib.sha256(preimage).hexdigest(), preimage.hex(), draw(msat), draw(st.integers(0, MAX_MSAT))
        )
        tmpl = build_reward_paid(RewardPaid(job_id, earned, addressee, proof, job_relay))
    elif which == 5:
        tmpl = build_refunded(Refunded(job_id, addressee, draw(code), draw(msat), job_relay))
    else:
        reason = draw(code)
        assume(reason != "refunded")
        message = draw(message_text)
        try:
            tmpl = build_error_feedback(ErrorFeedback(job_id, addressee, reason, message, job_relay))
        except (CodecError, ValueError):  # e.g. a message that does not survive the status text
            assume(False)
            raise
    return {"family": "escrow_feedback", "event": raw(E, tmpl), "now": NOW}


@st.composite
def deletions(draw) -> dict[str, Any]:
    ids = tuple(draw(st.lists(hex64, min_size=1, max_size=4, unique=True)))
    kinds = tuple(draw(st.lists(st.integers(0, 65535), max_size=3, unique=True)))
    tmpl = build_deletion(ids, kinds=kinds, reason=draw(free_text), escrow=draw(st.sampled_from([None, E])))
    return {"family": "deletion", "event": raw(C, tmpl), "now": NOW}


@st.composite
def announcements(draw) -> dict[str, Any]:
    modes = frozenset(draw(st.lists(st.sampled_from([Mode.HOLD, Mode.CUSTODIAL]), min_size=1, unique=True)))
    min_bid = draw(st.integers(1, 10**12))
    min_window = draw(st.integers(0, 10**6))
    terms = EscrowTerms(
        fee_base_msat=draw(st.integers(0, 10**9)),
        fee_ppm=draw(st.integers(0, 1_000_000)),
        min_bid_msat=min_bid,
        max_bid_msat=draw(st.integers(min_bid, MAX_MSAT)),
        max_validators=draw(st.integers(1, 100)),
        max_shards=draw(st.integers(1, 100)),
        min_results_window_s=min_window,
        max_job_duration_s=draw(st.integers(min_window + 1, 10**8)),
        modes=modes,
        network=draw(st.sampled_from(Network)),
        max_hold_seconds=draw(st.integers(1 if Mode.HOLD in modes else 0, 10**7)),
    )
    name = draw(name_text)
    about = draw(free_text)
    try:
        tmpl = build_announcement(
            Announcement(
                draw(st.sampled_from(["", "fedstr-escrow", "x" * 256])),
                name,
                about,
                terms,
                draw(st.sampled_from([5701, 5801, 65535])),
            )
        )
    except CodecError:  # e.g. a name with a character check_text refuses
        assume(False)
        raise
    return {"family": "announcement", "event": raw(E, tmpl), "now": NOW}


# ------------------------------------------------------------------------------ mutation

HOSTILE = [
    "",
    " ",
    "0",
    "-0",
    "-1",
    "01",
    "00",
    "1e3",
    "1E3",
    "1e-3",
    "1.5",
    "1.0",
    "0.0",
    ".5",
    "5.",
    "0x10",
    " 1",
    "1 ",
    "+1",
    "1_000",
    "١٢٣",
    "１",
    "NaN",
    "nan",
    "-inf",
    "Infinity",
    "sNaN",
    "1e400",
    str(2**64),
    str(2**64 + 1),
    str(2**63),
    str(2**63 - 1),
    str(2**53),
    str(MAX_MSAT),
    str(MAX_MSAT + 1),
    "9" * 25,
    "9" * 5000,
    "-" + "9" * 30,
    "shard-0",
    "shard-01",
    "shard--1",
    "shard-1000000",
    "shard-",
    "shard-٣",
    "url",
    "nip44",
    "job",
    "event",
    "max",
    "min",
    "hold",
    "custodial",
    "auto",
    "best",
    "split",
    "lud16",
    "lnurl",
    "request",
    "result",
    "job",
    "payment-required",
    "processing",
    "success",
    "error",
    "partial",
    "escrow",
    "escrow funded",
    "validation complete",
    "reward claimable",
    "reward paid",
    "refunded: no_quorum",
    "refunded: ",
    "refunded",
    "refunded: x: y",
    "error: message",
    "bid_too_low: x",
    "awaiting-funding",
    "funded",
    "no-quorum",
    "wss://r.example",
    "ws://127.0.0.1:7777",
    "http://x.example",
    "wss://",
    "wss://a b",
    "https://x.example/a",
    "alice@pay.example.org",
    "ALICE@PAY.EXAMPLE.ORG",
    "lnurl1dp68gurn8ghj7um9wfmxjcm99e3k7mf0",
    "lnurl1",
    *INVOICES,
    "lnbc1",
    "lnbcrt1qqqqqq",
    "LNBCRT1qqqqqq",
    "lnurl1qqqqqqqq",
    "\x00",
    "\ud800",
    "\u202e",
    "e\u0301",
    "\u2028",
    "a" * 3000,
    f"x{CANARY}x",
    f"{CANARY}: {CANARY}",
    E.upper(),
    E[:-1],
    E + "0",
    "g" * 64,
    "0" * 64,
    "f" * 64,
    " " + E,
    *ALL_KEYS,
    "AAAA",
    nip44_payload(bytes(120)),
    base64.b64encode(b"\x01" + bytes(120)).decode(),
    "[]",
    "{}",
    "null",
]
TAG_NAMES = [
    "i",
    "e",
    "p",
    "param",
    "bid",
    "escrow",
    "validator",
    "validation",
    "payout",
    "validator_fee",
    "deadline",
    "mode",
    "refund",
    "expiration",
    "relays",
    "model",
    "amount",
    "score",
    "status",
    "accepted",
    "rejected",
    "payment",
    "k",
    "d",
    "a",
    "request",
    f"x{CANARY}",
    "",
]
PROTOCOL_KINDS = [5, 5701, 5702, 6701, 6702, 7000, 31990, 5801, 6801]
# mutation ops (see mutated), repeated for weight: value changes most, kind and signer changes least
OPS = [0, 0, 1, 1, 2, 3, 3, 3, 4, 4, 4, 5, 6, 6, 7, 7, 8, 9, 10, 11, 11, 12]
NOWS = [0, NOW - 10**6, NOW + 1, NOW + 599, NOW + 600, NOW + 3600, NOW + 86_400, NOW + 2 * 86_400 + 1, 2**62]


def variants(item: str) -> list[str]:
    """Near misses of a value: numeric edges of a number, case and length edges of hex."""
    out = [item + " ", item.upper(), item[:-1], item + item[-1:], "+" + item, "-" + item]
    if item.isascii() and item.isdigit() and len(item) < 100:
        value = int(item)
        out += [
            str(value + 1),
            str(value - 1),
            "0" + item,
            item + ".0",
            item + "e0",
            str(value + 2**64),
            f"{value:.3e}",
            str(-value),
            str(value * 1000),
        ]
    return out


@st.composite
def mutated(draw, base: st.SearchStrategy) -> dict[str, Any]:
    case = draw(base)
    ev = base_event = case["event"]
    tags: list[list[str]] = [list(t) for t in ev["tags"]]
    count = choose(draw, (1, st.just(0)), (6, st.integers(1, 2)), (3, st.integers(3, 6)))
    value = st.one_of(st.sampled_from(HOSTILE), short_text)
    for _ in range(count):
        op = draw(st.sampled_from(OPS))
        i = draw(st.integers(0, max(0, len(tags) - 1)))
        tag = tags[i] if tags else None
        if op == 0 and tags:
            del tags[i]
        elif op == 1 and tag is not None:
            tags.insert(draw(st.integers(0, len(tags))), list(tag))
        elif op == 2 and tags:
            tags.insert(draw(st.integers(0, len(tags) - 1)), tags.pop(i))
        elif op in (3, 4) and tag is not None:  # replace one value
            j = draw(st.integers(1, len(tag) - 1)) if len(tag) > 1 else 0
            tag[j] = draw(st.one_of(value, st.sampled_from(variants(tag[j]))))
        elif op == 5 and tag is not None:
            del tag[draw(st.integers(1, max(1, len(tag)))) :]
        elif op == 6 and tag is not None:
            tag.extend(draw(st.lists(value, min_size=1, max_size=3)))
        elif op == 7:
            tags.insert(
                draw(st.integers(0, len(tags))), [draw(st.sampled_from(TAG_NAMES)), *draw(st.lists(value, max_size=5))]
            )
        elif op == 8 and tag is not None:
            tag[0] = draw(st.one_of(st.sampled_from(TAG_NAMES), st.sampled_from([tag[0].upper(), tag[0] + " "])))
        elif op == 9:
            ev = {**ev, "pubkey": draw(st.sampled_from(ALL_KEYS))}
        elif op == 10:
            ev = {**ev, "kind": draw(st.sampled_from(PROTOCOL_KINDS))}
        elif op == 12:  # the escrow's clock at receipt
            case = {**case, "now": draw(st.sampled_from(NOWS))}
        else:  # content: replace, or (for JSON content) change one character
            content = ev["content"]
            if content and draw(st.booleans()):
                pos = draw(st.integers(0, len(content) - 1))
                content = (
                    content[:pos]
                    + draw(st.sampled_from(['"', "-", "1", "e", ".", "}", "[", "\\u0000", ""]))
                    + content[pos + 1 :]
                )
            else:
                content = draw(st.one_of(value, st.sampled_from(['{"name":1}', "[]", "{" * 5000, "1e400"])))
            ev = {**ev, "content": content}
    ev = {**ev, "tags": [t for t in tags if t]}
    return {**case, "event": ev, "mutated": count > 0 and (ev != base_event or case["now"] != NOW)}


# -------------------------------------------------------------------------------- oracle


def _same(a: object, b: object, *ignore: str) -> None:
    assert replace(a, **{k: getattr(b, k) for k in ignore}) == b, f"round trip changed it:\n{a}\n{b}"  # type: ignore


def _event_like(ev: Event, tmpl: Template, pubkey: str | None = None) -> Event:
    return to_event(
        {
            "pubkey": pubkey or ev.pubkey,
            "created_at": ev.created_at,
            "kind": tmpl.kind,
            "tags": tmpl.tags,
            "content": tmpl.content,
        }
    )


def round_trip(name: str, parsed: object, ev: Event, ctx: dict[str, Any]) -> None:
    """Build the parsed object again and parse that: the same object must come back."""
    if isinstance(parsed, JobRequest):
        tmpl = build_job_request(parsed.spec, customer=parsed.customer, kind=parsed.kind, content=ev.content)
        again = parse_job_request(
            _event_like(ev, tmpl), escrow_pubkey=parsed.spec.escrow, terms=ctx["terms"], now=ctx["now"]
        )
        _same(parsed, again, "id")
    elif isinstance(parsed, JobResult):
        tmpl = build_result(
            ctx["job"],
            shard_index=parsed.shard_index,
            model=parsed.model,
            payout_address=parsed.payout_address,
            invoice=parsed.invoice,
            content=parsed.content,
        )
        _same(parsed, parse_result(_event_like(ev, tmpl), ctx["job"]), "id")
    elif isinstance(parsed, EvaluationRequest):
        assert parse_evaluation_request(_event_like(ev, build_evaluation_request(parsed))) == parsed
    elif isinstance(parsed, EvaluationResult):
        tmpl = build_evaluation_result(
            request_id=parsed.request_id,
            job_id=parsed.job_id,
            escrow=parsed.escrow,
            scores=parsed.scores,
            content=ev.content,
        )
        _same(parsed, parse_evaluation_result(_event_like(ev, tmpl)), "id")
    elif isinstance(parsed, Feedback):
        tmpl = build_payee_invoice(
            job_id=parsed.job_id,
            escrow=parsed.escrow,
            amount_msat=parsed.amount_msat,
            bolt11=parsed.bolt11,
            info=parsed.info,
        )
        _same(parsed, parse_feedback(_event_like(ev, tmpl)), "id")
    elif isinstance(parsed, Deletion):
        tmpl = build_deletion(parsed.event_ids, kinds=parsed.kinds, reason=parsed.reason)
        _same(parsed, parse_deletion(_event_like(ev, tmpl)), "id")
    elif isinstance(parsed, Announcement):
        assert parse_announcement(_event_like(ev, build_announcement(parsed))) == parsed
    elif isinstance(
        parsed, (EscrowOffer, Funded, ValidationComplete, RewardClaimable, RewardPaid, Refunded, ErrorFeedback)
    ):
        builder = {
            EscrowOffer: build_escrow_offer,
            Funded: build_funded,
            RewardPaid: build_reward_paid,
            ValidationComplete: build_validation_complete,
            RewardClaimable: build_reward_claimable,
            Refunded: build_refunded,
            ErrorFeedback: build_error_feedback,
        }[type(parsed)]
        again = _event_like(ev, builder(parsed))
        assert parse_escrow_feedback(again) == parsed
        assert PARSERS[name](again, ctx) == parsed
    elif name == "expiration":
        if parsed is not None:
            assert nip40.expiration_from_tags((nip40.expiration_tag(parsed),)) == parsed
    else:  # pragma: no cover
        raise AssertionError(f"no round trip for {type(parsed).__name__}")


def check_rules(name: str, parsed: object, ev: Event, ctx: dict[str, Any]) -> None:
    """What docs/protocol.md says an accepted event satisfies, re-derived from the parsed object."""
    if isinstance(parsed, JobRequest):
        spec, terms, now = parsed.spec, ctx["terms"], ctx["now"]
        escrow = E if name == "job" else OTHER_E
        assert spec.escrow == escrow and (parsed.customer, parsed.kind) == (ev.pubkey, ev.kind)
        assert terms.min_bid_msat <= spec.bid_msat <= terms.max_bid_msat
        indices = [shard.index for shard in spec.shards]
        assert 1 <= len(indices) <= terms.max_shards and len(set(indices)) == len(indices)
        assert all(0 <= i <= 999_999 for i in indices)
        validators = spec.validators
        assert len(validators) <= terms.max_validators and len(set(validators)) == len(validators)
        assert parsed.customer not in validators and escrow not in validators
        assert 1 <= spec.validation.quorum <= max(1, len(validators))
        assert validators or spec.validator_fee_msat == 0
        named = [*spec.providers, *(s.provider for s in spec.shards if s.provider is not None)]
        assert len(set(spec.providers)) == len(spec.providers) <= 256
        assert not set(named) & {parsed.customer, escrow, *validators}
        assert now < spec.results_deadline and spec.results_deadline >= now + terms.min_results_window_s
        assert spec.results_deadline < spec.validation_deadline <= now + terms.max_job_duration_s
        assert spec.mode is Mode.AUTO or spec.mode in terms.modes
        if spec.mode is Mode.HOLD or (spec.mode is Mode.AUTO and terms.modes == {Mode.HOLD}):
            assert spec.validation_deadline <= now + terms.max_hold_seconds
        assert spec.expiration is None or now < spec.expiration
        assert len(spec.params) <= 64 and len({n for n, _ in spec.params}) == len(spec.params)
        assert all(1 <= len(v) <= 1024 for _, v in spec.params)
        assert len(spec.relays) <= 16 and len(set(spec.relays)) == len(spec.relays)
        split = parsed.split
        assert split.fee_msat == terms.fee_base_msat + spec.bid_msat * terms.fee_ppm // 1_000_000
        assert split.validator_fees_msat == spec.validator_fee_msat * len(validators)
        assert split.provider_share_msat > 0
        assert split.fee_msat + split.validator_fees_msat + split.provider_share_msat == spec.bid_msat
    elif isinstance(parsed, JobResult):
        job: JobRequest = ctx["job"]
        assert parsed.job_id == job.id and parsed.customer == job.customer and parsed.provider == ev.pubkey
        assert ev.pubkey not in {job.customer, job.spec.escrow, *job.spec.validators}
        shard = job.shard(parsed.shard_index)
        assert shard is not None
        if shard.encrypted:
            assert ev.pubkey == shard.provider
        elif job.spec.providers:
            assert ev.pubkey in job.spec.providers
        assert 1 <= parsed.model.size_bytes <= 2**53 - 1
        assert parsed.invoice is None or parsed.invoice.amount_msat > 0
    elif isinstance(parsed, (EvaluationResult, Feedback)):
        if not name.endswith("_any"):
            assert parsed.escrow == E
        if isinstance(parsed, EvaluationResult):
            ids = [score.result_id for score in parsed.scores]
            assert ids and len(set(ids)) == len(ids) and parsed.request_id != parsed.job_id
        else:
            assert parsed.amount_msat > 0
    elif isinstance(parsed, RewardPaid):
        assert hashlib.sha256(bytes.fromhex(parsed.payment.preimage)).hexdigest() == parsed.payment.payment_hash
    elif isinstance(parsed, Deletion):
        assert parsed.event_ids and len(set(parsed.event_ids)) == len(parsed.event_ids)
    elif isinstance(parsed, EvaluationRequest):
        ids = [c.result_id for c in parsed.candidates]
        assert ids and len(set(ids)) == len(ids) and parsed.validators
        assert len(set(parsed.validators)) == len(parsed.validators)


PARSERS = {
    "job": lambda ev, ctx: parse_job_request(ev, escrow_pubkey=E, terms=ctx["terms"], now=ctx["now"]),
    "job_other_escrow": lambda ev, ctx: parse_job_request(
        ev, escrow_pubkey=OTHER_E, terms=ctx["terms"], now=ctx["now"]
    ),
    "result": lambda ev, ctx: parse_result(ev, ctx["job"]),
    "eval_request": lambda ev, ctx: parse_evaluation_request(ev),
    "eval_result": lambda ev, ctx: parse_evaluation_result(ev, escrow_pubkey=E),
    "eval_result_any": lambda ev, ctx: parse_evaluation_result(ev),
    "payee_invoice": lambda ev, ctx: parse_feedback(ev, escrow_pubkey=E),
    "payee_invoice_any": lambda ev, ctx: parse_feedback(ev),
    "escrow_feedback": lambda ev, ctx: parse_escrow_feedback(ev),
    "offer": lambda ev, ctx: parse_escrow_offer(ev),
    "funded": lambda ev, ctx: parse_funded(ev),
    "validation_complete": lambda ev, ctx: parse_validation_complete(ev),
    "reward_claimable": lambda ev, ctx: parse_reward_claimable(ev),
    "reward_paid": lambda ev, ctx: parse_reward_paid(ev),
    "refunded": lambda ev, ctx: parse_refunded(ev),
    "error": lambda ev, ctx: parse_error_feedback(ev),
    "deletion": lambda ev, ctx: parse_deletion(ev),
    "announcement": lambda ev, ctx: parse_announcement(ev),
    "expiration": lambda ev, ctx: nip40.expiration(ev),
}
DEFAULT_JOB = {"pubkey": C, "created_at": NOW, "kind": 5701, "tags": [], "content": ""}


def check_codec(case: dict[str, Any]) -> str:
    ev = to_event(case["event"])
    terms = TERMS[case.get("terms") or "both"]
    job = parse_job(case["job"], case.get("terms") or "both", NOW) if case.get("job") else None
    ctx = {"terms": terms, "now": case["now"], "job": job}
    outcome = ""
    for name, parse in PARSERS.items():
        if job is None and name == "result":
            continue
        try:
            parsed = parse(ev, ctx)
        except CodecError as exc:
            assert isinstance(exc.reason, CodecErrorReason) and exc.reason in REASON_DESCRIPTIONS, exc
            assert CANARY not in exc.message and CANARY not in str(exc), f"{name}: message echoes input: {exc}"
            if name == case["family"]:
                assert case["mutated"], f"{name}: the builder's own event is refused: {exc}"
                outcome = f"{name}:{exc.reason.value}"
            continue
        check_rules(name, parsed, ev, ctx)
        round_trip(name, parsed, ev, ctx)
        if name == case["family"]:
            outcome = f"{name}:accepted"
    return outcome or f"{case['family']}:not_parsed"


def _decode(doc: dict[str, Any]) -> dict[str, Any]:
    return doc


def seeded(target: str, fresh: st.SearchStrategy) -> tuple[st.SearchStrategy, float]:
    """Fresh valid events, or (3 times in 4, much cheaper) one of a pool of them, drawn once per run."""
    started = time.monotonic()
    pool = harness.sample(fresh, 100, f"{target} pool")
    return weighted((1, fresh), (3, st.sampled_from(pool))), started


def test_fuzz_codec_job() -> None:
    base, started = seeded("codec_job", job_requests())
    report = harness.run("codec_job", mutated(base), check_codec, from_json=_decode, started=started)
    accepted = sum(n for k, n in report.outcomes.items() if k.endswith(":accepted"))
    assert accepted > 0 and len(report.outcomes) >= 15, report.line()


def test_fuzz_codec_events() -> None:
    families = st.one_of(
        results(),
        evaluation_requests(),
        evaluation_results(),
        payee_invoices(),
        escrow_feedbacks(),
        deletions(),
        announcements(),
    )
    base, started = seeded("codec_events", families)
    report = harness.run("codec_events", mutated(base), check_codec, from_json=_decode, started=started)
    for family in (
        "result",
        "eval_request",
        "eval_result",
        "payee_invoice",
        "escrow_feedback",
        "deletion",
        "announcement",
    ):
        assert report.outcomes[f"{family}:accepted"] > 0, f"no valid {family} parsed: {report.line()}"
