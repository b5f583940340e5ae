"""A content-addressed blob store compatible with Blossom (BUD-01, BUD-02), under ``/blobs``.

The reference agents exchange dataset shards and trained models through it. A blob is
named by the lowercase hex SHA-256 of its bytes; nothing read back is trusted without
checking that hash (``service.api.blob_client.download`` does).

Endpoints (the Blossom *server URL* is ``https://<host>/blobs``, so that blob paths
never collide with ``/v1``, ``/admin``, ``/metrics``, ``/docs`` or ``/openapi.json``):

``GET /blobs/<sha256>[.ext]`` and ``HEAD /blobs/<sha256>[.ext]`` (BUD-01)
    The bytes, ``application/octet-stream``, streamed from the blob's file ``blob_io_chunk_bytes``
    at a time, with ``Content-Length``, ``ETag: "<sha256>"``, ``Last-Modified``,
    ``Accept-Ranges: bytes`` and ``Cache-Control: public, max-age=31536000, immutable``. One
    byte range per request (:func:`byte_range`: ``bytes=a-b``, ``bytes=a-``, ``bytes=-n``) is
    answered 206 with ``Content-Range``, so that a client resumes a dropped download; a range
    that selects nothing is 416 ``range_not_satisfiable`` (``Content-Range: bytes */<size>``);
    other ``Range`` headers, and an ``If-Range`` naming another version, get the whole blob.
    400 ``invalid_hash`` unless the name is 64 lowercase hex characters with an optional short
    alphanumeric extension; 404 ``blob_not_found``.

``PUT /blobs/upload`` (BUD-02)
    The raw body is the blob. ``Authorization: Nostr <base64 event>``: a kind-24242 event,
    strictly verified (NIP-01 id and signature), ``created_at`` at most 60 s in the future
    and at most ``blob_auth_max_age_seconds`` old, a ``["t","upload"]`` tag, a NIP-40
    ``["expiration", <unix ts>]`` tag in the future, and an ``["x", <sha256>]`` tag equal
    to the hash of the body received, and optionally one ``["e", <job id>]`` naming the job
    the blob is for. Each authorization event is good for one upload (including a failed
    one). Answers the BUD-02 blob descriptor
    ``{"url", "sha256", "size", "type", "uploaded"}``; uploading content already stored
    answers the same descriptor (``uploaded`` is the first upload's time).

``HEAD /blobs/upload`` (BUD-06, minimal)
    200 if a blob of ``X-Content-Length`` bytes would fit (size limit, store quota), 413 if not.

Who may upload (:func:`authorize`). By default only a key that takes part in a job that is
not final: its customer, its designated validators, its named providers (``p`` tags and
private-shard recipients); and, for a ``collecting`` job that admits any provider (no ``p``
tag, a plain shard), any key whose authorization names that job with its ``e`` tag. A
named job must be open and the key must qualify for it (403 ``job_not_open`` /
``not_a_participant``); without an ``e`` tag the upload counts for the newest open job the
key takes part in. A non-empty ``blob_allowed_pubkeys`` replaces this rule: exactly those
keys may upload (403 ``pubkey_not_allowed`` for others), with or without a job.

Quotas (413): per key, the blobs it uploaded for jobs that are still open (and for no job)
count at most ``blob_key_quota_count`` blobs and ``blob_key_quota_bytes`` bytes
(``key_quota_exceeded``); the whole store at most ``blob_store_quota_bytes``
(``store_full``). A blob already stored takes no new space, and one the key already holds
counts once. The checks run before reading the body (with ``Content-Length`` and the ``x``
tag) and again with the exact size before the blob is committed; concurrent uploads can
overshoot by what is in flight at that moment.

Expiry (:func:`sweep`, run by the leader every ``blob_sweep_interval_seconds``, at most
``blob_sweep_batch`` blobs per pass): a blob goes once every job that references it (by
an upload naming it, or a counted result's model hash) is final and has been for
``blob_retention_seconds``; a blob no job references goes ``blob_unreferenced_grace_seconds``
after its last upload. Each deletion is a compare-and-set of the blob's row (the condition
checked again in the ``DELETE``), and the file is removed before that transaction commits,
so an upload of the same blob racing with it waits and stores it again. Files left without
a row (a store from before these records, a crashed deletion) are removed once unchanged
for the retention.

Every refusal is an RFC 9457 problem (``service.api.errors``) with its own ``code`` and,
for Blossom clients, an ``X-Reason`` header carrying the same human-readable detail.

Storage: ``<blob_dir>/<sha256>``, the directory created with mode 0700 on first use; the
records (``blob_objects``: hash and size; ``blob_uploads``: uploader and job) are in the
database, written before the file is renamed into place. Replicas must share ``blob_dir``.
An upload streams into ``<blob_dir>/.tmp-<random>`` (counted while it arrives: over
``blob_max_bytes`` stops reading at once; hashed and written ``blob_io_chunk_bytes`` at a
time off the event loop, so memory does not grow with the blob), is fsynced, then renamed
onto its final name, so a blob file is always complete; failed uploads remove their
temporary file, and temporary files left by a crash are removed (after an hour) on start.

Process-local state (acceptable here, by design): the used-authorization set and the
rate-limit buckets live in the process. With several replicas, one authorization event
could be used once per replica; because it names the hash it authorizes (the ``x`` tag),
the worst case is the same bytes uploaded again by the same key, which is idempotent.
Used ids are kept only as long as the event could still pass (``min(expiration,
created_at + blob_auth_max_age_seconds)``), so the set is bounded by the rate limits.

Settings read (with ``getattr`` defaults, :data:`DEFAULTS`) from ``app.state.settings``;
the database is ``app.state.sessions``.
"""

