"""Blob storage for the agents: a Blossom server (``service.api.blob_client``), with retries.

Shards and models travel as content-addressed blobs: a blob URL ends in ``/<sha256>``
(BUD-01), so whoever holds the URL also holds the hash the bytes must have, and
:meth:`Blobs.download` refuses any other bytes. Uploads are authorized by the agent's
own Nostr key (a one-use kind-24242 event, BUD-02).

Small payloads (shards, digits models) travel as ``bytes``; large ones (models of 100 MB and
more) as files: :meth:`Blobs.upload_file` and :meth:`Blobs.download_to_file` stream them with
one chunk in memory, and a download dropped midway resumes where it stopped.
"""

from __future__ import annotations

import asyncio
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx

from service.api import blob_client
from service.nostr.nip01 import SecretKey

#: The largest model an agent fetches unless told otherwise (``--max-model-bytes``): the blob
#: store's default blob limit, so a model of 100 MB and more goes through.
DEFAULT_MAX_MODEL_BYTES = 512 * 1024**2
_BLOB_SHA = re.compile(r"/([0-9a-f]{64})(?:\.[A-Za-z0-9]{1,16})?$")
RETRY_STATUSES = (429, 502, 503, 504)


class BlobError(RuntimeError):
    """A blob could not be stored or fetched (the cause is chained)."""


@dataclass(frozen=True, slots=True)
class Blob:
    url: str
    sha256: str
    size: int


def sha256_from_url(url: str) -> str | None:
    """The hash a content-addressed (Blossom) URL names, or ``None``."""
    try:
        path = httpx.URL(url).path
    except (httpx.InvalidURL, TypeError, ValueError):
        return None
    m = _BLOB_SHA.search(path)
    return m.group(1) if m else None


class Blobs:
    """One Blossom server (``base_url``, e.g. ``https://escrow.example.org/blobs``) and a key to upload with."""

    def __init__(
        self,
        base_url: str,
        key: SecretKey,
        *,
        retries: int = 6,
        timeout: float = 30.0,
        max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES,
    ) -> None:
        if max_model_bytes < 1:
            raise ValueError("max_model_bytes must be positive")
        if not (base_url.startswith("http://") or base_url.startswith("https://")):
            raise ValueError("the blob server URL must be http(s)://")
        self.base_url = base_url.rstrip("/")
        self.key = key
        self.retries = retries
        self.timeout = httpx.Timeout(timeout, connect=10.0)
        self.max_model_bytes = max_model_bytes  # what this agent accepts as a model from others

    def __repr__(self) -> str:
        return f"Blobs({self.base_url!r})"

    async def _retrying(self, call):
        for attempt in range(self.retries + 1):
            try:
                return await call()
            except blob_client.BlobHTTPError as exc:
                if exc.status not in RETRY_STATUSES or attempt == self.retries:
                    raise BlobError(str(exc)) from exc
                m = re.search(r"retry in (\d+)", exc.detail or "")
                backoff = float(min(2**attempt, 8))
                await asyncio.sleep(min(max(float(m.group(1)) if m else 0.0, backoff), 30.0))
            except blob_client.BlobClientError as exc:
                if isinstance(exc, (blob_client.BlobHashMismatch, blob_client.BlobTooLarge)) or attempt == self.retries:
                    raise BlobError(str(exc)) from exc
                await asyncio.sleep(0.5 * (attempt + 1))
        raise AssertionError("unreachable")

    async def has(self, sha256: str, size: int) -> bool:
        """Whether the server already holds this blob (BUD-01 ``HEAD``): then there is nothing to upload."""
        try:
            async with httpx.AsyncClient(timeout=self.timeout, trust_env=False) as http:
                r = await http.head(blob_client.blob_url(self.base_url, sha256))
        except httpx.HTTPError:
            return False
        return r.status_code == 200 and r.headers.get("content-length") == str(size)

    def locate(self, data: bytes) -> Blob:
        """Where ``data`` is (or will be) once uploaded: its URL names its sha256, so a job request
        can name a blob before it is uploaded."""
        sha = blob_client.sha256_hex(data)
        return Blob(url=blob_client.blob_url(self.base_url, sha), sha256=sha, size=len(data))

    async def upload(self, data: bytes, *, job: str | None = None) -> Blob:
        """Store ``data`` for ``job`` (unless the server already has exactly it); its URL names its sha256.

        The escrow's blob store admits uploads only from keys taking part in an open job, and
        counts a blob for the job the upload names (``job``): with a job the bytes are sent even
        if the server holds them (that records the job's use of them), without one only if not."""
        blob = self.locate(data)
        if job is not None or not await self.has(blob.sha256, blob.size):
            await self._retrying(
                lambda: blob_client.upload(self.base_url, self.key, data, timeout=self.timeout, job=job)
            )
        return blob

    async def download(self, url: str, sha256: str, *, max_bytes: int) -> bytes:
        """The bytes at ``url``, only if they hash to ``sha256`` and are at most ``max_bytes``.

        Streamed through a temporary file (hashed as it arrives, resumed if the connection drops),
        so the bytes are held once, when whole and verified."""
        with tempfile.TemporaryDirectory(prefix="fedstr-blob-") as tmp:
            path = await self.download_to_file(url, sha256, Path(tmp) / sha256, max_bytes=max_bytes)
            return await asyncio.to_thread(path.read_bytes)

    async def upload_file(self, path: str | os.PathLike[str], *, job: str | None = None) -> Blob:
        """Store a file for ``job`` as :meth:`upload` stores bytes, without holding it in memory
        (hashed in one pass, sent from a second)."""
        sha, size = await asyncio.to_thread(blob_client.file_sha256, path)
        blob = Blob(url=blob_client.blob_url(self.base_url, sha), sha256=sha, size=size)
        if job is not None or not await self.has(blob.sha256, blob.size):
            await self._retrying(
                lambda: blob_client.upload_file(self.base_url, self.key, path, timeout=self.timeout, job=job)
            )
        return blob

    async def download_to_file(self, url: str, sha256: str, path: str | os.PathLike[str], *, max_bytes: int) -> Path:
        """The blob at ``url`` streamed into ``path``, only once whole, hashing to ``sha256`` and
        at most ``max_bytes``; a dropped connection resumes where it stopped."""
        if not (url.startswith("https://") or url.startswith("http://")):
            raise BlobError("only http(s) URLs are fetched")
        try:
            await self._retrying(
                lambda: blob_client.download_to_file(url, sha256, path, max_bytes=max_bytes, timeout=self.timeout)
            )
        except ValueError as exc:  # the URL names another hash than the expected one
            raise BlobError(str(exc)) from exc
        return Path(path)
