"""A content-addressed blob store compatible with Blossom (BUD-01, BUD-02), under ``/blobs``.

The reference agents exchange dataset shards and trained models through it. A blob is
named by the lowercase hex SHA-256 of its bytes; nothing read back is trusted without
checking that hash (``service.api.blob_client.download`` does).

Endpoints (the Blossom *server URL* is ``https://<host>/blobs``, so that blob paths
never collide with ``/v1``, ``/admin``, ``/metrics``, ``/docs`` or ``/openapi.json``):

``GET /blobs/<sha256>[.ext]`` and ``HEAD /blobs/<sha256>[.ext]`` (BUD-01)
    The bytes, ``application/octet-stream``, with ``Content-Length``, ``ETag: "<sha256>"``
    and ``Cache-Control: public, max-age=31536000, immutable`` (single byte ranges are
    honoured). 400 ``invalid_hash`` unless the name is 64 lowercase hex characters with an
    optional short alphanumeric extension; 404 ``blob_not_found``.

``PUT /blobs/upload`` (BUD-02)
    The raw body is the blob. ``Authorization: Nostr <base64 event>``: a kind-24242 event,
    strictly verified (NIP-01 id and signature), ``created_at`` at most 60 s in the future
    and at most ``blob_auth_max_age_seconds`` old, a ``["t","upload"]`` tag, a NIP-40
    ``["expiration", <unix ts>]`` tag in the future, and an ``["x", <sha256>]`` tag equal
    to the hash of the body received. Each authorization event is good for one upload
    (including a failed one). Answers the BUD-02 blob descriptor
    ``{"url", "sha256", "size", "type", "uploaded"}``; uploading content already stored
    answers the same descriptor (``uploaded`` is the first upload's time).

``HEAD /blobs/upload`` (BUD-06, minimal)
    200 if a blob of ``X-Content-Length`` bytes would be accepted, 413 if not.

Every refusal is an RFC 9457 problem (``service.api.errors``) with its own ``code`` and,
for Blossom clients, an ``X-Reason`` header carrying the same human-readable detail.

Storage: ``<blob_dir>/<sha256>``, the directory created with mode 0700 on first use.
An upload streams into ``<blob_dir>/.tmp-<random>`` (counted while it arrives: over
``blob_max_bytes`` stops reading at once), is fsynced, then renamed onto its final name,
so a blob file is always complete; failed uploads remove their temporary file, and
temporary files left by a crash are removed (after an hour) on start.

Process-local state (acceptable here, by design): the used-authorization set and the
rate-limit buckets live in the process. With several replicas, one authorization event
could be used once per replica; because it names the hash it authorizes (the ``x`` tag),
the worst case is the same bytes uploaded again by the same key, which is idempotent.
Used ids are kept only as long as the event could still pass (``min(expiration,
created_at + blob_auth_max_age_seconds)``), so the set is bounded by the rate limits.

Settings read (with ``getattr`` defaults) from ``request.app.state.settings``:
``blob_dir`` ("./blobs"), ``blob_max_bytes`` (5 MiB), ``blob_uploads_per_minute`` (30),
``blob_uploads_burst`` (10), ``blob_allowed_pubkeys`` ([] = any authenticated key),
``blob_auth_max_age_seconds`` (3600), ``public_url`` (None = the request's base URL).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import json
import logging
import os
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.requests import ClientDisconnect

from service.api.errors import ApiError, responses
from service.api.limits import RateLimiter
from service.nostr.nip01 import Event, EventError, EventErrorReason, verify_event
from service.nostr.nip19 import decode_npub

log = logging.getLogger(__name__)

PREFIX = "/blobs"
KIND_BLOSSOM_AUTH = 24242
MAX_AUTH_HEADER = 16_384
MAX_FUTURE_SECONDS = 60
MAX_SEEN_AUTH = 100_000
TEMP_PREFIX = ".tmp-"
STALE_TEMP_SECONDS = 3600
CACHE_CONTROL = "public, max-age=31536000, immutable"
BLOB_TYPE = "application/octet-stream"
CORS = {"Access-Control-Allow-Origin": "*", "Access-Control-Allow-Headers": "Authorization, *",
        "Access-Control-Allow-Methods": "GET, HEAD, PUT, OPTIONS", "Access-Control-Expose-Headers": "*"}

DEFAULTS = {"blob_dir": "./blobs", "blob_max_bytes": 5 * 1024 * 1024, "blob_uploads_per_minute": 30.0,
            "blob_uploads_burst": 10, "blob_allowed_pubkeys": (), "blob_auth_max_age_seconds": 3600,
            "public_url": None}

_NAME = re.compile(r"([0-9a-f]{64})(?:\.[A-Za-z0-9]{1,16})?")
_HEX64 = re.compile(r"[0-9a-f]{64}")

router = APIRouter(prefix=PREFIX, tags=["blobs"])


def _header_text(text: str, limit: int = 300) -> str:
    """``text`` made safe for a header value (printable ASCII; it may quote client input)."""
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:limit]


def _error(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> ApiError:
    """An ApiError that Blossom clients also understand (``X-Reason``) and browsers may read."""
    return ApiError(status, code, detail, headers={**CORS, "X-Reason": _header_text(detail), **(headers or {})})


def _auth_error(code: str, detail: str) -> ApiError:
    return _error(401, code, detail, {"WWW-Authenticate": "Nostr"})


# ------------------------------------------------------------------------------ storage


class BlobTooLarge(Exception):
    """More bytes arrived than the limit allows."""


class HashNotAccepted(Exception):
    """The received bytes hash to a value the caller did not accept (``args[0]`` is it)."""


@dataclass(frozen=True, slots=True)
class StoredBlob:
    sha256: str
    size: int
    uploaded: int


class BlobStore:
    """Immutable blobs on local disk, one file per blob named by its SHA-256."""

    def __init__(self, directory: str | os.PathLike[str], *, chunk_size: int = 1 << 20) -> None:
        self.directory = Path(directory)
        self.chunk_size = chunk_size
        self._ensure_dir()
        self.remove_stale_temp_files()

    def _ensure_dir(self) -> None:
        if not self.directory.is_dir():
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self.directory, 0o700)   # mkdir's mode is masked by the umask

    def path(self, sha256: str) -> Path:
        if _HEX64.fullmatch(sha256) is None:
            raise ValueError("sha256 must be 64 lowercase hex characters")
        return self.directory / sha256

    def stat(self, sha256: str) -> os.stat_result | None:
        """The blob file's stat, or None if there is no such blob (or it is not a regular file)."""
        try:
            st = os.stat(self.path(sha256))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return st if S_ISREG(st.st_mode) else None

    def info(self, sha256: str) -> StoredBlob | None:
        st = self.stat(sha256)
        return None if st is None else StoredBlob(sha256, st.st_size, int(st.st_mtime))

    def hash_file(self, path: Path) -> str:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(self.chunk_size):
                h.update(chunk)
        return h.hexdigest()

    def remove_stale_temp_files(self, max_age: float = STALE_TEMP_SECONDS) -> int:
        """Remove temporary files older than ``max_age`` (left by a crash); younger ones may be in use."""
        removed = 0
        cutoff = time.time() - max_age
        for entry in os.scandir(self.directory):
            if entry.name.startswith(TEMP_PREFIX):
                try:
                    if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        os.unlink(entry.path)
                        removed += 1
                except FileNotFoundError:
                    pass
        return removed

    async def put_stream(self, chunks: AsyncIterator[bytes], *, max_bytes: int,
                         accept: set[str] | None = None) -> tuple[StoredBlob, bool]:
        """Store a stream; returns (the blob, whether it was new).

        Raises :class:`BlobTooLarge` as soon as more than ``max_bytes`` arrived, and
        :class:`HashNotAccepted` if ``accept`` is given and the hash is not in it (nothing is stored
        then). The temporary file never outlives a failed call.
        """
        tmp = self.directory / f"{TEMP_PREFIX}{secrets.token_hex(12)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
        h = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb", buffering=0) as f:
                async for chunk in chunks:
                    if not chunk:
                        continue
                    size += len(chunk)
                    if size > max_bytes:
                        raise BlobTooLarge(f"blob over {max_bytes} bytes")
                    h.update(chunk)
                    await anyio.to_thread.run_sync(f.write, chunk)
                await anyio.to_thread.run_sync(os.fsync, f.fileno())
            sha256 = h.hexdigest()
            if accept is not None and sha256 not in accept:
                raise HashNotAccepted(sha256)
            return await anyio.to_thread.run_sync(self._commit, tmp, sha256, size)
        finally:
            try:
                os.unlink(tmp)    # after a successful rename the name is already gone
            except FileNotFoundError:
                pass

    def _commit(self, tmp: Path, sha256: str, size: int) -> tuple[StoredBlob, bool]:
        final = self.path(sha256)
        st = self.stat(sha256)
        if st is not None and st.st_size == size and self.hash_file(final) == sha256:
            return StoredBlob(sha256, size, int(st.st_mtime)), False      # already stored, intact
        if st is not None:
            log.warning("blob %s on disk does not match its hash; replacing it with the uploaded copy", sha256)
        os.replace(tmp, final)
        self._fsync_dir()
        st = os.stat(final)
        return StoredBlob(sha256, st.st_size, int(st.st_mtime)), True

    def _fsync_dir(self) -> None:
        try:
            dfd = os.open(self.directory, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dfd)
        except OSError:
            pass
        finally:
            os.close(dfd)


