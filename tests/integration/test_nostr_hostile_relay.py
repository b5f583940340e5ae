"""A hostile relay: frames no honest relay would send (injected fault, named as such).

Real relays verify signatures and ids before storing, so forged events cannot be
produced through one; this scripted websocket server stands in for a malicious or
broken relay. It speaks the same wire protocol over a real socket.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import websockets

from service.db import create_engine, session_factory
from service.nostr import outbox
from service.nostr.inbox import Inbox
from service.nostr.nip01 import SecretKey, sign_event
from service.nostr.pool import PoolConfig, RelayPool, Subscription
from tests.conftest import wait_until

KIND = 5701


class HostileRelay:
    """Sends ``frames`` after each REQ (with the REQ's subscription id), then EOSE;
    answers each EVENT with the next scripted OK (success, message)."""

    def __init__(self, frames: list, oks: list[tuple[bool, str]] | None = None) -> None:
        self.frames = frames
        self.oks = list(oks or [])
        self.received: list = []
        self.server = None
        self.url = ""

    async def handler(self, ws) -> None:
        async for raw in ws:
            msg = json.loads(raw)
            self.received.append(msg)
            if msg[0] == "REQ":
                for f in self.frames:
                    if isinstance(f, str):
                        await ws.send(f)
                    else:
                        await ws.send(json.dumps([x if x != "$SUB" else msg[1] for x in f]))
                await ws.send(json.dumps(["EOSE", msg[1]]))
            elif msg[0] == "EVENT":
                ok, text = self.oks.pop(0) if self.oks else (True, "")
                await ws.send(json.dumps(["OK", msg[1]["id"], ok, text]))

    async def __aenter__(self) -> HostileRelay:
        self.server = await websockets.serve(self.handler, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"ws://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def sessions(database_url: str):
    engine = create_engine(database_url)
    yield session_factory(engine)
    await engine.dispose()


def _pool(url: str, sessions, escrow: str) -> RelayPool:
    return RelayPool(
        [url],
        Inbox(sessions),
        subscriptions=[Subscription("jobs", ({"kinds": [KIND], "#p": [escrow]},))],
        config=PoolConfig(backoff_base=0.05, backoff_max=0.2, max_event_bytes=4096),
    )


async def test_forged_malformed_oversized_and_future_events_are_rejected_with_reasons(sessions) -> None:
    escrow, customer = SecretKey.generate(), SecretKey.generate()
    e = escrow.public_key_hex
    good = sign_event(customer, KIND, [["p", e]], "good")
    forged = {**sign_event(customer, KIND, [["p", e]], "forged").to_dict()}
    forged["sig"] = sign_event(SecretKey.generate(), KIND, [["p", e]], "x").sig
    wrong_id = {**sign_event(customer, KIND, [["p", e]], "wrong id").to_dict(), "content": "tampered"}
    big = sign_event(customer, KIND, [["p", e]], "x" * 5000).to_dict()
    future = sign_event(customer, KIND, [["p", e]], "future", created_at=int(time.time()) + 86_400).to_dict()
    not_asked = sign_event(customer, 1, [["p", e]], "kind 1 was not requested").to_dict()
    bad_types = {**good.to_dict(), "kind": "5701"}
    # The genuine event arrives after a forged copy with the same id: the copy must not shadow it.
    same_id_bad_sig = {**good.to_dict(), "sig": forged["sig"]}
    frames = [
        ["EVENT", "$SUB", forged],
        ["EVENT", "$SUB", wrong_id],
        ["EVENT", "$SUB", big],
        ["EVENT", "$SUB", future],
        ["EVENT", "$SUB", not_asked],
        ["EVENT", "$SUB", bad_types],
        ["EVENT", "$SUB", same_id_bad_sig],
        ["EVENT", "$SUB", good.to_dict()],
        ["EVENT", "other-sub", good.to_dict()],
        "not json",
        '{"an":"object"}',
        '["EVENT"]',
        ["NOTICE", "hello from a weird relay"],
    ]
    async with HostileRelay(frames) as relay:
        pool = _pool(relay.url, sessions, e)
        await pool.start()
        try:
            await wait_until(lambda: _stored(pool, 1), 10, "the one good event")
            await asyncio.sleep(0.3)
            await pool.drain()
        finally:
            await pool.stop()
    inbox = Inbox(sessions)
    assert [p.id for p in await inbox.pending()] == [good.id]
    reasons = sorted(r.reason for r in await inbox.rejected())
    assert reasons == sorted(
        ["bad_signature", "id_mismatch", "event_too_large", "created_at_in_future", "invalid_kind", "bad_signature"]
    )
    st = pool.status()[0]
    assert st["events_rejected"] == 7  # the six above + the kind-1 event we did not ask for
    assert "hello from a weird relay" in st["notices"]


async def _stored(pool: RelayPool, n: int) -> bool:
    return await pool.inbox.count() >= n


async def test_publisher_interprets_ok_prefixes(sessions) -> None:
    escrow = SecretKey.generate()
    oks = [
        (False, "invalid: bad tags"),
        (False, "rate-limited: slow down"),
        (True, ""),
        (False, "duplicate: have it"),
        (False, "blocked: you are banned"),
    ]
    async with HostileRelay([], oks) as relay:
        pool = _pool(relay.url, sessions, escrow.public_key_hex)
        await pool.start()
        await pool.wait_connected()
        pub = outbox.Publisher(sessions, pool, outbox.PublisherConfig(base_delay=0.01, max_delay=0.02, ok_timeout=2))
        try:
            evs = [sign_event(escrow, 7000, [["n", str(i)]], "") for i in range(4)]
            for ev in evs:  # one at a time, so each gets the next scripted answer
                async with sessions.begin() as s:
                    await outbox.enqueue(s, ev, [relay.url])
                await pub.run_once()
                if ev is evs[1]:  # rate-limited: retried, then OK
                    await asyncio.sleep(0.05)
                    await pub.run_once()
            states = [(await pub.deliveries(ev.id))[relay.url] for ev in evs]
            assert [s[0] for s in states] == ["rejected", "ok", "ok", "rejected"]
            assert states[1][1] == 2, "rate-limited was retried once, then accepted"
            assert states[2][2].startswith("duplicate:")
        finally:
            await pool.stop()
