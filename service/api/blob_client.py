"""An async client for Blossom blob servers (BUD-01 download, BUD-02 upload).

``base_url`` is the Blossom server URL: for fedstr-escrow that is ``https://<host>/blobs``.

* :func:`upload` signs a one-use kind-24242 authorization (``t=upload``, ``x=<sha256>``,
  ``expiration`` a few minutes ahead, and ``e=<job id>`` when the blob is for a job: the
  escrow's store admits uploads only for open jobs), PUTs the bytes, checks that the descriptor the
  server answers names the same hash and size, and returns the sha256 hex.
* :func:`upload_file` and :func:`upload_stream` do the same for a file or an iterator of
  chunks without holding the blob: a file is hashed in a first pass (the authorization names
  the hash before the body is sent) and read again while it is sent; a stream's hash is given
  by the caller and checked while it is sent.
* :func:`download` fetches ``<base>/<sha256>`` (or a full blob URL), stops reading past
  ``max_bytes`` and refuses content whose SHA-256 is not the expected one.
* :func:`download_to_file` streams a blob into a file (``<path>.part`` until it is whole and
  verified, then renamed), hashing as it writes, and resumes with ``Range: bytes=<n>-`` after
  a dropped connection (or from a ``.part`` file an earlier call left).

Memory: the streaming functions hold one chunk (``chunk_size``, 1 MiB) at a time, whatever the
blob's size.

Errors are :class:`BlobClientError` subclasses: :class:`BlobHashMismatch`,
:class:`BlobTooLarge`, :class:`BlobNotFound`, :class:`BlobHTTPError` (``status``,
``code`` from the problem document or ``X-Reason``), :class:`BlobProtocolError`.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import hashlib
import os
import re
import secrets
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import anyio
import httpx

from service.api import blob_io
from service.api.blob_io import ChunkWriter
from service.nostr.nip01 import SecretKey, sign_event

if TYPE_CHECKING:
    from hashlib import _Hash

KIND_BLOSSOM_AUTH = 24242
AUTH_LIFETIME_SECONDS = 300
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=10.0)
CHUNK_SIZE = 1 << 20  # what the streaming functions read, write and hold at a time
RESUME_ATTEMPTS = 5  # dropped connections a download_to_file survives
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
_UNSATISFIED_RANGE = re.compile(r"bytes \*/(\d+)")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_BLOB_PATH = re.compile(r"/([0-9a-f]{64})(?:\.[A-Za-z0-9]{1,16})?$")


class BlobClientError(Exception):
    """A blob could not be uploaded or downloaded."""


class BlobHashMismatch(BlobClientError):
    """The bytes received do not hash to the expected SHA-256: never use them."""

    def __init__(self, expected: str, actual: str) -> None:
        self.expected = expected
        self.actual = actual
        super().__init__(f"content hash {actual} differs from the expected {expected}")


class BlobTooLarge(BlobClientError):
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        super().__init__(f"blob is over {max_bytes} bytes")


class BlobHTTPError(BlobClientError):
    def __init__(self, status: int, code: str | None, detail: str) -> None:
        self.status = status
        self.code = code
        self.detail = detail
        super().__init__(f"HTTP {status} {code or ''}: {detail}".replace("  ", " "))


class BlobNotFound(BlobHTTPError):
    pass


class BlobProtocolError(BlobClientError):
    """The server answered something a Blossom server should not (e.g. a wrong descriptor)."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_hash(sha256: str) -> str:
    if not isinstance(sha256, str) or _HEX64.fullmatch(sha256) is None:
        raise ValueError("sha256 must be 64 lowercase hex characters")
    return sha256


def blob_url(base_url: str, sha256: str) -> str:
    return f"{base_url.rstrip('/')}/{_check_hash(sha256)}"


