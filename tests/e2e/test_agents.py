"""The reference agents (service/agents) play a real round against the escrow.

The service runs in-process (as in tests/e2e/market.py) and its HTTP app is served by
uvicorn, so the agents read ``/v1/info`` and use the Blossom blob store under ``/blobs``.
One customer (customer LND node), three providers (one dishonest) and two validators (all
payees on the payee LND node) train and score a real model on scikit-learn's digits.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from service.agents import ml
from service.agents.common import escrow_info
from service.agents.customer import RoundConfig
from service.agents.demo import build_cast, demo_problems, format_summary, run_demo, run_round
from service.agents.relay import Relays
from service.agents.storage import Blobs
from service.agents.validator import Validator
from service.escrow.service import terms_from_settings
from service.lightning.client import InvoiceState
from service.nostr.nip01 import Event, sign_event
from service.nostr.protocol import ModelRef, build_job_request, build_result, parse_evaluation_request
from tests.conftest import Regtest
from tests.e2e.market import Market, query
from tests.e2e.market import serving as _serving

pytestmark = [pytest.mark.lnd, pytest.mark.relay]


async def test_a_round_with_the_reference_agents(
    regtest: Regtest, relay_url: str, database_url: str, tmp_path: Path
) -> None:
    market = Market(regtest, relay_url, database_url)
    lines: list[str] = []
    t0 = time.monotonic()

    def progress(phase: str, message: str) -> None:
        lines.append(f"[{time.monotonic() - t0:6.1f}s] {phase:<10} {message}")

    async with _serving(market, tmp_path / "blobs") as service_url:
        info = await escrow_info(service_url)
        assert info.pubkey == market.E
        cast = build_cast(
            relays=Relays([relay_url]),
            escrow=market.E,
            blob_url=f"{service_url}/blobs",
            customer_lnd=regtest.customer,
            payee_lnd=regtest.payee,
            terms=terms_from_settings(market.settings),
            progress=progress,
            network="regtest",
        )
        config = RoundConfig(
            bid_msat=3_000_000, validator_fee_msat=50_000, results_in=45, validation_in=200, max_iter=10
        )
        async with cast.running():
            summary = await asyncio.wait_for(run_round(cast, config=config, service_url=service_url), 150)
        report = summary.pop("_report")
        print("\n".join(lines))
        print(format_summary({"escrow": market.E, "seconds": round(time.monotonic() - t0, 1), "rounds": [summary]}))

        job_id = summary["job_id"]
        job = await market.wait_state(job_id, "closed", timeout=30)
        assert summary["state"] == "closed" and summary["outcome"] == "validated", summary

        # the money: each honest provider gets half the provider share in whole satoshis, each
        # validator its fee
        share = job.bid_msat - job.fee_msat - 2 * job.validator_fee_msat
        half = share // 2 // 1000 * 1000
        expected = {"alice": half, "bob": half, "victor": job.validator_fee_msat, "vera": job.validator_fee_msat}
        by_name = {a.name: a for a in (*cast.providers, *cast.validators)}
        for name, amount in expected.items():
            payee = summary["payees"][name]
            assert payee["paid"] and payee["received_msat"] == amount, (name, payee)
            inv = await regtest.payee.lookup_invoice(bytes.fromhex(payee["payment_hash"]))
            assert inv.state == InvoiceState.SETTLED and inv.amt_paid_msat == amount, (name, inv)
        mallory = summary["payees"]["mallory"]
        assert mallory["accepted"] is False and mallory["received_msat"] == 0, mallory
        payouts = {p.payee for p in await market.payouts(job_id)}
        assert payouts == {by_name[n].pubkey for n in expected}, "the dishonest provider is not paid"

        # the escrow's books balance and the averaged model is good
        await market.check_ledger(job_id, closed=True)
        assert report.accuracy is not None and report.accuracy > 0.85, report.accuracy
        rejected = [m for m in summary["models"] if not m["accepted"]]
        assert [m["provider"] for m in rejected] == ["mallory"], summary["models"]
        assert report.payment_status == "SUCCEEDED" and report.paid_msat >= job.bid_msat


async def test_run_demo_chains_two_rounds(regtest: Regtest, relay_url: str, database_url: str, tmp_path: Path) -> None:
    """``run_demo`` as the CLI runs it: devstack nodes from stack.json, round 2 starts from round 1's average."""
    market = Market(regtest, relay_url, database_url)
    lines: list[str] = []
    async with _serving(market, tmp_path / "blobs") as service_url:
        summary = await asyncio.wait_for(
            run_demo(
                Path(regtest.desc["dir"]) / "stack.json",
                service_url,
                relay_url,
                f"{service_url}/blobs",
                rounds=2,
                progress=lambda phase, message: lines.append(f"{phase:<10} {message}"),
            ),
            150,
        )
        print("\n".join(lines))
        print(format_summary(summary))
        first, second = summary["rounds"]
        assert second["previous_job"] == first["job_id"]
        assert any("warm start" in line for line in lines), "round 2 trains from round 1's average"
        for r in (first, second):
            assert r["state"] == "closed" and r["outcome"] == "validated", r
            assert r["accuracy"] > 0.85, r
            assert r["payees"]["mallory"]["received_msat"] == 0
            assert all(r["payees"][n]["paid"] for n in ("alice", "bob", "victor", "vera")), r["payees"]
            await market.check_ledger(r["job_id"], closed=True)
        assert summary["totals_msat"]["mallory"] == 0 and summary["totals_msat"]["alice"] > 0
        # the summary audits every job (both rounds and the refunded one) from the relays alone
        audited = [a["job_id"] for a in summary["audits"]]
        assert audited == [first["job_id"], second["job_id"], summary["refund_round"]["job_id"]]
        assert all(a["ok"] and not a["discrepancies"] for a in summary["audits"]), summary["audits"]
        assert demo_problems(summary) == []