from __future__ import annotations

import asyncio
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
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import formatdate
from pathlib import Path
from stat import S_ISREG
from typing import Any, BinaryIO, cast

import anyio
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy import (
    ColumnElement,
    CursorResult,
    and_,
    delete,
    exists,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.requests import ClientDisconnect

from service.api.blob_io import ChunkWriter
from service.api.errors import ApiError, responses
from service.api.limits import RateLimiter, client_address
from service.api.models import BlobObject, BlobUpload
from service.db import insert_ignore, utcnow
from service.escrow.models import FINAL_STATES, Job, JobState, Result
from service.nostr.nip01 import Event, EventError, EventErrorReason, verify_event
from service.nostr.nip19 import decode_npub
from service.nostr.protocol import CodecError
from service.nostr.protocol.job import read_job_spec

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
CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Headers": "Authorization, *",
    "Access-Control-Allow-Methods": "GET, HEAD, PUT, OPTIONS",
    "Access-Control-Expose-Headers": "*",
}

DEFAULTS = {
    "blob_dir": "./blobs",
    "blob_max_bytes": 512 * 1024**2,
    "blob_io_chunk_bytes": 1024**2,
    "blob_uploads_per_minute": 30.0,
    "blob_uploads_burst": 10,
    "blob_allowed_pubkeys": (),
    "blob_auth_max_age_seconds": 3600,
    "public_url": None,
    "blob_key_quota_bytes": 2 * 1024**3,
    "blob_key_quota_count": 64,
    "blob_store_quota_bytes": 16 * 1024**3,
    "blob_retention_seconds": 7 * 86_400,
    "blob_unreferenced_grace_seconds": 3600,
    "blob_sweep_interval_seconds": 300.0,
    "blob_sweep_batch": 500,
}
FINAL = tuple(x.value for x in FINAL_STATES)
NO_JOB = ""  # blob_uploads.job_id of an upload that names no job
MAX_CANDIDATE_JOBS = 50  # open jobs mentioning a key, read to find its newest role

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
            os.chmod(self.directory, 0o700)  # mkdir's mode is masked by the umask

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

    async def put_stream(
        self,
        chunks: AsyncIterator[bytes],
        *,
        max_bytes: int,
        accept: set[str] | None = None,
        before_commit: Callable[[str, int], Awaitable[None]] | None = None,
    ) -> tuple[StoredBlob, bool]:
        """Store a stream; returns (the blob, whether it was new).

        Raises :class:`BlobTooLarge` as soon as more than ``max_bytes`` arrived, and
        :class:`HashNotAccepted` if ``accept`` is given and the hash is not in it (nothing is stored
        then). ``before_commit(sha256, size)`` runs once the bytes are complete and before the
        file takes its name (it records the blob, and may refuse it by raising). The temporary
        file never outlives a failed call.
        """
        tmp = self.directory / f"{TEMP_PREFIX}{secrets.token_hex(12)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
        h = hashlib.sha256()
        size = 0
        pending = bytearray()  # up to chunk_size bytes, then hashed and written by a worker thread
        try:
            with os.fdopen(fd, "wb", buffering=0) as f:

                def hash_and_write(data: bytes | bytearray) -> None:
                    h.update(data)
                    f.write(data)

                writer = ChunkWriter(hash_and_write)  # the next chunk arrives while one is written
                try:
                    async for chunk in chunks:
                        if not chunk:
                            continue
                        size += len(chunk)
                        if size > max_bytes:
                            raise BlobTooLarge(f"blob over {max_bytes} bytes")
                        pending += chunk
                        if len(pending) >= self.chunk_size:
                            data, pending = pending, bytearray()
                            await writer.put(data)
                    if pending:
                        await writer.put(pending)
                    await writer.drain()
                finally:
                    writer.settle()  # before the file closes
                await anyio.to_thread.run_sync(os.fsync, f.fileno())
            sha256 = h.hexdigest()
            if accept is not None and sha256 not in accept:
                raise HashNotAccepted(sha256)
            if before_commit is not None:
                await before_commit(sha256, size)
            return await anyio.to_thread.run_sync(self._commit, tmp, sha256, size)
        finally:
            try:
                os.unlink(tmp)  # after a successful rename the name is already gone
            except FileNotFoundError:
                pass

    def _commit(self, tmp: Path, sha256: str, size: int) -> tuple[StoredBlob, bool]:
        final = self.path(sha256)
        st = self.stat(sha256)
        if st is not None and st.st_size == size and self.hash_file(final) == sha256:
            return StoredBlob(sha256, size, int(st.st_mtime)), False  # already stored, intact
        if st is not None:
            log.warning("blob %s on disk does not match its hash; replacing it with the uploaded copy", sha256)
        os.replace(tmp, final)
        self._fsync_dir()
        st = os.stat(final)
        return StoredBlob(sha256, st.st_size, int(st.st_mtime)), True

    def remove(self, sha256: str) -> bool:
        """Delete a blob's file; False if there was none."""
        try:
            os.unlink(self.path(sha256))
        except FileNotFoundError:
            return False
        return True

    def remove_if_older(self, sha256: str, before: float) -> bool:
        """Delete a blob's file only if it was last written before ``before`` (a fresh upload stays)."""
        st = self.stat(sha256)
        return st is not None and st.st_mtime < before and self.remove(sha256)

    def older_blobs(self, before: float, limit: int) -> list[str]:
        """Up to ``limit`` blob names whose file was last written before ``before`` (Unix time)."""
        out: list[str] = []
        for entry in os.scandir(self.directory):
            if _HEX64.fullmatch(entry.name) is None:
                continue
            try:
                if entry.stat(follow_symlinks=False).st_mtime < before:
                    out.append(entry.name)
            except FileNotFoundError:
                continue
            if len(out) >= limit:
                break
        return out

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
    key_quota_bytes: int = 2 * 1024**3
    key_quota_count: int = 64
    store_quota_bytes: int = 16 * 1024**3
    retention_seconds: int = 7 * 86_400
    grace_seconds: int = 3600
    sweep_interval: float = 300.0
    sweep_batch: int = 500


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
        store=BlobStore(str(_setting(settings, "blob_dir")), chunk_size=int(_setting(settings, "blob_io_chunk_bytes"))),
        seen=SeenAuth(),
        limits=RateLimiter(
            float(_setting(settings, "blob_uploads_per_minute")), int(_setting(settings, "blob_uploads_burst"))
        ),
        max_bytes=int(_setting(settings, "blob_max_bytes")),
        allowed=_allowed(_setting(settings, "blob_allowed_pubkeys")),
        auth_max_age=int(_setting(settings, "blob_auth_max_age_seconds")),
        public_url=str(public_url).rstrip("/") if public_url else None,
        key_quota_bytes=int(_setting(settings, "blob_key_quota_bytes")),
        key_quota_count=int(_setting(settings, "blob_key_quota_count")),
        store_quota_bytes=int(_setting(settings, "blob_store_quota_bytes")),
        retention_seconds=int(_setting(settings, "blob_retention_seconds")),
        grace_seconds=int(_setting(settings, "blob_unreferenced_grace_seconds")),
        sweep_interval=float(_setting(settings, "blob_sweep_interval_seconds")),
        sweep_batch=int(_setting(settings, "blob_sweep_batch")),
    )


