"""Rate limits and request body limits.

Token buckets per client address and per Nostr pubkey guard what is expensive or locks
liquidity: event submission (a job request creates an invoice; an accepted hold
invoice locks funds along the route) and invoice submission. Buckets live in the
process: with several replicas behind a load balancer the effective limit is the sum,
which is acceptable for abuse control (money safety never depends on them).

Wrong credentials (admin and metrics bearer tokens, dashboard sign-ins) are counted per
client address by one :class:`FailureThrottle` (``app.state.admin_failures``): past its
allowance an address gets 429 for every credentialed request, the right token included,
until its failures age out of the window.

The client address is ``request.client.host``: the peer, or the address a trusted proxy
named in ``X-Forwarded-For`` (uvicorn does this only for ``FEDSTR_TRUSTED_PROXIES``; see
``service.app.uvicorn_config``).

The body limit refuses a request whose ``Content-Length`` is over the limit, and
stops reading a chunked body once it passes it (413 ``body_too_large``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from starlette.requests import Request
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
            raise ApiError(
                429,
                "rate_limited",
                f"too many requests; retry in {wait:.0f} s",
                headers={"Retry-After": str(max(1, int(wait + 0.999)))},
            )


def client_address(request: Request) -> str:
    """The address per-client limits key on (see the module's docstring)."""
    return request.client.host if request.client else "unknown"


class FailureThrottle:
    """Failed credentials per client address in a sliding window (in this process).

    At most ``max_keys`` addresses are tracked; the one that failed least recently is forgotten
    first, so a flood of new addresses cannot wipe the record of an active guesser.
    """

    def __init__(
        self,
        allowed: int = 10,
        window: float = 300.0,
        *,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.allowed = allowed
        self.window = window
        self.max_keys = max_keys
        self.clock = clock
        self._seen: OrderedDict[str, list[float]] = OrderedDict()

    def _recent(self, who: str, now: float) -> list[float]:
        times = [t for t in self._seen.get(who, ()) if now - t < self.window]
        if times:
            self._seen[who] = times
        else:
            self._seen.pop(who, None)
        return times

    def retry_after(self, who: str) -> int | None:
        """Seconds until ``who`` may try again, or None if it is not throttled."""
        now = self.clock()
        times = self._recent(who, now)
        if len(times) < self.allowed:
            return None
        return max(1, int(times[-self.allowed] + self.window - now + 0.999))

    def failed(self, who: str) -> None:
        now = self.clock()
        times = self._recent(who, now)
        times.append(now)
        self._seen[who] = times[-self.allowed :]
        self._seen.move_to_end(who)
        while len(self._seen) > self.max_keys:
            self._seen.popitem(last=False)

    def check(self, who: str) -> None:
        wait = self.retry_after(who)
        if wait is not None:
            raise ApiError(
                429,
                "too_many_failures",
                f"too many wrong credentials from this address; retry in {wait} s",
                headers={"Retry-After": str(wait)},
            )


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, *, exempt_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.exempt_paths = exempt_paths  # routes that enforce a limit of their own while streaming

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
                    await problem(413, "body_too_large", f"request body over {self.max_bytes} bytes")(
                        scope, receive, send
                    )
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
