"""Property tests: random valid jobs round-trip, the money split is exact, hostile tags never crash."""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import replace
from decimal import Decimal

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from service.nostr import nip44
from service.nostr.nip01 import SecretKey
from service.nostr.protocol import (
    MAX_MSAT,
    Announcement,
    Capabilities,
    CodecError,
    CodecErrorReason,
    Direction,
    EscrowTerms,
    JobSpec,
    KeyEnvelope,
    Mode,
    ModelKey,
    ModelRef,
    MoneySplit,
    Network,
    PaymentProof,
    PayoutPolicy,
    PoolValidator,
    PublishedScore,
    RewardPaid,
    Score,
    SealedModel,
    SealError,
    Sealing,
    Shard,
    TaskOffer,
    Validation,
    ValidationComplete,
    Verdict,
    build_announcement,
    build_capabilities,
    build_evaluation_result,
    build_job_request,
    build_model_key,
    build_result,
    build_reward_paid,
    build_validation_complete,
    money_split,
    open_scores,
    open_sealed,
    parse_announcement,
    parse_capabilities,
    parse_deletion,
    parse_escrow_feedback,
    parse_evaluation_request,
    parse_evaluation_result,
    parse_feedback,
    parse_job_request,
    parse_model_key,
    parse_result,
    parse_reward_paid,
    parse_validation_complete,
    seal,
    sealed_model,
    split_shares,
    unwrap_key,
    wrap_key,
)
from service.nostr.protocol.announcement import MAX_POOL
from service.nostr.protocol.examples import regtest_invoice
from service.nostr.protocol.fields import format_decimal, parse_decimal, parse_msat
from service.nostr.protocol.sealing import MAX_MODEL_BYTES as MAX_SEALED_MODEL
from service.nostr.protocol.sealing import OVERHEAD

from .test_codec_support import CUSTOMER, ESCROW, NOW, V1, C, E, base_job, base_spec, h, key, sign, unsigned

R = CodecErrorReason
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

PROP_TERMS = EscrowTerms(
    fee_base_msat=2_500,
    fee_ppm=25_000,
    min_bid_msat=10_000,
    max_bid_msat=MAX_MSAT,
    max_validators=7,
    max_shards=12,
    min_results_window_s=60,
    max_job_duration_s=10 * 86_400,
    modes=frozenset({Mode.HOLD, Mode.CUSTODIAL}),
    network=Network.REGTEST,
    max_hold_seconds=10 * 86_400,
)

hex64 = st.binary(min_size=32, max_size=32).map(bytes.hex)
url = st.builds(
    lambda host, path: f"https://{host}.example.org/{path}",
    st.from_regex(r"[a-z0-9]{1,20}", fullmatch=True),
    st.from_regex(r"[A-Za-z0-9._~/%-]{0,60}", fullmatch=True),
)
relay = st.sampled_from(["wss://relay.example.org", "ws://127.0.0.1:7777", "wss://nos.example.com/path?x=1"])
PROP_INVOICES = [regtest_invoice(f"prop {k}", 1_000 * (k + 1), h(f"prop {k}"), "reward", NOW) for k in range(3)]


def nip44_shaped_payload(size: int) -> str:
    # The escrow only checks the shape; a real payload is tested elsewhere.
    return base64.b64encode(b"\x02" + os.urandom(size)).decode()


@st.composite
def shards(draw, recipients):
    indices = draw(st.lists(st.integers(0, 999_999), min_size=1, max_size=PROP_TERMS.max_shards, unique=True))
    out = []
    for index in indices:
        if draw(st.booleans()):
            out.append(Shard(index=index, url=draw(url), relay=draw(st.one_of(st.just(""), relay))))
        else:
            payload = nip44_shaped_payload(draw(st.integers(98, 400)))
            out.append(Shard(index=index, payload=payload, provider=draw(st.sampled_from(recipients))))
    return tuple(out)


decimals = st.decimals(allow_nan=False, allow_infinity=False, min_value=-(10**12), max_value=10**12, places=8)


