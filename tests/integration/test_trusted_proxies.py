"""Per-address limits key on the real client: proxy headers count only from trusted proxies.

The service runs as users start it (``fedstr-escrow serve``, a real uvicorn server on a free
loopback port, no LND or relay). The attacker rotates ``X-Forwarded-For`` on every request to
get a fresh rate-limit bucket each time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.conftest import free_port

BURST = 3


@contextmanager
def serve(tmp_path: Path, **env: str) -> Iterator[str]:
    port = free_port()
    full = {
        **os.environ,
        "FEDSTR_HTTP_PORT": str(port),
        "FEDSTR_EVENTS_BURST": str(BURST),
        "FEDSTR_EVENTS_PER_MINUTE": "0.001",
        "FEDSTR_NOSTR_KEY_FILE": str(tmp_path / "key"),
        "FEDSTR_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite3'}",
        **env,
    }
    full.pop("FORWARDED_ALLOW_IPS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve"],
        env=full,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + "/v1/health/live", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the service did not start: {proc.stdout.read() if proc.stdout else ''}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.communicate(timeout=15)


def statuses(url: str, n: int) -> list[int]:
    """``n`` event submissions from loopback, each claiming another client address."""
    with httpx.Client(base_url=url, timeout=5) as c:
        return [c.post("/v1/events", json={}, headers={"X-Forwarded-For": f"1.2.3.{i}"}).status_code for i in range(n)]


def test_forwarded_for_from_an_untrusted_peer_does_not_escape_the_limit(tmp_path: Path) -> None:
    with serve(tmp_path) as url:
        codes = statuses(url, BURST + 3)
    assert codes[:BURST] == [400] * BURST, codes  # refused as a bad event: the limit let them through
    assert codes[BURST:] == [429] * 3, codes  # one bucket, whatever X-Forwarded-For says


def test_forwarded_for_from_a_trusted_proxy_names_the_client(tmp_path: Path) -> None:
    with serve(tmp_path, FEDSTR_TRUSTED_PROXIES="127.0.0.1/32, ::1") as url:
        codes = statuses(url, BURST + 3)
    assert codes == [400] * (BURST + 3), codes  # each forwarded client has its own bucket
