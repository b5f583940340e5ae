"""The fallback evaluation round (docs/escrow.md, protocol.md §6b): when the validation deadline
passes without quorum, validators from the escrow's pool are asked once more; only if that round
misses quorum too is the job refunded. Machine level (pure), the codec of its events, the rule."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from decimal import Decimal

import pytest

from service.escrow import machine, rule
from service.escrow.machine import EffectKind, EventRole, Funds, JobState
from service.nostr.nip01 import SecretKey
from service.nostr.protocol import (
    BASELINE,
    Baseline,
    Candidate,
    CodecError,
    CodecErrorReason,
    EvalRound,
    EvaluationRequest,
    FallbackStarted,
    Mode,
    ValidatorKey,
    build_evaluation_request,
    build_fallback_started,
    build_job_request,
    parse_evaluation_request,
    parse_fallback_started,
    parse_validation_complete,
)
from service.nostr.protocol.feedback import (
    DeadlineExtension,
    build_deadline_extension,
    parse_deadline_extension,
)
from service.nostr.protocol.fields import Template, placeholder_event
from service.nostr.protocol.job import RoundParam, read_job_spec
from service.nostr.protocol.sealing import key_sha256, wrap_key
from tests.support import machine_world as mw

S = JobState
R = CodecErrorReason
POOL_A, POOL_B = mw.POOL


def _play(w: mw.World, *labels: str) -> mw.World:
    for label in labels:
        w = dict(mw.actions(w))[label]
    return w


def _info(t: Template) -> str:
    return next((x[2] for x in t.tags if x[0] == "status" and len(x) > 2), "")


def _no_show_world(mode: Mode = Mode.CUSTODIAL, *, params: tuple[tuple[str, str], ...] = (), **config: object):
    """Two named validators, quorum 2, provider 0's sealed result; only v0 scores."""
    req = mw.request(shards=1, validators=2, mode=mode)
    if params:
        spec = replace(req.request.spec, params=params)
        ev = replace(req.event, tags=build_job_request(spec).tags)
        req = replace(req, request=replace(req.request, spec=spec), event=ev)
    w = mw.start(req, config=replace(mw.POOL_CONFIG, **config))  # type: ignore[arg-type]
    w = _play(w, "request", "invoice created", "pay", "result p0 s0", "scores v0 good")
    assert w.view.state is S.VALIDATING
    return w


def _at_deadline(w: mw.World) -> tuple[mw.World, machine.Plan]:
    w = replace(w, now=w.view.validation_deadline + 1)
    plan = machine.step(w.view, machine.DeadlineReached(), w.now, w.config)
    return mw.after(w, plan, machine.DeadlineReached()), plan


def test_a_no_show_at_the_deadline_starts_a_fallback_round_with_the_first_eligible_pool_key() -> None:
    w, plan = _at_deadline(_no_show_world())
    assert w.view.state is S.FALLBACK and w.view.decision is None
    # VALIDATORS[0] is in the pool but named (it scored): never picked; one no-show -> one pool key, by sort order
    assert w.view.fallback_validators == (min(POOL_A, POOL_B),)
    assert w.view.fallback_deadline == w.now + mw.POOL_CONFIG.fallback_round_seconds
    [request_out] = [o for o in plan.events if o.role is EventRole.FALLBACK_REQUEST]
    req = parse_evaluation_request(placeholder_event(request_out.template))
    assert req.round is EvalRound.FALLBACK and req.previous == w.view.eval_request_id
    assert req.validators == w.view.fallback_validators and req.deadline == w.view.fallback_deadline
    assert [c.result_id for c in req.candidates] == [w.view.results[0].id]
    # the sealed candidate's key is handed on at signing (the engine): the machine names what to wrap
    assert [(k.result_id, k.validator) for k in request_out.seal_keys] == [
        (w.view.results[0].id, w.view.fallback_validators[0])
    ]
    assert request_out.seal_keys[0].customer_key == mw.CUSTOMER_KEY
    # the customer and the provider are told, with the new deadline
    told = [
        parse_fallback_started(placeholder_event(o.template))
        for o in plan.events
        if _info(o.template) == "fallback round"
    ]
    assert {t.addressee for t in told} == {mw.CUSTOMER.public_key_hex, mw.PROVIDERS[0]}
    assert {t.deadline for t in told} == {w.view.fallback_deadline}