def service_for(app: FastAPI) -> BlobService:
    """The app's blob service (built on first use from its settings)."""
    state = app.state
    svc = getattr(state, "blobs", None)
    if svc is None:
        svc = state.blobs = build_service(state.settings)
    return svc


def service(request: Request) -> BlobService:
    return service_for(request.app)


def _client(request: Request) -> str:
    return client_address(request)


def _rate(svc: BlobService, key: str) -> None:
    allowed, wait = svc.limits.allow(key)
    if not allowed:
        raise _error(
            429,
            "rate_limited",
            f"too many uploads; retry in {wait:.0f} s",
            {"Retry-After": str(max(1, int(wait + 0.999)))},
        )


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
        event = verify_event(obj, now=now, max_future=MAX_FUTURE_SECONDS, max_age=max_age, max_bytes=MAX_AUTH_HEADER)
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
    if len(expirations) > 1 or not expirations[0].isascii() or not expirations[0].isdigit() or len(expirations[0]) > 19:
        raise _auth_error("bad_auth_event", "the expiration tag must be one Unix timestamp")
    if int(expirations[0]) <= now:
        raise _auth_error("auth_expired", "the authorization event has expired")
    if not _tag_values(event, "x"):
        raise _auth_error("missing_hash_tag", "the event must have an ['x', <sha256 of the blob>] tag")
    return event


