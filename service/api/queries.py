"""Read models for the API and the dashboard: plain dicts built from the tables.

Nothing here changes state. Preimages of our hold invoices are never selected.

Public views (no auth) never carry free text from the Lightning layer or from operators:
:func:`public_job` reduces a payout's ``last_error`` and the error texts in the timeline to
their reason code (:func:`reason_code`); the admin views keep the text.

Scores: no public view shows a score's value before the job's decision (a validator could copy
another's; sealed scores are readable by the escrow alone until then). A sealed result's key for
the customer (``customer_key``) is in no view here but :func:`released_keys`, which the API serves
to the job's customer only (NIP-98), once released.
"""

from __future__ import annotations

import json
import re
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from service.db import aware, utcnow
from service.escrow.models import Job, JobState, Result, ScoreRow, TimelineEntry
from service.ledger import accounts as ledger_accounts
from service.ledger import service as ledger
from service.ledger.models import LedgerLine, LedgerPosting, LedgerReconciliation
from service.lightning.client import LndClient
from service.lightning.models import InvoicePurpose, LnInvoice
from service.nostr.models import InboxEvent, RejectedEvent
from service.payouts.models import Payout, PayoutAttempt
from service.payouts.stuck import lnd_report, wants_lnd_view
from service.payouts.types import AttemptState, PayoutState

ATTENTION = ("unknown", "failed", "needs_invoice")
_CODE = re.compile(r"([a-z_]+): ")


def reason_code(text: str | None) -> str | None:
    """The stable code a reason text starts with (``code: detail``), or ``"error"`` if none."""
    if text is None:
        return None
    m = _CODE.match(text)
    return m.group(1) if m else "error"


def _ts(dt: datetime | None) -> str | None:
    return dt.isoformat() if dt is not None else None


def invoice_view(inv: LnInvoice) -> dict:
    return {
        "payment_hash": inv.payment_hash,
        "mode": inv.mode,
        "state": inv.state,
        "amount_msat": inv.amount_msat,
        "amount_paid_msat": inv.amount_paid_msat,
        "payment_request": inv.payment_request,
        "expires_at": inv.expires_at,
        "cltv_expiry": inv.cltv_expiry,
        "htlc_expiry_height": inv.htlc_expiry_height,
    }


def payout_view(p: Payout) -> dict:
    return {
        "id": p.id,
        "job_id": p.job_id,
        "payee": p.payee,
        "amount_msat": p.amount_msat,
        "state": p.state,
        "destination": p.destination_kind.value,
        "attempts": p.attempts,
        "fee_msat": p.fee_msat,
        "payment_hash": p.payment_hash,
        "last_error": p.last_error,
        "claim_by": _ts(p.claim_by),
        "updated_at": _ts(p.updated_at),
    }


def job_summary(j: Job) -> dict:
    return {
        "id": j.id,
        "customer": j.customer,
        "state": j.state,
        "mode": j.mode,
        "custody": j.custody,
        "bid_msat": j.bid_msat,
        "fee_msat": j.fee_msat,
        "validator_fee_msat": j.validator_fee_msat,
        "payout_policy": j.payout_policy,
        "results_deadline": j.results_deadline,
        "validation_deadline": j.validation_deadline,
        # Where an escrow outage moved them (null: not moved); judged at these when set.
        "results_deadline_extended_to": j.results_extended_to,
        "validation_deadline_extended_to": j.validation_extended_to,
        # A fallback evaluation round (docs/escrow.md): its request, deadline in force and pool validators.
        "fallback_request_id": j.fallback_request_id,
        "fallback_deadline": j.fallback_deadline,
        "fallback_validators": json.loads(j.fallback_validators) if j.fallback_validators else [],
        # An appeal (docs/escrow.md "Appeals"): until when one may be made, and the appeal itself.
        "appeal_deadline": j.appeal_deadline,
        "appeal": _appeal(j),
        # Relative acceptance (protocol.md §2): the model a result must beat, and by how much.
        "baseline": _baseline(j.request_raw),
        "refund_reason": j.refund_reason,
        "reject_reason": j.reject_reason,
        "created_at": _ts(j.created_at),
        "updated_at": _ts(j.updated_at),
    }