def test_the_fallback_validator_scores_and_the_job_is_released_without_the_no_shows_fee() -> None:
    w, _ = _at_deadline(_no_show_world())
    # a named validator's late first-round scores are not counted in the fallback round
    late = _play(w, "late first-round scores v0")
    assert late.view.scores == w.view.scores and late.view.state is S.FALLBACK
    plan = machine.step(w.view, mw._scores(w, 0, True), w.now, w.config)
    w = mw.after(w, plan, mw._scores(w, 0, True))
    assert w.view.state is S.RELEASING and w.view.decision is not None and w.view.decision.accepted
    fallback = w.view.fallback_validators[0]
    assert set(w.view.decision.validator_fees) == {mw.VALIDATORS[0], fallback}  # not VALIDATORS[1]
    complete = parse_validation_complete(
        placeholder_event(next(o.template for o in plan.events if _info(o.template) == "validation complete"))
    )
    assert {x.validator for x in complete.scores} == {mw.VALIDATORS[0], fallback}
    assert not mw.violations(w)


def test_both_rounds_missing_quorum_is_a_no_quorum_refund() -> None:
    w, _ = _at_deadline(_no_show_world())
    w = replace(w, now=w.view.fallback_deadline + 1)
    w = mw.step(w, machine.DeadlineReached())
    assert w.view.state in (S.REFUNDING, S.REFUNDED) and w.view.refund_reason == "no_quorum"
    assert not any(p.kind.value == "validator_fee" for p in w.payouts)


def test_a_hold_job_goes_into_custody_when_its_fallback_round_starts() -> None:
    w, plan = _at_deadline(_no_show_world(Mode.HOLD))
    assert w.view.state is S.FALLBACK and w.view.funds is Funds.LOCKED
    assert EffectKind.SETTLE_HOLD in plan.effects


@pytest.mark.parametrize(
    ("params", "pool", "fallback"),
    [
        ((), True, True),  # the escrow announces a pool: allowed by default
        ((("round", "single"),), True, False),  # the customer opted out
        ((("round", "fallback"),), True, True),
        ((("round", "fallback"),), False, False),  # opted in, but no pool to ask
    ],
)
def test_who_allows_a_fallback_round(params: tuple[tuple[str, str], ...], pool: bool, fallback: bool) -> None:
    config = {} if pool else {"validator_pool": ()}
    w, _ = _at_deadline(_no_show_world(params=params, **config))
    assert (w.view.state is S.FALLBACK) is fallback
    if not fallback:
        assert w.view.refund_reason == "no_quorum"


def test_no_eligible_pool_key_means_no_fallback() -> None:
    # the pool holds only the job's own people: the named validators, the provider, the customer
    only_ours = (*mw.VALIDATORS, mw.PROVIDERS[0], mw.CUSTOMER.public_key_hex)
    w, _ = _at_deadline(_no_show_world(validator_pool=only_ours))
    assert w.view.state is S.REFUNDING and w.view.refund_reason == "no_quorum"


def test_quorum_met_at_the_deadline_decides_without_a_fallback() -> None:
    w = mw.start(mw.request(shards=1, validators=2, quorum=1, mode=Mode.CUSTODIAL), config=mw.POOL_CONFIG)
    w = _play(w, "request", "invoice created", "pay", "result p1 s0", "scores v0 good")
    w, _ = _at_deadline(w)
    assert w.view.state is S.RELEASING and w.view.fallback_validators == ()


def test_an_outage_moves_the_fallback_deadline_later_only() -> None:
    w, _ = _at_deadline(_no_show_world())
    due = w.view.fallback_deadline
    assert due is not None
    moved = mw.step(w, machine.DeadlineExtended(None, None, due + 30))
    assert moved.view.fallback_deadline == due + 30 and moved.view.state is S.FALLBACK
    assert mw.step(w, machine.DeadlineExtended(None, None, due - 5)).view.fallback_deadline == due


