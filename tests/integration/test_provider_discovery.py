"""A customer finds providers from their capability events (protocol.md §1a) on the real relay:
the newest event per provider counts, and providers are filtered by task, escrow, price and
hardware, then ordered by price and pubkey."""

from __future__ import annotations

import secrets
import time

import pytest

from service.agents.common import AgentError, discover_providers, provider_capabilities
from service.agents.relay import Relays
from service.nostr.nip01 import SecretKey, sign_event
from service.nostr.protocol import Capabilities, TaskOffer, build_capabilities
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
