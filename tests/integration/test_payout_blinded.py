"""Payee invoices with blinded paths (issue 17, part 4), on real LND (v0.20.2) nodes.

A blinded invoice (``AddInvoice`` with ``is_blinded``; bLIP 39) hides its node: it is signed with
a one-time key, carries no payment secret, and reaches its recipient over blinded paths whose one
real node (the introduction node) is named, with the path's aggregate fees and CLTV delta. The
payee node here is ``payee2``, behind ``payee`` over a private channel: its path's introduction
node is ``payee``, a real hop that charges its channel fee (× 1.1: LND pads a blinded path's
policy), and no dummy hops (``num_hops=1``), so the recipient gets exactly the invoice's amount.

Before: the ``bolt11`` library refused every such invoice (no payment secret): the payout went back
to its payee with ``invoice_undecodable``. Now it is checked (both decodings of its paths
compared), quoted (``QueryRoutes`` to its paths: LND's ``EstimateRouteFee`` cannot reach a
blinded invoice), paid within the payout's fee limit (the paths' fees included), and booked.
"""

from __future__ import annotations

import hashlib

import httpx
import pytest
from sqlalchemy import select

from service.config import Settings
from service.db import create_engine, session_factory
from service.ledger import accounts
from service.ledger import service as ledger
from service.ledger.models import LedgerPosting
from service.lightning import lnurl
from service.lightning.client import BlindedPathsWanted, InvoiceState
from service.payouts import (
    CheckReason,
    Destination,
    DestinationKind,
    InvoiceCheckError,
    NewPayout,
    PayoutKind,
    PayoutPolicy,
)
from service.payouts.check import check_invoice, decode_offline
from service.payouts.models import Payout, PayoutAttempt
from service.payouts.store import create as create_payout
from service.payouts.worker import Payouts
from tests.conftest import Regtest, wait_until
from tests.e2e.market import Market, tag
from tests.e2e.test_payout_hash_race import releasing_job, rest_invoice
from tests.support.payouts import pay_due

pytestmark = pytest.mark.lnd

ONE_REAL_HOP = BlindedPathsWanted(min_real_hops=1, num_hops=1)  # payee, then payee2; no dummy hops
SMALL = 100_000  # a 100-sat payout: its limit at the default 5000 ppm is 500 msat, below the path's fee
SMALL_LIMIT_MSAT = 500


@pytest.fixture
async def sessions(database_url: str):
    engine = create_engine(database_url)
    yield session_factory(engine)
    await engine.dispose()


def _policy(**kw) -> PayoutPolicy:
    return PayoutPolicy.from_settings(Settings(_env_file=None, payout_invoice_min_expiry_seconds=60, **kw))


async def _payout(sessions, payout_id: str, amount: int, payment_request: str) -> None:
    async with sessions.begin() as s:
        await create_payout(
            s,
            NewPayout(
                payout_id,
                None,
                PayoutKind.REWARD,
                "b2" * 32,
                amount,
                Destination(DestinationKind.BOLT11, payment_request),
            ),
        )


@pytest.mark.relay
async def test_a_blinded_invoice_is_accepted_paid_exactly_and_its_fee_booked(
    regtest: Regtest, relay_url: str, database_url: str
) -> None:
    market = Market(regtest, relay_url, database_url, reconcile_interval_seconds=3600)
    async with market.running():
        provider = market.providers[0]
        job = await releasing_job(market, provider)
        [p] = await market.payouts(job.id)
        inv = await regtest.payee2.add_invoice(p.amount_msat, memo="reward, blinded", blinded=ONE_REAL_HOP)
        [path] = (await regtest.escrow.decode_pay_req(inv.payment_request)).blinded_paths
        assert (path.introduction_node, path.num_hops) == (regtest.node("payee")["pubkey"], 2)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=market.app), base_url="http://api.test") as c:
            r = await rest_invoice(c, provider, job.id, inv.payment_request)
        assert r.status_code == 202, r.text  # before: 422 invoice_undecodable
        await market.wait_state(job.id, "closed", timeout=60)
        [paid] = await market.payouts(job.id)
        assert (paid.state, paid.payment_hash) == ("succeeded", inv.payment_hash.hex())
        assert paid.fee_msat == path.base_fee_msat + p.amount_msat * path.fee_ppm // 1_000_000 > 0
        settled = await regtest.payee2.lookup_invoice(inv.payment_hash)
        assert (settled.state, settled.amt_paid_msat) == (InvoiceState.SETTLED, p.amount_msat)
        h = inv.payment_hash.hex()
        async with market.sessions() as s:
            postings = {
                row.key: row.kind
                for row in (await s.scalars(select(LedgerPosting).where(LedgerPosting.job_id == job.id))).all()
            }
            balances = await ledger.balances(s, job_id=job.id)
            assert await ledger.check_invariants(s, closed_job_ids=[job.id]) == []
        assert postings[f"payout:{h}"] == "payout" and postings[f"routing_fee:{h}"] == "routing_fee"
        assert balances[accounts.ROUTING_EXPENSE] == paid.fee_msat