# ------------------------------------------------------------------ who may upload, quotas


def job_tag(event: Event) -> str | None:
    """The job an upload names (``["e", <job id>]``), or None; at most one."""
    values = _tag_values(event, "e")
    if len(values) > 1:
        raise _error(400, "invalid_job_id", "an upload names at most one job (one 'e' tag)")
    if values and _HEX64.fullmatch(values[0]) is None:
        raise _error(400, "invalid_job_id", "the 'e' tag must be a job id (64 lowercase hex characters)")
    return values[0] if values else None


@dataclass(frozen=True, slots=True)
class Roles:
    """Who takes part in a job, as its request says."""

    participants: frozenset[str]
    open_to_anyone: bool  # no named provider and a plain shard: any key may submit


def job_roles(job: Job) -> Roles:
    """The customer, designated validators and named providers of a stored job request."""
    try:
        event = Event.from_dict(json.loads(job.request_raw))
        escrow = next(t[1] for t in event.tags if len(t) >= 2 and t[0] == "escrow")
        spec = read_job_spec(event.tags, escrow)
    except (ValueError, KeyError, TypeError, StopIteration, CodecError):
        return Roles(frozenset({job.customer}), False)  # not a request we can read: its customer only
    named = {*spec.validators, *spec.providers, *(sh.provider for sh in spec.shards if sh.provider)}
    return Roles(
        frozenset({job.customer, *named}), not spec.providers and any(sh.provider is None for sh in spec.shards)
    )


async def _newest_role(s: AsyncSession, pubkey: str) -> str | None:
    """The newest open job ``pubkey`` takes part in (customer, validator, named provider)."""
    rows = (
        await s.scalars(
            select(Job)
            .where(Job.state.not_in(FINAL), or_(Job.customer == pubkey, Job.request_raw.contains(pubkey)))
            .order_by(Job.created_at.desc())
            .limit(MAX_CANDIDATE_JOBS)
        )
    ).all()
    return next((j.id for j in rows if pubkey in job_roles(j).participants), None)


