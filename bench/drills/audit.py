"""Counting after a drill, from the real parts first and the service's database second.

- **payments made**: payout invoices the drill's payees issued (payee LND) that the payee
  node shows SETTLED; cross-checked with the escrow node's ``ListPayments`` (SUCCEEDED
  payments to those hashes).
- **duplicate payments**: per (job, payee), every settled payout invoice beyond the first,
  plus any (job, payee) that received more than its reward, plus any hash the escrow node
  paid successfully more than once.
- **facts lost**: escrow invoices the customer node paid (SUCCEEDED) or the escrow node
  holds (ACCEPTED/SETTLED) without the matching ``ln_facts`` row (and, once settled, the
  ``funding:<hash>`` posting for the amount LND says was paid); plus payout invoices the
  payee node shows settled that our database does not record as a succeeded attempt, a
  succeeded payout and a ``payout:<hash>`` posting.
- **ledger imbalance**: the sum of |amount| over ``check_invariants`` violations, with the
  drill's closed jobs required at zero (``closed_job_balance``).
- **reconciliation**: ``service.reconcile`` against the escrow node (a dry run).
- **unpaid**: payees of closed jobs whose invoice the payee node does not show settled.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

from sqlalchemy import select

from bench.drills.faults import StackParts
from bench.drills.market import Market, lnd
from service.db import create_engine, session_factory
from service.escrow.models import Job
from service.ledger import service as ledger
from service.ledger.models import LedgerLine, LedgerPosting
from service.lightning import errors as lnerr
from service.lightning.client import InvoiceState
from service.lightning.models import LnFact
from service.payouts.models import Payout, PayoutAttempt
from service.reconcile import reconcile


async def _payments(parts: StackParts, node: str) -> list[dict]:
    out = await asyncio.to_thread(
        parts.lncli, node, "listpayments", "--include_incomplete", "--max_payments", "1000000"
    )
    return out.get("payments", [])


async def audit(desc: dict, database_url: str, market: Market, parts: StackParts) -> dict:
    notes: list[str] = []
    job_ids = [j.id for j in market.jobs if j.id]
    expected = {(j.id, payee): amount for j in market.jobs if j.id for payee, amount in j.expected().items()}

    # ---- the payee node: what arrived ---------------------------------------------------
    settled: dict[str, int] = {}
    for h in market.issued:
        inv = await market.payee_node.lookup_invoice(bytes.fromhex(h))
        if inv.state == InvoiceState.SETTLED:
            settled[h] = inv.amt_paid_msat
    per_payee: dict[tuple[str, str], list[int]] = defaultdict(list)
    for h, amt in settled.items():
        iss = market.issued[h]
        per_payee[(iss.job_id, iss.payee)].append(amt)
    duplicates = 0
    for key, amounts in per_payee.items():
        extra = len(amounts) - 1
        over = sum(amounts) > expected.get(key, 0)
        if extra > 0 or over:
            duplicates += max(extra, 1)
            notes.append(
                f"DUPLICATE: job {key[0][:12]} payee {key[1][:12]} received {amounts} msat "
                f"(expected {expected.get(key)})"
            )
    closed_ids = []
    # ---- the escrow node: what it sent and what it holds --------------------------------------
    escrow_pays = await _payments(parts, "escrow")
    succeeded_at_escrow: dict[str, int] = defaultdict(int)
    for p in escrow_pays:
        if p.get("payment_hash") in market.issued and p.get("status") == "SUCCEEDED":
            succeeded_at_escrow[p["payment_hash"]] += 1
    for h, n in succeeded_at_escrow.items():
        if n > 1:
            duplicates += n - 1
            notes.append(f"DUPLICATE: the escrow node paid hash {h[:12]} {n} times")
    if set(succeeded_at_escrow) != set(settled):
        notes.append(
            f"escrow ListPayments ({len(succeeded_at_escrow)} succeeded) and payee invoices "
            f"({len(settled)} settled) disagree: {sorted(set(succeeded_at_escrow) ^ set(settled))[:5]}"
        )

    customer_pays = {
        p["payment_hash"]: p for p in await _payments(parts, "customer") if p.get("payment_hash") in market.offers
    }
    escrow_node = lnd(desc, "escrow")
    engine = create_engine(database_url)
    sessions = session_factory(engine)
    lost = 0
    try:
        async with sessions() as s:
            states = (
                dict((await s.execute(select(Job.id, Job.state).where(Job.id.in_(job_ids)))).all()) if job_ids else {}
            )
            closed_ids = [j for j, st in states.items() if st == "closed"]
            facts: dict[str, set[str]] = defaultdict(set)
            for h, kind in (
                await s.execute(
                    select(LnFact.payment_hash, LnFact.kind).where(LnFact.payment_hash.in_(list(market.offers)))
                )
            ).all():
                facts[h].add(kind)
            node_lines = dict(
                (
                    await s.execute(
                        select(LedgerPosting.key, LedgerLine.amount_msat)
                        .join(LedgerLine, LedgerLine.posting_id == LedgerPosting.id)
                        .where(LedgerLine.account == "asset:node")
                    )
                ).all()
            )
            attempts = dict((await s.execute(select(PayoutAttempt.payment_hash, PayoutAttempt.state))).all())
            payouts = {p.payment_hash: p for p in (await s.scalars(select(Payout))).all() if p.payment_hash}

            # ---- customer payments (hold HTLCs accepted or settled) -> facts and fundings
            for h, job_id in market.offers.items():
                try:
                    inv = await escrow_node.lookup_invoice(bytes.fromhex(h))
                except lnerr.LndNotFound:
                    notes.append(f"escrow invoice {h[:12]} of job {job_id[:12]} unknown to the escrow node")
                    continue
                paid = customer_pays.get(h, {}).get("status") == "SUCCEEDED"
                if inv.state == InvoiceState.SETTLED or paid:
                    funding = node_lines.get(f"funding:{h}")
                    if "settled" not in facts[h] or funding != inv.amt_paid_msat:
                        lost += 1
                        notes.append(
                            f"FACT LOST: job {job_id[:12]} invoice {h[:12]} settled at LND "
                            f"({inv.amt_paid_msat} msat); facts {sorted(facts[h])}, funding posting {funding}"
                        )
                elif inv.state == InvoiceState.ACCEPTED and not facts[h] & {"accepted", "settled"}:
                    lost += 1
                    notes.append(f"FACT LOST: job {job_id[:12]} hold invoice {h[:12]} accepted at LND, no fact")

            # ---- payouts the payee node shows settled -> attempts, payouts, postings
            for h, amt in settled.items():
                p = payouts.get(h)
                posting = node_lines.get(f"payout:{h}")
                if attempts.get(h) != "succeeded" or p is None or p.state != "succeeded" or posting != -amt:
                    lost += 1
                    iss = market.issued[h]
                    notes.append(
                        f"FACT LOST: payout to {iss.payee[:12]} for job {iss.job_id[:12]} settled at the "
                        f"payee ({amt} msat); attempt {attempts.get(h)}, payout "
                        f"{p.state if p else None}, posting {posting}"
                    )
            unpaid = [(j, payee) for (j, payee) in expected if j in closed_ids and (j, payee) not in per_payee]
            for j, payee in unpaid:
                notes.append(f"UNPAID: job {j[:12]} is closed but payee {payee[:12]} has no settled invoice")

            # why a job did not finish: its payouts that did not succeed, and what LND and the payee say
            by_hash = {p.get("payment_hash"): p for p in escrow_pays}
            open_jobs = [j for j in job_ids if states.get(j) != "closed"]
            if open_jobs:
                rows = (
                    await s.execute(
                        select(Payout.id, Payout.job_id, Payout.state, Payout.last_error).where(
                            Payout.job_id.in_(open_jobs), Payout.state != "succeeded"
                        )
                    )
                ).all()
                for pid, jid, st, err in rows:
                    tries = (
                        await s.execute(
                            select(PayoutAttempt.payment_hash, PayoutAttempt.state).where(
                                PayoutAttempt.payout_id == pid
                            )
                        )
                    ).all()
                    seen = []
                    for h, ast in tries:
                        lp = by_hash.get(h, {})
                        inv = market.issued.get(h)
                        payee_state = (
                            (await market.payee_node.lookup_invoice(bytes.fromhex(h))).state.name if inv else "not ours"
                        )
                        seen.append(
                            f"attempt {h[:12]} {ast}: escrow LND {lp.get('status', 'unknown to it')} "
                            f"(HTLCs {[x.get('status') for x in lp.get('htlcs', [])]}), payee invoice {payee_state}"
                        )
                    notes.append(
                        f"NOT FINISHED: job {jid[:12]} ({states.get(jid)}) payout …{pid[-30:]} is {st}"
                        f"{f' ({err[:80]})' if err else ''}; " + ("; ".join(seen) or "no attempt")
                    )
            violations = await ledger.check_invariants(s, closed_job_ids=closed_ids)
            for v in violations[:10]:
                notes.append(f"LEDGER: {v.kind} {v.subject} {v.amount_msat} msat {v.detail}")
            report = await reconcile(s, escrow_node, persist=False)
            for d in report.discrepancies[:10]:
                notes.append(f"RECONCILIATION: {d}")
    finally:
        await engine.dispose()
        await escrow_node.close()
    return {
        "jobs_total": len(market.jobs),
        "jobs_finished": len(closed_ids),
        "job_states": dict(sorted(_count(states.values()).items())) if job_ids else {},
        "payments_expected": len(expected),
        "payments_made": len(settled),
        "escrow_payments_succeeded": sum(succeeded_at_escrow.values()),
        "payout_invoices_issued": len(market.issued),
        "duplicate_payments": duplicates,
        "facts_lost": lost,
        "unpaid": len(unpaid),
        "ledger_imbalance_msat": sum(abs(v.amount_msat) for v in violations),
        "ledger_violations": len(violations),
        "reconciliation_discrepancy_msat": report.discrepancy_msat,
        "customer_payments_succeeded": sum(1 for p in customer_pays.values() if p.get("status") == "SUCCEEDED"),
        "audit_notes": notes,
    }


def _count(values) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for v in values:
        out[v] += 1
    return dict(out)
