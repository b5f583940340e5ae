"""The relay pool, inbox and outbox against real nostr-relay processes."""

from __future__ import annotations

import asyncio
import json

import pytest
import websockets

from service.db import create_engine, session_factory
from service.nostr import outbox
from service.nostr.inbox import Inbox
from service.nostr.nip01 import Event, SecretKey, sign_event
from service.nostr.pool import PoolConfig, RelayPool, Subscription
from tests.conftest import RELAY_IMPLS, wait_until

pytestmark = pytest.mark.relay

KIND = 5701


async def publish_direct(url: str, *events: Event) -> None:
    """Publish as an ordinary client would, and insist on OK true."""
    async with websockets.connect(url) as ws:
        for ev in events:
            await ws.send(json.dumps(["EVENT", ev.to_dict()]))
            while True:
                msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if msg[0] == "OK" and msg[1] == ev.id:
                    assert msg[2] is True, msg
                    break


def job(author: SecretKey, n: int, escrow: str, created_at: int | None = None) -> Event:
    return sign_event(
        author, KIND, [["escrow", escrow, ""], ["p", escrow], ["bid", str(1000 + n)]], f"job {n}", created_at=created_at
    )


@pytest.fixture
async def sessions(database_url: str):
    engine = create_engine(database_url)
    yield session_factory(engine)
    await engine.dispose()


def make_pool(urls: list[str], sessions, escrow: str, **kw) -> RelayPool:
    sub = Subscription("jobs", ({"kinds": [KIND], "#p": [escrow]},))
    cfg = PoolConfig(backoff_base=0.05, backoff_max=0.5, overlap_seconds=60)
    return RelayPool(urls, Inbox(sessions), subscriptions=[sub], config=cfg, **kw)


async def stored_ids(inbox: Inbox) -> list[str]:
    return [p.id for p in await inbox.pending(10_000)]


async def test_same_events_from_two_relays_are_stored_once(relay_factory, sessions) -> None:
    """Two independent relay implementations carrying overlapping events."""
    a, b = relay_factory(impl="nostr-relay"), relay_factory(impl="nostr-sdk")
    escrow, customer = SecretKey.generate(), SecretKey.generate()
    events = [job(customer, i, escrow.public_key_hex) for i in range(20)]
    someone = SecretKey.generate().public_key_hex
    other = sign_event(customer, KIND, [["escrow", someone], ["p", someone]], "not ours")
    await publish_direct(a.url, *events[:15], other)
    await publish_direct(b.url, *events[5:])  # 5..14 on both relays
    pool = make_pool([a.url, b.url], sessions, escrow.public_key_hex)
    await pool.start()
    try:
        inbox = pool.inbox
        await wait_until(lambda: _count(inbox, 20), 15, "20 events stored")
        await asyncio.sleep(0.3)
        await pool.drain()
        ids = await stored_ids(inbox)
        assert sorted(ids) == sorted(e.id for e in events)
        assert pool.stored == 20 and pool.duplicates >= 10
        # A live event published to both relays after EOSE is also stored once.
        live = job(customer, 99, escrow.public_key_hex)
        await publish_direct(a.url, live)
        await publish_direct(b.url, live)
        await wait_until(lambda: _count(inbox, 21), 10, "live event stored")
        await asyncio.sleep(0.3)
        assert await inbox.count() == 21
        st = {s["url"]: s for s in pool.status()}
        assert st[a.url]["connected"] and st[b.url]["connected"]
    finally:
        await pool.stop()


async def _count(inbox: Inbox, n: int) -> bool:
    return await inbox.count() >= n


@pytest.mark.parametrize("impl", RELAY_IMPLS)
async def test_relay_restart_mid_stream_loses_and_duplicates_nothing(relay_factory, sessions, impl) -> None:
    relay = relay_factory(impl=impl)
    escrow, customer = SecretKey.generate(), SecretKey.generate()
    pool = make_pool([relay.url], sessions, escrow.public_key_hex)
    await pool.start()
    try:
        await pool.wait_connected()
        first = [job(customer, i, escrow.public_key_hex) for i in range(10)]
        await publish_direct(relay.url, *first)
        await wait_until(lambda: _count(pool.inbox, 10), 10, "first batch")
        relay.stop()
        await wait_until(lambda: not pool.status()[0]["connected"], 10, "pool notices the drop")
        relay.start()  # same database: the relay still has the first batch
        second = [job(customer, 100 + i, escrow.public_key_hex) for i in range(10)]
        await publish_direct(relay.url, *second)
        await wait_until(lambda: _count(pool.inbox, 20), 20, "second batch after reconnect")
        await asyncio.sleep(0.5)
        await pool.drain()
        ids = await stored_ids(pool.inbox)
        assert sorted(ids) == sorted(e.id for e in first + second)
        assert len(ids) == len(set(ids)) == 20
        assert pool.status()[0]["reconnects"] >= 1
    finally:
        await pool.stop()


