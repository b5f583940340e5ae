"""Prometheus metrics (text exposition format 0.0.4), computed at scrape time.

Gauges from the database (jobs by state, payouts by state, money held, quarantined items),
the running layers (LND and relay health, facts recorded, events stored, webhooks refused,
item failures) and the latencies the service measures (settlement detection, payout time).

The totals are the escrow's business: ``/metrics`` needs ``Authorization: Bearer`` with
``FEDSTR_METRICS_TOKEN`` or the admin token (one bearer check, throttled like the admin API;
``service.api.admin.check_bearer``). With neither configured it answers 404 ``metrics_disabled``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from sqlalchemy import func, select

from service import quarantine
from service.api import queries
from service.api.admin import check_bearer, usable
from service.api.errors import ApiError
from service.escrow.models import Job, JobState
from service.lightning.models import InvoicePurpose, LnFact, LnInvoice
from service.nostr.models import InboxEvent, RejectedEvent
from service.payouts.models import Payout, PayoutAttempt
from service.payouts.types import PayoutState

router = APIRouter(include_in_schema=False)


def _line(name: str, value: float, labels: Mapping[str, str] | None = None) -> str:
    if labels:
        inner = ",".join(f'{k}="{str(v).replace(chr(92), "").replace(chr(34), "")}"' for k, v in labels.items())
        return f"{name}{{{inner}}} {value}"
    return f"{name} {value}"


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> PlainTextResponse:
    st = request.app.state
    tokens = [t for t in (usable(st.settings.metrics_token), usable(st.settings.admin_token)) if t is not None]
    if not tokens:
        raise ApiError(404, "metrics_disabled", "set FEDSTR_METRICS_TOKEN (or FEDSTR_ADMIN_TOKEN) to serve metrics")
    check_bearer(request, tokens)
    out: list[str] = []

    def gauge(
        name: str, help_: str, samples: Sequence[tuple[Mapping[str, str] | None, float]], kind: str = "gauge"
    ) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(_line(name, v, lbl) for lbl, v in samples)

    async with st.sessions() as s:
        by_state = {x.value: 0 for x in JobState}
        for state, n in (await s.execute(select(Job.state, func.count()).group_by(Job.state))).all():
            by_state[state] = n
        gauge("fedstr_jobs", "Jobs by state.", [({"state": k}, v) for k, v in sorted(by_state.items())])
        payouts = dict((await s.execute(select(Payout.state, func.count()).group_by(Payout.state))).all())
        gauge(
            "fedstr_payouts",
            "Payouts by state.",
            [
                ({"state": k.value}, payouts.get(k, 0))
                for k in PayoutState  # every state, expired (claims nobody made) included
            ],
        )
        ov = await queries.overview(s)
        gauge("fedstr_escrow_msat", "Money held in escrow (ledger).", [(None, ov["escrow_msat"])])
        gauge("fedstr_payable_msat", "Money owed to payees (ledger).", [(None, ov["payable_msat"])])
        gauge("fedstr_fees_earned_msat", "Fee income (ledger).", [(None, ov["fees_earned_msat"])])
        gauge(
            "fedstr_unclaimed_msat",
            "Payouts nobody claimed within their claim window (ledger: income:unclaimed).",
            [(None, ov["unclaimed_msat"])],
        )
        gauge(
            "fedstr_inbox_events_total",
            "Verified events stored in the inbox.",
            [(None, await s.scalar(select(func.count()).select_from(InboxEvent)))],
            "counter",
        )
        gauge(
            "fedstr_rejected_events",
            "Rejected events kept in the log.",
            [(None, await s.scalar(select(func.count()).select_from(RejectedEvent)))],
        )
        gauge(
            "fedstr_quarantined_items",
            "Items a loop gave up on, waiting for an operator's replay.",
            [({"source": k}, v) for k, v in (await quarantine.Quarantine.counts(s)).items()],
        )
        # Settlement detection: our fact's time minus LND's settle time is not kept; we expose the
        # time from invoice creation to the funding fact, and from a payout's creation to success.
        fund = (
            await s.execute(
                select(LnFact.observed_at, LnInvoice.created_at)
                .join(LnInvoice, LnInvoice.payment_hash == LnFact.payment_hash)
                .where(LnFact.kind.in_(("accepted", "settled")), LnInvoice.purpose == InvoicePurpose.JOB)
                .order_by(LnFact.seq.desc())
                .limit(500)
            )
        ).all()
        paid = (
            await s.execute(
                select(PayoutAttempt.updated_at, PayoutAttempt.created_at)
                .where(PayoutAttempt.state == "succeeded")
                .order_by(PayoutAttempt.updated_at.desc())
                .limit(500)
            )
        ).all()
    for name, help_, rows in (
        ("fedstr_funding_seconds", "Invoice created -> funding fact (last 500).", fund),
        ("fedstr_payout_seconds", "Payout attempt written -> succeeded (last 500).", paid),
    ):
        secs = sorted(max(0.0, (a - b).total_seconds()) for a, b in rows if a and b)
        samples = [
            ({"quantile": q}, secs[min(len(secs) - 1, int(len(secs) * float(q)))] if secs else 0.0)
            for q in ("0.5", "0.99")
        ]
        gauge(name, help_, samples + [({"stat": "count"}, len(secs))])
    lnd_up = 0.0
    if st.lnd is not None:
        try:
            lnd_up = 1.0 if (await st.lnd.get_info()).synced_to_chain else 0.0
        except Exception:  # noqa: BLE001 - a metric, not a failure
            lnd_up = 0.0
    gauge("fedstr_lnd_up", "LND reachable and synced.", [(None, lnd_up)])
    if st.lightning is not None:
        h = st.lightning.watcher.health
        gauge(
            "fedstr_invoice_stream_up",
            "The LND invoice stream is connected (leader only).",
            [(None, 1.0 if h.connected else 0.0)],
        )
        gauge(
            "fedstr_settlement_facts_total",
            "Settlement facts recorded by this process.",
            [(None, h.facts_recorded)],
            "counter",
        )
        gauge(
            "fedstr_payouts_paused", "Payouts paused by reconciliation.", [(None, 1.0 if st.lightning.paused else 0.0)]
        )
    if st.nostr is not None:
        gauge(
            "fedstr_relay_up",
            "Relay connected (leader only).",
            [({"relay": r["url"]}, 1.0 if r["connected"] else 0.0) for r in st.nostr.pool.status()],
        )
        gauge(
            "fedstr_relay_accepting",
            "Relay takes our events: 0 while its newest answer to one was a refusal (leader only).",
            [({"relay": r["url"]}, 0.0 if r["accepting"] is False else 1.0) for r in st.nostr.pool.status()],
        )
        gauge(
            "fedstr_relay_events_refused_total",
            "Our events refused per relay (leader only).",
            [({"relay": r["url"]}, r["events_refused"]) for r in st.nostr.pool.status()],
            "counter",
        )
        gauge(
            "fedstr_relay_events_received_total",
            "Events received per relay.",
            [({"relay": r["url"]}, r["events_received"]) for r in st.nostr.pool.status()],
            "counter",
        )
    gauge(
        "fedstr_webhooks_refused_total",
        "Refused webhooks by reason.",
        [({"reason": k}, v) for k, v in sorted(st.webhooks_refused.items())] or [({"reason": "none"}, 0)],
        "counter",
    )
    failures = st.escrow.quarantine.failures if st.escrow is not None else {}
    gauge(
        "fedstr_item_failures_total",
        "Item failures (each retry that failed) in this process, by loop.",
        [({"source": k}, failures.get(k, 0)) for k in quarantine.SOURCES],
        "counter",
    )
    gauge("fedstr_leader", "This replica is the leader.", [(None, 1.0 if st.leadership.is_leader else 0.0)])
    return PlainTextResponse("\n".join(out) + "\n", media_type="text/plain; version=0.0.4")
