"""DiLoCo rounds of a small language model, escrowed end to end (`fedstr-escrow demo --task
diloco`): chained rounds, the outer momentum carried, the lazy provider rejected by relative
acceptance and unpaid, everyone else paid on the payee's node, the ledger balanced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select

from service.agents.common import read_job
from service.agents.tasks import DILOCO, task_code_sha256
from service.db import create_engine, session_factory
from service.escrow.models import Job
from service.ledger import service as ledger
from service.lightning.client import InvoiceState
from service.nostr.nip01 import verify_event
from service.nostr.protocol import JobRequest
from service.payouts.models import Payout
from tests.conftest import Regtest
from tests.e2e.demo_cli import run_demo_cli

pytestmark = [pytest.mark.lnd, pytest.mark.relay]


async def test_diloco_rounds_lower_the_loss_and_the_lazy_provider_is_never_paid(
    regtest: Regtest, tmp_path: Path
) -> None:
    run = await run_demo_cli(regtest, tmp_path, "--task", "diloco", "--rounds", "2", "--inner-steps", "12")
    r, db = run.process, run.database
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "DiLoCo: the global model's test loss" in r.stdout
    summary = run.summary
    names = {a: v["pubkey"] for a, v in summary["agents"].items()}
    round1, round2 = summary["rounds"]
    assert summary["discovered"] == ["mallory", "alice", "bob"]  # found by their capabilities, cheapest first
    # chained, and the loss falls round over round
    assert round2["previous_job"] == round1["job_id"]
    assert summary["initial_val_loss"] > round1["test_value"] > round2["test_value"]
    # the outer momentum is carried: after round 2 it is the decayed round-1 momentum plus the new step
    assert round1["outer_momentum_norm"] > 0 and round2["outer_momentum_norm"] != round1["outer_momentum_norm"]
    for rnd in (round1, round2):
        lazy = next(m for m in rnd["models"] if m["provider"] == "mallory")
        assert not lazy["accepted"] and not lazy["readable"]
        assert all(m["accepted"] for m in rnd["models"] if m["provider"] != "mallory")

    engine = create_engine(f"sqlite+aiosqlite:///{db}")
    try:
        async with session_factory(engine)() as s:
            for rnd in (round1, round2):
                job = await s.get(Job, rnd["job_id"])
                assert job is not None and job.state == "closed"
                request = parse_job_request_raw(job.request_raw, summary["escrow"])
                # the request names the round's starting model as its baseline
                params = dict(request.spec.params)
                assert request.spec.baseline is not None
                assert request.spec.baseline.model_sha256 == params["model_sha256"]
                # and the code it asks for: the source of the DiLoCo module, by URL and SHA-256
                assert params["code_sha256"] == task_code_sha256(DILOCO)
                assert params["code"].endswith(params["code_sha256"])
                assert 0 < int(params["max_runtime_s"]) <= request.spec.results_deadline - request.created_at
                payouts = (await s.scalars(select(Payout).where(Payout.job_id == job.id))).all()
                assert await ledger.check_invariants(s, closed_job_ids=[job.id]) == []
                paid = {p.payee: p for p in payouts}
                assert names["mallory"] not in paid, "the lazy provider is not paid"
                for honest in ("alice", "bob", "victor", "vera"):
                    p = paid[names[honest]]
                    assert p.state == "succeeded"
                    inv = await regtest.payee.lookup_invoice(bytes.fromhex(p.payment_hash))
                    assert inv.state == InvoiceState.SETTLED and inv.amt_paid_msat == p.amount_msat
    finally:
        await engine.dispose()


def parse_job_request_raw(raw: str, escrow: str) -> JobRequest:
    obj = json.loads(raw)
    return read_job(verify_event(obj, now=obj["created_at"]), escrow)
