"""Hostile inputs against the running service: at least 500, every one refused with its reason.

Handcrafted and generated (hypothesis) events, webhooks, payee invoices and raw HTTP
requests go to the live app (LND and relay attached). Each must get a 4xx problem with
a specific code; none may produce a 5xx, crash a worker, or touch the ledger or a job.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from service.escrow.models import Job
from service.ledger.models import LedgerPosting
from service.lightning import webhook
from service.nostr import nip98
from service.nostr.nip01 import SecretKey, sign_event
from service.payouts.models import Payout
from tests.conftest import Regtest
from tests.e2e.market import Market

pytestmark = [pytest.mark.lnd, pytest.mark.relay]
SECRET = "hostile-webhook-secret"
KEY = SecretKey(hashlib.sha256(b"hostile").digest())


def mutations(rnd: random.Random) -> list[tuple[str, dict | bytes]]:
    """Handcrafted malformed and forged events."""
    good = sign_event(KEY, 5701, [["bid", "1000"]], "x").to_dict()
    out: list[tuple[str, dict | bytes]] = []
    for field in good:
        out.append(("missing " + field, {k: v for k, v in good.items() if k != field}))
    for field, bad in [
        ("id", "00" * 32),
        ("id", "XYZ"),
        ("id", good["id"].upper()),
        ("pubkey", "11" * 32),
        ("pubkey", "zz"),
        ("sig", "00" * 64),
        ("sig", good["sig"][:-2]),
        ("kind", -1),
        ("kind", 70000),
        ("kind", "5701"),
        ("kind", True),
        ("created_at", -5),
        ("created_at", 2**64),
        ("created_at", 1.5),
        ("created_at", int(time.time()) + 10**6),
        ("tags", "no"),
        ("tags", [["ok"], "no"]),
        ("tags", [[]]),
        ("tags", [[1, 2]]),
        ("tags", [["t"] * 100]),
        ("tags", [["t", "x"]] * 3000),
        ("content", 5),
        ("content", "x" * 70_000),
        ("content", "\ud800"),
    ]:
        out.append((f"{field}={str(bad)[:20]}", {**good, field: bad}))
    out.append(("extra field", {**good, "extra": 1}))
    out.append(("not an object", [1, 2, 3]))  # type: ignore[list-item]
    out.append(("null", None))  # type: ignore[arg-type]
    out.append(("deep nesting", {"a": json.loads("[" * 50 + "]" * 50)}))
    for _ in range(100):  # random single-character corruption of a valid event
        ev = dict(good)
        field = rnd.choice(["id", "sig", "pubkey", "content"])
        s = ev[field]
        i = rnd.randrange(len(s)) if s else 0
        ev[field] = s[:i] + rnd.choice("0123456789abcdef") + s[i + 1 :] if s else "x"
        if ev != good:
            out.append((f"corrupt {field}", ev))
    return out


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12,
)


@pytest.fixture
async def market(regtest: Regtest, relay_url: str, database_url: str):
    m = Market(
        regtest,
        relay_url,
        database_url,
        webhook_secret=SECRET,
        admin_token="hostile-admin-token-0123456789-abcdef",
        events_per_minute=10**6,
        events_burst=10**6,
        invoices_per_minute=10**6,
        invoices_burst=10**6,
    )
    async with m.running():
        yield m


async def _counts(market: Market) -> tuple[int, int, int]:
    async with market.sessions() as s:
        return (
            int(await s.scalar(select(func.count()).select_from(LedgerPosting))),
            int(await s.scalar(select(func.count()).select_from(Job))),
            int(await s.scalar(select(func.count()).select_from(Payout))),
        )


async def test_hostile_corpus_is_refused_without_effects(market: Market) -> None:
    rnd = random.Random(7)
    before = await _counts(market)
    tally: dict[str, int] = {}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=market.app), base_url="http://t") as c:

        async def expect_refusal(label: str, resp: httpx.Response) -> None:
            assert 400 <= resp.status_code < 500, (label, resp.status_code, resp.text[:300])
            body = resp.json()
            assert body.get("code") and body.get("detail"), (label, body)
            tally[body["code"]] = tally.get(body["code"], 0) + 1

        # 1. malformed and forged events
        H = {"content-type": "application/json"}
        for label, ev in mutations(rnd):  # json.dumps escapes a lone surrogate as \ud800, as a client may
            await expect_refusal(label, await c.post("/v1/events", content=json.dumps(ev).encode(), headers=H))
        # 2. generated garbage bodies
        for _ in range(300):
            value = _random_json(rnd)
            await expect_refusal("generated", await c.post("/v1/events", content=json.dumps(value).encode(), headers=H))
        # 3. raw HTTP garbage
        for body in (b"", b"{", b"\xff\xfe", b"[" * 10_000, b'{"id": ' + b"9" * 5000 + b"}"):
            await expect_refusal(
                "raw", await c.post("/v1/events", content=body, headers={"content-type": "application/json"})
            )
        for path in (
            "/v1/jobs/" + "g" * 64,
            "/v1/invoices/12",
            "/v1/jobs/../../etc/passwd",
            "/%00",
            "/v1/admin/jobs",
            "/blobs/" + "0" * 63,
            "/blobs/" + "0" * 64,
        ):
            await expect_refusal(path, await c.get(path))
        # 4. webhooks: forged, stale, replayed, malformed
        for i in range(80):
            body = json.dumps({"payment_hash": hashlib.sha256(str(i).encode()).hexdigest()}).encode()
            ts = int(time.time()) - (0 if i % 3 else 10_000)
            sig = webhook.sign(b"not the secret", ts, body) if i % 2 else webhook.sign(SECRET.encode(), ts, body)
            resp = await c.post(
                "/v1/webhooks/lnd", content=body, headers={"X-Fedstr-Timestamp": str(ts), "X-Fedstr-Signature": sig}
            )
            if resp.status_code == 202:  # a correct hint for an invoice that is not ours: a lookup, nothing else
                assert resp.json()["fact"] is None
                tally["hint_without_fact"] = tally.get("hint_without_fact", 0) + 1
            else:
                await expect_refusal("webhook", resp)
        # 5. payee invoices with forged NIP-98 and bad invoices
        job_id = "ab" * 32
        path = f"/v1/jobs/{job_id}/payout-invoice"
        for i in range(80):
            bolt11 = rnd.choice(["lnbcrt1" + "q" * 80, "lnbc1" + "p" * 60, "x", "lightning:lnbcrt1qqq", "ln" * 40])
            body = json.dumps({"bolt11": bolt11}).encode()
            other = SecretKey.generate()
            ev = sign_event(
                other,
                rnd.choice([27235, 1]),
                [["u", "http://t" + path if i % 2 else "http://evil"], ["method", rnd.choice(["POST", "GET"])]],
                "",
            )
            raw = nip98.build_header(ev)
            header = raw if i % 4 else "Nostr " + base64.b64encode(b"garbage").decode()
            await expect_refusal(
                "payee invoice",
                await c.post(path, content=body, headers={"Authorization": header, "content-type": "application/json"}),
            )
    assert sum(tally.values()) >= 500, tally
    assert await _counts(market) == before, "no posting, job or payout came from hostile input"
    assert market.app.state.escrow.loop.running, "the engine and effect tasks survived every input"


def _random_json(rnd: random.Random, depth: int = 0):
    kind = rnd.randrange(7 if depth < 3 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rnd.random() < 0.5
    if kind == 2:
        return rnd.randrange(-(10**20), 10**20)
    if kind == 3:
        return "".join(chr(rnd.randrange(0x20, 0x2FFF)) for _ in range(rnd.randrange(20)))
    if kind == 4:
        return rnd.random() * 1e30
    if kind == 5:
        return [_random_json(rnd, depth + 1) for _ in range(rnd.randrange(4))]
    return {str(rnd.randrange(100)): _random_json(rnd, depth + 1) for _ in range(rnd.randrange(4))}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.dictionaries(
        st.sampled_from(["id", "pubkey", "created_at", "kind", "tags", "content", "sig", "x"]), json_values, max_size=8
    )
)
def test_generated_event_shapes_never_verify(ev) -> None:
    """The verifier refuses every generated near-event with an EventError, never another exception."""
    from service.nostr.nip01 import EventError, verify_event

    with pytest.raises(EventError):
        verify_event(ev, now=int(time.time()))
