"""The example events and the reason table of docs/protocol.md, generated from the codec.

Fixed keys (``sha256("fedstr-escrow example <role>")``), fixed timestamps, a fixed
NIP-44 nonce and zero BIP-340 auxiliary randomness make every byte reproducible, so
the documentation cannot drift from the code: ``tests/unit/nostr/test_codec_docs.py``
regenerates both blocks and compares them with the file. To refresh the file::

    python -m service.nostr.protocol.examples --update docs/protocol.md

(the example BOLT11 invoices are real regtest invoices signed by fixed node keys,
built with the ``bolt11`` package, which is imported only here.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path

import coincurve

from service.nostr.nip01 import Event, SecretKey, compute_id, verify_event

from .announcement import Announcement, PoolValidator, build_announcement
from .appeal import (
    AppealFee,
    AppealRoundStarted,
    AppealWindow,
    build_appeal,
    build_appeal_fee,
    build_appeal_round,
    build_appeal_window,
)
from .capability import Capabilities, TaskOffer, build_capabilities
from .deletion import build_deletion
from .errors import REASON_DESCRIPTIONS, CodecError
from .evaluation import (
    Candidate,
    EvalRound,
    EvaluationRequest,
    Score,
    ValidatorKey,
    build_evaluation_request,
    build_evaluation_result,
)
from .feedback import (
    REASON_CLAIM_WINDOW_ENDING,
    Cancelled,
    CancelReason,
    ClaimExpired,
    DeadlineExtension,
    EscrowOffer,
    FallbackStarted,
    Funded,
    ModelKey,
    PaymentProof,
    PublishedScore,
    Refunded,
    RefundReason,
    RewardClaimable,
    RewardPaid,
    ValidationComplete,
    Verdict,
    build_cancelled,
    build_claim_expired,
    build_deadline_extension,
    build_escrow_offer,
    build_fallback_started,
    build_funded,
    build_model_key,
    build_payee_invoice,
    build_refunded,
    build_rejection,
    build_reward_claimable,
    build_reward_paid,
    build_validation_complete,
)
from .fields import Invoice, Template
from .job import JobSpec, Validation, build_job_request, parse_job_request
from .money import split_shares, whole_sats
from .result import PayoutAddress, build_result
from .sealing import SealedModel, seal, wrap_key
from .shards import Shard
from .terms import KIND_JOB_REQUEST, Direction, EscrowTerms, Mode, Network, PayoutPolicy, Sealing

T0 = 1767225600  # 2026-01-01T00:00:00Z
RELAY = "wss://relay.example.org"
BEGIN = "<!-- BEGIN GENERATED: {name} (python -m service.nostr.protocol.examples --update docs/protocol.md) -->"
END = "<!-- END GENERATED: {name} -->"


def example_key(role: str) -> SecretKey:
    return SecretKey(hashlib.sha256(f"fedstr-escrow example {role}".encode()).digest())


def _hash(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def sign_reproducibly(secret: SecretKey, tmpl: Template, created_at: int) -> Event:
    """``sign_event`` with zero BIP-340 aux randomness: same input, same signature (docs only)."""
    event_id = compute_id(secret.public_key_hex, created_at, tmpl.kind, tmpl.tags, tmpl.content)
    sig = coincurve.PrivateKey(secret.secret_bytes).sign_schnorr(bytes.fromhex(event_id), bytes(32))
    event = Event(
        id=event_id,
        pubkey=secret.public_key_hex,
        created_at=created_at,
        kind=tmpl.kind,
        tags=tmpl.tags,
        content=tmpl.content,
        sig=sig.hex(),
    )
    return verify_event(event, now=created_at)


def regtest_invoice(node_role: str, amount_msat: int, payment_hash: str, memo: str, date: int) -> str:
    """A real, signed regtest BOLT11 invoice from a fixed node key."""
    from bolt11 import Bolt11, MilliSatoshi, encode
    from bolt11.models.tags import TagChar, Tags

    tags = Tags()
    tags.add(TagChar.payment_hash, payment_hash)
    tags.add(TagChar.payment_secret, _hash(f"secret {payment_hash}"))
    tags.add(TagChar.description, memo)
    tags.add(TagChar.expire_time, 600)
    tags.add(TagChar.min_final_cltv_expiry, 80)
    invoice = Bolt11(currency="bcrt", date=date, tags=tags, amount_msat=MilliSatoshi(amount_msat))
    return str(encode(invoice, hashlib.sha256(f"fedstr-escrow example node {node_role}".encode()).hexdigest()))


EXAMPLE_TERMS = EscrowTerms(
    fee_base_msat=1_000,
    fee_ppm=10_000,
    min_bid_msat=1_000_000,
    max_bid_msat=10_000_000_000,
    max_validators=9,
    max_shards=32,
    min_results_window_s=600,
    max_job_duration_s=30 * 86_400,
    modes=frozenset({Mode.HOLD, Mode.CUSTODIAL}),
    network=Network.REGTEST,
    max_hold_seconds=3 * 86_400,
    claim_window_s=30 * 86_400,
    appeal_window_s=86_400,
    appeal_fee_msat=10_000,
)


@dataclass(frozen=True)
class Example:
    title: str
    section: str
    event: Event


def example_events() -> list[Example]:
    escrow, customer = example_key("escrow"), example_key("customer")
    alice, bob = example_key("provider alice"), example_key("provider bob")
    v1, v2, v3 = example_key("validator 1"), example_key("validator 2"), example_key("validator 3")
    v4 = example_key("validator 4")
    E, C = escrow.public_key_hex, customer.public_key_hex
    out: list[Example] = []

    announcement = Announcement(
        d="fedstr-escrow",
        name="FEDSTR escrow (regtest example)",
        about="Holds training bids in Lightning escrow; pays on validator evidence.",
        terms=EXAMPLE_TERMS,
        validator_pool=(
            PoolValidator(v1.public_key_hex, "validator 1"),
            PoolValidator(v2.public_key_hex, "validator 2"),
            PoolValidator(v3.public_key_hex, "validator 3"),
            PoolValidator(v4.public_key_hex, "validator 4"),
        ),
    )
    out.append(
        Example(
            "Announcement (with a validator pool)",
            "§1 kind 31990",
            sign_reproducibly(escrow, build_announcement(announcement), T0),
        )
    )

    capabilities = Capabilities(
        name="alice",
        tasks=(
            TaskOffer("sklearn-digits/logreg", _hash("example code digits")),
            TaskOffer("diloco/tinylm-bytes", _hash("example code diloco")),
        ),
        hardware="cpu:8",
        max_model_bytes=64 * 1024 * 1024,
        price_msat_per_shard=200_000,
        escrows=(E,),
    )
    out.append(
        Example(
            "Provider capabilities (alice: two tasks, one escrow)",
            "§1a kind 31990",
            sign_reproducibly(alice, build_capabilities(capabilities), T0),
        )
    )

    spec = JobSpec(
        escrow=E,
        escrow_relay=RELAY,
        bid_msat=50_000_000,
        shards=(
            Shard(index=0, url="https://data.example.org/mnist/shard-0.npz"),
            Shard.for_provider(
                customer,
                bob.public_key_hex,
                1,
                "https://data.example.org/mnist/shard-1.npz",
                nonce=bytes.fromhex(_hash("example nonce")),
            ),
        ),
        params=(
            ("model", "https://models.example.org/cnn-small.onnx"),
            ("model_sha256", _hash("initial model")),
            ("epochs", "5"),
        ),
        validators=(v1.public_key_hex, v2.public_key_hex),
        validation=Validation("accuracy", Direction.MAX, Decimal("0.85"), 2),
        payout=PayoutPolicy.SPLIT,
        validator_fee_msat=500_000,
        results_deadline=T0 + 3_600,
        validation_deadline=T0 + 7_200,
        mode=Mode.AUTO,
        refund="customer@wallet.example.org",
        expiration=T0 + 90_000,
        relays=(RELAY,),
        previous_job=_hash("round 1 job"),
        sealing=Sealing.REQUIRED,
    )
    job_event = sign_reproducibly(customer, build_job_request(spec, customer=C), T0)
    out.append(Example("Job request (round 2 of a federated run; shard 1 private to Bob)", "§2 kind 5701", job_event))
    job = parse_job_request(job_event, escrow_pubkey=E, terms=EXAMPLE_TERMS, now=T0 + 5)

    bad_spec = JobSpec(
        escrow=E,
        bid_msat=1_000,
        shards=spec.shards[:1],
        validation=spec.validation,
        payout=PayoutPolicy.BEST,
        results_deadline=T0 + 3_600,
        validation_deadline=T0 + 7_200,
        validators=spec.validators,
    )
    bad_event = sign_reproducibly(customer, build_job_request(bad_spec), T0 + 10)
    try:
        parse_job_request(bad_event, escrow_pubkey=E, terms=EXAMPLE_TERMS, now=T0 + 10)
        raise AssertionError("the bad example request was accepted")
    except CodecError as error:
        rejection = build_rejection(bad_event, error)
    out.append(
        Example(
            "Rejection of a request whose bid is below the minimum",
            "§2 kind 7000",
            sign_reproducibly(escrow, rejection, T0 + 11),
        )
    )

    offer_hash = _hash("escrow preimage for the example job")
    offer = EscrowOffer(
        job_id=job.id,
        customer=C,
        amount_msat=job.split.bid_msat,
        mode=Mode.HOLD,
        bolt11=regtest_invoice("escrow", job.split.bid_msat, offer_hash, "fedstr escrow: example job", T0 + 5),
        job_relay=RELAY,
    )
    out.append(Example("Escrow offer", "§3 kind 7000", sign_reproducibly(escrow, build_escrow_offer(offer), T0 + 5)))
    funded = Funded(job_id=job.id, customer=C, amount_msat=job.split.bid_msat, job_relay=RELAY)
    out.append(Example("Funded", "§4 kind 7000", sign_reproducibly(escrow, build_funded(funded), T0 + 60)))
    # The escrow was down for 20 minutes across the results deadline: both deadlines move by 20 minutes.
    extension = DeadlineExtension(
        job_id=job.id,
        customer=C,
        results_deadline=job.spec.results_deadline + 1_200,
        validation_deadline=job.spec.validation_deadline + 1_200,
        job_relay=RELAY,
    )
    out.append(
        Example(
            "Deadline extended (after an escrow outage)",
            "§4a kind 7000",
            sign_reproducibly(escrow, build_deadline_extension(extension), job.spec.results_deadline + 1_300),
        )
    )

    each = whole_sats(split_shares(job.split.provider_share_msat, 2)[0])
    recipients = (*job.spec.validators, E)
    model_a = _sealed_example(alice, "alice", recipients)
    result_a = sign_reproducibly(
        alice,
        build_result(
            job,
            shard_index=0,
            model=model_a,
            job_relay=RELAY,
            payout_address=PayoutAddress("lud16", "alice@pay.example.org"),
        ),
        T0 + 1_800,
    )
    out.append(Example("Sealed result (payout to a lud16 address)", "§5 kind 6701", result_a))
    model_b = _sealed_example(bob, "bob", recipients)
    bob_invoice = Invoice(each, regtest_invoice("bob", each, _hash("bob preimage"), "reward", T0 + 1_900))
    result_b = sign_reproducibly(bob, build_result(job, shard_index=1, model=model_b, invoice=bob_invoice), T0 + 1_900)
    out.append(Example("Sealed result for the private shard (payout to its own BOLT11)", "§5 kind 6701", result_b))

    request = EvaluationRequest(
        job_id=job.id,
        candidates=(Candidate(result_a.id, RELAY), Candidate(result_b.id, RELAY)),
        validators=job.validators,
        metric="accuracy",
        deadline=job.spec.validation_deadline,
        job_relay=RELAY,
    )
    request_event = sign_reproducibly(escrow, build_evaluation_request(request), T0 + 3_600)
    out.append(Example("Evaluation request", "§6 kind 5702", request_event))
    scores = (
        Score(result_a.id, Decimal("0.912"), model_a.sha256),
        Score(result_b.id, Decimal("0.884"), model_b.sha256),
    )
    evaluation = build_evaluation_result(
        request_id=request_event.id,
        job_id=job.id,
        escrow=E,
        scores=scores,
        request_relay=RELAY,
        job_relay=RELAY,
        seal_with=v1,
        nonce=bytes.fromhex(_hash("example scores nonce")),
    )
    out.append(
        Example(
            "Evaluation result (scores sealed to the escrow)",
            "§6 kind 6702",
            sign_reproducibly(v1, evaluation, T0 + 4_000),
        )
    )

    # Had validator 2 not scored by the deadline (quorum 2): the fallback round asks validator 3.
    fallback_deadline = job.spec.validation_deadline + 600
    fallback = EvaluationRequest(
        job_id=job.id,
        candidates=request.candidates,
        validators=(v3.public_key_hex,),
        metric="accuracy",
        deadline=fallback_deadline,
        job_relay=RELAY,
        round=EvalRound.FALLBACK,
        previous=request_event.id,
        previous_relay=RELAY,
        keys=tuple(
            ValidatorKey(
                c.result_id,
                v3.public_key_hex,
                wrap_key(
                    escrow,
                    v3.public_key_hex,
                    _example_content_key(name),
                    nonce=bytes.fromhex(_hash(f"example fallback key nonce {name}")),
                ).payload,
            )
            for c, name in zip(request.candidates, ("alice", "bob"), strict=True)
        ),
    )
    out.append(
        Example(
            "Fallback evaluation request (had validator 2 not scored: validator 3 from the pool, with the "
            "sealed candidates' keys)",
            "§6b kind 5702",
            sign_reproducibly(escrow, build_evaluation_request(fallback), job.spec.validation_deadline + 1),
        )
    )
    started = FallbackStarted(job.id, C, fallback_deadline, RELAY)
    out.append(
        Example(
            "Fallback round (to the customer; each provider gets its own)",
            "§6b kind 7000",
            sign_reproducibly(escrow, build_fallback_started(started), job.spec.validation_deadline + 1),
        )
    )

    complete = ValidationComplete(
        job_id=job.id,
        customer=C,
        job_relay=RELAY,
        verdicts=(
            Verdict(result_a.id, True, Decimal("0.9085"), each),
            Verdict(result_b.id, True, Decimal("0.8795"), each),
        ),
        scores=(
            PublishedScore(result_a.id, v1.public_key_hex, Decimal("0.912")),
            PublishedScore(result_a.id, v2.public_key_hex, Decimal("0.905")),
            PublishedScore(result_b.id, v1.public_key_hex, Decimal("0.884")),
            PublishedScore(result_b.id, v2.public_key_hex, Decimal("0.875")),
        ),
        split=job.split,
    )
    out.append(
        Example(
            "Validation complete",
            "§6 kind 7000",
            sign_reproducibly(escrow, build_validation_complete(complete), T0 + 7_200),
        )
    )
    content_key = _example_content_key("alice")
    model_key = ModelKey(
        job_id=job.id,
        customer=C,
        result_id=result_a.id,
        payload=wrap_key(escrow, C, content_key, nonce=bytes.fromhex(_hash("example model key nonce"))).payload,
        job_relay=RELAY,
    )
    out.append(
        Example(
            "Model key (alice's content key for the customer, once alice is paid)",
            "§5a kind 7000",
            sign_reproducibly(escrow, build_model_key(model_key), T0 + 7_205),
        )
    )
    claim_by = T0 + 7_210 + EXAMPLE_TERMS.claim_window_s  # the window runs from the release
    claimable = RewardClaimable(
        job_id=job.id,
        payee=alice.public_key_hex,
        amount_msat=each,
        earned_by=result_a.id,
        job_relay=RELAY,
        claim_by=claim_by,
    )
    out.append(
        Example(
            "Reward claimable", "§7 kind 7000", sign_reproducibly(escrow, build_reward_claimable(claimable), T0 + 7_210)
        )
    )
    again = RewardClaimable(
        job_id=job.id,
        payee=alice.public_key_hex,
        amount_msat=each,
        earned_by=result_a.id,
        job_relay=RELAY,
        reason="invoice_expired",
        claim_by=claim_by,
    )
    out.append(
        Example(
            "Reward claimable again, with the reason the last invoice was refused",
            "§7 kind 7000",
            sign_reproducibly(escrow, build_reward_claimable(again), T0 + 7_250),
        )
    )
    reminder = replace(claimable, reason=REASON_CLAIM_WINDOW_ENDING)
    out.append(
        Example(
            "Reward claimable once more, three days before the claim window ends (the reminder)",
            "§7 kind 7000",
            sign_reproducibly(escrow, build_reward_claimable(reminder), claim_by - 3 * 86_400),
        )
    )
    alice_hash = _hash("alice preimage")
    payee_invoice = build_payee_invoice(
        job_id=job.id,
        escrow=E,
        amount_msat=each,
        job_relay=RELAY,
        bolt11=regtest_invoice("alice", each, alice_hash, "reward", T0 + 7_300),
    )
    out.append(
        Example(
            "Payee invoice (the provider asks to be paid)",
            "§7 kind 7000",
            sign_reproducibly(alice, payee_invoice, T0 + 7_300),
        )
    )
    preimage = _hash("bob preimage")
    paid = RewardPaid(
        job_id=job.id,
        earned_by=result_b.id,
        payee=bob.public_key_hex,
        job_relay=RELAY,
        payment=PaymentProof(hashlib.sha256(bytes.fromhex(preimage)).hexdigest(), preimage, each, 12),
        bolt11=bob_invoice.bolt11,
    )
    out.append(
        Example(
            "Reward paid (with the payment's preimage)",
            "§7 kind 7000",
            sign_reproducibly(escrow, build_reward_paid(paid), T0 + 7_400),
        )
    )
    refunded = Refunded(
        job_id=_hash("another job"), customer=C, reason=RefundReason.NO_QUORUM.value, amount_msat=20_000_000
    )
    out.append(
        Example(
            "Refunded (another job, no quorum)",
            "§8 kind 7000",
            sign_reproducibly(escrow, build_refunded(refunded), T0 + 9_000),
        )
    )
    # Had the validators rejected bob's result: the decision waits a day for an appeal; bob appeals.
    appeal_deadline = T0 + 7_200 + EXAMPLE_TERMS.appeal_window_s
    window = AppealWindow(job.id, bob.public_key_hex, appeal_deadline, RELAY)
    out.append(
        Example(
            "Appeal window (to the customer and each provider, with the validation complete)",
            "§6c kind 7000",
            sign_reproducibly(escrow, build_appeal_window(window), T0 + 7_200),
        )
    )
    appeal = build_appeal(
        job_id=job.id, escrow=E, result_id=result_b.id, reason="my holdout accuracy is 0.93", job_relay=RELAY
    )
    appeal_event = sign_reproducibly(bob, appeal, T0 + 8_000)
    out.append(Example("Appeal (by the provider of a rejected result)", "§6c kind 7000", appeal_event))
    fee_hash = _hash("example appeal fee")
    fee = AppealFee(
        job.id,
        bob.public_key_hex,
        EXAMPLE_TERMS.appeal_fee_msat,
        regtest_invoice("escrow", EXAMPLE_TERMS.appeal_fee_msat, fee_hash, "fedstr appeal fee", T0 + 8_001),
        RELAY,
    )
    out.append(
        Example(
            "Appeal fee (the escrow's answer: a plain invoice until the appeal deadline)",
            "§6c kind 7000",
            sign_reproducibly(escrow, build_appeal_fee(fee), T0 + 8_001),
        )
    )
    round_deadline = T0 + 8_100 + 600
    pool = (v3.public_key_hex, v4.public_key_hex)  # the job's quorum (2) of pool keys, by key order
    appeal_request = EvaluationRequest(
        job_id=job.id,
        candidates=request.candidates,
        validators=tuple(sorted(pool)),
        metric=job.spec.validation.metric,
        deadline=round_deadline,
        job_relay=RELAY,
        round=EvalRound.APPEAL,
        previous=request_event.id,
        previous_relay=RELAY,
        keys=tuple(
            ValidatorKey(
                c.result_id,
                v,
                wrap_key(
                    escrow, v, _example_content_key(name), nonce=bytes.fromhex(_hash(f"example appeal key {name} {v}"))
                ).payload,
            )
            for c, name in zip(request.candidates, ("alice", "bob"), strict=True)
            for v in sorted(pool)
        ),
    )
    out.append(
        Example(
            "Appeal round (the fee is paid: pool validators score every candidate; their verdict is final)",
            "§6c kind 5702",
            sign_reproducibly(escrow, build_evaluation_request(appeal_request), T0 + 8_100),
        )
    )
    round_started = AppealRoundStarted(job.id, C, round_deadline, RELAY)
    out.append(
        Example(
            "Appeal round started (to the customer and each provider)",
            "§6c kind 7000",
            sign_reproducibly(escrow, build_appeal_round(round_started), T0 + 8_100),
        )
    )
    expired = ClaimExpired(
        job_id=_hash("a third job"),
        payee=bob.public_key_hex,
        amount_msat=each,
        claim_by=T0 + 9_050,
        earned_by=_hash("bob's result in the third job"),
    )
    out.append(
        Example(
            "Claim expired (another job: nobody gave an invoice by claim_by)",
            "§7 kind 7000",
            sign_reproducibly(escrow, build_claim_expired(expired), T0 + 9_051),
        )
    )
    deletion = build_deletion(
        (_hash("an unfunded job"),),
        kinds=(KIND_JOB_REQUEST,),
        reason="cancelled before funding",
        escrow=escrow.public_key_hex,
    )
    out.append(
        Example(
            "Deletion (cancels an unfunded job)", "NIP-09 kind 5", sign_reproducibly(customer, deletion, T0 + 9_100)
        )
    )
    cancelled = Cancelled(job_id=_hash("an unfunded job"), customer=C, reason=CancelReason.DELETED.value)
    out.append(
        Example(
            "Cancelled (the escrow's answer to the deletion)",
            "§8 kind 7000",
            sign_reproducibly(escrow, build_cancelled(cancelled), T0 + 9_101),
        )
    )
    return out


def _example_content_key(name: str) -> bytes:
    return hashlib.sha256(f"fedstr-escrow example content key {name}".encode()).digest()


def _sealed_example(provider: SecretKey, name: str, recipients: tuple[str, ...]) -> SealedModel:
    """A sealed model with fixed bytes, key and nonces (the docs' bytes never change)."""
    model = hashlib.sha256(f"{name} model".encode()).digest() * 64
    sealed = seal(model, key=_example_content_key(name), nonce=bytes.fromhex(_hash(f"{name} seal nonce"))[:12])
    keys = tuple(
        wrap_key(provider, r, sealed.key, nonce=bytes.fromhex(_hash(f"{name} key nonce {r}"))) for r in recipients
    )
    return SealedModel(
        url=f"https://escrow.example.org/blobs/{hashlib.sha256(sealed.ciphertext).hexdigest()}",
        ciphertext_sha256=hashlib.sha256(sealed.ciphertext).hexdigest(),
        ciphertext_bytes=len(sealed.ciphertext),
        sha256=sealed.model_sha256,
        size_bytes=len(model),
        key_sha256=sealed.key_sha256,
        keys=keys,
    )


def example_keys_markdown() -> str:
    lines = ["| role | public key |", "|---|---|"]
    for role in ("escrow", "customer", "provider alice", "provider bob", "validator 1", "validator 2"):
        lines.append(f"| {role} | `{example_key(role).public_key_hex}` |")
    return "\n".join(lines)


def pretty_event(event: Event) -> str:
    """Pretty JSON with one tag per line (still valid JSON, equal to ``event.to_dict()``)."""

    def dump(value: object) -> str:
        return json.dumps(value, ensure_ascii=False)

    lines = ["{"]
    for name, value in event.to_dict().items():
        if name == "tags":
            tags = [f"    {dump(tag)}" for tag in value]
            lines.append('  "tags": [' + ("\n" + ",\n".join(tags) + "\n  ]," if tags else "],"))
        else:
            lines.append(f"  {dump(name)}: {dump(value)},")
    lines[-1] = lines[-1].rstrip(",")
    lines.append("}")
    return "\n".join(lines)


def examples_markdown() -> str:
    parts = [example_keys_markdown()]
    for example in example_events():
        body = pretty_event(example.event)
        parts.append(f"#### {example.section}: {example.title}\n\n```json\n{body}\n```")
    return "\n\n".join(parts)


def reasons_markdown() -> str:
    lines = ["| reason | meaning |", "|---|---|"]
    for reason, text in REASON_DESCRIPTIONS.items():
        escaped = text.replace("|", "\\|")
        lines.append(f"| `{reason.value}` | {escaped} |")
    return "\n".join(lines)


GENERATORS = {"examples": examples_markdown, "reasons": reasons_markdown}


def generated_block(name: str) -> str:
    return f"{BEGIN.format(name=name)}\n{GENERATORS[name]()}\n{END.format(name=name)}"


def update(text: str) -> str:
    """``text`` with every generated block replaced by a fresh one."""
    for name in GENERATORS:
        begin, end = BEGIN.format(name=name), END.format(name=name)
        start, stop = text.index(begin), text.index(end) + len(end)
        text = text[:start] + generated_block(name) + text[stop:]
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", type=Path, help="rewrite the generated blocks of this markdown file")
    args = parser.parse_args(argv)
    if args.update:
        args.update.write_text(update(args.update.read_text(encoding="utf-8")), encoding="utf-8")
        return 0
    sys.stdout.write(examples_markdown() + "\n\n" + reasons_markdown() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
