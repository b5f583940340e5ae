"""``service.payouts.store.accept_invoice``: the one way a payout is given a payee's invoice (the
Nostr kind-7000 event, the NIP-98 REST route), checked offline, against real regtest invoices
made by the stack's payee node. And ``retry``, an operator's, which checks the invoice it has.
"""

from __future__ import annotations

import asyncio
import os
import time

import bolt11
import pytest
from bolt11 import Bolt11, MilliSatoshi
from bolt11.models.tags import TagChar, Tags
from sqlalchemy import select

from service.db import create_engine, session_factory
from service.escrow.models import TimelineEntry
from service.payouts import (
    AcceptReason,
    CheckReason,
    Destination,
    DestinationKind,
    InvoiceRefused,
    InvoiceSource,
    NewPayout,
    PayoutKind,
    PayoutPolicy,
    PayoutState,
    RetryReason,
    RetryRefused,
    store,
)
from service.payouts.models import Payout
from service.payouts.worker import Payouts
from tests.conftest import Regtest
from tests.support.payouts import pay_due

pytestmark = pytest.mark.lnd

JOB, PAYEE, OTHER = "a0" * 32, "b1" * 32, "c2" * 32
AMOUNT = 21_000


@pytest.fixture
async def sessions(database_url: str):
    engine = create_engine(database_url)
    yield session_factory(engine)
    await engine.dispose()


async def _waiting(sessions, pid: str = f"{JOB}:reward:r", amount: int = AMOUNT, payee: str = PAYEE) -> str:
    async with sessions.begin() as s:
        assert await store.create(
            s, NewPayout(pid, JOB, PayoutKind.REWARD, payee, amount, Destination.none(), earned_by="r" * 64)
        )
    return pid


async def _accept(
    sessions,
    bolt11_text: str,
    *,
    payee: str = PAYEE,
    amount_msat: int | None = None,
    network: str = "regtest",
    source: InvoiceSource = InvoiceSource.REST,
) -> Payout:
    async with sessions.begin() as s:
        return await store.accept_invoice(
            s, job_id=JOB, payee=payee, bolt11=bolt11_text, amount_msat=amount_msat, source=source, network=network
        )


async def _refused(sessions, bolt11_text: str, **kw) -> str:
    with pytest.raises(InvoiceRefused) as e:
        await _accept(sessions, bolt11_text, **kw)
    return e.value.code.value


async def _payout(sessions, pid: str) -> Payout:
    async with sessions() as s:
        p = await s.get(Payout, pid)
        assert p is not None
        return p


def _signed(amount_msat: int | None, *, currency: str = "bcrt") -> str:
    tags = Tags()
    tags.add(TagChar.payment_hash, os.urandom(32).hex())
    tags.add(TagChar.payment_secret, os.urandom(32).hex())
    tags.add(TagChar.description, "offline")
    tags.add(TagChar.expire_time, 3600)
    return bolt11.encode(
        Bolt11(
            currency=currency,
            date=int(time.time()),
            tags=tags,
            amount_msat=None if amount_msat is None else MilliSatoshi(amount_msat),
        ),
        os.urandom(32).hex(),
    )


async def test_an_invoice_for_the_waiting_payout_makes_it_due(sessions, regtest: Regtest) -> None:
    pid = await _waiting(sessions)
    payreq, h = await regtest.payee_invoice(AMOUNT)
    p = await _accept(sessions, "lightning:" + payreq.upper(), source=InvoiceSource.NOSTR, amount_msat=AMOUNT)
    assert (p.id, p.state, p.destination_kind, p.destination) == (
        pid,
        PayoutState.PENDING,
        DestinationKind.BOLT11,
        payreq.lower(),
    )
    async with sessions() as s:
        [entry] = (await s.scalars(select(TimelineEntry).where(TimelineEntry.job_id == JOB))).all()
    assert entry.kind == "fact" and pid in entry.detail and "payee invoice" in entry.detail
    payouts = Payouts(
        regtest.escrow, sessions, PayoutPolicy(network="regtest"), our_pubkey=regtest.node("escrow")["pubkey"]
    )
    [outcome] = await pay_due(payouts)
    assert outcome.state == "succeeded" and (await _payout(sessions, pid)).payment_hash == h.hex()
    # given once: the payout no longer waits
    again, _ = await regtest.payee_invoice(AMOUNT)
    assert await _refused(sessions, again) == AcceptReason.NOT_WAITING


