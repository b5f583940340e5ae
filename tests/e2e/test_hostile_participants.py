"""Hostile participants, not hostile input: each test plays one attack of a customer, provider,
validator or payee against the real stack (regtest LND nodes, the relay) and checks that the
attacker neither stalls the others nor takes what someone else earned (issue: no participant can
stop, steal or drain). docs/threat-model.md names the test of every attack.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import replace

import pytest
from bolt11 import decode as decode_bolt11
from sqlalchemy import select

from service.escrow.models import Job
from service.lightning.client import PaymentStatus
from service.nostr.models import Delivery
from service.nostr.nip01 import SecretKey, sign_event
from service.nostr.protocol import ModelRef, build_payee_invoice, build_result
from service.payouts import PayoutKind
from tests.conftest import Regtest, wait_until
from tests.e2e.market import Market, publish, query, settle_payment, tag
from tests.support.overpay import overpay

pytestmark = [pytest.mark.lnd, pytest.mark.relay]


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def model(b: bytes) -> ModelRef:
    return ModelRef(f"https://models.example.org/{sha(b)}", sha(b), len(b))


@pytest.fixture
async def market(regtest: Regtest, relay_url: str, database_url: str):
    m = Market(regtest, relay_url, database_url)
    async with m.running():
        yield m


def _candidates(eval_request: dict) -> set[str]:
    return {t[1] for t in eval_request["tags"] if t[0] == "i"}


async def test_sybil_copies_for_one_shard_neither_end_collecting_nor_share_the_reward(market: Market) -> None:
    """Three fresh keys send copies of one model for shard 0 of an open 3-shard job. Before: three
    results ended collecting at once ("every shard has a result" counted results), the honest
    providers of shards 1 and 2 were ignored and the copies shared the whole reward."""
    job_ev = await market.post_job(
        market.job_spec(
            shards=3, policy="split", validators=1, quorum=1, validator_fee=0, results_in=30, validation_in=60
        )
    )
    await market.fund(job_ev.id)
    sybils = [SecretKey.generate() for _ in range(3)]
    stolen = b"one model, three keys"
    copies = [await market.submit_model(job_ev, k, 0, model(stolen)) for k in sybils]
    outcomes = await market.handled(*(c.id for c in copies))
    assert sorted(outcomes.values())[0] == "counted"
    assert sum("copied_model" in o for o in outcomes.values()) == 2, outcomes
    assert (await market.job(job_ev.id)).state == "collecting", "copies for one shard must not end collecting"

    _, p2, p3 = market.providers
    honest = [
        await market.submit(job_ev, p2, 1, b"trained on shard 1"),
        await market.submit(job_ev, p3, 2, b"trained on shard 2"),
    ]
    req = await market.eval_request(job_ev.id)
    first_copy = next(c for c in copies if outcomes[c.id] == "counted")
    assert _candidates(req) == {first_copy.id, *(h.id for h in honest)}
    await market.score(
        job_ev.id,
        market.validators[0],
        {
            first_copy.id: ("0.9", sha(stolen)),
            honest[0].id: ("0.9", sha(b"trained on shard 1")),
            honest[1].id: ("0.9", sha(b"trained on shard 2")),
        },
    )
    paid_to = {p.payee for p in await market.released(job_ev.id)}
    assert {p2.public_key_hex, p3.public_key_hex} <= paid_to
    assert not paid_to & {k.public_key_hex for k, c in zip(sybils, copies, strict=True) if c is not first_copy}


async def test_a_backdated_copy_of_a_model_earns_nothing(market: Market) -> None:
    """A thief copies another provider's model tag and signs it with ``created_at=1000``. Before:
    ties went to the earlier created_at, so the copy took the whole ``best`` reward."""
    job_ev = await market.post_job(market.job_spec(shards=2, policy="best", validators=1, quorum=1, validator_fee=0))
    await market.fund(job_ev.id)
    p1, p2, _ = market.providers
    work = b"the honest provider's model"
    honest = await market.submit(job_ev, p1, 0, work)
    await market.handled(honest.id)
    thief = SecretKey.generate()
    copy = await market.submit_model(job_ev, thief, 0, model(work), created_at=1000)
    assert "copied_model" in (await market.handled(copy.id))[copy.id]
    other = await market.submit(job_ev, p2, 1, b"another shard")
    req = await market.eval_request(job_ev.id)
    assert _candidates(req) == {honest.id, other.id}
    await market.score(
        job_ev.id, market.validators[0], {honest.id: ("0.95", sha(work)), other.id: ("0.85", sha(b"another shard"))}
    )
    payouts = {p.payee: p for p in await market.released(job_ev.id)}
    assert thief.public_key_hex not in payouts and p1.public_key_hex in payouts


async def test_a_tie_goes_to_the_first_received_not_to_a_backdated_timestamp(market: Market) -> None:
    """Two different models score the same; the second, backdated to ``created_at=1000``, must not
    win the tie: the escrow's own receipt order decides."""
    job_ev = await market.post_job(market.job_spec(shards=2, policy="best", validators=1, quorum=1, validator_fee=0))
    await market.fund(job_ev.id)
    p1, p2, _ = market.providers
    first = await market.submit(job_ev, p1, 0, b"model A")
    await market.handled(first.id)
    late = await market.submit_model(job_ev, p2, 1, model(b"model B"), created_at=1000)
    await market.eval_request(job_ev.id)
    await market.score(
        job_ev.id, market.validators[0], {first.id: ("0.9", sha(b"model A")), late.id: ("0.9", sha(b"model B"))}
    )
    rewarded = {p.payee for p in await market.released(job_ev.id) if p.kind == PayoutKind.REWARD}
    assert rewarded == {p1.public_key_hex}


