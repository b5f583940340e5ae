"""Appeals on the real regtest network and relay (docs/escrow.md "Appeals", protocol.md §6c): the
decision waits for the appeal window; a rejected provider appeals with a kind-7000 event, pays the
fee invoice from its own node, and an appeal round of the escrow's pool decides, finally.

(1) the named validator scored the result low: rejected. The provider appeals and pays; the pool
    validator scores it well: accepted, the provider is paid its reward on its node and its fee
    back, the pool validator its fee (from the escrow's income on the job); the job audits clean.
(2) the pool validator agrees with the first decision: the fee is kept (it pays the pool
    validator, the escrow keeps the rest) and the job is refunded as first decided.
"""

from __future__ import annotations

import hashlib
from decimal import Decimal

import httpx
import pytest

from service.api.dashboard import router as dashboard_router
from service.audit.checks import audit_events
from service.audit.report import Status
from service.escrow import rule
from service.lightning.client import InvoiceState, PaymentStatus
from service.nostr.nip01 import Event, SecretKey, sign_event
from service.nostr.protocol import (
    EvalRound,
    Score,
    build_appeal,
    build_evaluation_result,
    build_payee_invoice,
    parse_appeal_fee,
    parse_appeal_window,
    parse_evaluation_request,
    parse_validation_complete,
)
from tests.conftest import Regtest, wait_until
from tests.e2e.market import Market, publish, query, serving, settle_payment, tag

pytestmark = [pytest.mark.lnd, pytest.mark.relay]

GOOD = b"a model the named validator got wrong"
WINDOW = 20  # seconds to appeal and pay
ROUND = 20  # the appeal round's window
FEE = 10_000  # msat
VALIDATOR_FEE = 5_000
ADMIN_TOKEN = "appeal-e2e-admin-token-" + "x" * 24
POOL = SecretKey(hashlib.sha256(b"appeal e2e pool validator").digest())


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture
async def served(regtest: Regtest, relay_url: str, database_url: str, tmp_path):
    m = Market(
        regtest,
        relay_url,
        database_url,
        validator_pool=[("pia", POOL.public_key_hex)],
        appeal_window_seconds=WINDOW,
        appeal_fee_msat=FEE,
        appeal_round_seconds=ROUND,
        admin_token=ADMIN_TOKEN,
    )
    if not any(getattr(r, "path", None) == "/admin" for r in m.app.routes):
        m.app.include_router(dashboard_router)
    async with serving(m, tmp_path / "blobs") as url:
        yield m, url


async def _rejected_and_appealed(market: Market, regtest: Regtest) -> tuple[Event, Event]:
    """A custodial job whose only result the named validator rejects; its provider appeals and pays
    the fee from its own node (the payee node, given outbound liquidity to the escrow first)."""
    # (above the channel reserve of the payee's side of its channel with the escrow: 1% of 10M sat)
    payreq, _ = await regtest.payee_invoice(110_000_000, memo="the provider's own money")
    assert (await regtest.customer_pays(payreq)).status == PaymentStatus.SUCCEEDED
    spec = market.job_spec(
        shards=1,
        validators=1,
        quorum=1,
        results_in=12,
        validation_in=24,
        mode="custodial",
        threshold="0.5",
        validator_fee=VALIDATOR_FEE,
    )
    job_ev = await market.post_job(spec)
    assert (await settle_payment(await market.fund(job_ev.id))).status == PaymentStatus.SUCCEEDED
    provider = market.providers[0]
    result = await market.submit(job_ev, provider, 0, GOOD)
    await market.score(job_ev.id, market.validators[0], {result.id: ("0.1", sha(GOOD))})

    window = parse_appeal_window(Event.from_dict(await market.wait_status(job_ev.id, "processing", "appeal window")))
    job = await market.wait_state(job_ev.id, "appealable")
    assert job.appeal_deadline == window.deadline
    first = parse_validation_complete(
        Event.from_dict(await market.wait_status(job_ev.id, "success", "validation complete"))
    )
    assert [v.accepted for v in first.verdicts] == [False]
    assert await market.payouts(job_ev.id) == []  # nothing moves while the decision may be appealed

    appeal = sign_event(
        provider, *build_appeal(job_id=job_ev.id, escrow=market.E, result_id=result.id, reason="see my holdout")
    )
    await publish(market.relay, appeal)

    async def fee_invoice():
        for ev in await market.escrow_events(job_ev.id):
            if (tag(ev, "status") or [""])[1:3] == ["payment-required", "appeal fee"]:
                return parse_appeal_fee(Event.from_dict(ev))
        return None

    fee = await wait_until(fee_invoice, 20, "the appeal fee invoice", interval=0.3)
    assert (fee.appellant, fee.amount_msat) == (provider.public_key_hex, FEE)
    paid = await regtest.payee.pay(fee.bolt11, fee_limit_msat=1_000, timeout_seconds=30)
    assert paid.status == PaymentStatus.SUCCEEDED
    await market.wait_state(job_ev.id, "appeal")
    return job_ev, result


