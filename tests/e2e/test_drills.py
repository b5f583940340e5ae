"""The fault drills of bench/drills in a small configuration, so that CI runs the drill code.

Each drill runs the service as its own process against the session's regtest network,
relay and PostgreSQL, plays a few jobs, injects its faults and counts from the real parts
(bench/drills/audit.py): every job closed, every payee paid exactly once, no fact lost,
the ledger balanced and in agreement with LND. The sigkill drill includes a kill exactly
between a payout's write-ahead row and its SendPaymentV2, and one between a payment's
SUCCEEDED recorded on its attempt and the payout's (fault injection:
bench/drills/faulty_service.py; the second found a duplicate payment, now fixed). The lnd-outage, relay-restart and postgres-restart drills
stop and start the session's own escrow LND, relay and PostgreSQL; each drill puts them
back (and waits until they answer) before it returns.

The full drills (50 jobs and 20 kills, a 30 s LND outage, ...) are `python -m bench.drills`;
their last results are in bench/results/drills.md.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from bench.drills.drills import DRILLS, Options
from tests.conftest import Regtest, devstack, wait_until

pytestmark = [pytest.mark.lnd, pytest.mark.relay, pytest.mark.postgres, pytest.mark.timeout(240)]

SEED = 20260101
SMALL = {
    "sigkill": Options(jobs=6, kills=4, seed=SEED, work=(3.0, 1.5, 1.0), timeout=200),
    # customers look at their offer up to 20 s: with this seed jobs 2-4 hold offers while jobs 0-1
    # are already closed, and job 4 alone later, so the drill finds a moment to stop LND with
    # customers funding and no payout under way
    "lnd-outage": Options(jobs=5, lnd_outage=6, seed=SEED, work=(1.0, 0.5, 20.0), timeout=150),
    "relay-restart": Options(jobs=5, relay_down=3, seed=SEED, work=(1.0, 0.5, 1.0), timeout=120),
    "postgres-restart": Options(jobs=5, seed=SEED, work=(1.0, 0.5, 1.0), timeout=120),
    "replicas": Options(jobs=5, seed=SEED, work=(1.0, 0.5, 1.0), timeout=150),
    "adversarial": Options(jobs=4, seed=SEED, work=(1.0, 0.5, 1.0), timeout=200),
    "deadline-outage": Options(jobs=3, seed=SEED, outage=(8.0, 15.0), timeout=220),
}


@pytest.mark.parametrize("name", list(DRILLS))
async def test_drill(name: str, stack_desc: dict, regtest: Regtest, tmp_path: Path) -> None:
    if DRILLS[name].postgres and not stack_desc.get("postgres"):
        pytest.fail("the regtest stack was started without PostgreSQL", pytrace=False)
    lines: list[str] = []
    result = await DRILLS[name](stack_desc, SMALL[name], tmp_path, lines.append).run()
    # the session's clients must find the restarted parts before the next test uses them
    await wait_until(regtest.escrow.get_info, 60, "the escrow node answers the session's client", interval=0.5)
    if name == "lnd-outage":  # "active" can precede a usable link: prove both channels, as Regtest.start_node does
        for payer, payee in (("customer", "escrow"), ("escrow", "payee")):
            await asyncio.to_thread(
                devstack.wait_for,
                120,
                lambda a=payer, b=payee: regtest.stack.probe_payment(a, b),
                f"channel {payer}->{payee} usable again",
            )
    summary = {
        k: result[k]
        for k in (
            "jobs_finished",
            "jobs_total",
            "faults_injected",
            "payments_made",
            "payments_expected",
            "duplicate_payments",
            "facts_lost",
            "ledger_imbalance_msat",
            "reconciliation_discrepancy_msat",
            "notes",
            "faults",
        )
    }
    assert result["passed"], json.dumps(summary, indent=1) + "\n" + "\n".join(lines[-30:])
    assert result["jobs_finished"] == result["jobs_total"] == SMALL[name].jobs
    assert result["duplicate_payments"] == result["facts_lost"] == result["ledger_imbalance_msat"] == 0
    assert result["faults_injected"] >= 1
    if name == "adversarial":  # the hostile participants got nothing and stalled nobody
        h = result["hostile"]
        assert h["ok"] and h["copies_paid"] == 0 and h["race_paid_by_node"] == 1 and not h["negative_net_jobs"], h
        assert h["flood_accepted"] <= DRILLS[name].BUDGET < h["flood_accepted"] + h["flood_refused_busy"], h
        assert h["poisoned_job"] in ("refunding", "refunded") and h["held_payout_state"] != "succeeded", h
    if name == "sigkill":
        assert result["faults_injected"] == 4
        kinds = {f["kind"] for f in result["faults"] if f.get("exact")}
        assert "sigkill-after-write-ahead" in kinds, "a kill exactly between a payout's write-ahead and its send"
        assert "sigkill-after-attempt-succeeded" in kinds, (
            "a kill between a payment's recorded success and its payout's"
        )