def _raw_scores(
    validator: SecretKey, request_id: str, job_id: str, escrow: str, scores: dict[str, tuple[str, str]]
) -> object:
    """An evaluation result the codec's builder refuses to write (it is the attack)."""
    tags = [
        ["e", request_id, "", "request"],
        ["e", job_id, "", "job"],
        ["p", escrow],
        *(["score", rid, value, digest] for rid, (value, digest) in scores.items()),
    ]
    return sign_event(validator, 6702, tags, "")


async def test_absurd_scores_on_one_job_do_not_stop_another_jobs_deadline(market: Market) -> None:
    """Two validators score ``"9" * 64``. Before: the median 1E+64 made the verdict unwritable and
    the exception aborted every timer pass: another customer's job stayed ``validating`` past its
    deadline. Now the codec refuses such scores and every job is decided on time."""
    poisoned = await market.post_job(market.job_spec(shards=1, results_in=8, validation_in=16))
    honest = await market.post_job(market.job_spec(shards=1, results_in=8, validation_in=18, validators=1, quorum=1))
    await market.fund(poisoned.id)
    await market.fund(honest.id)
    p1 = market.providers[0]
    r_poisoned = await market.submit(poisoned, p1, 0, b"model of the poisoned job")
    r_honest = await market.submit(honest, p1, 0, b"model of the honest job")
    req = await market.eval_request(poisoned.id)
    attacks = [
        _raw_scores(v, req["id"], poisoned.id, market.E, {r_poisoned.id: ("9" * 64, sha(b"model of the poisoned job"))})
        for v in market.validators
    ]
    for ev in attacks:
        await publish(market.relay, ev)
    outcomes = await market.handled(*(ev.id for ev in attacks))
    assert all("score_out_of_range" in o for o in outcomes.values()), outcomes
    await market.score(honest.id, market.validators[0], {r_honest.id: ("0.95", sha(b"model of the honest job"))})
    job = await market.wait_state(honest.id, "releasing", "closed", timeout=30)
    assert job.state in ("releasing", "closed")
    deadline = (await market.job(poisoned.id)).validation_deadline
    await wait_until(lambda: time.time() > deadline + 3, 40, "the poisoned job's deadline")
    # The poisoned job is decided too (no counted score: no quorum), on time, and refunded.
    job = await market.wait_state(poisoned.id, "refunding", "refunded", timeout=10)
    assert job.refund_reason == "no_quorum"


