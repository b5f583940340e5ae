"""Reconciliation: the ledger against what LND reports, and the payout pause that follows from it.

:func:`reconcile` reads, in **one** SQL statement (one consistent snapshot), the
settled invoices (``ln_invoices``), the succeeded payout attempts
(``ln_payout_attempts`` with their ``ln_payouts``), the node/routing-expense sums of
every ledger posting that touches them, and the ledger's total on ``asset:node``.
Then it asks LND, one call at a time and each under a deadline, about every one of
those payments:

1. each settled invoice must be SETTLED in LND with ``amt_paid_msat`` >= the row's
   amount, and the posting ``funding:<payment_hash>`` must debit ``asset:node`` by
   exactly the amount LND says was paid;
2. each succeeded attempt must be SUCCEEDED in LND with the payout's amount and the
   attempt's fee; ``payout:<payment_hash>`` must credit ``asset:node`` by the amount
   and, when the fee is non-zero, ``routing_fee:<payment_hash>`` must credit
   ``asset:node`` and debit ``expense:routing`` by the fee;
3. each attempt an operator abandoned (``store.reissue``: LND had failed it, or it could no
   longer settle) must not be SUCCEEDED in LND: if LND reports it paid after all, that is
   ``reissued_payment_succeeded`` (payouts pause; nothing is booked for it, ever: the operator
   decides what the payee owes back);
4. any other posting that moves ``asset:node`` is a discrepancy, and the ledger's
   total on ``asset:node`` must equal (settled − paid − fees) as reported by LND,
   up to the per-item discrepancies already listed.

A reversal counts under the key of the posting it reverses, so a reversed funding
nets to zero and shows as ``funding_mismatch``; a key ``<prefix>:<payment_hash>:<suffix>``
counts as ``<prefix>:<payment_hash>``, so a wrong posting is corrected by reversing it
and posting the right amount as e.g. ``funding:<payment_hash>:fix``.

The report is stored in ``ledger_reconciliations``; while the latest row is not ok,
:func:`payouts_paused` is true and the payout worker must send nothing.
:func:`resume_payouts` records an operator's override (until the next run).

An LND transport failure (unavailable, deadline passed) aborts the run with the
:mod:`service.lightning.errors` exception and stores nothing: an incomplete
comparison neither pauses nor resumes payouts. "Not found" is an answer, and is
reported as a discrepancy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import Awaitable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import BigInteger, String, case, cast, func, literal, null, select, union_all
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.selectable import CompoundSelect

from service.db import utcnow
from service.ledger import accounts
from service.ledger import postings as posting_keys
from service.ledger.models import LedgerLine, LedgerPosting, LedgerReconciliation
from service.lightning import errors
from service.lightning.client import InvoiceState, LndClient, Payment, PaymentStatus
from service.lightning.models import LnInvoice
from service.payouts.models import Payout, PayoutAttempt
from service.payouts.types import AttemptState

T = TypeVar("T")

MAX_STORED_DISCREPANCIES = 1000
_HASH_RE = re.compile(r"\A[0-9a-f]{64}\Z")

# Discrepancy kinds. LND vs our Lightning tables:
INVOICE_UNKNOWN = "invoice_unknown"  # settled here, LND does not know the hash
INVOICE_NOT_SETTLED = "invoice_not_settled"  # settled here, not SETTLED in LND
INVOICE_UNDERPAID = "invoice_underpaid"  # LND's amt_paid below the row's amount
PAYMENT_UNKNOWN = "payment_unknown"  # succeeded here, LND does not know the hash
PAYMENT_NOT_SUCCEEDED = "payment_not_succeeded"  # succeeded here, not SUCCEEDED in LND
PAYMENT_AMOUNT_MISMATCH = "payment_amount_mismatch"  # LND's value vs the payout's amount
PAYMENT_FEE_MISMATCH = "payment_fee_mismatch"  # LND's fee vs the attempt's fee_msat
# LND vs the ledger:
FUNDING_MISSING = "funding_missing"
FUNDING_MISMATCH = "funding_mismatch"
PAYOUT_MISSING = "payout_missing"
PAYOUT_MISMATCH = "payout_mismatch"
ROUTING_FEE_MISSING = "routing_fee_missing"
ROUTING_FEE_MISMATCH = "routing_fee_mismatch"  # node credit of routing_fee:<hash> vs LND's fee
ROUTING_EXPENSE_MISMATCH = "routing_expense_mismatch"  # expense debit of routing_fee:<hash> vs LND's fee
REISSUED_PAYMENT_SUCCEEDED = "reissued_payment_succeeded"  # an abandoned attempt LND reports paid after all
UNMATCHED_NODE_POSTING = "unmatched_node_posting"  # moves asset:node without a matching LND payment
NODE_TOTAL_MISMATCH = "node_total_mismatch"  # asset:node total differs beyond the items above


@dataclass(frozen=True, slots=True)
class Discrepancy:
    kind: str
    payment_hash: str | None
    expected_msat: int
    actual_msat: int
    detail: str = ""

    @property
    def amount_msat(self) -> int:
        return abs(self.expected_msat - self.actual_msat)


@dataclass(slots=True)
class ReconciliationReport:
    ran_at: datetime
    ok: bool
    threshold_msat: int
    discrepancy_msat: int  # sum of |expected - actual| over the discrepancies
    discrepancies: list[Discrepancy]
    invoices_checked: int
    payments_checked: int
    ledger_node_msat: int  # the ledger's balance of asset:node
    lnd_settled_msat: int  # what LND says our settled invoices brought in
    lnd_paid_msat: int  # what LND says our succeeded payments sent
    lnd_fees_msat: int  # ... and the routing fees they cost
    lnd_local_balance_msat: int | None = None  # channel_balance().local_msat, for information
    liabilities_msat: int = 0  # what the ledger says the escrow owes (>= 0)
    warnings: list[str] = field(default_factory=list)
    id: int | None = None  # the ledger_reconciliations row, once stored

    @property
    def lnd_node_msat(self) -> int:
        return self.lnd_settled_msat - self.lnd_paid_msat - self.lnd_fees_msat

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "discrepancies"}
        d["ran_at"] = self.ran_at.isoformat()
        d["lnd_node_msat"] = self.lnd_node_msat
        d["discrepancies"] = [asdict(x) for x in self.discrepancies[:MAX_STORED_DISCREPANCIES]]
        d["discrepancies_omitted"] = max(0, len(self.discrepancies) - MAX_STORED_DISCREPANCIES)
        return d

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), sort_keys=True)


@dataclass(slots=True)
class _Sums:
    node: int = 0
    expense: int = 0


def _snapshot_query() -> CompoundSelect[Any]:
    s, b = String(200), BigInteger()
    inv = select(
        literal("inv", s).label("src"),
        cast(LnInvoice.payment_hash, s).label("ref"),
        cast(null(), s).label("key"),
        cast(null(), s).label("extra"),
        cast(LnInvoice.amount_msat, b).label("v1"),
        cast(LnInvoice.amount_paid_msat, b).label("v2"),
    ).where(LnInvoice.state == "settled")
    pay = (
        select(
            literal("pay", s),
            cast(PayoutAttempt.payment_hash, s),
            cast(PayoutAttempt.payout_id, s),
            cast(null(), s),
            cast(Payout.amount_msat, b),
            cast(PayoutAttempt.fee_msat, b),
        )
        .join(Payout, Payout.id == PayoutAttempt.payout_id)
        .where(PayoutAttempt.state == AttemptState.SUCCEEDED)
    )
    abandoned = (
        select(
            literal("aban", s),
            cast(PayoutAttempt.payment_hash, s),
            cast(PayoutAttempt.payout_id, s),
            cast(null(), s),
            cast(Payout.amount_msat, b),
            cast(null(), b),
        )
        .join(Payout, Payout.id == PayoutAttempt.payout_id)
        .where(PayoutAttempt.state == AttemptState.ABANDONED)
    )
    node = func.sum(case((LedgerLine.account == accounts.NODE, LedgerLine.amount_msat), else_=0))
    expense = func.sum(case((LedgerLine.account == accounts.ROUTING_EXPENSE, LedgerLine.amount_msat), else_=0))
    led = (
        select(
            literal("led", s),
            cast(LedgerPosting.id, s),
            cast(LedgerPosting.key, s),
            cast(LedgerPosting.reverses, s),
            cast(node, b),
            cast(expense, b),
        )
        .join(LedgerLine, LedgerLine.posting_id == LedgerPosting.id)
        .where(LedgerLine.account.in_((accounts.NODE, accounts.ROUTING_EXPENSE)))
        .group_by(LedgerPosting.id, LedgerPosting.key, LedgerPosting.reverses)
    )
    tot = select(
        literal("tot", s),
        cast(null(), s),
        cast(null(), s),
        cast(null(), s),
        cast(func.coalesce(func.sum(LedgerLine.amount_msat), 0), b),
        cast(null(), b),
    ).where(LedgerLine.account == accounts.NODE)
    return union_all(inv, pay, abandoned, led, tot)


def _reconciliation_key(key: str) -> str:
    """``<prefix>:<payment_hash>`` for a posting keyed by a payment (``posting_keys.parse_key``), with
    anything after it dropped, else the key itself. So a correction booked as
    ``funding:<hash>:fix`` (after reversing a wrong ``funding:<hash>``) counts for the same payment.
    """
    parsed = posting_keys.parse_key(key)
    if parsed is None or parsed.payment_hash is None or not _HASH_RE.match(parsed.payment_hash):
        return key
    return f"{parsed.prefix}:{parsed.payment_hash}"


def _by_root_key(postings: dict[str, tuple[str, str | None, int, int]]) -> dict[str, _Sums]:
    """Sum node/expense per reconciliation key; a reversal counts under the key of the posting it (finally) reverses."""
    out: dict[str, _Sums] = {}
    for pid, (key, reverses, node, expense) in postings.items():
        root, seen = key, {pid}
        while reverses is not None and reverses in postings and reverses not in seen:
            seen.add(reverses)
            root, reverses = postings[reverses][0], postings[reverses][1]
        sums = out.setdefault(_reconciliation_key(root), _Sums())
        sums.node += node
        sums.expense += expense
    return out


async def _bounded(aw: Awaitable[T], timeout: float) -> T:
    try:
        async with asyncio.timeout(timeout):
            return await aw
    except TimeoutError:
        raise errors.LndTimeout("reconcile", f"no answer within {timeout} s") from None


async def _first_update(lnd: LndClient, payment_hash: bytes) -> Payment | None:
    """The payment's current state (the first message of TrackPaymentV2); the stream is then closed."""
    async with contextlib.aclosing(lnd.track_payment(payment_hash)) as updates:
        async for p in updates:
            return p
    return None


