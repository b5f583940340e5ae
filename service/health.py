"""Readiness checks of the service's dependencies: database, LND, relays (on the leader: connected
and taking our events; ready only if at least one relay does).

Each check is bounded in time and reports a short, secret-free reason when it
fails, so ``/v1/health/ready`` tells an operator what is wrong without logs.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable
from dataclasses import asdict, dataclass
from typing import TypeVar

import websockets
from sqlalchemy.ext.asyncio import AsyncEngine

from service.db import ping
from service.lightning.client import LndClient
from service.lightning.errors import LndError

CHECK_TIMEOUT = 3.0


@dataclass
class Check:
    ok: bool
    detail: str
    latency_ms: float
    info: dict | None = None


T = TypeVar("T")


async def _timed(coro: Awaitable[T]) -> tuple[T, float]:
    t0 = time.perf_counter()
    result = await asyncio.wait_for(coro, CHECK_TIMEOUT)
    return result, (time.perf_counter() - t0) * 1000


async def check_database(engine: AsyncEngine) -> Check:
    try:
        _, ms = await _timed(ping(engine))
        return Check(True, "ok", round(ms, 1))
    except TimeoutError:
        return Check(False, f"no answer within {CHECK_TIMEOUT:.0f} s", CHECK_TIMEOUT * 1000)
    except Exception as e:  # noqa: BLE001 - reported, never raised, from a health probe
        return Check(False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", 0.0)


async def check_lnd(lnd: LndClient | None) -> Check:
    if lnd is None:
        return Check(False, "not configured (FEDSTR_LND_TLS_CERT_PATH / FEDSTR_LND_MACAROON_PATH)", 0.0)
    try:
        info, ms = await _timed(lnd.get_info())
    except TimeoutError:
        return Check(False, f"no answer within {CHECK_TIMEOUT:.0f} s", CHECK_TIMEOUT * 1000)
    except LndError as e:
        return Check(False, f"{type(e).__name__}: {e.detail[:200]}", 0.0)
    ok = info.synced_to_chain
    return Check(
        ok,
        "ok" if ok else "not synced to chain",
        round(ms, 1),
        {
            "pubkey": info.pubkey,
            "alias": info.alias,
            "block_height": info.block_height,
            "network": info.network,
            "active_channels": info.num_active_channels,
            "version": info.version,
        },
    )


async def check_relay(url: str) -> Check:
    """Open a websocket, ask for nothing (limit 0), and wait for EOSE."""

    async def probe() -> None:
        async with websockets.connect(url, open_timeout=CHECK_TIMEOUT, close_timeout=1) as ws:
            await ws.send(json.dumps(["REQ", "health", {"limit": 0, "kinds": [0]}]))
            while True:
                msg = json.loads(await ws.recv())
                if msg and msg[0] in ("EOSE", "CLOSED"):
                    await ws.send(json.dumps(["CLOSE", "health"]))
                    return

    try:
        _, ms = await _timed(probe())
        return Check(True, "ok", round(ms, 1))
    except TimeoutError:
        return Check(False, f"no answer within {CHECK_TIMEOUT:.0f} s", CHECK_TIMEOUT * 1000)
    except Exception as e:  # noqa: BLE001 - reported, never raised
        return Check(False, f"{type(e).__name__}: {str(e)[:200]}", 0.0)


def pool_check(st: dict) -> Check:
    """A relay's state as the running pool sees it (no extra connection): healthy when connected
    and not refusing our events (its newest answer to one of them was not a refusal)."""
    info = {
        k: st.get(k)
        for k in (
            "events_received",
            "events_rejected",
            "reconnects",
            "auth_state",
            "accepting",
            "events_accepted",
            "events_refused",
        )
    }
    if not st["connected"]:
        return Check(False, st["last_error"] or "not connected", 0.0, info)
    if st.get("accepting") is False:
        return Check(False, f"refuses our events: {st.get('last_refusal')}", 0.0, info)
    return Check(True, "ok", 0.0, info)


async def readiness(
    engine: AsyncEngine,
    lnd: LndClient | None,
    relays: list[str],
    pool_status: list[dict] | None = None,
    watcher: dict | None = None,
) -> dict:
    if pool_status is not None:
        db, node = await asyncio.gather(check_database(engine), check_lnd(lnd))
        by_url = {st["url"]: st for st in pool_status}
        rel = [pool_check(by_url[u]) for u in relays]
    else:
        db, node, *rel = await asyncio.gather(check_database(engine), check_lnd(lnd), *(check_relay(u) for u in relays))
    relays_out = [{"url": u, **asdict(c)} for u, c in zip(relays, rel, strict=True)]
    settlement = None
    if watcher is not None:
        settlement = Check(
            bool(watcher["connected"]),
            "ok" if watcher["connected"] else (watcher["last_error"] or "invoice stream not connected yet"),
            0.0,
            watcher,
        )
    ready = db.ok and node.ok and (settlement is None or settlement.ok) and (not relays or any(c.ok for c in rel))
    return {
        "status": "ready" if ready else "not_ready",
        "checks": {
            "database": asdict(db),
            "lnd": asdict(node),
            "settlement": asdict(settlement) if settlement else None,
            "relays": relays_out,
        },
    }
