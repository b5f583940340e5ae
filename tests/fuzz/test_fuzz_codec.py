"""Fuzz target 2: the escrow-protocol codec (service/nostr/protocol), every ``parse_*``.

Inputs: valid events built with the ``build_*`` functions from hypothesis-generated
fields (job request, result, evaluation request and result, payee invoice, every escrow
feedback, deletion, announcement, provider capabilities), then structurally mutated: tags dropped, duplicated,
reordered, truncated, extended, renamed; values replaced with negatives, overflows
(> 2^64), floats, exponent notation, empty strings, unicode digits, wrong hex lengths,
other escrows' and other roles' pubkeys; the signer, the kind and the content changed.
``codec_job`` mutates job requests; ``codec_events`` every other kind. Sealed results (§5a:
``sealed`` and ``key`` tags), sealed scores (``encrypted``, opened by the escrow with
``open_scores``), model keys, validation completes with every score and the split, receipts
with their invoice and announcements with a validator pool are among them.

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
import json
import time
from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import assume
from hypothesis import strategies as st

from service.nostr import nip40, nip44
from service.nostr.nip01 import Event, SecretKey
from service.nostr.protocol import (
    MAX_MSAT,
    REASON_DESCRIPTIONS,
    Announcement,
    Candidate,
    Capabilities,
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
    KeyEnvelope,
    Mode,
    ModelKey,
    ModelRef,
    MoneySplit,
    Network,
    PaymentProof,
    PayoutAddress,
    PayoutPolicy,
    PoolValidator,
    PublishedScore,
    Refunded,
    RewardClaimable,
    RewardPaid,
    Score,
    SealedModel,
    Sealing,
    Shard,
    TaskOffer,
    Validation,
    ValidationComplete,
    Verdict,
    build_announcement,
    build_capabilities,
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
    open_scores,
    parse_announcement,
    parse_capabilities,
    parse_deletion,
    parse_error_feedback,
    parse_escrow_feedback,
    parse_escrow_offer,
    parse_evaluation_request,
    parse_evaluation_result,
    parse_feedback,
    parse_funded,
    parse_job_request,
    parse_model_key,
    parse_refunded,
    parse_result,
    parse_reward_claimable,
    parse_reward_paid,
    parse_validation_complete,
)
from service.nostr.protocol.examples import regtest_invoice
from service.nostr.protocol.fields import Template
from service.nostr.protocol.sealing import MAX_MODEL_BYTES as MAX_SEALED_MODEL
from service.nostr.protocol.sealing import OVERHEAD

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


ESCROW_KEY = _key("escrow")
E = ESCROW_KEY.public_key_hex
OTHER_E = _key("other escrow").public_key_hex
C = _key("customer").public_key_hex
PROVIDERS = [_key(f"provider {i}").public_key_hex for i in range(4)]
VALIDATOR_KEYS = [_key(f"validator {i}") for i in range(3)]
VALIDATORS = [k.public_key_hex for k in VALIDATOR_KEYS]
STRANGER = _key("stranger").public_key_hex
ALL_KEYS = [E, OTHER_E, C, *PROVIDERS, *VALIDATORS, STRANGER]
# Who can seal scores again in a round trip (the signer of a sealed evaluation result).
SECRETS = {k.public_key_hex: k for k in VALIDATOR_KEYS}

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
        sealing=draw(st.sampled_from(Sealing)) if validators else Sealing.OPTIONAL,
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
def results(draw, sealed: bool = False) -> dict[str, Any]:
    """A result for a random job; ``sealed``: a sealed one (§5a) for a job with validators."""
    base = job_request(draw)
    job = parse_job(base["event"], base["terms"], NOW)
    shard = draw(st.sampled_from(job.spec.shards))
    if shard.encrypted:
        signer = shard.provider
    elif job.spec.providers:
        signer = draw(st.sampled_from(job.spec.providers))
    else:
        signer = draw(st.sampled_from([PROVIDERS[3], STRANGER]))
    variant = ""
    model: ModelRef | SealedModel
    assume(job.spec.validators or not sealed)
    if job.spec.validators and (sealed or job.spec.sealing is Sealing.REQUIRED or draw(st.booleans())):
        variant = "/sealed"
        size = draw(st.one_of(st.integers(1, 10**9), st.just(MAX_SEALED_MODEL)))
        c_sha, m_sha, k_sha = draw(st.lists(hex64, min_size=3, max_size=3, unique=True))
        recipients = draw(st.permutations([E, *job.spec.validators]))
        # The codec reads the key envelopes' shape only (the escrow and the validators open them).
        keys = tuple(KeyEnvelope(r, nip44_payload(draw(st.binary(min_size=97, max_size=130)))) for r in recipients)
        model = SealedModel(draw(url), c_sha, size + OVERHEAD, m_sha, size, k_sha, keys)
    else:
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
    return {
        "family": "result",
        "variant": variant,
        "event": raw(signer, tmpl),
        "terms": base["terms"],
        "now": NOW,
        "job": base["event"],
    }


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
def evaluation_results(draw, sealed: bool | None = None) -> dict[str, Any]:
    ids = draw(st.lists(hex64, min_size=1, max_size=4, unique=True))
    scores = tuple(Score(i, draw(st.one_of(decimals, st.none())), draw(hex64)) for i in ids)  # None: unreadable
    validator = draw(st.sampled_from(VALIDATOR_KEYS))
    sealed = draw(st.booleans()) if sealed is None else sealed
    try:
        tmpl = build_evaluation_result(
            request_id=draw(hex64),
            job_id=draw(hex64),
            escrow=E,
            scores=scores,
            request_relay=draw(relay),
            job_relay=draw(relay),
            content="" if sealed else draw(free_text),
            seal_with=validator if sealed else None,
            nonce=draw(st.binary(min_size=32, max_size=32)),  # the seed replays the same payload
        )
    except CodecError:  # the request and the job drew the same id
        assume(False)
        raise
    return {
        "family": "eval_result",
        "variant": "/sealed" if sealed else "",
        "event": raw(validator.public_key_hex, tmpl),
        "now": NOW,
    }


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
def escrow_feedbacks(draw, which: int | None = None) -> dict[str, Any]:
    """Any escrow feedback; ``which`` (2: validation complete, 4: reward paid, 7: model key) one kind,
    with every optional field (its scores and split, its invoice)."""
    full = which is not None
    job_id, addressee, job_relay = draw(hex64), draw(st.sampled_from([C, *PROVIDERS, *VALIDATORS])), draw(relay)
    which = draw(st.integers(0, 7)) if which is None else which
    variant = ""
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
        verdicts = _verdicts(draw)
        scores, split = _published_scores(draw, verdicts, full), _split(draw, full)
        variant = "/validation_complete" + ("+scores" if scores else "") + ("+split" if split else "")
        tmpl = build_validation_complete(ValidationComplete(job_id, addressee, verdicts, job_relay, scores, split))
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
        invoice = draw(bolt11 if full else st.one_of(st.none(), bolt11))
        variant = "/reward_paid" + ("+bolt11" if invoice else "")
        tmpl = build_reward_paid(RewardPaid(job_id, earned, addressee, proof, job_relay, invoice))
    elif which == 5:
        tmpl = build_refunded(Refunded(job_id, addressee, draw(code), draw(msat), job_relay))
    elif which == 7:
        result_id = draw(hex64)
        assume(result_id != job_id)
        variant = "/model_key"
        payload = nip44_payload(draw(st.binary(min_size=97, max_size=130)))  # the codec reads its shape only
        tmpl = build_model_key(ModelKey(job_id, addressee, result_id, payload, job_relay))
    else:
        reason = draw(code)
        assume(reason != "refunded")
        message = draw(message_text)
        try:
            tmpl = build_error_feedback(ErrorFeedback(job_id, addressee, reason, message, job_relay))
        except (CodecError, ValueError):  # e.g. a message that does not survive the status text
            assume(False)
            raise
    return {"family": "escrow_feedback", "variant": variant, "event": raw(E, tmpl), "now": NOW}


def _published_scores(draw, verdicts: tuple[Verdict, ...], some: bool) -> tuple[PublishedScore, ...]:
    pairs = draw(
        st.lists(
            st.tuples(st.sampled_from([v.result_id for v in verdicts]), st.sampled_from([*VALIDATORS, C])),
            min_size=1 if some else 0,
            max_size=6,
            unique=True,
        )
    )
    return tuple(PublishedScore(r, v, draw(st.one_of(decimals, st.none()))) for r, v in pairs)


def _split(draw, always: bool) -> MoneySplit | None:
    if not always and not draw(st.booleans()):
        return None
    bid = draw(msat)
    fee = draw(st.integers(0, bid - 1))
    count = draw(st.integers(0, 5))
    each = draw(st.integers(0, (bid - fee - 1) // count)) if count else 0
    return MoneySplit(bid, fee, each, count, bid - fee - each * count)


@st.composite
def deletions(draw) -> dict[str, Any]:
    ids = tuple(draw(st.lists(hex64, min_size=1, max_size=4, unique=True)))
    kinds = tuple(draw(st.lists(st.integers(0, 65535), max_size=3, unique=True)))
    tmpl = build_deletion(ids, kinds=kinds, reason=draw(free_text), escrow=draw(st.sampled_from([None, E])))
    return {"family": "deletion", "event": raw(C, tmpl), "now": NOW}


@st.composite
def announcements(draw, pool_size: tuple[int, int] = (0, 4)) -> dict[str, Any]:
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
    pool = tuple(
        PoolValidator(pubkey, draw(name_text))
        for pubkey in draw(
            st.lists(
                st.one_of(st.sampled_from(VALIDATORS), hex64), min_size=pool_size[0], max_size=pool_size[1], unique=True
            )
        )
    )
    try:
        tmpl = build_announcement(
            Announcement(
                draw(st.sampled_from(["", "fedstr-escrow", "x" * 256])),
                name,
                about,
                terms,
                draw(st.sampled_from([5701, 5801, 65535])),
                pool,
            )
        )
    except CodecError:  # e.g. a name with a character check_text refuses
        assume(False)
        raise
    return {"family": "announcement", "variant": "/pool" if pool else "", "event": raw(E, tmpl), "now": NOW}


@st.composite
def provider_capabilities(draw) -> dict[str, Any]:
    tasks = draw(st.lists(st.tuples(name_text, hex64), min_size=1, max_size=5, unique_by=lambda t: t[0]))
    escrows = draw(st.none() | st.lists(st.sampled_from([E, OTHER_E, STRANGER]), min_size=1, max_size=3, unique=True))
    caps = Capabilities(
        name=draw(name_text),
        tasks=tuple(TaskOffer(task, sha) for task, sha in tasks),
        hardware=draw(name_text),
        max_model_bytes=draw(st.integers(1, 2**63 - 1)),
        price_msat_per_shard=draw(st.integers(0, MAX_MSAT)),
        escrows=None if escrows is None else tuple(escrows),
        job_kind=draw(st.sampled_from([5701, 5801])),
    )
    try:
        tmpl = build_capabilities(caps)
    except CodecError:  # e.g. a name with a character check_text refuses
        assume(False)
        raise
    return {"family": "capabilities", "event": raw(draw(st.sampled_from(PROVIDERS)), tmpl), "now": NOW}


# ------------------------------------------------------------------------------ mutation


def _sealed_scores(body: str) -> str:
    """Sealed-score content validator 0 → the escrow (fixed nonce: the same every run)."""
    conv = nip44.conversation_key(VALIDATOR_KEYS[0].secret_bytes, E)
    return nip44.encrypt(body, conv, bytes(32))


_SCORE = ["score", h("fuzz r1"), "0.5", h("fuzz m1")]
SEALED_SCORE_PAYLOADS = [
    _sealed_scores(body)
    for body in (
        "{}",
        "[]",
        "null",
        "[[]]",
        '[["score"]]',
        "[[1]]",
        '["score"]',
        f'[["p", "{E}"]]',
        json.dumps([_SCORE]),
        json.dumps([_SCORE, _SCORE]),
        json.dumps([[*_SCORE[:2], "unreadable", _SCORE[3]]]),
        json.dumps([[*_SCORE[:2], "NaN", _SCORE[3]]]),
        json.dumps([[*_SCORE[:2], f"{CANARY}", _SCORE[3]]]),
        "[" * 5000 + "]" * 5000,
        "not json",
    )
]
# Validator pools an announcement's ``validators`` is replaced with (see ``mutated``).
_POOL_ITEM = {"pubkey": VALIDATORS[0], "name": "v0"}
POOL_HOSTILE: list[Any] = [
    None,
    1,
    "x",
    True,
    [],
    {},
    [{}],
    [_POOL_ITEM],
    [_POOL_ITEM, _POOL_ITEM],
    [{**_POOL_ITEM, "pubkey": VALIDATORS[0].upper()}],
    [{**_POOL_ITEM, "pubkey": CANARY}],
    [{**_POOL_ITEM, "name": ""}],
    [{**_POOL_ITEM, "name": "n" * 65}],
    [{**_POOL_ITEM, "name": 5}],
    [{**_POOL_ITEM, "name": f"x{CANARY}\n"}],
    [{"pubkey": VALIDATORS[0]}],
    [{**_POOL_ITEM, "extra": [1, {"x": None}]}],
    [[VALIDATORS[0], "v0"]],
    [{"pubkey": h(f"pool {i}"), "name": "v"} for i in range(65)],
    [{"pubkey": h(f"pool {i}"), "name": "v"} for i in range(64)],
]


def _with_pool(content: str, pool: Any) -> str:
    try:
        body = json.loads(content)
    except (ValueError, RecursionError):
        return content
    if not isinstance(body, dict):
        return content
    return json.dumps({**body, "validators": pool})


def _swap_model_form(tags: list[list[str]], *, keep_keys: bool) -> list[list[str]]:
    """A ``sealed`` tag becomes the ``model`` tag of its model, or a ``model`` tag a ``sealed`` one
    with keys for the escrow and one validator (``keep_keys``: the other form's keys stay)."""
    out = [t for t in tags if keep_keys or t[0] != "key"]
    for i, tag in enumerate(out):
        if tag[0] == "sealed" and len(tag) == 7:
            return [*out[:i], ["model", tag[1], tag[4], tag[5]], *out[i + 1 :]]
        if tag[0] == "model" and len(tag) == 4 and tag[3].isascii() and tag[3].isdigit() and len(tag[3]) < 20:
            sealed = [
                "sealed",
                tag[1],
                h("fuzz ciphertext"),
                str(int(tag[3]) + OVERHEAD),
                tag[2],
                tag[3],
                h("fuzz key"),
            ]
            keys = [["key", r, nip44_payload(bytes(100))] for r in (E, VALIDATORS[0])]
            return [*out[:i], sealed, *keys, *out[i + 1 :]]
    return tags


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
    "unreadable",
    "Unreadable",
    "required",
    "optional",
    "model key",
    "encrypted",
    *SEALED_SCORE_PAYLOADS,
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
    "sealed",
    "key",
    "encrypted",
    "sealing",
    "split",
    "bolt11",
    "reason",
    f"x{CANARY}",
    "",
]
PROTOCOL_KINDS = [5, 5701, 5702, 6701, 6702, 7000, 31990, 5801, 6801]
# mutation ops (see mutated), repeated for weight: value changes most, kind and signer changes least
OPS = [0, 0, 1, 1, 2, 3, 3, 3, 4, 4, 4, 5, 6, 6, 7, 7, 8, 9, 10, 11, 11, 12, 13]
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
        elif op == 13:  # a result's model form: sealed <-> plain (§5a)
            tags = _swap_model_form(tags, keep_keys=draw(st.booleans()))
        else:  # content: replace, or (for JSON content) change one character
            content = ev["content"]
            if content.startswith("{") and draw(st.integers(0, 3)) == 0:  # an announcement's pool
                content = _with_pool(content, draw(st.sampled_from(POOL_HOSTILE)))
            elif content and draw(st.booleans()):
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
            model=parsed.sealed if parsed.sealed is not None else parsed.model,
            payout_address=parsed.payout_address,
            invoice=parsed.invoice,
            content=parsed.content,
        )
        _same(parsed, parse_result(_event_like(ev, tmpl), ctx["job"]), "id")
    elif isinstance(parsed, EvaluationRequest):
        assert parse_evaluation_request(_event_like(ev, build_evaluation_request(parsed))) == parsed
    elif isinstance(parsed, EvaluationResult) and parsed.sealed:
        # Still sealed (the payload is opaque): the same payload, under the same tags, reads the same.
        again = _event_like(ev, Template(ev.kind, ev.tags, parsed.sealed_payload or ""))
        _same(parsed, PARSERS[name](again, ctx), "id")
    elif isinstance(parsed, EvaluationResult) and name == "eval_result_open" and named_in(ev, "encrypted"):
        # Opened: seal the scores again (the signer's key) and open them: the same scores.
        tmpl = build_evaluation_result(
            request_id=parsed.request_id,
            job_id=parsed.job_id,
            escrow=parsed.escrow,
            scores=parsed.scores,
            seal_with=SECRETS[ev.pubkey],
        )
        _same(parsed, PARSERS[name](_event_like(ev, tmpl), ctx), "id")
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
    elif isinstance(parsed, Capabilities):
        assert parse_capabilities(_event_like(ev, build_capabilities(parsed))) == parsed
    elif isinstance(
        parsed,
        (EscrowOffer, Funded, ValidationComplete, RewardClaimable, RewardPaid, Refunded, ErrorFeedback, ModelKey),
    ):
        builder = {
            ModelKey: build_model_key,
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
        assert 1 <= parsed.model_size <= 2**53 - 1
        assert parsed.invoice is None or parsed.invoice.amount_msat > 0
        assert (parsed.model is None) != (parsed.sealed is None)
        if parsed.sealed is not None:  # §5a
            sealed = parsed.sealed
            assert not job.customer_validates and not named_in(ev, "model")
            assert sealed.ciphertext_bytes == sealed.size_bytes + OVERHEAD
            assert sealed.ciphertext_sha256 != sealed.sha256
            recipients = [k.recipient for k in sealed.keys]
            assert len(set(recipients)) == len(recipients)
            assert set(recipients) == {job.spec.escrow, *job.spec.validators}  # never the customer
        else:
            assert job.spec.sealing is not Sealing.REQUIRED and not named_in(ev, "sealed")
    elif isinstance(parsed, (EvaluationResult, Feedback)):
        if not name.endswith("_any"):
            assert parsed.escrow == E
        if isinstance(parsed, EvaluationResult) and parsed.sealed:
            assert parsed.scores == () and named_in(ev, "encrypted") and not named_in(ev, "score")
            assert name != "eval_result_open"
        elif isinstance(parsed, EvaluationResult):
            ids = [score.result_id for score in parsed.scores]
            assert ids and len(set(ids)) == len(ids) and parsed.request_id != parsed.job_id
        else:
            assert parsed.amount_msat > 0
    elif isinstance(parsed, RewardPaid):
        assert hashlib.sha256(bytes.fromhex(parsed.payment.preimage)).hexdigest() == parsed.payment.payment_hash
    elif isinstance(parsed, ModelKey):
        keys = [t for t in ev.tags if t[0] == "key"]
        assert keys == [("key", parsed.customer, parsed.payload)]  # for the `p` customer, and only it
    elif isinstance(parsed, ValidationComplete):
        verdicts = {v.result_id for v in parsed.verdicts}
        assert len(verdicts) == len(parsed.verdicts)
        assert all(x.result_id in verdicts for x in parsed.scores)
        assert len({(x.result_id, x.validator) for x in parsed.scores}) == len(parsed.scores)
        if parsed.split is not None:
            s = parsed.split
            assert s.provider_share_msat > 0
            assert s.fee_msat + s.validator_fees_msat + s.provider_share_msat == s.bid_msat
    elif isinstance(parsed, Capabilities):  # §1a: never an escrow's announcement too
        assert named_in(ev, "t") and ("d", "fedstr-provider") in ev.tags
        names = [t.task for t in parsed.tasks]
        assert 1 <= len(names) <= 32 and len(set(names)) == len(names)
        assert 0 <= parsed.price_msat_per_shard <= MAX_MSAT and parsed.max_model_bytes >= 1
        assert parsed.escrows is None or 1 <= len(set(parsed.escrows)) == len(parsed.escrows) <= 64
        with pytest.raises(CodecError) as refused:
            parse_announcement(ev)
        assert refused.value.reason is CodecErrorReason.PROVIDER_CAPABILITIES
    elif isinstance(parsed, Announcement):
        assert ("d", "fedstr-provider") not in ev.tags and ("t", "fedstr-provider") not in ev.tags
        pubkeys = [v.pubkey for v in parsed.validator_pool]
        assert len(pubkeys) == len(set(pubkeys)) <= 64
        assert all(1 <= len(v.name) <= 64 for v in parsed.validator_pool)
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
    "eval_result_open": lambda ev, ctx: open_scores(parse_evaluation_result(ev, escrow_pubkey=E), ESCROW_KEY),
    "payee_invoice": lambda ev, ctx: parse_feedback(ev, escrow_pubkey=E),
    "payee_invoice_any": lambda ev, ctx: parse_feedback(ev),
    "escrow_feedback": lambda ev, ctx: parse_escrow_feedback(ev),
    "offer": lambda ev, ctx: parse_escrow_offer(ev),
    "funded": lambda ev, ctx: parse_funded(ev),
    "validation_complete": lambda ev, ctx: parse_validation_complete(ev),
    "reward_claimable": lambda ev, ctx: parse_reward_claimable(ev),
    "reward_paid": lambda ev, ctx: parse_reward_paid(ev),
    "model_key": lambda ev, ctx: parse_model_key(ev),
    "refunded": lambda ev, ctx: parse_refunded(ev),
    "error": lambda ev, ctx: parse_error_feedback(ev),
    "deletion": lambda ev, ctx: parse_deletion(ev),
    "announcement": lambda ev, ctx: parse_announcement(ev),
    "capabilities": lambda ev, ctx: parse_capabilities(ev),
    "expiration": lambda ev, ctx: nip40.expiration(ev),
}


