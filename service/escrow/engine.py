"""The escrow engine: claim a fact, load the job's view, ``step`` the machine, apply the plan.

Facts come from four places, and each is consumed exactly once:

- the **inbox** (verified Nostr events: job requests, results, scores, payee invoices,
  deletions), through :meth:`Inbox.process_one`, whose claim is a compare-and-set;
- **LN facts** (``ln_facts``: accepted / settled / canceled, confirmed by lookup), claimed by
  setting ``consumed_at``;
- **payout outcomes** (``ln_payouts`` reaching succeeded, needs_invoice or expired, an operator's
  reopen, a claim window's reminder), claimed by inserting ``(source, ref)`` into ``escrow_consumed``;
- **timers** (offer expiry, results deadline, validation deadline), driven by the
  deadlines stored on the job, so a restart loses none.

What a fact means is decided by the pure machine (``service/escrow/machine.py``). This module
only reads and checks input at the edge (the codec, the intake budget, receipt times, and what
needs the escrow's secret key: a sealed result's key envelope, sealed scores), loads
what the machine needs, and applies its plan in the caller's transaction: one
compare-and-set on the job's state and version (:meth:`Engine.apply`, the only code that
writes ``escrow_jobs``), then the rows, postings, payouts, effects and events of the plan.
The engine never talks to the network: what must happen outside is an effect row, a payout
row or an outbox row, carried out by a worker that reports back as a fact.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service import liveness, timeline
from service.db import aware, insert_ignore, rowcount, table_of, utcnow
from service.escrow import machine
from service.escrow.machine import (
    FUNDED_STATES,
    Decision,
    EscrowMode,
    EventRole,
    Fact,
    FactKind,
    Funds,
    JobState,
    JobView,
    MachineConfig,
    Plan,
    ResultView,
    ScoreView,
)
from service.escrow.models import Consumed, Effect, Job, Result, ScoreRow, TimelineEntry
from service.escrow.results import result_columns, result_view
from service.escrow.rule import UNREADABLE, ScoreValue
from service.escrow.rule import Verdict as RuleVerdict
from service.ledger import accounts
from service.ledger import service as ledger
from service.ledger.models import LedgerLine, LedgerPosting
from service.lightning.hold import HoldSizing
from service.lightning.models import InvoicePurpose, LnFact, LnInvoice
from service.nostr import outbox
from service.nostr.kinds import KIND_DELETION, KIND_EVALUATION_RESULT, KIND_FEEDBACK, KIND_JOB_REQUEST, KIND_JOB_RESULT
from service.nostr.models import InboxEvent
from service.nostr.nip01 import Event, SecretKey, sign_event
from service.nostr.protocol import (
    CodecError,
    CodecErrorReason,
    EscrowTerms,
    JobRequest,
    ValidatorKey,
    build_evaluation_request,
    is_appeal,
    parse_appeal,
    parse_deletion,
    parse_evaluation_result,
    parse_feedback,
    parse_job_request,
    parse_result,
)
from service.nostr.protocol.evaluation import open_scores
from service.nostr.protocol.fields import Template, parse_bounded_decimal
from service.nostr.protocol.job import read_job_spec
from service.nostr.protocol.money import MoneySplit
from service.nostr.protocol.result import JobResult
from service.nostr.protocol.sealing import SealError, unwrap_key, wrap_key
from service.payouts import Destination, DestinationKind, InvoiceRefused, InvoiceSource, PayoutState
from service.payouts import store as payouts
from service.payouts.models import Payout, PayoutAttempt

log = logging.getLogger(__name__)

S = JobState
#: Of the view, what each fact needs loaded besides the job row (the machine looks at nothing else).
_RESULTS = frozenset({FactKind.RESULT, FactKind.SCORES, FactKind.DEADLINE, FactKind.SETTLED, FactKind.APPEAL_FEE_PAID})
_SCORES = frozenset(
    {FactKind.SCORES, FactKind.DEADLINE, FactKind.SETTLED, FactKind.PAYOUT_SUCCEEDED, FactKind.APPEAL_FEE_PAID}
)
_MONEY = frozenset(
    {
        FactKind.SETTLED,
        FactKind.PAYOUT_SUCCEEDED,
        FactKind.PAYOUT_EXPIRED,
        FactKind.PAYOUT_REOPENED,
        FactKind.SCORES,
        FactKind.DEADLINE,
        FactKind.OPERATOR_REFUND,
        FactKind.INVOICE_CANCELED,
        FactKind.APPEAL_FEE_PAID,
    }
)
_PAYOUTS = frozenset({FactKind.PAYOUT_SUCCEEDED, FactKind.PAYOUT_EXPIRED, FactKind.PAYOUT_REOPENED})


@dataclass
class IntakeBudget:
    """How many job requests the engine takes, whatever their source (relay or REST): the costly
    part of a request is its escrow invoice, and keys are free to make. Counted in the database,
    so every replica applies the same budget (docs/escrow.md, "Intake budget")."""

    per_minute: int = 120  # requests a minute, still unfunded, from keys that never funded a job
    per_minute_per_key: int = 10  # requests (accepted or refused) a minute from one key
    open_offers: int = 200  # unfunded offers open at once (a limit for new keys)
    open_offers_per_key: int = 3  # unfunded offers open at once from one key


@dataclass
class EngineConfig:
    terms: EscrowTerms
    relays: list[str]
    sizing: HoldSizing = field(default_factory=HoldSizing)
    invoice_expiry_seconds: int = 600
    offer_grace_seconds: int = 30  # late payments within this are still honoured
    results_grace_seconds: int = 60  # receipt may lag a result's deadline by this much (relay latency)
    release_margin_seconds: int = 3600  # hold invoices must outlive the validation deadline by this
    budget: IntakeBudget = field(default_factory=IntakeBudget)
    reply_relays_max: int = 3  # of a request's NIP-90 `relays`, how many also get our replies
    network: str = "regtest"  # ours (Settings.network): a payee invoice for another is refused
    heartbeat_tolerance_seconds: float = 15.0  # a gap between liveness intervals longer than this: an outage
    outage_catch_up_seconds: int = 60  # an extended deadline is at least this long after the escrow's return
    validator_pool: tuple[str, ...] = ()  # the announced pool's keys: a fallback round's validators
    fallback_round_seconds: int = 600  # a fallback evaluation round's window
    appeal_round_seconds: int = 600  # an appeal round's window
    claim_reminder_seconds: int = 0  # a waiting payee is reminded this long before its claim window ends

    def machine(self) -> MachineConfig:
        return MachineConfig(
            terms=self.terms,
            sizing=self.sizing,
            invoice_expiry_seconds=self.invoice_expiry_seconds,
            offer_grace_seconds=self.offer_grace_seconds,
            results_grace_seconds=self.results_grace_seconds,
            release_margin_seconds=self.release_margin_seconds,
            validator_pool=self.validator_pool,
            fallback_round_seconds=self.fallback_round_seconds,
            appeal_round_seconds=self.appeal_round_seconds,
            claim_reminder_seconds=self.claim_reminder_seconds,
        )


class StaleView(Exception):
    """The job changed between loading its view and applying the plan (another replica): step again."""


class Engine:
    #: How often a fact is stepped again when another replica moved its job meanwhile.
    STALE_RETRIES = 5

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        key: SecretKey,
        config: EngineConfig,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.sessions = sessions
        self.key = key
        self.E = key.public_key_hex
        self.config = config
        self.machine_config = config.machine()
        self.clock = clock
        # Accepted requests never change: parsed once per job, the last thousand kept.
        self._requests: OrderedDict[str, JobRequest] = OrderedDict()

    def now(self) -> int:
        return int(self.clock())

    def clock_at(self) -> datetime:
        """The engine's clock (:meth:`now`) as a timestamp, for the payouts' claim windows."""
        return datetime.fromtimestamp(self.now(), UTC)

    async def timeline(self, s: AsyncSession, job_id: str, kind: str, detail: object) -> None:
        await timeline.record(s, job_id, kind, detail)

    def reply_relays(self, requested: Iterable[str]) -> list[str]:
        """The relays of a request's NIP-90 ``relays`` tag that also get our replies: the first
        ``reply_relays_max`` that are not ours already. The codec checked their shape (ws/wss);
        the publisher checks each address when it connects (no private addresses: SSRF)."""
        out: list[str] = []
        for url in requested:
            if len(out) >= self.config.reply_relays_max:
                break
            if url not in self.config.relays and url not in out:
                out.append(url)
        return out

    # ------------------------------------------------------------------ the one writer of jobs
    async def apply(self, s: AsyncSession, job_id: str, fact: Fact, *, row: Job | None = None) -> Plan:
        """Step the machine with ``fact`` for ``job_id`` and apply the plan in ``s``'s transaction.

        ``row``: the job's row, when the caller has just read it in this transaction (saves a query)."""
        for _ in range(self.STALE_RETRIES):
            view, row = await self._load(s, job_id, fact.kind, row=row)
            if view.state is S.NEW and fact.kind not in (FactKind.REQUEST_ACCEPTED, FactKind.REQUEST_REJECTED):
                return Plan(state=S.NEW, outcome="no job")
            plan = machine.step(view, fact, self.now(), self.machine_config)
            try:
                await self._apply(s, view, plan, row)
            except StaleView:
                row = None
                continue
            return plan
        raise StaleView(f"job {job_id} kept changing while {fact.kind} was applied")

    async def _apply(self, s: AsyncSession, view: JobView, plan: Plan, row: Job | None) -> None:
        job_id = view.id
        rows: list[dict[str, Any]] = []  # the timeline, written in one statement at the end
        signed = []
        for o in plan.events:
            t = self._with_keys(o) if o.seal_keys else o.template
            signed.append((sign_event(self.key, t.kind, t.tags, t.content, created_at=self.now()), o.role))
        if plan.new_job is not None:
            if not await self._insert_job(s, job_id, plan):
                raise StaleView(job_id)
        elif plan.writes or plan.state is not view.state:
            values: dict[str, Any] = {"state": plan.state, "version": Job.version + 1, "updated_at": utcnow()}
            if plan.funds is not None:
                values["funds"] = plan.funds
            if plan.offer_expires_at is not None:
                values["offer_expires_at"] = plan.offer_expires_at
            if plan.results_extended_to is not None:
                values["results_extended_to"] = plan.results_extended_to
            if plan.validation_extended_to is not None:
                values["validation_extended_to"] = plan.validation_extended_to
            if plan.deadlines_extended_at is not None:
                values["deadlines_extended_at"] = plan.deadlines_extended_at
            if plan.fallback_deadline is not None:
                values["fallback_deadline"] = plan.fallback_deadline
            if plan.fallback_validators is not None:
                values["fallback_validators"] = json.dumps(list(plan.fallback_validators))
            if plan.refund_reason is not None:
                values["refund_reason"] = plan.refund_reason
            if plan.decision is not None or plan.release_detail is not None:
                values["decision"] = decision_json(
                    plan.decision or view.decision,
                    plan.release_detail,
                    json.loads(row.decision) if row is not None and row.decision else {},
                )
            if plan.appeal_deadline is not None:
                values["appeal_deadline"] = plan.appeal_deadline
            appeal = plan.appeal
            for event, role in signed:
                if role is EventRole.EVAL_REQUEST:
                    values["eval_request_id"] = event.id
                elif role is EventRole.FALLBACK_REQUEST:
                    values["fallback_request_id"] = event.id
                elif role is EventRole.APPEAL_REQUEST and appeal is not None:
                    appeal = replace(appeal, request_id=event.id)
            if appeal is not None:
                values["appeal"] = appeal_json(appeal)
                values["appeal_round_deadline"] = appeal.round_deadline
            res = await s.execute(
                update(Job)
                .where(Job.id == job_id, Job.state == view.state, Job.version == view.version)
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            if rowcount(res) != 1:
                raise StaleView(job_id)
        if plan.results:
            await s.execute(
                insert(table_of(Result)),
                [result_columns(job_id, r, created_at, received_at) for r, created_at, received_at in plan.results],
            )
        if plan.scores:
            await s.execute(
                insert(table_of(ScoreRow)),
                [
                    {
                        "job_id": job_id,
                        "result_id": x.result_id,
                        "validator": x.validator,
                        "value": str(x.value),  # a decimal's exact text, or "unreadable"
                        "event_id": x.event_id,
                    }
                    for x in plan.scores
                ],
            )
        if plan.keys_released:
            # The machine published these results' model keys: from now on the customer's REST view
            # (GET /v1/jobs/{id}/keys) shows them too. Stamped once.
            await s.execute(
                update(Result)
                .where(Result.job_id == job_id, Result.id.in_(plan.keys_released), Result.key_released_at.is_(None))
                .values(key_released_at=utcnow())
                .execution_options(synchronize_session=False)
            )
        for p in plan.postings:
            await ledger.post(s, key=p.key, kind=p.kind.value, lines=p.lines, job_id=p.job_id, memo=p.memo)
        for np in plan.payouts:
            await payouts.create(s, np)
        if plan.effects:
            await s.execute(
                insert_ignore(s, table_of(Effect)),
                [
                    {
                        "job_id": job_id,
                        "kind": kind.value,
                        "state": "pending",
                        "attempts": 0,
                        "next_attempt_at": utcnow(),
                        "created_at": utcnow(),
                    }
                    for kind in plan.effects
                ],
            )
        relays = (
            list(plan.new_job.reply_relays)
            if plan.new_job
            else json.loads(row.reply_relays)
            if row and row.reply_relays
            else []
        )
        for kind, detail in plan.notes:
            rows.append(timeline.row(job_id, kind, detail))
        for event, _ in signed:
            await outbox.enqueue(s, event, self.config.relays, relays)
            status = next((t[1] for t in event.tags if t and t[0] == "status"), "")
            rows.append(
                timeline.row(
                    job_id, timeline.EntryKind.PUBLISHED, {"kind": event.kind, "id": event.id, "status": status}
                )
            )
        if rows:
            await s.execute(insert(table_of(TimelineEntry)), rows)

    def _with_keys(self, o: machine.Outgoing) -> Template:
        """A pool round's request with each sealed candidate's key wrapped escrow -> pool validator.
        The key is opened from the escrow -> customer payload stored at intake (NIP-44 is symmetric),
        checked against the result's commitment, and lives only here: never stored or logged. A key
        that does not open (it did at intake) is left out: that validator scores it unreadable."""
        assert o.evaluation is not None
        keys: list[ValidatorKey] = []
        for k in o.seal_keys:
            try:
                raw = unwrap_key(self.key, k.customer, k.customer_key, k.key_sha256)
            except SealError:
                log.warning("pool round: the stored key of result %s does not open; not handed on", k.result_id)
                continue
            keys.append(ValidatorKey(k.result_id, k.validator, wrap_key(self.key, k.validator, raw).payload))
        return build_evaluation_request(replace(o.evaluation, keys=tuple(keys)))

    async def _insert_job(self, s: AsyncSession, job_id: str, plan: Plan) -> bool:
        new = plan.new_job
        assert new is not None
        stamp = utcnow()
        row: dict[str, Any] = {
            "id": job_id,
            "customer": new.customer,
            "state": plan.state,
            "version": 0,
            "funds": Funds.NONE,
            "request_raw": new.request_raw,
            "reject_reason": new.reject_reason,
            "created_at": stamp,
            "updated_at": stamp,
        }
        if new.request is not None:
            req = new.request
            row.update(
                mode=new.mode,
                bid_msat=req.split.bid_msat,
                fee_msat=req.split.fee_msat,
                validator_fee_msat=req.split.validator_fee_msat,
                payout_policy=str(req.spec.payout),
                results_deadline=req.spec.results_deadline,
                validation_deadline=req.spec.validation_deadline,
                expires_at=req.spec.expiration,
                reply_relays=json.dumps(list(new.reply_relays)) if new.reply_relays else None,
            )
        res = await s.execute(insert_ignore(s, table_of(Job)), [row])
        return rowcount(res) == 1

    def job_request(self, job: Job) -> JobRequest:
        """The job's accepted request, re-read from its event without the clock or terms checks,
        with the money split stored when it was accepted (terms may have changed since)."""
        cached = self._requests.get(job.id)
        if cached is not None:
            return cached
        event = Event.from_dict(json.loads(job.request_raw))
        relay = next((t[2] for t in event.tags if t[0] == "escrow" and len(t) > 2), "")
        spec = read_job_spec(event.tags, self.E, relay)
        split = MoneySplit(
            job.bid_msat,
            job.fee_msat,
            job.validator_fee_msat,
            len(spec.validators),
            job.bid_msat - job.fee_msat - job.validator_fee_msat * len(spec.validators),
        )
        req = JobRequest(
            id=event.id, customer=event.pubkey, created_at=event.created_at, kind=event.kind, spec=spec, split=split
        )
        self._requests[job.id] = req
        if len(self._requests) > 1000:
            self._requests.popitem(last=False)
        return req

    async def load(
        self, s: AsyncSession, job_id: str, kind: FactKind, fact: Fact | None = None, *, full: bool = False
    ) -> JobView:
        """What the machine needs to see of ``job_id`` for a fact of ``kind`` (state NEW: no row);
        ``full``: everything (a test comparing the engine with the machine)."""
        return (await self._load(s, job_id, kind, full=full))[0]

    async def _load(
        self, s: AsyncSession, job_id: str, kind: FactKind, *, full: bool = False, row: Job | None = None
    ) -> tuple[JobView, Job | None]:
        job = row if row is not None else await self._job(s, job_id)
        if job is None:
            return JobView(id=job_id), None
        state = S(job.state)
        req = self.job_request(job) if state is not S.REJECTED else None
        results: tuple[ResultView, ...] = ()
        scores: tuple[ScoreView, ...] = ()
        if full or kind in _RESULTS or kind in _SCORES:
            rows = (await s.scalars(select(Result).where(Result.job_id == job_id))).all()
            ordered = sorted(
                rows, key=lambda r: (aware(r.received_at).timestamp() if r.received_at else r.created_at, r.id)
            )
            results = tuple(result_view(r) for r in ordered)
        if full or kind in _SCORES:
            scores = tuple(
                ScoreView(x.result_id, x.validator, stored_score(x.value), x.event_id)
                for x in (await s.scalars(select(ScoreRow).where(ScoreRow.job_id == job_id))).all()
            )
        held = owed = 0
        posted: frozenset[str] = frozenset()
        if full or kind in _MONEY:
            escrow_acct = accounts.escrow(job_id)
            for account, total in (
                await s.execute(
                    select(LedgerLine.account, func.sum(LedgerLine.amount_msat))
                    .where(LedgerLine.job_id == job_id)
                    .group_by(LedgerLine.account)
                )
            ).all():
                if account == escrow_acct:
                    held = -int(total)
                elif account.startswith("liability:"):
                    owed -= int(total)
            posted = frozenset((await s.scalars(select(LedgerPosting.key).where(LedgerPosting.job_id == job_id))).all())
        payout_views: tuple[machine.PayoutView, ...] = ()
        if full or kind in _PAYOUTS:
            payout_views = tuple(
                payout_view(p) for p in (await s.scalars(select(Payout).where(Payout.job_id == job_id))).all()
            )
        return JobView(
            id=job.id,
            state=state,
            version=job.version,
            customer=job.customer,
            request=req,
            mode=EscrowMode(job.mode) if job.mode else None,
            funds=Funds(job.funds),
            offer_expires_at=job.offer_expires_at,
            results_extended_to=job.results_extended_to,
            validation_extended_to=job.validation_extended_to,
            deadlines_extended_at=job.deadlines_extended_at,
            eval_request_id=job.eval_request_id,
            fallback_request_id=job.fallback_request_id,
            fallback_deadline=job.fallback_deadline,
            fallback_validators=tuple(json.loads(job.fallback_validators)) if job.fallback_validators else (),
            appeal_deadline=job.appeal_deadline,
            appeal=appeal_of(job.appeal, job.appeal_round_deadline),
            refund_reason=job.refund_reason,
            decision=decision_of(job.decision),
            results=results,
            scores=scores,
            payouts=payout_views,
            held_msat=held,
            owed_msat=owed,
            posted=posted,
        ), job

    # ------------------------------------------------------------------ events (the inbox handler)
    async def handle_event(self, s: AsyncSession, event: Event) -> str:
        if event.kind == KIND_JOB_REQUEST:
            return await self.on_job_request(s, event)
        if event.kind == KIND_JOB_RESULT:
            return await self.on_result(s, event)
        if event.kind == KIND_EVALUATION_RESULT:
            return await self.on_scores(s, event)
        if event.kind == KIND_FEEDBACK:
            if is_appeal(event):
                return await self.on_appeal(s, event)
            return await self.on_payee_invoice(s, event)
        if event.kind == KIND_DELETION:
            return await self.on_deletion(s, event)
        return f"ignored: kind {event.kind} is not handled"

    async def on_job_request(self, s: AsyncSession, event: Event) -> str:
        now = self.now()
        try:
            req = parse_job_request(event, escrow_pubkey=self.E, terms=self.config.terms, now=now)
        except CodecError as e:
            if e.reason.value == "not_for_us":
                return "ignored: not for us"
            over = await self._over_budget(s, event.pubkey, accepted=False)
            fact: Fact = (
                machine.RequestRejected(event, *over)
                if over is not None
                else machine.RequestRejected(event, e.reason.value, e.message, e)
            )
            return (await self.apply(s, event.id, fact)).outcome
        over = await self._over_budget(s, event.pubkey, accepted=True)
        if over is not None:
            return (await self.apply(s, event.id, machine.RequestRejected(event, *over))).outcome
        if req.spec.previous_job is not None:
            prev = await s.scalar(select(Job.customer).where(Job.id == req.spec.previous_job))
            if prev is not None and prev != req.customer:
                return (
                    await self.apply(
                        s,
                        event.id,
                        machine.RequestRejected(
                            event, "invalid_previous_job", "the previous round belongs to another customer"
                        ),
                    )
                ).outcome
        fact = machine.RequestAccepted(req, event, tuple(self.reply_relays(req.spec.relays)))
        return (await self.apply(s, event.id, fact)).outcome

    async def _over_budget(self, s: AsyncSession, customer: str, *, accepted: bool) -> tuple[str, str] | None:
        """``(reason, message)`` when a request from ``customer`` is over the intake budget.

        Per key, for everyone: requests of any outcome in the last minute, and open unfunded
        offers. Globally, only for keys that never funded a job here (a key is free to make, a
        funded job is not: a flood of fresh keys must not keep returning customers out) and only
        for a request that would be accepted (those cost an invoice): such requests in the last
        minute that are still unfunded, and unfunded offers open at once."""
        b = self.config.budget
        since = utcnow() - timedelta(seconds=60)  # Job.created_at is wall-clock time
        unfunded = (S.REQUESTED, S.OFFERED)
        mine = await self._count(
            s, select(func.count()).select_from(Job).where(Job.customer == customer, Job.created_at >= since)
        )
        if mine >= b.per_minute_per_key:
            return "rate_limited", f"at most {b.per_minute_per_key} requests a minute from one key"
        if not accepted:
            return None
        open_mine = await self._count(
            s, select(func.count()).select_from(Job).where(Job.customer == customer, Job.state.in_(unfunded))
        )
        if open_mine >= b.open_offers_per_key:
            return "too_many_open_offers", f"at most {b.open_offers_per_key} unfunded offers at once per key"
        if await s.scalar(select(Job.id).where(Job.customer == customer, Job.state.in_(FUNDED_STATES)).limit(1)):
            return None  # a returning customer: its per-key budget only
        recent = await self._count(
            s,
            select(func.count())
            .select_from(Job)
            .where(Job.created_at >= since, Job.state.in_((*unfunded, S.CANCELLED))),
        )
        if recent >= b.per_minute:
            return "escrow_busy", "the escrow takes no more requests from new keys this minute; try again later"
        open_all = await self._count(s, select(func.count()).select_from(Job).where(Job.state.in_(unfunded)))
        if open_all >= b.open_offers:
            return "escrow_busy", "too many unfunded offers are open; try again later"
        return None

    @staticmethod
    async def _count(s: AsyncSession, query: Any) -> int:
        return int(await s.scalar(query) or 0)

    def _job_ref(self, event: Event, *markers: str) -> str | None:
        for t in event.tags:
            if len(t) >= 2 and t[0] == "e" and (len(t) < 4 or t[3] in markers or not markers):
                return t[1]
        return None

    async def received_at(self, s: AsyncSession, event: Event) -> datetime:
        """When a relay or the REST API first handed ``event`` to the escrow (its inbox row):
        what decides whether it was on time and which of two came first, never its ``created_at``."""
        at = await s.scalar(select(InboxEvent.received_at).where(InboxEvent.id == event.id))
        return aware(at) if at is not None else utcnow()

    async def _ignore(self, s: AsyncSession, job_id: str, event: Event, why: str) -> str:
        await timeline.record(
            s,
            job_id,
            timeline.EntryKind.IGNORED,
            {"event": event.id, "kind": event.kind, "from": event.pubkey, "why": why},
        )
        return f"ignored: {why}"

    async def _job(self, s: AsyncSession, job_id: str) -> Job | None:
        return (
            await s.execute(select(Job).where(Job.id == job_id).execution_options(populate_existing=True))
        ).scalar_one_or_none()

    async def on_result(self, s: AsyncSession, event: Event) -> str:
        job_id = self._job_ref(event, "job")
        job = await self._job(s, job_id) if job_id else None
        if job is None:
            return "ignored: result for an unknown job"
        if job.state != S.COLLECTING:
            return await self._ignore(s, job.id, event, f"job is {job.state}, not collecting results")
        try:
            res = parse_result(event, self.job_request(job))
        except CodecError as e:
            return await self._ignore(s, job.id, event, f"{e.reason.value}: {e.message}")
        customer_key = None
        if res.sealed is not None:
            try:
                customer_key = self.rewrap_key(res, job.customer)
            except SealError as e:
                # Not counted: the validators may hold another key than the one we could release.
                return await self._ignore(s, job.id, event, f"key_mismatch: {e.message}")
        received = await self.received_at(s, event)
        if received.timestamp() > job.results_due + self.config.results_grace_seconds:
            job = await self._extend_first(s, job)
        fact = machine.ResultReceived(
            result_view_of(res, customer_key), event.id, event.created_at, received.timestamp()
        )
        return (await self.apply(s, job.id, fact, row=job)).outcome

    def rewrap_key(self, res: JobResult, customer: str) -> str:
        """A sealed result's content key re-encrypted escrow -> ``customer`` (a NIP-44 payload),
        once the escrow's own envelope opened to the committed key (``SealError`` otherwise). The
        plaintext key lives only in this function: never stored, logged or put in an error."""
        sealed = res.sealed
        assert sealed is not None
        envelope = sealed.key_for(self.E)
        if envelope is None:  # the codec requires it (missing_key); checked again, not assumed
            raise SealError("wrong_key", "the result has no key envelope for the escrow")
        key = unwrap_key(self.key, res.provider, envelope.payload, sealed.key_sha256)
        return wrap_key(self.key, customer, key).payload

    async def on_scores(self, s: AsyncSession, event: Event) -> str:
        try:
            ev = parse_evaluation_result(event, escrow_pubkey=self.E)
        except CodecError as e:
            job_id = self._job_ref(event, "job")
            if job_id and await self._job(s, job_id):
                return await self._ignore(s, job_id, event, f"{e.reason.value}: {e.message}")
            return f"ignored: {e.reason.value}"
        job = await self._job(s, ev.job_id)
        if job is None:
            return "ignored: scores for an unknown job"
        try:
            ev = open_scores(ev, self.key)  # sealed scores (to us): opened here, at intake
        except CodecError as e:
            return await self._ignore(s, job.id, event, f"{e.reason.value}: {e.message}")
        received = await self.received_at(s, event)
        if job.state == S.VALIDATING and received.timestamp() > job.validation_due:
            job = await self._extend_first(s, job)
        elif job.state == S.FALLBACK and job.fallback_deadline and received.timestamp() > job.fallback_deadline:
            job = await self._extend_first(s, job)
        elif job.state == S.APPEAL and job.appeal_round_deadline and received.timestamp() > job.appeal_round_deadline:
            job = await self._extend_first(s, job)
        fact = machine.ScoresReceived(
            ev.validator,
            ev.request_id,
            tuple(
                machine.Score(x.result_id, x.model_sha256, UNREADABLE if x.value is None else x.value)
                for x in ev.scores
            ),
            event.id,
            event.created_at,
            received.timestamp(),
        )
        return (await self.apply(s, job.id, fact, row=job)).outcome

    async def on_payee_invoice(self, s: AsyncSession, event: Event) -> str:
        try:
            fb = parse_feedback(event, escrow_pubkey=self.E)
        except CodecError as e:
            return f"ignored: {e.reason.value}"
        job = await self._job(s, fb.job_id)
        if job is None:
            return "ignored: invoice for an unknown job"
        try:
            await payouts.accept_invoice(
                s,
                job_id=job.id,
                payee=event.pubkey,
                bolt11=fb.bolt11,
                amount_msat=fb.amount_msat,
                source=InvoiceSource.NOSTR,
                network=self.config.network,
            )
        except InvoiceRefused as e:
            return await self._ignore(s, job.id, event, f"{e.code.value}: {e.message}")
        return "invoice accepted for checking"

    async def on_appeal(self, s: AsyncSession, event: Event) -> str:
        """An appeal (protocol.md §6c): the codec checks its shape (its reason is never stored or
        echoed); who may appeal and when is the machine's. On time is when the escrow received it."""
        try:
            appeal = parse_appeal(event, escrow_pubkey=self.E)
        except CodecError as e:
            return f"ignored: {e.reason.value}"
        job = await self._job(s, appeal.job_id)
        if job is None:
            return "ignored: appeal of an unknown job"
        received = await self.received_at(s, event)
        if job.state == S.APPEALABLE and job.appeal_deadline and received.timestamp() > job.appeal_deadline:
            job = await self._extend_first(s, job)  # it may have waited on the relays through an outage
        fact = machine.AppealReceived(appeal.appellant, appeal.result_id, event.id, received.timestamp())
        return (await self.apply(s, job.id, fact, row=job)).outcome

    async def on_appeal_invoice_created(
        self, s: AsyncSession, job_id: str, payment_hash: str, payment_request: str, amount_msat: int
    ) -> str:
        """The effect runner made the appeal fee's invoice: the machine publishes it to the appellant."""
        fact = machine.AppealInvoiceCreated(payment_hash, payment_request, amount_msat)
        return (await self.apply(s, job_id, fact)).outcome

    async def on_deletion(self, s: AsyncSession, event: Event) -> str:
        try:
            d = parse_deletion(event)
        except CodecError as e:
            return f"ignored: {e.reason.value}"
        outcomes = []
        for job_id in d.event_ids:
            job = await self._job(s, job_id)
            if job is None:
                continue
            outcomes.append((await self.apply(s, job_id, machine.Deleted(event.pubkey), row=job)).outcome)
        return "; ".join(outcomes) or "ignored: names no job of ours"

    # ------------------------------------------------------------------ effects reported back
    async def on_invoice_failed(self, s: AsyncSession, job_id: str, error: str) -> bool:
        """The escrow invoice could not be made after every retry (LND away for long): the job
        would otherwise wait in ``requested`` for ever. Cancel it (no money was taken) and tell
        the customer, who may post the request again."""
        job = await self._job(s, job_id)
        if job is None:
            return False
        plan = await self.apply(s, job_id, machine.InvoiceFailed(error), row=job)
        return plan.state is S.CANCELLED and not plan.outcome.startswith("ignored")

    def offer_deadline(self, job: Job, now: int) -> int:
        """Until when an offer may be paid (``machine.offer_deadline``)."""
        view = JobView(id=job.id, state=S(job.state), request=self.job_request(job))
        return machine.offer_deadline(view, now, self.machine_config)

    async def on_invoice_created(
        self,
        s: AsyncSession,
        job_id: str,
        payment_hash: str,
        payment_request: str,
        mode: str,
        amount_msat: int,
        *,
        customer: str | None = None,
    ) -> bool:
        """The effect runner made the job's escrow invoice (``mode``: the job's own, decided at intake)."""
        plan = await self.apply(s, job_id, machine.InvoiceCreated(payment_hash, payment_request, amount_msat))
        return plan.state is S.OFFERED and not plan.outcome.startswith("ignored")

    async def operator_refund(self, s: AsyncSession, job_id: str, reason: str) -> Plan:
        return await self.apply(s, job_id, machine.OperatorRefund(reason))

    # ------------------------------------------------------------------ LN facts
    async def handle_ln_fact(self, s: AsyncSession, fact: LnFact) -> str:
        claimed = await s.execute(
            update(LnFact).where(LnFact.seq == fact.seq, LnFact.consumed_at.is_(None)).values(consumed_at=utcnow())
        )
        if rowcount(claimed) != 1:
            return "already consumed"
        found = (
            await s.execute(
                select(LnInvoice.job_id, LnInvoice.purpose).where(LnInvoice.payment_hash == fact.payment_hash)
            )
        ).first()
        job = await self._job(s, found.job_id) if found is not None and found.job_id is not None else None
        if job is None or found is None:
            return "no job"
        observed = int(aware(fact.observed_at).timestamp())
        step: Fact
        if found.purpose == InvoicePurpose.APPEAL_FEE:  # an appeal's fee: never the job's funding
            if fact.kind != "settled":
                return f"appeal fee invoice {fact.kind}: no change"
            step = machine.AppealFeePaid(fact.payment_hash, fact.amount_msat, observed)
        elif fact.kind == "accepted":
            step = machine.HoldAccepted(fact.amount_msat, observed)
        elif fact.kind == "settled":
            step = machine.Settled(fact.payment_hash, fact.amount_msat, observed)
        elif fact.kind == "canceled":
            step = machine.InvoiceCanceled()
        else:
            return "unknown fact"
        await timeline.record(
            s,
            job.id,
            timeline.EntryKind.FACT,
            {"ln": fact.kind, "amount_msat": fact.amount_msat, "source": fact.source},
        )
        return (await self.apply(s, job.id, step, row=job)).outcome

    # ------------------------------------------------------------------ payout outcomes
    async def handle_payout(self, s: AsyncSession, p: Payout) -> str:
        res = await s.execute(
            insert_ignore(s, table_of(Consumed)), [{"source": "payout", "ref": payout_ref(p), "at": utcnow()}]
        )
        if rowcount(res) != 1:
            return "already consumed"
        job = await self._job(s, p.job_id) if p.job_id is not None else None
        if job is None:
            return "no job"
        view = payout_view(p)
        if view.state is PayoutState.SUCCEEDED and p.payment_hash is not None:
            # The invoice that was paid (its attempt's), for the receipt: auditors check its hash and amount.
            paid = await s.scalar(
                select(PayoutAttempt.payment_request).where(
                    PayoutAttempt.payment_hash == p.payment_hash, PayoutAttempt.payout_id == p.id
                )
            )
            view = replace(view, bolt11=paid)
        if view.state is PayoutState.SUCCEEDED:
            return (await self.apply(s, job.id, machine.PayoutSucceeded(view), row=job)).outcome
        if view.state is PayoutState.NEEDS_INVOICE:
            fact = machine.PayoutNeedsInvoice(view, reason_code(p.last_error))
            return (await self.apply(s, job.id, fact, row=job)).outcome
        if view.state is PayoutState.EXPIRED:
            return (await self.apply(s, job.id, machine.PayoutExpired(view), row=job)).outcome
        return "no change"

    # ------------------------------------------------------------------ claim windows
    async def expire_claim(self, s: AsyncSession, payout_id: str) -> str:
        """A payout's claim window ended: service/payouts moves it to expired (compare-and-set) and
        its outcome is consumed here, in the same transaction (booked to unclaimed, the payee told)."""
        if not await payouts.expire(s, payout_id, self.clock_at()):
            return "not expired"
        p = await s.get(Payout, payout_id, populate_existing=True)
        assert p is not None
        return await self.handle_payout(s, p)

    async def remind_claim(self, s: AsyncSession, p: Payout) -> str:
        """The reminder before a claim window ends, once per payout and window: the database's
        ``escrow_consumed`` key ``<payout>:<round>`` decides, whatever the restarts or replicas."""
        res = await s.execute(
            insert_ignore(s, table_of(Consumed)),
            [{"source": "claim_reminder", "ref": f"{p.id}:{p.claim_round}", "at": utcnow()}],
        )
        if rowcount(res) != 1:
            return "already reminded"
        job = await self._job(s, p.job_id) if p.job_id is not None else None
        if job is None:
            return "no job"
        return (await self.apply(s, job.id, machine.ClaimReminder(payout_view(p)), row=job)).outcome

    async def reopen_claim(self, s: AsyncSession, payout_id: str) -> Plan:
        """An operator's reopen of an expired claim, in the caller's transaction: service/payouts
        moves it back to needs_invoice with a fresh window, and the engine consumes that outcome at
        once (the unclaimed booking reversed, the payee asked again, a finished job open again).
        Raises :class:`~service.payouts.ReopenRefused`."""
        p = await payouts.reopen(s, payout_id, self.machine_config.claim_window, at=self.clock_at())
        res = await s.execute(
            insert_ignore(s, table_of(Consumed)), [{"source": "payout", "ref": payout_ref(p), "at": utcnow()}]
        )
        if rowcount(res) != 1:  # a fresh round's outcome cannot have been seen before
            raise RuntimeError(f"the reopened outcome of {payout_id} was consumed before")
        assert p.job_id is not None
        return await self.apply(s, p.job_id, machine.PayoutReopened(payout_view(p)))

    # ------------------------------------------------------------------ timers
    def due_timer(self, job: Job) -> str | None:
        """Which of the job's deadlines has passed and still needs acting on (no I/O)."""
        return machine.due_deadline_of(
            S(job.state),
            job.offer_expires_at,
            job.results_due,
            job.validation_due,
            self.now(),
            self.machine_config,
            fallback_deadline=job.fallback_deadline,
            appeal_deadline=job.appeal_deadline,
            appeal_round_deadline=job.appeal_round_deadline,
        )

    async def on_timers(self, s: AsyncSession, job: Job) -> str | None:
        due = self.due_timer(job)
        if due is None:
            return None
        # Before judging: was the escrow down across this deadline? Then it moves (a fact, published).
        extension = await self.deadline_extension(s, job)
        if extension is not None:
            plan = await self.apply(s, job.id, extension, row=job)
            return "deadline extended" if plan.outcome == "deadline extended" else None
        plan = await self.apply(s, job.id, machine.DeadlineReached(), row=job)
        return due if plan.state is not S(job.state) else None

    async def _extend_first(self, s: AsyncSession, job: Job) -> Job:
        """An event that looks late may have waited on the relays through an outage the timer scan
        has not acted on yet (the pool can deliver the backlog before the first scan after a
        restart): the deadline's extension is applied first, whoever gets there first."""
        extension = await self.deadline_extension(s, job)
        if extension is None:
            return job
        await self.apply(s, job.id, extension, row=job)
        fresh = await self._job(s, job.id)
        assert fresh is not None
        return fresh

    async def deadline_extension(self, s: AsyncSession, job: Job) -> machine.DeadlineExtended | None:
        """Where the escrow's outages (``service/liveness.py``) move the deadline about to be judged,
        or None when it stays. Both windows start when the job was taken (an outage while collecting
        delays validation too); results are judged with their grace, so the rule applies to the
        deadline plus the grace (an outage inside the grace loses results in flight). The rule runs
        on the deadlines in force with the outages since they were last moved (the escrow was live
        then: every earlier outage is in them already), so an outage after an extension extends again,
        and the machine's own adjustment (validation keeps its window) is the base of the next one."""
        state = S(job.state)
        if state not in (S.COLLECTING, S.VALIDATING, S.FALLBACK, S.APPEALABLE, S.APPEAL):
            return None
        since = job.deadlines_extended_at or aware(job.created_at).timestamp()
        down = await liveness.outages_since(s, since, self.config.heartbeat_tolerance_seconds)
        if not down:
            return None
        grace, catch_up = self.config.results_grace_seconds, self.config.outage_catch_up_seconds
        if state in (S.APPEALABLE, S.APPEAL):  # the appeal window's or round's own (set when it opened)
            appeal_due = job.appeal_deadline if state is S.APPEALABLE else job.appeal_round_deadline
            if appeal_due is None:
                return None
            appeal_to = liveness.extend_deadline(appeal_due, since, down, catch_up)
            return machine.DeadlineExtended(None, None, appeal_to=appeal_to) if appeal_to > appeal_due else None
        if state is S.FALLBACK:  # its own deadline (set when the round started: earlier outages are behind it)
            if job.fallback_deadline is None:
                return None
            fallback_to = liveness.extend_deadline(job.fallback_deadline, since, down, catch_up)
            return machine.DeadlineExtended(None, None, fallback_to) if fallback_to > job.fallback_deadline else None
        validation_to = liveness.extend_deadline(job.validation_due, since, down, catch_up)
        if state is S.COLLECTING:
            results_to = liveness.extend_deadline(job.results_due + grace, since, down, catch_up) - grace
            if results_to <= job.results_due:
                return None
            return machine.DeadlineExtended(results_to, validation_to if validation_to > job.validation_due else None)
        return machine.DeadlineExtended(None, validation_to) if validation_to > job.validation_due else None


def decision_json(decision: Decision | None, release: dict[str, object] | Any, stored: dict[str, Any]) -> str:
    """The decision as the API and the dashboard show it (``escrow_jobs.decision``)."""
    out = dict(stored)
    if decision is not None:
        out.update(
            {
                "why": decision.why,
                "verdicts": [
                    {
                        "result": x.result_id,
                        "provider": x.provider,
                        "accepted": x.accepted,
                        "median": format(x.median, "f") if x.median is not None else None,
                        "reward_msat": x.reward_msat,
                        "unreadable": x.unreadable,
                    }
                    for x in decision.verdicts
                ],
                "validator_fees": dict(decision.validator_fees),
                "fee_income_msat": decision.fee_income_msat,
                "remainder_msat": decision.remainder_msat,
                "appeal_fees": dict(decision.appeal_fees),
            }
        )
    if release:
        out.update(release)
    return json.dumps(out)


def decision_of(raw: str | None) -> Decision | None:
    if not raw:
        return None
    d = json.loads(raw)
    if "verdicts" not in d:
        return None
    verdicts = tuple(
        RuleVerdict(
            v["result"],
            v["provider"],
            v["accepted"],
            Decimal(v["median"]) if v["median"] is not None else None,
            v["reward_msat"],
            v.get("unreadable", False),
        )
        for v in d["verdicts"]
    )
    return Decision(
        verdicts,
        d.get("validator_fees", {}),
        d.get("fee_income_msat", 0),
        d.get("remainder_msat", 0),
        d.get("why", ""),
        d.get("appeal_fees", {}),
    )


def appeal_json(a: machine.AppealView) -> str:
    """A job's appeal as stored (``escrow_jobs.appeal``; its round's deadline is a column of its own)."""
    return json.dumps(
        {
            "appellant": a.appellant,
            "status": a.status.value,
            "fee_msat": a.fee_msat,
            "result_id": a.result_id,
            "event_id": a.event_id,
            "payment_hash": a.payment_hash,
            "request_id": a.request_id,
            "validators": list(a.validators),
        }
    )


def appeal_of(raw: str | None, round_deadline: int | None) -> machine.AppealView | None:
    if not raw:
        return None
    d = json.loads(raw)
    return machine.AppealView(
        appellant=d["appellant"],
        status=machine.AppealStatus(d["status"]),
        fee_msat=d["fee_msat"],
        result_id=d.get("result_id"),
        event_id=d.get("event_id", ""),
        payment_hash=d.get("payment_hash"),
        request_id=d.get("request_id"),
        round_deadline=round_deadline,
        validators=tuple(d.get("validators", ())),
    )


def payout_view(p: Payout) -> machine.PayoutView:
    """The machine's view of a payout row (the payout package writes them)."""
    return machine.PayoutView(
        id=p.id,
        kind=p.kind,
        payee=p.payee,
        amount_msat=p.amount_msat,
        state=PayoutState(p.state),
        destination=p.destination_kind,
        attempts=p.attempts,
        needs_invoice_count=p.needs_invoice_count,
        fee_msat=p.fee_msat or 0,
        payment_hash=p.payment_hash,
        preimage=p.preimage,
        earned_by=p.earned_by,
        last_error=p.last_error,
        claim_by=int(aware(p.claim_by).timestamp()) if p.claim_by is not None else None,
        claim_round=p.claim_round,
    )


def result_view_of(res: JobResult, customer_key: str | None = None) -> ResultView:
    """The machine's view of a parsed result; ``customer_key``: a sealed one's key for the customer."""
    payout_to = Destination.none()
    if res.payout_address is not None:
        payout_to = Destination(DestinationKind(res.payout_address.kind), res.payout_address.address)
    invoice = res.invoice
    sealed = res.sealed
    return ResultView(
        res.id,
        res.provider,
        res.shard_index,
        res.model_sha256,
        payout_to,
        invoice.bolt11 if invoice is not None else None,
        invoice.amount_msat if invoice is not None else None,
        res.model_url,
        ciphertext_sha256=sealed.ciphertext_sha256 if sealed is not None else None,
        key_sha256=sealed.key_sha256 if sealed is not None else None,
        customer_key=customer_key if sealed is not None else None,
    )


_REASON_CODE = re.compile(r"([a-z][a-z0-9_]{0,63}): ")


def reason_code(last_error: str | None) -> str:
    """The stable code a payout's ``last_error`` starts with (the Lightning layer writes
    ``<code>: <text>``); ``payout_failed`` for anything else."""
    m = _REASON_CODE.match(last_error or "")
    return m.group(1) if m else "payout_failed"


def stored_score(text: str) -> ScoreValue | None:
    """A stored score: ``unreadable``, or a decimal within the codec's bounds; None for a row stored
    before the bounds existed (it is not counted: it could not be published, and no validator's
    choice may stop a decision)."""
    if text == str(UNREADABLE):
        return UNREADABLE
    try:
        return parse_bounded_decimal(text, CodecErrorReason.SCORE_OUT_OF_RANGE, "score")
    except CodecError:
        return None


def payout_ref(p: Payout) -> str:
    """The outcome of a payout the engine consumes once (EngineRunner._payouts builds the same in SQL)."""
    ref = f"{p.id}:{p.state}:{p.attempts}"
    if p.needs_invoice_count:
        ref += f":{p.needs_invoice_count}"
    return f"{ref}:r{p.claim_round}" if p.claim_round else ref  # each reopened window's outcomes are new