def test_the_rule_pays_fees_only_to_validators_who_scored() -> None:
    named, fallback = ("a" * 64, "b" * 64), ("c" * 64,)
    cands = [rule.CandidateScores("r" * 64, "p" * 64, 0, {"a" * 64: Decimal("0.9"), "c" * 64: Decimal("0.8")})]
    d = rule.decide(
        cands,
        quorum=2,
        threshold=Decimal("0.5"),
        direction="max",
        policy="best",
        bid_msat=1_000_000,
        fee_msat=11_000,
        validator_fee_msat=5_000,
        validators=(*named, *fallback),
    )
    assert d.validator_fees == {"a" * 64: 5_000, "c" * 64: 5_000}  # the no-show "b" earns nothing
    assert d.provider_rewards == {"r" * 64: 1_000_000 - 11_000 - 10_000}
    assert d.total_msat == 1_000_000


# ---------------------------------------------------------------------------- codec


REQ = EvaluationRequest(
    job_id="1" * 64,
    candidates=(Candidate("2" * 64),),
    validators=(POOL_A,),
    metric="accuracy",
    deadline=mw.T0 + 500,
    round=EvalRound.FALLBACK,
    previous="3" * 64,
)


def test_a_fallback_request_round_trips_with_its_keys() -> None:
    payload = wrap_key(mw.ESCROW, POOL_A, mw.CONTENT_KEY, nonce=bytes(32)).payload
    req = replace(REQ, keys=(ValidatorKey("2" * 64, POOL_A, payload),))
    t = build_evaluation_request(req)
    assert ("param", "round", "fallback") in t.tags and ("e", "3" * 64, "", "previous") in t.tags
    assert parse_evaluation_request(placeholder_event(t)) == req
    assert req.key_for("2" * 64, POOL_A) is not None and key_sha256(mw.CONTENT_KEY)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda tags: [t for t in tags if t[:1] != ("e",) or t[-1] != "previous"],  # no previous link
        lambda tags: [*tags, ("key", "9" * 64, POOL_A, "A" * 100)],  # a key for no candidate
        lambda tags: [*tags, ("key", "2" * 64, POOL_B, "A" * 100)],  # a key for no named validator
        lambda tags: [*tags, ("key", "2" * 64, POOL_A)],  # arity
    ],
)
def test_a_malformed_fallback_request_is_refused(mutate) -> None:
    t = build_evaluation_request(REQ)
    bad = placeholder_event(Template(t.kind, tuple(mutate(list(t.tags))), t.content))
    with pytest.raises(CodecError) as e:
        parse_evaluation_request(bad)
    assert e.value.reason is R.INVALID_FALLBACK_REQUEST


def test_a_first_round_request_carries_no_previous_link_and_no_round_other_than_a_pool_one() -> None:
    first = replace(REQ, round=EvalRound.FIRST, previous=None)
    t = build_evaluation_request(first)
    with pytest.raises(CodecError) as e:
        parse_evaluation_request(
            placeholder_event(Template(t.kind, (*t.tags, ("param", "round", "second")), t.content))
        )
    assert e.value.reason is R.INVALID_ROUND_PARAM
    with pytest.raises(CodecError) as e:  # an appeal round (a pool round) links the first request too
        parse_evaluation_request(
            placeholder_event(Template(t.kind, (*t.tags, ("param", "round", "appeal")), t.content))
        )
    assert e.value.reason is R.INVALID_FALLBACK_REQUEST
    with pytest.raises(CodecError):
        build_evaluation_request(replace(first, previous="3" * 64))


def test_the_round_param_of_a_job_request() -> None:
    spec = mw.request(shards=1, validators=1, mode=Mode.CUSTODIAL).request.spec
    for value, expected in (("fallback", RoundParam.FALLBACK), ("single", RoundParam.SINGLE)):
        t = build_job_request(replace(spec, params=(("round", value),)))
        assert read_job_spec(t.tags, spec.escrow).round is expected
    assert spec.round is None
    with pytest.raises(CodecError) as e:
        build_job_request(replace(spec, params=(("round", "twice"),)))
    assert e.value.reason is R.INVALID_ROUND_PARAM