def named_in(ev: Event, name: str) -> bool:
    return any(t and t[0] == name for t in ev.tags)


DEFAULT_JOB = {"pubkey": C, "created_at": NOW, "kind": 5701, "tags": [], "content": ""}


def check_codec(case: dict[str, Any]) -> str:
    ev = to_event(case["event"])
    terms = TERMS[case.get("terms") or "both"]
    job = parse_job(case["job"], case.get("terms") or "both", NOW) if case.get("job") else None
    ctx = {"terms": terms, "now": case["now"], "job": job}
    outcome = ""
    variant = case.get("variant", "")
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
                outcome = f"{name}{variant}:{exc.reason.value}"
            continue
        check_rules(name, parsed, ev, ctx)
        round_trip(name, parsed, ev, ctx)
        if name == case["family"]:
            outcome = f"{name}{variant}:accepted"
    return outcome or f"{case['family']}{variant}:not_parsed"


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
        # This round's forms (§5a, §6, §7, §1), as families of their own so that each is fuzzed
        # often enough for the assertions below, even on a busy machine.
        results(sealed=True),
        evaluation_results(sealed=True),
        escrow_feedbacks(which=2),
        escrow_feedbacks(which=4),
        escrow_feedbacks(which=7),
        announcements(pool_size=(1, 6)),
        provider_capabilities(),
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
        "capabilities",
    ):
        assert report.outcomes[f"{family}:accepted"] > 0, f"no valid {family} parsed: {report.line()}"
    for variant in (
        "result/sealed",
        "eval_result/sealed",
        "escrow_feedback/model_key",
        "escrow_feedback/validation_complete+scores+split",
        "escrow_feedback/reward_paid+bolt11",
        "announcement/pool",
    ):
        assert report.outcomes[f"{variant}:accepted"] > 0, f"no valid {variant} parsed: {report.line()}"
        assert any(k.startswith(f"{variant}:") and not k.endswith(":accepted") for k in report.outcomes), (
            f"no {variant} refused: {report.line()}"
        )