def auth_header(
    key: SecretKey,
    sha256: str,
    *,
    lifetime: int = AUTH_LIFETIME_SECONDS,
    now: int | None = None,
    content: str | None = None,
    job: str | None = None,
) -> str:
    """``Nostr <base64 event>`` authorizing one upload of the blob ``sha256`` (for ``job``, if given).

    The default content carries a random word, so that two authorizations for the same blob
    signed within the same second are distinct events (each is good for one upload).
    """
    now = int(time.time()) if now is None else now
    if content is None:
        content = f"Upload blob {sha256[:12]} ({secrets.token_hex(4)})"
    tags = [["t", "upload"], ["x", _check_hash(sha256)], ["expiration", str(now + lifetime)]]
    if job is not None:
        tags.append(["e", _check_hash(job)])
    event = sign_event(key, KIND_BLOSSOM_AUTH, tags, content, created_at=now)
    return "Nostr " + base64.b64encode(event.to_json().encode()).decode()


def _http_error(response: httpx.Response) -> BlobHTTPError:
    code = None
    detail = response.headers.get("x-reason") or response.reason_phrase or ""
    try:
        body = response.json()
        if isinstance(body, dict):
            code = body.get("code") if isinstance(body.get("code"), str) else None
            for field in ("detail", "message"):
                if isinstance(body.get(field), str):
                    detail = body[field]
                    break
    except ValueError:
        pass
    cls = BlobNotFound if response.status_code == 404 else BlobHTTPError
    return cls(response.status_code, code, detail[:500])


def _client(client: httpx.AsyncClient | None, timeout: httpx.Timeout | float) -> httpx.AsyncClient:
    return client if client is not None else httpx.AsyncClient(timeout=timeout, follow_redirects=True, max_redirects=3)