def test_the_fallback_feedback_and_its_deadline_extension_round_trip() -> None:
    started = FallbackStarted("1" * 64, mw.PROVIDERS[0], mw.T0 + 600)
    t = build_fallback_started(started)
    assert ("status", "processing", "fallback round") in t.tags
    assert parse_fallback_started(placeholder_event(t)) == started
    ext = DeadlineExtension("1" * 64, mw.CUSTOMER.public_key_hex, None, None, fallback_deadline=mw.T0 + 700)
    assert parse_deadline_extension(placeholder_event(build_deadline_extension(ext))) == ext
    mixed = replace(ext, validation_deadline=mw.T0 + 650)
    with pytest.raises(CodecError):
        build_deadline_extension(mixed)


def test_a_pool_validator_opens_the_key_the_escrow_wraps_for_it() -> None:
    """What the engine does at signing: open the escrow -> customer payload, wrap it for the validator."""
    from service.nostr.protocol.sealing import unwrap_key

    pool_key = SecretKey(hashlib.sha256(b"machine pool 0").digest())
    raw = unwrap_key(mw.ESCROW, mw.CUSTOMER.public_key_hex, mw.CUSTOMER_KEY, key_sha256(mw.CONTENT_KEY))
    payload = wrap_key(mw.ESCROW, pool_key.public_key_hex, raw).payload
    assert unwrap_key(pool_key, mw.ESCROW.public_key_hex, payload, key_sha256(mw.CONTENT_KEY)) == mw.CONTENT_KEY


def test_a_baseline_job_asks_the_fallback_validators_for_the_baseline_too() -> None:
    """Relative acceptance (protocol.md §2) survives a fallback round: the pool validator scores the
    baseline with the candidate, and the decision compares the union of both rounds' scores."""
    base_sha = hashlib.sha256(b"global model").hexdigest()
    baseline = Baseline(base_sha, "https://m.example/global.npz", Decimal("0.01"))
    req = mw.request(shards=1, validators=2, mode=Mode.CUSTODIAL, baseline=baseline)
    w = mw.start(req, config=mw.POOL_CONFIG)
    w = _play(w, "request", "invoice created", "pay", "result p0 s0")
    r0 = w.view.results[0]
    v0 = mw.VALIDATORS[0]
    first = (machine.Score(r0.id, r0.model_sha256, Decimal("0.9")), machine.Score(BASELINE, base_sha, Decimal("0.6")))
    w = mw.step(w, machine.ScoresReceived(v0, w.view.eval_request_id or "", first, "a1" * 32, w.now, w.now))
    w, plan = _at_deadline(w)  # v1 never scored: short of quorum 2
    assert w.view.state is S.FALLBACK
    [ask] = [o.evaluation for o in plan.events if o.role is EventRole.FALLBACK_REQUEST]
    assert ask is not None and ask.baseline == (base_sha, "https://m.example/global.npz")
    [pool_v] = w.view.fallback_validators
    scores = (machine.Score(r0.id, r0.model_sha256, Decimal("0.8")), machine.Score(BASELINE, base_sha, Decimal("0.7")))
    only_candidate = mw.step(
        w, machine.ScoresReceived(pool_v, w.view.fallback_request_id or "", scores[:1], "b1" * 32, w.now, w.now)
    )
    assert only_candidate.view.state is S.FALLBACK  # the baseline is still to be scored
    w = mw.step(w, machine.ScoresReceived(pool_v, w.view.fallback_request_id or "", scores, "b2" * 32, w.now, w.now))
    assert w.view.state is S.RELEASING and w.view.decision is not None
    [verdict] = w.view.decision.verdicts
    assert verdict.accepted  # median 0.85 beats the baseline's 0.65 by more than 0.01
    assert not mw.violations(w)