async def test_a_flood_of_job_requests_from_fresh_keys_is_budgeted(
    regtest: Regtest, relay_url: str, database_url: str
) -> None:
    """300 requests from fresh keys through the relay became 300 hold invoices in 1.7 s. Now the
    engine's budget (whatever the source) stops accepting from new keys: here 5 per minute, 25
    sent. A returning customer (one that funded a job here) is not kept out by the flood."""
    m = Market(regtest, relay_url, database_url, job_requests_per_minute=5, max_open_offers=50)
    async with m.running():
        regular = m.customer
        first = await m.post_job(m.job_spec(shards=1, validators=1, quorum=1))
        await m.fund(first.id)  # the regular customer has funded a job here
        before = len((await regtest.escrow.list_invoices(max_invoices=10_000))[0])
        events = []
        for _ in range(25):
            m.customer = SecretKey.generate()
            events.append(await m.post_job(m.job_spec(shards=1, validators=1, quorum=1)))
        outcomes = await m.handled(*(e.id for e in events), timeout=60)
        accepted = [e for e in events if outcomes[e.id].startswith("accepted")]
        busy = [e for e in events if "escrow_busy" in outcomes[e.id]]
        # 5 a minute from new keys; the regular customer's first job was new then, and counts no more
        assert len(accepted) == 5 and len(busy) == 20, outcomes
        await m.wait_status(busy[-1].id, "error", "escrow_busy")  # the customer is told
        for e in accepted:
            await m.offer(e.id)
        after = len((await regtest.escrow.list_invoices(max_invoices=10_000))[0])
        assert after - before == 5, "one escrow invoice per accepted request, none for the others"
        m.customer = regular
        again = await m.post_job(m.job_spec(shards=1, validators=1, quorum=1, bid=3_001_000))
        assert (await m.handled(again.id))[again.id].startswith("accepted"), "a returning customer gets in"


async def test_one_key_cannot_hold_more_unfunded_offers_than_its_budget(
    regtest: Regtest, relay_url: str, database_url: str
) -> None:
    m = Market(regtest, relay_url, database_url, max_open_offers_per_key=2)
    async with m.running():
        events = [
            await m.post_job(m.job_spec(shards=1, validators=1, quorum=1, bid=3_000_000 + k * 1000)) for k in range(4)
        ]
        outcomes = await m.handled(*(e.id for e in events), timeout=30)
        assert [o.split(":")[0] for o in outcomes.values()].count("accepted") == 2, outcomes
        assert sum("too_many_open_offers" in o for o in outcomes.values()) == 2


async def test_funding_after_the_requests_expiration_does_not_start_the_job(market: Market, regtest: Regtest) -> None:
    """The customer pays after its request's NIP-40 expiration (relays have dropped it). Before:
    the job started. Now the hold is cancelled (the customer's payment fails), nothing is taken,
    and the escrow publishes why."""
    spec = market.job_spec(shards=1, validators=1, quorum=1, results_in=6, validation_in=9)
    spec = replace(spec, expiration=spec.validation_deadline)
    job_ev = await market.post_job(spec)
    _, bolt11 = await market.offer(job_ev.id)
    await wait_until(lambda: time.time() > spec.expiration + 1, 30, "the request's expiration")
    payment = await asyncio.wait_for(regtest.customer_pays(bolt11, timeout_seconds=30), 60)
    assert payment.status == PaymentStatus.FAILED  # the escrow cancelled the held HTLC
    job = await market.wait_state(job_ev.id, "cancelled")
    assert not any(k == "transition" and d.get("to") == "collecting" for k, d in await market.timeline(job.id))
    ev = await market.wait_status(job_ev.id, "error", "cancelled: request_expired")
    assert tag(ev, "escrow") == ["escrow", "cancelled", "request_expired"]


async def test_a_request_expiring_before_its_deadlines_is_refused(market: Market) -> None:
    """nostr-rs-relay drops an expired request: a job whose request expires before its validation
    deadline would be stranded (validators cannot find it). Refused with a reason."""
    spec = market.job_spec(shards=1, validators=1, quorum=1)
    job_ev = await market.post_job(replace(spec, expiration=spec.results_deadline + 1))
    ev = await market.wait_status(job_ev.id, "error", "expires_before_deadline")
    assert tag(ev, "p")[1] == market.customer.public_key_hex
    assert (await market.job(job_ev.id)).state == "rejected"


