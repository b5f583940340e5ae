"""Reconciliation of the ledger against a real LND node (regtest): invoices paid and payouts sent for real."""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service import reconcile as R
from service.db import create_engine, session_factory
from service.ledger import accounts as A
from service.ledger import service as L
from service.lightning.client import InvoiceState, PaymentStatus
from service.lightning.models import LnInvoice
from service.payouts import DestinationKind, PayoutKind
from service.payouts.models import Payout, PayoutAttempt
from tests.conftest import Regtest, wait_until

pytestmark = pytest.mark.lnd

PAYEE = "c3" * 32


@dataclass
class Books:
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    regtest: Regtest
    job: str

    async def paid_invoice(self, amount: int, *, book: int | None = None) -> str:
        """An invoice of the escrow node paid by the customer, its settled row, and (unless book=0) its funding."""
        added = await self.regtest.escrow.add_invoice(amount, memo="ledger reconcile test")
        pay = await self.regtest.customer_pays(added.payment_request)
        assert pay.status == PaymentStatus.SUCCEEDED, pay
        await wait_until(lambda: _settled(self.regtest, added.payment_hash), 20, "invoice settled at the escrow")
        h = added.payment_hash.hex()
        async with self.sessions.begin() as s:
            s.add(
                LnInvoice(
                    payment_hash=h,
                    job_id=self.job,
                    mode="custodial",
                    amount_msat=amount,
                    payment_request=added.payment_request,
                    expires_at=int(time.time()) + 3600,
                    state="settled",
                    amount_paid_msat=amount,
                )
            )
            booked = amount if book is None else book
            if booked:
                await L.post(
                    s,
                    key=f"funding:{h}",
                    kind="funding",
                    job_id=self.job,
                    lines=[(A.NODE, booked), (A.escrow(self.job), -booked)],
                )
        return h

    async def reconcile(self, **kw) -> R.ReconciliationReport:
        async with self.sessions.begin() as s:
            return await R.reconcile(s, self.regtest.escrow, **kw)

    async def paused(self) -> bool:
        async with self.sessions() as s:
            return await R.payouts_paused(s)


async def _settled(regtest: Regtest, payment_hash: bytes) -> bool:
    return (await regtest.escrow.lookup_invoice(payment_hash)).state == InvoiceState.SETTLED


def found(report: R.ReconciliationReport) -> set[tuple[str, str | None, int, int]]:
    return {(d.kind, d.payment_hash, d.expected_msat, d.actual_msat) for d in report.discrepancies}


@pytest.fixture
async def books(regtest: Regtest, database_url: str) -> AsyncIterator[Books]:
    engine = create_engine(database_url)
    yield Books(engine, session_factory(engine), regtest, secrets.token_hex(32))
    await engine.dispose()


async def test_funding_reconciles_and_a_missing_or_wrong_posting_pauses_payouts(books: Books) -> None:
    h1 = await books.paid_invoice(25_000)
    rep = await books.reconcile()
    assert rep.ok and rep.discrepancies == [], rep.discrepancies
    assert (rep.invoices_checked, rep.ledger_node_msat, rep.lnd_node_msat) == (1, 25_000, 25_000)
    assert rep.lnd_local_balance_msat is not None and rep.lnd_local_balance_msat >= 25_000
    assert not await books.paused()

    h2 = await books.paid_invoice(12_000, book=0)  # the funding posting is missing
    rep = await books.reconcile()
    assert found(rep) == {("funding_missing", h2, 12_000, 0)}
    assert not rep.ok and rep.discrepancy_msat == 12_000
    assert await books.paused()

    async with books.sessions.begin() as s:  # booked, but for the wrong amount
        wrong = await L.post(
            s,
            key=f"funding:{h2}",
            kind="funding",
            job_id=books.job,
            lines=[(A.NODE, 11_999), (A.escrow(books.job), -11_999)],
        )
    rep = await books.reconcile()
    assert found(rep) == {("funding_mismatch", h2, 12_000, 11_999)}
    assert await books.paused()
    assert (await books.reconcile(threshold_msat=1)).ok, "1 msat is within a 1 msat threshold"
    assert not await books.paused()
    assert not (await books.reconcile()).ok
    assert await books.paused()

    async with books.sessions.begin() as s:  # corrected: reversal + the right amount
        await L.reverse(s, wrong, key=f"reversal:funding:{h2}")
        await L.post(
            s,
            key=f"funding:{h2}:fix",
            kind="funding",
            job_id=books.job,
            lines=[(A.NODE, 12_000), (A.escrow(books.job), -12_000)],
        )
    rep = await books.reconcile()
    assert rep.ok and rep.discrepancies == [], rep.discrepancies
    assert rep.ledger_node_msat == rep.lnd_node_msat == 37_000
    assert not await books.paused()
    assert h1 != h2


