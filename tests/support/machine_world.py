"""A pure model of one job and everything around it, for driving ``service.escrow.machine``.

``World`` holds the machine's :class:`JobView` and what is true outside it: the escrow
invoice in LND, the payout rows (as the payout package would write them), the ledger's
balances and the clock. :func:`after` applies a plan the way ``Engine.apply`` does (a second,
in-memory implementation: ``tests/unit/test_machine_vs_engine.py`` checks that they agree).
:func:`actions` lists what can happen next (the facts the world can produce now), and
:func:`violations` the invariants that fail.

Provider 0's results are sealed (protocol.md §5a: its key for the customer is published as a
model key event only once it is paid from settled money), and a validator that scores "bad"
finds a sealed model unreadable, so the worlds cover key release and unreadable verdicts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from decimal import Decimal

from service.escrow import machine
from service.escrow.machine import (
    EffectKind,
    Fact,
    Funds,
    JobState,
    JobView,
    MachineConfig,
    PayoutView,
    Plan,
    ResultView,
)
from service.ledger import accounts, postings
from service.nostr.nip01 import SecretKey, sign_event
from service.nostr.protocol import (
    Baseline,
    Direction,
    EscrowTerms,
    JobSpec,
    Mode,
    Network,
    PayoutPolicy,
    Shard,
    Validation,
    build_job_request,
    parse_job_request,
    parse_model_key,
)
from service.nostr.protocol.feedback import INFO_MODEL_KEY
from service.nostr.protocol.fields import placeholder_event
from service.nostr.protocol.sealing import key_sha256, wrap_key
from service.payouts.types import Destination, DestinationKind, PayoutKind, PayoutState

S = JobState
T0 = 1_900_000_000
FAKE_BOLT11 = "lnbcrt1" + "qpzry9x8gf2tvdw0s3jn54khce6mua7l" * 4  # shaped like an invoice; never paid
TERMS = EscrowTerms(
    fee_base_msat=1_000,
    fee_ppm=10_000,
    min_bid_msat=10_000,
    max_bid_msat=10_000_000_000,
    max_validators=5,
    max_shards=8,
    min_results_window_s=0,
    max_job_duration_s=30 * 86_400,
    modes=frozenset({Mode.HOLD, Mode.CUSTODIAL}),
    network=Network.REGTEST,
    max_hold_seconds=86_400,
    min_payout_msat=1_000,
    max_results_per_shard=2,
    routing_fee_ppm=5_000,
)
CONFIG = MachineConfig(terms=TERMS)
#: Payouts waiting for an invoice expire after 1000 s (the payee reminded 100 s before).
CLAIMS = MachineConfig(terms=replace(TERMS, claim_window_s=1_000), claim_reminder_seconds=100)
#: A routing reserve as large as the payment: a refund would give back nothing.
DUST = MachineConfig(terms=replace(TERMS, routing_fee_ppm=1_000_000))
ESCROW = SecretKey(hashlib.sha256(b"machine escrow").digest())
CUSTOMER = SecretKey(hashlib.sha256(b"machine customer").digest())
STRANGER = SecretKey(hashlib.sha256(b"machine stranger").digest()).public_key_hex
PROVIDERS = [SecretKey(hashlib.sha256(f"machine provider {i}".encode()).digest()).public_key_hex for i in range(3)]
VALIDATORS = [SecretKey(hashlib.sha256(f"machine validator {i}".encode()).digest()).public_key_hex for i in range(2)]
SEALED_PROVIDER = 0  # this provider's results are sealed
#: The escrow's announced validator pool (a fallback round's validators come from it; VALIDATORS[0]
#: is in it too, and is never picked for a job that names it).
POOL = [SecretKey(hashlib.sha256(f"machine pool {i}".encode()).digest()).public_key_hex for i in range(2)]
POOL_CONFIG = MachineConfig(terms=TERMS, validator_pool=(VALIDATORS[0], *POOL), fallback_round_seconds=100)
#: Appeals: a 50 s window and a 5-sat fee, an appeal round of 100 s from the pool (APPEALS), or with
#: no pool key eligible (APPEALS_NO_POOL: a paid appeal cannot run).
APPEAL_TERMS = replace(TERMS, appeal_window_s=50, appeal_fee_msat=5_000)
APPEALS = replace(POOL_CONFIG, terms=APPEAL_TERMS, appeal_round_seconds=100)
APPEALS_NO_POOL = MachineConfig(terms=APPEAL_TERMS)
OUTAGE_SECONDS = 50  # an outage across a deadline moves it by this much
CONTENT_KEY = hashlib.sha256(b"machine content key").digest()
#: Its content key for the customer, as the engine re-encrypts it at intake (escrow -> customer).
CUSTOMER_KEY = wrap_key(ESCROW, CUSTOMER.public_key_hex, CONTENT_KEY, nonce=bytes(32)).payload


def request(
    *,
    shards: int,
    validators: int,
    mode: Mode,
    policy: str = "best",
    bid: int = 1_000_000,
    validator_fee: int = 1_000,
    refund: str | None = "refund@wallet.example",
    validation_in: int = 200,
    quorum: int | None = None,
    baseline: Baseline | None = None,
) -> machine.RequestAccepted:
    spec = JobSpec(
        escrow=ESCROW.public_key_hex,
        bid_msat=bid,
        shards=tuple(Shard(index=k, url=f"https://d.example/{k}") for k in range(shards)),
        validation=Validation("accuracy", Direction.MAX, Decimal("0.5"), quorum or validators),
        payout=PayoutPolicy(policy),
        results_deadline=T0 + 100,
        validation_deadline=T0 + validation_in,
        validators=tuple(VALIDATORS[:validators]),
        validator_fee_msat=validator_fee,
        mode=mode,
        refund=refund,
        baseline=baseline,
    )
    ev = sign_event(CUSTOMER, *build_job_request(spec, customer=CUSTOMER.public_key_hex), created_at=T0)
    # (the codec's own hold-window check is skipped: the machine's mode rule is what is tested)
    req = parse_job_request(
        ev, escrow_pubkey=ESCROW.public_key_hex, terms=replace(TERMS, max_hold_seconds=10**7), now=T0
    )
    return machine.RequestAccepted(req, ev)


Balances = tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class World:
    view: JobView
    request: machine.RequestAccepted
    config: MachineConfig = CONFIG
    now: int = T0
    invoice: str = "none"  # none | open | accepted | settled | canceled (LND's view)
    paid_msat: int = 0  # what the customer paid into our node (settled)
    fee_paid_msat: int = 0  # what an appellant paid into our node (the appeal fee)
    overpay_msat: int = 0  # paid beyond the invoice (LND accepts up to twice)
    payouts: tuple[PayoutView, ...] = ()
    balances: Balances = ()  # the ledger, per account
    sent_msat: int = 0  # succeeded payouts, amounts
    fees_msat: int = 0  # and their routing fees
    effects: tuple[EffectKind, ...] = ()
    published: int = 0
    keys: tuple[str, ...] = ()  # the results whose model key was published, in order
    outages: int = 0  # how many escrow outages across a deadline may still happen (DeadlineExtended)
    claims: int = 0  # how many claim expiries and operator's reopens may still happen
    reminded: frozenset[str] = frozenset()  # "<payout>:<round>" reminded (the engine's once per window)
    last: Fact | None = field(default=None, compare=False)
    problems: tuple[str, ...] = ()

    def balance(self, account: str) -> int:
        return dict(self.balances).get(account, 0)


def start(
    req: machine.RequestAccepted,
    *,
    overpay: int = 0,
    config: MachineConfig = CONFIG,
    outages: int = 0,
    claims: int = 0,
) -> World:
    return World(
        view=JobView(id=req.request.id),
        request=req,
        overpay_msat=overpay,
        config=config,
        outages=outages,
        claims=claims,
    )


def _ledger_view(bal: dict[str, int], job_id: str) -> tuple[int, int]:
    held = -bal.get(accounts.escrow(job_id), 0)
    owed = -sum(v for k, v in bal.items() if k.startswith("liability:") and k != accounts.escrow(job_id))
    return held, owed


def after(w: World, plan: Plan, fact: Fact) -> World:
    """``w`` once ``plan`` is applied (as Engine.apply does) and ``fact`` recorded as the last."""
    v = w.view
    problems = list(w.problems)
    bal = dict(w.balances)
    posted = set(v.posted)
    for p in plan.postings:
        if sum(a for _, a in p.lines) != 0:
            problems.append(f"unbalanced posting {p.key}")
        if p.key in posted:
            problems.append(f"posted twice: {p.key}")
        posted.add(p.key)
        for account, amount in p.lines:
            bal[account] = bal.get(account, 0) + amount
    rows = list(w.payouts)
    for np in plan.payouts:
        if any(x.id == np.id for x in rows):
            problems.append(f"payout {np.id} created twice")
            continue
        rows.append(
            PayoutView(
                np.id,
                np.kind,
                np.payee,
                np.amount_msat,
                PayoutState.NEEDS_INVOICE if np.destination.kind is DestinationKind.NONE else PayoutState.PENDING,
                np.destination.kind,
                earned_by=np.earned_by,
                claim_by=np.claim_by,
            )
        )
    results = v.results + tuple(r for r, _, _ in plan.results)
    keys = _model_keys(plan)
    if keys != plan.keys_released:
        problems.append(f"model keys published {keys} != released {plan.keys_released}")
    held, owed = _ledger_view(bal, v.id)
    new_view = replace(
        v,
        state=plan.state,
        version=v.version + 1 if (plan.writes or plan.state is not v.state) else v.version,
        customer=plan.new_job.customer if plan.new_job else v.customer,
        request=plan.new_job.request if plan.new_job else v.request,
        mode=plan.new_job.mode if plan.new_job else v.mode,
        funds=plan.funds if plan.funds is not None else v.funds,
        offer_expires_at=plan.offer_expires_at if plan.offer_expires_at is not None else v.offer_expires_at,
        results_extended_to=plan.results_extended_to if plan.results_extended_to is not None else v.results_extended_to,
        validation_extended_to=(
            plan.validation_extended_to if plan.validation_extended_to is not None else v.validation_extended_to
        ),
        deadlines_extended_at=(
            plan.deadlines_extended_at if plan.deadlines_extended_at is not None else v.deadlines_extended_at
        ),
        fallback_deadline=plan.fallback_deadline if plan.fallback_deadline is not None else v.fallback_deadline,
        fallback_validators=(
            plan.fallback_validators if plan.fallback_validators is not None else v.fallback_validators
        ),
        fallback_request_id=(
            hashlib.sha256(f"fallback {v.id}".encode()).hexdigest()
            if any(o.role is machine.EventRole.FALLBACK_REQUEST for o in plan.events)
            else v.fallback_request_id
        ),
        appeal_deadline=plan.appeal_deadline if plan.appeal_deadline is not None else v.appeal_deadline,
        appeal=_appeal_after(v, plan),
        refund_reason=plan.refund_reason if plan.refund_reason is not None else v.refund_reason,
        decision=plan.decision if plan.decision is not None else v.decision,
        eval_request_id=hashlib.sha256(f"eval {v.id}".encode()).hexdigest()
        if any(o.is_eval_request for o in plan.events)
        else v.eval_request_id,
        results=results,
        scores=v.scores + plan.scores,
        payouts=tuple(rows),
        held_msat=held,
        owed_msat=owed,
        posted=frozenset(posted),
    )
    effects = tuple(e for e in w.effects) + tuple(e for e in plan.effects if e not in w.effects)
    return replace(
        w,
        view=new_view,
        payouts=tuple(rows),
        balances=tuple(sorted(bal.items())),
        effects=effects,
        published=w.published + len(plan.events),
        keys=w.keys + keys,
        last=fact,
        problems=tuple(problems),
    )


def _appeal_after(v: JobView, plan: Plan) -> machine.AppealView | None:
    """The job's appeal once ``plan`` applies (the engine stamps the appeal request's id)."""
    if plan.appeal is None:
        return v.appeal
    if any(o.role is machine.EventRole.APPEAL_REQUEST for o in plan.events):
        return replace(plan.appeal, request_id=hashlib.sha256(f"appeal {v.id}".encode()).hexdigest())
    return plan.appeal


def _model_keys(plan: Plan) -> tuple[str, ...]:
    """The results whose model key event ``plan`` publishes (read back with the codec's parser)."""
    out = []
    for o in plan.events:
        if any(t[:3] == ("status", "success", INFO_MODEL_KEY) for t in o.template.tags):
            out.append(parse_model_key(placeholder_event(o.template)).result_id)
    return tuple(out)


def step(w: World, fact: Fact, **world_changes: object) -> World:
    """The machine steps ``fact`` at the world's clock; the world changes as given, then the plan applies."""
    w = replace(w, **world_changes)  # type: ignore[arg-type]
    plan = machine.step(w.view, fact, w.now, w.config)
    return after(w, plan, fact)


# ---------------------------------------------------------------------------- what can happen next


def _funding_hash(job_id: str) -> str:
    return hashlib.sha256(f"funding {job_id}".encode()).hexdigest()


def _model(provider: int, shard: int) -> str:
    return hashlib.sha256(f"model {provider} {shard}".encode()).hexdigest()


def _result(w: World, provider: int, shard: int, copy_of: int | None = None) -> machine.ResultReceived:
    sha = _model(copy_of if copy_of is not None else provider, shard)
    rid = hashlib.sha256(f"result {provider} {shard} {copy_of}".encode()).hexdigest()
    invoice = (FAKE_BOLT11, w.view.bid_msat) if provider == 2 else (None, None)
    payout_to = (
        Destination(DestinationKind.LUD16, f"p{provider}@wallet.example") if provider == 1 else Destination.none()
    )
    r = ResultView(rid, PROVIDERS[provider], shard, sha, payout_to, invoice[0], invoice[1], f"https://m/{sha}")
    if provider == SEALED_PROVIDER:
        r = replace(
            r,
            ciphertext_sha256=hashlib.sha256(f"ciphertext {sha}".encode()).hexdigest(),
            key_sha256=key_sha256(CONTENT_KEY),
            customer_key=CUSTOMER_KEY,
        )
    return machine.ResultReceived(r, rid, w.now, float(w.now))


def _scores(w: World, validator: int, good: bool, *, first_only: bool = False) -> machine.ScoresReceived:
    """Validator ``validator``'s scores of every candidate (``first_only``: of the first one only).
    In a fallback round: the fallback validator of that index, for the fallback request."""
    fallback = w.view.state is S.FALLBACK
    if w.view.state is S.APPEAL and w.view.appeal is not None:
        return _appeal_scores(w, validator, good)
    candidates = machine.fallback_candidates(w.view) if fallback else w.view.results
    scores = tuple(
        machine.Score(
            r.id,
            r.model_sha256,
            Decimal("0.9") if good else machine.UNREADABLE if r.sealed else Decimal("0.1"),
        )
        for r in candidates[: 1 if first_only else None]
    )
    who = w.view.fallback_validators[validator] if fallback else VALIDATORS[validator]
    request_id = (w.view.fallback_request_id if fallback else w.view.eval_request_id) or ""
    eid = hashlib.sha256(f"scores {who} {good} {len(scores)}".encode()).hexdigest()
    return machine.ScoresReceived(who, request_id, scores, eid, w.now, float(w.now))


def _appeal_scores(w: World, validator: int, good: bool) -> machine.ScoresReceived:
    """An appeal validator's scores of every candidate (the appeal round scores them all)."""
    appeal = w.view.appeal
    assert appeal is not None
    scores = tuple(
        machine.Score(r.id, r.model_sha256, Decimal("0.9") if good else Decimal("0.1")) for r in w.view.results
    )
    who = appeal.validators[validator]
    eid = hashlib.sha256(f"appeal scores {who} {good}".encode()).hexdigest()
    return machine.ScoresReceived(who, appeal.request_id or "", scores, eid, w.now, float(w.now))


def _appeal_hash(job_id: str) -> str:
    return hashlib.sha256(f"appeal fee {job_id}".encode()).hexdigest()


def _appeal_actions(w: World) -> Iterator[tuple[str, World]]:
    """Appeals: by the customer, by the provider of each rejected result, by a stranger; the fee
    invoice made; the fee paid in time or after the deadline; the appeal validators' scores."""
    v = w.view
    if v.state is S.APPEALABLE and v.decision is not None and v.appeal is None:
        yield "appeal by the customer", step(w, machine.AppealReceived(v.customer, None, "a" * 64, float(w.now)))
        for r in v.results:
            yield (
                f"appeal by {r.provider[:4]}",
                step(w, machine.AppealReceived(r.provider, r.id, "b" * 64, float(w.now))),
            )
        yield "appeal by a stranger", step(w, machine.AppealReceived(STRANGER, None, "c" * 64, float(w.now)))
    appeal = v.appeal
    if appeal is not None and appeal.status is machine.AppealStatus.REQUESTED:
        yield (
            "appeal invoice created",
            step(w, machine.AppealInvoiceCreated(_appeal_hash(v.id), FAKE_BOLT11, appeal.fee_msat)),
        )
    payable = (machine.AppealStatus.INVOICED, machine.AppealStatus.UNPAID)  # LND may settle it after our deadline
    if (
        appeal is not None
        and appeal.status in payable
        and appeal.payment_hash
        and _appeal_hash(v.id) not in {k.split(":", 1)[1] for k in v.posted if k.startswith("funding:")}
    ):
        deadline = v.appeal_deadline or w.now
        for label, at in (("appeal fee paid", w.now), ("appeal fee paid late", deadline + 5)):
            yield (
                label,
                step(
                    w,
                    machine.AppealFeePaid(_appeal_hash(v.id), appeal.fee_msat, at),
                    fee_paid_msat=appeal.fee_msat,
                    now=max(w.now, at),
                ),
            )
    if v.state is S.APPEAL and appeal is not None:
        for k in range(len(appeal.validators)):
            for good in (True, False):
                yield f"appeal scores a{k} {'good' if good else 'bad'}", step(w, _appeal_scores(w, k, good))


def _next_deadline(w: World) -> int | None:
    v = w.view
    if v.state is S.OFFERED and v.offer_expires_at:
        return v.offer_expires_at + w.config.offer_grace_seconds + 1
    if v.state is S.COLLECTING:
        return v.results_deadline + w.config.results_grace_seconds + 1
    if v.state is S.VALIDATING:
        return v.validation_deadline + 1
    if v.state is S.FALLBACK and v.fallback_deadline is not None:
        return v.fallback_deadline + 1
    if v.state is S.APPEALABLE and v.appeal_deadline is not None:
        return v.appeal_deadline + 1
    if v.state is S.APPEAL and v.appeal is not None and v.appeal.round_deadline is not None:
        return v.appeal.round_deadline + 1
    return None


def actions(w: World, *, providers: int = 2, copies: bool = True) -> Iterator[tuple[str, World]]:
    """Every next world: (a label, the world after the machine stepped that fact)."""
    v = w.view
    hold = v.mode is machine.EscrowMode.HOLD
    amount = v.bid_msat + w.overpay_msat if v.request else 0
    if v.state is S.NEW:
        yield "request", step(w, w.request)
        yield (
            "request refused at the edge",
            step(w, machine.RequestRejected(w.request.event, "rate_limited", "at most 10 requests a minute")),
        )
        return
    if w.last is not None:
        yield "duplicate", step(w, w.last)
    if v.state is S.REQUESTED and w.invoice == "none":
        yield (
            "invoice created",
            step(w, machine.InvoiceCreated(_funding_hash(v.id), FAKE_BOLT11, v.bid_msat), invoice="open"),
        )
        yield "invoice failed", step(w, machine.InvoiceFailed("LND away"))
    if w.invoice == "open":
        # The customer pays: on time, or after the offer closed (LND's observation time).
        late_at = (v.offer_expires_at or w.now) + w.config.offer_grace_seconds + 5
        for label, at in (("pay", w.now), ("pay late", late_at)):
            if hold:
                yield label, step(w, machine.HoldAccepted(amount, at), invoice="accepted")
            else:
                yield (
                    label,
                    step(w, machine.Settled(_funding_hash(v.id), amount, at), invoice="settled", paid_msat=amount),
                )
        yield (
            "invoice expired",
            step(
                w,
                machine.InvoiceCanceled(),
                invoice="canceled",
                effects=tuple(e for e in w.effects if e is not EffectKind.CANCEL_INVOICE),
            ),
        )
    if w.invoice == "accepted":
        # Our settle effect, or the deadline guard on its own, settles; our cancel effect or the
        # HTLC's expiry cancels (LND gives the money back).
        yield (
            "settle",
            step(
                w,
                machine.Settled(_funding_hash(v.id), amount, w.now),
                invoice="settled",
                paid_msat=amount,
                effects=tuple(e for e in w.effects if e is not EffectKind.SETTLE_HOLD),
            ),
        )
        yield (
            "cancel",
            step(
                w,
                machine.InvoiceCanceled(),
                invoice="canceled",
                effects=tuple(e for e in w.effects if e is not EffectKind.CANCEL_INVOICE),
            ),
        )
    if v.state is S.COLLECTING and v.request is not None:
        shards = len(v.req.spec.shards)
        for p in range(providers):
            for shard in range(shards):
                yield f"result p{p} s{shard}", step(w, _result(w, p, shard))
        if copies and v.results:
            yield "copied result", step(w, _result(w, providers, 0, copy_of=0))
    if v.state is S.VALIDATING and v.request is not None:
        for k in range(len(v.req.validators)):
            for good in (True, False):
                yield f"scores v{k} {'good' if good else 'bad'}", step(w, _scores(w, k, good))
    if v.state is S.FALLBACK:
        for k in range(len(v.fallback_validators)):
            for good in (True, False):
                yield f"fallback scores f{k} {'good' if good else 'bad'}", step(w, _scores(w, k, good))
            if len(machine.fallback_candidates(v)) > 1:
                yield f"fallback scores f{k} first only", step(w, _scores(w, k, True, first_only=True))
        # a named validator's late first-round scores: never counted
        yield (
            "late first-round scores v0",
            step(w, replace(_scores(w, 0, True), validator=VALIDATORS[0], request_id=v.eval_request_id or "")),
        )
    yield from _appeal_actions(w)
    due = _next_deadline(w)
    if due is not None:
        yield "deadline", step(w, machine.DeadlineReached(), now=max(w.now, due))
    if due is not None and w.outages and v.state is S.FALLBACK and v.fallback_deadline is not None:
        yield (
            "outage across the fallback deadline",
            step(
                w,
                machine.DeadlineExtended(None, None, v.fallback_deadline + OUTAGE_SECONDS),
                now=max(w.now, due),
                outages=w.outages - 1,
            ),
        )
    if due is not None and w.outages and v.state in (S.APPEALABLE, S.APPEAL):
        current = v.appeal_deadline if v.state is S.APPEALABLE else v.appeal.round_deadline if v.appeal else None
        if current is not None:
            yield (
                "outage across the appeal deadline",
                step(
                    w,
                    machine.DeadlineExtended(None, None, appeal_to=current + OUTAGE_SECONDS),
                    now=max(w.now, due),
                    outages=w.outages - 1,
                ),
            )
    if due is not None and w.outages and v.state in (S.COLLECTING, S.VALIDATING):
        # The escrow was down across the deadline: the timer scan moves it by the outage (50 s).
        results_to = v.results_deadline + OUTAGE_SECONDS if v.state is S.COLLECTING else None
        yield (
            "outage across the deadline",
            step(
                w,
                machine.DeadlineExtended(results_to, v.validation_deadline + OUTAGE_SECONDS),
                now=max(w.now, due),
                outages=w.outages - 1,
            ),
        )
    if v.state in (S.REQUESTED, S.OFFERED):
        yield "deleted", step(w, machine.Deleted(v.customer))
        yield "deleted by a stranger", step(w, machine.Deleted(STRANGER))
    if v.state in (S.COLLECTING, S.VALIDATING, S.FALLBACK):
        yield "operator refund", step(w, machine.OperatorRefund("test"))
    for i, p in enumerate(w.payouts):
        if p.state is PayoutState.EXPIRED and w.claims:
            # An operator reopens the expired claim: a fresh window from now (service/payouts).
            claim_by, _ = w.config.claim_window.times(w.now)
            again = replace(p, state=PayoutState.NEEDS_INVOICE, claim_round=p.claim_round + 1, claim_by=claim_by)
            rows = tuple(again if x.id == p.id else x for x in w.payouts)
            ww = replace(w, payouts=rows, view=replace(w.view, payouts=rows), claims=w.claims - 1)
            yield f"payout {i} reopened", step(ww, machine.PayoutReopened(again))
        if p.state is PayoutState.PENDING:
            preimage = hashlib.sha256(f"preimage {p.id}".encode()).hexdigest()
            done = replace(
                p,
                state=PayoutState.SUCCEEDED,
                fee_msat=1,
                preimage=preimage,
                payment_hash=hashlib.sha256(bytes.fromhex(preimage)).hexdigest(),
            )
            rows = tuple(done if x.id == p.id else x for x in w.payouts)
            ww = replace(w, payouts=rows, sent_msat=w.sent_msat + p.amount_msat, fees_msat=w.fees_msat + 1)
            ww = replace(ww, view=replace(ww.view, payouts=rows))
            yield f"payout {i} succeeded", step(ww, machine.PayoutSucceeded(done))
            back = replace(
                p,
                state=PayoutState.NEEDS_INVOICE,
                attempts=p.attempts + 1,
                needs_invoice_count=p.needs_invoice_count + 1,
                last_error="expired: invoice expired",
            )
            rows = tuple(back if x.id == p.id else x for x in w.payouts)
            ww = replace(w, payouts=rows, view=replace(w.view, payouts=rows))
            yield f"payout {i} handed back", step(ww, machine.PayoutNeedsInvoice(back, "expired"))
            break  # one payout at a time: the others are the same case
        if p.state is PayoutState.NEEDS_INVOICE:
            # The payee gives an invoice (the payout package; no job fact).
            given = replace(p, state=PayoutState.PENDING, destination=DestinationKind.BOLT11)
            rows = tuple(given if x.id == p.id else x for x in w.payouts)
            yield f"payout {i} invoice given", replace(w, payouts=rows, view=replace(w.view, payouts=rows))
            window = f"{p.id}:{p.claim_round}"
            if p.claim_by is not None and w.claims and window not in w.reminded:
                _, remind_at = w.config.claim_window.times(p.claim_by - w.config.terms.claim_window_s)
                assert remind_at is not None
                ww = replace(w, reminded=w.reminded | {window})
                yield f"payout {i} reminded", step(ww, machine.ClaimReminder(p), now=max(w.now, remind_at))
            if p.claim_by is not None and w.claims:
                # Nobody gave one by claim_by: service/payouts moves it to expired.
                gone = replace(p, state=PayoutState.EXPIRED)
                rows = tuple(gone if x.id == p.id else x for x in w.payouts)
                ww = replace(w, payouts=rows, view=replace(w.view, payouts=rows), claims=w.claims - 1)
                yield f"payout {i} claim expired", step(ww, machine.PayoutExpired(gone), now=max(w.now, p.claim_by))
            break


# ---------------------------------------------------------------------------- invariants


def violations(w: World) -> list[str]:
    v = w.view
    out = list(w.problems)
    held, owed = v.held_msat, v.owed_msat
    if held < 0:
        out.append(f"escrow account overdrawn: {held}")
    if owed < 0:
        out.append(f"a liability paid beyond what was owed: {owed}")
    promised = sum(p.amount_msat for p in w.payouts)
    came_in = w.paid_msat + w.fee_paid_msat
    if promised > came_in:
        out.append(f"payouts of {promised} msat from {came_in} msat received")
    if w.sent_msat > came_in:
        out.append(f"sent {w.sent_msat} msat of {came_in} msat received")
    # Money is conserved: the node holds what came in less what went out, as the ledger says.
    if w.balance(accounts.NODE) != came_in - w.sent_msat - w.fees_msat:
        out.append(f"node {w.balance(accounts.NODE)} != in {came_in} - sent {w.sent_msat} - fees {w.fees_msat}")
    ids = [p.id for p in w.payouts]
    if len(ids) != len(set(ids)):
        out.append("a payout twice")
    accepted = {x.result_id for x in v.decision.verdicts if x.accepted} if v.decision else set()
    for p in w.payouts:
        if p.kind is PayoutKind.REWARD and p.earned_by not in accepted:
            out.append(f"reward {p.id} for a result not accepted")
        appeal_validators = v.appeal.validators if v.appeal is not None else ()
        if p.kind is PayoutKind.VALIDATOR_FEE and not accepted and p.payee not in appeal_validators:
            out.append(f"validator fee {p.id} without an accepted result (nor a lost appeal's)")
        if p.kind is PayoutKind.APPEAL_FEE_REFUND and (v.appeal is None or p.payee != v.appeal.appellant):
            out.append(f"appeal fee refund {p.id} to someone who did not appeal")
        if p.kind is PayoutKind.REFUND and (v.state not in (S.REFUNDING, S.REFUNDED) or p.payee != v.customer):
            out.append(f"refund {p.id} of a job {v.state} (to {p.payee[:8]})")
        if p.kind is PayoutKind.OVERPAID and p.payee != v.customer:
            out.append("an overpayment back to someone else")
    if v.state.final:
        if held != 0 or owed != 0:
            out.append(f"final state {v.state} with accounts held={held} owed={owed}")
        if v.state is S.CLOSED and any(p.open for p in w.payouts):
            out.append("closed with a payout neither paid nor expired")
    # What nobody claimed is the operator's: the unclaimed account holds exactly the expired payouts.
    expired = sum(p.amount_msat for p in w.payouts if p.state is PayoutState.EXPIRED)
    if -w.balance(accounts.UNCLAIMED) != expired:
        out.append(f"unclaimed account {-w.balance(accounts.UNCLAIMED)} != expired payouts {expired}")
    if v.funds is Funds.HELD and w.paid_msat == 0:
        out.append("funds held without a payment")
    out.extend(_deadline_violations(w))
    out.extend(_key_violations(w))
    out.extend(_fallback_violations(w))
    out.extend(_appeal_violations(w))
    return out


def _appeal_violations(w: World) -> list[str]:
    """While a decision may be appealed (or an appeal runs) no money moves for the job; a paid fee is
    refunded exactly when the appeal won, was void or came late, kept when it lost; a hold job in the
    appeal round with its money locked can outlive it (or is going into custody)."""
    v = w.view
    out = []
    moved = {postings.release_key(v.id), postings.refund_key(v.id)} & v.posted
    if v.state in (S.APPEALABLE, S.APPEAL) and moved:
        out.append(f"money moved ({sorted(moved)}) while the job is {v.state}")
    appeal = v.appeal
    refunds = [p for p in w.payouts if p.kind is PayoutKind.APPEAL_FEE_REFUND]
    if appeal is not None and postings.appeal_key(v.id) in v.posted:
        refunded = appeal.status in (machine.AppealStatus.WON, machine.AppealStatus.VOID, machine.AppealStatus.LATE)
        if refunds and not refunded:
            out.append(f"appeal {appeal.status}: its fee refunded")
        back = -w.balance(accounts.refund(appeal.appellant, v.id)) + sum(p.amount_msat for p in refunds)
        if refunded and w.config.terms.routing_fee_ppm < 1_000_000 and not refunds and back == 0:
            out.append(f"appeal {appeal.status}: its fee not refunded")
    if appeal is not None and appeal.status is machine.AppealStatus.RUNNING and v.state is not S.APPEAL:
        out.append(f"an appeal running in a job {v.state}")
    if v.state is S.APPEAL and v.funds is Funds.LOCKED and EffectKind.SETTLE_HOLD not in w.effects:
        assert appeal is not None and appeal.round_deadline is not None
        if appeal.round_deadline > v.req.spec.validation_deadline:
            out.append("a hold job's appeal round outlasts its HTLC's margin, and it is not going into custody")
    return out


def _fallback_violations(w: World) -> list[str]:
    """A fallback round asks only eligible pool keys (never the customer, a provider, a named
    validator), no more of them than named validators who scored nothing; validator fees go only to
    validators whose scores counted (a named no-show earns nothing); a hold job in the fallback
    round with its money still locked is on its way into custody."""
    v = w.view
    if v.request is None:
        return []
    out = []
    fallback = set(v.fallback_validators)
    barred = {v.customer, *(r.provider for r in v.results), *v.req.validators}
    if fallback & barred or not fallback <= set(w.config.validator_pool):
        out.append(f"fallback validators {sorted(fallback)} include a barred or unpooled key")
    counted = {x.validator for x in v.scores if x.value is not None}
    no_shows = [x for x in v.req.validators if x not in counted]
    if len(fallback) > len(v.req.validators):
        out.append("more fallback validators than named ones")
    if fallback and len(fallback) > len(no_shows) + len(fallback & counted):
        out.append("more fallback validators than named no-shows")
    for p in w.payouts:
        if p.kind is PayoutKind.VALIDATOR_FEE and p.payee not in counted:
            out.append(f"validator fee to {p.payee[:8]}, whose scores did not count")
    if v.state is S.FALLBACK and v.funds is Funds.LOCKED and EffectKind.SETTLE_HOLD not in w.effects:
        out.append("a hold job in the fallback round with its money locked, not going into custody")
    appealed = set(v.appeal.validators) if v.appeal is not None else set()
    if appealed & (barred | fallback) or not appealed <= set(w.config.validator_pool):
        out.append(f"appeal validators {sorted(appealed)} include a barred, fallback or unpooled key")
    late = [
        x
        for x in v.scores
        if x.validator not in fallback and x.validator not in v.req.validators and x.validator not in appealed
    ]
    if late:
        out.append("a score counted from someone neither named nor in the fallback round")
    return out


def _deadline_violations(w: World) -> list[str]:
    """An outage only ever moves deadlines later, keeps validation after results, and a hold job
    whose validation deadline moved while its money is locked is on its way into custody (its HTLC
    was sized for the request's deadline, not a later one)."""
    v = w.view
    if v.request is None:
        return []
    out = []
    if v.results_deadline < v.req.spec.results_deadline or v.validation_deadline < v.req.spec.validation_deadline:
        out.append("a deadline moved earlier")
    if v.validation_deadline <= v.results_deadline:
        out.append(f"validation deadline {v.validation_deadline} not after results {v.results_deadline}")
    locked = v.funds is Funds.LOCKED and v.state in (S.COLLECTING, S.VALIDATING)
    if v.validation_extended_to is not None and locked and EffectKind.SETTLE_HOLD not in w.effects:
        out.append("a hold job's validation deadline moved past its HTLC's margin, and it is not going into custody")
    return out


def _key_violations(w: World) -> list[str]:
    """A sealed result's key goes to the customer exactly when its provider is paid a reward > 0
    from settled money (protocol.md §5a): never for a rejected or 0-reward result, never on a
    refund path, never before a hold invoice is settled, at most once, and once released for all."""
    v = w.view
    out = []
    if len(w.keys) != len(set(w.keys)):
        out.append(f"a model key published twice: {w.keys}")
    rewarded = {x.result_id for x in v.decision.verdicts if x.accepted and x.reward_msat > 0} if v.decision else set()
    sealed = {r.id for r in v.results if r.sealed}
    for rid in w.keys:
        if rid not in rewarded:
            out.append(f"model key of {rid[:8]}, which earns nothing")
        if rid not in sealed:
            out.append(f"model key of a plain result {rid[:8]}")
    if w.keys:
        if v.state in (S.REFUNDING, S.REFUNDED):
            out.append(f"model keys released in a {v.state} job")
        if w.invoice != "settled" or v.funds is not Funds.HELD:
            out.append(f"model keys released with the invoice {w.invoice}, funds {v.funds}")
        if postings.release_key(v.id) not in v.posted:
            out.append("model keys released before the release was booked")
    if postings.release_key(v.id) in v.posted and set(w.keys) != rewarded & sealed:
        out.append(f"released, but the keys are {sorted(w.keys)}, not {sorted(rewarded & sealed)}")
    return out
