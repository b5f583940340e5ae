"""One payee invoice submitted for two rewards at the same moment, on PostgreSQL (issue item 3).

The attack: a payee with two keys (a provider of one job, a provider of another, equal rewards)
gives the SAME invoice for both payouts at once, one through the REST route
(``POST /v1/jobs/{id}/payout-invoice``) and one as a kind-7000 payee-invoice event (the Nostr
path), so that the worker claims both together. Before, both payouts were marked succeeded by
the invoice's one payment: the second booking failed with ``key_conflict payout:<hash>`` on
every scan, that job stayed `releasing`, and the ledger reconciliation paused every payout.

Now a payment hash belongs to one payout (the attempt row's primary key, read back when its
insert did nothing; and a unique index on ``ln_payouts.payment_hash``): one payout is paid, the
other goes back to its payee with ``payment_hash_used_before``, and is paid on a new invoice.

To have both payouts claimed in one batch, payouts are paused while the two invoices arrive and
resumed through the admin API once both wait (fault injection: the pause is a stored failing
reconciliation report, as a real disagreement would store it).
"""

from __future__ import annotations

import asyncio
import hashlib
import json

import httpx
import pytest
from sqlalchemy import select

from service.db import utcnow
from service.ledger import service as ledger
from service.ledger.models import LedgerPosting
from service.lightning.client import InvoiceState
from service.nostr import nip98
from service.nostr.nip01 import Event, SecretKey, sign_event
from service.nostr.protocol import build_payee_invoice
from service.payouts.models import Payout, PayoutAttempt
from service.reconcile import Discrepancy, ReconciliationReport, latest_reconciliation, store_report
from tests.conftest import Regtest, wait_until
from tests.e2e.market import Market

pytestmark = [pytest.mark.lnd, pytest.mark.relay, pytest.mark.postgres]
ADMIN = "admin-token-for-tests-of-at-least-32-characters"


@pytest.fixture
async def market(regtest: Regtest, relay_url: str, database_url: str):
    assert database_url.startswith("postgresql"), database_url
    m = Market(
        regtest,
        relay_url,
        database_url,
        admin_token=ADMIN,
        public_url="http://api.test",
        reconcile_interval_seconds=3600,
        payout_concurrency=4,
    )
    async with m.running():
        yield m


@pytest.fixture
async def client(market: Market):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=market.app), base_url="http://api.test") as c:
        yield c


async def releasing_job(market: Market, provider: SecretKey, *, bid: int = 3_000_000) -> Event:
    """A funded one-shard job whose only reward (``provider``'s) waits for an invoice."""
    job_ev = await market.post_job(
        market.job_spec(
            shards=1, validators=1, quorum=1, validator_fee=0, bid=bid, providers=(provider.public_key_hex,)
        )
    )  # distinct jobs
    await market.fund(job_ev.id)
    result = await market.submit(job_ev, provider, 0, b"good model " + provider.public_key_hex.encode())
    model_sha = hashlib.sha256(b"good model " + provider.public_key_hex.encode()).hexdigest()
    await market.score(job_ev.id, market.validators[0], {result.id: ("0.99", model_sha)})
    await market.wait_state(job_ev.id, "releasing")
    await wait_until(lambda: _payout_in(market, job_ev.id, "needs_invoice"), 30, "the reward waiting for an invoice")
    return job_ev


async def _payout_in(market: Market, job_id: str, *states: str) -> Payout | None:
    ps = await market.payouts(job_id)
    return ps[0] if len(ps) == 1 and ps[0].state in states else None


def nip98_headers(key: SecretKey, path: str, body: bytes) -> dict:
    ev = sign_event(
        key,
        nip98.KIND_HTTP_AUTH,
        [["u", "http://api.test" + path], ["method", "POST"], ["payload", hashlib.sha256(body).hexdigest()]],
        "",
    )
    return {"Authorization": nip98.build_header(ev), "content-type": "application/json"}


async def rest_invoice(client: httpx.AsyncClient, key: SecretKey, job_id: str, bolt11: str) -> httpx.Response:
    path = f"/v1/jobs/{job_id}/payout-invoice"
    body = json.dumps({"bolt11": bolt11}).encode()
    return await client.post(path, content=body, headers=nip98_headers(key, path, body))