def _appeal(j: Job) -> dict | None:
    """The job's appeal as a view: who appealed (and for which result), its fee and its state, and
    the appeal round's request, validators and deadline (its reason is never stored)."""
    if not j.appeal:
        return None
    a = json.loads(j.appeal)
    return {
        "appellant": a["appellant"],
        "result_id": a.get("result_id"),
        "status": a["status"],
        "fee_msat": a["fee_msat"],
        "fee_payment_hash": a.get("payment_hash"),
        "request_id": a.get("request_id"),
        "validators": a.get("validators", []),
        "round_deadline": j.appeal_round_deadline,
    }


def _baseline(request_raw: str) -> dict | None:
    """The stored request's ``baseline`` tag (checked by the codec at intake), as a view."""
    for tag in json.loads(request_raw).get("tags", []):
        if len(tag) == 4 and tag[0] == "baseline":
            return {"model_sha256": tag[1], "url": tag[2], "min_improvement": tag[3]}
    return None


async def job_events(s: AsyncSession, job_id: str) -> dict | None:
    """The job's signed request and the signed events of its counted results (from the inbox)."""
    raw = await s.scalar(select(Job.request_raw).where(Job.id == job_id))
    if raw is None:
        return None
    ids = (await s.scalars(select(Result.id).where(Result.job_id == job_id))).all()
    results = (await s.scalars(select(InboxEvent.raw).where(InboxEvent.id.in_(ids)))).all() if ids else []
    return {"request": json.loads(raw), "results": [json.loads(r) for r in results]}


async def job_detail(s: AsyncSession, job_id: str) -> dict | None:
    job = await s.get(Job, job_id)
    if job is None:
        return None
    out = job_summary(job)
    inv = (
        await s.scalars(
            select(LnInvoice)
            .where(LnInvoice.job_id == job_id, LnInvoice.purpose == InvoicePurpose.JOB)
            .order_by(LnInvoice.created_at)
        )
    ).first()
    out["invoice"] = invoice_view(inv) if inv else None
    results = (await s.scalars(select(Result).where(Result.job_id == job_id).order_by(Result.created_at))).all()
    out["results"] = [
        {
            "id": r.id,
            "provider": r.provider,
            "shard": r.shard_index,
            "model_url": r.model_url,  # a sealed result's: its ciphertext's
            "model_sha256": r.model_sha256,
            "created_at": r.created_at,
        }
        for r in results
    ]
    out["scores"] = [
        {"result_id": x.result_id, "validator": x.validator, "value": x.value, "event_id": x.event_id}
        for x in (await s.scalars(select(ScoreRow).where(ScoreRow.job_id == job_id))).all()
    ]
    for r, row in zip(out["results"], results, strict=True):
        r["sealed"] = row.key_sha256 is not None
        if row.key_sha256 is not None:
            r["ciphertext_sha256"] = row.ciphertext_sha256
            r["key_sha256"] = row.key_sha256
            r["key_released"] = row.key_released_at is not None
    out["decision"] = json.loads(job.decision) if job.decision else None
    out["payouts"] = [
        payout_view(p)
        for p in (await s.scalars(select(Payout).where(Payout.job_id == job_id).order_by(Payout.created_at))).all()
    ]
    out["balances"] = await ledger.balances(s, job_id=job_id)
    out["timeline"] = await timeline(s, job_id)
    return out


async def public_job(s: AsyncSession, job_id: str) -> dict | None:
    """A job as anyone may see it: no ledger balances, reason codes instead of error texts."""
    out = await job_detail(s, job_id)
    if out is None:
        return None
    out.pop("balances", None)
    if not job_decided(out):
        for x in out["scores"]:
            x["value"] = None  # who scored is public; what, only once the decision is taken
    elif out["state"] == JobState.APPEAL.value and out["appeal"] is not None:
        for x in out["scores"]:  # the appeal round's, only once its verdict is taken
            if x.get("validator") in out["appeal"]["validators"]:
                x["value"] = None
    for p in out["payouts"]:
        p["last_error"] = reason_code(p["last_error"])
    for entry in out["timeline"]:
        entry["detail"] = _public_detail(entry["kind"], entry["detail"])
    return out


def job_decided(detail: dict) -> bool:
    """Whether the job's validation is over (its decision stored, or it ended without one)."""
    return detail.get("decision") is not None or detail["state"] not in (
        JobState.COLLECTING.value,
        JobState.VALIDATING.value,
        JobState.FALLBACK.value,
    )


