"""One whole job's public events, consistent end to end, for the audit's tests.

Three providers on three shards (sealed results), two validators, ``payout=split``: alice and bob
are accepted, carol is rejected. The escrow publishes its announcement, the offer, funded, the
evaluation request, the validation complete (every score, the split), the model keys of alice and
bob, and four receipts (alice, bob, both validators' fees), each with a real regtest invoice. The
keys, timestamps, nonces and signatures are fixed (the docs' example helpers), so every run builds
the same bytes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from service.nostr.nip01 import Event, SecretKey
from service.nostr.protocol import (
    Announcement,
    EscrowOffer,
    Funded,
    JobRequest,
    JobSpec,
    ModelKey,
    PaymentProof,
    PublishedScore,
    RewardPaid,
    Score,
    Shard,
    ValidationComplete,
    Verdict,
    build_announcement,
    build_escrow_offer,
    build_evaluation_request,
    build_evaluation_result,
    build_funded,
    build_job_request,
    build_model_key,
    build_result,
    build_reward_paid,
    build_validation_complete,
    parse_job_request,
    seal,
    wrap_key,
)
from service.nostr.protocol.evaluation import Candidate, EvaluationRequest
from service.nostr.protocol.examples import EXAMPLE_TERMS, T0, example_key, regtest_invoice, sign_reproducibly
from service.nostr.protocol.fields import Template
from service.nostr.protocol.job import Validation
from service.nostr.protocol.money import split_shares, whole_sats
from service.nostr.protocol.sealing import SealedModel
from service.nostr.protocol.terms import Direction, Mode, PayoutPolicy, Sealing

BID = 50_000_000
VALIDATOR_FEE = 500_000
SCORES = {  # provider -> (validator 1, validator 2)
    "alice": (Decimal("0.912"), Decimal("0.905")),
    "bob": (Decimal("0.884"), Decimal("0.875")),
    "carol": (Decimal("0.5"), Decimal("0.6")),
}


def h(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def preimage_and_hash(label: str) -> tuple[str, str]:
    preimage = h(f"preimage {label}")
    return preimage, hashlib.sha256(bytes.fromhex(preimage)).hexdigest()


@dataclass
class AuditWorld:
    keys: dict[str, SecretKey]
    job: JobRequest
    events: dict[str, Event] = field(default_factory=dict)  # name -> event, in publication order
    bodies: dict[str, Any] = field(default_factory=dict)  # name -> the escrow feedback's body
    clock: int = T0

    @property
    def escrow(self) -> SecretKey:
        return self.keys["escrow"]

    def sign(self, signer: str, tmpl: Template) -> Event:
        self.clock += 10
        return sign_reproducibly(self.keys[signer], tmpl, self.clock)

    def add(self, name: str, signer: str, tmpl: Template, body: object = None) -> Event:
        event = self.sign(signer, tmpl)
        self.events[name] = event
        if body is not None:
            self.bodies[name] = body
        return event

    def all(self) -> list[Event]:
        return list(self.events.values())

    def replacing(self, name: str, tmpl: Template, signer: str = "escrow") -> list[Event]:
        """Every event, with ``name`` replaced by ``tmpl`` signed by ``signer``."""
        return [self.sign(signer, tmpl) if n == name else e for n, e in self.events.items()]

    def plus(self, tmpl: Template, signer: str = "escrow") -> list[Event]:
        return [*self.all(), self.sign(signer, tmpl)]

    def invoice(self, payee: str, amount_msat: int, payment_hash: str) -> str:
        return regtest_invoice(payee, amount_msat, payment_hash, "reward", self.clock)

    def receipt(self, payee: str, earned_by: str, amount_msat: int, *, bolt11: str | None = None) -> RewardPaid:
        preimage, payment_hash = preimage_and_hash(f"{payee} {earned_by}")
        return RewardPaid(
            job_id=self.job.id,
            earned_by=earned_by,
            payee=self.keys[payee].public_key_hex,
            payment=PaymentProof(payment_hash, preimage, amount_msat, 3),
            bolt11=bolt11 if bolt11 is not None else self.invoice(payee, amount_msat, payment_hash),
        )

    def model_key(self, provider: str) -> ModelKey:
        customer = self.keys["customer"].public_key_hex
        key = content_key(provider)
        return ModelKey(
            job_id=self.job.id,
            customer=customer,
            result_id=self.events[f"result {provider}"].id,
            payload=wrap_key(self.escrow, customer, key, nonce=bytes.fromhex(h(f"model key nonce {provider}"))).payload,
        )


def content_key(provider: str) -> bytes:
    return hashlib.sha256(f"audit content key {provider}".encode()).digest()


def _sealed(provider: SecretKey, name: str, recipients: tuple[str, ...]) -> SealedModel:
    model = hashlib.sha256(f"{name} model".encode()).digest() * 32
    sealed = seal(model, key=content_key(name), nonce=bytes.fromhex(h(f"{name} seal nonce"))[:12])
    ciphertext_sha256 = hashlib.sha256(sealed.ciphertext).hexdigest()
    return SealedModel(
        url=f"https://blobs.example.org/{ciphertext_sha256}",
        ciphertext_sha256=ciphertext_sha256,
        ciphertext_bytes=len(sealed.ciphertext),
        sha256=sealed.model_sha256,
        size_bytes=len(model),
        key_sha256=sealed.key_sha256,
        keys=tuple(
            wrap_key(provider, r, sealed.key, nonce=bytes.fromhex(h(f"{name} key nonce {r}"))) for r in recipients
        ),
    )


def consistent_job() -> AuditWorld:
    roles = ("escrow", "customer", "validator 1", "validator 2", "mallory")
    keys = {role: example_key(role) for role in roles}
    keys.update({name: example_key(f"provider {name}") for name in SCORES})
    E, C = keys["escrow"].public_key_hex, keys["customer"].public_key_hex
    v1, v2 = keys["validator 1"].public_key_hex, keys["validator 2"].public_key_hex
    spec = JobSpec(
        escrow=E,
        bid_msat=BID,
        shards=tuple(Shard(index=i, url=f"https://data.example.org/shard-{i}.npz") for i in range(len(SCORES))),
        validators=(v1, v2),
        validation=Validation("accuracy", Direction.MAX, Decimal("0.85"), 2),
        payout=PayoutPolicy.SPLIT,
        validator_fee_msat=VALIDATOR_FEE,
        results_deadline=T0 + 3_600,
        validation_deadline=T0 + 7_200,
        mode=Mode.AUTO,
        sealing=Sealing.REQUIRED,
    )
    job_event = sign_reproducibly(keys["customer"], build_job_request(spec, customer=C), T0)
    job = parse_job_request(job_event, escrow_pubkey=E, terms=EXAMPLE_TERMS, now=T0 + 5)
    w = AuditWorld(keys, job)
    w.events["job"] = job_event
    announcement = Announcement(d="fedstr-escrow", name="audit test escrow", about="", terms=EXAMPLE_TERMS)
    w.add("announcement", "escrow", build_announcement(announcement))
    _, offer_hash = preimage_and_hash("offer")
    offer = EscrowOffer(job.id, C, BID, regtest_invoice("escrow", BID, offer_hash, "fedstr escrow", T0), Mode.HOLD)
    w.add("offer", "escrow", build_escrow_offer(offer), offer)
    w.add("funded", "escrow", build_funded(Funded(job.id, C, BID)), Funded(job.id, C, BID))

    results: dict[str, Event] = {}
    models: dict[str, SealedModel] = {}
    for index, name in enumerate(SCORES):
        models[name] = _sealed(keys[name], name, (v1, v2, E))
        results[name] = w.add(f"result {name}", name, build_result(job, shard_index=index, model=models[name]))
    request = EvaluationRequest(
        job_id=job.id,
        candidates=tuple(Candidate(r.id) for r in results.values()),
        validators=(v1, v2),
        metric="accuracy",
        deadline=spec.validation_deadline,
    )
    request_event = w.add("evaluation request", "escrow", build_evaluation_request(request))
    for i, validator in enumerate(("validator 1", "validator 2")):
        scores = tuple(Score(results[n].id, SCORES[n][i], models[n].sha256) for n in SCORES)
        w.add(
            f"evaluation {validator}",
            validator,
            build_evaluation_result(request_id=request_event.id, job_id=job.id, escrow=E, scores=scores),
        )

    each = whole_sats(split_shares(job.split.provider_share_msat, 2)[0])
    complete = ValidationComplete(
        job_id=job.id,
        customer=C,
        verdicts=(
            Verdict(results["alice"].id, True, Decimal("0.9085"), each),
            Verdict(results["bob"].id, True, Decimal("0.8795"), each),
            Verdict(results["carol"].id, False, Decimal("0.55")),
        ),
        scores=tuple(PublishedScore(results[n].id, v, SCORES[n][i]) for n in SCORES for i, v in enumerate((v1, v2))),
        split=job.split,
    )
    w.add("complete", "escrow", build_validation_complete(complete), complete)
    for name in ("alice", "bob"):
        key = w.model_key(name)
        w.add(f"key {name}", "escrow", build_model_key(key), key)
    for name in ("alice", "bob"):
        paid = w.receipt(name, results[name].id, each)
        w.add(f"paid {name}", "escrow", build_reward_paid(paid), paid)
    for validator in ("validator 1", "validator 2"):
        paid = w.receipt(validator, w.events[f"evaluation {validator}"].id, VALIDATOR_FEE)
        w.add(f"paid {validator}", "escrow", build_reward_paid(paid), paid)
    return w
