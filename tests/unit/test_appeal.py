"""Appeals (docs/escrow.md "Appeals", protocol.md §6c): after validation is complete the decision
waits for the appeal window; the customer or a rejected provider may appeal with a kind-7000
event, pay the fee, and an appeal round of pool validators decides finally. Machine level (pure),
the codec of the appeal events, and the rule for the appeal's money."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest

from service.escrow import machine, rule
from service.escrow.machine import AppealStatus, EffectKind, EventRole, Funds, JobState
from service.ledger import accounts, postings
from service.nostr.nip01 import SecretKey, sign_event
from service.nostr.protocol import (
    AppealFee,
    AppealRoundStarted,
    AppealWindow,
    CodecError,
    CodecErrorReason,
    EvalRound,
    Mode,
    build_appeal,
    build_appeal_fee,
    build_appeal_round,
    build_appeal_window,
    is_appeal,
    parse_appeal,
    parse_appeal_fee,
    parse_appeal_round,
    parse_appeal_window,
    parse_evaluation_request,
    parse_validation_complete,
)
from service.nostr.protocol.feedback import parse_deadline_extension
from service.nostr.protocol.fields import Template, placeholder_event
from service.payouts.types import PayoutKind
from tests.support import machine_world as mw

S = JobState
R = CodecErrorReason
P0, P1 = mw.PROVIDERS[0], mw.PROVIDERS[1]
JOB = "a" * 64
RESULT = "c" * 64
ESCROW = mw.ESCROW.public_key_hex
APPELLANT = SecretKey(hashlib.sha256(b"appeal test appellant").digest())


def _play(w: mw.World, *labels: str) -> mw.World:
    for label in labels:
        w = dict(mw.actions(w))[label]
    return w


def _info(t: Template) -> str:
    return next((x[2] for x in t.tags if x[0] == "status" and len(x) > 2), "")


def _published(w: mw.World, fact: machine.Fact) -> machine.Plan:
    return machine.step(w.view, fact, w.now, w.config)


# ---------------------------------------------------------------------------- codec


def test_an_appeal_round_trips_for_a_provider_and_for_the_customer() -> None:
    for result in (RESULT, None):
        t = build_appeal(job_id=JOB, escrow=ESCROW, result_id=result, reason="scored on the wrong split")
        ev = sign_event(APPELLANT, t.kind, t.tags, t.content)
        assert is_appeal(ev)
        a = parse_appeal(ev, escrow_pubkey=ESCROW)
        assert (a.job_id, a.result_id, a.appellant, a.escrow) == (JOB, result, APPELLANT.public_key_hex, ESCROW)


def _tags(result: str | None = RESULT) -> list[tuple[str, ...]]:
    return list(build_appeal(job_id=JOB, escrow=ESCROW, result_id=result).tags)


@pytest.mark.parametrize(
    ("tags", "content", "reason"),
    [
        ([t for t in _tags() if t[0] != "p"], "", R.MISSING_PUBKEY_REF),
        ([t if t[0] != "p" else ("p", "b" * 64) for t in _tags()], "", R.NOT_FOR_US),
        ([t for t in _tags() if t[0] != "e" or t[3] != "job"], "", R.MISSING_EVENT_REF),
        ([*_tags(), ("e", "d" * 64, "", "result")], "", R.AMBIGUOUS_EVENT_REFS),
        ([("e", "d" * 64, "", "job") if t[0] == "e" and t[3] == "job" else t for t in _tags()], "", None),
        ([t if t[0] != "e" else ("e", "xyz", "", t[3]) for t in _tags()], "", R.INVALID_EVENT_REF),
        ([("status", "processing", "appeal", "x"), *_tags()[1:]], "", R.INVALID_STATUS),
        ([("status", "success", "appeal"), *_tags()[1:]], "", R.INVALID_STATUS),
        (_tags(), "x" * 1001, R.INVALID_APPEAL_REASON),
        (_tags(), "bad\x00reason", R.INVALID_APPEAL_REASON),
    ],
)
def test_a_malformed_appeal_is_refused_with_its_code(
    tags: list[tuple[str, ...]], content: str, reason: CodecErrorReason | None
) -> None:
    ev = sign_event(APPELLANT, 7000, tags, content)
    if reason is None:
        assert parse_appeal(ev, escrow_pubkey=ESCROW).job_id == "d" * 64
        return
    with pytest.raises(CodecError) as e:
        parse_appeal(ev, escrow_pubkey=ESCROW)
    assert e.value.reason is reason
    assert content not in e.value.message or not content  # the reason is never echoed


def test_the_escrows_appeal_answers_round_trip_and_carry_what_the_brief_names() -> None:
    window = build_appeal_window(AppealWindow(JOB, P0, 1_900_000_050))
    assert parse_appeal_window(placeholder_event(window)) == AppealWindow(JOB, P0, 1_900_000_050)
    fee = build_appeal_fee(AppealFee(JOB, P0, 10_000, mw.FAKE_BOLT11))
    assert ("status", "payment-required", "appeal fee") in fee.tags
    assert ("amount", "10000", mw.FAKE_BOLT11) in fee.tags and ("p", P0) in fee.tags and ("e", JOB) in fee.tags
    assert parse_appeal_fee(placeholder_event(fee)).bolt11 == mw.FAKE_BOLT11
    started = build_appeal_round(AppealRoundStarted(JOB, P1, 1_900_000_150))
    assert ("status", "processing", "appeal round") in started.tags
    assert parse_appeal_round(placeholder_event(started)).deadline == 1_900_000_150
    # an appeal is not a payee's invoice, and an escrow's answer is not an appeal
    assert not is_appeal(placeholder_event(fee)) and not is_appeal(placeholder_event(started))


# ---------------------------------------------------------------------------- the rule


def test_a_lost_appeal_pays_its_validators_from_its_fee_and_the_escrow_keeps_the_rest() -> None:
    m = rule.appeal_money(
        won=False, scorers=("a", "b"), validator_fee_msat=3_500, appeal_fee_msat=10_000, job_income_msat=50_000
    )
    assert m.validator_fees == {"a": 3_000, "b": 3_000} and m.from_appeal_fee
    assert (m.fee_refund_msat, m.fee_income_msat) == (0, 4_000)


def test_a_won_appeal_refunds_its_fee_and_pays_its_validators_from_the_escrows_income() -> None:
    m = rule.appeal_money(
        won=True, scorers=("a", "b"), validator_fee_msat=3_000, appeal_fee_msat=10_000, job_income_msat=50_000
    )
    assert m.validator_fees == {"a": 3_000, "b": 3_000} and not m.from_appeal_fee
    assert (m.fee_refund_msat, m.fee_income_msat) == (10_000, 0)


def test_each_appeal_validator_fee_is_capped_at_what_its_source_still_holds() -> None:
    lost = rule.appeal_money(
        won=False, scorers=("a", "b", "c"), validator_fee_msat=4_000, appeal_fee_msat=10_000, job_income_msat=0
    )
    assert lost.validator_fees == {"a": 4_000, "b": 4_000, "c": 2_000} and lost.fee_income_msat == 0
    won = rule.appeal_money(
        won=True, scorers=("a", "b"), validator_fee_msat=4_000, appeal_fee_msat=10_000, job_income_msat=5_500
    )
    assert won.validator_fees == {"a": 4_000, "b": 1_000}  # whole satoshis, never beyond the income
    refunded = rule.appeal_money(
        won=True, scorers=("a",), validator_fee_msat=4_000, appeal_fee_msat=10_000, job_income_msat=0
    )
    assert refunded.validator_fees == {}  # a won appeal that refunds: the escrow earned nothing to pay from


# ---------------------------------------------------------------------------- the machine


def _appealable(*scores: str, mode: Mode = Mode.CUSTODIAL, config: machine.MachineConfig = mw.APPEALS) -> mw.World:
    w = mw.start(mw.request(shards=1, validators=1, mode=mode), config=config)
    return _play(w, "request", "invoice created", "pay", "result p0 s0", *scores)


def test_the_decision_waits_for_the_appeal_window_and_nothing_moves_meanwhile() -> None:
    w = _appealable("scores v0 good")
    assert w.view.state is S.APPEALABLE and w.view.decision is not None and w.view.decision.accepted
    assert w.view.appeal_deadline == w.now + mw.APPEAL_TERMS.appeal_window_s
    assert not w.payouts and postings.release_key(w.view.id) not in w.view.posted
    # without appeals announced the same scores release at once
    assert _appealable("scores v0 good", config=mw.POOL_CONFIG).view.state is S.RELEASING


def test_the_validation_complete_and_the_window_are_published_to_customer_and_providers() -> None:
    w = _appealable()
    plan = _published(w, mw._scores(w, 0, True))
    infos = [_info(o.template) for o in plan.events]
    assert "validation complete" in infos
    windows = [
        parse_appeal_window(placeholder_event(o.template)) for o in plan.events if _info(o.template) == "appeal window"
    ]
    assert {x.addressee for x in windows} == {w.view.customer, P0}
    assert all(x.deadline == plan.appeal_deadline for x in windows)


def test_at_the_deadline_without_a_paid_appeal_the_decision_goes_ahead_as_taken() -> None:
    released = _play(_appealable("scores v0 good"), "deadline")
    assert released.view.state is S.RELEASING and postings.release_key(released.view.id) in released.view.posted
    refunded = _play(_appealable("scores v0 bad"), "deadline")
    assert refunded.view.state in (S.REFUNDING, S.REFUNDED)
    # asked but never paid: unpaid, the decision goes ahead
    unpaid = _play(_appealable("scores v0 good"), "appeal by the customer", "appeal invoice created", "deadline")
    assert unpaid.view.appeal is not None and unpaid.view.appeal.status is AppealStatus.UNPAID
    assert unpaid.view.state is S.RELEASING


def test_only_the_customer_or_the_provider_of_a_rejected_result_may_appeal_once_in_time() -> None:
    accepted = _appealable("scores v0 good")
    rid = accepted.view.results[0].id
    cases = {
        "provider of an accepted result": machine.AppealReceived(P0, rid, "e" * 64, float(accepted.now)),
        "a stranger": machine.AppealReceived(mw.STRANGER, None, "e" * 64, float(accepted.now)),
        "another provider's result": machine.AppealReceived(P1, rid, "e" * 64, float(accepted.now)),
        "late": machine.AppealReceived(accepted.view.customer, None, "e" * 64, float(accepted.now + 51)),
    }
    for why, fact in cases.items():
        plan = _published(accepted, fact)
        assert plan.outcome.startswith("ignored") and plan.appeal is None and not plan.effects, why
    rejected = _appealable("scores v0 bad")
    customer = _published(rejected, machine.AppealReceived(rejected.view.customer, None, "e" * 64, float(rejected.now)))
    assert customer.outcome.startswith("ignored")  # nothing accepted: the customer cannot gain
    first = _play(rejected, f"appeal by {P0[:4]}")
    assert first.view.appeal is not None and first.view.appeal.appellant == P0
    assert EffectKind.CREATE_APPEAL_INVOICE in first.effects
    second = _published(first, machine.AppealReceived(P0, rejected.view.results[0].id, "f" * 64, float(first.now)))
    assert second.outcome.startswith("ignored: the job was appealed before")


def test_a_valid_appeal_is_answered_with_the_fee_invoice_to_the_appellant() -> None:
    w = _play(_appealable("scores v0 bad"), f"appeal by {P0[:4]}")
    plan = _published(w, machine.AppealInvoiceCreated("9" * 64, mw.FAKE_BOLT11, 5_000))
    fees = [parse_appeal_fee(placeholder_event(o.template)) for o in plan.events]
    assert fees == [AppealFee(w.view.id, P0, 5_000, mw.FAKE_BOLT11)]
    assert plan.appeal is not None and plan.appeal.status is AppealStatus.INVOICED


def _paid(scores: str, appellant: str, mode: Mode = Mode.CUSTODIAL) -> mw.World:
    return _play(_appealable(scores, mode=mode), appellant, "appeal invoice created", "appeal fee paid")


def test_a_paid_appeal_starts_a_pool_round_over_every_candidate_with_the_jobs_quorum() -> None:
    w = _paid("scores v0 bad", f"appeal by {P0[:4]}")
    assert w.view.state is S.APPEAL and w.view.appeal is not None
    a = w.view.appeal
    assert a.status is AppealStatus.RUNNING and len(a.validators) == 1
    barred = {w.view.customer, P0, *w.view.req.validators}
    assert not set(a.validators) & barred and set(a.validators) <= set(mw.APPEALS.validator_pool)
    assert w.view.held_msat == w.view.bid_msat  # the job's money waits
    assert -w.balance(accounts.appeal(w.view.id)) == 5_000  # the fee is held for the job's appeal
    before = _play(_appealable("scores v0 bad"), f"appeal by {P0[:4]}", "appeal invoice created")
    plan = _published(before, machine.AppealFeePaid(mw._appeal_hash(before.view.id), 5_000, before.now))
    request = next(o for o in plan.events if o.role is EventRole.APPEAL_REQUEST)
    parsed = parse_evaluation_request(placeholder_event(request.template))
    assert parsed.round is EvalRound.APPEAL and parsed.previous == before.view.eval_request_id
    assert [c.result_id for c in parsed.candidates] == [r.id for r in before.view.results]
    rounds = [_info(o.template) for o in plan.events].count("appeal round")
    assert rounds == 2  # the customer and the provider are told


def test_an_appeal_that_overturns_a_rejection_wins_its_fee_back_and_releases() -> None:
    w = _play(_paid("scores v0 bad", f"appeal by {P0[:4]}"), "appeal scores a0 good")
    assert w.view.appeal is not None and w.view.appeal.status is AppealStatus.WON
    assert w.view.state is S.RELEASING and w.view.decision is not None and w.view.decision.accepted
    refund = [p for p in w.payouts if p.kind is PayoutKind.APPEAL_FEE_REFUND]
    assert [(p.payee, p.amount_msat) for p in refund] == [(P0, 4_000)]  # less its route's reserve, whole sats
    reward = [p for p in w.payouts if p.kind is PayoutKind.REWARD]
    assert [p.payee for p in reward] == [P0]
    # the appeal validator is paid from the escrow's income on the job (the first round was wrong)
    fee = [p for p in w.payouts if p.kind is PayoutKind.VALIDATOR_FEE and p.payee in w.view.appeal.validators]
    assert [p.amount_msat for p in fee] == [1_000]
    # the first round's validator scored "bad": its fee was given by the first decision (nothing: refunded)
    assert not any(p.payee == mw.VALIDATORS[0] for p in w.payouts)
    assert not mw.violations(w)


def test_an_appeal_that_fails_keeps_its_fee_and_the_job_goes_as_first_decided() -> None:
    w = _play(_paid("scores v0 bad", f"appeal by {P0[:4]}"), "appeal scores a0 bad")
    assert w.view.appeal is not None and w.view.appeal.status is AppealStatus.LOST
    assert w.view.state in (S.REFUNDING, S.REFUNDED)
    assert not [p for p in w.payouts if p.kind is PayoutKind.APPEAL_FEE_REFUND]
    fee = [p for p in w.payouts if p.kind is PayoutKind.VALIDATOR_FEE]
    assert [(p.payee, p.amount_msat) for p in fee] == [(w.view.appeal.validators[0], 1_000)]  # from the fee
    assert w.balance(accounts.appeal(w.view.id)) == 0 and not mw.violations(w)
    # the customer's appeal of an acceptance that the pool confirms: released as decided, fee kept
    c = _play(_paid("scores v0 good", "appeal by the customer"), "appeal scores a0 good")
    assert c.view.appeal is not None and c.view.appeal.status is AppealStatus.LOST and c.view.state is S.RELEASING


def test_the_appeal_rounds_validation_complete_publishes_only_its_scores() -> None:
    w = _paid("scores v0 bad", f"appeal by {P0[:4]}")
    plan = _published(w, mw._appeal_scores(w, 0, True))
    completes = [o for o in plan.events if _info(o.template) == "validation complete"]
    assert len(completes) == 1
    vc = parse_validation_complete(placeholder_event(completes[0].template))
    assert vc.verdicts[0].accepted
    assert {s.validator for s in vc.scores} == set(w.view.appeal.validators)  # type: ignore[union-attr]


def test_an_appeal_round_short_of_quorum_or_without_a_pool_refunds_the_fee_and_the_decision_stands() -> None:
    short = _play(_paid("scores v0 bad", f"appeal by {P0[:4]}"), "deadline")
    assert short.view.appeal is not None and short.view.appeal.status is AppealStatus.VOID
    assert short.view.state in (S.REFUNDING, S.REFUNDED)  # as first decided
    assert [p.payee for p in short.payouts if p.kind is PayoutKind.APPEAL_FEE_REFUND] == [P0]
    no_pool = _play(
        _appealable("scores v0 bad", config=mw.APPEALS_NO_POOL),
        f"appeal by {P0[:4]}",
        "appeal invoice created",
        "appeal fee paid",
    )
    assert no_pool.view.appeal is not None and no_pool.view.appeal.status is AppealStatus.VOID
    assert no_pool.view.state in (S.REFUNDING, S.REFUNDED)
    assert [p.payee for p in no_pool.payouts if p.kind is PayoutKind.APPEAL_FEE_REFUND] == [P0]


def test_a_fee_paid_after_the_deadline_is_refunded_and_ignored() -> None:
    w = _play(_appealable("scores v0 good"), "appeal by the customer", "appeal invoice created", "appeal fee paid late")
    assert w.view.appeal is not None and w.view.appeal.status is AppealStatus.LATE
    assert w.view.state is S.APPEALABLE  # the appeal does not start; the deadline carries on
    assert [p.payee for p in w.payouts if p.kind is PayoutKind.APPEAL_FEE_REFUND] == [w.view.customer]
    assert _play(w, "deadline").view.state is S.RELEASING


def test_a_hold_job_goes_into_custody_when_its_htlc_cannot_outlive_the_window_and_a_round() -> None:
    fits = _appealable("scores v0 good", mode=Mode.HOLD)
    assert fits.view.funds is Funds.LOCKED and EffectKind.SETTLE_HOLD not in fits.effects  # 50 + 100 s < 200 s
    long = replace(mw.APPEALS, appeal_round_seconds=1_000)
    too_long = _appealable("scores v0 good", mode=Mode.HOLD, config=long)
    assert too_long.view.state is S.APPEALABLE and EffectKind.SETTLE_HOLD in too_long.effects


def test_an_outage_across_the_appeal_deadline_moves_it_and_an_appeal_sent_meanwhile_counts() -> None:
    w = _appealable("scores v0 good")
    deadline = w.view.appeal_deadline
    assert deadline is not None
    plan = _published(replace(w, now=deadline + 30), machine.DeadlineExtended(None, None, appeal_to=deadline + 80))
    assert plan.appeal_deadline == deadline + 80 and plan.state is S.APPEALABLE
    moved = [parse_deadline_extension(placeholder_event(o.template)) for o in plan.events]
    assert [x.appeal_deadline for x in moved] == [deadline + 80]
    later = _published(
        replace(w, now=deadline + 30), machine.DeadlineExtended(None, None, appeal_to=deadline)
    )  # never earlier than the one in force
    assert later.outcome.startswith("ignored") and later.appeal_deadline is None
    extended = mw.after(replace(w, now=deadline + 30), plan, machine.DeadlineExtended(None, None, deadline + 80))
    fact = machine.AppealReceived(w.view.customer, None, "e" * 64, float(deadline + 40))
    assert _published(extended, fact).appeal is not None  # on time for the deadline in force
    round_ = _paid("scores v0 bad", f"appeal by {P0[:4]}")
    assert round_.view.appeal is not None and round_.view.appeal.round_deadline is not None
    ext = _published(round_, machine.DeadlineExtended(None, None, appeal_to=round_.view.appeal.round_deadline + 50))
    assert ext.appeal is not None and ext.appeal.round_deadline == round_.view.appeal.round_deadline + 50
    assert [parse_deadline_extension(placeholder_event(o.template)).appeal_round_deadline for o in ext.events] == [
        round_.view.appeal.round_deadline + 50
    ]
