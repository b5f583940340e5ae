"""Schemathesis against the running API (generated requests from openapi): no 5xx, ever."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest
import uvicorn

from tests.conftest import Regtest, free_port, wait_until
from tests.e2e.market import Market

pytestmark = [pytest.mark.lnd, pytest.mark.relay]


ADMIN = "schemathesis-admin-token-0123456789-abc"


async def test_no_server_errors_on_generated_requests(
    regtest: Regtest, relay_url: str, database_url: str, tmp_path: Path
) -> None:
    market = Market(
        regtest,
        relay_url,
        database_url,
        admin_token=ADMIN,
        events_per_minute=100_000,
        events_burst=100_000,
        invoices_per_minute=100_000,
        invoices_burst=100_000,
        webhook_secret="schemathesis-webhook",
    )
    port = free_port()
    async with market.running():
        server = uvicorn.Server(
            uvicorn.Config(market.app, host="127.0.0.1", port=port, lifespan="off", log_level="warning")
        )
        task = asyncio.create_task(server.serve())
        await wait_until(lambda: server.started, 10, "API listening")
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "schemathesis.cli",
                "run",
                f"http://127.0.0.1:{port}/openapi.json",
                "--checks",
                "not_a_server_error",
                "--max-examples",
                "25",
                "--workers",
                "1",
                "--header",
                f"Authorization: Bearer {ADMIN}",
                "--seed",
                "1",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            out, _ = await asyncio.wait_for(proc.communicate(), 600)
        finally:
            server.should_exit = True
            await task
    text = out.decode(errors="replace")
    (tmp_path / "schemathesis.txt").write_text(text)
    assert proc.returncode == 0, text[-4000:]
