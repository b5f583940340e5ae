"""The audit's checks: pure functions of a job's public events (no relay, no database, no clock).

:func:`audit_events` takes every event the relays returned for a job (the request, the escrow's
feedback, the results, the evaluation request and results, the escrow's announcement), verifies
each signature, attributes the escrow's events by the key the job names, and checks, in order:

``signatures``  every escrow event is signed by the job's escrow (others posing as it are reported)
``job``         the request parses (shape and roles; not the terms, which may have changed since)
``offer``       the offer asks for the bid; its invoice decodes to that amount
``funded``      the funded amount covers the bid
``outcome``     a validation complete, a refund, or neither yet
``candidates``  the verdicts are for the evaluation request's candidates, each a valid result
``fallback``    a fallback round (§6b), if any: it follows the first request, asks only pool keys that are
                not the customer, a provider or a named validator, no more of them than named
                validators who scored nothing, and only for candidates the first round left short
``appeal``      an appeal round (§6c), if any: it follows the first request, asks the job's quorum of pool
                keys that are none of the job's own people (nor a fallback validator), for every
                candidate; its validation complete, the final one, scores only by them
``scores``      every published score is by a designated validator (or a fallback one, of its candidates;
                after an appeal, by the appeal validators)
``verdict``     every verdict, recomputed with the published rule from the published scores (after an
                appeal: the final decision from the appeal round's scores, the first one's validator fees kept)
``split``       the published split is the job's bid, validator fee and validators
``terms``       its escrow fee matches the announced fee terms (a warning only: terms change)
``rewards``     every verdict's reward is the split rule's (whole satoshis, remainder to the escrow)
``receipt``     each reward paid: preimage, invoice hash and amount, the reward it pays, its payee
``model key``   keys only for results paid a reward > 0
``refund``      at most the funded amount, and nothing paid or released on a refunded job
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import bolt11

from service.escrow import rule
from service.nostr.nip01 import MAX_CREATED_AT, Event, EventError, verify_event
from service.nostr.protocol.announcement import Announcement, parse_announcement
from service.nostr.protocol.errors import CodecError, CodecErrorReason
from service.nostr.protocol.evaluation import EvalRound, EvaluationRequest, parse_evaluation_request
from service.nostr.protocol.feedback import (
    ErrorFeedback,
    EscrowOffer,
    Funded,
    ModelKey,
    Refunded,
    RewardPaid,
    ValidationComplete,
    parse_escrow_feedback,
)
from service.nostr.protocol.fields import BASELINE, check_singles
from service.nostr.protocol.job import SINGLE_TAGS, JobRequest, check_roles, read_job_spec
from service.nostr.protocol.money import MoneySplit, whole_sats
from service.nostr.protocol.result import JobResult, parse_result
from service.nostr.protocol.terms import KIND_ANNOUNCEMENT, KIND_EVALUATION_REQUEST, KIND_FEEDBACK

from .decision import Recomputed, Scored, recompute
from .report import AuditFetchError, AuditReport, Finding, Status

KIND_EVALUATION_RESULT_OFFSET = 1000  # a 6702 answers a 5702, as a result answers its request
_CHECK_OF_INFO = {
    "escrow": "offer",
    "escrow funded": "funded",
    "validation complete": "verdict",
    "reward paid": "receipt",
    "reward claimable": "receipt",
    "claim expired": "receipt",
    "model key": "model key",
}


def short(value: str) -> str:
    return value[:12] + "…"


@dataclass
class _Record:
    """The job's events, sorted by role (each list oldest first)."""

    offers: list[tuple[Event, EscrowOffer]] = field(default_factory=list)
    funded: list[tuple[Event, Funded]] = field(default_factory=list)
    completes: list[tuple[Event, ValidationComplete]] = field(default_factory=list)
    receipts: list[tuple[Event, RewardPaid]] = field(default_factory=list)
    keys: list[tuple[Event, ModelKey]] = field(default_factory=list)
    refunds: list[tuple[Event, Refunded]] = field(default_factory=list)
    errors: list[tuple[Event, ErrorFeedback]] = field(default_factory=list)
    requests: list[tuple[Event, EvaluationRequest]] = field(default_factory=list)  # the first round's
    fallbacks: list[tuple[Event, EvaluationRequest]] = field(default_factory=list)  # a fallback round's
    appeals: list[tuple[Event, EvaluationRequest]] = field(default_factory=list)  # an appeal round's
    results: dict[str, Event] = field(default_factory=dict)  # result id -> event (any author)
    evaluations: dict[str, Event] = field(default_factory=dict)  # evaluation result id -> event
    announcement: Announcement | None = None


