"""The escrow engine: one database transaction per fact, compare-and-set transitions.

Facts come from four places, and each is consumed exactly once:

- the **inbox** (verified Nostr events: job requests, results, scores, payee invoices,
  deletions), through :meth:`Inbox.process_one`, whose claim is a compare-and-set;
- **LN facts** (``ln_facts``: accepted / settled / canceled, confirmed by lookup);
- **payout outcomes** (``ln_payouts`` reaching succeeded or needs_invoice);
- **timers** (offer expiry, results deadline, validation deadline), driven by the
  deadlines stored on the job, so a restart loses none.

LN facts and payout outcomes are claimed by inserting ``(source, ref)`` into
``escrow_consumed`` in the same transaction as their effects. Job state moves only by
``UPDATE … WHERE id = ? AND state IN (…)`` with the row count checked, so two replicas
cannot both move a job. The engine never talks to the network: what must happen
outside (an invoice to create, a hold invoice to settle or cancel, a payout to send,
an event to publish) is written in the same transaction, as an effect row, a payout
row or an outbox row, and carried out by a worker that reports back as a fact.
"""
from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import Decimal

from sqlalchemy import event, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session

from service.db import aware, insert_ignore, utcnow
from service.escrow import rule
from service.escrow.models import Consumed, Effect, Job, JobState, Result, ScoreRow, TimelineEntry
from service.ledger import accounts
from service.ledger import service as ledger
from service.lightning.invoices import HoldSizing, InvoiceModeError
from service.lightning.models import LnFact, LnInvoice, Payout
from service.payouts import (Destination, DestinationKind, InvoiceRefused, InvoiceSource, NewPayout, PayoutKind,
                             PayoutState)
from service.payouts import store as payouts
from service.nostr import outbox
from service.nostr.models import InboxEvent
from service.nostr.nip01 import Event, SecretKey, sign_event
from service.nostr.protocol import (
    Candidate,
    CancelReason,
    Cancelled,
    CodecError,
    CodecErrorReason,
    ErrorFeedback,
    EscrowOffer,
    EscrowTerms,
    EvaluationRequest,
    Funded,
    JobRequest,
    Mode,
    Refunded,
    RewardClaimable,
    RewardPaid,
    ValidationComplete,
    build_cancelled,
    build_error_feedback,
    build_escrow_offer,
    build_evaluation_request,
    build_funded,
    build_refunded,
    build_rejection,
    build_reward_claimable,
    build_reward_paid,
    build_validation_complete,
    parse_deletion,
    parse_evaluation_result,
    parse_feedback,
    parse_job_request,
    parse_result,
)
from service.nostr.protocol import PaymentProof as ProofBody
from service.nostr.protocol import Verdict as VerdictBody
from service.nostr.protocol.fields import parse_bounded_decimal
from service.nostr.protocol.job import read_job_spec
from service.nostr.protocol.money import MoneySplit

log = logging.getLogger(__name__)

S = JobState
# A job in one of these states was funded once: its customer is a returning one (intake budget).
FUNDED_ONCE = (S.COLLECTING.value, S.VALIDATING.value, S.RELEASING.value, S.CLOSED.value, S.REFUNDING.value,
               S.REFUNDED.value)
KIND_JOB, KIND_RESULT, KIND_EVAL_RESULT, KIND_FEEDBACK, KIND_DELETION = 5701, 6701, 6702, 7000, 5


@dataclass
class IntakeBudget:
    """How many job requests the engine takes, whatever their source (relay or REST): the costly
    part of a request is its escrow invoice, and keys are free to make. Counted in the database,
    so every replica applies the same budget (docs/escrow.md, "Intake budget")."""

    per_minute: int = 120              # requests a minute, still unfunded, from keys that never funded a job
    per_minute_per_key: int = 10       # requests (accepted or refused) a minute from one key
    open_offers: int = 200             # unfunded offers open at once (a limit for new keys)
    open_offers_per_key: int = 3       # unfunded offers open at once from one key


@dataclass
class EngineConfig:
    terms: EscrowTerms
    relays: list[str]
    sizing: HoldSizing = field(default_factory=HoldSizing)
    invoice_expiry_seconds: int = 600
    offer_grace_seconds: int = 30        # late payments within this are still honoured
    results_grace_seconds: int = 60      # receipt may lag a result's deadline by this much (relay latency)
    release_margin_seconds: int = 3600   # hold invoices must outlive the validation deadline by this
    budget: IntakeBudget = field(default_factory=IntakeBudget)
    reply_relays_max: int = 3            # of a request's NIP-90 `relays`, how many also get our replies
    network: str = "regtest"             # ours (Settings.network): a payee invoice for another is refused


