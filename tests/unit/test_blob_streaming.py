"""Real-sized blobs through the blob store over real sockets (uvicorn on loopback): a 150 MB
model up and down with bounded memory, limits enforced mid-stream, the declared hash checked
before anything is stored, byte ranges, and a download cut off midway that resumes.

No LND: the blob store is HTTP and a database (a migrated SQLite file of the test's own)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import time
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from service.agents.storage import Blobs
from service.api import blob_client, blobs, errors
from service.db import create_engine, session_factory
from service.escrow.models import Job
from service.nostr.nip01 import SecretKey, sign_event
from service.nostr.protocol import Direction, JobSpec, PayoutPolicy, Shard, Validation, build_job_request

MiB = 1024 * 1024
KEY = SecretKey.generate()
MEMORY_BOUND = 32 * MiB  # peak traced allocations while a 150 MB blob goes up or down


@dataclass
class Server:
    app: FastAPI
    base: str  # the Blossom server URL, http://127.0.0.1:<port>/blobs
    port: int
    job: str  # an open job any provider may upload for

    @property
    def store(self) -> Path:
        return Path(self.app.state.settings.blob_dir)

    def files(self) -> list[str]:
        return sorted(os.listdir(self.store)) if self.store.exists() else []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _open_job(sessions) -> str:
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
    async with sessions.begin() as s:
        s.add(Job(id=ev.id, customer=customer.public_key_hex, state="collecting", request_raw=ev.to_json()))
    return ev.id


async def _serve(app: FastAPI) -> tuple[uvicorn.Server, asyncio.Task, int]:
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning", access_log=False)
    )
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 10
    while not server.started and not task.done() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert server.started, "uvicorn did not start"
    return server, task, port


@pytest.fixture
async def server(request: pytest.FixtureRequest, database_url: str, tmp_path: Path) -> AsyncIterator[Server]:
    over = getattr(request, "param", {})
    engine = create_engine(database_url)
    sessions = session_factory(engine)
    app = FastAPI()
    errors.install(app)
    app.include_router(blobs.router)
    app.state.settings = SimpleNamespace(
        blob_dir=str(tmp_path / "store"),
        blob_uploads_per_minute=6000.0,
        blob_uploads_burst=1000,
        public_url=None,
        **over,
    )
    app.state.sessions = sessions
    job = await _open_job(sessions)
    uv, task, port = await _serve(app)
    try:
        yield Server(app, f"http://127.0.0.1:{port}/blobs", port, job)
    finally:
        uv.should_exit = True
        await asyncio.wait_for(task, 10)
        await engine.dispose()


def _write_random(path: Path, size: int, seed: int = 1) -> str:
    """A file of ``size`` pseudo-random bytes, written 1 MiB at a time; returns its sha256."""
    h = hashlib.sha256()
    block = hashlib.shake_256(seed.to_bytes(4, "big")).digest(MiB)
    with open(path, "wb") as f:
        left, i = size, 0
        while left:
            chunk = (block[i % 251 :] + block[: i % 251])[: min(MiB, left)]  # no two blocks alike
            h.update(chunk)
            f.write(chunk)
            left -= len(chunk)
            i += 1
    return h.hexdigest()


# ------------------------------------------------------------------------ a 150 MB model


@pytest.mark.parametrize("server", [{"blob_max_bytes": 160 * MiB}], indirect=True)
async def test_a_150_mb_blob_goes_up_and_down_in_bounded_memory(server: Server, tmp_path: Path) -> None:
    size = 150 * MiB
    src = tmp_path / "model.bin"
    digest = _write_random(src, size)
    dst = tmp_path / "fetched.bin"
    tracemalloc.start()
    try:
        # Server and client share this process: the peaks below bound both together.
        assert await blob_client.upload_file(server.base, KEY, src, job=server.job) == digest
        _, upload_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        assert await blob_client.download_to_file(server.base, digest, dst, max_bytes=size) == size
        _, download_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"150 MB: upload peak {upload_peak / MiB:.1f} MiB, download peak {download_peak / MiB:.1f} MiB")
    assert upload_peak < MEMORY_BOUND, f"upload peak {upload_peak / MiB:.1f} MiB"
    assert download_peak < MEMORY_BOUND, f"download peak {download_peak / MiB:.1f} MiB"
    assert server.files() == [digest]
    assert os.path.getsize(server.store / digest) == size
    assert blob_client.file_sha256(dst) == (digest, size)
    assert not dst.with_name(dst.name + ".part").exists()


# ------------------------------------------------------------------- refusals mid-stream


@pytest.mark.parametrize("server", [{"blob_max_bytes": 1 * MiB}], indirect=True)
async def test_limit_passed_mid_stream_is_413_and_leaves_no_file(server: Server) -> None:
    """A chunked body that never ends: the server answers 413 once the limit is passed, without
    waiting for the rest, and its temporary file is gone by then."""
    declared = hashlib.sha256(b"whatever").hexdigest()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    head = (
        "PUT /blobs/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
        f"Authorization: {blob_client.auth_header(KEY, declared, job=server.job)}\r\n\r\n"
    )
    writer.write(head.encode())
    chunk = b"%x\r\n" % (64 * 1024) + b"m" * (64 * 1024) + b"\r\n"
    for _ in range(1 * MiB // (64 * 1024) + 1):  # one chunk past the limit, and no final chunk
        writer.write(chunk)
        await writer.drain()
    try:
        response = await asyncio.wait_for(reader.read(), 10)  # until the server closes
    finally:
        writer.close()
    status_line, _, rest = response.partition(b"\r\n")
    assert status_line.split()[1] == b"413"
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["code"] == "blob_too_large"
    assert server.files() == []


@pytest.mark.parametrize("server", [{"blob_max_bytes": 8 * MiB}], indirect=True)
async def test_stream_over_the_limit_via_the_client_is_refused(server: Server, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    _write_random(src, 8 * MiB + 1)
    with pytest.raises(blob_client.BlobHTTPError) as exc:  # Content-Length: refused before reading
        await blob_client.upload_file(server.base, KEY, src, job=server.job)
    assert exc.value.status == 413 and exc.value.code == "blob_too_large"
    assert server.files() == []


async def test_declared_hash_mismatch_stores_nothing(server: Server) -> None:
    real = os.urandom(3 * MiB)
    claimed = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(blob_client.BlobHTTPError) as exc:
        await blob_client.upload_stream(
            server.base, KEY, (real[i : i + MiB] for i in range(0, len(real), MiB)), sha256=claimed, job=server.job
        )
    assert exc.value.status == 403 and exc.value.code == "hash_mismatch"
    assert server.files() == []
    async with httpx.AsyncClient() as http:
        for digest in (claimed, hashlib.sha256(real).hexdigest()):
            assert (await http.head(f"{server.base}/{digest}")).status_code == 404


async def test_upload_stream_from_an_async_iterator(server: Server) -> None:
    parts = [os.urandom(700_000) for _ in range(5)]
    digest = hashlib.sha256(b"".join(parts)).hexdigest()

    async def chunks() -> AsyncIterator[bytes]:
        for p in parts:
            yield p

    assert await blob_client.upload_stream(server.base, KEY, chunks(), sha256=digest, job=server.job) == digest
    assert server.files() == [digest]
    assert (server.store / digest).read_bytes() == b"".join(parts)


# --------------------------------------------------------------------------------- ranges


async def test_byte_ranges(server: Server) -> None:
    data = os.urandom(10_000)
    digest = await blob_client.upload(server.base, KEY, data, job=server.job)
    url = f"{server.base}/{digest}"
    async with httpx.AsyncClient() as http:

        async def get(rng: str, **headers: str) -> httpx.Response:
            return await http.get(url, headers={"Range": rng, **headers})

        r = await get("bytes=0-99")  # the first bytes
        assert r.status_code == 206 and r.content == data[:100]
        assert r.headers["content-range"] == "bytes 0-99/10000" and r.headers["content-length"] == "100"
        r = await get("bytes=4000-5999")  # the middle
        assert r.status_code == 206 and r.content == data[4000:6000]
        r = await get("bytes=-300")  # a suffix
        assert r.status_code == 206 and r.content == data[-300:]
        assert r.headers["content-range"] == "bytes 9700-9999/10000"
        r = await get("bytes=9990-")  # from an offset to the end (a resume)
        assert r.status_code == 206 and r.content == data[9990:]
        r = await get("bytes=9000-20000")  # an end past the blob is cut to it
        assert r.status_code == 206 and r.content == data[9000:]
        for bad in ("bytes=10000-", "bytes=20000-30000", "bytes=-0"):
            r = await get(bad)
            assert r.status_code == 416, bad
            assert r.headers["content-range"] == "bytes */10000"
            assert r.json()["code"] == "range_not_satisfiable"
        for ignored in ("bytes=5-1", "bytes=a-b", "items=0-5", "bytes=0-1,5-6"):  # RFC 9110: whole blob
            r = await get(ignored)
            assert r.status_code == 200 and r.content == data, ignored
        r = await get("bytes=100-", **{"If-Range": f'"{digest}"'})
        assert r.status_code == 206 and r.content == data[100:]
        r = await get("bytes=100-", **{"If-Range": '"another-version"'})
        assert r.status_code == 200 and r.content == data
        h = await http.head(url, headers={"Range": "bytes=10-19"})
        assert h.status_code == 206 and h.headers["content-length"] == "10" and h.content == b""
        assert (await http.head(url)).headers["accept-ranges"] == "bytes"


# ------------------------------------------------------------------ interrupted downloads


@dataclass
class CuttingProxy:
    """A TCP proxy to the server that aborts the n-th connection after ``cuts[n]`` bytes of the
    response (None: never); it keeps each request's head to show what the client asked."""

    target: int
    cuts: list[int | None]
    heads: list[bytes] = field(default_factory=list)
    port: int = 0

    async def start(self) -> asyncio.Server:
        srv = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = srv.sockets[0].getsockname()[1]
        return srv

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = len(self.heads)
        self.heads.append(b"")
        cut = self.cuts[n] if n < len(self.cuts) else None
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target)

        async def upstream() -> None:
            while data := await reader.read(65536):
                if len(self.heads[n]) < 4096:
                    self.heads[n] += data[:4096]
                up_w.write(data)
                await up_w.drain()
            up_w.close()

        async def downstream() -> None:
            sent = 0
            while data := await up_r.read(65536):
                if cut is not None and sent + len(data) >= cut:
                    writer.write(data[: cut - sent])
                    await writer.drain()
                    writer.transport.abort()  # the connection drops mid-body
                    up_w.transport.abort()
                    return
                writer.write(data)
                await writer.drain()
                sent += len(data)
            writer.close()

        tasks = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        await asyncio.gather(*tasks, return_exceptions=True)

    def ranges(self) -> list[str | None]:
        out: list[str | None] = []
        for head in self.heads:
            lines = head.split(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")
            out.append(next((ln.split(":", 1)[1].strip() for ln in lines if ln.lower().startswith("range:")), None))
        return out


@pytest.mark.parametrize("server", [{"blob_max_bytes": 32 * MiB}], indirect=True)
async def test_a_download_cut_off_resumes_with_a_range(server: Server, tmp_path: Path) -> None:
    src = tmp_path / "model.bin"
    digest = _write_random(src, 12 * MiB, seed=3)
    await blob_client.upload_file(server.base, KEY, src, job=server.job)
    proxy = CuttingProxy(server.port, cuts=[3 * MiB, 5 * MiB])  # two drops, then clean
    srv = await proxy.start()
    try:
        dst = tmp_path / "out.bin"
        url = f"http://127.0.0.1:{proxy.port}/blobs/{digest}"
        assert await blob_client.download_to_file(url, digest, dst, max_bytes=32 * MiB) == 12 * MiB
    finally:
        srv.close()
    assert blob_client.file_sha256(dst) == (digest, 12 * MiB)
    ranges = proxy.ranges()
    assert len(ranges) == 3 and ranges[0] is None
    # each retry continued from what had arrived (not from byte 0)
    first, second = (int(r.removeprefix("bytes=").removesuffix("-")) for r in ranges[1:] if r)
    assert 0 < first < second < 12 * MiB


@pytest.mark.parametrize("server", [{"blob_max_bytes": 32 * MiB}], indirect=True)
async def test_a_part_file_left_by_an_earlier_call_is_continued(server: Server, tmp_path: Path) -> None:
    src = tmp_path / "model.bin"
    digest = _write_random(src, 6 * MiB, seed=4)
    await blob_client.upload_file(server.base, KEY, src, job=server.job)
    proxy = CuttingProxy(server.port, cuts=[2 * MiB])
    srv = await proxy.start()
    dst = tmp_path / "out.bin"
    part = tmp_path / "out.bin.part"
    try:
        url = f"http://127.0.0.1:{proxy.port}/blobs/{digest}"
        with pytest.raises(blob_client.BlobClientError):
            await blob_client.download_to_file(url, digest, dst, max_bytes=32 * MiB, resume_attempts=0)
        kept = part.stat().st_size
        assert not dst.exists() and 0 < kept < 6 * MiB  # kept for the next call
        assert await blob_client.download_to_file(url, digest, dst, max_bytes=32 * MiB) == 6 * MiB
    finally:
        srv.close()
    assert proxy.ranges() == [None, f"bytes={kept}-"]  # the second call went on from the part file
    assert blob_client.file_sha256(dst) == (digest, 6 * MiB) and not part.exists()


async def test_a_damaged_part_file_is_fetched_again_whole(server: Server, tmp_path: Path) -> None:
    data = os.urandom(3 * MiB)
    digest = await blob_client.upload(server.base, KEY, data, job=server.job)
    dst = tmp_path / "out.bin"
    (tmp_path / "out.bin.part").write_bytes(b"\0" * MiB)  # not the blob's first MiB
    assert await blob_client.download_to_file(server.base, digest, dst, max_bytes=4 * MiB) == len(data)
    assert dst.read_bytes() == data


async def test_download_to_file_limits_and_hash(server: Server, tmp_path: Path) -> None:
    data = os.urandom(2 * MiB)
    digest = await blob_client.upload(server.base, KEY, data, job=server.job)
    dst = tmp_path / "out.bin"
    with pytest.raises(blob_client.BlobTooLarge):
        await blob_client.download_to_file(server.base, digest, dst, max_bytes=MiB)
    assert not dst.exists() and not (tmp_path / "out.bin.part").exists()
    (server.store / digest).write_bytes(os.urandom(len(data)))  # a bad server / disk
    with pytest.raises(blob_client.BlobHashMismatch):
        await blob_client.download_to_file(server.base, digest, dst, max_bytes=4 * MiB)
    assert not dst.exists() and not (tmp_path / "out.bin.part").exists()
    with pytest.raises(blob_client.BlobNotFound):
        await blob_client.download_to_file(server.base, "ab" * 32, dst, max_bytes=4 * MiB)


async def test_agent_blobs_stream_files(server: Server, tmp_path: Path) -> None:
    src = tmp_path / "model.bin"
    digest = _write_random(src, 3 * MiB + 5, seed=9)
    store = Blobs(server.base, KEY)
    blob = await store.upload_file(src, job=server.job)
    assert (blob.sha256, blob.size) == (digest, 3 * MiB + 5)
    assert blob.url == f"{server.base}/{digest}"
    out = await store.download_to_file(blob.url, blob.sha256, tmp_path / "copy.bin", max_bytes=4 * MiB)
    assert blob_client.file_sha256(out) == (digest, 3 * MiB + 5)