async def test_invoice_open_in_lnd_but_settled_here(books: Books) -> None:
    added = await books.regtest.escrow.add_invoice(9_000, memo="never paid")
    h = added.payment_hash.hex()
    async with books.sessions.begin() as s:
        s.add(
            LnInvoice(
                payment_hash=h,
                job_id=books.job,
                mode="custodial",
                amount_msat=9_000,
                payment_request=added.payment_request,
                expires_at=int(time.time()) + 3600,
                state="settled",
                amount_paid_msat=9_000,
            )
        )
        await L.post(s, key=f"funding:{h}", kind="funding", lines=[(A.NODE, 9_000), (A.escrow(books.job), -9_000)])
    rep = await books.reconcile()
    assert found(rep) == {("invoice_not_settled", h, 9_000, 0), ("funding_mismatch", h, 0, 9_000)}
    assert await books.paused()


async def test_real_payout_reconciles(books: Books) -> None:
    regtest = books.regtest
    await books.paid_invoice(40_000)
    payable = A.payable(PAYEE, books.job)
    async with books.sessions.begin() as s:
        await L.post(
            s,
            key=f"release:{books.job}",
            kind="release",
            lines=[(A.escrow(books.job), 40_000), (payable, -39_000), (A.FEE_INCOME, -1_000)],
        )

    req, ph = await regtest.payee_invoice(39_000, memo="reward")
    pay = await regtest.escrow.pay(req, fee_limit_msat=10_000, timeout_seconds=30)
    assert pay.status == PaymentStatus.SUCCEEDED, pay
    h = ph.hex()
    payout_id = f"{books.job[:16]}:reward"
    async with books.sessions.begin() as s:
        s.add(
            Payout(
                id=payout_id,
                kind=PayoutKind.REWARD,
                job_id=books.job,
                payee=PAYEE,
                amount_msat=39_000,
                destination_kind=DestinationKind.BOLT11,
                destination=req,
                state="succeeded",
                attempts=1,
                fee_msat=pay.fee_msat,
                payment_hash=h,
                preimage=pay.preimage.hex(),
            )
        )
        await s.flush()
        s.add(
            PayoutAttempt(
                payment_hash=h,
                payout_id=payout_id,
                payment_request=req,
                fee_limit_msat=10_000,
                state="succeeded",
                fee_msat=pay.fee_msat,
                preimage=pay.preimage.hex(),
            )
        )
        await L.post(
            s, key=f"payout:{h}", kind="payout", job_id=books.job, lines=[(payable, 39_000), (A.NODE, -39_000)]
        )
        if pay.fee_msat:
            await L.post(
                s,
                key=f"routing_fee:{h}",
                kind="routing_fee",
                job_id=books.job,
                lines=[(A.ROUTING_EXPENSE, pay.fee_msat), (A.NODE, -pay.fee_msat)],
            )
        await L.assert_balanced(s, closed_job_ids=[books.job])
    rep = await books.reconcile()
    assert rep.ok and rep.discrepancies == [], rep.discrepancies
    assert (rep.invoices_checked, rep.payments_checked) == (1, 1)
    assert (rep.lnd_settled_msat, rep.lnd_paid_msat, rep.lnd_fees_msat) == (40_000, 39_000, pay.fee_msat)
    assert rep.ledger_node_msat == rep.lnd_node_msat == 1_000 - pay.fee_msat
    assert rep.liabilities_msat == 0
    assert not await books.paused()

    # an attempt recorded as succeeded that LND never sent: found, and payouts pause
    ghost = secrets.token_hex(32)
    async with books.sessions.begin() as s:
        s.add(
            Payout(
                id=f"{books.job[:16]}:ghost",
                kind=PayoutKind.REWARD,
                job_id=books.job,
                payee=PAYEE,
                amount_msat=1_000,
                destination_kind=DestinationKind.NONE,
                destination="",
                state="succeeded",
                attempts=1,
                fee_msat=0,
                payment_hash=ghost,
            )
        )
        await s.flush()
        s.add(
            PayoutAttempt(
                payment_hash=ghost,
                payout_id=f"{books.job[:16]}:ghost",
                payment_request="lnbcrt1",
                fee_limit_msat=1_000,
                state="succeeded",
                fee_msat=0,
            )
        )
    rep = await books.reconcile()
    assert found(rep) == {("payment_unknown", ghost, 1_000, 0)}
    assert await books.paused()