async def test_a_deletion_is_answered_with_its_status(market: Market) -> None:
    job_ev = await market.post_job(market.job_spec(shards=1, validators=1, quorum=1))
    await market.offer(job_ev.id)
    await market.delete(job_ev.id)
    ev = await market.wait_status(job_ev.id, "error", "cancelled: deleted_by_customer")
    assert tag(ev, "escrow") == ["escrow", "cancelled", "deleted_by_customer"]


async def test_a_result_with_a_nip90_amount_and_no_invoice_is_counted(market: Market) -> None:
    job_ev = await market.post_job(market.job_spec(shards=1, validators=1, quorum=1, validator_fee=0))
    await market.fund(job_ev.id)
    job = await market.job_request(job_ev)
    tmpl = build_result(job, shard_index=0, model=model(b"loosely NIP-90"))
    ev = sign_event(market.providers[0], tmpl.kind, [*tmpl.tags, ("amount", "500000")], tmpl.content)
    await publish(market.relay, ev)
    assert (await market.handled(ev.id))[ev.id] == "counted"


async def test_a_refused_payee_invoice_is_asked_again_with_its_reason(market: Market, regtest: Regtest) -> None:
    """Before: the escrow re-announced the reward with no reason. Now the reason's code goes with it
    (and only the code: LNURL servers' texts and addresses stay with the operator)."""
    job_ev = await market.post_job(market.job_spec(shards=1, validators=1, quorum=1, validator_fee=0))
    pay = await market.fund(job_ev.id)
    p1 = market.providers[0]
    r1 = await market.submit(job_ev, p1, 0, b"a good model")
    await market.score(job_ev.id, market.validators[0], {r1.id: ("0.9", sha(b"a good model"))})
    await market.wait_state(job_ev.id, "releasing")
    await settle_payment(pay)
    claim = await market.wait_status(job_ev.id, "success", "reward claimable")
    amount = int(tag(claim, "amount")[1])
    wrong, _ = await regtest.payee_invoice(amount - 1000)  # the invoice is for one sat less
    await publish(
        market.relay,
        sign_event(p1, *build_payee_invoice(job_id=job_ev.id, escrow=market.E, amount_msat=amount, bolt11=wrong)),
    )

    async def asked_again():
        for ev in await market.escrow_events(job_ev.id):
            if tag(ev, "reason") is not None:
                return ev
        return None

    again = await wait_until(asked_again, 30, "the reward announced again with a reason", interval=0.3)
    assert tag(again, "reason") == ["reason", "wrong_amount"]
    assert int(tag(again, "amount")[1]) == amount


async def test_rewards_are_whole_satoshis_so_ordinary_wallets_can_invoice_them(market: Market) -> None:
    """The demo's reward was 1,434,500 msat: LNbits and most wallets cannot invoice it."""
    job_ev = await market.post_job(
        market.job_spec(shards=2, policy="split", bid=3_000_001, validators=2, quorum=1, validator_fee=50_500)
    )
    await market.fund(job_ev.id)
    p1, p2, _ = market.providers
    r1 = await market.submit(job_ev, p1, 0, b"m1")
    r2 = await market.submit(job_ev, p2, 1, b"m2")
    for v in market.validators:
        await market.score(job_ev.id, v, {r1.id: ("0.9", sha(b"m1")), r2.id: ("0.9", sha(b"m2"))})
    payouts = await market.released(job_ev.id)
    assert len(payouts) == 4 and all(p.amount_msat % 1000 == 0 for p in payouts), [p.amount_msat for p in payouts]
    async with market.sessions() as s:
        job = await s.scalar(select(Job).where(Job.id == job_ev.id))
    assert sum(p.amount_msat for p in payouts) + _decision(job)["fee_income_msat"] == job.bid_msat


def _decision(job: Job) -> dict:
    return json.loads(job.decision)