async def pause_payouts(market: Market) -> None:
    """Fault injection: a failing reconciliation report, stored after the leader's own first run."""

    async def first_run() -> bool:
        async with market.sessions() as s:
            return await latest_reconciliation(s) is not None

    await wait_until(first_run, 60, "the leader's first reconciliation")
    async with market.sessions.begin() as s:
        await store_report(
            s,
            ReconciliationReport(
                ran_at=utcnow(),
                ok=False,
                threshold_msat=0,
                discrepancy_msat=1,
                discrepancies=[Discrepancy("payout_missing", "00" * 32, 1, 0, "injected by the test")],
                invoices_checked=0,
                payments_checked=0,
                ledger_node_msat=0,
                lnd_settled_msat=0,
                lnd_paid_msat=0,
                lnd_fees_msat=0,
            ),
        )
    await wait_until(lambda: market.app.state.lightning.paused, 10, "the payout worker paused")


async def test_one_invoice_for_two_rewards_at_once_pays_one_and_books_cleanly(
    market: Market, client: httpx.AsyncClient, regtest: Regtest
) -> None:
    alice, bob = market.providers[0], market.providers[1]  # two keys, one payee node behind both
    job_a, job_b = await asyncio.gather(releasing_job(market, alice), releasing_job(market, bob))
    [pa], [pb] = await market.payouts(job_a.id), await market.payouts(job_b.id)
    assert pa.amount_msat == pb.amount_msat and pa.payee != pb.payee
    amount = pa.amount_msat
    await pause_payouts(market)

    bolt11, h = await regtest.payee_invoice(amount, memo="one invoice, two rewards")
    nostr = sign_event(bob, *build_payee_invoice(job_id=job_b.id, escrow=market.E, amount_msat=amount, bolt11=bolt11))
    by_rest, by_nostr = await asyncio.gather(
        rest_invoice(client, alice, job_a.id, bolt11), client.post("/v1/events", json=nostr.to_dict())
    )
    assert by_rest.status_code == 202 and by_nostr.status_code == 202, (by_rest.text, by_nostr.text)
    for job in (job_a, job_b):  # the Nostr one once the engine has processed the event
        await wait_until(lambda j=job: _payout_in(market, j.id, "pending"), 30, "both payouts pending")

    r = await client.post(
        "/v1/admin/reconciliation/resume",
        json={"reason": "test: resume after the pause"},
        headers={"Authorization": f"Bearer {ADMIN}"},
    )
    assert r.status_code == 200, r.text
    for job in (job_a, job_b):
        await wait_until(lambda j=job: _payout_in(market, j.id, "succeeded", "needs_invoice"), 60, "both decided")

    both = [p for job in (job_a, job_b) for p in await market.payouts(job.id)]
    assert sorted(p.state for p in both) == ["needs_invoice", "succeeded"], "one invoice pays one payout"
    [paid], [refused] = ([p for p in both if p.state == st] for st in ("succeeded", "needs_invoice"))
    assert paid.payment_hash == h.hex()
    assert refused.last_error.startswith("payment_hash_used_before: "), refused.last_error
    inv = await regtest.payee.lookup_invoice(h)
    assert inv.state == InvoiceState.SETTLED and inv.amt_paid_msat == amount, "paid exactly once"
    async with market.sessions() as s:
        attempts = (await s.scalars(select(PayoutAttempt).where(PayoutAttempt.payment_hash == h.hex()))).all()
        refused_attempts = (await s.scalars(select(PayoutAttempt).where(PayoutAttempt.payout_id == refused.id))).all()
    assert [(a.payout_id, a.state) for a in attempts] == [(paid.id, "succeeded")]
    assert refused_attempts == [], "nothing was sent for the refused payout"

    # The paid one is booked (no key_conflict) and its job closes; booking it again changes nothing.
    await market.wait_state(paid.job_id, "closed", timeout=30)
    async with market.sessions.begin() as s:
        for p in (paid, refused):
            await market.app.state.escrow.engine.handle_payout(s, await s.get(Payout, p.id))
    async with market.sessions() as s:
        keys = (await s.scalars(select(LedgerPosting.key).where(LedgerPosting.key == f"payout:{h.hex()}"))).all()
        assert keys == [f"payout:{h.hex()}"]
        assert await ledger.check_invariants(s, closed_job_ids=[paid.job_id]) == []

    # The refused payee is told, gives a fresh invoice and is paid: its job closes too.
    refused_key = alice if refused.payee == alice.public_key_hex else bob
    fresh, h2 = await regtest.payee_invoice(amount, memo="a fresh invoice")
    r = await rest_invoice(client, refused_key, refused.job_id, fresh)
    assert r.status_code == 202, r.text
    await market.wait_state(refused.job_id, "closed", timeout=60)
    assert (await regtest.payee.lookup_invoice(h2)).state == InvoiceState.SETTLED
    async with market.sessions() as s:
        assert await ledger.check_invariants(s, closed_job_ids=[job_a.id, job_b.id]) == []
