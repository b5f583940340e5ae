"""Webhook hints from LND-side notifiers: authenticated, never trusted as facts.

A notifier (for example a script on the LND host) POSTs JSON ``{"payment_hash":
"<64 hex>"}`` with two headers:

- ``X-Fedstr-Timestamp``: Unix seconds when it was sent;
- ``X-Fedstr-Signature``: ``sha256=<hex HMAC-SHA256(secret, timestamp + "." + raw body)>``.

The signature is compared in constant time, the timestamp must be within the
replay window, and a signature is accepted once. A valid webhook only makes the
service look the invoice up in LND (:meth:`SettlementWatcher.confirm`): a forged or
mistaken "settled" for an unpaid invoice changes nothing. Invalid ones are
refused with a reason and counted.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import re

from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncSession

from service.db import insert_ignore, rowcount
from service.lightning.models import WebhookSeen

TS_HEADER = "x-fedstr-timestamp"
SIG_HEADER = "x-fedstr-signature"
MAX_BODY = 4096
_HASH = re.compile(r"[0-9a-f]{64}")


class WebhookReason(enum.StrEnum):
    NOT_CONFIGURED = "webhook_not_configured"
    MISSING_HEADERS = "missing_headers"
    BAD_TIMESTAMP = "bad_timestamp"
    STALE = "outside_replay_window"
    BAD_SIGNATURE = "bad_signature"
    REPLAYED = "replayed"
    TOO_LARGE = "body_too_large"
    BAD_BODY = "bad_body"


class WebhookError(Exception):
    def __init__(self, reason: WebhookReason, message: str) -> None:
        self.reason = reason
        self.message = message
        super().__init__(f"{reason.value}: {message}")


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def verify(secret: bytes | None, headers: dict[str, str], body: bytes, *, now: int, window: int) -> tuple[str, str]:
    """Check signature, window and body; returns (payment_hash, signature hex). No database access."""
    if not secret:
        raise WebhookError(WebhookReason.NOT_CONFIGURED, "FEDSTR_WEBHOOK_SECRET is not set")
    if len(body) > MAX_BODY:
        raise WebhookError(WebhookReason.TOO_LARGE, f"body over {MAX_BODY} bytes")
    ts, sig = headers.get(TS_HEADER), headers.get(SIG_HEADER)
    if not ts or not sig:
        raise WebhookError(WebhookReason.MISSING_HEADERS, f"{TS_HEADER} and {SIG_HEADER} are required")
    if not ts.isdigit() or len(ts) > 12:
        raise WebhookError(WebhookReason.BAD_TIMESTAMP, "timestamp must be Unix seconds")
    if abs(now - int(ts)) > window:
        raise WebhookError(WebhookReason.STALE, f"timestamp is more than {window} s from now")
    expected = sign(secret, int(ts), body)
    if not hmac.compare_digest(expected.encode(), sig.strip().encode()):
        raise WebhookError(WebhookReason.BAD_SIGNATURE, "signature does not match")
    try:
        obj = json.loads(body)
    except ValueError:
        raise WebhookError(WebhookReason.BAD_BODY, "body is not JSON") from None
    h = obj.get("payment_hash") if isinstance(obj, dict) else None
    if not isinstance(h, str) or not _HASH.fullmatch(h):
        raise WebhookError(WebhookReason.BAD_BODY, "payment_hash must be 64 lowercase hex characters")
    return h, expected[len("sha256=") :]


async def consume(session: AsyncSession, signature: str, *, now: int, window: int) -> None:
    """Accept a signature once (flush only); WebhookError(REPLAYED) the second time."""
    await session.execute(delete(WebhookSeen).where(WebhookSeen.expires_at < now))
    res = await session.execute(
        insert_ignore(session, WebhookSeen.__table__), [{"signature": signature, "expires_at": now + 2 * window}]
    )
    if rowcount(res) != 1:
        raise WebhookError(WebhookReason.REPLAYED, "this webhook was already received")
