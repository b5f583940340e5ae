"""Who may upload blobs, how much, and for how long (``service/api/blobs.py``).

By default only keys that take part in a job that is not final may upload: its customer, its
designated validators, its named providers (``p`` tags, private-shard recipients), and, for a
collecting job that admits any provider, any key whose authorization names the job
(``["e", <job id>]``). Quotas per key and for the whole store; a sweep (driven here with its
clock) deletes the blobs of jobs finished longer ago than the retention, and blobs no job
references after a short grace.

Jobs are rows of the real schema holding real signed job requests (built with the protocol
codec), on a migrated SQLite database; uploads go through the real routes over ASGI.
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select, update

from service.api import blobs, errors
from service.api.models import BlobObject, BlobUpload
from service.db import create_engine, session_factory, utcnow
from service.escrow.models import Job
from service.nostr.nip01 import SecretKey, sign_event
from service.nostr.protocol import (
    Direction,
    JobSpec,
    PayoutPolicy,
    Shard,
    Validation,
    build_job_request,
)

ESCROW = SecretKey.generate().public_key_hex
MAX = 4096


@pytest.fixture
async def sessions(database_url: str) -> AsyncIterator:
    engine = create_engine(database_url)
    try:
        yield session_factory(engine)
    finally:
        await engine.dispose()


def make_app(tmp_path: Path, sessions, **over: object) -> FastAPI:
    app = FastAPI()
    errors.install(app)
    app.include_router(blobs.router)
    values = {
        "blob_dir": str(tmp_path / "store"),
        "blob_max_bytes": MAX,
        "blob_uploads_per_minute": 6000.0,
        "blob_uploads_burst": 1000,
        "public_url": None,
    }
    values.update(over)
    app.state.settings = SimpleNamespace(**values)
    app.state.sessions = sessions
    return app


@pytest.fixture
def app(tmp_path: Path, sessions) -> FastAPI:
    return make_app(tmp_path, sessions)


def http(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


async def job(
    sessions,
    customer: SecretKey,
    *,
    state: str = "collecting",
    providers: tuple[str, ...] = (),
    private_to: str | None = None,
    validators: tuple[str, ...] = (),
) -> str:
    now = int(time.time())
    shards = (
        Shard.for_provider(customer, private_to, 0, "https://blobs.example/" + "0" * 64)
        if private_to
        else Shard(index=0, url="https://blobs.example/" + "1" * 64),
    )
    spec = JobSpec(
        escrow=ESCROW,
        bid_msat=1_000_000,
        shards=shards,
        validation=Validation("accuracy", Direction.MAX, Decimal("0.8"), max(1, len(validators))),
        payout=PayoutPolicy("best"),
        results_deadline=now + 600,
        validation_deadline=now + 1200,
        validators=validators,
        providers=providers,
    )
    ev = sign_event(customer, *build_job_request(spec, customer=customer.public_key_hex, content=os.urandom(4).hex()))
    async with sessions.begin() as s:
        s.add(Job(id=ev.id, customer=customer.public_key_hex, state=state, request_raw=ev.to_json()))
    return ev.id


async def finish(sessions, job_id: str, state: str = "closed") -> None:
    async with sessions.begin() as s:
        await s.execute(update(Job).where(Job.id == job_id).values(state=state, updated_at=utcnow()))


def auth(key: SecretKey, body: bytes, job_id: str | None = None) -> str:
    tags = [["t", "upload"], ["x", hashlib.sha256(body).hexdigest()], ["expiration", str(int(time.time()) + 300)]]
    if job_id is not None:
        tags.append(["e", job_id])
    ev = sign_event(key, 24242, tags, f"Upload {os.urandom(4).hex()}")
    return "Nostr " + base64.b64encode(ev.to_json().encode()).decode()


async def put(c: httpx.AsyncClient, key: SecretKey, body: bytes, job_id: str | None = None) -> httpx.Response:
    return await c.put(
        "/blobs/upload",
        content=body,
        headers={"Authorization": auth(key, body, job_id), "Content-Type": "application/octet-stream"},
    )


def refused(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["code"] == code, r.text
    assert r.headers["x-reason"]


# ---- who may upload -------------------------------------------------------------------------


async def test_a_key_in_no_job_is_refused(app: FastAPI, sessions) -> None:
    await job(sessions, SecretKey.generate())
    stranger = SecretKey.generate()
    async with http(app) as c:
        refused(await put(c, stranger, b"junk"), 403, "not_a_participant")
    assert os.listdir(Path(app.state.settings.blob_dir)) == []


async def test_participants_of_open_jobs_may_upload(app: FastAPI, sessions) -> None:
    customer, named, private, validator = (SecretKey.generate() for _ in range(4))
    j = await job(
        sessions, customer, state="offered", providers=(named.public_key_hex,), validators=(validator.public_key_hex,)
    )
    j2 = await job(sessions, SecretKey.generate(), private_to=private.public_key_hex)
    async with http(app) as c:
        for who, body, named_job in (
            (customer, b"shard", j),
            (named, b"model-1", None),
            (validator, b"notes", j),
            (private, b"model-2", j2),
        ):
            r = await put(c, who, body, named_job)
            assert r.status_code == 200, (r.text, body)
        refused(await put(c, named, b"model-3", j2), 403, "not_a_participant")  # not this job's provider
    async with sessions() as s:
        rows = {(u.uploader, u.job_id) for u in (await s.scalars(select(BlobUpload))).all()}
    assert rows == {
        (customer.public_key_hex, j),
        (named.public_key_hex, j),
        (validator.public_key_hex, j),
        (private.public_key_hex, j2),
    }, "each upload recorded with its uploader and job"


async def test_an_open_job_admits_any_key_that_names_it_while_collecting(app: FastAPI, sessions) -> None:
    open_job = await job(sessions, SecretKey.generate())  # no p tags, a plain shard
    offered = await job(sessions, SecretKey.generate(), state="offered")
    named_only = await job(sessions, SecretKey.generate(), providers=(SecretKey.generate().public_key_hex,))
    anyone = SecretKey.generate()
    async with http(app) as c:
        assert (await put(c, anyone, b"my model", open_job)).status_code == 200
        refused(await put(c, anyone, b"early", offered), 403, "not_a_participant")
        refused(await put(c, anyone, b"not named", named_only), 403, "not_a_participant")
        refused(await put(c, anyone, b"no job named"), 403, "not_a_participant")
        refused(await put(c, anyone, b"bad id", "zz"), 400, "invalid_job_id")


async def test_final_and_unknown_jobs_admit_nobody(app: FastAPI, sessions) -> None:
    customer = SecretKey.generate()
    j = await job(sessions, customer)
    await finish(sessions, j)
    async with http(app) as c:
        refused(await put(c, customer, b"late", j), 403, "job_not_open")
        refused(await put(c, customer, b"late, no job named"), 403, "not_a_participant")
        refused(await put(c, customer, b"unknown", "ab" * 32), 403, "job_not_open")


async def test_the_allow_list_replaces_the_participant_rule(tmp_path: Path, sessions) -> None:
    listed, customer = SecretKey.generate(), SecretKey.generate()
    await job(sessions, customer)
    app = make_app(tmp_path, sessions, blob_allowed_pubkeys=[listed.public_key_hex])
    async with http(app) as c:
        assert (await put(c, listed, b"operator blob")).status_code == 200
        refused(await put(c, customer, b"participant, not listed"), 403, "pubkey_not_allowed")


# ---- quotas ----------------------------------------------------------------------------------


async def test_per_key_byte_and_count_quotas(tmp_path: Path, sessions) -> None:
    customer = SecretKey.generate()
    j = await job(sessions, customer)
    app = make_app(tmp_path, sessions, blob_key_quota_bytes=5000, blob_key_quota_count=3)
    async with http(app) as c:
        first = os.urandom(3000)
        assert (await put(c, customer, first, j)).status_code == 200
        assert (await put(c, customer, first, j)).status_code == 200, "the same blob again counts once"
        refused(await put(c, customer, os.urandom(2500), j), 413, "key_quota_exceeded")
        assert (await put(c, customer, b"a", j)).status_code == 200
        assert (await put(c, customer, b"b", j)).status_code == 200
        refused(await put(c, customer, b"c", j), 413, "key_quota_exceeded")  # a fourth blob
        other = SecretKey.generate()
        j2 = await job(sessions, other)
        assert (await put(c, other, os.urandom(3000), j2)).status_code == 200, "quotas are per key"
        await finish(sessions, j)
        j3 = await job(sessions, customer)
        assert (await put(c, customer, os.urandom(3000), j3)).status_code == 200, (
            "blobs of finished jobs no longer count against the key"
        )


async def test_the_store_has_a_total_size(tmp_path: Path, sessions) -> None:
    a, b = SecretKey.generate(), SecretKey.generate()
    ja, jb = await job(sessions, a), await job(sessions, b)
    app = make_app(tmp_path, sessions, blob_store_quota_bytes=5000)
    async with http(app) as c:
        blob = os.urandom(3000)
        assert (await put(c, a, blob, ja)).status_code == 200
        refused(await put(c, b, os.urandom(3000), jb), 413, "store_full")
        assert (await put(c, b, blob, jb)).status_code == 200, "a stored blob takes no new space"
        h = await c.head("/blobs/upload", headers={"X-Content-Length": "3000"})
        assert h.status_code == 413


# ---- expiry ---------------------------------------------------------------------------------


async def test_the_sweep_deletes_expired_blobs_and_keeps_live_ones(tmp_path: Path, sessions) -> None:
    customer, listed = SecretKey.generate(), SecretKey.generate()
    live, done, both = [await job(sessions, customer) for _ in range(3)]
    app = make_app(
        tmp_path,
        sessions,
        blob_allowed_pubkeys=[customer.public_key_hex, listed.public_key_hex],
        blob_retention_seconds=7 * 86_400,
        blob_unreferenced_grace_seconds=3600,
        blob_sweep_batch=100,
    )
    bodies = {name: f"{name} blob".encode() for name in ("live", "done", "shared", "loose")}
    async with http(app) as c:
        assert (await put(c, customer, bodies["live"], live)).status_code == 200
        assert (await put(c, customer, bodies["done"], done)).status_code == 200
        assert (await put(c, customer, bodies["shared"], done)).status_code == 200
        assert (await put(c, customer, bodies["shared"], both)).status_code == 200
        assert (await put(c, listed, bodies["loose"])).status_code == 200  # names no job
    await finish(sessions, done)
    await finish(sessions, both, "refunded")
    svc = blobs.service_for(app)
    names = {name: hashlib.sha256(b).hexdigest() for name, b in bodies.items()}

    def stored() -> set[str]:
        return {n for n, h in names.items() if svc.store.stat(h) is not None}

    now = utcnow()
    assert await blobs.sweep(svc, sessions, now=now) == 0
    assert stored() == set(names), "nothing expires at once"
    assert await blobs.sweep(svc, sessions, now=now + timedelta(hours=2)) == 1
    assert stored() == {"live", "done", "shared"}, "an unreferenced blob goes after the grace"
    assert await blobs.sweep(svc, sessions, now=now + timedelta(days=8)) == 2
    assert stored() == {"live"}, "blobs whose every job is final go after the retention"
    async with sessions() as s:
        left = set((await s.scalars(select(BlobObject.sha256))).all())
    assert left == {names["live"]}
    async with http(app) as c:
        assert (await c.get(f"/blobs/{names['done']}")).status_code == 404
        assert (await c.get(f"/blobs/{names['live']}")).status_code == 200


async def test_the_sweep_is_bounded_per_pass(tmp_path: Path, sessions) -> None:
    listed = SecretKey.generate()
    app = make_app(tmp_path, sessions, blob_allowed_pubkeys=[listed.public_key_hex], blob_sweep_batch=2)
    async with http(app) as c:
        for i in range(5):
            assert (await put(c, listed, f"loose {i}".encode())).status_code == 200
    svc = blobs.service_for(app)
    later = utcnow() + timedelta(days=1)
    assert [await blobs.sweep(svc, sessions, now=later) for _ in range(4)] == [2, 2, 1, 0]


async def test_files_without_a_record_go_after_the_retention(tmp_path: Path, sessions) -> None:
    """A store from before the records: its files are kept for the retention, then removed."""
    app = make_app(tmp_path, sessions, blob_retention_seconds=7 * 86_400)
    svc = blobs.service_for(app)
    old, recent = (hashlib.sha256(name).hexdigest() for name in (b"old", b"recent"))
    for name, age in ((old, 8 * 86_400), (recent, 86_400)):
        path = svc.store.directory / name
        path.write_bytes(b"legacy")
        os.utime(path, (time.time() - age,) * 2)
    assert await blobs.sweep(svc, sessions) == 1
    assert svc.store.stat(old) is None and svc.store.stat(recent) is not None


async def test_the_leader_runs_the_sweep(tmp_path: Path, database_url: str) -> None:
    """The service's lifespan (SQLite: always the leader) sweeps the store periodically."""
    from service.app import create_app
    from service.config import Settings
    from tests.conftest import wait_until

    store = tmp_path / "store"
    store.mkdir()
    orphan = store / hashlib.sha256(b"orphan").hexdigest()
    orphan.write_bytes(b"orphan")
    os.utime(orphan, (time.time() - 30 * 86_400,) * 2)
    app = create_app(
        Settings(
            _env_file=None,
            database_url=database_url,
            blob_dir=store,
            nostr_secret_key=SecretKey.generate().to_hex(),
            blob_sweep_interval_seconds=0.05,
        )
    )
    async with app.router.lifespan_context(app):
        await wait_until(lambda: not orphan.exists(), 10, "the orphan swept")
        assert app.state.blob_sweeper is not None and not app.state.blob_sweeper.done()
    assert app.state.blob_sweeper is None, "stopped with the leadership"


