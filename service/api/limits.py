"""Rate limits and request body limits.

Token buckets per client address and per Nostr pubkey guard what is expensive or locks
liquidity: event submission (a job request creates an invoice; an accepted hold
invoice locks funds along the route) and invoice submission. Buckets live in the
process: with several replicas behind a load balancer the effective limit is the sum,
which is acceptable for abuse control (money safety never depends on them).

The body limit refuses a request whose ``Content-Length`` is over the limit, and
stops reading a chunked body once it passes it (413 ``body_too_large``).
"""
from __future__ import annotations

import time
from collections import OrderedDict

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.errors import ApiError, problem


class RateLimiter:
    def __init__(self, rate_per_minute: float, burst: int, *, max_keys: int = 100_000) -> None:
        self.rate = rate_per_minute / 60.0
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def allow(self, key: str, now: float | None = None) -> tuple[bool, float]:
        """Take a token for ``key``; returns (allowed, seconds until the next token)."""
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        self._buckets.move_to_end(key)
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return allowed, 0.0 if allowed else (1.0 - tokens) / self.rate

    def check(self, key: str) -> None:
        allowed, wait = self.allow(key)
        if not allowed:
            raise ApiError(429, "rate_limited", f"too many requests; retry in {wait:.0f} s",
                           headers={"Retry-After": str(max(1, int(wait + 0.999)))})


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, *, exempt_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.exempt_paths = exempt_paths   # routes that enforce a limit of their own while streaming

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.exempt_paths:
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = True
                if too_big:
                    await problem(413, "body_too_large", f"request body over {self.max_bytes} bytes")(scope, receive, send)
                    return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise ApiError(413, "body_too_large", f"request body over {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)
