"""An async client for Blossom blob servers (BUD-01 download, BUD-02 upload).

``base_url`` is the Blossom server URL: for fedstr-escrow that is ``https://<host>/blobs``.

* :func:`upload` signs a one-use kind-24242 authorization (``t=upload``, ``x=<sha256>``,
  ``expiration`` a few minutes ahead, and ``e=<job id>`` when the blob is for a job: the
  escrow's store admits uploads only for open jobs), PUTs the bytes, checks that the descriptor the
  server answers names the same hash and size, and returns the sha256 hex.
* :func:`download` fetches ``<base>/<sha256>`` (or a full blob URL), stops reading past
  ``max_bytes`` and refuses content whose SHA-256 is not the expected one.

Errors are :class:`BlobClientError` subclasses: :class:`BlobHashMismatch`,
:class:`BlobTooLarge`, :class:`BlobNotFound`, :class:`BlobHTTPError` (``status``,
``code`` from the problem document or ``X-Reason``), :class:`BlobProtocolError`.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import time

import httpx

from service.nostr.nip01 import SecretKey, sign_event

KIND_BLOSSOM_AUTH = 24242
AUTH_LIFETIME_SECONDS = 300
DEFAULT_TIMEOUT = httpx.Timeout(30.0, connect=10.0)
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
    if not response.is_success:
        raise _http_error(response)
    try:
        descriptor = response.json()
    except ValueError:
        raise BlobProtocolError("the server's answer is not a JSON blob descriptor") from None
    if not isinstance(descriptor, dict) or descriptor.get("sha256") != digest:
        raise BlobProtocolError("the server's descriptor names another hash")
    if descriptor.get("size") != len(data):
        raise BlobProtocolError("the server's descriptor gives another size")
    return digest


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
    _check_hash(sha256)
    if max_bytes < 0:
        raise ValueError("max_bytes must be >= 0")
    m = _BLOB_PATH.search(httpx.URL(url_or_base).path)
    if m is not None:
        if m.group(1) != sha256:
            raise ValueError("the URL names another blob than the expected sha256")
        url = url_or_base
    else:
        url = blob_url(url_or_base, sha256)
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