async def authorize(s: AsyncSession, svc: BlobService, pubkey: str, named: str | None) -> str:
    """The job an upload by ``pubkey`` counts for (``NO_JOB`` for none), or a 403."""
    job = None
    if named is not None:
        job = await s.get(Job, named)
        if job is None or job.state in FINAL:
            raise _error(403, "job_not_open", "the job named by the 'e' tag is unknown or finished")
    if svc.allowed:  # the operator's list replaces the participant rule
        if pubkey not in svc.allowed:
            raise _error(403, "pubkey_not_allowed", "this key may not upload blobs here")
        return named if named is not None else (await _newest_role(s, pubkey) or NO_JOB)
    if job is not None:
        roles = job_roles(job)
        if pubkey in roles.participants or (job.state == JobState.COLLECTING.value and roles.open_to_anyone):
            return job.id
        raise _error(403, "not_a_participant", "this key takes no part in the job it names")
    found = await _newest_role(s, pubkey)
    if found is None:
        raise _error(
            403,
            "not_a_participant",
            "this key takes part in no open job; a provider of a job "
            "open to anyone names it with an ['e', <job id>] tag",
        )
    return found


def _open_reference() -> ColumnElement[bool]:
    """An upload row that still counts: for no job, or for a job that is not final."""
    return or_(BlobUpload.job_id == NO_JOB, exists().where(Job.id == BlobUpload.job_id, Job.state.not_in(FINAL)))


async def check_quotas(s: AsyncSession, svc: BlobService, pubkey: str, sha256: str | None, size: int) -> None:
    """413 if storing ``size`` more bytes as ``sha256`` (None: not known yet) for ``pubkey`` is over a quota."""
    stored = sha256 is not None and await s.get(BlobObject, sha256) is not None
    if not stored:
        total = int(await s.scalar(select(func.coalesce(func.sum(BlobObject.size), 0))) or 0)
        if total + size > svc.store_quota_bytes:
            raise _error(413, "store_full", "the blob store is full; retry once older blobs have expired")
    mine = select(BlobUpload.sha256).where(BlobUpload.uploader == pubkey, _open_reference())
    if sha256 is not None and await s.scalar(select(exists(mine.where(BlobUpload.sha256 == sha256)))):
        return  # this key already holds this blob: nothing new counts
    count, used = (
        await s.execute(
            select(func.count(), func.coalesce(func.sum(BlobObject.size), 0)).where(BlobObject.sha256.in_(mine))
        )
    ).one()
    if count + 1 > svc.key_quota_count or used + size > svc.key_quota_bytes:
        raise _error(
            413,
            "key_quota_exceeded",
            f"this key's blobs for open jobs are limited to {svc.key_quota_count} blobs and "
            f"{svc.key_quota_bytes} bytes (it holds {count}, {used} bytes)",
        )


async def record(
    sessions: async_sessionmaker[AsyncSession], svc: BlobService, pubkey: str, job_id: str, sha256: str, size: int
) -> None:
    """Check the quotas with the exact size and record the blob and its upload, in one transaction."""
    async with sessions.begin() as s:
        await check_quotas(s, svc, pubkey, sha256, size)
        now = utcnow()
        await s.execute(insert_ignore(s, BlobObject.__table__), [{"sha256": sha256, "size": size, "stored_at": now}])
        res = cast(
            CursorResult,
            await s.execute(
                insert_ignore(s, BlobUpload.__table__),
                [{"sha256": sha256, "uploader": pubkey, "job_id": job_id, "uploaded_at": now}],
            ),
        )
        if res.rowcount != 1:  # uploaded again: the grace before expiry counts from now
            await s.execute(
                update(BlobUpload)
                .where(BlobUpload.sha256 == sha256, BlobUpload.uploader == pubkey, BlobUpload.job_id == job_id)
                .values(uploaded_at=now)
            )


# --------------------------------------------------------------------------------- expiry


def _expired(now: datetime, svc: BlobService) -> ColumnElement[bool]:
    """A blob no open or recently finished job references, and not uploaded within the grace."""
    retention_cut = now - timedelta(seconds=svc.retention_seconds)
    grace_cut = now - timedelta(seconds=svc.grace_seconds)
    live_job = or_(Job.state.not_in(FINAL), Job.updated_at > retention_cut)
    return and_(
        BlobObject.stored_at <= grace_cut,
        ~exists().where(BlobUpload.sha256 == BlobObject.sha256, BlobUpload.uploaded_at > grace_cut),
        ~exists().where(BlobUpload.sha256 == BlobObject.sha256, Job.id == BlobUpload.job_id, live_job),
        ~exists().where(Result.model_sha256 == BlobObject.sha256, Job.id == Result.job_id, live_job),
    )