async def reconcile(
    session: AsyncSession,
    lnd: LndClient,
    *,
    threshold_msat: int = 0,
    call_timeout: float | None = None,
    persist: bool = True,
) -> ReconciliationReport:
    """Compare the ledger with LND; store the report (flush only) and return it.

    ``ok`` is true when the sum of |expected − actual| over all discrepancies is at
    most ``threshold_msat``. Each LND call runs alone and under ``call_timeout``
    seconds (default: the client's own timeout).
    """
    if type(threshold_msat) is not int or threshold_msat < 0:
        raise ValueError("threshold_msat must be a non-negative int")
    timeout = call_timeout if call_timeout is not None else lnd.timeout
    ran_at = utcnow()

    invoices: list[tuple[str, int]] = []
    attempts: list[tuple[str, str, int, int]] = []
    abandoned: list[tuple[str, str]] = []
    postings: dict[str, tuple[str, str | None, int, int]] = {}
    ledger_node = 0
    rows: list[tuple[str, str, str, str | None, int | None, int | None]] = [
        tuple(r) for r in (await session.execute(_snapshot_query())).all()
    ]
    for src, ref, key, extra, v1, v2 in rows:
        if src == "inv":
            invoices.append((ref, int(v1 or 0)))
        elif src == "pay":
            attempts.append((ref, key, int(v1 or 0), int(v2 or 0)))
        elif src == "aban":
            abandoned.append((ref, key))
        elif src == "led":
            postings[ref] = (key, extra, int(v1 or 0), int(v2 or 0))
        else:
            ledger_node = int(v1 or 0)
    by_key = _by_root_key(postings)

    found: list[Discrepancy] = []
    matched: set[str] = set()
    explained = 0  # signed (ledger - LND) on asset:node, over the items
    settled_in = paid_out = fees_out = 0

    for h, amount in sorted(invoices):
        try:
            inv = await _bounded(lnd.lookup_invoice(bytes.fromhex(h)), timeout)
        except (errors.LndNotFound, ValueError):
            inv = None
        paid = 0
        if inv is None:
            found.append(Discrepancy(INVOICE_UNKNOWN, h, amount, 0, "settled here, unknown to LND"))
        elif inv.state != InvoiceState.SETTLED:
            found.append(Discrepancy(INVOICE_NOT_SETTLED, h, amount, 0, f"LND says {inv.state.name}"))
        else:
            paid = inv.amt_paid_msat
            if paid < amount:
                found.append(Discrepancy(INVOICE_UNDERPAID, h, amount, paid, "LND's amt_paid_msat below the invoice"))
        settled_in += paid
        key = posting_keys.funding_key(h)
        matched.add(key)
        sums = by_key.get(key)
        booked = sums.node if sums else 0
        if sums is None and paid:
            found.append(Discrepancy(FUNDING_MISSING, h, paid, 0, f"no posting {key}"))
        elif sums is not None and booked != paid:
            found.append(Discrepancy(FUNDING_MISMATCH, h, paid, booked, f"{key} debits asset:node by {booked}"))
        explained += booked - paid

    for h, payout_id, amount, fee_row in sorted(attempts):
        try:
            p = await _bounded(_first_update(lnd, bytes.fromhex(h)), timeout)
        except (errors.LndNotFound, ValueError):
            p = None
        value = fee = 0
        if p is None:
            found.append(
                Discrepancy(PAYMENT_UNKNOWN, h, amount, 0, f"payout {payout_id}: succeeded here, unknown to LND")
            )
        elif p.status != PaymentStatus.SUCCEEDED:
            found.append(
                Discrepancy(PAYMENT_NOT_SUCCEEDED, h, amount, 0, f"payout {payout_id}: LND says {p.status.name}")
            )
        else:
            value, fee = p.value_msat, p.fee_msat
            if value != amount:
                found.append(Discrepancy(PAYMENT_AMOUNT_MISMATCH, h, amount, value, f"payout {payout_id}"))
            if fee != fee_row:
                found.append(
                    Discrepancy(PAYMENT_FEE_MISMATCH, h, fee_row, fee, f"payout {payout_id}: attempt's fee_msat")
                )
        paid_out += value
        fees_out += fee

        key = posting_keys.payout_key(h)
        matched.add(key)
        sums = by_key.get(key)
        sent = -sums.node if sums else 0
        if sums is None and value:
            found.append(Discrepancy(PAYOUT_MISSING, h, value, 0, f"no posting {key}"))
        elif sums is not None and sent != value:
            found.append(Discrepancy(PAYOUT_MISMATCH, h, value, sent, f"{key} credits asset:node by {sent}"))
        explained += value - sent

        key = posting_keys.routing_fee_key(h)
        matched.add(key)
        sums = by_key.get(key)
        booked_fee = -sums.node if sums else 0
        if sums is None and fee:
            found.append(Discrepancy(ROUTING_FEE_MISSING, h, fee, 0, f"no posting {key}"))
        elif sums is not None:
            if booked_fee != fee:
                found.append(
                    Discrepancy(ROUTING_FEE_MISMATCH, h, fee, booked_fee, f"{key} credits asset:node by {booked_fee}")
                )
            if sums.expense != fee:
                found.append(
                    Discrepancy(
                        ROUTING_EXPENSE_MISMATCH,
                        h,
                        fee,
                        sums.expense,
                        f"{key} debits expense:routing by {sums.expense}",
                    )
                )
        explained += fee - booked_fee

    for h, payout_id in sorted(abandoned):
        try:
            p = await _bounded(_first_update(lnd, bytes.fromhex(h)), timeout)
        except (errors.LndNotFound, ValueError):
            p = None
        if p is not None and p.status == PaymentStatus.SUCCEEDED:
            # Money left for an attempt the payout no longer counts: never booked here (the payout
            # is paid by its new invoice, or will be); the operator settles it with the payee.
            found.append(
                Discrepancy(
                    REISSUED_PAYMENT_SUCCEEDED,
                    h,
                    p.value_msat + p.fee_msat,
                    0,
                    f"payout {payout_id}: an operator reissued it, and LND now reports this payment SUCCEEDED "
                    f"({p.value_msat} msat + {p.fee_msat} fee): the payee may have been paid twice",
                )
            )
            paid_out += p.value_msat
            fees_out += p.fee_msat
            explained += p.value_msat + p.fee_msat

    for key in sorted(set(by_key) - matched):
        node = by_key[key].node
        if node:
            # the payment it names: an escrow key's reference, else any payment hash in it (an operator's key)
            parsed = posting_keys.parse_key(key)
            named = parsed.ref if parsed else next((part for part in key.split(":") if _HASH_RE.match(part)), None)
            found.append(
                Discrepancy(
                    UNMATCHED_NODE_POSTING,
                    named,
                    0,
                    node,
                    f"{key} moves asset:node without a matching settled invoice or payment",
                )
            )
            explained += node

    lnd_node = settled_in - paid_out - fees_out
    residual = (ledger_node - lnd_node) - explained
    if residual:
        found.append(
            Discrepancy(
                NODE_TOTAL_MISMATCH,
                None,
                lnd_node + explained,
                ledger_node,
                "asset:node total differs beyond the listed items (lines without a posting?)",
            )
        )

    owed = -int(
        await session.scalar(
            select(func.coalesce(func.sum(LedgerLine.amount_msat), 0)).where(LedgerLine.account.like("liability:%"))
        )
        or 0
    )
    warnings: list[str] = []
    local: int | None = None
    try:
        local = (await _bounded(lnd.channel_balance(), timeout)).local_msat
    except errors.LndError as e:
        warnings.append(f"channel_balance failed: {e}")
    if local is not None and local < owed:
        warnings.append(f"LND's local channel balance {local} msat is below what the ledger owes ({owed} msat)")

    total = sum(d.amount_msat for d in found)
    report = ReconciliationReport(
        ran_at=ran_at,
        ok=total <= threshold_msat,
        threshold_msat=threshold_msat,
        discrepancy_msat=total,
        discrepancies=found,
        invoices_checked=len(invoices),
        payments_checked=len(attempts),
        ledger_node_msat=ledger_node,
        lnd_settled_msat=settled_in,
        lnd_paid_msat=paid_out,
        lnd_fees_msat=fees_out,
        lnd_local_balance_msat=local,
        liabilities_msat=owed,
        warnings=warnings,
    )
    if persist:
        await store_report(session, report)
    return report