@pytest.mark.relay
async def test_a_payee_whose_blinded_path_costs_too_much_is_told_why_and_paid_on_a_cheaper_invoice(
    regtest: Regtest, relay_url: str, database_url: str
) -> None:
    """A 100-sat job: its reward's fee limit (at most 0.5 %, and no more than the escrow earned) is
    below the blinded path's fee. The payout goes back to the payee with the reason published to it,
    nothing is paid; the payee's next invoice (a plain one, over a direct channel) is paid, and the
    job costs the escrow no routing fee."""
    market = Market(regtest, relay_url, database_url, reconcile_interval_seconds=3600)
    async with market.running():
        provider = market.providers[0]
        job = await releasing_job(market, provider, bid=100_000)
        [p] = await market.payouts(job.id)
        inv = await regtest.payee2.add_invoice(p.amount_msat, memo="reward, blinded, dear", blinded=ONE_REAL_HOP)
        [path] = (await regtest.escrow.decode_pay_req(inv.payment_request)).blinded_paths
        assert path.base_fee_msat > p.amount_msat * 5_000 // 1_000_000, "the path costs more than the limit"
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=market.app), base_url="http://api.test") as c:
            r = await rest_invoice(c, provider, job.id, inv.payment_request)
            assert r.status_code == 202, r.text

            async def told() -> bool:
                return ["reason", "route_fee_exceeds_limit"] in [
                    tag(ev, "reason") for ev in await market.escrow_events(job.id)
                ]

            await wait_until(told, 60, "the payee told its blinded path costs too much", interval=0.5)
            assert (await regtest.payee2.lookup_invoice(inv.payment_hash)).state == InvoiceState.OPEN
            assert await regtest.escrow.current_payment(inv.payment_hash) is None, "nothing sent"
            plain, h = await regtest.payee_invoice(p.amount_msat, memo="reward, direct")
            r = await rest_invoice(c, provider, job.id, plain)
            assert r.status_code == 202, r.text
        await market.wait_state(job.id, "closed", timeout=60)
        assert (await regtest.payee.lookup_invoice(h)).state == InvoiceState.SETTLED
        balances = await market.check_ledger(job.id, closed=True)
        assert balances.get(accounts.ROUTING_EXPENSE, 0) == 0 and -balances[accounts.FEE_INCOME] > 0, balances


async def test_a_blinded_path_dearer_than_the_fee_limit_is_refused_and_nothing_paid(regtest: Regtest, sessions) -> None:
    """The path's own fee (the payee's hop, its policy padded by LND) is over a small payout's
    limit: quoted by QueryRoutes to the path before anything is sent, the payout goes back to its
    payee with both amounts; LND never sees the hash."""
    amount = SMALL
    inv = await regtest.payee2.add_invoice(amount, memo="blinded, dear path", blinded=ONE_REAL_HOP)
    [path] = (await regtest.escrow.decode_pay_req(inv.payment_request)).blinded_paths
    assert path.base_fee_msat > SMALL_LIMIT_MSAT, path
    fee = await regtest.escrow.route_fee(inv.payment_request)
    assert fee is not None and fee >= path.base_fee_msat, "the route's fee includes the path's"
    quote = await regtest.escrow.estimate_route_fee(inv.payment_request, timeout_seconds=10)
    assert quote.failure_reason.name == "NO_ROUTE", "LND's probe cannot reach a blinded invoice: why we use QueryRoutes"
    before = (await regtest.escrow.channel_balance()).local_msat
    await _payout(sessions, "job:reward:dear", amount, inv.payment_request)
    [outcome] = await pay_due(Payouts(regtest.escrow, sessions, _policy(), our_pubkey=regtest.node("escrow")["pubkey"]))
    async with sessions() as s:
        p = await s.get(Payout, "job:reward:dear")
        attempt = await s.get(PayoutAttempt, inv.payment_hash.hex())
    assert (outcome.state, p.state, p.fee_msat) == ("needs_invoice", "needs_invoice", None), p.last_error
    assert p.last_error.startswith("route_fee_exceeds_limit: "), p.last_error
    assert f"costs {fee} msat" in p.last_error and f"allows {SMALL_LIMIT_MSAT} msat" in p.last_error
    assert attempt.state == "not_initiated"
    assert await regtest.escrow.current_payment(inv.payment_hash) is None, "never sent"
    assert (await regtest.payee2.lookup_invoice(inv.payment_hash)).state == InvoiceState.OPEN
    assert (await regtest.escrow.channel_balance()).local_msat == before, "the escrow paid nothing, no fee"


