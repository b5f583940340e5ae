"""A relay that refuses the escrow's events is not healthy: readiness, the admin overview, the
dashboard and the metrics say so, with the relay's own words.

The relay is a real nostr-relay with NIP-42 authentication that lets everyone read but only the
role ``w`` write; the escrow's key has no role, so every event it publishes (its announcement
first) is answered ``OK false "restricted: permission denied"``. The service runs in-process
against the regtest escrow node.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from fastapi import FastAPI

from service.app import create_app
from service.config import Settings
from service.nostr.nip01 import SecretKey
from tests.conftest import Regtest, wait_until

pytestmark = [pytest.mark.lnd, pytest.mark.relay]
ADMIN = "admin-token-0123456789-abcdefghijklmnop"
H = {"Authorization": f"Bearer {ADMIN}"}


@asynccontextmanager
async def running(regtest: Regtest, database_url: str, relays: list[str]) -> AsyncIterator[httpx.AsyncClient]:
    node = regtest.node("escrow")
    app: FastAPI = create_app(
        Settings(
            _env_file=None,
            database_url=database_url,
            lnd_grpc_host=node["rpc"],
            lnd_tls_cert_path=node["tls_cert"],
            lnd_macaroon_path=node["macaroon"],
            relays=relays,
            nostr_secret_key=SecretKey.generate().to_hex(),
            admin_token=ADMIN,
        )
    )
    async with app.router.lifespan_context(app):
        await wait_until(lambda: all(r["connected"] for r in app.state.nostr.pool.status()), 15, "relays connected")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            yield c


async def _refusing(c: httpx.AsyncClient, url: str) -> dict | None:
    r = await c.get("/v1/admin/overview", headers=H)
    relay = next(x for x in r.json()["relays"] if x["url"] == url)
    return relay if relay["accepting"] is False else None


async def test_a_relay_refusing_our_writes_is_reported_as_refusing(
    regtest: Regtest, relay_factory, database_url: str
) -> None:
    refusing = relay_factory(auth_roles={"save": "w"})
    async with running(regtest, database_url, [refusing.url]) as c:
        relay = await wait_until(lambda: _refusing(c, refusing.url), 30, "the announcement refused")
        assert relay["connected"] and relay["last_refusal"].startswith("restricted:"), relay
        ready = await c.get("/v1/health/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "not_ready"
        [check] = ready.json()["checks"]["relays"]
        assert not check["ok"] and "restricted: permission denied" in check["detail"], check
        metrics = (await c.get("/metrics", headers=H)).text
        assert f'fedstr_relay_accepting{{relay="{refusing.url}"}} 0.0' in metrics, metrics
        assert f'fedstr_relay_up{{relay="{refusing.url}"}} 1.0' in metrics
        login = await c.post("/admin/login", data={"token": ADMIN})
        assert login.status_code == 303
        page = (await c.get("/admin")).text
        assert 'id="relays"' in page and "refusing" in page and "restricted: permission denied" in page


async def test_ready_while_another_relay_accepts(
    regtest: Regtest, relay_factory, relay_url: str, database_url: str
) -> None:
    refusing = relay_factory(auth_roles={"save": "w"})
    async with running(regtest, database_url, [refusing.url, relay_url]) as c:
        await wait_until(lambda: _refusing(c, refusing.url), 30, "the announcement refused")
        ready = await wait_until(lambda: _ready(c), 30, "ready through the accepting relay")
        checks = {x["url"]: x for x in ready["checks"]["relays"]}
        assert not checks[refusing.url]["ok"] and checks[relay_url]["ok"], checks
        ov = (await c.get("/v1/admin/overview", headers=H)).json()
        good = next(x for x in ov["relays"] if x["url"] == relay_url)
        assert good["accepting"] is True and good["last_refusal"] is None, good


async def _ready(c: httpx.AsyncClient) -> dict | None:
    r = await c.get("/v1/health/ready")
    return r.json() if r.status_code == 200 else None