async def test_a_validator_finds_a_request_the_relays_dropped_at_the_escrow(
    regtest: Regtest, relay_url: str, database_url: str, tmp_path: Path
) -> None:
    """Relays drop events (a NIP-40 expiration, their retention): the job request and its results are
    not on the relay here (they reached the escrow through its REST API). The reference validator
    fetches them from ``GET /v1/jobs/{id}/events``, checks their signatures, and scores."""
    market = Market(regtest, relay_url, database_url)
    async with _serving(market, tmp_path / "blobs") as service_url:
        spec = market.job_spec(shards=1, validators=1, quorum=1, validator_fee=0, results_in=20, validation_in=40)
        job_ev = sign_event(market.customer, *build_job_request(spec, customer=market.customer.public_key_hex))
        await market.submit_rest(job_ev)
        offer = await market.wait_status(job_ev.id, "payment-required")
        pay = asyncio.create_task(regtest.customer_pays(offer["tags"][1][2], timeout_seconds=60))
        await market.wait_status(job_ev.id, "processing", "escrow funded")
        job = await market.job_request(job_ev)
        result = sign_event(
            market.providers[0],
            *build_result(job, shard_index=0, model=ModelRef(f"{service_url}/blobs/{'ab' * 32}", "ab" * 32, 1000)),
        )
        await market.submit_rest(result)
        assert await query(relay_url, {"ids": [job_ev.id, result.id]}) == [], "the relay has neither"
        req_ev = await market.eval_request(job_ev.id)
        vkey = market.validators[0]
        split = ml.split_digits(1, 1, seed=1)
        validator = Validator(
            vkey,
            Relays([relay_url]),
            market.E,
            Blobs(f"{service_url}/blobs", vkey),
            split.holdouts[0],
            lnd=regtest.payee,
            name="vera",
            escrow_url=service_url,
        )
        report = await asyncio.wait_for(
            validator.handle(req_ev["id"], parse_evaluation_request(Event.from_dict(req_ev))), 60
        )
        assert result.id in report.scores and report.evaluation_id is not None
        pay.cancel()