async def _appeal_round(market: Market, job_id: str, result_id: str, value: str) -> dict:
    async def find():
        for ev in await market.escrow_events(job_id):
            if ev["kind"] == 5702 and parse_evaluation_request(Event.from_dict(ev)).round is EvalRound.APPEAL:
                return ev
        return None

    request = await wait_until(find, 30, "the appeal round's evaluation request", interval=0.3)
    parsed = parse_evaluation_request(Event.from_dict(request))
    assert parsed.validators == (POOL.public_key_hex,) and [c.result_id for c in parsed.candidates] == [result_id]
    scores = build_evaluation_result(
        request_id=request["id"],
        job_id=job_id,
        escrow=market.E,
        scores=(Score(result_id, Decimal(value), sha(GOOD)),),
    )
    await publish(market.relay, sign_event(POOL, *scores))
    return request


async def _claim_all(market: Market, regtest: Regtest, job_id: str, payee: SecretKey) -> dict[int, bytes]:
    """Answer every 'reward claimable' addressed to ``payee`` with an invoice from the payee node."""
    answered: dict[int, bytes] = {}

    async def claimables():
        out = []
        for ev in await market.escrow_events(job_id):
            st, p = tag(ev, "status"), tag(ev, "p")
            if (
                st
                and st[1] == "success"
                and st[2].startswith("reward claimable")
                and p
                and p[1] == payee.public_key_hex
            ):
                out.append(int(tag(ev, "amount")[1]))
        return out

    for amount in await wait_until(claimables, 30, "claimables", interval=0.3):
        if amount in answered:
            continue
        payreq, h = await regtest.payee_invoice(amount, memo="claim")
        await publish(
            market.relay,
            sign_event(payee, *build_payee_invoice(job_id=job_id, escrow=market.E, amount_msat=amount, bolt11=payreq)),
        )
        answered[amount] = h
    return answered


