"""A NIP-98 authorization is spent as soon as it is checked, even when the request is refused.

The attack: a payee-invoice request refused with 409 (the payout is not waiting for an invoice)
or 404 (nothing owed yet) is replayed once the payout waits; it must be refused as a replay.
The service runs with its lifespan on a real SQLite database (no LND: nothing is paid here);
the payout's states are written as the payout worker writes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import update

from service.app import create_app
from service.config import Settings
from service.escrow.models import Job
from service.nostr import nip98
from service.nostr.nip01 import SecretKey, sign_event
from service.nostr.protocol.examples import regtest_invoice
from service.payouts import DestinationKind, PayoutKind
from service.payouts.models import Payout

BASE = "http://api.test"


def bolt11_now() -> str:
    """A real, signed regtest invoice for the payout (the route checks it before accepting it),
    dated now: it expires in 600 s, so it is made when a test runs, not when the module is imported."""
    return regtest_invoice("payee", 5_000_000, "a1" * 32, "reward", int(time.time()))


@pytest.fixture
async def app(database_url: str, tmp_path) -> AsyncIterator[FastAPI]:
    application = create_app(
        Settings(
            _env_file=None, database_url=database_url, public_url=BASE, nostr_secret_key=SecretKey.generate().to_hex()
        )
    )
    async with application.router.lifespan_context(application):
        yield application


def auth(key: SecretKey, path: str, body: bytes) -> dict[str, str]:
    ev = sign_event(
        key,
        nip98.KIND_HTTP_AUTH,
        [["u", BASE + path], ["method", "POST"], ["payload", hashlib.sha256(body).hexdigest()]],
        os.urandom(4).hex(),
    )
    return {"Authorization": nip98.build_header(ev), "content-type": "application/json"}


async def _job_with_payout(app: FastAPI, payee: str, job_id: str, state: str | None) -> None:
    async with app.state.sessions.begin() as s:
        s.add(Job(id=job_id, customer="cd" * 32, state="releasing", request_raw="{}"))
        if state is not None:
            s.add(
                Payout(
                    id=f"{job_id}:reward:x",
                    kind=PayoutKind.REWARD,
                    job_id=job_id,
                    payee=payee,
                    amount_msat=5_000_000,
                    destination_kind=DestinationKind.NONE,
                    destination="",
                    state=state,
                )
            )


async def _set(app: FastAPI, job_id: str, **values: object) -> None:
    async with app.state.sessions.begin() as s:
        await s.execute(update(Payout).where(Payout.job_id == job_id).values(**values))


async def test_a_request_refused_with_409_cannot_be_replayed_later(app: FastAPI) -> None:
    payee = SecretKey.generate()
    job_id = "ab" * 32
    await _job_with_payout(app, payee.public_key_hex, job_id, "failed")
    path = f"/v1/jobs/{job_id}/payout-invoice"
    body = json.dumps({"bolt11": bolt11_now()}).encode()
    headers = auth(payee, path, body)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as c:
        r = await c.post(path, content=body, headers=headers)
        assert r.status_code == 409 and r.json()["code"] == "payout_not_waiting", r.text
        await _set(app, job_id, state="needs_invoice")  # the payout now waits for an invoice
        r = await c.post(path, content=body, headers=headers)
        assert r.status_code == 401 and r.json()["code"] == "replayed", r.text
        # The payee signs a new authorization and is served.
        r = await c.post(path, content=body, headers=auth(payee, path, body))
        assert r.status_code == 202 and r.json()["state"] == "pending", r.text


async def test_a_request_refused_with_404_cannot_be_replayed_later(app: FastAPI) -> None:
    payee = SecretKey.generate()
    job_id = "ef" * 32
    await _job_with_payout(app, payee.public_key_hex, job_id, None)
    path = f"/v1/jobs/{job_id}/payout-invoice"
    body = json.dumps({"bolt11": bolt11_now()}).encode()
    headers = auth(payee, path, body)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as c:
        r = await c.post(path, content=body, headers=headers)
        assert r.status_code == 404 and r.json()["code"] == "no_payout", r.text
        async with app.state.sessions.begin() as s:
            s.add(
                Payout(
                    id=f"{job_id}:reward:y",
                    kind=PayoutKind.REWARD,
                    job_id=job_id,
                    payee=payee.public_key_hex,
                    amount_msat=5_000_000,
                    destination_kind=DestinationKind.NONE,
                    destination="",
                    state="needs_invoice",
                )
            )
        r = await c.post(path, content=body, headers=headers)
        assert r.status_code == 401 and r.json()["code"] == "replayed", r.text