class Engine:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], key: SecretKey, config: EngineConfig,
                 *, clock=time.time) -> None:  # noqa: ANN001
        self.sessions = sessions
        self.key = key
        self.E = key.public_key_hex
        self.config = config
        self.clock = clock

    # ------------------------------------------------------------------ plumbing
    def now(self) -> int:
        return int(self.clock())

    async def timeline(self, s: AsyncSession, job_id: str, kind: str, detail: object) -> None:
        text = detail if isinstance(detail, str) else json.dumps(detail, sort_keys=True, default=str)
        # Kept with the session and written in one statement when it commits (_write_timeline):
        # a fact writes several entries, and an entry is only ever read after its commit.
        s.info.setdefault(_TIMELINE, []).append({"job_id": job_id, "kind": kind, "detail": text[:4000],
                                                 "at": utcnow()})

    async def publish(self, s: AsyncSession, job_id: str, template) -> Event:  # noqa: ANN001
        """Sign and queue an event about ``job_id`` for our relays and the job's reply relays
        (its request's NIP-90 ``relays``, checked and bounded when the request was accepted)."""
        event = sign_event(self.key, template.kind, template.tags, template.content, created_at=self.now())
        await outbox.enqueue(s, event, self.config.relays, await self._reply_relays(s, job_id))
        status = next((t[1] for t in event.tags if t and t[0] == "status"), "")
        await self.timeline(s, job_id, "published", {"kind": event.kind, "id": event.id, "status": status})
        return event

    async def transition(self, s: AsyncSession, job_id: str, from_states: Iterable[JobState], to: JobState,
                         why: str, **values: object) -> bool:
        """Compare-and-set the job's state; True if this call moved it."""
        froms = [x.value for x in from_states]
        res = await s.execute(update(Job).where(Job.id == job_id, Job.state.in_(froms))
                              .values(state=to.value, version=Job.version + 1, updated_at=utcnow(), **values))
        if res.rowcount == 1:
            await self.timeline(s, job_id, "transition", {"to": to.value, "why": why})
            return True
        return False

    async def _reply_relays(self, s: AsyncSession, job_id: str) -> list[str]:
        job = await s.get(Job, job_id)   # usually already in the session: no query
        return json.loads(job.reply_relays) if job is not None and job.reply_relays else []

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

    async def consume(self, s: AsyncSession, source: str, ref: str) -> bool:
        res = await s.execute(insert_ignore(s, Consumed.__table__), [{"source": source, "ref": ref, "at": utcnow()}])
        return res.rowcount == 1

    async def effect(self, s: AsyncSession, job_id: str, kind: str) -> None:
        await s.execute(insert_ignore(s, Effect.__table__), [{
            "job_id": job_id, "kind": kind, "state": "pending", "attempts": 0,
            "next_attempt_at": utcnow(), "created_at": utcnow()}])
        await self.timeline(s, job_id, "effect", {"kind": kind})

    def job_request(self, job: Job) -> JobRequest:
        """The accepted request, re-read from its event without the clock or terms checks."""
        event = Event.from_dict(json.loads(job.request_raw))
        relay = next((t[2] for t in event.tags if t[0] == "escrow" and len(t) > 2), "")
        spec = read_job_spec(event.tags, self.E, relay)
        split = MoneySplit(job.bid_msat, job.fee_msat, job.validator_fee_msat, len(spec.validators),
                           job.bid_msat - job.fee_msat - job.validator_fee_msat * len(spec.validators))
        return JobRequest(id=event.id, customer=event.pubkey, created_at=event.created_at, kind=event.kind,
                          spec=spec, split=split)

    # ------------------------------------------------------------------ events (the inbox handler)
    async def handle_event(self, s: AsyncSession, event: Event) -> str:
        if event.kind == KIND_JOB:
            return await self.on_job_request(s, event)
        if event.kind == KIND_RESULT:
            return await self.on_result(s, event)
        if event.kind == KIND_EVAL_RESULT:
            return await self.on_scores(s, event)
        if event.kind == KIND_FEEDBACK:
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
            if over is not None:
                return await self._reject(s, event, *over, None)
            return await self._reject(s, event, e.reason.value, e.message, e)
        over = await self._over_budget(s, event.pubkey, accepted=True)
        if over is not None:
            return await self._reject(s, event, *over, None)
        if req.spec.previous_job is not None:
            prev = await s.get(Job, req.spec.previous_job)
            if prev is not None and prev.customer != req.customer:
                return await self._reject(s, event, "invalid_previous_job",
                                          "the previous round belongs to another customer", None)
        hold_seconds = max(0, req.spec.validation_deadline - now) + self.config.release_margin_seconds
        try:
            requested = "auto" if req.spec.mode is Mode.AUTO else str(req.spec.mode)
            mode = self.config.sizing.choose_mode(requested, hold_seconds)
            if mode not in {str(m) for m in self.config.terms.modes}:
                mode = next(str(m) for m in self.config.terms.modes)
                if requested == "hold":
                    raise InvoiceModeError("hold mode is not offered")
                self.config.sizing.choose_mode(mode, hold_seconds)
        except InvoiceModeError as e:
            return await self._reject(s, event, "hold_window_exceeded", str(e), None)
        split = req.split
        relays = self.reply_relays(req.spec.relays)
        await s.execute(insert(Job.__table__), [dict(
            id=req.id, customer=req.customer, state=S.REQUESTED.value, mode=mode, bid_msat=split.bid_msat,
            fee_msat=split.fee_msat, validator_fee_msat=split.validator_fee_msat,
            payout_policy=str(req.spec.payout), results_deadline=req.spec.results_deadline,
            validation_deadline=req.spec.validation_deadline, request_raw=event.to_json(),
            expires_at=req.spec.expiration, reply_relays=json.dumps(relays) if relays else None,
            created_at=utcnow(), updated_at=utcnow())])
        await self.timeline(s, req.id, "fact", {"event": "job request", "bid_msat": split.bid_msat, "mode": mode,
                                                "shards": len(req.spec.shards), "validators": len(req.validators)})
        await self.effect(s, req.id, "create_invoice")
        return f"accepted: {mode} escrow of {split.bid_msat} msat"

    async def _over_budget(self, s: AsyncSession, customer: str, *, accepted: bool) -> tuple[str, str] | None:
        """``(reason, message)`` when a request from ``customer`` is over the intake budget.

        Per key, for everyone: requests of any outcome in the last minute, and open unfunded
        offers. Globally, only for keys that never funded a job here (a key is free to make, a
        funded job is not: a flood of fresh keys must not keep returning customers out) and only
        for a request that would be accepted (those cost an invoice): such requests in the last
        minute that are still unfunded, and unfunded offers open at once."""
        b = self.config.budget
        since = utcnow() - timedelta(seconds=60)   # Job.created_at is wall-clock time
        unfunded = (S.REQUESTED.value, S.OFFERED.value)
        mine = await s.scalar(select(func.count()).select_from(Job)
                              .where(Job.customer == customer, Job.created_at >= since))
        if mine >= b.per_minute_per_key:
            return "rate_limited", f"at most {b.per_minute_per_key} requests a minute from one key"
        if not accepted:
            return None
        open_mine = await s.scalar(select(func.count()).select_from(Job)
                                   .where(Job.customer == customer, Job.state.in_(unfunded)))
        if open_mine >= b.open_offers_per_key:
            return "too_many_open_offers", f"at most {b.open_offers_per_key} unfunded offers at once per key"
        if await s.scalar(select(Job.id).where(Job.customer == customer, Job.state.in_(FUNDED_ONCE)).limit(1)):
            return None   # a returning customer: its per-key budget only
        recent = await s.scalar(select(func.count()).select_from(Job)
                                .where(Job.created_at >= since, Job.state.in_((*unfunded, S.CANCELLED.value))))
        if recent >= b.per_minute:
            return "escrow_busy", "the escrow takes no more requests from new keys this minute; try again later"
        open_all = await s.scalar(select(func.count()).select_from(Job).where(Job.state.in_(unfunded)))
        if open_all >= b.open_offers:
            return "escrow_busy", "too many unfunded offers are open; try again later"
        return None

    async def _reject(self, s: AsyncSession, event: Event, reason: str, message: str, error: CodecError | None) -> str:
        if await s.get(Job, event.id) is None:
            s.add(Job(id=event.id, customer=event.pubkey, state=S.REJECTED.value, reject_reason=f"{reason}: {message}"[:300],
                      request_raw=event.to_json(), created_at=utcnow(), updated_at=utcnow()))
            await s.flush()
        await self.timeline(s, event.id, "fact", {"event": "job request", "rejected": reason, "message": message})
        if error is not None:
            await self.publish(s, event.id, build_rejection(event, error))
        else:
            await self.publish(s, event.id, build_error_feedback(ErrorFeedback(
                job_id=event.id, customer=event.pubkey, reason=reason, message=message[:200])))
        return f"rejected: {reason}"

    async def _job(self, s: AsyncSession, job_id: str) -> Job | None:
        return await s.get(Job, job_id)

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

    def _on_time(self, received: datetime, deadline: int, grace: int = 0) -> bool:
        return received.timestamp() <= deadline + grace

    async def on_result(self, s: AsyncSession, event: Event) -> str:
        job_id = self._job_ref(event, "job")
        job = await self._job(s, job_id) if job_id else None
        if job is None:
            return "ignored: result for an unknown job"
        if job.state != S.COLLECTING.value:
            return await self._ignore(s, job.id, event, f"job is {job.state}, not collecting results")
        req = self.job_request(job)
        try:
            res = parse_result(event, req)
        except CodecError as e:
            return await self._ignore(s, job.id, event, f"{e.reason.value}: {e.message}")
        received = await self.received_at(s, event)
        # The sender's created_at may only make its own result late, never early.
        if event.created_at > job.results_deadline or not self._on_time(received, job.results_deadline,
                                                                          self.config.results_grace_seconds):
            return await self._ignore(s, job.id, event, "after the results deadline")
        counted = (await s.execute(select(Result.provider, Result.shard_index, Result.model_sha256)
                                   .where(Result.job_id == job.id))).all()
        if any(r.model_sha256 == res.model.sha256 for r in counted):
            # A copy of a model already credited (by hash) earns nothing, whoever signed it.
            return await self._ignore(s, job.id, event, "copied_model: this model is already another result's")
        if any(r.provider == event.pubkey for r in counted):
            return await self._ignore(s, job.id, event, "not the provider's first result for this job")
        per_shard = self.config.terms.max_results_per_shard
        if sum(r.shard_index == res.shard_index for r in counted) >= per_shard:
            return await self._ignore(s, job.id, event, f"shard_full: shard {res.shard_index} has its "
                                                        f"{per_shard} results")
        dest = "none"
        if res.payout_address is not None:
            dest = f"{res.payout_address.kind}:{res.payout_address.address}"
        elif res.invoice is not None:
            dest = f"bolt11-offer:{res.invoice.amount_msat}:{res.invoice.bolt11}"
        # The unique keys (job, provider) and (job, model hash) hold against a concurrent replica too.
        ins = await s.execute(insert_ignore(s, Result.__table__), [{
            "id": event.id, "job_id": job.id, "provider": event.pubkey, "shard_index": res.shard_index,
            "model_url": res.model.url, "model_sha256": res.model.sha256, "destination": dest,
            "created_at": event.created_at, "received_at": received}])
        if ins.rowcount != 1:
            return await self._ignore(s, job.id, event, "not the first result of this provider or this model")
        await self.timeline(s, job.id, "fact", {"event": "result", "id": event.id, "provider": event.pubkey,
                                                "shard": res.shard_index, "model_sha256": res.model.sha256})
        # Collecting ends early only when every shard (not every slot) has a result: sybil copies
        # for one shard cannot end it before the other shards' providers delivered.
        shards_done = {r.shard_index for r in counted} | {res.shard_index}
        if shards_done >= {shard.index for shard in req.spec.shards}:
            await self._start_validation(s, job, "every shard has a result")
        return "counted"

    async def _ignore(self, s: AsyncSession, job_id: str, event: Event, why: str) -> str:
        await self.timeline(s, job_id, "ignored", {"event": event.id, "kind": event.kind, "from": event.pubkey,
                                                   "why": why})
        return f"ignored: {why}"

    async def _results(self, s: AsyncSession, job_id: str) -> list[Result]:
        """The job's counted results in the order the escrow received them."""
        rows = (await s.scalars(select(Result).where(Result.job_id == job_id))).all()
        return sorted(rows, key=lambda r: (aware(r.received_at).timestamp() if r.received_at else r.created_at, r.id))

    async def _start_validation(self, s: AsyncSession, job: Job, why: str) -> None:
        results = await self._results(s, job.id)
        if not results:
            await self._refund(s, job, "no_results", from_states=(S.COLLECTING,))
            return
        req = self.job_request(job)
        tmpl = build_evaluation_request(EvaluationRequest(
            job_id=job.id, candidates=tuple(Candidate(r.id) for r in results), validators=req.validators,
            metric=req.spec.validation.metric, deadline=job.validation_deadline))
        if not await self.transition(s, job.id, (S.COLLECTING,), S.VALIDATING, why):
            return
        ev = await self.publish(s, job.id, tmpl)
        await s.execute(update(Job).where(Job.id == job.id).values(eval_request_id=ev.id))

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
        if job.state != S.VALIDATING.value:
            return await self._ignore(s, job.id, event, f"job is {job.state}, not validating")
        req = self.job_request(job)
        if ev.validator not in req.validators:
            return await self._ignore(s, job.id, event, "signed by a key that is not a designated validator")
        if ev.request_id != job.eval_request_id:
            return await self._ignore(s, job.id, event, "answers another evaluation request")
        received = await self.received_at(s, event)
        if event.created_at > job.validation_deadline or not self._on_time(received, job.validation_deadline):
            return await self._ignore(s, job.id, event, "after the validation deadline")
        results = {r.id: r for r in (await s.scalars(select(Result).where(Result.job_id == job.id))).all()}
        counted, notes = 0, []
        for sc in ev.scores:
            r = results.get(sc.result_id)
            if r is None:
                notes.append(f"{sc.result_id[:12]}: not a candidate")
                continue
            if sc.model_sha256 != r.model_sha256:
                notes.append(f"{sc.result_id[:12]}: score for another model hash")
                continue
            ins = await s.execute(insert_ignore(s, ScoreRow.__table__), [{
                "job_id": job.id, "result_id": r.id, "validator": ev.validator, "value": str(sc.value),
                "event_id": event.id}])
            if ins.rowcount != 1:
                notes.append(f"{sc.result_id[:12]}: not the validator's first score")
                continue
            counted += 1
        await self.timeline(s, job.id, "fact" if counted else "ignored",
                            {"event": "scores", "id": event.id, "validator": ev.validator, "counted": counted,
                             "ignored": notes})
        total = len((await s.scalars(select(ScoreRow.result_id).where(ScoreRow.job_id == job.id))).all())
        if total >= len(results) * len(req.validators):
            await self._decide(s, job, "every validator scored every candidate")
        return f"counted {counted} score(s)" + (f"; ignored {len(notes)}" if notes else "")

    async def _decide(self, s: AsyncSession, job: Job, why: str) -> None:
        req = self.job_request(job)
        results = await self._results(s, job.id)
        scores = (await s.scalars(select(ScoreRow).where(ScoreRow.job_id == job.id))).all()
        cands = [rule.CandidateScores(r.id, r.provider, rank,
                                      {x.validator: value for x in scores if x.result_id == r.id
                                       and (value := _bounded_score(x.value)) is not None})
                 for rank, r in enumerate(results)]
        v = req.spec.validation
        funded = job.bid_msat
        decision = rule.decide(cands, quorum=v.quorum, threshold=v.threshold, direction=str(v.direction),
                               policy=job.payout_policy, bid_msat=funded, fee_msat=job.fee_msat,
                               validator_fee_msat=job.validator_fee_msat, validators=req.validators)
        verdicts = tuple(VerdictBody(result_id=x.result_id, accepted=x.accepted, median=x.median,
                                     reward_msat=x.reward_msat if x.accepted else None) for x in decision.verdicts)
        detail = {"why": why, "verdicts": [{"result": x.result_id, "provider": x.provider, "accepted": x.accepted,
                                            "median": format(x.median, "f") if x.median is not None else None,
                                            "reward_msat": x.reward_msat} for x in decision.verdicts],
                  "validator_fees": decision.validator_fees, "fee_income_msat": decision.fee_income_msat,
                  "remainder_msat": decision.remainder_msat}
        if not decision.accepted:
            reason = "no_quorum" if all(x.median is None for x in decision.verdicts) else "no_accepted_result"
            await s.execute(update(Job).where(Job.id == job.id).values(decision=json.dumps(detail)))
            await self.publish(s, job.id, build_validation_complete(ValidationComplete(job.id, job.customer, verdicts)))
            await self._refund(s, job, reason, from_states=(S.VALIDATING,))
            return
        if not await self.transition(s, job.id, (S.VALIDATING,), S.RELEASING, why, decision=json.dumps(detail)):
            return
        await self.publish(s, job.id, build_validation_complete(ValidationComplete(job.id, job.customer, verdicts)))
        if job.mode == "hold" and not job.custody:
            await self.effect(s, job.id, "settle_hold")   # the release continues on the settled fact
        else:
            await self._release(s, job.id)

    async def _release(self, s: AsyncSession, job_id: str) -> None:
        """Book the decided split and create the payouts (the money is in our custody)."""
        job = await s.get(Job, job_id)
        detail = json.loads(job.decision)
        escrow_acct = accounts.escrow(job.id)
        held = -await ledger.balance(s, escrow_acct)   # credit-normal liability
        if held <= 0:
            await self.timeline(s, job.id, "ignored", {"why": "release with nothing held in escrow"})
            log.error("job %s: release requested but its escrow account holds %d msat", job.id, held)
            return
        lines: list[tuple[str, int]] = [(escrow_acct, held)]
        results = {r.id: r for r in (await s.scalars(select(Result).where(Result.job_id == job.id))).all()}
        to_pay: list[NewPayout] = []
        for v in detail["verdicts"]:
            if v["reward_msat"]:
                r = results[v["result"]]
                lines.append((accounts.payable(r.provider, job.id), -v["reward_msat"]))
                to_pay.append(NewPayout(f"{job.id}:reward:{r.id}", job.id, PayoutKind.REWARD, r.provider,
                                        v["reward_msat"], _destination(r.destination, v["reward_msat"]),
                                        earned_by=r.id))
        for validator, fee in detail["validator_fees"].items():
            lines.append((accounts.payable(validator, job.id), -fee))
            to_pay.append(NewPayout(f"{job.id}:validator:{validator}", job.id, PayoutKind.VALIDATOR_FEE, validator,
                                    fee, Destination.none()))
        # What the escrow earned on the job (its fee and the remainders) is the most their routes
        # may cost together: the escrow never pays to work (docs/escrow.md, "Routing fees").
        earned = job.bid_msat - sum(p.amount_msat for p in to_pay)
        budgets = rule.routing_budgets({p.id: p.amount_msat for p in to_pay}, earned)
        to_pay = [replace(p, fee_limit_msat=budgets[p.id]) for p in to_pay]
        # Paid more than the bid: the excess goes back to the customer (less its route's reserve).
        overpaid = held - job.bid_msat
        if overpaid > 0:
            back = rule.refundable(overpaid, self.config.terms.routing_fee_ppm)
            if back >= self.config.terms.min_payout_msat:
                lines.append((accounts.refund(job.customer, job.id), -back))
                to_pay.append(NewPayout(f"{job.id}:overpaid", job.id, PayoutKind.OVERPAID, job.customer, back,
                                        self._refund_destination(job), overpaid - back))
        fee_income = held - sum(p.amount_msat for p in to_pay)   # escrow fee + remainders (+ reserves)
        if fee_income:
            lines.append((accounts.FEE_INCOME, -fee_income))
        await ledger.post(s, key=f"release:{job.id}", kind="release", lines=lines, job_id=job.id,
                          memo=f"release: {len(to_pay)} payout(s), fee income {fee_income} msat")
        await s.execute(update(Job).where(Job.id == job.id).values(decision=json.dumps(
            {**detail, "overpaid_msat": max(0, overpaid), "routing_budgets_msat": budgets,
             "fee_income_at_release_msat": fee_income})))
        await self.timeline(s, job.id, "posting", {"key": f"release:{job.id}", "lines": lines})
        for p in to_pay:
            await self._create_payout(s, job, p)

    def _refund_destination(self, job: Job) -> Destination:
        refund = self.job_request(job).spec.refund
        if not refund:
            return Destination.none()
        return Destination(DestinationKind.LUD16 if "@" in refund else DestinationKind.LNURL, refund)

    async def _create_payout(self, s: AsyncSession, job: Job, p: NewPayout) -> None:
        await payouts.create(s, p)
        await self.timeline(s, job.id, "payment", {"payout": p.id, "amount_msat": p.amount_msat,
                                                   "fee_limit_msat": p.fee_limit_msat,
                                                   "destination": p.destination.kind.value})
        if p.destination.kind is DestinationKind.NONE:
            await self.publish(s, job.id, build_reward_claimable(RewardClaimable(
                job_id=job.id, payee=p.payee, amount_msat=p.amount_msat, earned_by=p.earned_by)))

    async def _refund(self, s: AsyncSession, job: Job, reason: str, *, from_states: Iterable[JobState]) -> None:
        if not await self.transition(s, job.id, from_states, S.REFUNDING, reason, refund_reason=reason):
            return
        job = await s.get(Job, job.id)
        if job.mode == "hold" and not job.custody and not job.funded:
            await self.effect(s, job.id, "cancel_invoice")    # refunded on the canceled fact
            return
        await self._custodial_refund(s, job)

    async def _custodial_refund(self, s: AsyncSession, job: Job) -> None:
        """Pay the customer back what we hold. The escrow earned nothing on a refunded job, so
        the refund's route is paid from the refunded amount: the customer gets the held amount
        less a routing reserve (``routing_fee_ppm``, announced), in whole satoshis; what the
        reserve and the rounding leave is booked as fee income and shown on the timeline."""
        escrow_acct = accounts.escrow(job.id)
        held = -await ledger.balance(s, escrow_acct)
        back = rule.refundable(held, self.config.terms.routing_fee_ppm) if held > 0 else 0
        if back <= 0:
            await self._finish_refund(s, job.id)
            return
        lines = [(escrow_acct, held), (accounts.refund(job.customer, job.id), -back)]
        if held - back:
            lines.append((accounts.FEE_INCOME, -(held - back)))
        await ledger.post(s, key=f"refund:{job.id}", kind="refund", lines=lines, job_id=job.id,
                          memo=f"refund: {job.refund_reason}; routing reserve and rounding {held - back} msat")
        await self._create_payout(s, job, NewPayout(f"{job.id}:refund", job.id, PayoutKind.REFUND, job.customer, back,
                                                    self._refund_destination(job), held - back))

    async def _finish_refund(self, s: AsyncSession, job_id: str, amount: int | None = None) -> None:
        job = await s.get(Job, job_id)
        if await self.transition(s, job_id, (S.REFUNDING,), S.REFUNDED, job.refund_reason or "refunded"):
            await self.publish(s, job_id, build_refunded(Refunded(
                job_id=job_id, customer=job.customer, reason=job.refund_reason or "refunded",
                amount_msat=amount if amount is not None else job.bid_msat)))

    async def on_payee_invoice(self, s: AsyncSession, event: Event) -> str:
        try:
            fb = parse_feedback(event, escrow_pubkey=self.E)
        except CodecError as e:
            return f"ignored: {e.reason.value}"
        job = await self._job(s, fb.job_id)
        if job is None:
            return "ignored: invoice for an unknown job"
        try:
            await payouts.accept_invoice(s, job_id=job.id, payee=event.pubkey, bolt11=fb.bolt11,
                                         amount_msat=fb.amount_msat, source=InvoiceSource.NOSTR,
                                         network=self.config.network)
        except InvoiceRefused as e:
            return await self._ignore(s, job.id, event, f"{e.code.value}: {e.message}")
        return "invoice accepted for checking"

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
            if job.customer != event.pubkey:
                outcomes.append(await self._ignore(s, job.id, event, "deletion not signed by the customer"))
                continue
            if await self.transition(s, job.id, (S.REQUESTED, S.OFFERED), S.CANCELLED, "deleted by the customer"):
                await self.effect(s, job.id, "cancel_invoice")
                await self.publish(s, job.id, build_cancelled(Cancelled(job.id, job.customer, CancelReason.DELETED.value)))
                outcomes.append("cancelled")
            else:
                outcomes.append(await self._ignore(s, job.id, event, f"job is {job.state}: too late to cancel"))
        return "; ".join(outcomes) or "ignored: names no job of ours"

    # ------------------------------------------------------------------ effects reported back
    async def on_invoice_failed(self, s: AsyncSession, job_id: str, error: str) -> bool:
        """The escrow invoice could not be made after every retry (LND away for long): the job
        would otherwise wait in ``requested`` for ever. Cancel it (no money was taken) and tell
        the customer, who may post the request again."""
        job = await s.get(Job, job_id)
        if job is None or not await self.transition(s, job_id, (S.REQUESTED,), S.CANCELLED,
                                                     f"no escrow invoice could be made: {error}"[:300]):
            return False
        await self.publish(s, job_id, build_error_feedback(ErrorFeedback(
            job_id=job_id, customer=job.customer, reason="escrow_unavailable",
            message="the escrow could not create an invoice; post the request again later")))
        return True

    def offer_deadline(self, job: Job, now: int) -> int:
        """Until when an offer may be paid: the payment window, and never past the results
        deadline (providers could not deliver) or the request's NIP-40 expiration (relays drop it)."""
        return min(now + self.config.invoice_expiry_seconds, job.results_deadline,
                   job.expires_at if job.expires_at is not None else job.results_deadline)

    async def on_invoice_created(self, s: AsyncSession, job_id: str, payment_hash: str, payment_request: str,
                                 mode: str, amount_msat: int, *, customer: str | None = None) -> bool:
        """``customer``: the job's, when the caller has it (saves reading the job again)."""
        if customer is None:
            customer = (await s.get(Job, job_id)).customer
        job = await s.get(Job, job_id)
        if not await self.transition(s, job_id, (S.REQUESTED,), S.OFFERED, "escrow invoice created",
                                     payment_hash=payment_hash, mode=mode,
                                     offer_expires_at=self.offer_deadline(job, self.now())):
            return False
        await self.timeline(s, job_id, "invoice", {"payment_hash": payment_hash, "mode": mode, "amount_msat": amount_msat})
        await self.publish(s, job_id, build_escrow_offer(EscrowOffer(
            job_id=job_id, customer=customer, amount_msat=amount_msat, bolt11=payment_request, mode=Mode(mode))))
        return True

    # ------------------------------------------------------------------ LN facts
    async def handle_ln_fact(self, s: AsyncSession, fact: LnFact) -> str:
        claimed = await s.execute(update(LnFact).where(LnFact.seq == fact.seq, LnFact.consumed_at.is_(None))
                                  .values(consumed_at=utcnow()))
        if claimed.rowcount != 1:
            return "already consumed"
        inv = await s.get(LnInvoice, fact.payment_hash)
        job = await self._job(s, inv.job_id) if inv and inv.job_id else None
        if job is None:
            return "no job"
        await self.timeline(s, job.id, "fact", {"ln": fact.kind, "amount_msat": fact.amount_msat, "source": fact.source})
        late = self._paid_too_late(job, fact)
        if fact.kind == "accepted" and late is not None:
            # The customer's HTLC goes back (cancel); the job never starts.
            if await self.transition(s, job.id, (S.OFFERED,), S.CANCELLED, f"funded too late: {late}"):
                await self.effect(s, job.id, "cancel_invoice")
                await self.publish(s, job.id, build_cancelled(Cancelled(job.id, job.customer, late)))
                return f"funded too late ({late}): cancelled"
        if fact.kind == "accepted":
            if await self.transition(s, job.id, (S.OFFERED,), S.COLLECTING, "hold invoice accepted (funds locked)"):
                await self.publish(s, job.id, build_funded(Funded(job.id, job.customer, fact.amount_msat)))
                return "funded (hold)"
            if job.state in (S.CANCELLED.value, S.REJECTED.value):
                await self.effect(s, job.id, "cancel_invoice")
                return "late funding of a cancelled job: cancelled"
            return "accepted: no change"
        if fact.kind == "settled":
            await ledger.post(s, key=f"funding:{fact.payment_hash}", kind="funding", job_id=job.id,
                              lines=[(accounts.NODE, fact.amount_msat), (accounts.escrow(job.id), -fact.amount_msat)],
                              memo=f"funding settled ({job.mode})")
            await self.timeline(s, job.id, "posting", {"key": f"funding:{fact.payment_hash}", "amount_msat": fact.amount_msat})
            await s.execute(update(Job).where(Job.id == job.id).values(funded=True))
            if job.mode == "custodial":
                if late is not None:
                    if await self.transition(s, job.id, (S.OFFERED,), S.REFUNDING, f"paid too late: {late}",
                                             refund_reason=f"paid_after_{late}"[:64]):
                        await self._custodial_refund(s, await s.get(Job, job.id))
                        return f"paid too late ({late}): refunding"
                if await self.transition(s, job.id, (S.OFFERED,), S.COLLECTING, "invoice settled (funds in custody)"):
                    await self.publish(s, job.id, build_funded(Funded(job.id, job.customer, fact.amount_msat)))
                    return "funded (custodial)"
                if await self.transition(s, job.id, (S.CANCELLED,), S.REFUNDING, "paid after the job was cancelled",
                                         refund_reason="paid_after_cancel"):
                    await self._custodial_refund(s, await s.get(Job, job.id))
                    return "late payment of a cancelled job: refunding"
                return "settled: no change"
            # hold mode
            if job.state == S.RELEASING.value:
                await self._release(s, job.id)
                return "hold settled: released"
            if job.state in (S.COLLECTING.value, S.VALIDATING.value):
                await s.execute(update(Job).where(Job.id == job.id).values(custody=True))
                await self.timeline(s, job.id, "transition", {"to": job.state, "why": "hold invoice settled by the "
                                    "deadline guard: the job continues custodially"})
                return "hold moved into custody"
            if job.state == S.REFUNDING.value:
                await self._custodial_refund(s, await s.get(Job, job.id))
                return "hold settled while refunding: refund by payment"
            return "settled: no change"
        if fact.kind == "canceled":
            if job.state == S.REFUNDING.value:
                await self._finish_refund(s, job.id)
                return "refunded (hold cancelled)"
            if job.state in (S.COLLECTING.value, S.VALIDATING.value) and job.mode == "hold" and not job.custody:
                await self.transition(s, job.id, (S.COLLECTING, S.VALIDATING), S.REFUNDING, "hold invoice cancelled",
                                      refund_reason="hold_expired")
                await self._finish_refund(s, job.id)
                return "refunded (hold cancelled before release)"
            return "canceled: no change"
        return "unknown fact"

    def _paid_too_late(self, job: Job, fact: LnFact) -> str | None:
        """Why an offered job's funding came too late to start it (LND's own observation time,
        not ours), or None: after the request's NIP-40 expiration, or after the offer closed."""
        if job.state != S.OFFERED.value:
            return None
        at = int(aware(fact.observed_at).timestamp())
        if job.expires_at is not None and at >= job.expires_at:
            return CancelReason.REQUEST_EXPIRED.value
        if job.offer_expires_at is not None and at > job.offer_expires_at + self.config.offer_grace_seconds:
            return CancelReason.OFFER_EXPIRED.value
        return None

    # ------------------------------------------------------------------ payout outcomes
    async def handle_payout(self, s: AsyncSession, p: Payout) -> str:
        if not await self.consume(s, "payout", payout_ref(p)):
            return "already consumed"
        if p.job_id is None:
            return "no job"
        job = await s.get(Job, p.job_id)
        if p.state is PayoutState.SUCCEEDED:
            to_customer = p.kind.to_customer   # money back, not earned
            liability = accounts.refund(p.payee, p.job_id) if to_customer else accounts.payable(p.payee, p.job_id)
            await ledger.post(s, key=f"payout:{p.payment_hash}", kind="refund_payout" if to_customer else "payout",
                              job_id=p.job_id, lines=[(liability, p.amount_msat), (accounts.NODE, -p.amount_msat)],
                              memo=f"payout {p.id}")
            if p.fee_msat:
                await ledger.post(s, key=f"routing_fee:{p.payment_hash}", kind="routing_fee", job_id=p.job_id,
                                  lines=[(accounts.ROUTING_EXPENSE, p.fee_msat), (accounts.NODE, -p.fee_msat)],
                                  memo=f"routing fee of {p.id}")
            await self.timeline(s, p.job_id, "payment", {"payout": p.id, "state": "succeeded", "amount_msat": p.amount_msat,
                                                         "fee_msat": p.fee_msat, "payment_hash": p.payment_hash})
            if p.kind is PayoutKind.REFUND:
                await self._finish_refund(s, p.job_id, p.amount_msat)
            elif not to_customer:
                await self.publish(s, p.job_id, build_reward_paid(RewardPaid(
                    job_id=p.job_id, earned_by=await self._earned_by(s, p), payee=p.payee,
                    payment=ProofBody(p.payment_hash, p.preimage, p.amount_msat, p.fee_msat or 0))))
            if job.state == S.RELEASING.value and await self._all_paid_and_booked(s, p.job_id):
                await self.transition(s, p.job_id, (S.RELEASING,), S.CLOSED, "every payout succeeded and is booked")
            return "payout booked"
        if p.state is PayoutState.NEEDS_INVOICE:
            if p.needs_invoice_count == 0:   # never handed back: the release announced it
                return "waiting for the payee's invoice (announced at release)"
            await self.timeline(s, p.job_id, "payment", {"payout": p.id, "state": "needs_invoice", "why": p.last_error})
            # Asked again with the reason's code (the payee can act on it), never its text (which
            # may hold an LNURL server's answer or an address: those are for the operator).
            await self.publish(s, p.job_id, build_reward_claimable(RewardClaimable(
                job_id=p.job_id, payee=p.payee, amount_msat=p.amount_msat, earned_by=p.earned_by,
                reason=reason_code(p.last_error))))
            return "payee asked for a new invoice"
        return "no change"

    async def _earned_by(self, s: AsyncSession, p: Payout) -> str:
        """The event that earned a payout: the result (provider) or the validator's scores."""
        if p.earned_by is not None:   # a reward: its result
            return p.earned_by
        event_id = await s.scalar(select(ScoreRow.event_id).where(ScoreRow.job_id == p.job_id,
                                                                  ScoreRow.validator == p.payee).limit(1))
        return event_id or p.job_id

    async def _all_paid_and_booked(self, s: AsyncSession, job_id: str) -> bool:
        unpaid = (await s.scalars(select(Payout.id).where(Payout.job_id == job_id, Payout.state != "succeeded"))).all()
        if unpaid:
            return False
        owed = await ledger.balances(s, job_id=job_id)
        return all(v == 0 for k, v in owed.items() if k.startswith("liability:"))

    # ------------------------------------------------------------------ timers
    def due_timer(self, job: Job) -> str | None:
        """Which of the job's deadlines has passed and still needs acting on (no I/O)."""
        now = self.now()
        if job.state == S.OFFERED.value and job.offer_expires_at and now > job.offer_expires_at + self.config.offer_grace_seconds:
            return "offer expired"
        if job.state == S.COLLECTING.value and now > job.results_deadline + self.config.results_grace_seconds:
            return "results deadline"
        if job.state == S.VALIDATING.value and now > job.validation_deadline:
            return "validation deadline"
        return None

    async def on_timers(self, s: AsyncSession, job: Job) -> str | None:
        due = self.due_timer(job)
        if due == "offer expired":
            if await self.transition(s, job.id, (S.OFFERED,), S.CANCELLED, "offer expired unpaid"):
                await self.effect(s, job.id, "cancel_invoice")
                await self.publish(s, job.id, build_cancelled(Cancelled(job.id, job.customer,
                                                                        CancelReason.OFFER_EXPIRED.value)))
                return due
        elif due == "results deadline":
            await self._start_validation(s, job, "results deadline passed")
            return due
        elif due == "validation deadline":
            await self._decide(s, job, "validation deadline passed")
            return due
        return None


