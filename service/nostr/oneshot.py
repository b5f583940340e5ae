"""Publishing one event to a relay that is not one of ours: a job's reply relays.

A job request may name relays (NIP-90 ``["relays", …]``) where its customer reads replies.
The escrow also publishes that job's events there, through a short connection per delivery:
connect, send, wait for the relay's ``OK``, close. The customer chooses those URLs, so the
address is checked first (a private, loopback or link-local address is refused: SSRF, with the
same rule as LNURL), and the connection goes to the address that was checked (pinned), while TLS
still verifies the relay's host name. The answer has the shape of :meth:`RelayPool.publish`'s:
``(accepted, message)``; an address we refuse is a permanent ``blocked:`` refusal.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Awaitable, Callable, Sequence
from urllib.parse import urlsplit

import websockets
from websockets.exceptions import WebSocketException

from service.lightning.lnurl import is_blocked_address, resolve_host
from service.nostr.nip01 import Event

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
MAX_FRAME = 1 << 20


async def checked_address(url: str, *, allow_private: bool, resolver: Resolver = resolve_host) -> str | None:
    """The address to connect to for ``url``; None when it is refused (not public, or no address)."""
    parts = urlsplit(url)
    host = parts.hostname
    if parts.scheme not in ("ws", "wss") or not host:
        return None
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    try:
        addrs = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            addrs = [ipaddress.ip_address(a.split("%", 1)[0]) for a in await resolver(host, port)]
        except (OSError, UnicodeError, ValueError):
            return None
    if not addrs or (not allow_private and any(is_blocked_address(ip) for ip in addrs)):
        return None
    return str(addrs[0])


async def publish_once(
    url: str, event: Event, *, timeout: float = 10.0, allow_private: bool = False, resolver: Resolver = resolve_host
) -> tuple[bool, str]:
    """Send ``event`` to the relay at ``url`` and wait for its ``OK`` (at most ``timeout`` s in all)."""
    address = await checked_address(url, allow_private=allow_private, resolver=resolver)
    if address is None:
        return False, "blocked: the relay's address is not a public one (or does not resolve)"
    try:
        async with asyncio.timeout(timeout):
            async with websockets.connect(
                url, host=address, max_size=MAX_FRAME, open_timeout=timeout, proxy=None
            ) as ws:
                await ws.send(json.dumps(["EVENT", event.to_dict()], ensure_ascii=False))
                while True:
                    msg = json.loads(await ws.recv())
                    if isinstance(msg, list) and len(msg) >= 3 and msg[0] == "OK" and msg[1] == event.id:
                        return bool(msg[2]), str(msg[3]) if len(msg) > 3 else ""
    except TimeoutError:
        return False, f"no OK within {timeout:.0f} s"
    except (OSError, WebSocketException, ValueError) as e:
        return False, f"not connected: {type(e).__name__}"
