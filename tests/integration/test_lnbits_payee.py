"""LNbits as a payee's wallet (issue item 16, payout side), on the devstack's payee node.

LNbits, like most wallets, invoices whole satoshis: asked for 1434.5 sat it silently makes an
invoice for 1434 sat, and it refuses a millisatoshi unit. A payout of 1,434,500 msat (a split
reward the demo pays) can therefore never be claimed with an LNbits invoice: the worker refuses
it as `wrong_amount` and sends nothing. The engine must pay whole satoshis.
"""

from __future__ import annotations

import bolt11
import pytest
from sqlalchemy import select

from service.db import create_engine, session_factory
from service.payouts import Destination, DestinationKind, NewPayout, PayoutKind, PayoutPolicy
from service.payouts.models import Payout, PayoutAttempt
from service.payouts.store import create as create_payout
from service.payouts.worker import Payouts
from tests.conftest import Regtest, wait_until
from tests.support.lnbits import LnbitsPayee
from tests.support.payouts import pay_due

pytestmark = pytest.mark.lnd

POLICY = PayoutPolicy(network="regtest", min_expiry_seconds=60)


@pytest.fixture
async def payouts(regtest: Regtest, database_url: str):
    engine = create_engine(database_url)
    yield Payouts(regtest.escrow, session_factory(engine), POLICY, our_pubkey=regtest.node("escrow")["pubkey"])
    await engine.dispose()


async def _payout(payouts: Payouts, pid: str, amount_msat: int, payreq: str) -> Payout:
    async with payouts.sessions.begin() as s:
        await create_payout(
            s,
            NewPayout(
                pid, "0f" * 32, PayoutKind.REWARD, "f0" * 32, amount_msat, Destination(DestinationKind.BOLT11, payreq)
            ),
        )
    await pay_due(payouts)
    async with payouts.sessions() as s:
        return await s.get(Payout, pid)


async def test_a_whole_sat_payout_to_an_lnbits_invoice_is_paid(payouts: Payouts, lnbits_payee: LnbitsPayee) -> None:
    req = await lnbits_payee.invoice(1_434, "reward")
    h = bolt11.decode(req).payment_hash
    assert not await lnbits_payee.paid(h)
    p = await _payout(payouts, "job:reward:whole", 1_434_000, req)
    assert (p.state, p.payment_hash, p.fee_msat) == ("succeeded", h, 0), p.last_error
    await wait_until(lambda: lnbits_payee.paid(h), 15, "LNbits sees its invoice paid")


async def test_lnbits_cannot_invoice_a_fractional_sat_amount(payouts: Payouts, lnbits_payee: LnbitsPayee) -> None:
    r = await lnbits_payee.create_invoice(1_434.5, "reward of 1434500 msat")
    assert r.status_code == 201, r.text
    req = r.json()["bolt11"]
    assert bolt11.decode(req).amount_msat == r.json()["amount"] == 1_434_000, "rounded down to whole sat, silently"
    r = await lnbits_payee.create_invoice(1_434_500, "in msat?", unit="msat")
    assert r.status_code == 400 and "unit is not supported" in r.text, r.text

    p = await _payout(payouts, "job:reward:fractional", 1_434_500, req)
    assert p.state == "needs_invoice" and p.last_error.startswith("wrong_amount: "), p.last_error
    async with payouts.sessions() as s:
        assert (await s.scalars(select(PayoutAttempt))).all() == [], "nothing was sent"
    assert not await lnbits_payee.paid(bolt11.decode(req).payment_hash)
