"""The REST API on a live service: public endpoints, NIP-98 payee invoices, admin actions, errors, limits."""

from __future__ import annotations

import hashlib
import json
import time

import httpx
import pytest

from service.lightning.client import InvoiceState
from service.nostr import nip98
from service.nostr.nip01 import SecretKey, sign_event
from service.nostr.protocol import build_job_request
from tests.conftest import Regtest, wait_until
from tests.e2e.market import Market

pytestmark = [pytest.mark.lnd, pytest.mark.relay]
ADMIN = "admin-token-for-the-api-tests-0123456789"


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture
async def market(regtest: Regtest, relay_url: str, database_url: str):
    m = Market(
        regtest,
        relay_url,
        database_url,
        admin_token=ADMIN,
        public_url="http://api.test",
        events_burst=40,
        invoices_burst=5,
    )
    async with m.running():
        yield m


@pytest.fixture
async def client(market: Market):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=market.app), base_url="http://api.test") as c:
        yield c


def problem(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["code"] == code and body["status"] == status and body["detail"]
    return body


async def test_info_and_event_submission_share_the_relay_intake(
    market: Market, client: httpx.AsyncClient, regtest: Regtest
) -> None:
    info = (await client.get("/v1/info")).json()
    assert info["pubkey"] == market.E and info["npub"].startswith("npub1") and info["network"] == "regtest"
    assert info["terms"]["fee_ppm"] == market.settings.fee_ppm and 5701 in info["kinds"]

    spec = market.job_spec(shards=1, validators=1, quorum=1, validator_fee=0)
    job = sign_event(market.customer, *build_job_request(spec, customer=market.customer.public_key_hex))
    r = await client.post("/v1/events", json=job.to_dict())
    assert r.status_code == 202 and r.json() == {"id": job.id, "new": True, "job": None}
    r = await client.post("/v1/events", json=job.to_dict())
    assert r.status_code == 202 and r.json()["new"] is False, "stored once"
    await market.wait_state(job.id, "offered")
    detail = (await client.get(f"/v1/jobs/{job.id}")).json()
    assert detail["state"] == "offered" and detail["invoice"]["payment_request"].startswith("lnbcrt")
    assert "preimage" not in json.dumps(detail)
    inv = (await client.get(f"/v1/invoices/{detail['invoice']['payment_hash']}")).json()
    assert inv["state"] == "open" and inv["job_id"] == job.id


async def test_job_request_with_wait_returns_the_offer_invoice(
    market: Market, client: httpx.AsyncClient, regtest: Regtest
) -> None:
    """?wait= gives a REST customer its invoice in one call; a refused request comes back refused."""
    spec = market.job_spec(shards=1, validators=1, quorum=1, validator_fee=0, mode="hold")
    job = sign_event(market.customer, *build_job_request(spec, customer=market.customer.public_key_hex))
    r = await client.post("/v1/events", params={"wait": 10}, json=job.to_dict())
    assert r.status_code == 202, r.text
    offer = r.json()["job"]
    assert offer["state"] == "offered" and offer["reject_reason"] is None
    inv = offer["invoice"]
    assert inv["mode"] == "hold" and inv["amount_msat"] == spec.bid_msat
    decoded = await regtest.customer.decode_pay_req(inv["payment_request"])
    assert decoded.payment_hash.hex() == inv["payment_hash"] and decoded.num_msat == spec.bid_msat
    again = (await client.post("/v1/events", params={"wait": 10}, json=job.to_dict())).json()
    assert again["new"] is False and again["job"] == offer, "a repeat gets the same offer"

    cheap = market.job_spec(shards=1, validators=1, quorum=1, validator_fee=0, bid=1)
    refused = sign_event(market.customer, *build_job_request(cheap, customer=market.customer.public_key_hex))
    body = (await client.post("/v1/events", params={"wait": 10}, json=refused.to_dict())).json()
    assert body["job"]["state"] == "rejected" and body["job"]["invoice"] is None
    assert body["job"]["reject_reason"].startswith("bid_too_low"), body
    problem(await client.post("/v1/events", params={"wait": 31}, json=job.to_dict()), 422, "invalid_request")


async def test_bad_input_gets_problem_details(client: httpx.AsyncClient, market: Market) -> None:
    ev = sign_event(market.customer, 5701, [], "x").to_dict()
    problem(await client.post("/v1/events", json={**ev, "sig": "00" * 64}), 400, "bad_signature")
    problem(await client.post("/v1/events", json={**ev, "content": "tampered"}), 400, "id_mismatch")
    problem(
        await client.post("/v1/events", json=sign_event(market.customer, 1, [], "hi").to_dict()),
        422,
        "kind_not_accepted",
    )
    problem(
        await client.post("/v1/events", content=b"not json", headers={"content-type": "application/json"}),
        422,
        "invalid_request",
    )
    problem(await client.get("/v1/jobs/nothex"), 422, "invalid_request")
    problem(await client.get("/v1/jobs/" + "0" * 64), 404, "job_not_found")
    problem(await client.get("/v1/nowhere"), 404, "not_found")
    problem(
        await client.post("/v1/events", content=b"x" * 200_000, headers={"content-type": "application/json"}),
        413,
        "body_too_large",
    )


async def test_rate_limit_per_client(client: httpx.AsyncClient, market: Market) -> None:
    ev = sign_event(market.customer, 1, [], "spam").to_dict()
    codes = [(await client.post("/v1/events", json=ev)).status_code for _ in range(45)]
    assert codes.count(429) >= 1 and set(codes) <= {422, 429}
    r = await client.post("/v1/events", json=ev)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1


async def _releasing_job(market: Market) -> tuple:
    job_ev = await market.post_job(market.job_spec(shards=1, validators=1, quorum=1, validator_fee=0))
    await market.fund(job_ev.id)
    r1 = await market.submit(job_ev, market.providers[0], 0, b"good model")
    await market.score(job_ev.id, market.validators[0], {r1.id: ("0.99", sha(b"good model"))})
    await market.wait_state(job_ev.id, "releasing")
    await wait_until(lambda: _payout_waiting(market, job_ev.id), 30, "a payout waiting for an invoice")
    return job_ev, r1


async def _payout_waiting(market: Market, job_id: str) -> bool:
    return any(p.state == "needs_invoice" for p in await market.payouts(job_id))


async def test_payee_gives_its_invoice_over_rest_with_nip98(
    market: Market, client: httpx.AsyncClient, regtest: Regtest
) -> None:
    job_ev, _ = await _releasing_job(market)
    provider = market.providers[0]
    [payout] = await market.payouts(job_ev.id)
    payreq, h = await regtest.payee_invoice(payout.amount_msat)
    path = f"/v1/jobs/{job_ev.id}/payout-invoice"
    body = json.dumps({"bolt11": payreq}).encode()

    def auth(key: SecretKey, url: str = "http://api.test" + path, payload: bytes = body) -> dict:
        ev = sign_event(
            key,
            nip98.KIND_HTTP_AUTH,
            [["u", url], ["method", "POST"], ["payload", hashlib.sha256(payload).hexdigest()]],
            "",
        )
        return {"Authorization": nip98.build_header(ev), "content-type": "application/json"}

    problem(
        await client.post(path, content=body, headers={"content-type": "application/json"}),
        401,
        "missing_authorization",
    )
    problem(
        await client.post(path, content=body, headers=auth(provider, url="http://evil.test" + path)),
        401,
        "url_mismatch",
    )
    problem(await client.post(path, content=body, headers=auth(market.providers[1])), 404, "no_payout")
    headers = auth(provider)
    r = await client.post(path, content=body, headers=headers)
    assert r.status_code == 202 and r.json()["amount_msat"] == payout.amount_msat
    problem(await client.post(path, content=body, headers=headers), 401, "replayed")
    await market.wait_state(job_ev.id, "closed", timeout=60)
    assert (await regtest.payee.lookup_invoice(h)).state == InvoiceState.SETTLED


async def test_admin_api_auth_views_and_audited_actions(market: Market, client: httpx.AsyncClient) -> None:
    problem(await client.get("/v1/admin/overview"), 401, "unauthorized")
    problem(await client.get("/v1/admin/overview", headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
    H = {"Authorization": f"Bearer {ADMIN}"}
    job_ev, _ = await _releasing_job(market)
    ov = (await client.get("/v1/admin/overview", headers=H)).json()
    assert ov["jobs_by_state"]["releasing"] >= 1 and ov["payable_msat"] > 0 and ov["leader"] is True
    assert ov["node"]["channel_local_msat"] > 0
    jobs = (await client.get("/v1/admin/jobs?state=releasing", headers=H)).json()
    assert job_ev.id in [j["id"] for j in jobs["items"]] and jobs["total"] >= 1
    detail = (await client.get(f"/v1/admin/jobs/{job_ev.id}", headers=H)).json()
    kinds = [t["kind"] for t in detail["timeline"]]
    assert {"fact", "transition", "invoice", "posting", "payment", "published"} <= set(kinds)
    attention = (await client.get("/v1/admin/payouts", headers=H)).json()["items"]
    pid = next(p["id"] for p in attention if p["job_id"] == job_ev.id)
    problem(
        await client.post(f"/v1/admin/payouts/{pid}/retry", json={"reason": "try"}, headers=H),
        409,
        "payout_needs_invoice",
    )
    problem(
        await client.post(f"/v1/admin/jobs/{job_ev.id}/refund", json={"reason": "customer asked"}, headers=H),
        409,
        "refund_not_safe",
    )
    problem(
        await client.post(f"/v1/admin/jobs/{job_ev.id}/refund", json={"reason": ""}, headers=H), 422, "invalid_request"
    )
    csv_text = (await client.get(f"/v1/admin/ledger/postings?job_id={job_ev.id}&format=csv", headers=H)).text
    assert csv_text.splitlines()[0] == "posting_id,key,kind,job_id,created_at,account,amount_msat"
    assert "release:" + job_ev.id in csv_text
    accounts = (await client.get("/v1/admin/ledger/accounts?prefix=liability:payable", headers=H)).json()["items"]
    assert any(a["balance_msat"] < 0 for a in accounts)
    assert "items" in (await client.get("/v1/admin/rejected-events", headers=H)).json()
    assert (await client.get("/metrics")).status_code == 401, "the totals are not public"
    metrics = (await client.get("/metrics", headers=H)).text
    assert 'fedstr_jobs{state="releasing"}' in metrics and "fedstr_lnd_up 1.0" in metrics
    from sqlalchemy import select

    from service.api.models import AdminAction

    async with market.sessions() as s:
        audited = [(a.action, a.outcome) for a in (await s.scalars(select(AdminAction))).all()]
    assert ("retry_payout", "refused: payout_needs_invoice") in audited
    assert ("refund_job", "refused: refund_not_safe") in audited


async def test_manual_refund_of_a_collecting_job(market: Market, client: httpx.AsyncClient) -> None:
    H = {"Authorization": f"Bearer {ADMIN}"}
    job_ev = await market.post_job(market.job_spec(shards=1, validators=1, quorum=1, validator_fee=0))
    pay = await market.fund(job_ev.id)
    r = await client.post(
        f"/v1/admin/jobs/{job_ev.id}/refund", json={"reason": "the customer's data was wrong"}, headers=H
    )
    assert r.status_code == 200 and r.json()["result"] in ("refunding", "refunded")
    job = await market.wait_state(job_ev.id, "refunded")
    assert job.refund_reason == "operator"
    from service.lightning.client import PaymentStatus

    assert (await pay).status == PaymentStatus.FAILED
    _ = time