# ----------------------------------------------------------------------- used auth events


class SeenAuth:
    """Ids of used authorization events, each kept until it could no longer pass anyway."""

    def __init__(self, max_entries: int = MAX_SEEN_AUTH) -> None:
        self.max_entries = max_entries
        self._until: dict[str, int] = {}
        self._heap: list[tuple[int, str]] = []

    def _purge(self, now: int) -> None:
        while self._heap and self._heap[0][0] < now:
            until, event_id = heapq.heappop(self._heap)
            if self._until.get(event_id) == until:
                del self._until[event_id]

    def add(self, event_id: str, until: int, now: int) -> bool | None:
        """Record a use; False if already used, None if the set is full."""
        self._purge(now)
        if event_id in self._until:
            return False
        if len(self._until) >= self.max_entries:
            return None
        self._until[event_id] = until
        heapq.heappush(self._heap, (until, event_id))
        return True

    def __len__(self) -> int:
        return len(self._until)


# --------------------------------------------------------------------------- configuration


@dataclass
class BlobService:
    store: BlobStore
    seen: SeenAuth
    limits: RateLimiter
    max_bytes: int
    allowed: frozenset[str]
    auth_max_age: int
    public_url: str | None


def _setting(settings: object, name: str) -> Any:
    value = getattr(settings, name, None)
    return DEFAULTS[name] if value is None else value


