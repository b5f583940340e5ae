"""A job's reply relays are the customer's choice: their addresses are checked (SSRF) before a connection."""

from __future__ import annotations

import pytest

from service.nostr.nip01 import SecretKey, sign_event
from service.nostr.oneshot import checked_address, publish_once


def resolver(table: dict[str, list[str]]):
    async def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise OSError("no such host")
        return table[host]

    return resolve


@pytest.mark.parametrize(
    "url",
    [
        "ws://127.0.0.1:7777",
        "ws://10.1.2.3",
        "wss://[::1]:443",
        "ws://169.254.169.254",
        "ws://[::ffff:192.168.0.1]",
        "wss://0.0.0.0",
    ],
)
async def test_private_literal_addresses_are_refused(url: str) -> None:
    assert await checked_address(url, allow_private=False) is None


async def test_a_name_that_resolves_to_any_private_address_is_refused() -> None:
    r = resolver({"relay.example.org": ["93.184.216.34", "10.0.0.5"], "good.example.org": ["93.184.216.34"]})
    assert await checked_address("wss://relay.example.org", allow_private=False, resolver=r) is None
    assert await checked_address("wss://good.example.org", allow_private=False, resolver=r) == "93.184.216.34"
    assert await checked_address("wss://unknown.example.org", allow_private=False, resolver=r) is None


async def test_allowed_private_addresses_are_for_development_only() -> None:
    assert await checked_address("ws://127.0.0.1:7777", allow_private=True) == "127.0.0.1"


async def test_a_refused_relay_is_a_permanent_blocked_answer_without_a_connection() -> None:
    event = sign_event(SecretKey.generate(), 7000, [], "")
    ok, message = await publish_once("ws://127.0.0.1:9", event, allow_private=False)
    assert ok is False and message.startswith("blocked:")