def file_sha256(path: str | os.PathLike[str], *, chunk_size: int = CHUNK_SIZE) -> tuple[str, int]:
    """The SHA-256 hex and size of a file, read once, ``chunk_size`` at a time."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


async def _file_chunks(path: str | os.PathLike[str], size: int, chunk_size: int) -> AsyncIterator[bytes]:
    """The first ``size`` bytes of a file (what was hashed), read by a worker thread one chunk
    ahead of the one being sent (two chunks held at most)."""
    with open(path, "rb") as f:
        left = size
        ahead = blob_io.executor().submit(f.read, min(chunk_size, left)) if left else None
        try:
            while ahead is not None:
                chunk = await asyncio.wrap_future(ahead)
                ahead = None
                if not chunk:
                    raise BlobClientError("the file shrank while it was being uploaded")
                left -= len(chunk)
                if left > 0:
                    ahead = blob_io.executor().submit(f.read, min(chunk_size, left))
                yield chunk
        finally:
            if ahead is not None:
                concurrent.futures.wait([ahead])  # before the file closes


def _check_descriptor(response: httpx.Response, digest: str, size: int) -> None:
    if not response.is_success:
        raise _http_error(response)
    try:
        descriptor = response.json()
    except ValueError:
        raise BlobProtocolError("the server's answer is not a JSON blob descriptor") from None
    if not isinstance(descriptor, dict) or descriptor.get("sha256") != digest:
        raise BlobProtocolError("the server's descriptor names another hash")
    if descriptor.get("size") != size:
        raise BlobProtocolError("the server's descriptor gives another size")


async def upload_stream(
    base_url: str,
    key: SecretKey,
    chunks: Iterable[bytes] | AsyncIterable[bytes],
    *,
    sha256: str,
    size: int | None = None,
    client: httpx.AsyncClient | None = None,
    timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
    job: str | None = None,
) -> str:
    """Upload the bytes ``chunks`` yields, which must hash to ``sha256`` (the authorization names
    the hash before the body is sent); returns it once the server has acknowledged exactly it.

    ``size``, when known, is sent as ``Content-Length`` (the server refuses an oversized blob
    before reading it); otherwise the body is chunked. The bytes are hashed and counted as they
    go out: :class:`BlobHashMismatch` if they are not what ``sha256`` and ``size`` said (the
    server refuses such a body too, and stores nothing).
    """
    _check_hash(sha256)
    if isinstance(chunks, (bytes, bytearray, memoryview, str)):
        raise TypeError("chunks must be an iterator of bytes (use upload() for one bytes object)")
    h = hashlib.sha256()
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        if isinstance(chunks, AsyncIterable):
            async for chunk in chunks:
                h.update(chunk)
                sent += len(chunk)
                yield bytes(chunk)
        else:
            for chunk in chunks:
                h.update(chunk)
                sent += len(chunk)
                yield bytes(chunk)

    headers = {"Authorization": auth_header(key, sha256, job=job), "Content-Type": "application/octet-stream"}
    if size is not None:
        headers["Content-Length"] = str(size)
    http = _client(client, timeout)
    try:
        response = await http.put(f"{base_url.rstrip('/')}/upload", content=body(), headers=headers)
    except httpx.HTTPError as e:
        raise BlobClientError(f"upload failed: {type(e).__name__}: {e}") from e
    finally:
        if client is None:
            await http.aclose()
    if response.is_success and h.hexdigest() != sha256:  # the server accepted bytes it was not told of?
        raise BlobHashMismatch(sha256, h.hexdigest())
    if response.is_success and size is not None and sent != size:
        raise BlobProtocolError(f"{sent} bytes were sent, not the {size} declared")
    _check_descriptor(response, sha256, sent)
    return sha256


async def upload_file(
    base_url: str,
    key: SecretKey,
    path: str | os.PathLike[str],
    *,
    client: httpx.AsyncClient | None = None,
    timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
    job: str | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> str:
    """Upload a file without holding it: hashed in one pass, then sent from a second read.
    Returns its sha256 hex once the server has acknowledged exactly it."""
    digest, size = await anyio.to_thread.run_sync(lambda: file_sha256(path, chunk_size=chunk_size))
    return await upload_stream(
        base_url,
        key,
        _file_chunks(path, size, chunk_size),
        sha256=digest,
        size=size,
        client=client,
        timeout=timeout,
        job=job,
    )


async def upload(
    base_url: str,
    key: SecretKey,
    data: bytes,
    *,
    client: httpx.AsyncClient | None = None,
    timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
    job: str | None = None,
) -> str:
    """Upload ``data`` (for ``job``, if given); returns its sha256 hex once the server has acknowledged exactly it.

    The blob is then at ``blob_url(base_url, sha256)``.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError("data must be bytes")
    data = bytes(data)
    digest = sha256_hex(data)
    headers = {"Authorization": auth_header(key, digest, job=job), "Content-Type": "application/octet-stream"}
    http = _client(client, timeout)
    try:
        response = await http.put(f"{base_url.rstrip('/')}/upload", content=data, headers=headers)
    except httpx.HTTPError as e:
        raise BlobClientError(f"upload failed: {type(e).__name__}: {e}") from e
    finally:
        if client is None:
            await http.aclose()
    _check_descriptor(response, digest, len(data))
    return digest


def _resolve(url_or_base: str, sha256: str, max_bytes: int) -> str:
    """The blob's URL: ``url_or_base`` if it names this blob, else ``<url_or_base>/<sha256>``."""
    _check_hash(sha256)
    if max_bytes < 0:
        raise ValueError("max_bytes must be >= 0")
    m = _BLOB_PATH.search(httpx.URL(url_or_base).path)
    if m is not None:
        if m.group(1) != sha256:
            raise ValueError("the URL names another blob than the expected sha256")
        return url_or_base
    return blob_url(url_or_base, sha256)