async def released_keys(s: AsyncSession, job_id: str) -> list[dict]:
    """The model keys released to the job's customer (protocol.md §5a): each sealed result whose
    provider was paid from settled money, with the NIP-44 payload escrow -> customer."""
    rows = (
        await s.scalars(
            select(Result)
            .where(Result.job_id == job_id, Result.key_released_at.is_not(None), Result.customer_key.is_not(None))
            .order_by(Result.key_released_at, Result.id)
        )
    ).all()
    return [
        {
            "result_id": r.id,
            "provider": r.provider,
            "model_sha256": r.model_sha256,
            "ciphertext_url": r.model_url,
            "ciphertext_sha256": r.ciphertext_sha256,
            "key_sha256": r.key_sha256,
            "payload": r.customer_key,
        }
        for r in rows
    ]


def _public_detail(kind: str, detail: object) -> object:
    """A timeline entry without free text: errors of payouts and effects, operators' reasons."""
    if kind in ("payment", "effect"):
        if isinstance(detail, str):
            return reason_code(detail)
        if isinstance(detail, dict):
            for name in ("why", "error"):
                if isinstance(detail.get(name), str):
                    detail[name] = reason_code(detail[name])
    elif kind == "transition" and isinstance(detail, dict) and str(detail.get("why", "")).startswith("operator"):
        detail["why"] = "operator refund"  # the operator's own words stay in the admin view
    return detail


async def timeline(s: AsyncSession, job_id: str) -> list[dict]:
    rows = (
        await s.scalars(select(TimelineEntry).where(TimelineEntry.job_id == job_id).order_by(TimelineEntry.seq))
    ).all()
    out = []
    for r in rows:
        try:
            detail = json.loads(r.detail)
        except ValueError:
            detail = r.detail
        out.append({"seq": r.seq, "at": _ts(r.at), "kind": r.kind, "detail": detail})
    return out


async def list_jobs(
    s: AsyncSession, *, state: str | None = None, customer: str | None = None, limit: int = 50, offset: int = 0
) -> tuple[list[dict], int]:
    q = select(Job)
    count = select(func.count()).select_from(Job)
    if state:
        q, count = q.where(Job.state == state), count.where(Job.state == state)
    if customer:
        q, count = q.where(Job.customer == customer), count.where(Job.customer == customer)
    rows = (await s.scalars(q.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset))).all()
    return [job_summary(j) for j in rows], int(await s.scalar(count) or 0)


async def overview(s: AsyncSession) -> dict:
    states = {st.value: 0 for st in JobState}
    for state, n in (await s.execute(select(Job.state, func.count()).group_by(Job.state))).all():
        states[state] = int(n)
    balances = await ledger.balances(s)
    escrow = -sum(v for k, v in balances.items() if k.startswith("liability:escrow:"))
    payable = -sum(v for k, v in balances.items() if k.startswith("liability:payable:"))
    refunds = -sum(v for k, v in balances.items() if k.startswith("liability:refund:"))
    latest = (await s.scalars(select(LedgerReconciliation).order_by(LedgerReconciliation.id.desc()).limit(1))).first()
    attention = int(await s.scalar(select(func.count()).select_from(Payout).where(Payout.state.in_(ATTENTION))) or 0)
    return {
        "jobs_by_state": states,
        "escrow_msat": escrow,
        "payable_msat": payable,
        "refunds_payable_msat": refunds,
        "fees_earned_msat": -balances.get("income:fees", 0),
        "unclaimed_msat": -balances.get(ledger_accounts.UNCLAIMED, 0),
        "routing_fees_msat": balances.get("expense:routing", 0),
        "node_funds_ledger_msat": balances.get("asset:node", 0),
        "payouts_needing_attention": attention,
        "reconciliation": reconciliation_view(latest),
    }


def reconciliation_view(row: LedgerReconciliation | None) -> dict | None:
    if row is None:
        return None
    try:
        report = json.loads(row.report)
    except ValueError:
        report = row.report
    return {
        "id": row.id,
        "kind": row.kind,
        "ran_at": _ts(row.ran_at),
        "ok": row.ok,
        "discrepancy_msat": row.discrepancy_msat,
        "report": report,
    }


async def latest_reconciliation(s: AsyncSession) -> dict | None:
    return reconciliation_view(
        (await s.scalars(select(LedgerReconciliation).order_by(LedgerReconciliation.id.desc()).limit(1))).first()
    )


async def payouts_needing_attention(s: AsyncSession) -> list[dict]:
    rows = (await s.scalars(select(Payout).where(Payout.state.in_(ATTENTION)).order_by(Payout.updated_at))).all()
    return [payout_view(p) for p in rows]