def _allowed(values: Any) -> frozenset[str]:
    if isinstance(values, str):
        values = [v for v in values.replace(",", " ").split() if v]
    out = set()
    for v in values or ():
        v = str(v).strip()
        if v.startswith("npub1"):
            v = decode_npub(v)
        v = v.lower()
        if _HEX64.fullmatch(v) is None:
            raise ValueError(f"blob_allowed_pubkeys: {v!r} is not a hex public key or npub")
        out.add(v)
    return frozenset(out)


def build_service(settings: object) -> BlobService:
    """The blob service for these settings (the router builds one lazily per app)."""
    public_url = _setting(settings, "public_url")
    return BlobService(
        store=BlobStore(str(_setting(settings, "blob_dir"))),
        seen=SeenAuth(),
        limits=RateLimiter(float(_setting(settings, "blob_uploads_per_minute")),
                           int(_setting(settings, "blob_uploads_burst"))),
        max_bytes=int(_setting(settings, "blob_max_bytes")),
        allowed=_allowed(_setting(settings, "blob_allowed_pubkeys")),
        auth_max_age=int(_setting(settings, "blob_auth_max_age_seconds")),
        public_url=str(public_url).rstrip("/") if public_url else None,
    )


def service(request: Request) -> BlobService:
    state = request.app.state
    svc = getattr(state, "blobs", None)
    if svc is None:
        svc = state.blobs = build_service(state.settings)
    return svc


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _rate(svc: BlobService, key: str) -> None:
    allowed, wait = svc.limits.allow(key)
    if not allowed:
        raise _error(429, "rate_limited", f"too many uploads; retry in {wait:.0f} s",
                     {"Retry-After": str(max(1, int(wait + 0.999)))})


# ---------------------------------------------------------------------------- authorization


def _tag_values(event: Event, name: str) -> list[str]:
    return [t[1] for t in event.tags if len(t) >= 2 and t[0] == name]