async def sweep(svc: BlobService, sessions: async_sessionmaker[AsyncSession], *, now: datetime | None = None) -> int:
    """Delete up to ``svc.sweep_batch`` expired blobs (rows and files); returns how many went."""
    now = now or utcnow()
    async with sessions() as s:
        candidates = list(
            (
                await s.scalars(
                    select(BlobObject.sha256)
                    .where(_expired(now, svc))
                    .order_by(BlobObject.stored_at)
                    .limit(svc.sweep_batch)
                )
            ).all()
        )
    deleted = 0
    for sha256 in candidates:
        try:
            async with sessions.begin() as s:
                res = cast(
                    CursorResult,
                    await s.execute(delete(BlobObject).where(BlobObject.sha256 == sha256, _expired(now, svc))),
                )
                if res.rowcount == 1:
                    await anyio.to_thread.run_sync(svc.store.remove, sha256)  # before the commit (see above)
                    deleted += 1
        except Exception:  # one blob's failure never stops the others
            log.exception("deleting expired blob %s failed", sha256)
    if deleted < svc.sweep_batch:
        deleted += await _sweep_orphans(svc, sessions, now, svc.sweep_batch - deleted)
    return deleted


async def _sweep_orphans(
    svc: BlobService, sessions: async_sessionmaker[AsyncSession], now: datetime, limit: int
) -> int:
    """Files with no row (a store from before these records, a crashed deletion), untouched for the
    retention: removed (the retention, not the grace: an old store's files may serve open jobs)."""
    before = now.timestamp() - max(svc.retention_seconds, svc.grace_seconds)
    old = await anyio.to_thread.run_sync(svc.store.older_blobs, before, 10 * limit)
    if not old:
        return 0
    async with sessions() as s:
        known = set((await s.scalars(select(BlobObject.sha256).where(BlobObject.sha256.in_(old)))).all())
    removed = 0
    for sha256 in [h for h in old if h not in known][:limit]:
        if await anyio.to_thread.run_sync(svc.store.remove_if_older, sha256, before):
            removed += 1
    return removed


async def run_sweeper(app: FastAPI) -> None:
    """The leader's periodic sweep (a task; cancelled when leadership is lost)."""
    interval = float(_setting(app.state.settings, "blob_sweep_interval_seconds"))
    while True:
        # A store never used has no directory yet: nothing to sweep, and none is created for it.
        if (
            getattr(app.state, "blobs", None) is not None
            or Path(str(_setting(app.state.settings, "blob_dir"))).is_dir()
        ):
            svc = service_for(app)
            interval = svc.sweep_interval
            try:
                n = await sweep(svc, app.state.sessions)
                if n:
                    log.info("blob sweep: %d expired blob(s) deleted", n)
            except Exception:  # retried at the next pass
                log.exception("blob sweep failed")
        await asyncio.sleep(interval)


# ------------------------------------------------------------------------------- responses


class BlobDescriptor(BaseModel):
    url: str = Field(description="where the blob can be fetched (BUD-01 GET)")
    sha256: str
    size: int
    type: str = BLOB_TYPE
    uploaded: int = Field(description="Unix time of the first upload")


def _descriptor(request: Request, svc: BlobService, blob: StoredBlob) -> dict:
    base = svc.public_url or str(request.base_url).rstrip("/")  # base_url carries any root path
    return {
        "url": f"{base}{PREFIX}/{blob.sha256}",
        "sha256": blob.sha256,
        "size": blob.size,
        "type": BLOB_TYPE,
        "uploaded": blob.uploaded,
    }


def _parse_name(name: str) -> str:
    m = _NAME.fullmatch(name)
    if m is None:
        raise _error(
            400,
            "invalid_hash",
            "a blob is named by 64 lowercase hex characters (SHA-256), optionally followed by a file extension",
        )
    return m.group(1)