async def test_each_bad_invoice_is_refused_with_its_code_and_the_payout_still_waits(sessions, regtest: Regtest) -> None:
    pid = await _waiting(sessions)
    wrong_amount, _ = await regtest.payee_invoice(AMOUNT - 1_000)
    expired, _ = await regtest.payee_invoice(AMOUNT, expiry=1)
    good, _ = await regtest.payee_invoice(AMOUNT)
    await asyncio.sleep(1.5)
    assert await _refused(sessions, wrong_amount) == CheckReason.WRONG_AMOUNT
    assert await _refused(sessions, expired) == CheckReason.EXPIRED
    assert await _refused(sessions, good, network="testnet") == CheckReason.WRONG_NETWORK  # we pay on testnet
    assert await _refused(sessions, _signed(AMOUNT, currency="bc")) == CheckReason.WRONG_NETWORK
    assert await _refused(sessions, _signed(None)) == CheckReason.NO_AMOUNT
    assert await _refused(sessions, "lnbcrt1notaninvoice") == CheckReason.UNDECODABLE
    p = await _payout(sessions, pid)
    assert (p.state, p.destination_kind, p.needs_invoice_count) == (
        PayoutState.NEEDS_INVOICE,
        DestinationKind.NONE,
        0,
    ), "each refusal rolled back with the caller's transaction"


async def test_no_waiting_payout_is_refused(sessions, regtest: Regtest) -> None:
    good, _ = await regtest.payee_invoice(AMOUNT)
    assert await _refused(sessions, good) == AcceptReason.NO_PAYOUT
    await _waiting(sessions)
    assert await _refused(sessions, good, payee=OTHER) == AcceptReason.NO_PAYOUT, "another key's payout"
    assert await _refused(sessions, good, amount_msat=AMOUNT + 1) == AcceptReason.NOT_WAITING, "stated amount"


async def test_a_hash_that_paid_a_payout_is_refused_for_another(sessions, regtest: Regtest) -> None:
    payreq, _ = await regtest.payee_invoice(AMOUNT)
    async with sessions.begin() as s:
        await store.create(
            s,
            NewPayout(
                "paid", JOB, PayoutKind.VALIDATOR_FEE, OTHER, AMOUNT, Destination(DestinationKind.BOLT11, payreq)
            ),
        )
    payouts = Payouts(
        regtest.escrow, sessions, PayoutPolicy(network="regtest"), our_pubkey=regtest.node("escrow")["pubkey"]
    )
    assert [o.state for o in await pay_due(payouts)] == ["succeeded"]
    await _waiting(sessions)
    assert await _refused(sessions, payreq) == CheckReason.HASH_REUSED


async def test_a_refusal_in_a_committed_transaction_is_a_new_outcome_for_the_payee(sessions, regtest: Regtest) -> None:
    """The Nostr path commits its "ignored" note: the payout carries the reason, and a new
    needs_invoice outcome (the engine announces the reward again with the reason's code)."""
    pid = await _waiting(sessions)
    wrong, _ = await regtest.payee_invoice(AMOUNT + 1_000)
    async with sessions.begin() as s:
        with pytest.raises(InvoiceRefused):
            await store.accept_invoice(
                s,
                job_id=JOB,
                payee=PAYEE,
                bolt11=wrong,
                amount_msat=AMOUNT,
                source=InvoiceSource.NOSTR,
                network="regtest",
            )
    p = await _payout(sessions, pid)
    assert p.state is PayoutState.NEEDS_INVOICE and p.needs_invoice_count == 1
    assert p.last_error is not None and p.last_error.startswith("wrong_amount: ")


async def test_retry_checks_the_invoice_it_has(sessions, regtest: Regtest) -> None:
    async def retry(pid: str) -> str:
        async with sessions.begin() as s:
            try:
                return (await store.retry(s, pid)).value
            except RetryRefused as e:
                return e.code.value

    assert await retry("nothing") == RetryReason.NOT_FOUND
    waiting = await _waiting(sessions)
    assert await retry(waiting) == RetryReason.NEEDS_INVOICE
    expired, _ = await regtest.payee_invoice(AMOUNT, expiry=1)
    good, _ = await regtest.payee_invoice(AMOUNT)
    await asyncio.sleep(1.5)
    for pid, payreq in (("expired", expired), ("good", good)):
        async with sessions.begin() as s:
            await store.create(
                s, NewPayout(pid, JOB, PayoutKind.REFUND, OTHER, AMOUNT, Destination(DestinationKind.BOLT11, payreq))
            )
    assert await retry("good") == RetryReason.NOT_RETRYABLE, "pending: nothing to retry"
    async with sessions.begin() as s:
        for pid in ("expired", "good"):
            p = await s.get(Payout, pid)
            assert p is not None
            p.state = PayoutState.FAILED  # as the worker leaves a payout it gave up on
    assert await retry("expired") == CheckReason.EXPIRED
    assert await retry("good") == PayoutState.PENDING
    assert (await _payout(sessions, "good")).state is PayoutState.PENDING
