"""POST /v1/webhooks/lnd: authenticated hints that only trigger a lookup."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from service.app import create_app
from service.config import Settings
from service.lightning import webhook
from service.lightning.client import PaymentStatus
from service.lightning.models import LnInvoice
from tests.conftest import Regtest

pytestmark = pytest.mark.lnd
SECRET = "webhook-secret-for-tests"


def _app(regtest: Regtest, database_url: str, **over):
    node = regtest.node("escrow")
    return create_app(
        Settings(
            _env_file=None,
            database_url=database_url,
            lnd_grpc_host=node["rpc"],
            lnd_tls_cert_path=node["tls_cert"],
            lnd_macaroon_path=node["macaroon"],
            **({"webhook_secret": SECRET} | over),
        )
    )


def _headers(body: bytes, secret: str = SECRET, ts: int | None = None) -> dict[str, str]:
    ts = ts or int(time.time())
    return {
        "X-Fedstr-Timestamp": str(ts),
        "X-Fedstr-Signature": webhook.sign(secret.encode(), ts, body),
        "Content-Type": "application/json",
    }


async def test_webhook_route(regtest: Regtest, database_url: str) -> None:
    app = _app(regtest, database_url)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            lightning = app.state.lightning
            async with app.state.sessions.begin() as s:
                inv: LnInvoice = await lightning.invoices.create(s, job_id="wh", amount_msat=9_000, mode="custodial")
            body = json.dumps({"payment_hash": inv.payment_hash, "state": "SETTLED"}).encode()

            signed = _headers(body)  # the very same request twice (new headers a second later would differ)
            r = await c.post("/v1/webhooks/lnd", content=body, headers=signed)
            assert r.status_code == 202 and r.json()["fact"] is None and r.json()["lnd_state"] == "OPEN"

            r = await c.post("/v1/webhooks/lnd", content=body, headers=signed)
            assert r.status_code == 401 and r.json()["code"] == "replayed"
            r = await c.post("/v1/webhooks/lnd", content=body, headers=_headers(body, secret="wrong"))
            assert r.status_code == 401 and r.json()["code"] == "bad_signature"
            r = await c.post("/v1/webhooks/lnd", content=b"{}", headers={"X-Fedstr-Timestamp": "1"})
            assert r.status_code == 401 and r.json()["code"] == "missing_headers"
            assert app.state.webhooks_refused["bad_signature"] >= 1

            await lightning.watcher.stop()  # only the webhook may tell us now
            assert (await regtest.customer_pays(inv.payment_request)).status == PaymentStatus.SUCCEEDED
            r = await c.post("/v1/webhooks/lnd", content=body, headers=_headers(body, ts=int(time.time()) + 1))
            assert r.status_code == 202 and r.json()["fact"] == "settled"


async def test_webhook_without_secret_is_refused(regtest: Regtest, database_url: str) -> None:
    app = _app(regtest, database_url, webhook_secret=None)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            body = b'{"payment_hash":"' + b"0" * 64 + b'"}'
            r = await c.post("/v1/webhooks/lnd", content=body, headers=_headers(body))
            assert r.status_code == 503 and r.json()["code"] == "webhook_not_configured"