async def store_report(session: AsyncSession, report: ReconciliationReport) -> int:
    """Store a run's report (``reconcile(..., persist=False)``) as its ``ledger_reconciliations`` row;
    returns the row's id. Flushes only."""
    row = LedgerReconciliation(
        kind="run",
        ran_at=report.ran_at,
        ok=report.ok,
        discrepancy_msat=report.discrepancy_msat,
        report=report.to_json(),
    )
    session.add(row)
    await session.flush()
    report.id = row.id
    return row.id


# ---------------------------------------------------------------- the payout pause


async def latest_reconciliation(session: AsyncSession) -> LedgerReconciliation | None:
    """The latest run or override row, or None if reconciliation never ran."""
    return await session.scalar(select(LedgerReconciliation).order_by(LedgerReconciliation.id.desc()).limit(1))


async def payouts_paused(session: AsyncSession) -> bool:
    """True while the latest reconciliation row exists and is not ok: send no payout then."""
    ok = await session.scalar(select(LedgerReconciliation.ok).order_by(LedgerReconciliation.id.desc()).limit(1))
    return ok is not None and not ok


async def resume_payouts(session: AsyncSession, *, reason: str) -> int:
    """Record an operator's override (ok) so payouts resume; the next failing run pauses them again.

    Returns the override row's id. Flushes only.
    """
    if not isinstance(reason, str) or not reason.strip() or len(reason) > 500:
        raise ValueError("reason must be a non-empty string of at most 500 characters")
    last = await latest_reconciliation(session)
    now = utcnow()
    row = LedgerReconciliation(
        kind="override",
        ran_at=now,
        ok=True,
        discrepancy_msat=last.discrepancy_msat if last else 0,
        report=json.dumps(
            {
                "override": True,
                "reason": reason,
                "overrides": last.id if last else None,
                "overridden_ok": last.ok if last else None,
                "at": now.isoformat(),
            },
            sort_keys=True,
        ),
    )
    session.add(row)
    await session.flush()
    return row.id


__all__ = [
    "Discrepancy",
    "ReconciliationReport",
    "latest_reconciliation",
    "payouts_paused",
    "reconcile",
    "resume_payouts",
    "store_report",
]