def _blob_headers(sha256: str) -> dict[str, str]:
    return {**CORS, "ETag": f'"{sha256}"', "Cache-Control": CACHE_CONTROL, "X-Content-Type-Options": "nosniff"}


def _not_modified(request: Request, sha256: str) -> bool:
    inm = request.headers.get("if-none-match")
    if not inm:
        return False
    tags = {t.strip().removeprefix("W/") for t in inm.split(",")}
    return "*" in tags or f'"{sha256}"' in tags


class RangeNotSatisfiable(Exception):
    """A byte range that starts past the end of the blob (or an empty suffix): 416."""


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The one byte range ``[start, end)`` a ``Range`` header asks of a blob of ``size`` bytes, or
    None to send the whole blob (no header, another unit, several ranges, bad syntax: RFC 9110
    lets a server ignore those). Raises :class:`RangeNotSatisfiable` for a well-formed range
    that selects nothing (``bytes=<size>-``, ``bytes=-0``), which is 416."""
    if header is None:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    first, last = first.strip(), last.strip()
    if not dash or not (first or last) or not (first.isascii() and last.isascii()):
        return None
    if (first and not first.isdigit()) or (last and not last.isdigit()) or len(first) > 19 or len(last) > 19:
        return None
    if not first:  # a suffix: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable
        return max(0, size - n), size
    start = int(first)
    if last and int(last) < start:
        return None  # invalid syntax: ignored
    if start >= size:
        raise RangeNotSatisfiable
    return start, size if not last else min(int(last) + 1, size)


def _range_applies(request: Request, sha256: str, st: os.stat_result) -> bool:
    """``If-Range``: the range holds only for this blob (its ETag, or the Last-Modified we sent)."""
    validator = request.headers.get("if-range")
    return validator is None or validator.strip() in (f'"{sha256}"', formatdate(st.st_mtime, usegmt=True))


async def _file_chunks(f: BinaryIO, start: int, end: int, chunk_size: int) -> AsyncIterator[bytes]:
    """``[start, end)`` of an open file, ``chunk_size`` at a time (the only buffer held)."""
    try:
        await anyio.to_thread.run_sync(f.seek, start)
        left = end - start
        while left > 0:
            chunk = await anyio.to_thread.run_sync(f.read, min(chunk_size, left))
            if not chunk:  # the file cannot shrink (it is replaced, never rewritten): defensive
                break
            left -= len(chunk)
            yield chunk
    finally:
        f.close()


def _serve(request: Request, name: str) -> Response:
    """GET and HEAD: the whole blob (200) or one byte range of it (206), streamed from its file."""
    sha256 = _parse_name(name)
    svc = service(request)
    st = svc.store.stat(sha256)
    if st is None:
        raise _error(404, "blob_not_found", "no blob with this hash")
    headers = {**_blob_headers(sha256), "Accept-Ranges": "bytes", "Last-Modified": formatdate(st.st_mtime, usegmt=True)}
    if _not_modified(request, sha256):
        return Response(status_code=304, headers=headers)
    size = st.st_size
    try:
        wanted = byte_range(request.headers.get("range"), size) if _range_applies(request, sha256, st) else None
    except RangeNotSatisfiable:
        raise _error(
            416, "range_not_satisfiable", f"the blob has {size} bytes", {"Content-Range": f"bytes */{size}"}
        ) from None
    start, end = wanted if wanted is not None else (0, size)
    status = 200
    if wanted is not None:
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    headers["Content-Length"] = str(end - start)
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type=BLOB_TYPE)
    try:  # opened now: a sweep removing the name later does not cut this response short
        f = open(svc.store.path(sha256), "rb")  # closed by _file_chunks
    except FileNotFoundError:
        raise _error(404, "blob_not_found", "no blob with this hash") from None
    return StreamingResponse(
        _file_chunks(f, start, end, svc.store.chunk_size), status_code=status, headers=headers, media_type=BLOB_TYPE
    )


_BLOB_RESPONSES = {
    200: {"description": "the blob's bytes", "content": {BLOB_TYPE: {}}},
    206: {"description": "one byte range of the blob (Range: bytes=a-b, a- or -n)", "content": {BLOB_TYPE: {}}},
    **responses(400, 404, 416),
}


@router.head("/upload", responses=responses(400, 413), include_in_schema=True)
async def upload_requirements(request: Request) -> Response:
    """BUD-06 (minimal): would a blob of ``X-Content-Length`` bytes fit (size limit, store quota)?"""
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
        async with request.app.state.sessions() as s:
            stored = sha is not None and await s.get(BlobObject, sha) is not None
            total = int(await s.scalar(select(func.coalesce(func.sum(BlobObject.size), 0))) or 0)
        if not stored and total + int(raw) > svc.store_quota_bytes:
            raise _error(413, "store_full", "the blob store is full; retry once older blobs have expired")
    return Response(status_code=200, headers=CORS)


@router.put(
    "/upload",
    response_model=BlobDescriptor,
    responses=responses(400, 401, 403, 413, 429, 503),
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "the blob's bytes",
            "content": {BLOB_TYPE: {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def upload(request: Request) -> JSONResponse:
    """Upload a blob (Blossom BUD-02). ``Authorization: Nostr <base64 event>``: kind 24242 with
    ``["t","upload"]``, ``["x", <sha256 of the body>]``, a future ``["expiration", <unix time>]``
    and, optionally, ``["e", <job id>]`` naming the job the blob is for; each authorization
    event is good for one upload. Only keys that take part in an open job may upload (see
    docs/api.md); per-key and store quotas apply. Answers the blob descriptor."""
    svc = service(request)
    _rate(svc, "ip:" + _client(request))
    length = request.headers.get("content-length")
    declared = 0
    if length is not None:
        if not length.isascii() or not length.isdigit() or len(length) > 19:
            raise _error(400, "invalid_content_length", "Content-Length must be a non-negative integer")
        declared = int(length)
        if declared > svc.max_bytes:
            raise _error(413, "blob_too_large", f"blobs are limited to {svc.max_bytes} bytes")
    now = int(time.time())
    event = parse_auth(request.headers.get("authorization"), now=now, max_age=svc.auth_max_age)
    named = job_tag(event)
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
    sessions = request.app.state.sessions
    async with sessions() as s:
        job_id = await authorize(s, svc, event.pubkey, named)
        await check_quotas(s, svc, event.pubkey, next(iter(accept)) if len(accept) == 1 else None, declared)

    async def before_commit(sha256: str, size: int) -> None:
        await record(sessions, svc, event.pubkey, job_id, sha256, size)

    try:
        blob, _new = await svc.store.put_stream(
            request.stream(), max_bytes=svc.max_bytes, accept=accept, before_commit=before_commit
        )
    except BlobTooLarge:
        raise _error(413, "blob_too_large", f"blobs are limited to {svc.max_bytes} bytes") from None
    except HashNotAccepted as e:
        raise _error(
            403, "hash_mismatch", f"the body's sha256 is {e.args[0]}, which no 'x' tag of the authorization names"
        ) from None
    except ClientDisconnect:
        raise _error(400, "incomplete_body", "the client went away before the body was complete") from None
    except OSError as e:
        log.error("blob store write failed: %s", type(e).__name__)
        raise _error(503, "storage_unavailable", "the blob could not be stored; retry later") from None
    return JSONResponse(_descriptor(request, svc, blob), headers=CORS)


@router.get("/{name}", responses=_BLOB_RESPONSES, response_class=Response)
async def get_blob(request: Request, name: str) -> Response:
    """A blob's bytes (Blossom BUD-01). ``name`` is its SHA-256 (64 lowercase hex), optionally
    with a file extension. One byte range (``Range: bytes=a-b``, ``a-`` or ``-n``) answers 206,
    for resuming a download; a range past the end is 416. Check the hash of what you receive."""
    return _serve(request, name)


@router.head("/{name}", responses=_BLOB_RESPONSES, response_class=Response)
async def has_blob(request: Request, name: str) -> Response:
    """Whether a blob is stored (Blossom BUD-01): 200 with its headers, or 404."""
    return _serve(request, name)


@router.options("/{name}", include_in_schema=False)
async def preflight(name: str) -> Response:
    return Response(status_code=204, headers={**CORS, "Access-Control-Max-Age": "86400"})
