"""A pool of relay connections: subscribe, verify, de-duplicate, store; publish with OK.

One task per relay keeps a websocket open (reconnecting with exponential backoff
and full jitter), sends the pool's subscriptions with ``since`` taken from a
persisted per-relay cursor minus an overlap, answers NIP-42 AUTH challenges, and
reads messages:

- ``EVENT``: parsed and verified (NIP-01, strict), then put on one bounded queue
  shared by all relays. A full queue blocks the readers, so a flood is held back by
  TCP flow control instead of growing memory. Refused events are logged to the
  inbox's rejected log with their reason (a relay that sends garbage gets a cap).
- ``EOSE``: put on the queue behind that relay's stored events, so the cursor
  moves only after everything before it is safely in the inbox.
- ``NOTICE``, ``CLOSED`` (with NIP-42 ``auth-required:`` handling), ``OK`` (resolves
  a publish), ``AUTH``.

Whether a relay takes our events is part of its status: every ``OK`` it sends counts,
matched to a publish or not (nostr-relay 1.14 refuses with an empty event id). A refusal
(``OK false`` other than ``duplicate:``, ``rate-limited:`` or ``error:``) newer than the
last acceptance makes the relay *refusing* (``accepting: false``, with ``last_refusal``),
also across reconnects, until it accepts one of our events again; a relay that has not
answered an event of ours yet is ``accepting: null``.

A single consumer drains the queue in batches into the inbox (one transaction per
batch; ``ON CONFLICT DO NOTHING`` by id), so the same event from several relays is
stored once, then advances the cursors. An in-memory LRU of recent ids skips
re-verifying copies already stored; it is filled only after verification, so a
forged copy can never shadow the real event.

Cursor semantics: for each relay and subscription, the newest ``created_at`` of an
event stored from it, advanced after EOSE (backfill complete) and then after
every live batch. On reconnect ``since = cursor - overlap`` (default 10 min), so
events that arrive late or with skewed clocks are fetched again and dropped as
duplicates instead of being missed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from service import cursors
from service.nostr.inbox import Inbox
from service.nostr.kinds import KIND_RELAY_AUTH
from service.nostr.nip01 import Event, EventError, SecretKey, sign_event, verify_event
from service.signals import Signals

log = logging.getLogger(__name__)

# OK-false prefixes that say nothing about whether the relay takes our events.
TRANSIENT = ("rate-limited:", "error:")


@dataclass(frozen=True)
class Subscription:
    """A named REQ: ``filters`` without ``since`` (the pool adds it from the cursor)."""

    name: str
    filters: tuple[dict[str, Any], ...]


@dataclass
class RelayStatus:
    url: str
    connected: bool = False
    connected_since: float | None = None
    last_event_at: float | None = None
    last_error: str | None = None
    events_received: int = 0
    events_rejected: int = 0
    reconnects: int = 0
    authenticated: bool = False
    auth_state: str = "none"  # none | ok | unconfirmed (no OK from the relay) | refused
    notices: deque[str] = field(default_factory=lambda: deque(maxlen=20))
    closed: dict[str, str] = field(default_factory=dict)
    # Answers to our events (kept across reconnects: a relay that refused us will again).
    accepted: int = 0
    refused: int = 0
    last_accepted_at: float | None = None
    last_refusal: str | None = None
    last_refusal_at: float | None = None

    @property
    def accepting(self) -> bool | None:
        """False while the newest answer to our events is a refusal; None before any answer."""
        if self.last_refusal_at is not None and (
            self.last_accepted_at is None or self.last_refusal_at >= self.last_accepted_at
        ):
            return False
        return True if self.last_accepted_at is not None else None

    def answered(self, ok: bool, message: str, now: float) -> None:
        if ok or message.startswith("duplicate:"):
            self.accepted += 1
            self.last_accepted_at = now
        elif not message.startswith(TRANSIENT):
            self.refused += 1
            self.last_refusal = message[:300] or "refused without a reason"
            self.last_refusal_at = now

    def as_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "connected": self.connected,
            "connected_since": self.connected_since,
            "last_event_at": self.last_event_at,
            "last_error": self.last_error,
            "events_received": self.events_received,
            "events_rejected": self.events_rejected,
            "reconnects": self.reconnects,
            "authenticated": self.authenticated,
            "auth_state": self.auth_state,
            "notices": list(self.notices),
            "closed_subscriptions": dict(self.closed),
            "accepting": self.accepting,
            "events_accepted": self.accepted,
            "events_refused": self.refused,
            "last_accepted_at": self.last_accepted_at,
            "last_refusal": self.last_refusal,
            "last_refusal_at": self.last_refusal_at,
        }


@dataclass
class PoolConfig:
    overlap_seconds: int = 600
    queue_size: int = 2000
    batch_size: int = 500
    backoff_base: float = 0.5
    backoff_max: float = 60.0
    stable_after: float = 30.0  # a connection this old resets the backoff
    max_message_bytes: int = 1 << 20
    ok_timeout: float = 10.0
    auth_ok_timeout: float = 2.0
    max_future_seconds: int = 900
    max_event_bytes: int = 65536
    dedupe_cache: int = 100_000
    max_rejects_logged_per_relay: int = 1000  # per connection; the rest are only counted


class NotConnected(Exception):
    pass


class _Relay:
    def __init__(self, url: str) -> None:
        self.url = url
        self.status = RelayStatus(url)
        self.ws: ClientConnection | None = None
        self.pending_ok: dict[str, asyncio.Future[tuple[bool, str]]] = {}
        self.backfill_max: dict[str, int] = {}  # per subscription, before EOSE
        self.live: set[str] = set()  # subscriptions past EOSE
        self.challenge: str | None = None
        self.auth_ids: set[str] = set()  # our AUTH events awaiting OK (not events we publish)
        self.rejects_logged = 0
        self.connected = asyncio.Event()
        self.tasks: set[asyncio.Task] = set()


class RelayPool:
    def __init__(
        self,
        urls: list[str],
        inbox: Inbox,
        *,
        subscriptions: list[Subscription],
        secret_key: SecretKey | None = None,
        config: PoolConfig | None = None,
        signals: Signals | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if len(set(urls)) != len(urls):
            raise ValueError("duplicate relay URL")
        self.inbox = inbox
        self.sessions = inbox.sessions
        self.subscriptions = {s.name: s for s in subscriptions}
        self.secret_key = secret_key
        self.config = config or PoolConfig()
        self.signals = signals or Signals()  # emits event_stored
        self.clock = clock
        self.relays = {u: _Relay(u) for u in urls}
        self.queue: asyncio.Queue[tuple] = asyncio.Queue(self.config.queue_size)
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._tasks: list[asyncio.Task] = []
        self._stopping = False
        self.stored = 0
        self.duplicates = 0

    # ---- lifecycle ---------------------------------------------------------
    async def start(self) -> None:
        self._stopping = False
        self._tasks = [asyncio.create_task(self._run_relay(r), name=f"relay {r.url}") for r in self.relays.values()]
        self._tasks.append(asyncio.create_task(self._consume(), name="relay consumer"))

    async def stop(self) -> None:
        self._stopping = True
        for r in self.relays.values():
            if r.ws is not None:
                await r.ws.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait until every queued item has been stored (for tests and shutdown)."""
        await asyncio.wait_for(self.queue.join(), timeout)

    def status(self) -> list[dict[str, Any]]:
        return [r.status.as_dict() for r in self.relays.values()]

    async def wait_connected(self, timeout: float = 10.0) -> None:
        await asyncio.wait_for(asyncio.gather(*(r.connected.wait() for r in self.relays.values())), timeout)

    # ---- publishing --------------------------------------------------------
    async def publish(self, url: str, event: Event, timeout: float | None = None) -> tuple[bool, str]:
        """Send ``event`` to one relay and wait for its ``OK``; returns (accepted, message)."""
        relay = self.relays[url]
        ws = relay.ws
        if ws is None or not relay.status.connected:
            raise NotConnected(url)
        fut: asyncio.Future[tuple[bool, str]] = asyncio.get_running_loop().create_future()
        relay.pending_ok[event.id] = fut
        try:
            await ws.send(json.dumps(["EVENT", event.to_dict()], ensure_ascii=False))
            ok, msg = await asyncio.wait_for(fut, timeout or self.config.ok_timeout)
            if not ok and msg.startswith("auth-required:") and self.secret_key and relay.status.authenticated:
                # We authenticated after the relay refused: try once more.
                fut = asyncio.get_running_loop().create_future()
                relay.pending_ok[event.id] = fut
                await ws.send(json.dumps(["EVENT", event.to_dict()], ensure_ascii=False))
                ok, msg = await asyncio.wait_for(fut, timeout or self.config.ok_timeout)
            return ok, msg
        except ConnectionClosed as e:
            raise NotConnected(f"{url}: {e}") from None
        finally:
            if relay.pending_ok.get(event.id) is fut:
                relay.pending_ok.pop(event.id, None)
            if not fut.done():
                fut.cancel()

    # ---- per relay ---------------------------------------------------------
    def _backoff(self, attempt: int) -> float:
        cap = min(self.config.backoff_max, self.config.backoff_base * (2 ** min(attempt, 16)))
        return random.uniform(cap / 2, cap)

    async def _run_relay(self, relay: _Relay) -> None:
        attempt = 0
        while not self._stopping:
            started = time.monotonic()
            try:
                async with websockets.connect(
                    relay.url,
                    max_size=self.config.max_message_bytes,
                    open_timeout=10,
                    close_timeout=2,
                    ping_interval=20,
                    ping_timeout=20,
                    max_queue=64,
                ) as ws:
                    relay.ws = ws
                    relay.status.connected = True
                    relay.status.connected_since = self.clock()
                    relay.status.last_error = None
                    relay.rejects_logged = 0
                    relay.live.clear()
                    relay.backfill_max.clear()
                    relay.connected.set()
                    for sub in self.subscriptions.values():
                        await self._send_req(relay, sub)
                    async for raw in ws:
                        await self._on_message(relay, raw)
                        if attempt and time.monotonic() - started > self.config.stable_after:
                            attempt = 0
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure of one relay: record, back off, retry
                relay.status.last_error = f"{type(e).__name__}: {e}"[:300]
                log.info("relay %s: %s", relay.url, relay.status.last_error)
            finally:
                for task in list(relay.tasks):
                    task.cancel()
                relay.ws = None
                relay.status.connected = False
                relay.status.authenticated = False
                relay.status.auth_state = "none"
                relay.connected.clear()
                for fut in relay.pending_ok.values():
                    if not fut.done():
                        fut.set_exception(NotConnected(relay.url))
                relay.pending_ok.clear()
            if self._stopping:
                return
            if time.monotonic() - started > self.config.stable_after:
                attempt = 0
            delay = self._backoff(attempt)
            attempt += 1
            relay.status.reconnects += 1
            await asyncio.sleep(delay)

    def _cursor_name(self, relay: _Relay, sub: str) -> str:
        return f"relay:{relay.url}|{sub}"

    async def _send_req(self, relay: _Relay, sub: Subscription) -> None:
        async with self.sessions() as s:
            position = await cursors.get(s, self._cursor_name(relay, sub.name), default=-1)
        filters = []
        for f in sub.filters:
            f = dict(f)
            if position >= 0:
                f["since"] = max(0, position - self.config.overlap_seconds)
            filters.append(f)
        relay.backfill_max[sub.name] = -1
        relay.live.discard(sub.name)
        assert relay.ws is not None
        await relay.ws.send(json.dumps(["REQ", sub.name, *filters]))

    async def _on_message(self, relay: _Relay, raw: str | bytes) -> None:
        try:
            msg = json.loads(raw)
        except ValueError:
            relay.status.notices.append("unparseable message from relay")
            return
        if not isinstance(msg, list) or not msg or not isinstance(msg[0], str):
            return
        kind = msg[0]
        if kind == "EVENT" and len(msg) >= 3:
            await self._on_event(relay, msg[1], msg[2])
        elif kind == "EOSE" and len(msg) >= 2 and msg[1] in self.subscriptions:
            sub = msg[1]
            relay.live.add(sub)
            await self.queue.put(("eose", relay.url, sub, relay.backfill_max.get(sub, -1)))
        elif kind == "OK" and len(msg) >= 3:
            ok, text = msg[2] is True, str(msg[3])[:300] if len(msg) > 3 else ""
            fut = relay.pending_ok.get(msg[1]) if isinstance(msg[1], str) else None
            if fut is not None and not fut.done():
                fut.set_result((ok, text))
            ours = not (isinstance(msg[1], str) and msg[1] in relay.auth_ids)  # AUTH has its own state
            if ours and (fut is not None or not ok):
                relay.status.answered(ok, text, self.clock())  # an unmatched OK true tells nothing
        elif kind == "NOTICE" and len(msg) >= 2:
            relay.status.notices.append(str(msg[1])[:300])
        elif kind == "CLOSED" and len(msg) >= 2:
            sub, reason = str(msg[1]), str(msg[2]) if len(msg) > 2 else ""
            relay.status.closed[sub] = reason[:300]
            if reason.startswith("auth-required:") and self.secret_key and sub in self.subscriptions:
                self._spawn(relay, self._auth_then_resubscribe(relay, [sub]))
        elif kind == "AUTH" and len(msg) >= 2 and isinstance(msg[1], str):
            relay.challenge = msg[1][:500]
            if self.secret_key:
                # A REQ sent before AUTH may have been refused (not every relay says so with
                # CLOSED "auth-required:"): after authenticating, send every subscription again.
                self._spawn(relay, self._auth_then_resubscribe(relay, list(self.subscriptions)))

    def _spawn(self, relay: _Relay, coro) -> None:
        # The reader must keep reading (the OK we wait for arrives through it), so
        # request/response exchanges run as tasks, cancelled when the connection drops.
        task = asyncio.create_task(coro)
        relay.tasks.add(task)
        task.add_done_callback(relay.tasks.discard)

    async def _auth_then_resubscribe(self, relay: _Relay, subs: list[str]) -> None:
        try:
            await self._authenticate(relay)
            if relay.status.authenticated and relay.ws is not None:
                for name in subs:
                    relay.status.closed.pop(name, None)
                    await self._send_req(relay, self.subscriptions[name])
        except (ConnectionClosed, NotConnected):
            pass

    async def _authenticate(self, relay: _Relay) -> None:
        if relay.challenge is None or relay.ws is None or self.secret_key is None:
            return
        ev = sign_event(self.secret_key, KIND_RELAY_AUTH, [["relay", relay.url], ["challenge", relay.challenge]], "")
        fut = asyncio.get_running_loop().create_future()
        relay.pending_ok[ev.id] = fut
        relay.auth_ids.add(ev.id)
        await relay.ws.send(json.dumps(["AUTH", ev.to_dict()]))
        try:
            ok, msg = await asyncio.wait_for(fut, self.config.auth_ok_timeout)
            relay.status.auth_state = "ok" if ok else "refused"
        except TimeoutError:
            # Some relays (nostr-relay 1.14 among them) accept AUTH without answering OK.
            ok, msg = True, ""
            relay.status.auth_state = "unconfirmed"
        finally:
            relay.pending_ok.pop(ev.id, None)
            relay.auth_ids.discard(ev.id)
        relay.status.authenticated = ok
        if not ok:
            relay.status.last_error = f"AUTH refused: {msg}"[:300]

    async def _on_event(self, relay: _Relay, sub: object, obj: object) -> None:
        if sub not in self.subscriptions:
            return
        event_id = obj.get("id") if isinstance(obj, dict) else None
        if isinstance(obj, dict) and isinstance(event_id, str) and event_id in self._seen:
            self._seen.move_to_end(event_id)
            self.duplicates += 1
            await self._note_created_at(relay, sub, obj.get("created_at"))
            return
        try:
            # anything a relay sent: verify_event refuses what is not an event object
            event = verify_event(
                cast(Mapping[str, Any], obj),
                now=int(self.clock()),
                max_future=self.config.max_future_seconds,
                max_bytes=self.config.max_event_bytes,
            )
        except EventError as e:
            relay.status.events_rejected += 1
            if relay.rejects_logged < self.config.max_rejects_logged_per_relay:
                relay.rejects_logged += 1
                await self.inbox.reject(relay.url, e.reason.value, e.message, obj, event_id)
            return
        if not _matches_any(event, self.subscriptions[sub].filters):
            relay.status.events_rejected += 1
            return  # a relay that sends what we did not ask for gets nothing stored
        relay.status.events_received += 1
        relay.status.last_event_at = self.clock()
        await self.queue.put(("event", relay.url, sub, event))

    async def _note_created_at(self, relay: _Relay, sub: str, created_at: object) -> None:
        if type(created_at) is not int:
            return
        if sub in relay.live:
            await self.queue.put(("seen", relay.url, sub, created_at))
        elif created_at > relay.backfill_max.get(sub, -1):
            relay.backfill_max[sub] = created_at

    def _remember(self, event_id: str) -> None:
        self._seen[event_id] = None
        if len(self._seen) > self.config.dedupe_cache:
            self._seen.popitem(last=False)

    # ---- consumer ------------------------------------------------------------
    async def _consume(self) -> None:
        while True:
            batch = [await self.queue.get()]
            while len(batch) < self.config.batch_size and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            try:
                await self._store_batch(batch)
            except asyncio.CancelledError:
                raise
            except Exception:  # keep consuming; items are re-fetched via the overlap
                log.exception("storing a batch of %d relay items failed", len(batch))
                await asyncio.sleep(1.0)
            finally:
                for _ in batch:
                    self.queue.task_done()

    async def _store_batch(self, batch: list[tuple]) -> None:
        events: list[tuple[Event, str]] = []
        advance: dict[tuple[str, str], int] = {}
        for item in batch:
            tag, url, sub, payload = item
            relay = self.relays[url]
            if tag == "event":
                events.append((payload, url))
                if sub in relay.live:
                    key = (url, sub)
                    advance[key] = max(advance.get(key, -1), payload.created_at)
                elif payload.created_at > relay.backfill_max.get(sub, -1):
                    relay.backfill_max[sub] = payload.created_at
            elif tag == "seen":
                key = (url, sub)
                advance[key] = max(advance.get(key, -1), payload)
            elif tag == "eose" and payload >= 0:
                key = (url, sub)
                advance[key] = max(advance.get(key, -1), payload, relay.backfill_max.get(sub, -1))
        new = 0
        async with self.sessions.begin() as s:
            if events:
                new = await self.inbox.store_in(s, events)
            for (url, sub), position in advance.items():
                if position >= 0:
                    await cursors.advance(s, self._cursor_name(self.relays[url], sub), position)
        for event, _ in events:
            self._remember(event.id)
        self.stored += new
        self.duplicates += len(events) - new
        if new:
            self.signals.event_stored.emit()


def _matches_any(event: Event, filters: tuple[dict[str, Any], ...]) -> bool:
    return any(matches(event, f) for f in filters)


def matches(event: Event, f: dict[str, Any]) -> bool:
    """NIP-01 filter matching (ids, authors, kinds, #x tags, since, until)."""
    if "ids" in f and event.id not in f["ids"]:
        return False
    if "authors" in f and event.pubkey not in f["authors"]:
        return False
    if "kinds" in f and event.kind not in f["kinds"]:
        return False
    if "since" in f and event.created_at < f["since"]:
        return False
    if "until" in f and event.created_at > f["until"]:
        return False
    for key, wanted in f.items():
        if len(key) == 2 and key[0] == "#":
            name = key[1]
            if not any(len(t) >= 2 and t[0] == name and t[1] in wanted for t in event.tags):
                return False
    return True