class _Audit:
    def __init__(self, job_id: str, escrow: str | None) -> None:
        self.job_id = job_id
        self.escrow = escrow
        self.findings: list[Finding] = []
        self.rec = _Record()
        self.job: JobRequest | None = None
        self.decided: Recomputed | None = None
        self.complete: ValidationComplete | None = None  # the final decision's (after an appeal: its round's)
        self.first_complete: ValidationComplete | None = None  # the first decision's (the same without an appeal)

    # ---- findings --------------------------------------------------------------------------
    def ok(self, check: str, message: str) -> None:
        self.findings.append(Finding(check, Status.OK, message))

    def bad(self, check: str, code: str, message: str, subject: str | None = None) -> None:
        self.findings.append(Finding(check, Status.DISCREPANCY, message, code, subject))

    def warn(self, check: str, code: str, message: str, subject: str | None = None) -> None:
        self.findings.append(Finding(check, Status.WARNING, message, code, subject))

    def na(self, check: str, message: str) -> None:
        self.findings.append(Finding(check, Status.NOT_APPLICABLE, message))

    def _clean(self, check: str) -> bool:
        return not any(f.check == check and f.status is Status.DISCREPANCY for f in self.findings)

    # ---- intake ----------------------------------------------------------------------------
    def run(self, raw_events: Iterable[Event | Mapping[str, Any]]) -> int:
        events: dict[str, Event] = {}
        forged: list[str] = []  # pubkeys of events whose signature (or shape) does not verify
        for raw in raw_events:
            try:
                # Time plays no part in an audit: any created_at is accepted.
                event = verify_event(raw, now=MAX_CREATED_AT, max_future=0)
            except (EventError, TypeError, ValueError):
                pubkey = raw.pubkey if isinstance(raw, Event) else raw.get("pubkey") if isinstance(raw, Mapping) else ""
                forged.append(pubkey if isinstance(pubkey, str) else "")
                continue
            events.setdefault(event.id, event)
        job_event = events.get(self.job_id)
        if job_event is None:
            raise AuditFetchError(f"job {self.job_id} was not found")
        if not self._read_job(job_event):
            return len(events)
        assert self.escrow is not None
        impostors = self._sort(
            e for e in sorted(events.values(), key=lambda e: (e.created_at, e.id)) if e.id != job_event.id
        )
        n_forged = sum(p == self.escrow for p in forged)
        # Anyone can publish these (copying the escrow's key, or posing as its feedback): they are
        # warnings, never discrepancies, so a third party cannot make a clean job fail its audit.
        if n_forged:
            self.warn("signatures", "forged", f"{n_forged} event(s) claim the escrow's key but fail their signature")
        for event in impostors:
            self.warn(
                "signatures",
                "impostor",
                f"event {short(event.id)} poses as escrow feedback for this job but is signed by "
                f"{short(event.pubkey)}, not the escrow: ignored",
                event.id,
            )
        if not n_forged and not impostors:
            ignored = f"; {len(forged)} other event(s) with a bad signature ignored" if forged else ""
            self.ok(
                "signatures", f"{len(events)} events verify; the escrow's are signed by {short(self.escrow)}{ignored}"
            )
        self._checks()
        return len(events)

    def _read_job(self, event: Event) -> bool:
        """The request's shape and roles (never the terms: they may have changed since)."""
        named = [t[1] for t in event.tags if t[0] == "escrow" and len(t) >= 2]
        if self.escrow is None:
            if len(set(named)) != 1:
                self.bad("job", "no_escrow", "the job request names no single escrow: nothing can be attributed")
                return False
            self.escrow = named[0]
        elif self.escrow not in named:
            self.bad("job", "other_escrow", f"the job request does not name escrow {short(self.escrow)}")
            return False
        if not 5000 <= event.kind < 6000:
            self.bad("job", "not_a_job", f"event {short(event.id)} is kind {event.kind}, not a job request")
            return False
        try:
            check_singles(event.tags, SINGLE_TAGS)
            relay = next((t[2] for t in event.tags if t[0] == "escrow" and len(t) > 2), "")
            spec = read_job_spec(event.tags, self.escrow, relay)
            check_roles(spec, event.pubkey)
        except CodecError as e:
            self.bad("job", "invalid_job", f"the job request does not parse: {e.reason.value}: {e.message}")
            return False
        # parse_result reads no money: the split is the validation complete's, checked below.
        placeholder = MoneySplit(spec.bid_msat, 0, spec.validator_fee_msat, len(spec.validators), spec.bid_msat)
        self.job = JobRequest(event.id, event.pubkey, event.created_at, event.kind, spec, placeholder)
        v = spec.validation
        self.ok(
            "job",
            f"request parses: {len(spec.shards)} shard(s), {len(self.job.validators)} validator(s), quorum "
            f"{v.quorum}, {v.metric} {v.direction} {v.threshold}, payout {spec.payout}, bid {spec.bid_msat} msat",
        )
        return True

    def _sort(self, events: Iterable[Event]) -> list[Event]:
        """File every event under its role; returns the ones posing as the escrow's."""
        assert self.job is not None
        impostors: list[Event] = []
        rec = self.rec
        for event in events:
            if event.kind == KIND_FEEDBACK:
                self._feedback(event, impostors)
            elif event.kind == KIND_EVALUATION_REQUEST:
                try:
                    request = parse_evaluation_request(event)
                except CodecError as e:
                    if event.pubkey == self.escrow:
                        self.bad("candidates", "unparseable", f"evaluation request {short(event.id)}: {e}", event.id)
                    continue
                if request.job_id != self.job_id:
                    continue
                if event.pubkey != self.escrow:
                    impostors.append(event)
                elif request.round is EvalRound.FALLBACK:
                    rec.fallbacks.append((event, request))
                elif request.round is EvalRound.APPEAL:
                    rec.appeals.append((event, request))
                else:
                    rec.requests.append((event, request))
            elif event.kind == self.job.result_kind:
                rec.results[event.id] = event
            elif event.kind == KIND_EVALUATION_REQUEST + KIND_EVALUATION_RESULT_OFFSET:
                rec.evaluations[event.id] = event
            elif event.kind == KIND_ANNOUNCEMENT and event.pubkey == self.escrow:
                try:
                    rec.announcement = parse_announcement(event)  # oldest first: the newest stays
                except CodecError:
                    continue
        return impostors

    def _feedback(self, event: Event, impostors: list[Event]) -> None:
        try:
            body = parse_escrow_feedback(event)
        except CodecError as e:
            if event.pubkey == self.escrow and e.reason is not CodecErrorReason.UNSUPPORTED_FEEDBACK:
                info = next((t[2] for t in event.tags if t[0] == "status" and len(t) > 2), "")
                check = _CHECK_OF_INFO.get(info, "feedback")
                self.bad(check, "unparseable", f"escrow event {short(event.id)} does not parse: {e}", event.id)
            return  # a payee's invoice, or an unknown feedback: not the escrow's record
        if body.job_id != self.job_id:
            return
        if event.pubkey != self.escrow:
            if not isinstance(body, ErrorFeedback):
                impostors.append(event)
            return
        rec = self.rec
        match body:
            case EscrowOffer():
                rec.offers.append((event, body))
            case Funded():
                rec.funded.append((event, body))
            case ValidationComplete():
                rec.completes.append((event, body))
            case RewardPaid():
                rec.receipts.append((event, body))
            case ModelKey():
                rec.keys.append((event, body))
            case Refunded():
                rec.refunds.append((event, body))
            case ErrorFeedback():
                rec.errors.append((event, body))
            case _:  # reward claimable, claim expired, cancelled: nothing to check against
                pass

    # ---- the checks ------------------------------------------------------------------------
    def _checks(self) -> None:
        self._check_offer()
        self._check_funded()
        if not self._check_outcome():
            for check in ("candidates", "verdict", "split", "rewards"):
                self.na(check, "no validation complete")
        else:
            candidates = self._check_candidates()
            self._check_fallback(self._scored(candidates, self.first_complete))
            self._check_appeal(candidates)
            self._check_scores()
            split = self._check_split()
            if split is not None:
                self._check_verdicts(candidates, split)
            else:
                self.na("verdict", "no usable split: the decision cannot be recomputed")
                self.na("rewards", "no usable split")
        self._check_receipts()
        self._check_model_keys()
        self._check_refund()

    def _check_offer(self) -> None:
        assert self.job is not None
        bid = self.job.spec.bid_msat
        if not self.rec.offers:
            refused = self.rec.errors[0][1] if self.rec.errors else None
            if refused is not None:
                self.na("offer", f"the escrow refused the job: {refused.reason}")
            else:
                self.na("offer", "no offer published (yet)")
            return
        paid_hashes = {r.payment.payment_hash for _, r in self.rec.receipts}
        for event, offer in self.rec.offers:
            if offer.amount_msat != bid:
                self.bad("offer", "offer_amount", f"offer asks {offer.amount_msat} msat, the bid is {bid}", event.id)
            invoice, problem = decode_invoice(offer.bolt11)
            if invoice is None:
                self.bad(
                    "offer", "offer_bolt11_undecodable", f"the offer's invoice does not decode: {problem}", event.id
                )
                continue
            amount, payment_hash = invoice
            if amount != offer.amount_msat:
                self.bad(
                    "offer", "offer_bolt11_amount", f"the offer's invoice is for {amount} msat, not {offer.amount_msat}"
                )
            if payment_hash in paid_hashes:
                self.bad("offer", "offer_hash_reused", "a reward receipt pays the offer's own payment hash", event.id)
        if self._clean("offer"):
            self.ok("offer", f"asks the bid, {bid} msat; its invoice decodes to that amount")

    def _check_funded(self) -> None:
        assert self.job is not None
        bid = self.job.spec.bid_msat
        if not self.rec.funded:
            self.na("funded", "no funded event (not funded, or not yet)")
            return
        amounts = {f.amount_msat for _, f in self.rec.funded}
        if len(amounts) > 1:
            self.bad("funded", "funded_twice", f"funded events disagree: {sorted(amounts)} msat")
        amount = self.funded_msat
        assert amount is not None
        if amount < bid:
            self.bad("funded", "underfunded", f"funded {amount} msat, less than the bid {bid}")
        elif self._clean("funded"):
            extra = f" ({amount - bid} msat beyond it goes back)" if amount > bid else ""
            self.ok("funded", f"{amount} msat, the bid{extra}")

    @property
    def funded_msat(self) -> int | None:
        return self.rec.funded[0][1].amount_msat if self.rec.funded else None

    def _check_outcome(self) -> bool:
        completes = self.rec.completes
        refunds = self.rec.refunds
        distinct = list({tuple(e.tags): c for e, c in completes}.values())
        appeal = self.appeal
        finals = [c for c in distinct if appeal is not None and _scored_by(c, appeal.validators)]
        if appeal is not None and len(distinct) == 2 and len(finals) == 1:
            # An appeal ran: the first decision, and the final one from the appeal round's scores.
            self.first_complete = next(c for c in distinct if c is not finals[0])
            self.complete = finals[0]
            accepted = sum(v.accepted for v in self.complete.verdicts)
            self.ok(
                "outcome",
                f"appealed: the final validation complete accepts {accepted} of {len(self.complete.verdicts)} "
                "result(s)" + (f"; refunded ({refunds[0][1].reason})" if refunds else ""),
            )
            return True
        if len(distinct) > 1:
            self.bad("outcome", "two_decisions", f"{len(completes)} different validation completes: the first is read")
        if completes:
            self.complete = self.first_complete = completes[0][1]
            accepted = sum(v.accepted for v in self.complete.verdicts)
            self.ok(
                "outcome",
                f"validation complete: {accepted} of {len(self.complete.verdicts)} result(s) accepted"
                + (f"; refunded ({refunds[0][1].reason})" if refunds else ""),
            )
            return True
        if refunds:
            self.ok("outcome", f"refunded ({refunds[0][1].reason}) without a validation complete")
        else:
            self.na("outcome", "no decision published yet (no validation complete, no refund)")
        return False

    def _check_candidates(self) -> list[Scored]:
        """The candidates in receipt order, with their published scores."""
        assert self.job is not None and self.complete is not None
        verdict_ids = [v.result_id for v in self.complete.verdicts]
        if self.rec.requests:
            request = self.rec.requests[0][1]
            if len({r.candidates for _, r in self.rec.requests}) > 1:
                self.bad("candidates", "two_requests", "evaluation requests with different candidates")
            order = [c.result_id for c in request.candidates]
            missing, extra = set(order) - set(verdict_ids), set(verdict_ids) - set(order)
            if missing or extra:
                self.bad(
                    "candidates",
                    "verdicts_mismatch_candidates",
                    f"verdicts for {len(extra)} non-candidate(s), none for {len(missing)} candidate(s)",
                )
            if set(request.validators) != set(self.job.validators):
                self.bad("candidates", "wrong_validators", "the evaluation request names other validators")
            order += [i for i in verdict_ids if i not in order]
        else:
            self.warn("candidates", "no_evaluation_request", "no evaluation request found: the verdicts' order is used")
            order = verdict_ids
        providers: dict[str, str] = {}
        models: dict[str, str] = {}
        missing_events = 0
        for result_id in order:
            event = self.rec.results.get(result_id)
            if event is None:
                missing_events += 1
                continue
            try:
                result = parse_result(event, self.job)
            except CodecError as e:
                self.bad("candidates", "invalid_result", f"candidate {short(result_id)} is not a valid result: {e}")
                continue
            self._check_unique(result, providers, models)
        if missing_events:
            self.warn("candidates", "result_not_found", f"{missing_events} candidate result event(s) not on the relays")
        if self._clean("candidates"):
            self.ok("candidates", f"{len(order)} candidate(s), one verdict each, distinct providers and models")
        scores: dict[str, dict[str, Decimal | None]] = {i: {} for i in order}
        for s in self.complete.scores:
            scores.setdefault(s.result_id, {})[s.validator] = s.value
        return [Scored(i, providers.get(i, ""), scores[i]) for i in order]

    @property
    def fallback(self) -> EvaluationRequest | None:
        return self.rec.fallbacks[0][1] if self.rec.fallbacks else None

    @property
    def appeal(self) -> EvaluationRequest | None:
        return self.rec.appeals[0][1] if self.rec.appeals else None

    @property
    def appealed(self) -> bool:
        """Whether the final decision is an appeal round's (its validation complete is not the first)."""
        return self.complete is not None and self.complete is not self.first_complete

    @property
    def validators(self) -> tuple[str, ...]:
        """Whose scores may count: the named validators, then the fallback round's (as the escrow orders
        them); after an appeal, the appeal round's."""
        assert self.job is not None
        if self.appealed and self.appeal is not None:
            return self.appeal.validators
        fallback = self.fallback
        return (*self.job.validators, *(fallback.validators if fallback is not None else ()))

    def _scored(self, candidates: list[Scored], complete: ValidationComplete | None) -> list[Scored]:
        """The candidates with ``complete``'s scores (the first decision's, after an appeal)."""
        if complete is None or complete is self.complete:
            return candidates
        scores: dict[str, dict[str, Decimal | None]] = {c.result_id: {} for c in candidates}
        for x in complete.scores:
            scores.setdefault(x.result_id, {})[x.validator] = x.value
        return [Scored(c.result_id, c.provider, scores.get(c.result_id, {})) for c in candidates]

    def _check_appeal(self, candidates: list[Scored]) -> None:
        """The appeal round is the escrow's rule (docs/escrow.md "Appeals"): after the first request,
        at most the job's quorum of pool keys that are none of the job's own people nor a fallback
        validator, for every candidate."""
        assert self.job is not None
        if not self.rec.appeals:
            self.na("appeal", "no appeal round")
            return
        if len(self.rec.appeals) > 1:
            self.bad("appeal", "two_appeals", "more than one appeal evaluation request")
        event, appeal = self.rec.appeals[0]
        first = self.rec.requests[0][0] if self.rec.requests else None
        if first is None or appeal.previous != first.id:
            self.bad("appeal", "wrong_previous", "the appeal request does not follow the first request", event.id)
        fallback = self.fallback
        barred = {
            self.job.customer,
            *self.job.validators,
            *(c.provider for c in candidates if c.provider),
            *(fallback.validators if fallback is not None else ()),
        }
        if barred & set(appeal.validators):
            self.bad(
                "appeal",
                "barred_validator",
                "the appeal round asks the customer, a provider, a named or a fallback validator",
            )
        if len(appeal.validators) > self.job.spec.validation.quorum:
            self.bad("appeal", "too_many_appeal_validators", "more appeal validators than the job's quorum")
        if {c.result_id for c in appeal.candidates} != {c.result_id for c in candidates}:
            self.bad("appeal", "wrong_candidates", "the appeal round does not score every candidate")
        announcement = self.rec.announcement
        if announcement is not None and not set(appeal.validators) <= {v.pubkey for v in announcement.validator_pool}:
            self.warn("appeal", "not_in_pool", "an appeal validator is not in the announced pool (it may have changed)")
        if self._clean("appeal"):
            final = "its verdict is final" if self.appealed else "no final decision from it (the first one stands)"
            self.ok("appeal", f"appeal round: {len(appeal.validators)} pool validator(s), every candidate; {final}")

    def _check_fallback(self, candidates: list[Scored]) -> None:
        """The fallback round is the escrow's rule (docs/escrow.md): after the first request, pool
        keys that are none of the job's own people, one per named validator who scored nothing,
        for the candidates the first round left short of quorum."""
        assert self.job is not None and self.complete is not None
        if not self.rec.fallbacks:
            self.na("fallback", "no fallback round")
            return
        if len(self.rec.fallbacks) > 1:
            self.bad("fallback", "two_fallbacks", "more than one fallback evaluation request")
        event, fallback = self.rec.fallbacks[0]
        first = self.rec.requests[0][0] if self.rec.requests else None
        if first is None or fallback.previous != first.id:
            self.bad("fallback", "wrong_previous", "the fallback request does not follow the first request", event.id)
        named = set(self.job.validators)
        barred = {self.job.customer, *named, *(c.provider for c in candidates if c.provider)}
        if barred & set(fallback.validators):
            self.bad(
                "fallback", "barred_validator", "the fallback round asks the customer, a provider or a named validator"
            )
        announcement = self.rec.announcement
        if announcement is not None and not set(fallback.validators) <= {v.pubkey for v in announcement.validator_pool}:
            self.warn(
                "fallback", "not_in_pool", "a fallback validator is not in the announced pool (it may have changed)"
            )
        counted = {v for c in candidates for v, value in c.scores.items() if v in named}
        no_shows = [v for v in self.job.validators if v not in counted]
        if len(fallback.validators) > len(no_shows):
            self.bad(
                "fallback",
                "too_many_fallback_validators",
                "more fallback validators than named validators who did not score",
            )
        quorum = self.job.spec.validation.quorum
        short_ = {c.result_id for c in candidates if sum(v in named for v in c.scores) < quorum}
        if {c.result_id for c in fallback.candidates} != short_:
            self.bad("fallback", "wrong_candidates", "the fallback round's candidates are not the ones short of quorum")
        if self._clean("fallback"):
            self.ok(
                "fallback",
                f"fallback round: {len(fallback.validators)} pool validator(s) for {len(no_shows)} named no-show(s), "
                f"{len(short_)} candidate(s) short of quorum",
            )

    def _check_unique(self, result: JobResult, providers: dict[str, str], models: dict[str, str]) -> None:
        if result.provider in providers.values():
            self.bad("candidates", "provider_twice", f"provider {short(result.provider)} has two candidates")
        if result.model_sha256 in models.values():
            self.bad("candidates", "copied_model", f"candidate {short(result.id)} has another candidate's model")
        providers[result.id] = result.provider
        models[result.id] = result.model_sha256

    def _check_scores(self) -> None:
        assert self.job is not None and self.complete is not None
        fallback = self.fallback
        round_two = set(fallback.validators) if fallback is not None else set()
        asked = {c.result_id for c in fallback.candidates} if fallback is not None else set()
        if self.appealed and self.appeal is not None:  # the final decision counts the appeal round's alone
            strangers = [s for s in self.complete.scores if s.validator not in self.appeal.validators]
        else:
            strangers = [
                s
                for s in self.complete.scores
                if s.validator not in self.job.validators and not (s.validator in round_two and s.result_id in asked)
            ]
        for s in strangers:
            self.bad(
                "scores",
                "score_not_by_validator",
                f"a score of {short(s.result_id)} by {short(s.validator)}, not a designated validator",
                s.result_id,
            )
        if not strangers:
            unreadable = sum(s.value is None for s in self.complete.scores)
            note = f" ({unreadable} unreadable)" if unreadable else ""
            self.ok("scores", f"{len(self.complete.scores)} published score(s){note}, all by designated validators")

    def _check_split(self) -> MoneySplit | None:
        assert self.job is not None and self.complete is not None
        spec, split = self.job.spec, self.complete.split
        if split is None:
            self.bad("split", "no_split", "the validation complete publishes no split (protocol.md §6)")
            self.na("terms", "no split to compare")
            return None
        if split.fee_msat + split.validator_fees_msat + split.provider_share_msat != split.bid_msat:
            self.bad("split", "split_does_not_add_up", "fee + validator fees + provider share is not the bid")
        wrong = [
            f"{what} {got} (the job says {want})"
            for what, got, want in (
                ("bid", split.bid_msat, spec.bid_msat),
                ("validator fee", split.validator_fee_msat, spec.validator_fee_msat),
                ("validators", split.validator_count, len(spec.validators)),
            )
            if got != want
        ]
        if wrong:
            self.bad("split", "split_mismatch", "the split says " + ", ".join(wrong))
        if self._clean("split"):
            self.ok(
                "split",
                f"bid {split.bid_msat} = fee {split.fee_msat} + {split.validator_count} × {split.validator_fee_msat} "
                f"+ provider share {split.provider_share_msat} msat",
            )
        announcement = self.rec.announcement
        if announcement is None:
            self.na("terms", "no announcement (kind 31990) found to compare the fee with")
        else:
            terms = announcement.terms
            fee = terms.fee_base_msat + split.bid_msat * terms.fee_ppm // 1_000_000
            if fee != split.fee_msat:
                self.warn(
                    "terms",
                    "fee_differs_from_terms",
                    f"fee {split.fee_msat} msat; the current terms ({terms.fee_base_msat} msat + {terms.fee_ppm} ppm) "
                    f"give {fee} (terms may have changed since the job)",
                )
            else:
                self.ok("terms", f"fee {fee} msat = {terms.fee_base_msat} msat + {terms.fee_ppm} ppm of the bid")
        return split if self._clean("split") else None

    def _check_verdicts(self, candidates: list[Scored], split: MoneySplit) -> None:
        assert self.job is not None and self.complete is not None
        spec = self.job.spec
        try:
            kept = None
            if self.appealed and self.first_complete is not None:  # the first decision's validator fees are kept
                first = recompute(
                    self._scored(candidates, self.first_complete),
                    validation=spec.validation,
                    policy=str(spec.payout),
                    split=split,
                    validators=(*self.job.validators, *(self.fallback.validators if self.fallback else ())),
                    baseline=spec.baseline,
                    baseline_scores={
                        s.validator: s.value for s in self.first_complete.scores if s.result_id == BASELINE
                    },
                )
                kept = dict(first.decision.validator_fees)
            decided = recompute(
                candidates,
                validation=spec.validation,
                policy=str(spec.payout),
                split=split,
                validators=self.validators,
                baseline=spec.baseline,
                baseline_scores={s.validator: s.value for s in self.complete.scores if s.result_id == BASELINE},
                kept_validator_fees=kept,
            )
        except (ValueError, AssertionError) as e:
            self.bad("verdict", "undecidable", f"the published scores and split make no decision: {e}")
            self.na("rewards", "no recomputed decision")
            return
        self.decided = decided
        for published in self.complete.verdicts:
            expected = decided.verdict(published.result_id)
            if expected is None:
                continue  # not a candidate: reported by the candidates check
            want = _outcome(expected.accepted, expected.median, published.result_id in decided.unreadable)
            got = _outcome(published.accepted, published.median, published.unreadable)
            if want == got and expected.median == published.median:  # medians compare as exact values
                continue
            # The same outcome with another median is a wrong median; anything else a wrong verdict.
            code = "median_mismatch" if want == got else "verdict_mismatch"
            self.bad(
                "verdict",
                code,
                f"{short(published.result_id)}: published {_said(got, published.median)}, "
                f"recomputed {_said(want, expected.median)}",
                published.result_id,
            )
        if self._clean("verdict"):
            v = spec.validation
            self.ok(
                "verdict",
                f"{len(self.complete.verdicts)} verdict(s) recomputed from {len(self.complete.scores)} score(s) "
                f"(quorum {v.quorum}, median {'≥' if str(v.direction) == 'max' else '≤'} {v.threshold}, "
                f"{spec.payout}): all match",
            )
        self._check_rewards(decided)

    def _check_rewards(self, decided: Recomputed) -> None:
        assert self.complete is not None
        decision = decided.decision
        unstated = 0
        for published in self.complete.verdicts:
            expected = decided.verdict(published.result_id)
            if expected is None or not published.accepted:
                continue
            if published.reward_msat is None:
                unstated += 1
            elif published.reward_msat != expected.reward_msat:
                self.bad(
                    "rewards",
                    "reward_mismatch",
                    f"{short(published.result_id)}: published reward {published.reward_msat} msat, "
                    f"the split rule gives {expected.reward_msat}",
                    published.result_id,
                )
        if self._clean("rewards"):
            paid = sorted(decision.provider_rewards.values())
            fees = sorted(decision.validator_fees.values())
            note = f"; {unstated} reward(s) not stated" if unstated else ""
            self.ok(
                "rewards",
                f"providers {paid or [0]} msat, validator fees {fees or [0]} msat, escrow keeps "
                f"{decision.fee_income_msat} msat ({decision.remainder_msat} of it rounding){note}",
            )

    def _check_receipts(self) -> None:
        receipts = self.rec.receipts
        if not receipts:
            self.na("receipt", "no reward paid yet")
            return
        decision = self.decided.decision if self.decided is not None else None
        seen: dict[str, str] = {}  # payee -> payment hash
        for event, paid in receipts:
            n = len(self.findings)
            self._check_invoice(event, paid)
            if self.complete is None:
                self.bad("receipt", "receipt_without_decision", f"{short(event.id)}: a reward paid before any decision")
            elif decision is not None:
                self._check_earned(event, paid, decision)
            previous = seen.setdefault(paid.payee, paid.payment.payment_hash)
            if previous != paid.payment.payment_hash:
                self.bad("receipt", "paid_twice", f"payee {short(paid.payee)} paid twice on one job", event.id)
            if len(self.findings) == n:
                self.ok(
                    "receipt", f"{short(event.id)}: {paid.payment.amount_msat} msat to {short(paid.payee)} checks out"
                )

    def _check_invoice(self, event: Event, paid: RewardPaid) -> None:
        """The preimage was checked by the codec (``invalid_payment``); the invoice is checked here."""
        proof = paid.payment
        if paid.bolt11 is None:
            self.bad("receipt", "no_bolt11", f"{short(event.id)}: the receipt names no invoice", event.id)
            return
        invoice, problem = decode_invoice(paid.bolt11)
        if invoice is None:
            self.bad("receipt", "bolt11_undecodable", f"{short(event.id)}: its invoice does not decode: {problem}")
            return
        amount, payment_hash = invoice
        if payment_hash != proof.payment_hash:
            self.bad(
                "receipt",
                "bolt11_hash_mismatch",
                f"{short(event.id)}: the invoice's payment hash {short(payment_hash)} is not the receipt's "
                f"{short(proof.payment_hash)}",
                event.id,
            )
        if amount != proof.amount_msat:
            self.bad(
                "receipt",
                "bolt11_amount_mismatch",
                f"{short(event.id)}: the invoice is for {amount} msat, the receipt says {proof.amount_msat}",
                event.id,
            )

    def _check_earned(self, event: Event, paid: RewardPaid, decision: rule.Decision) -> None:
        """The reward a receipt pays: a provider's (its result's verdict) or a validator's fee."""
        assert self.decided is not None
        amount = paid.payment.amount_msat
        verdict = self.decided.verdict(paid.earned_by)
        if verdict is not None:
            result = self.rec.results.get(paid.earned_by)
            if not verdict.accepted:
                self.bad("receipt", "receipt_for_rejected", f"{short(event.id)}: pays rejected result", event.id)
            elif verdict.reward_msat == 0:
                self.bad(
                    "receipt", "receipt_without_reward", f"{short(event.id)}: pays a result that earns 0", event.id
                )
            elif amount != verdict.reward_msat:
                self.bad(
                    "receipt",
                    "amount_mismatch",
                    f"{short(event.id)}: pays {amount} msat, the result's reward is {verdict.reward_msat}",
                    event.id,
                )
            if result is not None and result.pubkey != paid.payee:
                self.bad("receipt", "wrong_payee", f"{short(event.id)}: pays {short(paid.payee)}, not the provider")
            return
        fee = decision.validator_fees.get(paid.payee)
        evaluation = self.rec.evaluations.get(paid.earned_by)
        appeal = self.appeal
        if fee is None and self.appealed and appeal is not None and paid.payee in appeal.validators:
            # An appeal validator: paid at most the job's validator fee, from the appeal fee or the
            # escrow's income on the job (rule.appeal_money; the fee's amount is not in the decision).
            if self.complete is not None and self.complete.split is not None:
                fee = min(amount, whole_sats(self.complete.split.validator_fee_msat))
        if fee is None:
            self.bad(
                "receipt",
                "unknown_reward",
                f"{short(event.id)}: pays {short(paid.payee)}, neither a candidate's provider nor a validator "
                "whose scores counted",
                event.id,
            )
        elif amount != fee:
            self.bad("receipt", "amount_mismatch", f"{short(event.id)}: pays {amount} msat, the validator fee is {fee}")
        if evaluation is not None and evaluation.pubkey != paid.payee:
            self.bad("receipt", "wrong_payee", f"{short(event.id)}: pays {short(paid.payee)}, not the scores' author")

    def _check_model_keys(self) -> None:
        assert self.job is not None
        if not self.rec.keys:
            self.na("model key", "no model key released")
            return
        for event, key in self.rec.keys:
            n = len(self.findings)
            if key.customer != self.job.customer:
                self.bad("model key", "wrong_customer", f"{short(event.id)}: a key for someone else", event.id)
            if self.complete is None:
                self.bad("model key", "key_without_decision", f"{short(event.id)}: released before any decision")
            elif self.decided is not None:
                verdict = self.decided.verdict(key.result_id)
                if verdict is None:
                    self.bad("model key", "key_for_unknown", f"{short(event.id)}: for a non-candidate", event.id)
                elif not verdict.accepted:
                    self.bad(
                        "model key",
                        "key_for_rejected",
                        f"{short(event.id)}: the key of rejected result {short(key.result_id)}",
                        event.id,
                    )
                elif verdict.reward_msat == 0:
                    self.bad("model key", "key_without_reward", f"{short(event.id)}: the key of a result earning 0")
            if len(self.findings) == n:
                self.ok("model key", f"{short(event.id)}: for {short(key.result_id)}, a result paid a reward")

    def _check_refund(self) -> None:
        refunds = self.rec.refunds
        if not refunds:
            self.na("refund", "no refund")
            return
        total = sum(r.amount_msat for _, r in refunds)
        funded = self.funded_msat
        reasons = ", ".join(sorted({r.reason for _, r in refunds}))
        if funded is not None and total > funded:
            self.bad("refund", "refund_exceeds_funding", f"refunded {total} msat of {funded} funded")
        appeal = self.appeal
        paid_by_appeal = set(appeal.validators) if appeal is not None and self.appealed else set()
        # (an appeal validator paid from a lost appeal's fee is no release of the job's money)
        receipts = [r for _, r in self.rec.receipts if r.payee not in paid_by_appeal]
        released = (len(receipts), len(self.rec.keys))
        if any(released):
            self.bad(
                "refund",
                "refund_and_release",
                f"refunded {total} msat ({reasons}) yet paid {released[0]} reward(s) and released {released[1]} "
                "model key(s)",
            )
        if self.decided is not None and self.decided.decision.accepted:
            self.warn("refund", "refund_despite_accepted", f"refunded ({reasons}) although results were accepted")
        if self._clean("refund"):
            of = f" of {funded} funded" if funded is not None else ""
            self.ok("refund", f"{total} msat{of} ({reasons}); nothing paid or released")