@pytest.mark.parametrize("impl", RELAY_IMPLS)
async def test_events_published_while_down_are_picked_up_at_start(relay_factory, sessions, impl) -> None:
    relay = relay_factory(impl=impl)
    escrow, customer = SecretKey.generate(), SecretKey.generate()
    pool = make_pool([relay.url], sessions, escrow.public_key_hex)
    await pool.start()
    before = [job(customer, i, escrow.public_key_hex) for i in range(3)]
    await pool.wait_connected()
    await publish_direct(relay.url, *before)
    await wait_until(lambda: _count(pool.inbox, 3), 10, "events before the stop")
    await pool.drain()
    await pool.stop()

    # The service is down; events keep arriving at the relay.
    while_down = [job(customer, 10 + i, escrow.public_key_hex) for i in range(5)]
    await publish_direct(relay.url, *while_down)

    pool2 = make_pool([relay.url], sessions, escrow.public_key_hex)  # a fresh process: same DB only
    await pool2.start()
    try:
        await wait_until(lambda: _count(pool2.inbox, 8), 10, "events published while down")
        await asyncio.sleep(0.3)
        await pool2.drain()
        assert sorted(await stored_ids(pool2.inbox)) == sorted(e.id for e in before + while_down)
        assert pool2.stored == 5, "the resume point skips what was already stored"
    finally:
        await pool2.stop()


async def test_nip42_auth_when_the_relay_requires_it(relay_factory, sessions) -> None:
    relay = relay_factory(auth_roles={"query": "r", "save": "w"}, start=False)
    escrow, customer = SecretKey.generate(), SecretKey.generate()
    relay.start()
    relay.stop()
    relay.grant(escrow.public_key_hex, "rw")
    relay.grant(customer.public_key_hex, "rw")
    relay.start()
    # The customer publishes after authenticating, as a client of that relay must.
    ev = job(customer, 1, escrow.public_key_hex)
    await _auth_publish(relay.url, customer, ev)

    anon = make_pool([relay.url], sessions, escrow.public_key_hex)  # no key: cannot authenticate
    await anon.start()
    await asyncio.sleep(1.0)
    assert await anon.inbox.count() == 0
    await anon.stop()

    pool = make_pool([relay.url], sessions, escrow.public_key_hex, secret_key=escrow)
    await pool.start()
    try:
        await wait_until(lambda: _count(pool.inbox, 1), 10, "event read after AUTH")
        st = pool.status()[0]
        assert st["authenticated"] and st["auth_state"] in ("ok", "unconfirmed")
        assert await stored_ids(pool.inbox) == [ev.id]
    finally:
        await pool.stop()


async def _auth_publish(url: str, key: SecretKey, ev: Event) -> None:
    async with websockets.connect(url) as ws:
        challenge = None
        while challenge is None:
            msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if msg[0] == "AUTH":
                challenge = msg[1]
        auth = sign_event(key, 22242, [["relay", url], ["challenge", challenge]], "")
        await ws.send(json.dumps(["AUTH", auth.to_dict()]))
        await ws.send(json.dumps(["EVENT", ev.to_dict()]))
        while True:
            msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if msg[0] == "OK" and msg[1] == ev.id:
                assert msg[2] is True, msg
                return


async def test_outbox_delivers_to_every_relay_and_retries_a_down_one(relay_factory, sessions) -> None:
    a, b = relay_factory(impl="nostr-relay"), relay_factory(impl="nostr-sdk")
    escrow = SecretKey.generate()
    b.stop()
    pool = make_pool([a.url, b.url], sessions, escrow.public_key_hex)
    await pool.start()
    pub = outbox.Publisher(sessions, pool, outbox.PublisherConfig(base_delay=0.1, max_delay=0.5, ok_timeout=3))
    stop = asyncio.Event()
    runner = asyncio.create_task(pub.run(stop))
    try:
        ev = sign_event(escrow, 7000, [["status", "processing", "escrow funded"]], "")
        async with sessions.begin() as s:
            assert await outbox.enqueue(s, ev, [a.url, b.url])
        async with sessions.begin() as s:
            assert not await outbox.enqueue(s, ev, [a.url, b.url]), "idempotent by event id"
        pub.wake()
        await wait_until(lambda: _delivery(pub, ev.id, a.url, "ok"), 10, "delivered to the live relay")
        state_b = (await pub.deliveries(ev.id))[b.url]
        assert state_b[0] == "pending" and state_b[1] >= 1 and "not connected" in (state_b[2] or "")
        b.start()
        await wait_until(lambda: _delivery(pub, ev.id, b.url, "ok"), 20, "delivered once the relay is back")
        for url in (a.url, b.url):
            async with websockets.connect(url) as ws:
                await ws.send(json.dumps(["REQ", "q", {"ids": [ev.id]}]))
                msg = json.loads(await asyncio.wait_for(ws.recv(), 5))
                assert msg[0] == "EVENT" and msg[2]["id"] == ev.id
    finally:
        stop.set()
        await runner
        await pool.stop()


async def _delivery(pub: outbox.Publisher, event_id: str, url: str, state: str) -> bool:
    return (await pub.deliveries(event_id)).get(url, ("",))[0] == state
