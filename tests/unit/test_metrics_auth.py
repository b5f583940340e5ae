"""/metrics shows escrow totals only to a scraper with a token (FEDSTR_METRICS_TOKEN, or the
admin token); without a configured token it answers 404, never the totals.

The service runs with its lifespan on a real SQLite database (no LND or relay).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from pydantic import ValidationError

from service.app import create_app
from service.config import Settings
from service.nostr.nip01 import SecretKey

ADMIN = "admin-token-0123456789-abcdefghijklmnop"
METRICS = "metrics-token-0123456789-abcdefghijklm"
TOTAL = "fedstr_escrow_msat"


@asynccontextmanager
async def running(database_url: str, **over: object) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(
        Settings(_env_file=None, database_url=database_url, nostr_secret_key=SecretKey.generate().to_hex(), **over)
    )
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        yield c


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_without_a_token_configured_metrics_are_not_served(database_url: str) -> None:
    async with running(database_url) as c:
        r = await c.get("/metrics")
        assert r.status_code == 404 and r.json()["code"] == "metrics_disabled"
        assert TOTAL not in r.text
        r = await c.get("/metrics", headers=bearer("Bearer "))
        assert r.status_code == 404 and TOTAL not in r.text


async def test_the_metrics_token_or_the_admin_token_is_required(database_url: str) -> None:
    async with running(database_url, admin_token=ADMIN, metrics_token=METRICS) as c:
        for headers in ({}, bearer("wrong"), {"Authorization": "Bearer "}, {"Authorization": METRICS}):
            r = await c.get("/metrics", headers=headers)
            assert r.status_code == 401 and r.json()["code"] == "unauthorized" and TOTAL not in r.text, headers
            assert r.headers["www-authenticate"] == "Bearer"
        for token in (METRICS, ADMIN):
            r = await c.get("/metrics", headers=bearer(token))
            assert r.status_code == 200 and f"{TOTAL} 0" in r.text
            assert r.headers["content-type"].startswith("text/plain")


async def test_the_admin_token_alone_protects_metrics(database_url: str) -> None:
    async with running(database_url, admin_token=ADMIN) as c:
        assert (await c.get("/metrics")).status_code == 401
        assert (await c.get("/metrics", headers=bearer(ADMIN))).status_code == 200


def test_a_short_metrics_token_is_refused() -> None:
    with pytest.raises(ValidationError) as exc:
        Settings(_env_file=None, metrics_token="prometheus")
    assert "metrics_token" in str(exc.value) and "at least 32" in str(exc.value)
