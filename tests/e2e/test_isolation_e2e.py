"""The reported attack, end to end: one job's failing decision must not stop another job's deadline.

Two validator scores of ``"9"*64`` made the median ``1E+64``; building the validation-complete
event raised, and that one exception aborted every timer pass: another customer's job stayed
`validating` past its deadline. The codec now refuses such scores, so the real input can no
longer reach the decision; the test injects the same failure (the engine's timer step raises
for the first job, where it would decide) and plays the rest on the real regtest network and relay, through the
service's own admin API.
"""

from __future__ import annotations

import hashlib
import time

import httpx
import pytest
from sqlalchemy import func, select

from service.escrow.models import ScoreRow
from tests.conftest import Regtest, wait_until
from tests.e2e.market import Market, settle_payment

pytestmark = [pytest.mark.lnd, pytest.mark.relay]

TOKEN = "isolation-admin-token-of-at-least-32-characters"
GOOD = b"a trained model"
# What the 2-core test machine may add to the timer's own lag (two passes of 0.5 s) before
# a decision is committed: the point is "decided on time", not "never".
SLACK_SECONDS = 3.0


class Injected(ArithmeticError):
    """Stands in for build_validation_complete raising on a 65-character median."""


def admin(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://escrow", headers={"Authorization": f"Bearer {TOKEN}"}
    )


async def test_a_poisoned_decision_does_not_stop_another_jobs_deadline(
    regtest: Regtest, relay_url: str, database_url: str
) -> None:
    market = Market(
        regtest,
        relay_url,
        database_url,
        admin_token=TOKEN,
        quarantine_after=3,
        item_retry_base_seconds=0.2,
        item_retry_max_seconds=0.4,
    )
    async with market.running():
        escrow = market.app.state.escrow
        provider, (v1, _) = market.providers[0], market.validators
        sha = hashlib.sha256(GOOD).hexdigest()
        # One shard, two validators, quorum 1: one validator's score leaves the decision to the deadline.
        job_a = await market.post_job(
            market.job_spec(shards=1, quorum=1, bid=3_000_000, results_in=20, validation_in=30)
        )
        job_b = await market.post_job(
            market.job_spec(shards=1, quorum=1, bid=3_000_001, results_in=20, validation_in=30)
        )
        pays = [await market.fund(job_a.id), await market.fund(job_b.id)]
        results = {j.id: await market.submit(j, provider, 0, GOOD) for j in (job_a, job_b)}
        for j in (job_a, job_b):
            await market.wait_state(j.id, "validating")
            await market.score(j.id, v1, {results[j.id].id: ("0.9", sha)})

        async def scored() -> bool:
            async with market.sessions() as s:
                return await s.scalar(select(func.count()).select_from(ScoreRow)) == 2

        await wait_until(scored, 30, "both scores counted")

        real_timers, poisoned = escrow.engine.on_timers, {"on": True}

        async def decide(s, job):
            if poisoned["on"] and job.id == job_a.id:
                raise Injected("median 1E+64 does not fit the event")
            return await real_timers(s, job)

        escrow.engine.on_timers = decide

        deadline_b = (await market.job(job_b.id)).validation_deadline
        budget = max(0.0, deadline_b + 1 - time.time()) + 2 * escrow.loop.timer_interval + SLACK_SECONDS
        await market.wait_state(job_b.id, "releasing", "closed", timeout=budget)
        assert (await market.job(job_a.id)).state == "validating"

        ref = f"{job_a.id}:validation_deadline"
        async with admin(market.app) as api:

            async def listed() -> dict | None:
                body = (await api.get("/v1/admin/quarantine")).json()
                return next((i for i in body["items"] if i["source"] == "timer" and i["ref"] == ref), None)

            item = await wait_until(listed, 30, "the poisoned timer quarantined")
            assert item["job_id"] == job_a.id and item["failures"] == 3
            assert item["last_error"].startswith("Injected: median 1E+64")
            metrics = (await api.get("/metrics")).text
            assert 'fedstr_quarantined_items{source="timer"} 1' in metrics
            assert (await market.job(job_a.id)).state == "validating"

            poisoned["on"] = False  # the fix is deployed; the operator replays
            r = await api.post(f"/v1/admin/quarantine/timer/{ref}/replay", json={"reason": "codec fixed"})
            assert r.status_code == 200 and r.json() == {"target": f"timer/{ref}", "result": "pending"}, r.text
            await market.wait_state(job_a.id, "releasing", "closed", timeout=10)
            assert (await api.get("/v1/admin/quarantine")).json()["total"] == 0
        for pay in pays:  # both hold invoices settled on release
            await settle_payment(pay)
