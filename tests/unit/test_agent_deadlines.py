"""The reference agents wait for a verdict until the validation deadline in force: when the escrow
moves it after an outage (protocol.md §4a) they wait longer, never shorter, and only on the escrow's
own word."""

from __future__ import annotations

import asyncio
import time

import pytest

from service.agents.common import wait_validation
from service.agents.relay import Relays, Subscription
from service.nostr.nip01 import Event, SecretKey, sign_event
from service.nostr.protocol import (
    DeadlineExtension,
    FallbackStarted,
    Refunded,
    build_deadline_extension,
    build_fallback_started,
    build_refunded,
)

ESCROW, CUSTOMER, STRANGER = SecretKey.generate(), SecretKey.generate(), SecretKey.generate()
JOB = "ab" * 32


def subscription() -> Subscription:  # never entered: the test hands it the events a relay would
    return Subscription(Relays(["ws://127.0.0.1:9"]), [{"kinds": [7000]}])


def extension(by: SecretKey, validation_deadline: int) -> Event:
    ext = DeadlineExtension(JOB, CUSTOMER.public_key_hex, None, validation_deadline)
    return sign_event(by, *build_deadline_extension(ext))


def refunded() -> Event:
    return sign_event(ESCROW, *build_refunded(Refunded(JOB, CUSTOMER.public_key_hex, "no_quorum", 1000)))


async def _verdict_after(sub: Subscription, seconds: float) -> None:
    await asyncio.sleep(seconds)
    sub._add(refunded())


async def test_a_moved_deadline_keeps_the_wait_open() -> None:
    sub = subscription()
    sub._add(extension(ESCROW, int(time.time()) + 5))
    late = asyncio.create_task(_verdict_after(sub, 2.0))
    got = await wait_validation(sub, ESCROW.public_key_hex, JOB, deadline=int(time.time()), margin=0)
    await late
    assert isinstance(got, Refunded) and got.reason == "no_quorum"


async def test_without_the_escrow_moving_it_the_wait_ends_at_the_deadline() -> None:
    sub = subscription()
    sub._add(extension(STRANGER, int(time.time()) + 30))  # not the escrow's word
    late = asyncio.create_task(_verdict_after(sub, 2.5))
    with pytest.raises(TimeoutError):
        await wait_validation(sub, ESCROW.public_key_hex, JOB, deadline=int(time.time()), margin=0)
    late.cancel()


async def test_a_fallback_round_keeps_the_wait_open_until_its_deadline() -> None:
    """The escrow's 'fallback round' feedback (protocol.md §6b) moves the wait to the fallback
    deadline, whoever it is addressed to (the customer, or a provider)."""
    for addressee in (CUSTOMER.public_key_hex, STRANGER.public_key_hex):
        sub = subscription()
        started = FallbackStarted(JOB, addressee, int(time.time()) + 5)
        sub._add(sign_event(ESCROW, *build_fallback_started(started)))
        late = asyncio.create_task(_verdict_after(sub, 2.0))
        got = await wait_validation(sub, ESCROW.public_key_hex, JOB, deadline=int(time.time()), margin=0)
        await late
        assert isinstance(got, Refunded)


async def test_a_moved_fallback_deadline_keeps_the_wait_open() -> None:
    sub = subscription()
    ext = DeadlineExtension(JOB, CUSTOMER.public_key_hex, None, None, fallback_deadline=int(time.time()) + 5)
    sub._add(sign_event(ESCROW, *build_deadline_extension(ext)))
    late = asyncio.create_task(_verdict_after(sub, 2.0))
    got = await wait_validation(sub, ESCROW.public_key_hex, JOB, deadline=int(time.time()), margin=0)
    await late
    assert isinstance(got, Refunded)