@st.composite
def job_specs(draw):
    # Validators and providers must be distinct keys (else: provider_conflict), so draw them from one pool.
    n_validators, n_providers = draw(st.integers(0, PROP_TERMS.max_validators)), draw(st.integers(0, 5))
    pool = draw(
        st.lists(hex64, min_size=n_validators + n_providers + 1, max_size=n_validators + n_providers + 1, unique=True)
    )
    validators, providers = tuple(pool[:n_validators]), tuple(pool[n_validators:-1])
    recipients = [*providers, pool[-1]]
    quorum = draw(st.integers(1, max(1, len(validators))))
    bid = draw(st.integers(PROP_TERMS.min_bid_msat, MAX_MSAT))
    fee = PROP_TERMS.fee_base_msat + bid * PROP_TERMS.fee_ppm // 1_000_000
    assume(fee < bid)
    top_fee = (bid - fee - 1) // len(validators) if validators else 0
    validator_fee = 0
    if validators and top_fee >= PROP_TERMS.min_payout_msat and draw(st.booleans()):
        validator_fee = draw(st.integers(PROP_TERMS.min_payout_msat, top_fee))  # 0 or at least the minimum
    results = draw(st.integers(NOW + PROP_TERMS.min_results_window_s, NOW + PROP_TERMS.max_job_duration_s - 1))
    validation_deadline = draw(st.integers(results + 1, NOW + PROP_TERMS.max_job_duration_s))
    names = draw(st.lists(st.from_regex(r"[A-Za-z0-9_.:-]{1,64}", fullmatch=True), max_size=10, unique=True))
    values = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=50)
    params = tuple((name, draw(values)) for name in names)
    relays = tuple(draw(st.lists(relay, max_size=3, unique=True)))
    shard_list = draw(shards(recipients))
    policy = draw(st.sampled_from(PayoutPolicy))
    rewards = len(shard_list) * PROP_TERMS.max_results_per_shard if policy is PayoutPolicy.SPLIT else 1
    assume((bid - fee - validator_fee * len(validators)) // rewards >= PROP_TERMS.min_payout_msat)
    return JobSpec(
        escrow=E,
        escrow_relay=draw(st.one_of(st.just(""), relay)),
        bid_msat=bid,
        shards=shard_list,
        validation=Validation(
            draw(st.from_regex(r"[A-Za-z0-9_.:@/+-]{1,64}", fullmatch=True)),
            draw(st.sampled_from(Direction)),
            draw(decimals),
            quorum,
        ),
        payout=policy,
        results_deadline=results,
        validation_deadline=validation_deadline,
        validators=validators,
        validator_fee_msat=validator_fee,
        mode=draw(st.sampled_from(Mode)),
        params=params,
        providers=providers,
        refund=draw(
            st.sampled_from(
                [
                    None,
                    "alice@pay.example.org",
                    "bob+x@sub.example.com:8443",
                    "lnurl1dp68gurn8ghj7um9wfmxjcm99e3k7mf0",
                    "LNURL1DP68GURN8GHJ7",
                ]
            )
        ),
        expiration=draw(st.one_of(st.none(), st.integers(validation_deadline, 2**63 - 1))),
        relays=relays,
        previous_job=draw(st.one_of(st.none(), hex64)),
    )


@SETTINGS
@given(job_specs())
def test_parse_of_build_is_identity_and_the_split_is_exact(spec):
    event = sign(CUSTOMER, build_job_request(spec, customer=C))
    job = parse_job_request(event, escrow_pubkey=E, terms=PROP_TERMS, now=NOW)
    assert job.spec == spec
    split = job.split
    assert split.fee_msat + split.validator_fees_msat + split.provider_share_msat == spec.bid_msat
    assert split.fee_msat >= 0 and split.validator_fees_msat >= 0 and split.provider_share_msat > 0
    assert split.fee_msat == PROP_TERMS.fee_base_msat + spec.bid_msat * PROP_TERMS.fee_ppm // 1_000_000
    assert split.validator_fees_msat == spec.validator_fee_msat * len(spec.validators)


@SETTINGS
@given(
    bid=st.integers(0, MAX_MSAT),
    base=st.integers(0, 10**9),
    ppm=st.integers(0, 1_000_000),
    vfee=st.integers(0, MAX_MSAT),
    count=st.integers(0, 50),
)
def test_money_split_sums_to_the_bid_or_refuses(bid, base, ppm, vfee, count):
    expected_fee = base + (bid * ppm) // 1_000_000
    try:
        split = money_split(bid, fee_base_msat=base, fee_ppm=ppm, validator_fee_msat=vfee, validator_count=count)
    except CodecError as exc:
        assert exc.reason is R.FEES_EXCEED_BID
        assert expected_fee + vfee * count >= bid
        return
    assert expected_fee + vfee * count < bid
    assert split.fee_msat == expected_fee
    assert split.fee_msat + split.validator_fees_msat + split.provider_share_msat == bid
    assert min(split.fee_msat, split.validator_fees_msat) >= 0 and split.provider_share_msat > 0


@SETTINGS
@given(total=st.integers(0, MAX_MSAT), count=st.integers(1, 1000))
def test_split_shares_is_exact(total, count):
    each, remainder = split_shares(total, count)
    assert each * count + remainder == total and 0 <= remainder < count and each >= 0


def test_split_shares_refuses_zero_payees():
    with pytest.raises(ValueError):
        split_shares(10, 0)


def test_the_minimum_payout_for_providers_is_enough_and_one_msat_less_is_refused():
    # fee = 1000 + 1_000_000 * 1% = 11_000; 2 validators * 494_000 = 988_000 -> 1000 msat left (the minimum payout)
    job = base_job(base_spec(bid_msat=1_000_000, validator_fee_msat=494_000))
    assert job.split.provider_share_msat == 1_000
    with pytest.raises(CodecError) as exc:
        base_job(base_spec(bid_msat=1_000_000, validator_fee_msat=494_001))
    assert exc.value.reason is R.REWARD_TOO_SMALL


@SETTINGS
@given(st.integers(0, MAX_MSAT))
def test_every_amount_has_one_canonical_text(value):
    assert parse_msat(str(value), R.INVALID_BID, "bid") == value


@SETTINGS
@given(st.text(max_size=30))
def test_any_accepted_amount_text_is_canonical(text):
    try:
        value = parse_msat(text, R.INVALID_BID, "bid")
    except CodecError as exc:
        assert exc.reason is R.INVALID_BID
        return
    assert str(value) == text and 0 <= value <= MAX_MSAT


@SETTINGS
@given(st.decimals(allow_nan=False, allow_infinity=False))
def test_decimals_round_trip_exactly_or_are_refused(value):
    try:
        text = format_decimal(value, R.INVALID_THRESHOLD, "threshold")
    except CodecError as exc:
        assert exc.reason is R.INVALID_THRESHOLD and len(format(value, "f")) > 64
        return
    assert parse_decimal(text, R.INVALID_THRESHOLD, "threshold") == value
    assert "e" not in text.lower()


@SETTINGS
@given(st.lists(st.tuples(hex64, decimals, hex64), min_size=1, max_size=30, unique_by=lambda t: t[0]))
def test_evaluation_result_round_trip(rows):
    scores = tuple(Score(r, v, s) for r, v, s in rows)
    tmpl = build_evaluation_result(request_id=h("req"), job_id=h("job"), escrow=E, scores=scores)
    assert parse_evaluation_result(unsigned(tmpl.kind, tmpl.tags), escrow_pubkey=E).scores == scores


@SETTINGS
@given(size=st.integers(1, 2**53 - 1), sha=hex64)
def test_result_round_trip_any_model_size(size, sha):
    job = base_job()
    tmpl = build_result(job, shard_index=0, model=ModelRef("s3://bucket/model.bin", sha, size))
    result = parse_result(unsigned(tmpl.kind, tmpl.tags, pubkey=h("some provider")), job)
    assert result.model.size_bytes == size and result.model.sha256 == sha


# --------------------------------------------------------------- hostile input

tag_item = st.one_of(
    st.text(max_size=80),
    st.sampled_from(
        [
            "",
            "0",
            "-1",
            "01",
            "1e9",
            "NaN",
            "shard-0",
            "url",
            "nip44",
            "job",
            "event",
            "max",
            "min",
            "hold",
            "auto",
            "best",
            "split",
            "lud16",
            "lnurl",
            "request",
            "payment-required",
            "success",
            "error",
            "processing",
            "escrow",
            "awaiting-funding",
            "funded",
            "refunded",
            "no-quorum",
            "wss://r.example",
            "https://x.example/a",
            E,
            C,
            h("x"),
            "9" * 25,
        ]
    ),
)
tag_name = st.sampled_from(
    [
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
        "request",
    ]
)
hostile_tag = st.builds(lambda name, items: (name, *items), tag_name, st.lists(tag_item, max_size=6))


def _only_codec_errors(call):
    try:
        call()
    except CodecError as exc:
        assert isinstance(exc.reason, CodecErrorReason)


@settings(max_examples=300, deadline=None)
@given(extra=st.lists(hostile_tag, max_size=8), drop_count=st.integers(0, 5))
def test_hostile_tags_on_a_valid_job_raise_only_codec_errors(extra, drop_count):
    tmpl = build_job_request(base_spec())
    tags = list(tmpl.tags)[drop_count:] + extra
    event = unsigned(tmpl.kind, tags)
    _only_codec_errors(lambda: parse_job_request(event, escrow_pubkey=E, terms=PROP_TERMS, now=NOW))


@settings(max_examples=300, deadline=None)
@given(tags=st.lists(hostile_tag, max_size=10), content=st.text(max_size=50))
def test_hostile_tags_on_every_parser_raise_only_codec_errors(tags, content):
    job = base_job()
    for kind, parse in [
        (5701, lambda ev: parse_job_request(ev, escrow_pubkey=E, terms=PROP_TERMS, now=NOW)),
        (6701, lambda ev: parse_result(ev, job)),
        (5702, parse_evaluation_request),
        (6702, lambda ev: parse_evaluation_result(ev, escrow_pubkey=E)),
        (7000, lambda ev: parse_feedback(ev, escrow_pubkey=E)),
        (7000, parse_escrow_feedback),
        (5, parse_deletion),
        (31990, parse_announcement),
        (31990, parse_capabilities),
    ]:
        event = unsigned(kind, tags, content, pubkey=h("hostile"))
        _only_codec_errors(lambda: parse(event))  # noqa: B023 - called at once, within this iteration


def test_unicode_everywhere_in_free_text_is_kept_exactly():
    params = (("note", "模型 🚀 ünïcödé \u200b zero-width"), ("rtl", "\u202eevil"))
    spec = base_spec(params=params)
    tmpl = build_job_request(spec)
    job = parse_job_request(sign(CUSTOMER, tmpl), escrow_pubkey=E, terms=PROP_TERMS, now=NOW)
    assert job.spec.params == params


def test_huge_values_are_refused_not_overflowed():
    assert parse_msat(str(MAX_MSAT), R.INVALID_BID, "bid") == MAX_MSAT
    for text in (str(MAX_MSAT + 1), "9" * 19, "9" * 4301, "1" + "0" * 100):
        with pytest.raises(CodecError) as exc:
            parse_msat(text, R.INVALID_BID, "bid")
        assert exc.value.reason is R.INVALID_BID
    spec = replace(base_spec(), expiration=2**63 - 1)
    assert (
        parse_job_request(
            sign(CUSTOMER, build_job_request(spec)), escrow_pubkey=E, terms=PROP_TERMS, now=NOW
        ).spec.expiration
        == 2**63 - 1
    )
    huge = Decimal("9" * 40 + "." + "9" * 23)  # 64 characters: the longest plain decimal accepted
    assert parse_decimal(format_decimal(huge, R.INVALID_THRESHOLD, "t"), R.INVALID_THRESHOLD, "t") == huge
    with pytest.raises(CodecError):
        format_decimal(Decimal("1E+64"), R.INVALID_THRESHOLD, "t")


# ------------------------------------------------------------- sealed results (§5a)

# Real keys (wrap_key needs points on the curve), distinct from the base job's roles.
VALIDATOR_POOL = [key(f"property validator {k}") for k in range(PROP_TERMS.max_validators + 3)]
PROVIDER = key("property provider")
SEAL_SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
model_bytes = st.binary(min_size=1, max_size=4096)


def sealing_job(validators: tuple[str, ...], quorum: int, sealing: Sealing):
    spec = base_spec(
        validators=validators,
        validator_fee_msat=0,
        validation=replace(base_spec().validation, quorum=quorum),
        sealing=sealing,
    )
    return parse_job_request(
        sign(CUSTOMER, build_job_request(spec, customer=C)), escrow_pubkey=E, terms=PROP_TERMS, now=NOW
    )


@SEAL_SETTINGS
@given(
    data=st.data(),
    n_validators=st.integers(1, PROP_TERMS.max_validators),
    sealing=st.sampled_from(Sealing),
    plaintext=model_bytes,
)
def test_sealed_result_round_trip_for_any_number_of_validators(data, n_validators, sealing, plaintext):
    chosen = data.draw(st.permutations(VALIDATOR_POOL))[:n_validators]
    validators = tuple(v.public_key_hex for v in chosen)
    job = sealing_job(validators, data.draw(st.integers(1, n_validators)), sealing)
    recipients = data.draw(st.permutations([E, *validators]))  # any order: one key each
    sealed = seal(plaintext)
    model = sealed_model(PROVIDER, sealed, url=data.draw(url), recipients=tuple(recipients))
    tmpl = build_result(job, shard_index=0, model=model)
    result = parse_result(unsigned(tmpl.kind, tmpl.tags, pubkey=PROVIDER.public_key_hex), job)
    assert result.sealed == model and result.model is None
    assert {k.recipient for k in result.sealed.keys} == {E, *validators}
    # Each validator, and the escrow, reads the same committed key and the same model.
    for holder in (ESCROW, *chosen):
        envelope = result.sealed.key_for(holder.public_key_hex)
        content_key = unwrap_key(holder, PROVIDER.public_key_hex, envelope.payload, result.sealed.key_sha256)
        assert open_sealed(sealed.ciphertext, content_key, result.sealed) == plaintext


@SETTINGS
@given(
    size=st.integers(1, MAX_SEALED_MODEL),
    hashes=st.lists(hex64, min_size=3, max_size=3, unique=True),
    n_validators=st.integers(1, 5),
)
def test_sealed_tags_round_trip_for_any_model_size(size, hashes, n_validators):
    job = base_job(
        base_spec(
            validators=tuple(VALIDATOR_POOL[k].public_key_hex for k in range(n_validators)),
            validator_fee_msat=0,
            validation=replace(base_spec().validation, quorum=1),
        )
    )
    payload = nip44_shaped_payload(120)  # the codec checks the envelope's shape; the escrow opens it
    keys = tuple(KeyEnvelope(r, payload) for r in (E, *job.spec.validators))
    model = SealedModel("s3://bucket/c.bin", hashes[0], size + 28, hashes[1], size, hashes[2], keys)
    tmpl = build_result(job, shard_index=0, model=model)
    result = parse_result(unsigned(tmpl.kind, tmpl.tags, pubkey=PROVIDER.public_key_hex), job)
    assert result.sealed == model and (result.model_size, result.model_sha256) == (size, hashes[1])


@SETTINGS
@given(plaintext=model_bytes)
def test_open_sealed_of_seal_is_the_model(plaintext):
    sealed = seal(plaintext)
    model = committed(sealed, plaintext)
    assert len(sealed.ciphertext) == len(plaintext) + OVERHEAD
    assert open_sealed(sealed.ciphertext, sealed.key, model) == plaintext


def committed(sealed, plaintext: bytes, ciphertext: bytes | None = None) -> SealedModel:
    """What a sealed result commits to for ``sealed`` (``ciphertext``: another blob, hashed as named)."""
    blob = sealed.ciphertext if ciphertext is None else ciphertext
    return SealedModel(
        "https://blobs.example.org/c",
        hashlib.sha256(blob).hexdigest(),
        len(blob),
        hashlib.sha256(plaintext).hexdigest(),
        len(plaintext),
        sealed.key_sha256,
    )


def seal_error(call) -> str:
    with pytest.raises(SealError) as exc:
        call()
    return exc.value.reason


@SETTINGS
@given(plaintext=model_bytes, other=st.binary(min_size=32, max_size=32))
def test_a_wrong_key_never_opens(plaintext, other):
    sealed = seal(plaintext)
    assume(other != sealed.key)
    model = committed(sealed, plaintext)
    assert seal_error(lambda: open_sealed(sealed.ciphertext, other, model)) == "wrong_key"
    # Even committed to: a ciphertext opens only with the key it was sealed with.
    recommitted = replace(model, key_sha256=hashlib.sha256(other).hexdigest())
    assert seal_error(lambda: open_sealed(sealed.ciphertext, other, recommitted)) == "not_decryptable"
    assert seal_error(lambda: open_sealed(sealed.ciphertext, other[:31], model)) == "wrong_key"


@SETTINGS
@given(plaintext=model_bytes, data=st.data())
def test_a_flipped_ciphertext_byte_never_opens(plaintext, data):
    sealed = seal(plaintext)
    index = data.draw(st.integers(0, len(sealed.ciphertext) - 1))
    bit = data.draw(st.integers(0, 7))
    flipped = bytearray(sealed.ciphertext)
    flipped[index] ^= 1 << bit
    blob = bytes(flipped)
    # Against the result's commitment (the download is not the named blob) ...
    assert seal_error(lambda: open_sealed(blob, sealed.key, committed(sealed, plaintext))) == "not_decryptable"
    # ... and against a commitment to the flipped blob itself (the AEAD's tag refuses it).
    assert seal_error(lambda: open_sealed(blob, sealed.key, committed(sealed, plaintext, blob))) == "not_decryptable"


@SETTINGS
@given(plaintext=model_bytes, other_sha=hex64)
def test_a_wrong_model_commitment_never_opens(plaintext, other_sha):
    sealed = seal(plaintext)
    assume(other_sha != sealed.model_sha256)
    model = committed(sealed, plaintext)
    # The model's sha256 is the AEAD's associated data: a ciphertext opens only to the model it claims.
    assert seal_error(lambda: open_sealed(sealed.ciphertext, sealed.key, replace(model, sha256=other_sha))) == (
        "not_decryptable"
    )
    wrong_size = replace(model, size_bytes=len(plaintext) + 1)
    assert seal_error(lambda: open_sealed(sealed.ciphertext, sealed.key, wrong_size)) == "model_mismatch"


@SETTINGS
@given(plaintext=model_bytes, claimed=model_bytes)
def test_a_model_sealed_under_another_claim_is_a_mismatch(plaintext, claimed):
    # A dishonest provider seals `plaintext` with the AEAD bound to `claimed`'s hash: it opens, but
    # not to the committed model.
    assume(plaintext != claimed)
    content_key, nonce = os.urandom(32), os.urandom(12)
    sha = hashlib.sha256(claimed).hexdigest()
    blob = nonce + ChaCha20Poly1305(content_key).encrypt(nonce, plaintext, bytes.fromhex(sha))
    model = SealedModel(
        "https://x.example/c",
        hashlib.sha256(blob).hexdigest(),
        len(blob),
        sha,
        len(plaintext),
        hashlib.sha256(content_key).hexdigest(),
    )
    assert seal_error(lambda: open_sealed(blob, content_key, model)) == "model_mismatch"


@SETTINGS
@given(plaintext=model_bytes, data=st.data())
def test_a_truncated_ciphertext_never_opens(plaintext, data):
    sealed = seal(plaintext)
    blob = sealed.ciphertext[: data.draw(st.integers(0, len(sealed.ciphertext) - 1))]
    assert seal_error(lambda: open_sealed(blob, sealed.key, committed(sealed, plaintext))) == "not_decryptable"
    assert seal_error(lambda: open_sealed(blob, sealed.key, committed(sealed, plaintext, blob))) == "not_decryptable"


@SETTINGS
@given(content_key=st.binary(min_size=32, max_size=32), other=st.binary(min_size=32, max_size=32))
def test_unwrap_key_returns_only_the_committed_key(content_key, other):
    assume(content_key != other)
    envelope = wrap_key(PROVIDER, E, content_key)
    committed_sha = hashlib.sha256(content_key).hexdigest()
    assert unwrap_key(ESCROW, PROVIDER.public_key_hex, envelope.payload, committed_sha) == content_key
    # A key that does not match its commitment (the provider wrapped another key than it committed to).
    lying = wrap_key(PROVIDER, E, other)
    assert seal_error(lambda: unwrap_key(ESCROW, PROVIDER.public_key_hex, lying.payload, committed_sha)) == "wrong_key"
    # Another recipient, another sender, a tampered envelope: never a key.
    assert seal_error(lambda: unwrap_key(CUSTOMER, PROVIDER.public_key_hex, envelope.payload, committed_sha)) == (
        "wrong_key"
    )
    assert seal_error(lambda: unwrap_key(ESCROW, C, envelope.payload, committed_sha)) == "wrong_key"
    middle = len(envelope.payload) // 2
    tampered = (
        envelope.payload[:middle] + ("A" if envelope.payload[middle] != "A" else "B") + envelope.payload[middle + 1 :]
    )
    assert seal_error(lambda: unwrap_key(ESCROW, PROVIDER.public_key_hex, tampered, committed_sha)) == "wrong_key"


@SETTINGS
@given(
    text=st.one_of(st.text(min_size=1, max_size=80), st.binary(min_size=32, max_size=32).map(lambda b: b.hex().upper()))
)
def test_unwrap_key_refuses_an_envelope_that_holds_no_key(text):
    assume(not (len(text) == 64 and all(c in "0123456789abcdef" for c in text)))
    payload = nip44.encrypt(text, nip44.conversation_key(PROVIDER.secret_bytes, E))
    assert seal_error(lambda: unwrap_key(ESCROW, PROVIDER.public_key_hex, payload, "0" * 64)) == "wrong_key"


# ---------------------------------------------------------- sealed scores (§6)

score_values = st.one_of(st.none(), decimals)  # None: "unreadable"


@SETTINGS
@given(rows=st.lists(st.tuples(hex64, score_values, hex64), min_size=1, max_size=30, unique_by=lambda t: t[0]))
def test_sealed_scores_open_to_exactly_the_scores(rows):
    scores = tuple(Score(r, v, s) for r, v, s in rows)
    tmpl = build_evaluation_result(request_id=h("req"), job_id=h("job"), escrow=E, scores=scores, seal_with=V1)
    parsed = parse_evaluation_result(
        unsigned(tmpl.kind, tmpl.tags, tmpl.content, pubkey=V1.public_key_hex), escrow_pubkey=E
    )
    assert parsed.sealed and parsed.scores == ()
    opened = open_scores(parsed, ESCROW)
    assert opened.scores == scores and opened.sealed_payload is None
    assert [s.unreadable for s in opened.scores] == [v is None for _, v, _ in rows]
    with pytest.raises(CodecError) as exc:  # nobody else reads them
        open_scores(parsed, CUSTOMER)
    assert exc.value.reason is R.UNDECRYPTABLE_SCORES


@SETTINGS
@given(rows=st.lists(st.tuples(hex64, score_values, hex64), min_size=1, max_size=30, unique_by=lambda t: t[0]))
def test_clear_scores_with_unreadable_values_round_trip(rows):
    scores = tuple(Score(r, v, s) for r, v, s in rows)
    tmpl = build_evaluation_result(request_id=h("req"), job_id=h("job"), escrow=E, scores=scores)
    assert parse_evaluation_result(unsigned(tmpl.kind, tmpl.tags), escrow_pubkey=E).scores == scores


# ---------------------------------------------------------- feedback and announcement

secret_keys = st.integers(1, nip44.CURVE_ORDER - 1).map(lambda n: SecretKey(n.to_bytes(32, "big")))


@SETTINGS
@given(
    ids=st.lists(hex64, min_size=2, max_size=2, unique=True),
    customer=secret_keys,
    content_key=st.binary(min_size=32, max_size=32),
    job_relay=st.one_of(st.just(""), relay),
)
def test_model_key_round_trip_and_the_customer_reads_the_key(ids, customer, content_key, job_relay):
    payload = wrap_key(ESCROW, customer.public_key_hex, content_key).payload
    body = ModelKey(ids[0], customer.public_key_hex, ids[1], payload, job_relay)
    tmpl = build_model_key(body)
    event = unsigned(tmpl.kind, tmpl.tags, pubkey=E)
    assert parse_model_key(event) == body and parse_escrow_feedback(event) == body
    key_sha = hashlib.sha256(content_key).hexdigest()
    assert unwrap_key(customer, E, parse_model_key(event).payload, key_sha) == content_key


@st.composite
def validation_completes(draw):
    results = draw(st.lists(hex64, min_size=1, max_size=6, unique=True))
    verdicts = []
    for result_id in results:
        kind = draw(st.integers(0, 3))
        if kind == 0:
            verdicts.append(
                Verdict(result_id, True, draw(decimals), draw(st.one_of(st.none(), st.integers(0, MAX_MSAT))))
            )
        elif kind == 1:
            verdicts.append(Verdict(result_id, False, draw(decimals)))
        elif kind == 2:
            verdicts.append(Verdict(result_id, False, None))  # no quorum
        else:
            verdicts.append(Verdict(result_id, False, None, unreadable=True))
    validators = draw(st.lists(hex64, min_size=1, max_size=5, unique=True))
    pairs = draw(st.lists(st.tuples(st.sampled_from(results), st.sampled_from(validators)), max_size=20, unique=True))
    scores = tuple(PublishedScore(r, v, draw(score_values)) for r, v in pairs)
    split = None
    if draw(st.booleans()):
        bid = draw(st.integers(1, MAX_MSAT))
        fee = draw(st.integers(0, bid - 1))
        count = draw(st.integers(0, 7))
        each = draw(st.integers(0, (bid - fee - 1) // count)) if count else 0
        split = MoneySplit(bid, fee, each, count, bid - fee - each * count)
    return ValidationComplete(
        draw(hex64), draw(hex64), tuple(verdicts), draw(st.one_of(st.just(""), relay)), scores, split
    )


@SETTINGS
@given(complete=validation_completes())
def test_validation_complete_with_scores_and_split_round_trip(complete):
    tmpl = build_validation_complete(complete)
    event = unsigned(tmpl.kind, tmpl.tags, pubkey=E)
    assert parse_validation_complete(event) == complete and parse_escrow_feedback(event) == complete
    if complete.split is not None:
        s = complete.split
        assert s.fee_msat + s.validator_fees_msat + s.provider_share_msat == s.bid_msat


@SETTINGS
@given(
    ids=st.lists(hex64, min_size=2, max_size=2, unique=True),
    preimage=st.binary(min_size=32, max_size=32),
    amount=st.integers(1, MAX_MSAT),
    fee=st.integers(0, MAX_MSAT),
    bolt11=st.one_of(st.none(), st.sampled_from(PROP_INVOICES)),
)
def test_reward_paid_with_its_invoice_round_trip(ids, preimage, amount, fee, bolt11):
    proof = PaymentProof(hashlib.sha256(preimage).hexdigest(), preimage.hex(), amount, fee)
    body = RewardPaid(ids[0], ids[1], h("payee"), proof, bolt11=bolt11)
    tmpl = build_reward_paid(body)
    event = unsigned(tmpl.kind, tmpl.tags, pubkey=E)
    assert parse_reward_paid(event) == body and parse_escrow_feedback(event) == body


pool_names = st.text(st.characters(exclude_categories=["Cc", "Cs", "Zl", "Zp"]), min_size=1, max_size=64)


@SETTINGS
@given(pool=st.lists(st.tuples(hex64, pool_names), max_size=MAX_POOL, unique_by=lambda t: t[0]))
def test_announcement_with_a_pool_round_trip(pool):
    announcement = Announcement(
        d="main",
        name="E",
        about="",
        terms=PROP_TERMS,
        validator_pool=tuple(PoolValidator(pubkey, name) for pubkey, name in pool),
    )
    tmpl = build_announcement(announcement)
    assert parse_announcement(unsigned(tmpl.kind, tmpl.tags, tmpl.content, pubkey=E)) == announcement


task_names = st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=64)


@SETTINGS
@given(
    tasks=st.lists(st.tuples(task_names, hex64), min_size=1, max_size=32, unique_by=lambda t: t[0]),
    hardware=st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=64),
    max_model_bytes=st.integers(1, 2**63 - 1),
    price=st.integers(0, MAX_MSAT),
    escrows=st.none() | st.lists(hex64, min_size=1, max_size=64, unique=True),
)
def test_capabilities_round_trip(tasks, hardware, max_model_bytes, price, escrows):
    caps = Capabilities(
        name="provider",
        tasks=tuple(TaskOffer(name, sha) for name, sha in tasks),
        hardware=hardware,
        max_model_bytes=max_model_bytes,
        price_msat_per_shard=price,
        escrows=None if escrows is None else tuple(escrows),
    )
    tmpl = build_capabilities(caps)
    event = unsigned(tmpl.kind, tmpl.tags, tmpl.content, pubkey=h("provider"))
    assert parse_capabilities(event) == caps
    with pytest.raises(CodecError) as exc:  # and never for an escrow's announcement
        parse_announcement(event)
    assert exc.value.reason is CodecErrorReason.PROVIDER_CAPABILITIES
