"""The fallback evaluation round on the real regtest network and relay (docs/escrow.md, protocol.md
§6b): a named validator does not score by the validation deadline, quorum is missed, and the escrow
asks a validator from its announced pool instead of refunding.

(1) a sealed result (a real model, its ciphertext in the escrow's blob store), a hold job: the pool
    validator (the reference validator agent) opens the model with the key the escrow handed it in
    the fallback request, scores it, the job is released and the provider and the validators who
    scored are paid on their node; the named no-show earns nothing; the job audits clean.
(2) the pool validator does not score either: at the fallback deadline the job is refunded (no_quorum).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from decimal import Decimal
from pathlib import Path

import pytest

from service.agents import ml
from service.agents.relay import Relays
from service.agents.storage import Blobs
from service.agents.validator import Validator
from service.audit.checks import audit_events
from service.audit.report import Status
from service.lightning.client import InvoiceState, PaymentStatus
from service.nostr.nip01 import Event, SecretKey, sign_event
from service.nostr.protocol import (
    EvalRound,
    Score,
    build_evaluation_result,
    parse_evaluation_request,
    parse_fallback_started,
    seal,
    sealed_model,
    unwrap_key,
)
from service.nostr.protocol.sealing import key_sha256
from tests.conftest import Regtest, wait_until
from tests.e2e.market import Market, publish, query, serving, settle_payment, tag

pytestmark = [pytest.mark.lnd, pytest.mark.relay]

GOOD = b"a model that scores well"
FALLBACK_SECONDS = 12
POOL = SecretKey(hashlib.sha256(b"fallback e2e pool validator").digest())


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture
async def served(regtest: Regtest, relay_url: str, database_url: str, tmp_path: Path):
    """The service with its API and blob store; its pool is one validator outside every job."""
    m = Market(
        regtest,
        relay_url,
        database_url,
        validator_pool=[("pia", POOL.public_key_hex)],
        fallback_round_seconds=FALLBACK_SECONDS,
    )
    async with serving(m, tmp_path / "blobs") as url:
        yield m, url


@pytest.fixture
def market(served: tuple[Market, str]) -> Market:
    return served[0]


async def _requests(market: Market, job_id: str) -> dict[EvalRound, dict]:
    out = {}
    for ev in await market.escrow_events(job_id):
        if ev["kind"] == 5702:
            out[parse_evaluation_request(Event.from_dict(ev)).round] = ev
    return out


async def _fallback_request(market: Market, job_id: str) -> dict:
    async def find():
        return (await _requests(market, job_id)).get(EvalRound.FALLBACK)

    return await wait_until(find, 60, "the fallback evaluation request", interval=0.3)


async def _score(market: Market, job_id: str, request: dict, validator: SecretKey, rid: str, model: bytes) -> Event:
    ev = sign_event(
        validator,
        *build_evaluation_result(
            request_id=request["id"],
            job_id=job_id,
            escrow=market.E,
            scores=(Score(rid, Decimal("0.97"), sha(model)),),
        ),
    )
    await publish(market.relay, ev)
    return ev


async def test_a_no_show_is_answered_by_the_fallback_round_then_released(
    served: tuple[Market, str], regtest: Regtest
) -> None:
    market, url = served
    split = ml.split_digits(1, 1)
    trained = ml.model_to_bytes(ml.train(split.shards[0], max_iter=50))
    spec = market.job_spec(
        shards=1, validators=2, quorum=2, results_in=20, validation_in=30, mode="hold", threshold="0.5"
    )
    job_ev = await market.post_job(spec)
    pay = await market.fund(job_ev.id)
    provider = market.providers[0]
    named, no_show = market.validators
    # the pool validator: the reference agent, watching for evaluation requests naming it
    agent = Validator(
        POOL,
        Relays([market.relay]),
        market.E,
        Blobs(f"{url}/blobs", POOL),
        split.holdouts[0],
        lnd=regtest.payee,
        name="pia",
        network="regtest",
        escrow_url=url,
    )
    serving_agent = asyncio.create_task(agent.serve(jobs=1, since=int(time.time()) - 5))
    job = await market.job_request(job_ev)
    sealed = seal(trained)
    blob = await Blobs(f"{url}/blobs", provider).upload(sealed.ciphertext, job=job_ev.id)
    model = sealed_model(provider, sealed, url=blob.url, recipients=(*job.spec.validators, market.E))
    result = await market.submit_model(job_ev, provider, 0, model)  # type: ignore[arg-type]
    first = await market.eval_request(job_ev.id)
    await _score(market, job_ev.id, first, named, result.id, trained)  # the other named validator never scores

    request = await _fallback_request(market, job_ev.id)
    fallback = parse_evaluation_request(Event.from_dict(request))
    assert fallback.validators == (POOL.public_key_hex,) and fallback.previous == first["id"]
    assert [c.result_id for c in fallback.candidates] == [result.id]
    assert fallback.deadline <= int(request["created_at"]) + FALLBACK_SECONDS + 1
    # the pool validator was given no key by the provider: the escrow hands it one, which opens the model's
    key = fallback.key_for(result.id, POOL.public_key_hex)
    assert key is not None
    assert key_sha256(unwrap_key(POOL, market.E, key.payload, sealed.key_sha256)) == sealed.key_sha256
    # the customer and the provider are told the decision waits for the fallback deadline
    told = [
        parse_fallback_started(Event.from_dict(ev))
        for ev in await market.escrow_events(job_ev.id)
        if (tag(ev, "status") or [""])[1:3] == ["processing", "fallback round"]
    ]
    assert {t.addressee for t in told} == {market.customer.public_key_hex, provider.public_key_hex}
    assert {t.deadline for t in told} == {fallback.deadline}
    # its money went into custody (the HTLC was sized for the request's deadline)
    assert (await settle_payment(pay)).status == PaymentStatus.SUCCEEDED

    await market.released(job_ev.id, timeout=FALLBACK_SECONDS + 60)
    row = await market.job(job_ev.id)
    share = row.bid_msat - row.fee_msat - 2 * row.validator_fee_msat
    hashes = await market.claim_rewards(job_ev.id, [provider, named])
    [report] = await asyncio.wait_for(serving_agent, 120)  # it claims its own fee
    assert report.error is None and not report.problems, report
    assert report.scores[result.id] not in ("unreadable", "0.0000"), report  # it opened and scored the model
    assert report.reward is not None and report.reward.paid and report.reward.invoice_settled, report.reward
    assert report.reward.amount_msat == row.validator_fee_msat
    await market.wait_state(job_ev.id, "closed")
    amounts = {provider.public_key_hex: share, named.public_key_hex: row.validator_fee_msat}
    for payee, h in hashes.items():
        inv = await regtest.payee.lookup_invoice(h)
        assert inv.state == InvoiceState.SETTLED and inv.amt_paid_msat == amounts[payee], (payee, inv)
    amounts[POOL.public_key_hex] = row.validator_fee_msat
    payees = {p.payee for p in await market.payouts(job_ev.id)}
    assert no_show.public_key_hex not in payees, "a named validator who did not score earns nothing"
    assert payees == set(amounts)
    complete = await market.wait_status(job_ev.id, "success", "validation complete")
    scored_by = {t[2] for t in complete["tags"] if t[0] == "score"}
    assert scored_by == {named.public_key_hex, POOL.public_key_hex}
    await market.check_ledger(job_ev.id, closed=True)
    # anyone recomputes the same decision from the public events: the fallback round audits clean
    events = [Event.from_dict(e) for e in await query(market.relay, {"ids": [job_ev.id]})]
    events += [Event.from_dict(e) for e in await query(market.relay, {"#e": [job_ev.id]})]
    events += [Event.from_dict(e) for e in await query(market.relay, {"kinds": [31990], "authors": [market.E]})]
    report = audit_events(job_ev.id, events, escrow=market.E)
    assert report.ok, report.discrepancies
    assert any(f.check == "fallback" and f.status is Status.OK for f in report.findings), report.findings
    # without the fallback request, the pool validator's score is a stranger's
    hidden = audit_events(job_ev.id, [e for e in events if e.id != request["id"]], escrow=market.E)
    assert "score_not_by_validator" in {f.code for f in hidden.discrepancies}


async def test_both_rounds_missing_quorum_refund(market: Market) -> None:
    spec = market.job_spec(shards=1, validators=2, quorum=2, results_in=20, validation_in=26, mode="custodial")
    job_ev = await market.post_job(spec)
    pay = await market.fund(job_ev.id)
    assert (await settle_payment(pay)).status == PaymentStatus.SUCCEEDED
    result = await market.submit(job_ev, market.providers[0], 0, GOOD)
    first = await market.eval_request(job_ev.id)
    await _score(market, job_ev.id, first, market.validators[0], result.id, GOOD)
    request = await _fallback_request(market, job_ev.id)
    assert parse_evaluation_request(Event.from_dict(request)).validators == (POOL.public_key_hex,)
    assert (await market.job(job_ev.id)).state == "fallback"
    # a named validator's late first-round score is not counted in the fallback round
    late = await _score(market, job_ev.id, first, market.validators[1], result.id, GOOD)
    outcome = (await market.handled(late.id))[late.id]
    assert outcome.startswith("ignored"), outcome
    job = await market.wait_state(job_ev.id, "refunding", "refunded", timeout=FALLBACK_SECONDS + 60)
    assert job.refund_reason == "no_quorum"
    assert not [p for p in await market.payouts(job_ev.id) if p.kind == "validator_fee"]
