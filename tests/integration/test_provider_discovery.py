"""A customer finds providers from their capability events (protocol.md §1a) on the real relay:
the newest event per provider counts, and providers are filtered by task, escrow, price and
hardware, then ordered by price and pubkey. A provider refuses, before any work, a job asking
for other code or hardware than its own, or paying less than its price."""

from __future__ import annotations

import secrets
import time
from decimal import Decimal

import pytest

pytest.importorskip("sklearn")  # the agents' extra

from service.agents.common import AgentError, discover_providers, provider_capabilities, read_job
from service.agents.provider import AcceptancePolicy, Provider
from service.agents.relay import Relays
from service.agents.storage import Blobs
from service.agents.tasks import DIGITS, task_code_sha256
from service.nostr.nip01 import SecretKey, sign_event
from service.nostr.protocol import (
    Capabilities,
    Direction,
    JobSpec,
    PayoutPolicy,
    Shard,
    TaskOffer,
    Validation,
    build_capabilities,
    build_job_request,
)
from service.nostr.protocol.capability import CAPABILITY_D, CAPABILITY_TOPIC
from service.nostr.protocol.terms import KIND_ANNOUNCEMENT

pytestmark = pytest.mark.relay

CODE = secrets.token_hex(32)


def caps(task: str, *, price: int, escrows: tuple[str, ...] | None, hardware: str = "cpu:2") -> Capabilities:
    return Capabilities(
        name="p",
        tasks=(TaskOffer(task, CODE),),
        hardware=hardware,
        max_model_bytes=1_000_000,
        price_msat_per_shard=price,
        escrows=escrows,
    )


async def test_discovery_filters_orders_and_keeps_the_newest_event_per_provider(relay_url: str) -> None:
    relays = Relays([relay_url])
    task = f"test/discovery-{secrets.token_hex(4)}"  # no other test's providers run it
    escrow, other_escrow = SecretKey.generate().public_key_hex, SecretKey.generate().public_key_hex
    now = int(time.time())
    keys = {name: SecretKey.generate() for name in ("a", "b", "any", "dear", "gpu", "elsewhere", "moved", "broken")}
    pk = {name: k.public_key_hex for name, k in keys.items()}
    announced = {
        "a": caps(task, price=100, escrows=(escrow,)),
        "b": caps(task, price=100, escrows=(other_escrow, escrow)),
        "any": caps(task, price=300, escrows=None),  # absent escrows: works with any escrow
        "dear": caps(task, price=5_001, escrows=(escrow,)),  # above the customer's price
        "gpu": caps(task, price=50, escrows=(escrow,), hardware="gpu:1"),
        "elsewhere": caps(task, price=1, escrows=(other_escrow,)),  # not our escrow
        "moved": caps(task, price=10, escrows=(escrow,)),  # replaced below by a dearer one
        "broken": caps(task, price=10, escrows=(escrow,)),  # replaced below by an unreadable one
    }
    for name, c in announced.items():
        await relays.publish(sign_event(keys[name], *build_capabilities(c), created_at=now - 10))
    # the newer event of a key is its word: "moved" now asks too much, "broken" says nothing readable
    await relays.publish(
        sign_event(keys["moved"], *build_capabilities(caps(task, price=9_999, escrows=(escrow,))), created_at=now - 5)
    )
    unreadable = (("d", CAPABILITY_D), ("k", "5701"), ("t", CAPABILITY_TOPIC))
    await relays.publish(sign_event(keys["broken"], KIND_ANNOUNCEMENT, unreadable, '{"name":"x"}', created_at=now - 5))

    found = await provider_capabilities(relays, since=now - 60)
    assert found[pk["moved"]].capabilities.price_msat_per_shard == 9_999
    assert pk["broken"] not in found

    def discover(count: int, **kwargs: object):
        return discover_providers(relays, task=task, escrow=escrow, count=count, since=now - 60, **kwargs)

    # by price, then by pubkey between equal prices
    cheap = sorted([pk["a"], pk["b"]])
    assert await discover(3, max_price_msat_per_shard=5_000, hardware="cpu:2") == [*cheap, pk["any"]]
    # no hardware asked: the GPU provider, cheapest, comes first; no price limit: the dear ones too
    assert await discover(6) == [pk["gpu"], *cheap, pk["any"], pk["dear"], pk["moved"]]
    # the customer's own validators are never chosen
    assert await discover(2, exclude={pk["a"]}, max_price_msat_per_shard=5_000) == [pk["gpu"], pk["b"]]
    # another task's code hash: nobody
    with pytest.raises(AgentError, match=r"found 0 provider\(s\)"):
        await discover(1, code_sha256=secrets.token_hex(32))
    with pytest.raises(AgentError, match=r"found 3 provider\(s\) for task .* hardware 'cpu:2'.*need 4"):
        await discover(4, max_price_msat_per_shard=5_000, hardware="cpu:2")


async def test_a_provider_refuses_a_job_asking_other_code_hardware_or_a_lower_price(relay_url: str) -> None:
    """The whole ``Provider.handle`` path up to its decision (the relay is asked for the escrow's
    announcement; there is none, the provider trusts its validator by name): no work is done."""
    relays = Relays([relay_url])
    escrow, customer, validator = SecretKey.generate(), SecretKey.generate(), SecretKey.generate().public_key_hex
    key = SecretKey.generate()
    policy = AcceptancePolicy(min_reward_per_shard_msat=1_000_000, trusted_validators=frozenset({validator}))
    provider = Provider(
        key, relays, escrow.public_key_hex, Blobs("http://127.0.0.1:1", key), lud16="p@x.y", policy=policy
    )
    ours = task_code_sha256(DIGITS)

    def job(params: tuple[tuple[str, str], ...], bid: int = 3_000_000):
        now = int(time.time())
        spec = JobSpec(
            escrow=escrow.public_key_hex,
            bid_msat=bid,
            shards=(Shard.for_provider(customer, key.public_key_hex, 0, "https://data.example.org/0.npz"),),
            validation=Validation("accuracy", Direction.MAX, Decimal("0.8"), 1),
            payout=PayoutPolicy.SPLIT,
            results_deadline=now + 60,
            validation_deadline=now + 240,
            validators=(validator,),
            validator_fee_msat=50_000,
            params=params,
        )
        event = sign_event(customer, *build_job_request(spec, customer=customer.public_key_hex))
        assert provider.accepts(event) and read_job(event, escrow.public_key_hex).id == event.id
        return event

    refusals = {
        "code": job((("task", DIGITS), ("code_sha256", secrets.token_hex(32)))),
        "hardware": job((("code_sha256", ours), ("hardware", "tpu:v5"))),
        "price": job((("code_sha256", ours),), bid=1_000_000),  # 950 000 msat per shard < 1 000 000
        "task": job((("task", "vision/resnet50"),)),
    }
    for what, event in refusals.items():
        report = await provider.handle(event)
        assert report.refused is not None and report.result_id is None, (what, report)
        assert {"code": "asks for code", "hardware": "'tpu:v5'", "price": "below our minimum", "task": "not one"}[
            what
        ] in report.refused
