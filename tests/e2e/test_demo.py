"""The README's main job: `fedstr-escrow demo --once`, checked on the real nodes."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from service.db import create_engine, session_factory
from service.escrow.models import Job
from service.ledger import service as ledger
from service.lightning.client import InvoiceState
from service.payouts.models import Payout
from tests.conftest import Regtest
from tests.e2e.demo_cli import run_demo_cli

pytestmark = [pytest.mark.lnd, pytest.mark.relay]


async def test_demo_once_pays_the_honest_and_not_the_cheat(regtest: Regtest, tmp_path: Path) -> None:
    run = await run_demo_cli(regtest, tmp_path)
    r, db = run.process, run.database
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "SUCCESS" in r.stdout and "ledger: balanced" in r.stdout
    summary = run.summary
    names = {a: v["pubkey"] for a, v in summary["agents"].items()}
    # the customer found its providers from their capability events, cheapest first
    assert "discovered 3 providers" in r.stdout
    assert summary["discovered"] == ["mallory", "alice", "bob"]
    [round1] = summary["rounds"]
    assert round1["accuracy"] > 0.85

    engine = create_engine(f"sqlite+aiosqlite:///{db}")
    try:
        async with session_factory(engine)() as s:
            job = await s.get(Job, round1["job_id"])
            assert job.state == "closed"
            payouts = (await s.scalars(select(Payout).where(Payout.job_id == job.id))).all()
            assert await ledger.check_invariants(s, closed_job_ids=[job.id]) == []
    finally:
        await engine.dispose()
    paid = {p.payee: p for p in payouts}
    assert names["mallory"] not in paid, "the dishonest provider is not paid"
    for honest in ("alice", "bob", "victor", "vera"):
        p = paid[names[honest]]
        assert p.state == "succeeded"
        inv = await regtest.payee.lookup_invoice(bytes.fromhex(p.payment_hash))  # arrived at the payee node
        assert inv.state == InvoiceState.SETTLED and inv.amt_paid_msat == p.amount_msat
