"""``GET /v1/jobs/{id}/keys``: a sealed result's key for its customer, once released (protocol.md §5a).

The service runs with its lifespan on a real SQLite database; the job's results are rows as the
engine writes them (tests/unit/test_engine_sealed.py drives the engine to these rows). What a
customer relies on: it, and only it (NIP-98 with its key), reads the keys released to it; a key
the escrow has not released (its provider not paid, or the result rejected) is never served.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import httpx
import pytest
from fastapi import FastAPI

from service.app import create_app
from service.config import Settings
from service.escrow.models import Job, Result
from service.nostr import nip98
from service.nostr.nip01 import SecretKey, sign_event
from service.nostr.nip19 import encode_npub
from service.nostr.protocol.sealing import key_sha256, unwrap_key, wrap_key

BASE = "http://api.test"
ESCROW = SecretKey.generate()
CUSTOMER = SecretKey.generate()
KEY = os.urandom(32)
JOB = "ab" * 32
POOL = [("alice", SecretKey.generate().public_key_hex), ("bob", SecretKey.generate().public_key_hex)]


@pytest.fixture
async def app(database_url: str) -> AsyncIterator[FastAPI]:
    application = create_app(
        Settings(
            _env_file=None,
            database_url=database_url,
            public_url=BASE,
            nostr_secret_key=ESCROW.to_hex(),
            validator_pool=f"{POOL[0][0]}={POOL[0][1]},{POOL[1][0]}={encode_npub(POOL[1][1])}",
        )
    )
    async with application.router.lifespan_context(application):
        yield application


def auth(key: SecretKey, path: str, method: str = "GET") -> dict[str, str]:
    ev = sign_event(key, nip98.KIND_HTTP_AUTH, [["u", BASE + path], ["method", method]], os.urandom(4).hex())
    return {"Authorization": nip98.build_header(ev)}


def _result(rid: str, *, sealed: bool, released: bool) -> Result:
    payload = wrap_key(ESCROW, CUSTOMER.public_key_hex, KEY).payload if sealed else None
    return Result(
        id=rid,
        job_id=JOB,
        provider=rid[::-1],
        shard_index=0,
        model_url=f"https://b.example/{rid[:8]}",
        model_sha256=hashlib.sha256(rid.encode()).hexdigest(),
        ciphertext_sha256=("cc" * 32) if sealed else None,
        key_sha256=key_sha256(KEY) if sealed else None,
        customer_key=payload,
        key_released_at=datetime.now(UTC) if released else None,
        created_at=0,
    )


async def _job(app: FastAPI) -> None:
    async with app.state.sessions.begin() as s:
        s.add(Job(id=JOB, customer=CUSTOMER.public_key_hex, state="releasing", request_raw="{}"))
        s.add(_result("11" * 32, sealed=True, released=True))  # paid: released
        s.add(_result("21" * 32, sealed=True, released=False))  # e.g. rejected, or not paid yet
        s.add(_result("31" * 32, sealed=False, released=False))  # a plain result: nothing to release


async def test_the_customer_reads_only_the_released_keys(app: FastAPI) -> None:
    await _job(app)
    path = f"/v1/jobs/{JOB}/keys"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as c:
        r = await c.get(path, headers=auth(CUSTOMER, path))
        assert r.status_code == 200, r.text
        [key] = r.json()
        assert key["result_id"] == "11" * 32 and key["key_sha256"] == key_sha256(KEY)
        assert set(key) == {
            "result_id",
            "provider",
            "model_sha256",
            "ciphertext_url",
            "ciphertext_sha256",
            "key_sha256",
            "payload",
        }
        assert unwrap_key(CUSTOMER, ESCROW.public_key_hex, key["payload"], key_sha256(KEY)) == KEY
        # the public job view never carries a customer key
        job = await c.get(f"/v1/jobs/{JOB}")
        assert job.status_code == 200 and key["payload"] not in job.text


async def test_without_or_with_a_bad_authorization_it_is_401(app: FastAPI) -> None:
    await _job(app)
    path = f"/v1/jobs/{JOB}/keys"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as c:
        r = await c.get(path)
        assert r.status_code == 401 and r.json()["code"] == "missing_authorization", r.text
        r = await c.get(path, headers=auth(CUSTOMER, f"/v1/jobs/{'cd' * 32}/keys"))  # signed for another URL
        assert r.status_code == 401 and r.json()["code"] == "url_mismatch", r.text
        r = await c.get(path, headers=auth(CUSTOMER, path, method="POST"))
        assert r.status_code == 401 and r.json()["code"] == "method_mismatch", r.text
        headers = auth(CUSTOMER, path)
        assert (await c.get(path, headers=headers)).status_code == 200
        r = await c.get(path, headers=headers)  # a replay
        assert r.status_code == 401 and r.json()["code"] == "replayed", r.text


async def test_any_other_key_is_403_and_an_unknown_job_404(app: FastAPI) -> None:
    await _job(app)
    path = f"/v1/jobs/{JOB}/keys"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as c:
        for other in (SecretKey.generate(), ESCROW):
            r = await c.get(path, headers=auth(other, path))
            assert r.status_code == 403 and r.json()["code"] == "not_the_customer", r.text
        unknown = f"/v1/jobs/{'cd' * 32}/keys"
        r = await c.get(unknown, headers=auth(CUSTOMER, unknown))
        assert r.status_code == 404 and r.json()["code"] == "job_not_found", r.text


async def test_info_shows_the_validator_pool(app: FastAPI) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as c:
        r = await c.get("/v1/info")
    assert r.status_code == 200
    assert r.json()["validator_pool"] == [{"pubkey": k, "name": n} for n, k in POOL]