def _outcome(accepted: bool, median: Decimal | None, unreadable: bool) -> str:
    if accepted:
        return "accepted"
    return "unreadable" if unreadable else "no-quorum" if median is None else "rejected"


def _said(outcome: str, median: Decimal | None) -> str:
    return f"{outcome} (median {median})" if median is not None else outcome


def decode_invoice(text: str) -> tuple[tuple[int | None, str] | None, str]:
    """``((amount msat or None, payment hash hex), "")``, or ``(None, why)`` when it does not decode."""
    try:
        invoice = bolt11.decode(text)
    except Exception as e:  # noqa: BLE001 - the decoder raises many types on hostile input
        return None, type(e).__name__
    amount = None if invoice.amount_msat is None else int(invoice.amount_msat)
    return (amount, str(invoice.payment_hash)), ""


def audit_events(
    job_id: str,
    events: Iterable[Event | Mapping[str, Any]],
    *,
    escrow: str | None = None,
    relays: tuple[str, ...] = (),
) -> AuditReport:
    """Audit job ``job_id`` from its public events (any order, duplicates allowed).

    ``escrow``: the escrow's key, when the caller knows it (else the job's ``escrow`` tag).
    Raises :class:`AuditFetchError` when the job request is not among the events.
    """
    audit = _Audit(job_id, escrow)
    count = audit.run(events)
    return AuditReport(job_id, audit.escrow, tuple(audit.findings), count, relays)


def _scored_by(complete: ValidationComplete, validators: tuple[str, ...]) -> bool:
    """Whether every score ``complete`` publishes is by ``validators`` (and it has one)."""
    return bool(complete.scores) and all(x.validator in validators for x in complete.scores)