async def download(
    url_or_base: str,
    sha256: str,
    *,
    max_bytes: int,
    client: httpx.AsyncClient | None = None,
    timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
) -> bytes:
    """Fetch the blob ``sha256`` and return its bytes, verified.

    ``url_or_base`` is either a blob URL (its path ends in ``/<sha256>[.ext]``, which must
    be this hash) or a server URL to which ``/<sha256>`` is appended. Raises
    :class:`BlobTooLarge` past ``max_bytes`` (reading stops there),
    :class:`BlobHashMismatch` if the bytes hash to anything else, :class:`BlobNotFound`
    on 404 and :class:`BlobHTTPError` on any other refusal.
    """
    url = _resolve(url_or_base, sha256, max_bytes)
    http = _client(client, timeout)
    try:
        async with http.stream("GET", url, headers={"Accept-Encoding": "identity"}) as response:
            if not response.is_success:
                await response.aread()
                raise _http_error(response)
            if response.status_code != 200:
                raise BlobProtocolError(f"unexpected status {response.status_code} for a whole blob")
            declared = response.headers.get("content-length")
            identity = response.headers.get("content-encoding", "identity").lower() == "identity"
            if identity and declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise BlobTooLarge(max_bytes)  # refused before reading anything
            h = hashlib.sha256()
            parts: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():  # decoded: the limit bounds what we hold
                size += len(chunk)
                if size > max_bytes:
                    raise BlobTooLarge(max_bytes)
                h.update(chunk)
                parts.append(chunk)
    except httpx.HTTPError as e:
        raise BlobClientError(f"download failed: {type(e).__name__}: {e}") from e
    finally:
        if client is None:
            await http.aclose()
    actual = h.hexdigest()
    if actual != sha256:
        raise BlobHashMismatch(sha256, actual)
    return b"".join(parts)


class _Restart(Exception):
    """The server sent the whole blob (or refused our range): start again from byte 0."""


async def download_to_file(
    url_or_base: str,
    sha256: str,
    path: str | os.PathLike[str],
    *,
    max_bytes: int,
    client: httpx.AsyncClient | None = None,
    timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
    resume_attempts: int = RESUME_ATTEMPTS,
    chunk_size: int = CHUNK_SIZE,
) -> int:
    """Stream the blob ``sha256`` into ``path``, verified; returns its size.

    The bytes go to ``<path>.part``, hashed as they are written; the file takes its name only
    once it is whole and hashes to ``sha256`` (fsynced first), so ``path`` never holds bad
    bytes. After a dropped connection or a timeout the download goes on from where it stopped
    (``Range: bytes=<n>-`` with ``If-Range: "<sha256>"``), up to ``resume_attempts`` times; a
    ``.part`` file an earlier call left is hashed and continued the same way. A server that
    answers a range with the whole blob is read from the start. ``max_bytes`` is enforced from
    the headers before reading and while reading. Errors as :func:`download`; on any but a
    dropped connection the ``.part`` file is removed.
    """
    url = _resolve(url_or_base, sha256, max_bytes)
    final = Path(path)
    part = final.with_name(final.name + ".part")
    http = _client(client, timeout)
    f = await anyio.to_thread.run_sync(lambda: open(part, "a+b"))  # closed below
    keep_part = False
    try:
        h, size = await anyio.to_thread.run_sync(_hash_open_file, f, chunk_size)
        if size > max_bytes:
            h, size = await anyio.to_thread.run_sync(_truncate, f)
        resumed_from = size
        dropped = 0
        while True:
            try:
                size = await _fetch_into(http, url, sha256, f, h, size, max_bytes, chunk_size)
                break
            except _Restart:
                h, size = await anyio.to_thread.run_sync(_truncate, f)
                resumed_from = 0
            except httpx.TransportError as e:  # the connection dropped or timed out: resume
                size = await anyio.to_thread.run_sync(f.seek, 0, os.SEEK_END)  # what did arrive
                dropped += 1
                if dropped > resume_attempts:
                    keep_part = True  # a later call resumes from it
                    raise BlobClientError(f"download failed: {type(e).__name__}: {e}") from e
                await asyncio.sleep(min(0.1 * 2**dropped, 3.0))
        actual = h.hexdigest()
        if actual != sha256 and resumed_from:
            # The part file we continued may be what is wrong: fetch the whole blob once more.
            h, size = await anyio.to_thread.run_sync(_truncate, f)
            size = await _fetch_into(http, url, sha256, f, h, 0, max_bytes, chunk_size)
            actual = h.hexdigest()
        if actual != sha256:
            raise BlobHashMismatch(sha256, actual)
        await anyio.to_thread.run_sync(_sync, f)
        f.close()
        await anyio.to_thread.run_sync(os.replace, part, final)
        return size
    except httpx.HTTPError as e:
        raise BlobClientError(f"download failed: {type(e).__name__}: {e}") from e
    finally:
        f.close()
        if not keep_part:
            try:
                os.unlink(part)  # after a successful rename the name is already gone
            except FileNotFoundError:
                pass
        if client is None:
            await http.aclose()


