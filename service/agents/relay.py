"""A tiny async Nostr relay client for the agents (NIP-01 over ``websockets``).

* :meth:`Relays.publish` sends an event to every relay and waits for their ``OK``; it
  succeeds when at least one relay accepted it (``duplicate:`` counts as accepted).
* :meth:`Relays.query` asks every relay with a ``REQ`` and collects events until ``EOSE``.
* :meth:`Relays.subscribe` keeps a live ``REQ`` open on every relay (reconnecting with
  back-off when a connection drops) and yields each distinct event once; its
  :meth:`Subscription.wait_for` scans the events already received, then new ones.

Relays are untrusted: every event is verified (:func:`service.nostr.nip01.verify_event`:
shape, id, signature) and must match one of the filters asked for, or it is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, TypeVar

import websockets

from service.nostr.nip01 import Event, EventError, verify_event
from service.nostr.pool import matches as pool_matches

log = logging.getLogger("fedstr_escrow.agents.relay")

Filter = dict[str, Any]
T = TypeVar("T")
MAX_MESSAGE_BYTES = 1 << 20


def _subscription_id(prefix: str) -> str:
    """A fresh REQ id (each REQ has its own connection, so it need only differ from a stale one)."""
    return f"{prefix}{secrets.token_hex(6)}"


class RelayError(RuntimeError):
    """No relay accepted an event, or no relay answered a query."""


def matches(flt: Filter, event: Event) -> bool:
    """Whether ``event`` satisfies a NIP-01 filter (the relay pool's own matcher)."""
    return pool_matches(event, flt)


def _accept(obj: object, filters: Sequence[Filter]) -> Event | None:
    try:
        event = verify_event(obj, now=int(time.time()))  # type: ignore[arg-type]
    except (EventError, TypeError, ValueError):
        return None
    return event if any(matches(f, event) for f in filters) else None


class Relays:
    """A set of relay URLs; every operation opens its own short-lived connections."""

    def __init__(self, urls: Sequence[str], *, timeout: float = 10.0) -> None:
        if not urls:
            raise ValueError("at least one relay URL is needed")
        for url in urls:
            if not (url.startswith("ws://") or url.startswith("wss://")):
                raise ValueError(f"relay URL must be ws:// or wss://: {url!r}")
        self.urls = tuple(dict.fromkeys(urls))
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"Relays({list(self.urls)!r})"

    def _connect(self, url: str):  # websockets' connect object
        return websockets.connect(
            url, open_timeout=self.timeout, max_size=MAX_MESSAGE_BYTES, ping_interval=20, ping_timeout=20
        )

    # ---- publish ---------------------------------------------------------------------------
    async def _publish_one(self, url: str, event: Event) -> tuple[bool, str]:
        try:
            async with self._connect(url) as ws:
                await ws.send(json.dumps(["EVENT", event.to_dict()]))
                async with asyncio.timeout(self.timeout):
                    while True:
                        msg = json.loads(await ws.recv())
                        if isinstance(msg, list) and len(msg) >= 3 and msg[0] == "OK" and msg[1] == event.id:
                            text = str(msg[3]) if len(msg) > 3 else ""
                            return (msg[2] is True or text.startswith("duplicate:")), text
        except (OSError, TimeoutError, websockets.WebSocketException, ValueError) as exc:
            return False, f"{type(exc).__name__}: {exc}"

    async def publish(self, event: Event) -> list[str]:
        """Send ``event`` to every relay; returns the relays that accepted it (at least one)."""
        outcomes = await asyncio.gather(*(self._publish_one(url, event) for url in self.urls))
        accepted = [url for url, (ok, _) in zip(self.urls, outcomes, strict=True) if ok]
        if not accepted:
            reasons = "; ".join(f"{url}: {why}" for url, (_, why) in zip(self.urls, outcomes, strict=True))
            raise RelayError(f"no relay accepted event {event.id[:12]} (kind {event.kind}): {reasons}")
        return accepted

    # ---- query -----------------------------------------------------------------------------
    async def _query_one(self, url: str, filters: Sequence[Filter]) -> list[Event] | None:
        sub = _subscription_id("q")
        out: list[Event] = []
        try:
            async with self._connect(url) as ws:
                await ws.send(json.dumps(["REQ", sub, *filters]))
                async with asyncio.timeout(self.timeout):
                    while True:
                        msg = json.loads(await ws.recv())
                        if not isinstance(msg, list) or len(msg) < 2 or msg[1] != sub:
                            continue
                        if msg[0] == "EVENT" and len(msg) >= 3:
                            event = _accept(msg[2], filters)
                            if event is not None:
                                out.append(event)
                        elif msg[0] in ("EOSE", "CLOSED"):
                            with contextlib.suppress(websockets.WebSocketException):
                                await ws.send(json.dumps(["CLOSE", sub]))
                            return out
        except (OSError, TimeoutError, websockets.WebSocketException, ValueError) as exc:
            log.debug("query %s failed: %s", url, exc)
            return None

    async def query(self, *filters: Filter) -> list[Event]:
        """Stored events matching any filter, from all relays, deduplicated, oldest first."""
        results = await asyncio.gather(*(self._query_one(url, filters) for url in self.urls))
        if all(r is None for r in results):
            raise RelayError(f"no relay answered the query ({', '.join(self.urls)})")
        seen: dict[str, Event] = {}
        for events in results:
            for event in events or ():
                seen.setdefault(event.id, event)
        return sorted(seen.values(), key=lambda e: (e.created_at, e.id))

    async def get(self, event_id: str) -> Event | None:
        found = await self.query({"ids": [event_id]})
        return found[0] if found else None

    # ---- subscribe -------------------------------------------------------------------------
    def subscribe(self, *filters: Filter) -> Subscription:
        """A live subscription: ``async with relays.subscribe(f) as sub: async for ev in sub: ...``."""
        return Subscription(self, filters)


class Subscription:
    """Stored then live events matching ``filters`` from every relay, each distinct event once."""

    def __init__(self, relays: Relays, filters: Sequence[Filter]) -> None:
        if not filters:
            raise ValueError("at least one filter is needed")
        self.relays = relays
        self.filters = tuple(filters)
        self.events: list[Event] = []  # every distinct event received, in arrival order
        self._ids: set[str] = set()
        self._changed = asyncio.Event()
        self._eose: dict[str, asyncio.Event] = {url: asyncio.Event() for url in relays.urls}
        self._tasks: list[asyncio.Task] = []

    async def __aenter__(self) -> Subscription:
        self._tasks = [asyncio.create_task(self._run(url), name=f"sub {url}") for url in self.relays.urls]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []

    async def wait_eose(self, timeout: float = 10.0) -> None:
        """Until every relay sent its stored events (or ``timeout``: a dead relay must not block)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(e.wait() for e in self._eose.values()))

    def _add(self, event: Event) -> None:
        if event.id in self._ids:
            return
        self._ids.add(event.id)
        self.events.append(event)
        self._changed.set()

    async def _run(self, url: str) -> None:
        backoff = 0.5
        sub = _subscription_id("s")
        while True:
            try:
                async with self.relays._connect(url) as ws:
                    await ws.send(json.dumps(["REQ", sub, *self.filters]))
                    backoff = 0.5
                    async for raw in ws:
                        msg = json.loads(raw)
                        if not isinstance(msg, list) or len(msg) < 2 or msg[1] != sub:
                            continue
                        if msg[0] == "EVENT" and len(msg) >= 3:
                            event = _accept(msg[2], self.filters)
                            if event is not None:
                                self._add(event)
                        elif msg[0] == "EOSE":
                            self._eose[url].set()
                        elif msg[0] == "CLOSED":
                            log.warning("relay %s closed the subscription: %s", url, msg[2:] or "")
                            break
            except asyncio.CancelledError:
                raise
            except (OSError, TimeoutError, websockets.WebSocketException, ValueError) as exc:
                log.debug("subscription to %s dropped: %s", url, exc)
            self._eose[url].set()  # do not wait for a relay that is down
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    async def wait_for(
        self,
        predicate: Callable[[Event], T | None],
        timeout: float | None = None,
        *,
        extend: Callable[[Event], float | None] | None = None,
    ) -> T:
        """The first truthy ``predicate(event)``, over the events received so far and then new ones.

        Raises ``TimeoutError`` after ``timeout`` seconds. A predicate may raise to abort.
        ``extend(event)``: a later unix time to give up at instead (the escrow moved a deadline);
        the wait is never shortened.
        """
        async with asyncio.timeout(timeout) as limit:
            index = 0
            while True:
                while index < len(self.events):
                    event = self.events[index]
                    index += 1
                    value = predicate(event)
                    if value is not None and value is not False:
                        return value
                    later = extend(event) if extend is not None else None
                    when = limit.when()
                    if later is not None and when is not None:
                        limit.reschedule(max(when, asyncio.get_running_loop().time() + later - time.time()))
                self._changed.clear()
                await self._changed.wait()

    async def __aiter__(self) -> AsyncIterator[Event]:
        index = 0
        while True:
            while index < len(self.events):
                yield self.events[index]
                index += 1
            self._changed.clear()
            await self._changed.wait()