async def test_an_overpaid_escrow_gives_the_excess_back_to_the_customer(market: Market, regtest: Regtest) -> None:
    """A customer's wallet pays 200 sat more than the offer (LND takes up to twice an invoice's
    amount). Before: the excess was booked silently as the escrow's fee income. Now it is shown in
    the decision and paid back to the customer (less its route's reserve), like a refund."""
    job_ev = await market.post_job(
        market.job_spec(shards=1, validators=1, quorum=1, validator_fee=0, mode="custodial", bid=3_000_000)
    )
    amount, bolt11 = await market.offer(job_ev.id)
    assert await overpay(regtest.customer, bolt11, amount + 200_000) == 1  # settled: custodial
    await market.wait_status(job_ev.id, "processing", "escrow funded")
    r1 = await market.submit(job_ev, market.providers[0], 0, b"a good model")
    await market.score(job_ev.id, market.validators[0], {r1.id: ("0.9", sha(b"a good model"))})
    await market.wait_state(job_ev.id, "releasing")
    job = await market.job(job_ev.id)
    assert _decision(job)["overpaid_msat"] == 200_000
    back = {p.id: p for p in await market.payouts(job_ev.id)}[f"{job_ev.id}:overpaid"]
    reserve = -(-200_000 * market.settings.payout_fee_ppm // 1_000_000)
    assert back.payee == market.customer.public_key_hex and back.amount_msat == (200_000 - reserve) // 1000 * 1000

    # the customer claims it like any reward, with an invoice of its own node
    async def claim_for_the_customer():
        for ev in await market.escrow_events(job_ev.id):
            if (tag(ev, "status") or [])[1:3] == ["success", "reward claimable"] and tag(ev, "p")[
                1
            ] == market.customer.public_key_hex:
                return ev
        return None

    claim = await wait_until(claim_for_the_customer, 30, "the excess announced to the customer", interval=0.3)
    assert int(tag(claim, "amount")[1]) == back.amount_msat
    inv = await regtest.customer.add_invoice(back.amount_msat, memo="the excess")
    await publish(
        market.relay,
        sign_event(
            market.customer,
            *build_payee_invoice(
                job_id=job_ev.id, escrow=market.E, amount_msat=back.amount_msat, bolt11=inv.payment_request
            ),
        ),
    )
    await market.claim_rewards(job_ev.id, [market.providers[0]])
    await market.wait_state(job_ev.id, "closed", timeout=60)
    paid = await regtest.customer.lookup_invoice(inv.payment_hash)
    assert paid.amt_paid_msat == back.amount_msat
    await market.check_ledger(job_ev.id, closed=True)


async def test_replies_also_go_to_the_requests_relays_but_never_to_private_addresses(
    regtest: Regtest, relay_url: str, database_url: str, relay_factory
) -> None:
    """NIP-90's ``relays`` tag names where the customer reads replies; it was ignored. Now the escrow
    publishes the job's events there too (at most ``reply_relays_max``), and a relay on a private
    address (a customer pointing the escrow at an internal host: SSRF) is refused without a
    connection. Loopback counts as private, so the first half of this test allows it explicitly."""
    theirs = relay_factory()
    m = Market(regtest, relay_url, database_url, reply_relays_allow_private=True)
    async with m.running():
        job_ev = await m.post_job(replace(m.job_spec(shards=1, validators=1, quorum=1), relays=(theirs.url,)))
        await m.offer(job_ev.id)

        async def on_their_relay():
            evs = await query(theirs.url, {"authors": [m.E], "#e": [job_ev.id]})
            return evs if any((tag(e, "status") or ["", ""])[1] == "payment-required" for e in evs) else None

        await wait_until(on_their_relay, 20, "the offer on the customer's relay", interval=0.3)

    m = Market(regtest, relay_url, database_url)  # private addresses not allowed (the default)
    async with m.running():
        job_ev = await m.post_job(
            replace(m.job_spec(shards=1, validators=1, quorum=1, bid=3_001_000), relays=(theirs.url,))
        )
        offer = await m.wait_status(job_ev.id, "payment-required")

        async def refused():
            async with m.sessions() as s:
                return (
                    await s.execute(
                        select(Delivery.state, Delivery.last_message).where(
                            Delivery.relay == theirs.url, Delivery.event_id == offer["id"], Delivery.state != "pending"
                        )
                    )
                ).first()

        row = await wait_until(refused, 20, "the private reply relay refused", interval=0.3)
        assert row.state == "rejected" and row.last_message.startswith("blocked:")
        assert await query(theirs.url, {"authors": [m.E], "#e": [job_ev.id]}) == []


async def test_a_payees_expensive_route_never_costs_the_escrow_more_than_it_earned(
    market: Market, regtest: Regtest
) -> None:
    """Both payees of a 100-sat job give invoices behind their own hop (payee2 behind the payee, a
    9.5-sat base fee). Before: a 10-sat floor on the fee limit let the routes take 19 sat, and the
    job left the escrow 17 sat poorer. Now the routes are refused (nothing is paid, the payees are
    told why), the payees give cheaper invoices, and the escrow's net on the job is not negative."""
    from service.ledger import accounts
    from service.ledger import service as ledger

    await regtest.set_payee_hop_fee(9_500, 0)
    try:
        job_ev = await market.post_job(
            market.job_spec(shards=1, validators=1, quorum=1, validator_fee=1_000, bid=100_000)
        )
        pay = await market.fund(job_ev.id)
        p1, v1 = market.providers[0], market.validators[0]
        r1 = await market.submit(job_ev, p1, 0, b"a good model")
        await market.score(job_ev.id, v1, {r1.id: ("0.9", sha(b"a good model"))})
        payouts = {p.payee: p for p in await market.released(job_ev.id)}
        await settle_payment(pay)
        for key in (p1, v1):
            amount = payouts[key.public_key_hex].amount_msat
            inv = await regtest.payee2.add_invoice(amount, memo="behind my own hop", private=True)
            await publish(
                market.relay,
                sign_event(
                    key,
                    *build_payee_invoice(
                        job_id=job_ev.id, escrow=market.E, amount_msat=amount, bolt11=inv.payment_request
                    ),
                ),
            )

        async def both_refused():
            reasons = [tag(ev, "reason") for ev in await market.escrow_events(job_ev.id)]
            return reasons.count(["reason", "route_fee_exceeds_limit"]) == 2

        await wait_until(both_refused, 60, "both payees told their route costs too much", interval=0.5)
        await market.claim_rewards(job_ev.id, [p1, v1])  # invoices of the payee node itself
        await market.wait_state(job_ev.id, "closed", timeout=60)
        async with market.sessions() as s:
            b = await ledger.balances(s, job_id=job_ev.id)
        earned, routing = -b.get(accounts.FEE_INCOME, 0), b.get(accounts.ROUTING_EXPENSE, 0)
        assert routing == 0 and earned > 0, b
    finally:
        await regtest.set_payee_hop_fee(1_000, 1)


async def test_a_reward_is_claimed_and_paid_with_an_lnbits_wallet(market: Market, lnbits_payee) -> None:
    """The demo's split reward (3,000,000 msat between two providers, two validators) was 1,434,500
    msat: LNbits, like most wallets, invoices whole satoshis, so the invoice was refused as
    ``wrong_amount`` and the payout waited for ever. Now the provider claims with an LNbits invoice
    for the announced amount and is paid."""
    job_ev = await market.post_job(
        market.job_spec(shards=2, policy="split", bid=3_000_000, validators=2, quorum=2, validator_fee=50_000)
    )
    pay = await market.fund(job_ev.id)
    p1, p2, _ = market.providers
    r1 = await market.submit(job_ev, p1, 0, b"model one")
    r2 = await market.submit(job_ev, p2, 1, b"model two")
    for v in market.validators:
        await market.score(job_ev.id, v, {r1.id: ("0.9", sha(b"model one")), r2.id: ("0.9", sha(b"model two"))})
    payouts = {p.payee: p for p in await market.released(job_ev.id)}
    await settle_payment(pay)
    mine = payouts[p1.public_key_hex]
    assert mine.amount_msat % 1000 == 0
    bolt11 = await lnbits_payee.invoice(mine.amount_msat // 1000, "my reward")
    await publish(
        market.relay,
        sign_event(
            p1, *build_payee_invoice(job_id=job_ev.id, escrow=market.E, amount_msat=mine.amount_msat, bolt11=bolt11)
        ),
    )

    async def paid():
        return {p.id: p.state for p in await market.payouts(job_ev.id)}[mine.id] == "succeeded"

    await wait_until(paid, 60, "the reward paid to the LNbits wallet", interval=0.5)
    assert await lnbits_payee.paid(decode_bolt11(bolt11).payment_hash)