async def test_without_the_quote_lnds_fee_limit_counts_the_path_and_the_payee_is_told(
    regtest: Regtest, sessions
) -> None:
    """SendPaymentV2's fee limit includes the blinded path's fees: LND finds no route within it
    (NO_ROUTE, no HTLC), and the route query to the path tells the payee why."""
    amount = SMALL
    inv = await regtest.payee2.add_invoice(amount, memo="blinded, no quote", blinded=ONE_REAL_HOP)
    await _payout(sessions, "job:reward:noquote", amount, inv.payment_request)
    policy = _policy(payout_fee_quote_seconds=0)
    [outcome] = await pay_due(Payouts(regtest.escrow, sessions, policy, our_pubkey=regtest.node("escrow")["pubkey"]))
    async with sessions() as s:
        p = await s.get(Payout, "job:reward:noquote")
        attempt = await s.get(PayoutAttempt, inv.payment_hash.hex())
    assert (outcome.state, p.state) == ("needs_invoice", "needs_invoice"), p.last_error
    assert p.last_error.startswith("route_fee_exceeds_limit: "), p.last_error
    assert f"allows {SMALL_LIMIT_MSAT} msat" in p.last_error, p.last_error
    assert (attempt.state, attempt.failure) == ("failed", "NO_ROUTE")
    tracked = await regtest.escrow.current_payment(inv.payment_hash)
    assert tracked is not None and tracked.htlc_attempts == 0 and tracked.fee_msat == 0
    assert (await regtest.payee2.lookup_invoice(inv.payment_hash)).state == InvoiceState.OPEN


async def test_our_own_blinded_invoice_is_refused(regtest: Regtest, sessions) -> None:
    """Signed with a one-time key, it does not name our node: our node knows its payment hash."""
    inv = await regtest.escrow.add_invoice(
        5_000, memo="our own, blinded", blinded=BlindedPathsWanted(min_real_hops=0, num_hops=0)
    )
    node = await regtest.escrow.decode_pay_req(inv.payment_request)
    assert node.destination != regtest.node("escrow")["pubkey"] and node.blinded_paths
    async with sessions() as s:
        with pytest.raises(InvoiceCheckError) as e:
            await check_invoice(
                regtest.escrow,
                s,
                inv.payment_request,
                amount_msat=5_000,
                policy=_policy(),
                our_pubkey=regtest.node("escrow")["pubkey"],
            )
    assert e.value.reason is CheckReason.SELF_PAYMENT, e.value


async def test_a_blinded_invoice_whose_paths_all_start_at_our_node_is_handed_back(regtest: Regtest, sessions) -> None:
    """LND's defaults on the payee node (one real hop) make its only path start at our node, which
    LND cannot pay ("introduction point as own node not supported"): asked for another at once."""
    wanted = BlindedPathsWanted(omit_nodes=(regtest.node("payee2")["pubkey"],))  # its other peer
    inv = await regtest.payee.add_invoice(5_000, memo="via the escrow", blinded=wanted)
    [path] = (await regtest.escrow.decode_pay_req(inv.payment_request)).blinded_paths
    assert path.introduction_node == regtest.node("escrow")["pubkey"]
    await _payout(sessions, "job:reward:via-us", 5_000, inv.payment_request)
    [outcome] = await pay_due(Payouts(regtest.escrow, sessions, _policy(), our_pubkey=regtest.node("escrow")["pubkey"]))
    async with sessions() as s:
        p = await s.get(Payout, "job:reward:via-us")
        attempts = (await s.scalars(select(PayoutAttempt))).all()
    assert outcome.state == "needs_invoice" and p.last_error.startswith("blinded_paths_start_at_our_node: ")
    assert attempts == [], "nothing written ahead, nothing sent"
    assert await regtest.escrow.current_payment(inv.payment_hash) is None


async def test_the_offline_check_reads_a_blinded_invoice(regtest: Regtest) -> None:
    """The path every payee invoice comes in by (REST, Nostr) decodes it without our node."""
    inv = await regtest.payee2.add_invoice(7_000, memo="offline", blinded=ONE_REAL_HOP)
    got = decode_offline(inv.payment_request, network="regtest")
    assert (got.payment_hash, got.amount_msat) == (inv.payment_hash.hex(), 7_000)


async def test_an_lnurl_services_blinded_invoice_passes_its_check(regtest: Regtest) -> None:
    """An LNURL-pay service may answer with a blinded invoice: its check reads it the same way."""
    metadata = '[["text/plain","blinded reward"]]'
    inv = await regtest.payee2.add_invoice(
        9_000, description_hash=hashlib.sha256(metadata.encode()).digest(), blinded=ONE_REAL_HOP
    )
    got = lnurl._check_invoice(inv.payment_request, 9_000, metadata, "regtest")
    assert (got.payment_hash, got.description_hash) == (inv.payment_hash, hashlib.sha256(metadata.encode()).digest())