def parse_auth(header: str | None, *, now: int, max_age: int) -> Event:
    """Decode and verify a Blossom authorization header for an upload (not yet bound to a body)."""
    if not header:
        raise _auth_error("missing_authorization", "Authorization: Nostr <base64 kind-24242 event> required")
    if len(header) > MAX_AUTH_HEADER:
        raise _auth_error("bad_auth_encoding", "Authorization header too large")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "nostr" or not token.strip():
        raise _auth_error("wrong_scheme", "expected 'Authorization: Nostr <base64 event>'")
    try:
        obj = json.loads(base64.b64decode(token.strip(), validate=True))
    except (binascii.Error, ValueError, RecursionError):
        raise _auth_error("bad_auth_encoding", "the token is not base64 of a JSON event") from None
    try:
        event = verify_event(obj, now=now, max_future=MAX_FUTURE_SECONDS, max_age=max_age,
                             max_bytes=MAX_AUTH_HEADER)
    except EventError as e:
        if e.reason == EventErrorReason.CREATED_AT_IN_FUTURE:
            raise _auth_error("auth_not_yet_valid", e.message) from None
        if e.reason == EventErrorReason.CREATED_AT_TOO_OLD:
            raise _auth_error("auth_expired", e.message) from None
        raise _auth_error("bad_auth_event", f"{e.reason.value}: {e.message}") from None
    if event.kind != KIND_BLOSSOM_AUTH:
        raise _auth_error("wrong_kind", f"kind must be {KIND_BLOSSOM_AUTH}")
    verbs = _tag_values(event, "t")
    if set(verbs) != {"upload"}:
        raise _auth_error("wrong_verb", "the event must have a ['t', 'upload'] tag (and no other verb)")
    expirations = _tag_values(event, "expiration")
    if not expirations:
        raise _auth_error("missing_expiration", "the event must have an ['expiration', <unix time>] tag")
    if len(expirations) > 1 or not expirations[0].isascii() or not expirations[0].isdigit() \
            or len(expirations[0]) > 19:
        raise _auth_error("bad_auth_event", "the expiration tag must be one Unix timestamp")
    if int(expirations[0]) <= now:
        raise _auth_error("auth_expired", "the authorization event has expired")
    if not _tag_values(event, "x"):
        raise _auth_error("missing_hash_tag", "the event must have an ['x', <sha256 of the blob>] tag")
    return event


# ------------------------------------------------------------------------------- responses


class BlobDescriptor(BaseModel):
    url: str = Field(description="where the blob can be fetched (BUD-01 GET)")
    sha256: str
    size: int
    type: str = BLOB_TYPE
    uploaded: int = Field(description="Unix time of the first upload")


def _descriptor(request: Request, svc: BlobService, blob: StoredBlob) -> dict:
    base = svc.public_url or str(request.base_url).rstrip("/")   # base_url carries any root path
    return {"url": f"{base}{PREFIX}/{blob.sha256}", "sha256": blob.sha256, "size": blob.size, "type": BLOB_TYPE,
            "uploaded": blob.uploaded}


def _parse_name(name: str) -> str:
    m = _NAME.fullmatch(name)
    if m is None:
        raise _error(400, "invalid_hash", "a blob is named by 64 lowercase hex characters (SHA-256), "
                                          "optionally followed by a file extension")
    return m.group(1)


def _blob_headers(sha256: str) -> dict[str, str]:
    return {**CORS, "ETag": f'"{sha256}"', "Cache-Control": CACHE_CONTROL, "X-Content-Type-Options": "nosniff"}


def _not_modified(request: Request, sha256: str) -> bool:
    inm = request.headers.get("if-none-match")
    if not inm:
        return False
    tags = {t.strip().removeprefix("W/") for t in inm.split(",")}
    return "*" in tags or f'"{sha256}"' in tags


def _serve(request: Request, name: str) -> Response:
    sha256 = _parse_name(name)
    svc = service(request)
    st = svc.store.stat(sha256)
    if st is None:
        raise _error(404, "blob_not_found", "no blob with this hash")
    headers = _blob_headers(sha256)
    if _not_modified(request, sha256):
        return Response(status_code=304, headers=headers)
    return FileResponse(svc.store.path(sha256), media_type=BLOB_TYPE, stat_result=st, headers=headers)


_BLOB_RESPONSES = {200: {"description": "the blob's bytes", "content": {BLOB_TYPE: {}}},
                   **responses(400, 404)}