def _hash_open_file(f: BinaryIO, chunk_size: int) -> tuple[_Hash, int]:
    """The running hash and size of what the file holds (a ``.part`` left by an earlier call)."""
    h = hashlib.sha256()
    size = 0
    f.seek(0)
    while chunk := f.read(chunk_size):
        h.update(chunk)
        size += len(chunk)
    return h, size


def _sync(f: BinaryIO) -> None:
    f.flush()
    os.fsync(f.fileno())


def _truncate(f: BinaryIO) -> tuple[_Hash, int]:
    f.seek(0)
    f.truncate()
    return hashlib.sha256(), 0


async def _fetch_into(
    http: httpx.AsyncClient,
    url: str,
    sha256: str,
    f: BinaryIO,
    h: _Hash,
    offset: int,
    max_bytes: int,
    chunk_size: int,
) -> int:
    """One GET of the blob from ``offset`` on, appended to ``f`` and to the hash ``h``; returns the
    size reached. Bytes received before a dropped connection are kept (written and hashed)."""
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers |= {"Range": f"bytes={offset}-", "If-Range": f'"{sha256}"'}
    size = offset
    pending = bytearray()  # up to chunk_size bytes, then hashed and written by a worker thread

    def hash_and_write(data: bytes | bytearray) -> None:
        h.update(data)
        f.write(data)

    writer = ChunkWriter(hash_and_write)  # the next chunk arrives while one is written
    async with http.stream("GET", url, headers=headers) as response:
        if offset and response.status_code == 416:  # nothing after ``offset``
            await response.aread()
            m = _UNSATISFIED_RANGE.fullmatch(response.headers.get("content-range", "").strip())
            if m is not None and int(m.group(1)) == offset:
                return offset  # the part file already holds the whole blob
            raise _Restart
        if not response.is_success:
            await response.aread()
            raise _http_error(response)
        if response.headers.get("content-encoding", "identity").lower() != "identity":
            raise BlobProtocolError("the server encoded the blob although identity was asked for")
        if response.status_code == 206 and offset:
            m = _CONTENT_RANGE.fullmatch(response.headers.get("content-range", "").strip())
            if m is None or int(m.group(1)) != offset:
                raise BlobProtocolError("the server answered another range than the one asked for")
            total = int(m.group(3))
        elif response.status_code == 200:
            if offset:
                raise _Restart
            declared = response.headers.get("content-length")
            total = int(declared) if declared is not None and declared.isdigit() else 0
        else:
            raise BlobProtocolError(f"unexpected status {response.status_code} for a blob")
        if total > max_bytes:
            raise BlobTooLarge(max_bytes)  # refused before reading anything
        try:
            async for chunk in response.aiter_raw():
                size += len(chunk)
                if size > max_bytes:
                    raise BlobTooLarge(max_bytes)
                pending += chunk
                if len(pending) >= chunk_size:
                    data, pending = pending, bytearray()
                    await writer.put(data)
            if pending:
                await writer.put(pending)
            await writer.drain()
        except httpx.TransportError:
            writer.settle()
            hash_and_write(pending)  # the bytes that did arrive are good so far: a resume goes on after them
            raise
        finally:
            writer.settle()  # before the caller reads the file's length or closes it
    return size
