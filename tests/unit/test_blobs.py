"""The Blossom-compatible blob store (/blobs): round trips, every refusal with its code,
streaming size limits, atomic writes, and the client's hash check (no LND needed).

Who may upload is tested in test_blob_policy.py; here every upload names (``["e", <id>]``)
one open job that admits any provider, in a migrated SQLite database of the test's own."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from service.api import blob_client, blobs, errors
from service.db import create_engine, session_factory
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

MAX = 4096
BASE = "http://testserver/blobs"


class _Db:
    sessions = None  # the test's database (set by the autouse fixture below)
    open_job = ""  # a collecting job open to any provider


@pytest.fixture(autouse=True)
async def _database(database_url: str) -> AsyncIterator[None]:
    from decimal import Decimal

    engine = create_engine(database_url)
    _Db.sessions = session_factory(engine)
    customer = SecretKey.generate()
    now = int(time.time())
    spec = JobSpec(
        escrow=SecretKey.generate().public_key_hex,
        bid_msat=1_000_000,
        shards=(Shard(index=0, url="https://data.example/" + "0" * 64),),
        validation=Validation("accuracy", Direction.MAX, Decimal("0.8"), 1),
        payout=PayoutPolicy("best"),
        results_deadline=now + 600,
        validation_deadline=now + 1200,
    )
    ev = sign_event(customer, *build_job_request(spec, customer=customer.public_key_hex))
    async with _Db.sessions.begin() as s:
        s.add(Job(id=ev.id, customer=customer.public_key_hex, state="collecting", request_raw=ev.to_json()))
    _Db.open_job = ev.id
    try:
        yield
    finally:
        await engine.dispose()


def settings(tmp_path: Path, **over) -> SimpleNamespace:
    values = {
        "blob_dir": str(tmp_path / "store"),
        "blob_max_bytes": MAX,
        "blob_uploads_per_minute": 6000.0,
        "blob_uploads_burst": 1000,
        "public_url": None,
    }
    values.update(over)
    return SimpleNamespace(**values)


def make_app(tmp_path: Path, **over) -> FastAPI:
    app = FastAPI()
    errors.install(app)
    app.include_router(blobs.router)
    app.state.settings = settings(tmp_path, **over)
    app.state.sessions = _Db.sessions
    return app


def http(app: FastAPI, client_addr: tuple[str, int] = ("127.0.0.1", 40000)) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=client_addr), base_url="http://testserver")


@pytest.fixture
def app(tmp_path: Path) -> FastAPI:
    return make_app(tmp_path)


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with http(app) as c:
        yield c


def store_dir(app: FastAPI) -> Path:
    return Path(app.state.settings.blob_dir)


def files(app: FastAPI) -> list[str]:
    d = store_dir(app)
    return sorted(os.listdir(d)) if d.exists() else []


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def event_dict(
    key: SecretKey,
    *,
    body: bytes = b"",
    kind: int = 24242,
    t: str | None = "upload",
    x: str | None = "auto",
    expiration: int | str | None = 300,
    created_at: int | None = None,
    extra: list | None = None,
    job: bool = True,
) -> dict:
    now = int(time.time())
    tags: list[list[str]] = []
    if t is not None:
        tags.append(["t", t])
    if x is not None:
        tags.append(["x", sha(body) if x == "auto" else x])
    if expiration is not None:
        tags.append(["expiration", str(now + expiration) if isinstance(expiration, int) else expiration])
    if job:
        tags.append(["e", _Db.open_job])
    tags += extra or []
    # A random word in the content: two authorizations signed in the same second differ.
    return sign_event(key, kind, tags, f"Upload blob {os.urandom(4).hex()}", created_at=created_at).to_dict()


def encode(obj: object) -> str:
    return "Nostr " + base64.b64encode(json.dumps(obj).encode()).decode()


def auth(key: SecretKey, **kw) -> str:
    return encode(event_dict(key, **kw))


async def put(client: httpx.AsyncClient, body, header: str | None, **headers) -> httpx.Response:
    h = {"Content-Type": "application/octet-stream", **headers}
    if header is not None:
        h["Authorization"] = header
    return await client.put("/blobs/upload", content=body, headers=h)


def assert_problem(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["code"] == code and body["status"] == status, body
    assert r.headers["x-reason"]  # Blossom clients read this
    assert r.headers["access-control-allow-origin"] == "*"


# ----------------------------------------------------------------------------- round trip


async def test_upload_then_get_and_head(app: FastAPI, client: httpx.AsyncClient) -> None:
    key = SecretKey.generate()
    data = os.urandom(3000)
    before = int(time.time())
    r = await put(client, data, auth(key, body=data))
    assert r.status_code == 200, r.text
    d = r.json()
    assert d == {
        "url": f"{BASE}/{sha(data)}",
        "sha256": sha(data),
        "size": len(data),
        "type": "application/octet-stream",
        "uploaded": d["uploaded"],
    }
    assert before - 1 <= d["uploaded"] <= int(time.time()) + 1
    assert files(app) == [sha(data)]

    for path in (f"/blobs/{sha(data)}", f"/blobs/{sha(data)}.bin"):
        g = await client.get(path)
        assert g.status_code == 200
        assert sha(g.content) == sha(data) and g.content == data
        assert g.headers["content-type"] == "application/octet-stream"
        assert g.headers["content-length"] == str(len(data))
        assert g.headers["etag"] == f'"{sha(data)}"'
        assert "immutable" in g.headers["cache-control"] and "max-age=31536000" in g.headers["cache-control"]
        h = await client.head(path)
        assert h.status_code == 200 and h.content == b""
        assert h.headers["content-length"] == str(len(data))
        assert h.headers["etag"] == f'"{sha(data)}"'


async def test_conditional_and_range_requests(client: httpx.AsyncClient) -> None:
    data = os.urandom(1000)
    assert (await put(client, data, auth(SecretKey.generate(), body=data))).status_code == 200
    r = await client.get(f"/blobs/{sha(data)}", headers={"If-None-Match": f'"{sha(data)}"'})
    assert r.status_code == 304 and r.content == b""
    r = await client.get(f"/blobs/{sha(data)}", headers={"Range": "bytes=10-19"})
    assert r.status_code == 206 and r.content == data[10:20]


async def test_reupload_is_idempotent(app: FastAPI, client: httpx.AsyncClient) -> None:
    key = SecretKey.generate()
    data = b"shard-0" * 100
    first = (await put(client, data, auth(key, body=data))).json()
    path = store_dir(app) / sha(data)
    old = first["uploaded"] - 1000
    os.utime(path, (old, old))  # the original upload time, as the store sees it
    first["uploaded"] = old
    again = await put(client, data, auth(key, body=data))  # a fresh authorization
    assert again.status_code == 200
    assert again.json() == first  # same descriptor, file untouched
    assert os.stat(path).st_mtime == old
    assert files(app) == [sha(data)]


async def test_reupload_repairs_a_corrupted_file(app: FastAPI, client: httpx.AsyncClient) -> None:
    key = SecretKey.generate()
    data = b"model weights" * 50
    await put(client, data, auth(key, body=data))
    (store_dir(app) / sha(data)).write_bytes(b"bit rot")
    r = await put(client, data, auth(key, body=data))
    assert r.status_code == 200 and r.json()["size"] == len(data)
    assert (store_dir(app) / sha(data)).read_bytes() == data


async def test_public_url_names_the_blob(tmp_path: Path) -> None:
    app = make_app(tmp_path, public_url="https://escrow.example/")
    data = b"abc"
    async with http(app) as c:
        r = await put(c, data, auth(SecretKey.generate(), body=data))
    assert r.json()["url"] == f"https://escrow.example/blobs/{sha(data)}"


async def test_store_directory_is_created_private(app: FastAPI, client: httpx.AsyncClient) -> None:
    assert not store_dir(app).exists()
    assert (await client.head("/blobs/" + "0" * 64)).status_code == 404
    assert store_dir(app).is_dir()
    assert os.stat(store_dir(app)).st_mode & 0o777 == 0o700


# ------------------------------------------------------------------------------ GET refusals


@pytest.mark.parametrize(
    "name",
    [
        "A" * 64,
        "a" * 63,
        "a" * 65,
        "g" * 64,
        "0" * 64 + ".",
        "0" * 64 + "..bin",
        "0" * 64 + ".waytoolongextension",
        "0" * 64 + ".b-n",
        "upload",
        ".tmp-abcdef",
        "%00" * 3,
    ],
)
async def test_invalid_hash_is_400(client: httpx.AsyncClient, name: str) -> None:
    assert_problem(await client.get(f"/blobs/{name}"), 400, "invalid_hash")
    if name != "upload":  # HEAD /blobs/upload is BUD-06's upload check
        h = await client.head(f"/blobs/{name}")
        assert h.status_code == 400 and h.headers["x-reason"]


async def test_unknown_blob_is_404(client: httpx.AsyncClient) -> None:
    assert_problem(await client.get("/blobs/" + "ab" * 32), 404, "blob_not_found")
    assert_problem(await client.get("/blobs/" + "ab" * 32 + ".pdf"), 404, "blob_not_found")
    assert (await client.head("/blobs/" + "ab" * 32)).status_code == 404


async def test_a_temp_file_is_never_served(app: FastAPI, client: httpx.AsyncClient) -> None:
    await client.head("/blobs/" + "0" * 64)
    (store_dir(app) / ("a" * 64)).mkdir()  # not a regular file: not a blob
    assert_problem(await client.get("/blobs/" + "a" * 64), 404, "blob_not_found")


# ----------------------------------------------------------------------------- auth refusals

KEY = SecretKey.generate()
BODY = b"dataset shard"


def _forged_sig() -> str:
    d = event_dict(KEY, body=BODY)
    d["sig"] = SecretKey.generate().sign_schnorr(bytes.fromhex(d["id"])).hex()
    return encode(d)


def _tampered_tags() -> str:
    d = event_dict(KEY, body=BODY)
    d["tags"] = [["t", "upload"], ["x", sha(BODY)], ["expiration", str(int(time.time()) + 10**6)]]
    return encode(d)


def _odd_field() -> str:
    d = event_dict(KEY, body=BODY)
    d["\u00e9\u2603\r\n"] = 1  # non-ASCII and CR/LF in a field name
    return encode(d)


AUTH_CASES = [
    ("missing header", lambda: None, 401, "missing_authorization"),
    ("empty header", lambda: "", 401, "missing_authorization"),
    ("wrong scheme", lambda: "Bearer abc", 401, "wrong_scheme"),
    ("scheme only", lambda: "Nostr", 401, "wrong_scheme"),
    ("bad base64", lambda: "Nostr !!!notbase64", 401, "bad_auth_encoding"),
    ("not json", lambda: "Nostr " + base64.b64encode(b"\xff{no").decode(), 401, "bad_auth_encoding"),
    ("deep json", lambda: "Nostr " + base64.b64encode(b"[" * 5000).decode(), 401, "bad_auth_encoding"),
    ("too large", lambda: "Nostr " + "A" * 20000, 401, "bad_auth_encoding"),
    ("not an object", lambda: encode([1, 2, 3]), 401, "bad_auth_event"),
    ("odd field", _odd_field, 401, "bad_auth_event"),
    ("forged signature", _forged_sig, 401, "bad_auth_event"),
    ("tags changed after signing", _tampered_tags, 401, "bad_auth_event"),
    ("wrong kind", lambda: auth(KEY, body=BODY, kind=27235), 401, "wrong_kind"),
    ("no expiration", lambda: auth(KEY, body=BODY, expiration=None), 401, "missing_expiration"),
    ("expired", lambda: auth(KEY, body=BODY, expiration=-1), 401, "auth_expired"),
    ("expiration now", lambda: auth(KEY, body=BODY, expiration=0), 401, "auth_expired"),
    ("expiration not a number", lambda: auth(KEY, body=BODY, expiration="soon"), 401, "bad_auth_event"),
    ("two expirations", lambda: auth(KEY, body=BODY, extra=[["expiration", "99999999999"]]), 401, "bad_auth_event"),
    (
        "created in the future",
        lambda: auth(KEY, body=BODY, created_at=int(time.time()) + 120),
        401,
        "auth_not_yet_valid",
    ),
    ("created too long ago", lambda: auth(KEY, body=BODY, created_at=int(time.time()) - 7200), 401, "auth_expired"),
    ("t is delete", lambda: auth(KEY, body=BODY, t="delete"), 401, "wrong_verb"),
    ("no t", lambda: auth(KEY, body=BODY, t=None), 401, "wrong_verb"),
    ("two verbs", lambda: auth(KEY, body=BODY, extra=[["t", "delete"]]), 401, "wrong_verb"),
    ("no x", lambda: auth(KEY, body=BODY, x=None), 401, "missing_hash_tag"),
    ("x of other content", lambda: auth(KEY, body=BODY, x=sha(b"other")), 403, "hash_mismatch"),
    ("x uppercase", lambda: auth(KEY, body=BODY, x=sha(BODY).upper()), 403, "hash_mismatch"),
]


@pytest.mark.parametrize("make,status,code", [c[1:] for c in AUTH_CASES], ids=[c[0] for c in AUTH_CASES])
async def test_auth_refusals(app: FastAPI, client: httpx.AsyncClient, make, status: int, code: str) -> None:
    r = await put(client, BODY, make())
    assert_problem(r, status, code)
    if status == 401:
        assert r.headers["www-authenticate"] == "Nostr"
    assert files(app) == []  # nothing stored, no temp file


async def test_created_at_within_60s_skew_is_accepted(client: httpx.AsyncClient) -> None:
    r = await put(client, BODY, auth(KEY, body=BODY, created_at=int(time.time()) + 30))
    assert r.status_code == 200, r.text


async def test_one_of_several_x_tags_may_match(client: httpx.AsyncClient) -> None:
    r = await put(client, BODY, auth(KEY, body=BODY, x=sha(b"other"), extra=[["x", sha(BODY)]]))
    assert r.status_code == 200, r.text


async def test_replayed_event_is_refused(app: FastAPI, client: httpx.AsyncClient) -> None:
    header = auth(KEY, body=BODY)
    assert (await put(client, BODY, header)).status_code == 200
    assert_problem(await put(client, BODY, header), 401, "replayed")


async def test_event_used_by_a_failed_upload_is_spent(client: httpx.AsyncClient) -> None:
    header = auth(KEY, body=BODY)
    assert_problem(await put(client, b"not the body", header), 403, "hash_mismatch")
    assert_problem(await put(client, BODY, header), 401, "replayed")


async def test_allowed_pubkeys(tmp_path: Path) -> None:
    allowed = SecretKey.generate()
    from service.nostr.nip19 import encode_npub

    app = make_app(tmp_path, blob_allowed_pubkeys=[encode_npub(allowed.public_key_hex)])
    async with http(app) as c:
        assert_problem(await put(c, BODY, auth(SecretKey.generate(), body=BODY)), 403, "pubkey_not_allowed")
        assert (await put(c, BODY, auth(allowed, body=BODY))).status_code == 200


async def test_rate_limits_per_address_and_per_key(tmp_path: Path) -> None:
    app = make_app(tmp_path, blob_uploads_per_minute=1.0, blob_uploads_burst=2)
    key = SecretKey.generate()
    async with http(app, ("10.0.0.1", 1)) as a, http(app, ("10.0.0.2", 1)) as b:
        for _ in range(2):
            assert (await put(a, BODY, auth(key, body=BODY))).status_code == 200
        r = await put(a, BODY, auth(SecretKey.generate(), body=BODY))  # same address, another key
        assert_problem(r, 429, "rate_limited")
        assert int(r.headers["retry-after"]) >= 1
        assert_problem(await put(b, BODY, auth(key, body=BODY)), 429, "rate_limited")  # same key
        assert (await put(b, BODY, auth(SecretKey.generate(), body=BODY))).status_code == 200


async def test_seen_auth_is_bounded_and_expires() -> None:
    seen = blobs.SeenAuth(max_entries=2)
    assert seen.add("a", until=100, now=50) is True
    assert seen.add("a", until=100, now=60) is False
    assert seen.add("b", until=200, now=60) is True
    assert seen.add("c", until=200, now=60) is None  # full
    assert seen.add("c", until=300, now=101) is True  # "a" could no longer pass: forgotten
    assert len(seen) == 2


async def test_full_replay_set_is_503_not_a_crash(app: FastAPI, client: httpx.AsyncClient) -> None:
    await client.head("/blobs/" + "0" * 64)
    app.state.blobs.seen.max_entries = 0
    assert_problem(await put(client, BODY, auth(KEY, body=BODY)), 503, "busy")


# --------------------------------------------------------------------------------- size limits


async def test_oversized_body_with_content_length(app: FastAPI, client: httpx.AsyncClient) -> None:
    data = b"x" * (MAX + 1)
    assert_problem(await put(client, data, auth(KEY, body=data)), 413, "blob_too_large")
    assert files(app) == []
    exact = b"y" * MAX
    assert (await put(client, exact, auth(KEY, body=exact))).status_code == 200


async def test_oversized_body_without_content_length_stops_reading(app: FastAPI, client: httpx.AsyncClient) -> None:
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(100_000):  # 100 MB if read to the end
            sent += 1
            yield b"z" * 1024

    r = await client.put("/blobs/upload", content=endless(), headers={"Authorization": auth(KEY, body=b"")})
    assert "content-length" not in r.request.headers
    assert_problem(r, 413, "blob_too_large")
    assert sent <= MAX // 1024 + 2
    assert files(app) == []


async def test_chunked_body_within_limit_is_stored(client: httpx.AsyncClient) -> None:
    parts = [os.urandom(1000) for _ in range(4)]

    async def chunks() -> AsyncIterator[bytes]:
        for p in parts:
            yield p

    data = b"".join(parts)
    r = await client.put("/blobs/upload", content=chunks(), headers={"Authorization": auth(KEY, body=data)})
    assert r.status_code == 200 and r.json()["sha256"] == sha(data)
    assert (await client.get(f"/blobs/{sha(data)}")).content == data


@pytest.mark.parametrize("value", ["abc", "-1", "1e3", "9" * 30])
async def test_bad_content_length_is_400(client: httpx.AsyncClient, value: str) -> None:
    # Sent raw through the ASGI app: httpx itself would not let a bad Content-Length out.
    status, headers, body = await raw_put(
        client, [(b"content-length", value.encode()), (b"authorization", auth(KEY, body=BODY).encode())], [BODY]
    )
    assert status == 400 and json.loads(body)["code"] == "invalid_content_length"


async def test_upload_requirements_head(client: httpx.AsyncClient) -> None:
    assert (await client.head("/blobs/upload", headers={"X-Content-Length": str(MAX)})).status_code == 200
    r = await client.head("/blobs/upload", headers={"X-Content-Length": str(MAX + 1)})
    assert r.status_code == 413 and "limited" in r.headers["x-reason"]
    assert (await client.head("/blobs/upload", headers={"X-SHA-256": "nothex"})).status_code == 400


# -------------------------------------------------------------------------- atomic storage


async def raw_put(
    client: httpx.AsyncClient, headers: list[tuple[bytes, bytes]], chunks: list[bytes], *, disconnect: bool = False
) -> tuple[int, dict, bytes]:
    """Drive the ASGI app directly (to send what httpx will not: a client that goes away)."""
    app = client._transport.app  # type: ignore[attr-defined]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "PUT",
        "scheme": "http",
        "path": "/blobs/upload",
        "raw_path": b"/blobs/upload",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver"), *headers],
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
    }
    queue = [{"type": "http.request", "body": c, "more_body": True} for c in chunks]
    queue.append(
        {"type": "http.disconnect"} if disconnect else {"type": "http.request", "body": b"", "more_body": False}
    )
    sent: list[dict] = []

    async def receive() -> dict:
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body


async def test_client_going_away_leaves_no_temp_file(app: FastAPI, client: httpx.AsyncClient) -> None:
    data = os.urandom(3000)
    status, _, body = await raw_put(
        client, [(b"authorization", auth(KEY, body=data).encode())], [data[:1000], data[1000:2000]], disconnect=True
    )
    assert status == 400 and json.loads(body)["code"] == "incomplete_body"
    assert files(app) == []


async def test_temp_file_is_in_the_store_and_removed_on_failure(tmp_path: Path) -> None:
    store = blobs.BlobStore(tmp_path / "s")
    seen_during: list[list[str]] = []

    async def broken() -> AsyncIterator[bytes]:
        yield b"first part"
        seen_during.append(os.listdir(tmp_path / "s"))
        raise ConnectionResetError("peer went away")

    with pytest.raises(ConnectionResetError):
        await store.put_stream(broken(), max_bytes=MAX)
    assert len(seen_during[0]) == 1 and seen_during[0][0].startswith(".tmp-")  # same directory
    assert os.listdir(tmp_path / "s") == []

    async def one(data: bytes) -> AsyncIterator[bytes]:
        yield data

    with pytest.raises(blobs.HashNotAccepted):
        await store.put_stream(one(b"abc"), max_bytes=MAX, accept={sha(b"xyz")})
    with pytest.raises(blobs.BlobTooLarge):
        await store.put_stream(one(b"a" * (MAX + 1)), max_bytes=MAX)
    assert os.listdir(tmp_path / "s") == []
    blob, new = await store.put_stream(one(b"abc"), max_bytes=MAX, accept={sha(b"abc")})
    assert new and blob.size == 3 and os.listdir(tmp_path / "s") == [sha(b"abc")]
    assert os.stat(tmp_path / "s" / sha(b"abc")).st_mode & 0o777 == 0o600


async def test_stale_temp_files_are_removed_at_start(tmp_path: Path) -> None:
    d = tmp_path / "s"
    d.mkdir()
    (d / ".tmp-old").write_bytes(b"x")
    (d / ".tmp-fresh").write_bytes(b"y")
    os.utime(d / ".tmp-old", (time.time() - 7200,) * 2)
    blobs.BlobStore(d)
    assert sorted(os.listdir(d)) == [".tmp-fresh"]


# ---------------------------------------------------------------------------------- client


async def test_client_round_trip_over_asgi(app: FastAPI, client: httpx.AsyncClient) -> None:
    data = os.urandom(2500)
    digest = await blob_client.upload(BASE, KEY, data, client=client, job=_Db.open_job)
    assert digest == sha(data)
    assert await blob_client.download(BASE, digest, max_bytes=MAX, client=client) == data
    url = blob_client.blob_url(BASE, digest) + ".bin"
    assert await blob_client.download(url, digest, max_bytes=MAX, client=client) == data


async def test_client_refuses_tampered_content(app: FastAPI, client: httpx.AsyncClient) -> None:
    data = b"the real shard" * 10
    digest = await blob_client.upload(BASE, KEY, data, client=client, job=_Db.open_job)
    (store_dir(app) / digest).write_bytes(b"the fake shard" * 10)  # disk corruption / a bad server
    with pytest.raises(blob_client.BlobHashMismatch) as exc:
        await blob_client.download(BASE, digest, max_bytes=MAX, client=client)
    assert exc.value.expected == digest and exc.value.actual == sha(b"the fake shard" * 10)


async def test_client_caps_the_size(app: FastAPI, client: httpx.AsyncClient) -> None:
    data = os.urandom(3000)
    digest = await blob_client.upload(BASE, KEY, data, client=client, job=_Db.open_job)
    with pytest.raises(blob_client.BlobTooLarge):
        await blob_client.download(BASE, digest, max_bytes=2999, client=client)

    pulled = 0

    async def endless() -> AsyncIterator[bytes]:  # no Content-Length: the cap applies while reading
        nonlocal pulled
        for _ in range(10_000):
            pulled += 1
            yield b"q" * 1000

    mock = httpx.AsyncClient(transport=httpx.MockTransport(lambda req: httpx.Response(200, content=endless())))
    async with mock:
        with pytest.raises(blob_client.BlobTooLarge):
            await blob_client.download("http://x/blobs", digest, max_bytes=5000, client=mock)
    assert pulled <= 7


async def test_client_errors(tmp_path: Path, client: httpx.AsyncClient) -> None:
    with pytest.raises(blob_client.BlobNotFound) as nf:
        await blob_client.download(BASE, "cd" * 32, max_bytes=MAX, client=client)
    assert nf.value.status == 404 and nf.value.code == "blob_not_found"
    with pytest.raises(ValueError):
        await blob_client.download(f"{BASE}/{'cd' * 32}", "ab" * 32, max_bytes=MAX, client=client)
    with pytest.raises(ValueError):
        await blob_client.download(BASE, "AB" * 32, max_bytes=MAX, client=client)
    with pytest.raises(blob_client.BlobHTTPError) as big:
        await blob_client.upload(BASE, KEY, b"x" * (MAX + 1), client=client, job=_Db.open_job)
    assert big.value.status == 413 and big.value.code == "blob_too_large"

    restricted = make_app(tmp_path / "r", blob_allowed_pubkeys=[SecretKey.generate().public_key_hex])
    async with http(restricted) as c:
        with pytest.raises(blob_client.BlobHTTPError) as denied:
            await blob_client.upload(BASE, KEY, b"abc", client=c, job=_Db.open_job)
    assert denied.value.status == 403 and denied.value.code == "pubkey_not_allowed"

    def liar(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"url": "x", "sha256": "00" * 32, "size": 3, "type": "x", "uploaded": 1})

    async with httpx.AsyncClient(transport=httpx.MockTransport(liar)) as m:
        with pytest.raises(blob_client.BlobProtocolError):
            await blob_client.upload("http://x/blobs", KEY, b"abc", client=m, job=_Db.open_job)


# ------------------------------------------------------------------------- real HTTP server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_real_client_against_uvicorn(tmp_path: Path) -> None:
    app = make_app(tmp_path, blob_max_bytes=256 * 1024)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning", access_log=False)
    )
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 10
    while not server.started and not task.done() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert server.started, "uvicorn did not start"
    try:
        base = f"http://127.0.0.1:{port}/blobs"
        data = os.urandom(200 * 1024)
        digest = await blob_client.upload(base, KEY, data, job=_Db.open_job)
        assert digest == sha(data)
        assert await blob_client.download(base, digest, max_bytes=256 * 1024) == data
        assert await blob_client.download(f"{base}/{digest}.bin", digest, max_bytes=256 * 1024) == data
        assert await blob_client.upload(base, SecretKey.generate(), data, job=_Db.open_job) == digest  # idempotent
        with pytest.raises(blob_client.BlobTooLarge):
            await blob_client.download(base, digest, max_bytes=1024)
        with pytest.raises(blob_client.BlobHTTPError) as exc:
            await blob_client.upload(base, KEY, os.urandom(256 * 1024 + 1), job=_Db.open_job)
        assert exc.value.code == "blob_too_large"
        (store_dir(app) / digest).write_bytes(os.urandom(len(data)))
        with pytest.raises(blob_client.BlobHashMismatch):
            await blob_client.download(base, digest, max_bytes=256 * 1024)
        assert [f for f in files(app) if f.startswith(".tmp-")] == []
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