async def expired_claims(s: AsyncSession, *, limit: int = 500) -> tuple[list[dict], int]:
    """Payouts nobody claimed within their claim window (newest first, at most ``limit``), and the
    ledger's unclaimed total (``income:unclaimed``: what they hold, less what was reopened)."""
    rows = (
        await s.scalars(
            select(Payout).where(Payout.state == PayoutState.EXPIRED).order_by(Payout.updated_at.desc()).limit(limit)
        )
    ).all()
    total = -(await ledger.balances(s, prefix=ledger_accounts.UNCLAIMED)).get(ledger_accounts.UNCLAIMED, 0)
    return [payout_view(p) for p in rows], total


async def open_attempt(s: AsyncSession, payout_id: str) -> str | None:
    """The payment hash of the payout's latest attempt still open (``sending`` or ``unknown``)."""
    return await s.scalar(
        select(PayoutAttempt.payment_hash)
        .where(
            PayoutAttempt.payout_id == payout_id,
            PayoutAttempt.state.in_((AttemptState.SENDING, AttemptState.UNKNOWN)),
        )
        .order_by(PayoutAttempt.created_at.desc())
        .limit(1)
    )


async def payout_detail(
    s: AsyncSession, payout_id: str, lnd: LndClient | None, *, payment_timeout_seconds: float
) -> dict | None:
    """One payout with its attempts and, when its payment may be stuck (``unknown``, or ``sending``
    past its lease), LND's view of its open attempt (``lnd``; null otherwise)."""
    p = await s.get(Payout, payout_id)
    if p is None:
        return None
    out = payout_view(p)
    attempts = (
        await s.scalars(
            select(PayoutAttempt).where(PayoutAttempt.payout_id == payout_id).order_by(PayoutAttempt.created_at)
        )
    ).all()
    out["attempts_log"] = [
        {
            "payment_hash": a.payment_hash,
            "state": a.state.value,
            "fee_msat": a.fee_msat,
            "failure": a.failure,
            "created_at": _ts(a.created_at),
            "updated_at": _ts(a.updated_at),
        }
        for a in attempts
    ]
    out["lnd"] = None
    lease = aware(p.lease_until) if p.lease_until is not None else None
    if wants_lnd_view(p.state, lease, utcnow()):
        h = await open_attempt(s, payout_id)
        if h is not None and lnd is not None:
            out["lnd"] = await lnd_report(lnd, h, state=p.state, payment_timeout_seconds=payment_timeout_seconds)
        elif h is not None:
            out["lnd"] = {"payment_hash": h, "error": "node_unavailable (no LND node is configured)"}
    return out


async def accounts(s: AsyncSession, *, prefix: str | None = None) -> list[dict]:
    return [{"account": k, "balance_msat": v} for k, v in sorted((await ledger.balances(s, prefix=prefix)).items())]


async def postings(s: AsyncSession, *, job_id: str | None = None, limit: int = 500, offset: int = 0) -> list[dict]:
    q = select(LedgerPosting)
    if job_id:
        q = q.where(LedgerPosting.job_id == job_id)
    rows = (await s.scalars(q.order_by(LedgerPosting.created_at, LedgerPosting.id).limit(limit).offset(offset))).all()
    if not rows:
        return []
    lines: dict[str, list] = {}
    for ln in (
        await s.scalars(
            select(LedgerLine).where(LedgerLine.posting_id.in_([p.id for p in rows])).order_by(LedgerLine.id)
        )
    ).all():
        lines.setdefault(ln.posting_id, []).append({"account": ln.account, "amount_msat": ln.amount_msat})
    return [
        {
            "id": p.id,
            "key": p.key,
            "kind": p.kind,
            "job_id": p.job_id,
            "memo": p.memo,
            "reverses": p.reverses,
            "created_at": _ts(p.created_at),
            "lines": lines.get(p.id, []),
        }
        for p in rows
    ]


async def rejected_events(s: AsyncSession, *, limit: int = 100) -> list[dict]:
    rows = (await s.scalars(select(RejectedEvent).order_by(RejectedEvent.seq.desc()).limit(limit))).all()
    return [
        {
            "seq": r.seq,
            "event_id": r.event_id,
            "source": r.source,
            "reason": r.reason,
            "detail": r.detail,
            "received_at": _ts(r.received_at),
        }
        for r in rows
    ]
