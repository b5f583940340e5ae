"""Readiness reports the database, LND and relay status, over ASGI and from the real CLI."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.app import create_app
from service.config import Settings
from service.nostr.nip01 import SecretKey
from tests.conftest import Regtest, wait_until

pytestmark = pytest.mark.lnd


def _settings(regtest: Regtest, database_url: str, **over) -> Settings:
    node = regtest.node("escrow")
    base = dict(
        network="regtest",
        database_url=database_url,
        lnd_grpc_host=node["rpc"],
        lnd_tls_cert_path=node["tls_cert"],
        lnd_macaroon_path=node["macaroon"],
        relays=[regtest.desc["relay"]["url"]],
        nostr_secret_key=SecretKey.generate().to_hex(),
    )
    base.update(over)
    return Settings(_env_file=None, **base)


async def _get(app, path: str, *, until_status: int | None = None) -> httpx.Response:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            if until_status is None:
                return await c.get(path)
            return await wait_until(lambda: _status_is(c, path, until_status), 15, f"{path} -> {until_status}")


async def _status_is(c: httpx.AsyncClient, path: str, status: int) -> httpx.Response | None:
    r = await c.get(path)
    return r if r.status_code == status else None


async def test_ready_when_db_lnd_and_relay_answer(regtest: Regtest, database_url: str) -> None:
    r = await _get(create_app(_settings(regtest, database_url)), "/v1/health/ready", until_status=200)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "ready"
    assert body["checks"]["database"]["ok"]
    lnd = body["checks"]["lnd"]
    assert lnd["ok"] and lnd["info"]["pubkey"] == regtest.node("escrow")["pubkey"]
    assert lnd["info"]["network"] == "regtest"
    assert [x["ok"] for x in body["checks"]["relays"]] == [True]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_not_ready_names_each_failing_dependency(regtest: Regtest, database_url: str) -> None:
    dead_relay = f"ws://127.0.0.1:{_closed_port()}"
    settings = _settings(
        regtest, database_url, lnd_grpc_host=f"127.0.0.1:{_closed_port()}", relays=[dead_relay], lnd_timeout_seconds=2
    )
    r = await _get(create_app(settings), "/v1/health/ready")
    assert r.status_code == 503
    body = r.json()
    assert body["status"] == "not_ready"
    assert body["checks"]["database"]["ok"]
    assert not body["checks"]["lnd"]["ok"] and "LndUnavailable" in body["checks"]["lnd"]["detail"]
    assert body["checks"]["relays"][0]["url"] == dead_relay and not body["checks"]["relays"][0]["ok"]
    mac = Path(regtest.node("escrow")["macaroon"]).read_bytes().hex()
    assert mac not in r.text


async def test_lnd_not_configured_is_reported(database_url: str) -> None:
    r = await _get(create_app(Settings(_env_file=None, database_url=database_url)), "/v1/health/ready")
    assert r.status_code == 503
    assert "not configured" in r.json()["checks"]["lnd"]["detail"]
    live = await _get(create_app(Settings(_env_file=None, database_url=database_url)), "/v1/health/live")
    assert live.status_code == 200 and live.json()["status"] == "ok"


def test_cli_serve_migrates_and_reports_ready(regtest: Regtest, tmp_path: Path) -> None:
    """The service as users start it: `fedstr-escrow serve` with FEDSTR_* settings."""
    node = regtest.node("escrow")
    port = _closed_port()
    env = {
        **os.environ,
        "FEDSTR_NETWORK": "regtest",
        "FEDSTR_HTTP_PORT": str(port),
        "FEDSTR_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'svc.sqlite3'}",
        "FEDSTR_LND_GRPC_HOST": node["rpc"],
        "FEDSTR_LND_TLS_CERT_PATH": node["tls_cert"],
        "FEDSTR_LND_MACAROON_PATH": node["macaroon"],
        "FEDSTR_RELAYS": json.dumps([regtest.desc["relay"]["url"]]),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        body = None
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/v1/health/ready", timeout=5)
                body = r.json()
                if r.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        assert body is not None and body["status"] == "ready", body
        assert (tmp_path / "svc.sqlite3").exists()
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
    assert Path(node["macaroon"]).read_bytes().hex() not in out


def test_cli_refuses_bad_config_with_reason(tmp_path: Path) -> None:
    env = {**os.environ, "FEDSTR_LND_GRPC_HOST": "nohostport", "FEDSTR_RELAYS": "http://x"}
    r = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2
    assert "FEDSTR_LND_GRPC_HOST" in r.stderr and "FEDSTR_RELAYS" in r.stderr