async def test_an_appeal_overturns_a_rejection_the_provider_is_paid_and_its_fee_refunded(
    served: tuple[Market, str], regtest: Regtest
) -> None:
    market, url = served
    job_ev, result = await _rejected_and_appealed(market, regtest)
    provider = market.providers[0]
    await _appeal_round(market, job_ev.id, result.id, "0.97")
    await market.released(job_ev.id, timeout=ROUND + 30)
    row = await market.job(job_ev.id)
    share = row.bid_msat - row.fee_msat  # the named validator's fee goes to the provider: it earned none
    back = rule.refundable(FEE, market.settings.payout_fee_ppm)
    hashes = await _claim_all(market, regtest, job_ev.id, provider)
    assert set(hashes) == {share, back}, (hashes, share, back)
    await _claim_all(market, regtest, job_ev.id, POOL)
    await market.wait_state(job_ev.id, "closed", timeout=60)
    for amount, h in hashes.items():
        inv = await regtest.payee.lookup_invoice(h)
        assert inv.state == InvoiceState.SETTLED and inv.amt_paid_msat == amount, (amount, inv)
    payouts = {(p.kind, p.payee): p.amount_msat for p in await market.payouts(job_ev.id)}
    assert payouts == {
        ("reward", provider.public_key_hex): share,
        ("appeal_refund", provider.public_key_hex): back,
        ("validator_fee", POOL.public_key_hex): VALIDATOR_FEE,  # from the escrow's income on the job
    }
    await market.check_ledger(job_ev.id, closed=True)
    async with httpx.AsyncClient() as http:
        view = (await http.get(f"{url}/v1/jobs/{job_ev.id}")).json()
    assert view["state"] == "closed"
    assert view["appeal"]["appellant"] == provider.public_key_hex and view["appeal"]["status"] == "won"
    assert view["appeal"]["validators"] == [POOL.public_key_hex] and view["appeal"]["fee_msat"] == FEE
    # the operator's job page shows the appeal: its state, appellant, fee, the round's validators
    async with httpx.AsyncClient(base_url=url) as admin:
        r = await admin.post("/admin/login", data={"token": ADMIN_TOKEN})
        assert r.status_code == 303, r.text
        page = (await admin.get(f"/admin/jobs/{job_ev.id}")).text
    row = page.split('id="appeal"', 1)[1].split("</tr>", 1)[0]
    assert "won" in row and provider.public_key_hex in row and POOL.public_key_hex in row, row
    await _audits_clean(market, job_ev.id)


async def test_an_appeal_that_fails_keeps_its_fee_and_the_job_refunds_as_decided(
    served: tuple[Market, str], regtest: Regtest
) -> None:
    market, _ = served
    job_ev, result = await _rejected_and_appealed(market, regtest)
    provider = market.providers[0]
    await _appeal_round(market, job_ev.id, result.id, "0.2")
    job = await market.wait_state(job_ev.id, "refunding", "refunded", timeout=ROUND + 30)
    assert job.refund_reason == "no_accepted_result"
    payouts = {(p.kind, p.payee): p.amount_msat for p in await market.payouts(job_ev.id)}
    # the fee pays the pool validator (capped at the job's validator fee); the rest is the escrow's
    assert payouts[("validator_fee", POOL.public_key_hex)] == VALIDATOR_FEE
    assert ("appeal_refund", provider.public_key_hex) not in payouts
    assert not [k for k in payouts if k[0] == "reward"]
    row = await market.job(job_ev.id)
    assert '"status": "lost"' in (row.appeal or "")
    await market.check_ledger(job_ev.id, closed=False)
    await _audits_clean(market, job_ev.id)


async def _audits_clean(market: Market, job_id: str) -> None:
    """Anyone recomputes the final decision from the appeal round's published scores."""
    events = [Event.from_dict(e) for e in await query(market.relay, {"ids": [job_id]})]
    events += [Event.from_dict(e) for e in await query(market.relay, {"#e": [job_id]})]
    events += [Event.from_dict(e) for e in await query(market.relay, {"kinds": [31990], "authors": [market.E]})]
    report = audit_events(job_id, events, escrow=market.E)
    assert report.ok, report.discrepancies
    assert any(f.check == "appeal" and f.status is Status.OK for f in report.findings), report.findings
    assert any(f.check == "outcome" and f.message.startswith("appealed") for f in report.findings)
    # without the appeal request, the final decision's scores are strangers' and the two decisions disagree
    appeal_request = next(e for e in events if e.kind == 5702 and ("param", "round", "appeal") in e.tags)
    hidden = audit_events(job_id, [e for e in events if e.id != appeal_request.id], escrow=market.E)
    assert {"two_decisions"} <= {f.code for f in hidden.discrepancies}, hidden.discrepancies
