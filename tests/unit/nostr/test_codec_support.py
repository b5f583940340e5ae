"""Shared fixtures of the codec tests (keys, terms, a valid job, event helpers). No tests here."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from decimal import Decimal

from service.nostr.nip01 import Event, SecretKey, sign_event
from service.nostr.protocol import (
    Direction,
    EscrowTerms,
    JobRequest,
    JobSpec,
    Mode,
    Network,
    PayoutPolicy,
    Shard,
    Validation,
    build_job_request,
    parse_job_request,
)
from service.nostr.protocol.examples import regtest_invoice
from service.nostr.protocol.fields import Template, placeholder_event

NOW = 1_767_225_600


def key(role: str) -> SecretKey:
    return SecretKey(hashlib.sha256(f"codec test {role}".encode()).digest())


ESCROW, CUSTOMER = key("escrow"), key("customer")
P1, P2, P3 = key("provider 1"), key("provider 2"), key("provider 3")
V1, V2, V3 = key("validator 1"), key("validator 2"), key("validator 3")
OTHER_ESCROW = key("other escrow")
E, C = ESCROW.public_key_hex, CUSTOMER.public_key_hex

TERMS = EscrowTerms(
    fee_base_msat=1_000,
    fee_ppm=10_000,
    min_bid_msat=100_000,
    max_bid_msat=100_000_000_000,
    max_validators=5,
    max_shards=8,
    min_results_window_s=600,
    max_job_duration_s=7 * 86_400,
    modes=frozenset({Mode.HOLD, Mode.CUSTODIAL}),
    network=Network.REGTEST,
    max_hold_seconds=2 * 86_400,
)
CUSTODIAL_ONLY = replace(TERMS, modes=frozenset({Mode.CUSTODIAL}))
HOLD_ONLY = replace(TERMS, modes=frozenset({Mode.HOLD}))

BOLT11 = regtest_invoice("test", 25_000_000, hashlib.sha256(b"test preimage").hexdigest(), "reward", NOW)
RELAY = "wss://relay.example.org"


def h(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def private_shard(index: int = 1, provider: SecretKey = P2, url: str = "https://data.example.org/s1.npz") -> Shard:
    return Shard.for_provider(CUSTOMER, provider.public_key_hex, index, url)


PRIVATE_SHARD = private_shard()


def base_spec(**changes: object) -> JobSpec:
    spec = JobSpec(
        escrow=E,
        bid_msat=50_000_000,
        shards=(Shard(index=0, url="https://data.example.org/s0.npz"), PRIVATE_SHARD),
        validation=Validation("accuracy", Direction.MAX, Decimal("0.85"), 2),
        payout=PayoutPolicy.BEST,
        results_deadline=NOW + 3_600,
        validation_deadline=NOW + 7_200,
        validators=(V1.public_key_hex, V2.public_key_hex),
        validator_fee_msat=100_000,
        params=(("epochs", "5"),),
    )
    return replace(spec, **changes)  # type: ignore[arg-type]


def sign(secret: SecretKey, tmpl: Template | tuple[int, Sequence[Sequence[str]], str], created_at: int = NOW) -> Event:
    kind, tags, content = tmpl
    return sign_event(secret, kind, tags, content, created_at=created_at)


def unsigned(kind: int, tags: Iterable[Sequence[str]], content: str = "", pubkey: str | None = None) -> Event:
    """An event with these exact tags (parsers never look at the signature)."""
    event = placeholder_event(Template(kind, tuple(tuple(t) for t in tags), content))
    return replace(event, pubkey=pubkey or C)


def job_event(spec: JobSpec | None = None, signer: SecretKey = CUSTOMER) -> Event:
    return sign(signer, build_job_request(spec or base_spec()))


def parse_job(event: Event, terms: EscrowTerms = TERMS, now: int = NOW) -> JobRequest:
    return parse_job_request(event, escrow_pubkey=E, terms=terms, now=now)


def base_job(spec: JobSpec | None = None) -> JobRequest:
    return parse_job(job_event(spec))


# ------------------------------------------------------------------ tag surgery

Tags = list[tuple[str, ...]]
Mutation = Callable[[Tags], Tags]


def drop(name: str, where: Callable[[tuple[str, ...]], bool] = lambda t: True) -> Mutation:
    return lambda tags: [t for t in tags if not (t[0] == name and where(t))]


def add(*new: Sequence[str]) -> Mutation:
    return lambda tags: tags + [tuple(t) for t in new]


def set_tag(name: str, *items: str) -> Mutation:
    """Replace every tag called ``name`` by ``[name, *items]`` (or add it)."""

    def mutate(tags: Tags) -> Tags:
        kept = [t for t in tags if t[0] != name]
        return kept + [(name, *items)]

    return mutate


def dup(name: str) -> Mutation:
    return lambda tags: tags + [next(t for t in tags if t[0] == name)]


def chain(*mutations: Mutation) -> Mutation:
    def mutate(tags: Tags) -> Tags:
        for mutation in mutations:
            tags = mutation(tags)
        return tags

    return mutate


def mutated(
    tmpl: Template, mutation: Mutation, kind: int | None = None, pubkey: str | None = None, content: str | None = None
) -> Event:
    tags = mutation([tuple(t) for t in tmpl.tags])
    return unsigned(
        tmpl.kind if kind is None else kind, tags, tmpl.content if content is None else content, pubkey=pubkey
    )