PG_CASES = {
    "participants": lambda tmp, sessions: test_participants_of_open_jobs_may_upload(make_app(tmp, sessions), sessions),
    "final_jobs": lambda tmp, sessions: test_final_and_unknown_jobs_admit_nobody(make_app(tmp, sessions), sessions),
    "key_quotas": test_per_key_byte_and_count_quotas,
    "store_quota": test_the_store_has_a_total_size,
    "sweep": test_the_sweep_deletes_expired_blobs_and_keeps_live_ones,
}


@pytest.mark.postgres
@pytest.mark.parametrize("case", list(PG_CASES))
async def test_on_postgres(case: str, tmp_path: Path, sessions) -> None:
    """The same rules on PostgreSQL (each case on a fresh database)."""
    await PG_CASES[case](tmp_path, sessions)


async def test_uploading_again_restarts_the_grace(tmp_path: Path, sessions) -> None:
    listed = SecretKey.generate()
    app = make_app(tmp_path, sessions, blob_allowed_pubkeys=[listed.public_key_hex])
    async with http(app) as c:
        assert (await put(c, listed, b"kept by a re-upload")).status_code == 200
    async with sessions.begin() as s:  # as if uploaded two hours ago
        await s.execute(update(BlobUpload).values(uploaded_at=utcnow() - timedelta(hours=2)))
        await s.execute(update(BlobObject).values(stored_at=utcnow() - timedelta(hours=2)))
    async with http(app) as c:
        assert (await put(c, listed, b"kept by a re-upload")).status_code == 200
    svc = blobs.service_for(app)
    assert await blobs.sweep(svc, sessions) == 0, "the second upload protects it for another grace"
    assert await blobs.sweep(svc, sessions, now=utcnow() + timedelta(hours=2)) == 1
