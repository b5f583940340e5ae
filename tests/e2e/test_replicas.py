"""Two service processes on one PostgreSQL database: exactly one payout per payee, balanced ledger.

Both replicas share the escrow's key, LND node, relay and database. Events are fed to
both (the relay delivers to the leader; the same events are also posted twice), and the
leader is killed with SIGKILL as soon as the job is releasing. The survivor must take
over leadership and finish: every payee paid exactly once, the job closed, the ledger
balanced.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from service.db import create_engine, session_factory
from service.lightning.client import InvoiceState
from service.payouts.models import PayoutAttempt
from tests.conftest import ROOT, Regtest, free_port, wait_until
from tests.e2e.market import Market, publish, settle_payment

pytestmark = [pytest.mark.lnd, pytest.mark.relay, pytest.mark.postgres]


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


class Replica:
    def __init__(self, name: str, market: Market, database_url: str, tmp: Path) -> None:
        self.name = name
        self.port = free_port()
        node = market.regtest.node("escrow")
        self.env = {
            **os.environ,
            "FEDSTR_DATABASE_URL": database_url,
            "FEDSTR_NETWORK": "regtest",
            "FEDSTR_LND_GRPC_HOST": node["rpc"],
            "FEDSTR_LND_TLS_CERT_PATH": node["tls_cert"],
            "FEDSTR_LND_MACAROON_PATH": node["macaroon"],
            "FEDSTR_RELAYS": market.relay,
            "FEDSTR_NOSTR_SECRET_KEY": market.escrow_key.to_hex(),
            "FEDSTR_HTTP_PORT": str(self.port),
            "FEDSTR_MIN_RESULTS_WINDOW_SECONDS": "0",
            "FEDSTR_MIN_BID_MSAT": "10000",
            "FEDSTR_PAYOUT_RETRY_SECONDS": "1",
            "FEDSTR_PAYOUT_LEASE_SECONDS": "3",
            "FEDSTR_EFFECT_LEASE_SECONDS": "3",
            "FEDSTR_PAYOUT_INVOICE_MIN_EXPIRY_SECONDS": "60",
            "FEDSTR_SWEEP_INTERVAL_SECONDS": "2",
            "FEDSTR_GUARD_INTERVAL_SECONDS": "2",
        }
        self.log = open(tmp / f"{name}.log", "w")
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "--log-level", "WARNING", "serve"],
            env=self.env,
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    async def ready(self) -> bool:
        try:
            async with httpx.AsyncClient() as c:
                r = await c.get(f"http://127.0.0.1:{self.port}/v1/health/ready", timeout=3)
                return r.status_code == 200
        except httpx.TransportError:
            return False

    async def leads(self) -> bool:
        try:
            async with httpx.AsyncClient() as c:
                r = await c.get(f"http://127.0.0.1:{self.port}/v1/health/ready", timeout=3)
                return r.json()["checks"]["settlement"] is not None
        except (httpx.TransportError, KeyError, ValueError):
            return False


async def test_two_replicas_one_killed_mid_release(
    regtest: Regtest, relay_url: str, database_url: str, tmp_path: Path
) -> None:
    market = Market(regtest, relay_url, database_url)
    engine = create_engine(database_url)
    market.external_sessions = session_factory(engine)
    replicas = [Replica("a", market, database_url, tmp_path), Replica("b", market, database_url, tmp_path)]
    try:
        for r in replicas:
            r.start()
        for r in replicas:
            await wait_until(r.ready, 60, f"replica {r.name} ready", interval=0.5)
        leaders = [r for r in replicas if await r.leads()]
        assert len(leaders) == 1, "exactly one leader"
        leader = leaders[0]
        survivor = next(r for r in replicas if r is not leader)

        job_ev = await market.post_job(market.job_spec(shards=2, policy="split", validator_fee=20_000))
        await publish(relay_url, job_ev)  # a duplicate of the request
        pay = await market.fund(job_ev.id)
        p1, p2, _ = market.providers
        r1 = await market.submit(job_ev, p1, 0, b"model one")
        r2 = await market.submit(job_ev, p2, 1, b"model two")
        await asyncio.gather(publish(relay_url, r1), publish(relay_url, r2))  # concurrent duplicates
        v1, v2 = market.validators
        await asyncio.gather(
            market.score(job_ev.id, v1, {r1.id: ("0.9", sha(b"model one")), r2.id: ("0.88", sha(b"model two"))}),
            market.score(job_ev.id, v2, {r1.id: ("0.92", sha(b"model one")), r2.id: ("0.86", sha(b"model two"))}),
        )
        await market.wait_state(job_ev.id, "releasing", "closed", timeout=60)
        leader.kill()  # mid-release
        await wait_until(survivor.leads, 30, "the survivor takes over leadership", interval=0.5)

        hashes = await market.claim_rewards(job_ev.id, [p1, p2, v1, v2], timeout=60)
        await market.wait_state(job_ev.id, "closed", timeout=90)
        await settle_payment(pay)
        job = await market.job(job_ev.id)
        each = (job.bid_msat - job.fee_msat - 2 * job.validator_fee_msat) // 2 // 1000 * 1000  # whole sats
        expected = {
            p1.public_key_hex: each,
            p2.public_key_hex: each,
            v1.public_key_hex: job.validator_fee_msat,
            v2.public_key_hex: job.validator_fee_msat,
        }
        for payee, h in hashes.items():
            inv = await regtest.payee.lookup_invoice(h)
            assert inv.state == InvoiceState.SETTLED and inv.amt_paid_msat == expected[payee], payee
        payouts = await market.payouts(job_ev.id)
        assert sorted(p.payee for p in payouts) == sorted(expected), "exactly one payout per payee"
        async with market.sessions() as s:
            succeeded = await s.scalar(
                select(func.count())
                .select_from(PayoutAttempt)
                .where(PayoutAttempt.state == "succeeded", PayoutAttempt.payout_id.in_([p.id for p in payouts]))
            )
        assert succeeded == 4, "one succeeded payment per payout"
        await market.check_ledger(job_ev.id, closed=True)
    finally:
        for r in replicas:
            r.stop()
        await engine.dispose()