@router.head("/upload", responses=responses(400, 413), include_in_schema=True)
async def upload_requirements(request: Request) -> Response:
    """BUD-06 (minimal): would a blob of ``X-Content-Length`` bytes be accepted?"""
    svc = service(request)
    raw = request.headers.get("x-content-length") or request.headers.get("blossom-content-length")
    sha = request.headers.get("x-sha-256")
    if sha is not None and _HEX64.fullmatch(sha) is None:
        raise _error(400, "invalid_hash", "X-SHA-256 must be 64 lowercase hex characters")
    if raw is not None:
        if not raw.isascii() or not raw.isdigit() or len(raw) > 19:
            raise _error(400, "invalid_content_length", "X-Content-Length must be a non-negative integer")
        if int(raw) > svc.max_bytes:
            raise _error(413, "blob_too_large", f"blobs are limited to {svc.max_bytes} bytes")
    return Response(status_code=200, headers=CORS)


@router.put("/upload", response_model=BlobDescriptor,
            responses=responses(400, 401, 403, 413, 429, 503),
            openapi_extra={"requestBody": {"required": True, "description": "the blob's bytes",
                                           "content": {BLOB_TYPE: {"schema": {"type": "string",
                                                                              "format": "binary"}}}}})
async def upload(request: Request) -> JSONResponse:
    """Upload a blob (Blossom BUD-02). ``Authorization: Nostr <base64 event>``: kind 24242 with
    ``["t","upload"]``, ``["x", <sha256 of the body>]`` and a future ``["expiration", <unix time>]``;
    each authorization event is good for one upload. Answers the blob descriptor."""
    svc = service(request)
    _rate(svc, "ip:" + _client(request))
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isascii() or not length.isdigit() or len(length) > 19:
            raise _error(400, "invalid_content_length", "Content-Length must be a non-negative integer")
        if int(length) > svc.max_bytes:
            raise _error(413, "blob_too_large", f"blobs are limited to {svc.max_bytes} bytes")
    now = int(time.time())
    event = parse_auth(request.headers.get("authorization"), now=now, max_age=svc.auth_max_age)
    if svc.allowed and event.pubkey not in svc.allowed:
        raise _error(403, "pubkey_not_allowed", "this key may not upload blobs here")
    _rate(svc, "pubkey:" + event.pubkey)
    until = min(int(_tag_values(event, "expiration")[0]), event.created_at + svc.auth_max_age)
    used = svc.seen.add(event.id, until, now)
    if used is False:
        raise _auth_error("replayed", "this authorization event was already used")
    if used is None:
        raise _error(503, "busy", "too many recent uploads; retry later", {"Retry-After": "60"})
    accept = set(_tag_values(event, "x"))
    try:
        blob, _new = await svc.store.put_stream(request.stream(), max_bytes=svc.max_bytes, accept=accept)
    except BlobTooLarge:
        raise _error(413, "blob_too_large", f"blobs are limited to {svc.max_bytes} bytes") from None
    except HashNotAccepted as e:
        raise _error(403, "hash_mismatch",
                     f"the body's sha256 is {e.args[0]}, which no 'x' tag of the authorization names") from None
    except ClientDisconnect:
        raise _error(400, "incomplete_body", "the client went away before the body was complete") from None
    except OSError as e:
        log.error("blob store write failed: %s", type(e).__name__)
        raise _error(503, "storage_unavailable", "the blob could not be stored; retry later") from None
    return JSONResponse(_descriptor(request, svc, blob), headers=CORS)


@router.get("/{name}", responses=_BLOB_RESPONSES, response_class=Response)
async def get_blob(request: Request, name: str) -> Response:
    """A blob's bytes (Blossom BUD-01). ``name`` is its SHA-256 (64 lowercase hex), optionally
    with a file extension. Check the hash of what you receive."""
    return _serve(request, name)


@router.head("/{name}", responses=_BLOB_RESPONSES, response_class=Response)
async def has_blob(request: Request, name: str) -> Response:
    """Whether a blob is stored (Blossom BUD-01): 200 with its headers, or 404."""
    return _serve(request, name)


@router.options("/{name}", include_in_schema=False)
async def preflight(name: str) -> Response:  # noqa: ARG001
    return Response(status_code=204, headers={**CORS, "Access-Control-Max-Age": "86400"})