_TIMELINE = "fedstr.timeline"


@event.listens_for(Session, "before_commit")
def _write_timeline(session: Session) -> None:
    rows = session.info.pop(_TIMELINE, None)
    if rows:
        session.execute(insert(TimelineEntry.__table__), rows)


@event.listens_for(Session, "after_rollback")
def _drop_timeline(session: Session) -> None:
    session.info.pop(_TIMELINE, None)   # the entries described what was rolled back


_REASON_CODE = re.compile(r"([a-z][a-z0-9_]{0,63}): ")


def reason_code(last_error: str | None) -> str:
    """The stable code a payout's ``last_error`` starts with (the Lightning layer writes
    ``<code>: <text>``); ``payout_failed`` for anything else."""
    m = _REASON_CODE.match(last_error or "")
    return m.group(1) if m else "payout_failed"


def _bounded_score(text: str) -> Decimal | None:
    """A stored score within the codec's bounds; None for a row stored before the bounds existed
    (it is not counted: it could not be published, and no validator's choice may stop a decision)."""
    try:
        return parse_bounded_decimal(text, CodecErrorReason.SCORE_OUT_OF_RANGE, "score")
    except CodecError:
        return None


def payout_ref(p: Payout) -> str:
    """The outcome of a payout the engine consumes once (EngineRunner._payouts builds the same in SQL)."""
    ref = f"{p.id}:{p.state}:{p.attempts}"
    return f"{ref}:{p.needs_invoice_count}" if p.needs_invoice_count else ref


def _destination(stored: str, amount_msat: int) -> Destination:
    """A result's payout destination for a reward of ``amount_msat`` (a result stores
    ``bolt11-offer:<amount>:<invoice>``, ``lud16:…``, ``lnurl:…`` or ``none``)."""
    if stored.startswith("bolt11-offer:"):
        _, amount, bolt11 = stored.split(":", 2)
        return Destination(DestinationKind.BOLT11, bolt11) if int(amount) == amount_msat else Destination.none()
    return Destination.parse(stored)
