"""Build → sign → verify → parse, for every kind of the escrow protocol, plus NIP-44 shards."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from decimal import Decimal

import pytest

from service.nostr import nip44
from service.nostr.nip01 import verify_event
from service.nostr.protocol import (
    BASELINE,
    CAPABILITY_TOPIC,
    Announcement,
    Baseline,
    Candidate,
    Capabilities,
    CodecError,
    CodecErrorReason,
    ErrorFeedback,
    EscrowOffer,
    EvaluationRequest,
    Funded,
    Invoice,
    Mode,
    ModelKey,
    ModelRef,
    PaymentProof,
    PayoutAddress,
    PayoutPolicy,
    PoolValidator,
    PublishedScore,
    Refunded,
    RewardClaimable,
    RewardPaid,
    Score,
    SealError,
    Sealing,
    Shard,
    TaskOffer,
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
    build_rejection,
    build_result,
    build_reward_claimable,
    build_reward_paid,
    build_validation_complete,
    decrypt_shard,
    encrypt_shard,
    open_scores,
    open_sealed,
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
    parse_model_key,
    parse_refunded,
    parse_result,
    parse_reward_claimable,
    parse_reward_paid,
    parse_validation_complete,
    seal,
    sealed_model,
    unwrap_key,
    wrap_key,
)
from service.nostr.protocol.evaluation import UNREADABLE
from service.nostr.protocol.terms import KIND_JOB_REQUEST

from .test_codec_support import (
    BOLT11,
    CUSTOMER,
    ESCROW,
    NOW,
    P1,
    P2,
    P3,
    PRIVATE_SHARD,
    RELAY,
    TERMS,
    V1,
    V2,
    C,
    E,
    base_job,
    base_spec,
    h,
    job_event,
    key,
    parse_job,
    sign,
)

R = CodecErrorReason
MODEL = ModelRef("https://models.example.org/m.onnx", h("model"), 1_234_567)


def signed_verified(secret, tmpl, created_at=NOW):
    return verify_event(sign(secret, tmpl, created_at).to_dict(), now=created_at)


# ------------------------------------------------------------------- job request


def test_job_request_round_trip_keeps_every_field():
    spec = base_spec(
        escrow_relay=RELAY,
        payout=PayoutPolicy.SPLIT,
        mode=Mode.HOLD,
        refund="lnurl1dp68gurn8ghj7um9wfmxjcm99e3k7mf0",
        providers=(P1.public_key_hex, P3.public_key_hex),
        expiration=NOW + 7_200,
        relays=(RELAY, "ws://127.0.0.1:7777"),
        previous_job=h("round 1"),
        params=(("epochs", "5"), ("model", "https://m.example.org/a.onnx")),
        baseline=Baseline(h("global model"), "https://m.example.org/a.onnx", Decimal("0.01")),
    )
    event = signed_verified(CUSTOMER, build_job_request(spec, customer=C))
    job = parse_job(event)
    assert job.spec == spec
    assert (job.id, job.customer, job.created_at, job.kind) == (event.id, C, NOW, KIND_JOB_REQUEST)
    assert job.result_kind == 6701
    assert job.validators == spec.validators and not job.customer_validates


def test_job_request_money_split_is_exact():
    job = base_job(base_spec(bid_msat=50_000_000, validator_fee_msat=100_000))
    # fee = 1000 + 50_000_000 * 10_000 // 1_000_000 = 501_000; validators 2 * 100_000
    assert job.split.fee_msat == 501_000
    assert job.split.validator_fees_msat == 200_000
    assert job.split.provider_share_msat == 50_000_000 - 501_000 - 200_000
    assert job.split.fee_msat + job.split.validator_fees_msat + job.split.provider_share_msat == job.split.bid_msat


def test_fee_rounds_down():
    job = base_job(
        base_spec(
            bid_msat=100_099, validators=(), validator_fee_msat=0, validation=replace(base_spec().validation, quorum=1)
        )
    )
    assert job.split.fee_msat == 1_000 + 1_000  # 100_099 * 0.01 = 1000.99 -> 1000


def test_customer_validates_when_no_validator_is_named():
    spec = base_spec(validators=(), validator_fee_msat=0, validation=replace(base_spec().validation, quorum=1))
    job = base_job(spec)
    assert job.customer_validates and job.validators == (C,)
    assert job.split.validator_fees_msat == 0


def test_mode_defaults_to_auto_and_unknown_tags_are_ignored():
    tmpl = build_job_request(base_spec())
    tags = [t for t in tmpl.tags if t[0] != "mode"] + [("t", "mnist"), ("alt", "a training job"), ("client", "x")]
    job = parse_job(sign(CUSTOMER, (tmpl.kind, tags, "free text content")))
    assert job.spec.mode is Mode.AUTO


def test_accepts_boundary_values():
    # results deadline exactly min window away, validation deadline exactly max duration away,
    # bid exactly at both bounds, expiration exactly at the validation deadline.
    spec = base_spec(
        results_deadline=NOW + TERMS.min_results_window_s,
        validation_deadline=NOW + TERMS.max_job_duration_s,
        mode=Mode.CUSTODIAL,
        bid_msat=TERMS.max_bid_msat,
        expiration=NOW + TERMS.max_job_duration_s,
    )
    assert parse_job(job_event(spec)).spec == spec
    low = base_spec(bid_msat=TERMS.min_bid_msat, validator_fee_msat=0)
    assert parse_job(job_event(low)).split.provider_share_msat == TERMS.min_bid_msat - 1_000 - 1_000
    hold = base_spec(mode=Mode.HOLD, validation_deadline=NOW + TERMS.max_hold_seconds)
    assert parse_job(job_event(hold)).spec.mode is Mode.HOLD


def test_relay_hints_in_provider_tags_are_accepted_and_dropped():
    tmpl = build_job_request(base_spec(providers=(P1.public_key_hex,)))
    tags = [("p", P1.public_key_hex, RELAY) if t[:2] == ("p", P1.public_key_hex) else t for t in tmpl.tags]
    assert parse_job(sign(CUSTOMER, (tmpl.kind, tags, ""))).spec.providers == (P1.public_key_hex,)


def test_the_routing_p_tag_of_the_escrow_is_not_a_provider():
    """["p", <escrow>] routes events to the escrow; it never names a provider or an addressee."""
    tmpl = build_job_request(base_spec(providers=(P1.public_key_hex,)))
    assert ("p", E) in tmpl.tags
    job = parse_job(sign(CUSTOMER, tmpl))
    assert job.spec.providers == (P1.public_key_hex,)
    bare = [t for t in tmpl.tags if t != ("p", E)]  # a request sent through the REST API
    assert parse_job(sign(CUSTOMER, (tmpl.kind, bare, ""))).spec.providers == (P1.public_key_hex,)


def test_configurable_job_kind():
    event = sign(CUSTOMER, build_job_request(base_spec(), kind=5999))
    from service.nostr.protocol import parse_job_request

    job = parse_job_request(event, escrow_pubkey=E, terms=TERMS, now=NOW, kind=5999)
    assert job.result_kind == 6999


# ------------------------------------------------------------------ NIP-44 shards


def test_private_shard_round_trip():
    payload = encrypt_shard(CUSTOMER, P2.public_key_hex, "https://data.example.org/secret.npz")
    assert decrypt_shard(P2, C, payload) == "https://data.example.org/secret.npz"
    assert "secret" not in payload


def test_escrow_cannot_read_a_private_shard_but_still_parses_the_job():
    job = base_job()
    shard = job.shard(1)
    assert shard is not None and shard.encrypted and shard.provider == P2.public_key_hex
    assert shard.url is None
    for stranger in (ESCROW, P1, V1):
        with pytest.raises(CodecError) as exc:
            decrypt_shard(stranger, C, shard.payload)
        assert exc.value.reason is R.UNDECRYPTABLE_SHARD
    assert decrypt_shard(P2, job.customer, shard.payload) == "https://data.example.org/s1.npz"


def test_private_shard_admits_only_its_provider_even_beyond_p_tags():
    job = base_job(base_spec(providers=(P1.public_key_hex,)))
    assert job.submit_refusal(P2.public_key_hex, 1) is None  # implicit: the shard's recipient
    assert job.submit_refusal(P1.public_key_hex, 1) is R.SHARD_NOT_ASSIGNED
    assert job.submit_refusal(P1.public_key_hex, 0) is None
    assert job.submit_refusal(P2.public_key_hex, 0) is R.PROVIDER_NOT_ALLOWED
    assert job.submit_refusal(P1.public_key_hex, 9) is R.UNKNOWN_SHARD


def test_plain_shards_admit_anyone_without_p_tags():
    job = base_job()
    assert job.submit_refusal(P3.public_key_hex, 0) is None


def test_encrypt_shard_with_fixed_nonce_is_the_nip44_payload():
    nonce = bytes(range(32))
    payload = encrypt_shard(CUSTOMER, P2.public_key_hex, "https://a.example/x", nonce=nonce)
    conv = nip44.conversation_key(CUSTOMER.secret_bytes, P2.public_key_hex)
    assert payload == nip44.encrypt("https://a.example/x", conv, nonce)


def test_unicode_url_is_refused_for_shards():
    with pytest.raises(CodecError) as exc:
        encrypt_shard(CUSTOMER, P2.public_key_hex, "https://dаta.example.org/x")  # Cyrillic а
    assert exc.value.reason is R.INVALID_SHARD


# ------------------------------------------------------------------------- result


def test_result_round_trip_with_lud16_payout():
    job = base_job()
    tmpl = build_result(
        job,
        shard_index=0,
        model=MODEL,
        payout_address=PayoutAddress("lud16", "p1@pay.example.org"),
        content="trained 5 epochs",
        job_relay=RELAY,
    )
    event = signed_verified(P1, tmpl)
    result = parse_result(event, job)
    assert (result.id, result.provider, result.job_id, result.customer) == (event.id, P1.public_key_hex, job.id, C)
    assert result.shard_index == 0 and result.model == MODEL
    assert result.payout_address == PayoutAddress("lud16", "p1@pay.example.org")
    assert result.invoice is None and result.content == "trained 5 epochs"


def test_result_round_trip_for_a_private_shard_with_bolt11_and_request_copy():
    job_ev = job_event()
    job = parse_job(job_ev)
    tmpl = build_result(
        job,
        shard_index=1,
        model=MODEL,
        invoice=Invoice(25_000_000, BOLT11),
        request=job_ev,
        payout_address=PayoutAddress("lnurl", "LNURL1DP68GURN8GHJ7UM9WFMXJCM99E3K7MF0"),
    )
    result = parse_result(signed_verified(P2, tmpl), job)
    assert result.invoice == Invoice(25_000_000, BOLT11)
    assert result.payout_address.kind == "lnurl"
    assert result.shard_index == 1


# -------------------------------------------------------------- validation round


def test_evaluation_request_round_trip():
    request = EvaluationRequest(
        job_id=h("job"),
        candidates=(Candidate(h("r1"), RELAY), Candidate(h("r2"))),
        validators=(V1.public_key_hex, V2.public_key_hex),
        metric="accuracy",
        deadline=NOW + 7_200,
        job_relay=RELAY,
    )
    assert parse_evaluation_request(signed_verified(ESCROW, build_evaluation_request(request))) == request
    with_baseline = replace(request, baseline=(h("global model"), "https://m.example.org/g.npz"))
    assert parse_evaluation_request(signed_verified(ESCROW, build_evaluation_request(with_baseline))) == with_baseline


def test_evaluation_result_round_trip():
    scores = (
        Score(h("r1"), Decimal("0.9125"), h("m1")),
        Score(h("r2"), Decimal("-3"), h("m2")),
        Score(h("r3"), Decimal("123456789012345.123456789012"), h("m3")),
        Score(BASELINE, Decimal("2.5"), h("global model")),  # relative acceptance: the baseline's score
    )  # the largest shape: 15 + 12
    tmpl = build_evaluation_result(request_id=h("req"), job_id=h("job"), escrow=E, scores=scores)
    event = signed_verified(V1, tmpl)
    parsed = parse_evaluation_result(event, escrow_pubkey=E)
    assert (parsed.request_id, parsed.job_id, parsed.escrow, parsed.validator) == (
        h("req"),
        h("job"),
        E,
        V1.public_key_hex,
    )
    assert parsed.scores == scores
    assert parsed.scores[2].value == Decimal("123456789012345.123456789012")  # exact, not a float


@pytest.mark.parametrize("order", [("request", "job"), ("job", "request")])
def test_evaluation_result_marked_e_tags_in_any_order(order):
    refs = {"request": ("e", h("req"), "", "request"), "job": ("e", h("job"), "", "job")}
    tags = [refs[order[0]], refs[order[1]], ("p", E), ("score", h("r1"), "0.5", h("m1"))]
    parsed = parse_evaluation_result(sign(V1, (6702, tags, "")))
    assert (parsed.request_id, parsed.job_id) == (h("req"), h("job"))


def test_evaluation_result_accepts_the_order_form_of_the_design_reference():
    tags = [("e", h("req")), ("e", h("job"), RELAY), ("p", E), ("score", h("r1"), "0.5", h("m1"))]
    parsed = parse_evaluation_result(sign(V1, (6702, tags, "")))
    assert (parsed.request_id, parsed.job_id) == (h("req"), h("job"))


# ---------------------------------------------------------------------- feedback


def test_escrow_feedback_round_trips():
    job_id = h("job")
    bodies = [
        (EscrowOffer(job_id, C, 50_000_000, BOLT11, Mode.HOLD, RELAY), build_escrow_offer, parse_escrow_offer),
        (Funded(job_id, C, 50_000_000), build_funded, parse_funded),
        (
            ValidationComplete(
                job_id,
                C,
                (
                    Verdict(h("r1"), True, Decimal("0.91"), 24_000_000),
                    Verdict(h("r2"), True, Decimal("0.88"), 0),
                    Verdict(h("r3"), False, Decimal("0.5")),
                    Verdict(h("r4"), False, None),
                    Verdict(h("r5"), True, Decimal("0.86")),
                ),
            ),
            build_validation_complete,
            parse_validation_complete,
        ),
        (
            RewardClaimable(job_id, P1.public_key_hex, 24_000_000, h("r1")),
            build_reward_claimable,
            parse_reward_claimable,
        ),
        (RewardClaimable(job_id, P1.public_key_hex, 24_000_000), build_reward_claimable, parse_reward_claimable),
        (
            RewardPaid(
                job_id,
                h("r1"),
                P1.public_key_hex,
                PaymentProof(hashlib.sha256(bytes.fromhex(h("pre"))).hexdigest(), h("pre"), 24_000_000, 0),
            ),
            build_reward_paid,
            parse_reward_paid,
        ),
        (Refunded(job_id, C, "no_results", 50_000_000), build_refunded, parse_refunded),
        (
            ErrorFeedback(job_id, C, "bid_too_low", "bid must be at least 100000 msat"),
            build_error_feedback,
            parse_error_feedback,
        ),
    ]
    for body, build, parse in bodies:
        event = signed_verified(ESCROW, build(body))
        assert event.kind == 7000
        assert parse(event) == body, body
        assert parse_escrow_feedback(event) == body, body


def test_rejection_answers_a_refused_request_with_its_reason():
    bad = job_event(base_spec(bid_msat=1))
    with pytest.raises(CodecError) as exc:
        parse_job(bad)
    feedback = parse_error_feedback(sign(ESCROW, build_rejection(bad, exc.value)))
    assert (feedback.job_id, feedback.customer, feedback.reason) == (bad.id, C, "bid_too_low")
    assert feedback.message == exc.value.message


def test_rejection_is_never_built_for_not_for_us():
    event = job_event(base_spec(escrow=key("other").public_key_hex))
    with pytest.raises(CodecError) as exc:
        parse_job(event)
    assert exc.value.reason is R.NOT_FOR_US
    with pytest.raises(ValueError):
        build_rejection(event, exc.value)


def test_payee_invoice_round_trip():
    tmpl = build_payee_invoice(
        job_id=h("job"), escrow=E, amount_msat=25_000_000, bolt11=BOLT11, info="reward for shard 0"
    )
    event = signed_verified(P1, tmpl)
    fb = parse_feedback(event, escrow_pubkey=E)
    assert (fb.payee, fb.job_id, fb.escrow, fb.amount_msat, fb.bolt11, fb.info) == (
        P1.public_key_hex,
        h("job"),
        E,
        25_000_000,
        BOLT11,
        "reward for shard 0",
    )


# ----------------------------------------------------------- announcement, deletion


def test_announcement_round_trip():
    announcement = Announcement(d="main", name="Escrow ✓ ünïcode", about="", terms=TERMS)
    event = signed_verified(ESCROW, build_announcement(announcement))
    assert event.kind == 31990 and ("k", "5701") in event.tags
    assert parse_announcement(event) == announcement


def test_announcement_ignores_unknown_json_keys():
    tmpl = build_announcement(Announcement(d="main", name="E", about="", terms=TERMS))
    content = tmpl.content[:-1] + ',"future_field":[1,2,{"x":null}]}'
    assert parse_announcement(sign(ESCROW, (tmpl.kind, tmpl.tags, content))).terms == TERMS


CAPS = Capabilities(
    name="Alice ✓ ünïcode",
    tasks=(TaskOffer("sklearn-digits/logreg", h("digits code")), TaskOffer("diloco/tinylm-bytes", h("lm code"))),
    hardware="gpu:a100x8",
    max_model_bytes=64 * 1024 * 1024,
    price_msat_per_shard=250_000,
    escrows=(ESCROW.public_key_hex,),
)


def test_capabilities_round_trip_and_are_found_by_their_topic():
    event = signed_verified(P1, build_capabilities(CAPS))
    assert event.kind == 31990
    assert {("d", "fedstr-provider"), ("k", "5701"), ("t", CAPABILITY_TOPIC)} <= set(event.tags)
    caps = parse_capabilities(event)
    assert caps == CAPS
    assert caps.offer("diloco/tinylm-bytes") == TaskOffer("diloco/tinylm-bytes", h("lm code"))
    assert caps.offer("some/other-task") is None
    assert caps.works_with(ESCROW.public_key_hex) and not caps.works_with(h("another escrow"))


def test_capabilities_without_escrows_work_with_any_escrow():
    caps = replace(CAPS, escrows=None)
    tmpl = build_capabilities(caps)
    assert "escrows" not in json.loads(tmpl.content)
    parsed = parse_capabilities(sign(P1, tmpl))
    assert parsed == caps and parsed.works_with(h("any escrow at all"))


def test_capabilities_ignore_unknown_keys_and_extra_topics():
    tmpl = build_capabilities(CAPS)
    content = tmpl.content[:-1] + ',"gpu_memory_gb":80,"future":{"x":[1]}}'
    tags = (*tmpl.tags, ("t", "machine-learning"))
    assert parse_capabilities(sign(P1, (tmpl.kind, tags, content))) == CAPS


def test_capabilities_content_is_sorted_and_compact():
    content = build_capabilities(CAPS).content
    assert content == json.dumps(json.loads(content), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@pytest.mark.parametrize(
    "change",
    [
        {"tasks": ()},
        {"hardware": ""},
        {"price_msat_per_shard": -1},
        {"max_model_bytes": 0},
        {"escrows": ()},
        {"tasks": (TaskOffer("x", "ABC"),)},
        {"tasks": [TaskOffer("x", h("x"))]},  # a list: would not round-trip as the frozen tuple
    ],
)
def test_build_capabilities_refuses_what_the_parser_refuses(change):
    with pytest.raises(CodecError) as exc:
        build_capabilities(replace(CAPS, **change))
    assert exc.value.reason is CodecErrorReason.INVALID_CAPABILITIES


def test_deletion_round_trip_and_dedup():
    tmpl = build_deletion((h("a"), h("b")), kinds=(5701,), reason="changed my mind")
    deletion = parse_deletion(signed_verified(CUSTOMER, tmpl))
    assert (deletion.event_ids, deletion.kinds, deletion.reason, deletion.author) == (
        (h("a"), h("b")),
        (5701,),
        "changed my mind",
        C,
    )
    tags = [("e", h("a")), ("e", h("a"), RELAY), ("k", "5701"), ("k", "5701"), ("a", "30023:abc:d")]
    deletion = parse_deletion(sign(CUSTOMER, (5, tags, "")))
    assert deletion.event_ids == (h("a"),) and deletion.kinds == (5701,)


# ------------------------------------------------------------- builder refusals


@pytest.mark.parametrize(
    "build, reason",
    [
        (lambda: build_job_request(base_spec(bid_msat=-1)), R.INVALID_BID),
        (lambda: build_job_request(base_spec(bid_msat=True)), R.INVALID_BID),
        (
            lambda: build_job_request(base_spec(validation=replace(base_spec().validation, threshold=Decimal("NaN")))),
            R.INVALID_THRESHOLD,
        ),
        (lambda: build_job_request(base_spec(validators=(E,))), R.VALIDATOR_IS_ESCROW),
        (lambda: build_job_request(base_spec(validators=(C,)), customer=C), R.VALIDATOR_IS_CUSTOMER),
        (lambda: build_job_request(base_spec(shards=())), R.MISSING_SHARDS),
        (lambda: build_job_request(base_spec(shards=(Shard(0, url="not a url"),))), R.INVALID_SHARD),
        (lambda: build_job_request(base_spec(shards=(Shard(-1, url="https://x.example"),))), R.INVALID_SHARD_INDEX),
        (lambda: build_job_request(base_spec(refund="nope")), R.INVALID_REFUND),
        (lambda: build_job_request(base_spec(results_deadline=NOW + 9_000)), R.DEADLINE_ORDER),
        (lambda: build_result(base_job(), shard_index=5, model=MODEL), R.UNKNOWN_SHARD),
        (lambda: build_result(base_job(), shard_index=0, model=replace(MODEL, size_bytes=0)), R.INVALID_MODEL_SIZE),
        (
            lambda: build_result(base_job(base_spec(sealing=Sealing.REQUIRED)), shard_index=0, model=MODEL),
            R.SEALING_REQUIRED,
        ),
        (lambda: build_escrow_offer(EscrowOffer(h("j"), C, 1, BOLT11, Mode.AUTO)), R.INVALID_ESCROW_STATE),
        (lambda: build_escrow_offer(EscrowOffer(h("j"), C, 0, BOLT11, Mode.HOLD)), R.INVALID_AMOUNT),
        (lambda: build_error_feedback(ErrorFeedback(h("j"), C, "refunded", "x")), R.INVALID_STATUS),
        (
            lambda: build_validation_complete(ValidationComplete(h("j"), C, (Verdict(h("r"), True, None),))),
            R.INVALID_VERDICT,
        ),
        (
            lambda: build_validation_complete(ValidationComplete(h("j"), C, (Verdict(h("r"), False, None, 5),))),
            R.INVALID_VERDICT,
        ),
        (
            lambda: build_reward_paid(RewardPaid(h("j"), h("r"), C, PaymentProof(h("x"), h("y"), 1, 0))),
            R.INVALID_PAYMENT,
        ),
        (
            lambda: build_payee_invoice(job_id=h("j"), escrow=E, amount_msat=1, bolt11="lnurl1dp68gurn8ghj7"),
            R.INVALID_BOLT11,
        ),
        (lambda: build_deletion(()), R.MISSING_EVENT_REF),
        (
            lambda: build_evaluation_result(
                request_id=h("q"), job_id=h("q"), escrow=E, scores=(Score(h("r"), Decimal(1), h("m")),)
            ),
            R.AMBIGUOUS_EVENT_REFS,
        ),
    ],
)
def test_builders_refuse_what_parsers_refuse(build, reason):
    with pytest.raises(CodecError) as exc:
        build()
    assert exc.value.reason is reason


def test_built_and_verified_job_from_another_customer_key_is_distinct():
    a, b = job_event(), job_event(signer=P3)
    assert a.id != b.id and parse_job(b).customer == P3.public_key_hex
    assert PRIVATE_SHARD.provider == P2.public_key_hex and isinstance(PRIVATE_SHARD, Shard)


# ------------------------------------------------------------- sealed results (§5a)


def test_sealed_result_round_trip_and_every_recipient_opens_the_model():
    job = base_job(base_spec(sealing=Sealing.REQUIRED))
    model_bytes = b"\x00weights\xff" * 1000
    sealed = seal(model_bytes)
    model = sealed_model(
        P1, sealed, url="https://blobs.example.org/c.bin", recipients=(E, V1.public_key_hex, V2.public_key_hex)
    )
    event = signed_verified(P1, build_result(job, shard_index=0, model=model, job_relay=RELAY))
    assert not any(t[0] == "model" for t in event.tags)
    result = parse_result(event, job)
    assert result.model is None and result.sealed == model
    assert (result.model_sha256, result.model_size, result.model_url) == (
        hashlib.sha256(model_bytes).hexdigest(),
        len(model_bytes),
        "https://blobs.example.org/c.bin",
    )
    assert result.sealed.ciphertext_bytes == len(model_bytes) + 28
    assert [k.recipient for k in result.sealed.keys] == [E, V1.public_key_hex, V2.public_key_hex]
    for recipient in (ESCROW, V1, V2):
        envelope = result.sealed.key_for(recipient.public_key_hex)
        content_key = unwrap_key(recipient, P1.public_key_hex, envelope.payload, result.sealed.key_sha256)
        assert open_sealed(sealed.ciphertext, content_key, result.sealed) == model_bytes
    assert result.sealed.key_for(C) is None  # the customer gets its key from the escrow, once paid
    with pytest.raises(SealError) as exc:  # nor can it open another recipient's envelope
        unwrap_key(CUSTOMER, P1.public_key_hex, result.sealed.key_for(E).payload, result.sealed.key_sha256)
    assert exc.value.reason == "wrong_key"


def test_sealed_never_shows_the_content_key():
    sealed = seal(b"model")
    assert sealed.key.hex() not in repr(sealed) and sealed.model_sha256 in repr(sealed)
    with pytest.raises(SealError) as exc:
        open_sealed(sealed.ciphertext, bytes(32), sealed_model(P1, sealed, url="https://x.example/c", recipients=(E,)))
    assert sealed.key.hex() not in str(exc.value)


def test_job_sealing_round_trip_and_optional_is_not_written():
    required = parse_job(signed_verified(CUSTOMER, build_job_request(base_spec(sealing=Sealing.REQUIRED))))
    assert required.spec.sealing is Sealing.REQUIRED
    tmpl = build_job_request(base_spec())
    assert not any(t[0] == "sealing" for t in tmpl.tags)
    assert parse_job(signed_verified(CUSTOMER, tmpl)).spec.sealing is Sealing.OPTIONAL
    explicit = sign(CUSTOMER, (tmpl.kind, (*tmpl.tags, ("sealing", "optional")), ""))
    assert parse_job(explicit).spec == base_spec()


def test_sealed_scores_round_trip_only_the_escrow_reads_them():
    scores = (Score(h("r1"), Decimal("0.9125"), h("m1")), Score(h("r2"), None, h("m2")))
    tmpl = build_evaluation_result(request_id=h("req"), job_id=h("job"), escrow=E, scores=scores, seal_with=V1)
    event = signed_verified(V1, tmpl)
    assert ("encrypted",) in event.tags and not any(t[0] == "score" for t in event.tags)
    assert h("r1") not in event.content
    parsed = parse_evaluation_result(event, escrow_pubkey=E)
    assert parsed.sealed and parsed.scores == () and parsed.sealed_payload == event.content
    opened = open_scores(parsed, ESCROW)
    assert opened.scores == scores and not opened.sealed and opened.scores[1].unreadable
    assert open_scores(opened, ESCROW) == opened  # scores in the clear are returned as they are
    body = nip44.decrypt(event.content, nip44.conversation_key(ESCROW.secret_bytes, V1.public_key_hex))
    assert body == f'[["score","{h("r1")}","0.9125","{h("m1")}"],["score","{h("r2")}","{UNREADABLE}","{h("m2")}"]]'


def test_unreadable_scores_in_the_clear_round_trip():
    scores = (Score(h("r1"), None, h("m1")),)
    tmpl = build_evaluation_result(request_id=h("req"), job_id=h("job"), escrow=E, scores=scores)
    assert ("score", h("r1"), "unreadable", h("m1")) in tmpl.tags
    assert parse_evaluation_result(signed_verified(V2, tmpl)).scores == scores


def test_model_key_round_trip_and_the_customer_opens_the_model():
    sealed = seal(b"the model")
    model = sealed_model(P1, sealed, url="https://blobs.example.org/c.bin", recipients=(E, V1.public_key_hex))
    escrow_key = unwrap_key(ESCROW, P1.public_key_hex, model.key_for(E).payload, model.key_sha256)
    body = ModelKey(h("job"), C, h("r1"), wrap_key(ESCROW, C, escrow_key).payload, RELAY)
    event = signed_verified(ESCROW, build_model_key(body))
    assert ("key", C, body.payload) in event.tags
    assert parse_model_key(event) == body and parse_escrow_feedback(event) == body
    customer_key = unwrap_key(CUSTOMER, E, parse_model_key(event).payload, model.key_sha256)
    assert open_sealed(sealed.ciphertext, customer_key, model) == b"the model"


def test_validation_complete_with_every_score_and_the_split_round_trip():
    job = base_job()
    body = ValidationComplete(
        job.id,
        C,
        (
            Verdict(h("r1"), True, Decimal("0.905"), job.split.provider_share_msat),
            Verdict(h("r2"), False, None, unreadable=True),
        ),
        RELAY,
        scores=(
            PublishedScore(h("r1"), V1.public_key_hex, Decimal("0.9")),
            PublishedScore(h("r1"), V2.public_key_hex, Decimal("0.91")),
            PublishedScore(h("r2"), V1.public_key_hex, None),
            PublishedScore(h("r2"), V2.public_key_hex, Decimal("-1")),
        ),
        split=job.split,
    )
    event = signed_verified(ESCROW, build_validation_complete(body))
    assert ("rejected", h("r2"), "unreadable") in event.tags
    assert ("score", h("r2"), V1.public_key_hex, "unreadable") in event.tags
    assert ("split", "50000000", "501000", "100000", "2", "49299000") in event.tags
    assert parse_validation_complete(event) == body and parse_escrow_feedback(event) == body


def test_reward_paid_with_its_invoice_round_trip():
    preimage = h("pre")
    body = RewardPaid(
        h("job"),
        h("r1"),
        P1.public_key_hex,
        PaymentProof(hashlib.sha256(bytes.fromhex(preimage)).hexdigest(), preimage, 25_000_000, 3),
        bolt11=BOLT11,
    )
    event = signed_verified(ESCROW, build_reward_paid(body))
    assert ("bolt11", BOLT11) in event.tags
    assert parse_reward_paid(event) == body and parse_escrow_feedback(event) == body
    without = replace(body, bolt11=None)
    assert parse_reward_paid(signed_verified(ESCROW, build_reward_paid(without))) == without


def test_announcement_with_a_validator_pool_round_trip():
    pool = (PoolValidator(V1.public_key_hex, "Validator ✓ one"), PoolValidator(V2.public_key_hex, "v2"))
    announcement = Announcement(d="main", name="E", about="", terms=TERMS, validator_pool=pool)
    event = signed_verified(ESCROW, build_announcement(announcement))
    assert parse_announcement(event) == announcement
    assert '"validators":' in event.content
    assert '"validators"' not in build_announcement(replace(announcement, validator_pool=())).content
