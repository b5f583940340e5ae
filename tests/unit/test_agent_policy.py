"""The reference provider's acceptance policy: which jobs it takes, decided before it trains."""

from __future__ import annotations

import time
from dataclasses import replace
from decimal import Decimal

import pytest

pytest.importorskip("sklearn")  # the agents' extra

from service.agents.common import PERMISSIVE_TERMS, read_job
from service.agents.provider import AcceptancePolicy, reward_per_shard_msat
from service.nostr.nip01 import SecretKey, sign_event
from service.nostr.protocol import (
    Direction,
    JobRequest,
    JobSpec,
    PayoutPolicy,
    Shard,
    Validation,
    build_job_request,
)

ESCROW = SecretKey.generate()
CUSTOMER = SecretKey.generate()
POOL = [SecretKey.generate().public_key_hex for _ in range(2)]
OUTSIDER = SecretKey.generate().public_key_hex
TERMS = replace(PERMISSIVE_TERMS, fee_base_msat=100_000, fee_ppm=10_000)


def job(
    *,
    validators: tuple[str, ...] = tuple(POOL),
    threshold: str = "0.8",
    direction: Direction = Direction.MAX,
    bid: int = 3_000_000,
    fee: int = 50_000,
    shards: int = 3,
) -> JobRequest:
    now = int(time.time())
    spec = JobSpec(
        escrow=ESCROW.public_key_hex,
        bid_msat=bid,
        shards=tuple(Shard(index=k, url=f"https://data.example.org/{k}.npz") for k in range(shards)),
        validation=Validation("accuracy", direction, Decimal(threshold), 1),
        payout=PayoutPolicy.SPLIT,
        results_deadline=now + 60,
        validation_deadline=now + 240,
        validators=validators,
        validator_fee_msat=fee if validators else 0,
    )
    event = sign_event(CUSTOMER, *build_job_request(spec, customer=CUSTOMER.public_key_hex))
    return read_job(event, ESCROW.public_key_hex)


def test_the_default_policy_takes_a_job_whose_validators_are_all_in_the_escrows_pool() -> None:
    assert AcceptancePolicy().refusal(job(), pool=frozenset(POOL), terms=TERMS) is None


def test_the_default_policy_refuses_a_validator_outside_the_pool() -> None:
    why = AcceptancePolicy().refusal(job(validators=(POOL[0], OUTSIDER)), pool=frozenset(POOL), terms=TERMS)
    assert why is not None and "validator pool" in why and OUTSIDER[:12] in why


def test_without_an_announcement_the_default_policy_trusts_nobody() -> None:
    why = AcceptancePolicy().refusal(job(), pool=None, terms=TERMS)
    assert why is not None and "no validator pool" in why
    assert AcceptancePolicy().refusal(job(), pool=frozenset(), terms=TERMS) is not None


def test_an_explicit_trust_list_replaces_the_pool() -> None:
    policy = AcceptancePolicy(trusted_validators=frozenset({OUTSIDER}))
    assert policy.refusal(job(validators=(OUTSIDER,)), pool=None, terms=TERMS) is None
    why = policy.refusal(job(), pool=frozenset(POOL), terms=TERMS)
    assert why is not None and "our trusted validators" in why


def test_a_job_the_customer_validates_cannot_be_sealed_and_is_refused_unless_allowed() -> None:
    why = AcceptancePolicy().refusal(job(validators=()), pool=frozenset(POOL), terms=TERMS)
    assert why is not None and "sealed" in why
    assert (
        AcceptancePolicy(require_sealing=False).refusal(job(validators=()), pool=frozenset(POOL), terms=TERMS) is None
    )


def test_thresholds_are_bounded_by_direction() -> None:
    policy = AcceptancePolicy(max_threshold=Decimal("0.9"), min_threshold=Decimal("0.1"))
    pool = frozenset(POOL)
    assert policy.refusal(job(threshold="0.9"), pool=pool, terms=TERMS) is None  # the bound itself passes
    why = policy.refusal(job(threshold="0.95"), pool=pool, terms=TERMS)
    assert why is not None and "above our maximum" in why
    # a 'min' job (lower is better): the lower bound applies, the upper one does not
    assert policy.refusal(job(threshold="0.95", direction=Direction.MIN), pool=pool, terms=TERMS) is None
    why = policy.refusal(job(threshold="0.05", direction=Direction.MIN), pool=pool, terms=TERMS)
    assert why is not None and "below our minimum" in why


def test_the_reward_per_shard_is_the_provider_share_over_the_shards() -> None:
    j = job(bid=3_000_000, fee=50_000, shards=3)
    # fee 100 000 + 1 % of the bid = 130 000; two validators 100 000; share 2 770 000 over 3 shards
    assert reward_per_shard_msat(j, TERMS) == 923_333
    assert reward_per_shard_msat(j, None) == (3_000_000 - 100_000) // 3  # no terms: no escrow fee assumed
    assert AcceptancePolicy(min_reward_per_shard_msat=923_333).refusal(j, pool=frozenset(POOL), terms=TERMS) is None
    why = AcceptancePolicy(min_reward_per_shard_msat=923_334).refusal(j, pool=frozenset(POOL), terms=TERMS)
    assert why is not None and "reward per shard 923333 msat" in why


def test_an_escrow_fee_that_leaves_nothing_is_a_zero_reward() -> None:
    j = job(bid=140_000, fee=20_000, shards=1)  # 100 000 + 1 400 escrow fee + 40 000 for the validators
    assert reward_per_shard_msat(j, None) == 100_000
    assert reward_per_shard_msat(j, TERMS) == 0
    assert AcceptancePolicy(min_reward_per_shard_msat=1).refusal(j, pool=frozenset(POOL), terms=TERMS) is not None
