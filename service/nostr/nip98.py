"""NIP-98 HTTP Auth: a signed kind-27235 event in ``Authorization: Nostr <base64>``.

Checks, each with its own reason: header scheme and base64/JSON; the event itself
(NIP-01, strict); kind 27235; ``created_at`` within ``window`` seconds of now (both
directions); the ``u`` tag equal to the request's absolute URL (query included);
the ``method`` tag equal to the request method; for a request with a body, a
``payload`` tag equal to the SHA-256 hex of the raw body; and the event id not used
before (replay), recorded in the database until it can no longer pass the window.

:func:`verify_request` records the id in a transaction of its own, committed before it
returns: whatever the caller then refuses (nothing owed, wrong state, rate limit), the
authorization is spent and a replay is refused as ``replayed``, never accepted later.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import json

from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.db import insert_ignore, rowcount
from service.nostr.kinds import KIND_HTTP_AUTH
from service.nostr.models import Nip98Seen
from service.nostr.nip01 import Event, EventError, verify_event

MAX_HEADER_BYTES = 16_384


class AuthReason(enum.StrEnum):
    MISSING = "missing_authorization"
    SCHEME = "wrong_scheme"
    ENCODING = "bad_encoding"
    EVENT = "invalid_event"
    KIND = "wrong_kind"
    EXPIRED = "outside_time_window"
    URL = "url_mismatch"
    METHOD = "method_mismatch"
    PAYLOAD = "payload_mismatch"
    REPLAY = "replayed"


class AuthError(Exception):
    def __init__(self, reason: AuthReason, message: str) -> None:
        self.reason = reason
        self.message = message
        super().__init__(f"{reason.value}: {message}")


def _tag(event: Event, name: str) -> str | None:
    values = [t[1] for t in event.tags if len(t) >= 2 and t[0] == name]
    if len(values) > 1:
        raise AuthError(AuthReason.EVENT, f"more than one {name!r} tag")
    return values[0] if values else None


def parse_header(header: str | None, *, now: int, window: int = 60) -> Event:
    """Decode and verify the event in an ``Authorization`` header (no request binding yet)."""
    if not header:
        raise AuthError(AuthReason.MISSING, "Authorization header required (NIP-98)")
    if len(header) > MAX_HEADER_BYTES:
        raise AuthError(AuthReason.ENCODING, "Authorization header too large")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "nostr" or not token:
        raise AuthError(AuthReason.SCHEME, "expected 'Authorization: Nostr <base64 event>'")
    try:
        obj = json.loads(base64.b64decode(token.strip(), validate=True))
    except (binascii.Error, ValueError):
        raise AuthError(AuthReason.ENCODING, "token is not base64 of a JSON event") from None
    try:
        event = verify_event(obj, now=now, max_future=window, max_age=window, max_bytes=MAX_HEADER_BYTES)
    except EventError as e:
        if e.reason.value in ("created_at_in_future", "created_at_too_old"):
            raise AuthError(AuthReason.EXPIRED, e.message) from None
        raise AuthError(AuthReason.EVENT, e.message) from None
    if event.kind != KIND_HTTP_AUTH:
        raise AuthError(AuthReason.KIND, f"kind must be {KIND_HTTP_AUTH}")
    return event


def check_request(event: Event, *, method: str, url: str, body: bytes | None) -> None:
    """Bind a verified auth event to this request (URL, method, body hash)."""
    u = _tag(event, "u")
    if u is None or u != url:
        raise AuthError(AuthReason.URL, "the 'u' tag must equal the request URL")
    m = _tag(event, "method")
    if m is None or m.upper() != method.upper():
        raise AuthError(AuthReason.METHOD, "the 'method' tag must equal the request method")
    payload = _tag(event, "payload")
    if body:
        if payload is None or payload != hashlib.sha256(body).hexdigest():
            raise AuthError(AuthReason.PAYLOAD, "the 'payload' tag must be the SHA-256 of the body")
    elif payload is not None and payload != hashlib.sha256(b"").hexdigest():
        raise AuthError(AuthReason.PAYLOAD, "a 'payload' tag was given for an empty body")


async def consume(session: AsyncSession, event: Event, *, now: int, window: int = 60) -> None:
    """Record the event as used; AuthError(REPLAY) if it was used before. Flushes only."""
    await session.execute(delete(Nip98Seen).where(Nip98Seen.expires_at < now))
    res = await session.execute(
        insert_ignore(session, Nip98Seen.__table__), [{"id": event.id, "expires_at": event.created_at + window + 1}]
    )
    if rowcount(res) != 1:
        raise AuthError(AuthReason.REPLAY, "this authorization event was already used")


async def verify_request(
    sessions: async_sessionmaker[AsyncSession],
    header: str | None,
    *,
    method: str,
    url: str,
    body: bytes | None,
    now: int,
    window: int = 60,
) -> Event:
    """All NIP-98 checks for one request, the event spent (committed); returns it (its pubkey is the caller)."""
    event = parse_header(header, now=now, window=window)
    check_request(event, method=method, url=url, body=body)
    async with sessions.begin() as session:
        await consume(session, event, now=now, window=window)
    return event


def build_header(event: Event) -> str:
    return "Nostr " + base64.b64encode(event.to_json().encode()).decode()
