"""The escrow SIGKILLed across a job's deadline and started again after it (docs/escrow.md, "Deadlines
that survive the escrow's outages"), with real LND, the relay and the service as its own process.

The job's participants (bench/drills/deadline_market.py) send their work a few seconds before the
deadline in force, while the escrow is down: the relay keeps it. The escrow comes back 25 s after
the deadline, finds the outage in its liveness record, publishes the extended deadline, counts the
work, and pays for it. The service runs with 5 s of results grace instead of 60 (so that a 30 s
outage across the results deadline needs the extension) and a beat every second.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select

from bench.drills.audit import audit
from bench.drills.deadline_market import DeadlineMarket
from bench.drills.drills import DeadlineOutageDrill
from bench.drills.faults import Service, StackParts
from service.db import create_engine, session_factory
from service.escrow.models import Job, Result, ScoreRow
from service.migrate import upgrade_async
from service.nostr.nip01 import SecretKey
from tests.conftest import wait_until

pytestmark = [pytest.mark.lnd, pytest.mark.relay, pytest.mark.timeout(300)]

DOWN_AFTER_DEADLINE = 25  # the escrow is started again this long after the deadline (down about 30 s)


async def _job_row(url: str, job_id: str) -> Job | None:
    engine = create_engine(url)
    try:
        async with session_factory(engine)() as s:
            return await s.get(Job, job_id)
    finally:
        await engine.dispose()


async def _counted(url: str, job_id: str) -> tuple[int, int]:
    engine = create_engine(url)
    try:
        async with session_factory(engine)() as s:
            results = (await s.scalars(select(Result.id).where(Result.job_id == job_id))).all()
            scores = (await s.scalars(select(ScoreRow.validator).where(ScoreRow.job_id == job_id))).all()
        return len(results), len(scores)
    finally:
        await engine.dispose()


@pytest.mark.parametrize("which", ["results", "validation"])
async def test_sigkill_across_a_deadline_keeps_on_time_work_counted_and_paid(
    which: str, stack_desc: dict, regtest, tmp_path: Path
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'escrow.sqlite3'}"
    await upgrade_async(url)
    key = SecretKey.generate()
    svc = Service("a", stack_desc, url, key.to_hex(), tmp_path / "service.log", **DeadlineOutageDrill.SETTINGS)
    market = DeadlineMarket(
        stack_desc,
        key.public_key_hex,
        lambda: [svc.url] if svc.alive() else [],
        seed=f"deadline-e2e:{which}",
        run_id=f"deadline-e2e-{uuid.uuid4().hex[:8]}",
        results_in=25,
        validation_window=30,
        lead=(2.0, 3.0),
    )
    task = None
    try:
        svc.start()
        await svc.wait_ready(90)
        market.hub.start()
        job = market.new_job(0)
        task = asyncio.create_task(market.run_job(job))
        await wait_until(lambda: job.id in market.funded_at, 60, "the job funded")
        if which == "validation":
            await wait_until(lambda: job.phase in ("validating", "scored"), 90, "the evaluation request")
        index = 0 if which == "results" else 1
        deadline = market.deadlines(job)[index]
        assert deadline - time.time() > 6, "the job's window is too short for this test"
        await asyncio.sleep(deadline - 5 - time.time())
        svc.kill()  # SIGKILL, five seconds before the deadline; the work arrives at the relay meanwhile
        await asyncio.sleep(deadline + DOWN_AFTER_DEADLINE - time.time())
        assert task is not None and not task.done(), "the job's participants stopped"
        svc.start()
        await svc.wait_ready(90)

        async def closed() -> bool:
            row = await _job_row(url, job.id)
            return row is not None and row.state == "closed"

        await wait_until(closed, 120, "the job closed")
        result_ok, scores_ok = market.on_time_sent(job)
        assert result_ok and scores_ok, market.sent[job.id]  # the work was sent before the deadline in force
        sent = market.sent[job.id]
        sent_at = sent.result_at if which == "results" else min(sent.scores_at.values())
        assert sent_at is not None and deadline - 5 < sent_at < deadline  # ... while the escrow was down
        assert await _counted(url, job.id) == (1, len(job.validators))
        row = await _job_row(url, job.id)
        assert row is not None
        moved = row.results_extended_to if which == "results" else row.validation_extended_to
        assert moved is not None and moved > deadline + DOWN_AFTER_DEADLINE  # after the escrow was back
        exts = market.extensions(job)
        assert exts and any(
            (e.results_deadline if which == "results" else e.validation_deadline) == moved for e in exts
        ), exts
        task.cancel()
        svc.stop()
        counted = await audit(stack_desc, url, market, StackParts(stack_desc))
        assert counted["payments_made"] == counted["payments_expected"] == 1 + len(job.validators), counted
        assert counted["duplicate_payments"] == counted["facts_lost"] == counted["ledger_imbalance_msat"] == 0
        assert counted["unpaid"] == 0 and counted["reconciliation_discrepancy_msat"] == 0, counted
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        svc.stop()
        await market.close()
