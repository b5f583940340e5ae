"""The escrow's state machine, pure and in memory (service/escrow/machine.py).

- the table test: every (state, fact) pair, over views that differ in mode, funds, results,
  scores and payouts, lands in a state the table allows, and every entry of the table is
  reached by some view (the table is exact, not merely permissive);
- the exhaustive check: every sequence of facts the world can produce, up to a bounded length,
  from a new job (duplicates, reorderings and deadlines included), with the invariants after
  each step (tests/support/machine_world.py: money conserved, nothing paid twice, a payout only
  for an accepted result or a refund, final states with the job's accounts at zero).
"""

from __future__ import annotations

import hashlib
import itertools
import time
from dataclasses import replace
from decimal import Decimal

import pytest

from service.escrow import machine
from service.escrow.machine import TRANSITIONS, FactKind, Funds, JobState
from service.escrow.rule import ScoreValue
from service.ledger import accounts, postings
from service.nostr.nip01 import SecretKey
from service.nostr.protocol import (
    BASELINE,
    Baseline,
    Mode,
    parse_claim_expired,
    parse_evaluation_request,
    parse_model_key,
    parse_reward_paid,
    parse_validation_complete,
)
from service.nostr.protocol.fields import Template, placeholder_event
from service.nostr.protocol.sealing import SealError, key_sha256, unwrap_key
from tests.support import machine_world as mw

S = JobState


def _worlds(depth: int, roots: list[mw.World]) -> dict[str, mw.World]:
    """Every distinct world reachable from ``roots`` in at most ``depth`` facts."""
    seen: dict[str, mw.World] = {}
    frontier = roots
    for _ in range(depth + 1):
        nxt = []
        for w in frontier:
            key = _key(w)
            if key in seen:
                continue
            seen[key] = w
            nxt.extend(x for _, x in mw.actions(w))
        frontier = nxt
    return seen


def _key(w: mw.World) -> str:
    return repr(replace(w, last=None))


ROOTS = [
    mw.start(mw.request(shards=1, validators=1, mode=m, policy=p))
    for m in (Mode.HOLD, Mode.CUSTODIAL)
    for p in ("best", "split")
]


@pytest.fixture(scope="module")
def reachable() -> dict[str, mw.World]:
    wide = mw.start(mw.request(shards=2, validators=2, quorum=1, mode=Mode.CUSTODIAL), overpay=150_000)
    too_long_for_hold = mw.start(mw.request(shards=1, validators=1, mode=Mode.HOLD, validation_in=200_000))
    dust = [mw.start(mw.request(shards=1, validators=1, mode=m), config=mw.DUST) for m in (Mode.HOLD, Mode.CUSTODIAL)]
    # An escrow outage across a deadline (DeadlineExtended), once per world, from these roots.
    outage = [mw.start(mw.request(shards=1, validators=1, mode=m), outages=1) for m in (Mode.HOLD, Mode.CUSTODIAL)]
    # A fallback round: two named validators and quorum 2 (one no-show reaches it), from the pool.
    fallback = [
        mw.start(mw.request(shards=1, validators=2, mode=m), config=cfg, outages=1)
        for m in (Mode.HOLD, Mode.CUSTODIAL)
        for cfg in (mw.POOL_CONFIG, replace(mw.DUST, validator_pool=mw.POOL_CONFIG.validator_pool))
    ]
    # two candidates, quorum 1, nobody scored: one pool validator, who may score one candidate only
    fallback_wide = mw.start(mw.request(shards=2, validators=2, quorum=1, mode=Mode.CUSTODIAL), config=mw.POOL_CONFIG)
    # Claim windows: rewards and a refund nobody claims expire, and an operator reopens one.
    claims = [
        mw.start(mw.request(shards=1, validators=1, mode=Mode.CUSTODIAL, refund=r), config=mw.CLAIMS, claims=3)
        for r in (None, "refund@wallet.example")
    ]
    # Appeals: a pool for the appeal round (one named validator; two with a fallback round first), or none.
    appeals = [
        mw.start(mw.request(shards=1, validators=n, mode=m), config=mw.APPEALS, outages=1)
        for m in (Mode.HOLD, Mode.CUSTODIAL)
        for n in (1, 2)
    ]
    dusty = replace(mw.APPEAL_TERMS, routing_fee_ppm=1_000_000)  # a refund gives back nothing: refunded at once
    appeals += [
        mw.start(mw.request(shards=1, validators=1, mode=m), config=replace(cfg, terms=dusty))
        for cfg in (mw.APPEALS, mw.APPEALS_NO_POOL)
        for m in (Mode.HOLD, Mode.CUSTODIAL)
    ]
    appeals_no_pool = mw.start(mw.request(shards=1, validators=1, mode=Mode.CUSTODIAL), config=mw.APPEALS_NO_POOL)
    worlds = _worlds(
        9,
        [*ROOTS, wide, too_long_for_hold, *dust, *outage, *fallback, fallback_wide, *claims, *appeals, appeals_no_pool],
    )
    # Deeper than the search: an appeal's verdict releasing a hold job whose HTLC then goes back, and an
    # appeal fee paid after the deadline of a job that has finished meanwhile (closed, refunded).
    for w in _appeal_edges():
        worlds[_key(w)] = w
    return worlds


def _appeal_edges() -> list[mw.World]:
    out = []
    hold = mw.start(mw.request(shards=1, validators=1, mode=Mode.HOLD), config=mw.APPEALS)
    w = _play(hold, "request", "invoice created", "pay", "result p0 s0", "scores v0 good", "appeal by the customer")
    out.append(_play(w, "appeal invoice created", "appeal fee paid", "appeal scores a0 good"))  # lost: releasing
    custodial = mw.start(mw.request(shards=1, validators=1, mode=Mode.CUSTODIAL), config=mw.APPEALS)
    w = _play(
        custodial, "request", "invoice created", "pay", "result p1 s0", "scores v0 good", "appeal by the customer"
    )
    w = _paid_out(_play(w, "appeal invoice created", "deadline"))
    assert w.view.state is S.CLOSED, w.view.state
    out.append(w)
    dusty = replace(mw.APPEALS, terms=replace(mw.APPEAL_TERMS, routing_fee_ppm=1_000_000))
    w = _play(mw.start(mw.request(shards=1, validators=1, mode=Mode.CUSTODIAL), config=dusty), "request")
    w = _play(w, "invoice created", "pay", "result p0 s0", "scores v0 bad", f"appeal by {mw.PROVIDERS[0][:4]}")
    w = _play(w, "appeal invoice created", "deadline")
    assert w.view.state is S.REFUNDED, w.view.state
    out.append(w)
    return out


def _paid_out(w: mw.World) -> mw.World:
    """Every payout of ``w`` paid (the payee gives an invoice where one is needed)."""
    for _ in range(8):
        nxt = dict(mw.actions(w))
        label = next((k for k in nxt if k.endswith("invoice given") or k.endswith("succeeded")), None)
        if label is None:
            break
        w = nxt[label]
    return w


def _facts(w: mw.World) -> list[tuple[FactKind, mw.World, JobState]]:
    """The facts possible in ``w``: (kind, world before, state after)."""
    out = []
    for _, nxt in mw.actions(w):
        if nxt.last is not None and nxt is not w:
            out.append((nxt.last.kind, w, nxt.view.state))
    return out


def test_every_state_fact_pair_lands_where_the_table_says(reachable: dict[str, mw.World]) -> None:
    produced: dict[tuple[JobState, FactKind], set[JobState]] = {}
    for w in reachable.values():
        for kind, before, to in _facts(w):
            pair = (before.view.state, kind)
            allowed = TRANSITIONS.get(pair, frozenset()) | {before.view.state}
            assert to in allowed, f"{before.view.state} --{kind}--> {to}: not in the table"
            produced.setdefault(pair, set()).add(to)
    # Every table entry happens (no transition listed that the machine never makes) ...
    for pair, targets in TRANSITIONS.items():
        missing = targets - produced.get(pair, set())
        assert not missing, f"{pair[0]} --{pair[1]}--> {sorted(missing)} is in the table but never happens"
    # ... and every stored state meets every fact that can reach it.
    states = {s for s, _ in produced}
    assert states >= set(JobState) - {S.REJECTED}


def test_a_fact_outside_the_table_is_refused_by_step() -> None:
    w = mw.start(mw.request(shards=1, validators=1, mode=Mode.CUSTODIAL))
    bad = dict(TRANSITIONS)
    bad[(S.NEW, FactKind.REQUEST_ACCEPTED)] = frozenset({S.REJECTED})
    original = machine.TRANSITIONS
    machine.TRANSITIONS = bad  # type: ignore[misc]
    try:
        with pytest.raises(machine.IllegalTransition):
            machine.step(w.view, w.request, mw.T0, mw.CONFIG)
    finally:
        machine.TRANSITIONS = original  # type: ignore[misc]


def test_a_request_whose_job_no_mode_can_hold_is_rejected_with_the_reason() -> None:
    long = replace(mw.CONFIG, terms=replace(mw.TERMS, modes=frozenset({Mode.HOLD}), max_hold_seconds=100))
    w = mw.start(mw.request(shards=1, validators=1, mode=Mode.AUTO))
    plan = machine.step(w.view, w.request, mw.T0, long)
    assert plan.state is S.REJECTED and plan.new_job is not None
    assert plan.new_job.reject_reason.startswith("hold_window_exceeded")
    only_custodial = replace(mw.CONFIG, terms=replace(mw.TERMS, modes=frozenset({Mode.CUSTODIAL})))
    plan = machine.step(w.view, mw.request(shards=1, validators=1, mode=Mode.HOLD), mw.T0, only_custodial)
    assert plan.new_job is not None and plan.new_job.reject_reason.startswith("mode_not_offered")
    assert machine.step(w.view, w.request, mw.T0, only_custodial).new_job.mode is machine.EscrowMode.CUSTODIAL


def test_every_sequence_of_facts_keeps_the_invariants() -> None:
    """Depth-first over every sequence of facts (length <= DEPTH) from a new job, each world's
    invariants checked once (a world reached by two sequences is the same world: the machine is
    deterministic); the number of sequences is counted by paths."""
    depth = 12
    t0 = time.monotonic()
    seen: dict[tuple[str, int], int] = {}
    checked: dict[str, list[str]] = {}

    def paths(w: mw.World, left: int) -> int:
        key = _key(w)
        if key not in checked:
            checked[key] = mw.violations(w)
            assert not checked[key], (key[:300], checked[key])
        if left == 0:
            return 1
        memo = seen.get((key, left))
        if memo is not None:
            return memo
        n = 1 + sum(paths(x, left - 1) for _, x in mw.actions(w))
        seen[(key, left)] = n
        return n

    roots = [
        *ROOTS,
        *(mw.start(mw.request(shards=1, validators=1, mode=m), config=mw.DUST) for m in (Mode.HOLD, Mode.CUSTODIAL)),
        mw.start(mw.request(shards=2, validators=2, quorum=1, mode=Mode.HOLD, policy="split"), overpay=150_000),
        # an escrow outage across a deadline, once: hold (its money goes into custody first)
        mw.start(mw.request(shards=1, validators=1, mode=Mode.HOLD), outages=1),
        # claim windows: a payout nobody claims expires (reopens: the table test and the engine-vs-machine test)
        mw.start(mw.request(shards=1, validators=1, mode=Mode.CUSTODIAL, refund=None), config=mw.CLAIMS, claims=1),
    ]
    # a fallback round (two named validators, quorum 2, a pool; hold: its money goes into custody
    # first), three facts shorter (to its release): the extra validator multiplies the sequences
    fallback = mw.start(mw.request(shards=1, validators=2, mode=Mode.HOLD), config=mw.POOL_CONFIG)
    # an appeal (hold: its money may stay locked through the appeal round): the customer's or a
    # provider's, paid in time or late, won or lost, and the late fee of a finished job
    appeal = mw.start(mw.request(shards=1, validators=1, mode=Mode.HOLD), config=mw.APPEALS)
    total = sum(paths(r, depth) for r in roots) + paths(fallback, depth - 3) + paths(appeal, depth)
    elapsed = time.monotonic() - t0
    print(
        f"\nexhaustive check: {total:,} sequences of up to {depth} facts, {len(checked):,} distinct worlds, "
        f"{elapsed:.1f} s"
    )
    assert total > 1_000_000 and len(checked) > 10_000


def test_a_whole_round_reaches_closed_with_zero_accounts() -> None:
    for mode in (Mode.HOLD, Mode.CUSTODIAL):
        w = mw.start(mw.request(shards=1, validators=1, mode=mode))
        script = ["request", "invoice created", "pay", "result p0 s0", "scores v0 good"]
        script += ["settle"] if mode is Mode.HOLD else []
        for label in script:
            w = dict(mw.actions(w))[label]
        for _ in range(6):  # the payee gives an invoice where needed; each payout succeeds
            nxt = dict(mw.actions(w))
            label = next((k for k in nxt if k.endswith("invoice given") or k.endswith("succeeded")), None)
            if label is None:
                break
            w = nxt[label]
        assert w.view.state is S.CLOSED, (mode, w.view.state)
        assert w.view.held_msat == 0 and w.view.owed_msat == 0 and not mw.violations(w)
        assert w.view.funds is Funds.HELD


def test_table_markdown_is_generated_from_the_table() -> None:
    text = machine.transition_table_markdown()
    for (state, kind), targets in TRANSITIONS.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| {state.value} | {kind.value} |"))
        assert all(t.value in row for t in targets)
    assert len([x for x in text.splitlines() if x.startswith("| ") and "---" not in x]) == len(TRANSITIONS) + 1


def test_the_docs_show_the_table_as_generated() -> None:
    """docs/escrow.md carries the generated table between its markers (drift test)."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "escrow.md").read_text()
    begin, end = "<!-- transitions:begin -->", "<!-- transitions:end -->"
    assert begin in doc and end in doc, "docs/escrow.md lacks the transition table markers"
    shown = doc.split(begin, 1)[1].split(end, 1)[0].strip()
    assert shown == machine.transition_table_markdown().strip(), (
        "docs/escrow.md's transition table differs from service/escrow/machine.py: "
        "run `python -m service.escrow.machine --update docs/escrow.md`"
    )


def test_pairs_are_every_state_and_fact() -> None:
    assert {s for s, _ in TRANSITIONS} <= set(JobState) and {f for _, f in TRANSITIONS} <= set(FactKind)
    # Only a cancelled job may still be paid, and an operator may reopen a finished job's expired claim.
    reopen = {
        (S.CLOSED, FactKind.PAYOUT_REOPENED),
        (S.REFUNDED, FactKind.PAYOUT_REOPENED),
        (S.CLOSED, FactKind.APPEAL_FEE_PAID),  # a late appeal fee is owed back
        (S.REFUNDED, FactKind.APPEAL_FEE_PAID),
    }
    assert not any(s.final for s, f in TRANSITIONS if s is not S.CANCELLED and (s, f) not in reopen)
    assert list(itertools.islice(TRANSITIONS, 1)) == [(S.NEW, FactKind.REQUEST_ACCEPTED)]


# ---------------------------------------------------------------------------- sealed results (§5a)


def _play(w: mw.World, *labels: str) -> mw.World:
    for label in labels:
        w = dict(mw.actions(w))[label]
    return w


def _sealed(w: mw.World, provider: int, shard: int) -> machine.ResultReceived:
    fact = mw._result(w, provider, shard)
    r = replace(
        fact.result,
        ciphertext_sha256=hashlib.sha256(f"ciphertext {provider}".encode()).hexdigest(),
        key_sha256=key_sha256(mw.CONTENT_KEY),
        customer_key=mw.CUSTOMER_KEY,
    )
    return replace(fact, result=r)


def _scores_of(w: mw.World, validator: int, values: list[ScoreValue]) -> machine.ScoresReceived:
    scores = tuple(machine.Score(r.id, r.model_sha256, v) for r, v in zip(w.view.results, values, strict=True))
    eid = hashlib.sha256(f"scores {validator} {values}".encode()).hexdigest()
    return machine.ScoresReceived(mw.VALIDATORS[validator], w.view.eval_request_id or "", scores, eid, w.now, w.now)


def _events(w: mw.World, fact: machine.Fact) -> tuple[mw.World, list[Template]]:
    plan = machine.step(w.view, fact, w.now, w.config)
    return mw.after(w, plan, fact), [o.template for o in plan.events]


def _info(t: Template) -> str:
    return next((x[2] for x in t.tags if x[0] == "status" and len(x) > 2), "")


def test_custodial_the_key_is_published_at_the_decision_and_opens_for_the_customer_only() -> None:
    w = _play(mw.start(mw.request(shards=1, validators=1, mode=Mode.CUSTODIAL)), "request", "invoice created", "pay")
    w = _play(w, "result p0 s0")  # provider 0's result is sealed
    w, events = _events(w, _scores_of(w, 0, [Decimal("0.9")]))
    assert w.view.state is S.RELEASING
    keys = [parse_model_key(placeholder_event(t)) for t in events if _info(t) == "model key"]
    rid = w.view.results[0].id
    assert [k.result_id for k in keys] == [rid] == list(w.keys)
    assert keys[0].customer == mw.CUSTOMER.public_key_hex
    assert unwrap_key(mw.CUSTOMER, mw.ESCROW.public_key_hex, keys[0].payload, key_sha256(mw.CONTENT_KEY)) == (
        mw.CONTENT_KEY
    )
    provider = SecretKey(hashlib.sha256(b"machine provider 1").digest())
    with pytest.raises(SealError):  # encrypted escrow -> customer: another key does not open it
        unwrap_key(provider, mw.ESCROW.public_key_hex, keys[0].payload, key_sha256(mw.CONTENT_KEY))
    # the rest of the round publishes no key again
    for _ in range(6):
        nxt = dict(mw.actions(w))
        label = next((k for k in nxt if k.endswith("invoice given") or k.endswith("succeeded")), None)
        if label is None:
            break
        w = nxt[label]
    assert w.view.state is S.CLOSED and w.keys == (rid,) and not mw.violations(w)


def test_hold_no_key_at_the_decision_only_once_the_invoice_is_settled() -> None:
    w = _play(mw.start(mw.request(shards=1, validators=1, mode=Mode.HOLD)), "request", "invoice created", "pay")
    w = _play(w, "result p0 s0", "scores v0 good")
    assert w.view.state is S.RELEASING and w.view.funds is Funds.LOCKED
    assert w.keys == () and machine.EffectKind.SETTLE_HOLD in w.effects
    settled = _play(w, "settle")
    assert settled.keys == (w.view.results[0].id,)
    assert _play(settled, "duplicate").keys == settled.keys  # a replayed settle releases nothing again
    # The hold expired before it was settled: refunded, and the key is never released.
    cancelled = _play(w, "cancel")
    assert cancelled.view.state is S.REFUNDED and cancelled.keys == ()
    assert all(not x.keys for _, x in mw.actions(cancelled))


def test_a_refunded_job_releases_no_key() -> None:
    for mode in (Mode.HOLD, Mode.CUSTODIAL):
        start = _play(mw.start(mw.request(shards=1, validators=1, mode=mode)), "request", "invoice created", "pay")
        w = _play(start, "result p0 s0")
        for path in (["operator refund"], ["scores v0 bad"], ["deadline"]):
            end = _play(w, *path)
            assert end.view.state in (S.REFUNDING, S.REFUNDED), (mode, path, end.view.state)
            assert end.keys == () and not mw.violations(end), (mode, path)
            for _ in range(3):  # and nothing that follows releases one (settles, payouts, duplicates)
                for _, nxt in mw.actions(end):
                    assert nxt.keys == (), (mode, path)
                end = next((x for _, x in mw.actions(end)), end)


def test_an_unreadable_median_rejects_the_result_and_is_published_as_such() -> None:
    w = _play(mw.start(mw.request(shards=1, validators=1, mode=Mode.CUSTODIAL)), "request", "invoice created", "pay")
    w = _play(w, "result p0 s0")
    w, events = _events(w, _scores_of(w, 0, [machine.UNREADABLE]))
    assert w.view.state is S.REFUNDING and w.view.refund_reason == "no_accepted_result" and w.keys == ()
    assert w.view.decision is not None and w.view.decision.verdicts[0].unreadable
    complete = parse_validation_complete(
        placeholder_event(next(t for t in events if _info(t) == "validation complete"))
    )
    rid = w.view.results[0].id
    assert complete.verdicts[0].unreadable and complete.verdicts[0].median is None and not complete.verdicts[0].accepted
    assert [(x.result_id, x.validator, x.value) for x in complete.scores] == [(rid, mw.VALIDATORS[0], None)]


def test_best_releases_only_the_winners_key_and_split_every_paid_one() -> None:
    for policy, winners in (("best", [0]), ("split", [0, 1])):
        w = mw.start(mw.request(shards=2, validators=1, mode=Mode.CUSTODIAL, policy=policy))
        w = _play(w, "request", "invoice created", "pay")
        w = mw.step(w, _sealed(w, 0, 0))
        w = mw.step(w, _sealed(w, 1, 1))
        assert w.view.state is S.VALIDATING
        w = mw.step(w, _scores_of(w, 0, [Decimal("0.9"), Decimal("0.7")]))  # both accepted; result 0 is best
        assert w.view.decision is not None and all(v.accepted for v in w.view.decision.verdicts)
        assert w.keys == tuple(w.view.results[k].id for k in winners), policy
        assert not mw.violations(w)


def test_the_validation_complete_carries_every_counted_score_and_the_split() -> None:
    w = mw.start(mw.request(shards=2, validators=2, quorum=1, mode=Mode.CUSTODIAL, policy="split"))
    w = _play(w, "request", "invoice created", "pay", "result p0 s0", "result p1 s1")
    w = mw.step(w, _scores_of(w, 1, [machine.UNREADABLE, Decimal("0.8")]))
    w, events = _events(w, _scores_of(w, 0, [Decimal("0.9"), Decimal("0.7")]))
    complete = parse_validation_complete(
        placeholder_event(next(t for t in events if _info(t) == "validation complete"))
    )
    r0, r1 = (r.id for r in w.view.results)
    v0, v1 = mw.VALIDATORS
    assert [(x.result_id, x.validator, x.value) for x in complete.scores] == [
        (r0, v0, Decimal("0.9")),
        (r0, v1, None),
        (r1, v0, Decimal("0.7")),
        (r1, v1, Decimal("0.8")),
    ]
    assert complete.split == w.view.req.split
    # r0: the mean with an unreadable score: rejected unreadable; r1 accepted at 0.75 and its key is not sealed
    assert [(v.accepted, v.unreadable) for v in complete.verdicts] == [(False, True), (True, False)]
    assert w.keys == ()


def test_the_reward_paid_receipt_names_the_invoice_that_was_paid() -> None:
    w = _play(mw.start(mw.request(shards=1, validators=1, mode=Mode.CUSTODIAL)), "request", "invoice created", "pay")
    w = _play(w, "result p1 s0", "scores v0 good")  # provider 1 is paid at its lud16 address
    reward = next(p for p in w.payouts if p.kind.value == "reward")
    preimage = hashlib.sha256(b"receipt").hexdigest()
    done = replace(
        reward,
        state=machine.PayoutState.SUCCEEDED,
        preimage=preimage,
        payment_hash=hashlib.sha256(bytes.fromhex(preimage)).hexdigest(),
        bolt11=mw.FAKE_BOLT11,
    )
    w = replace(w, view=replace(w.view, payouts=tuple(done if p.id == done.id else p for p in w.view.payouts)))
    _, events = _events(w, machine.PayoutSucceeded(done))
    paid = parse_reward_paid(placeholder_event(next(t for t in events if _info(t) == "reward paid")))
    assert paid.bolt11 == mw.FAKE_BOLT11 and paid.payment.payment_hash == done.payment_hash


# ------------------------------------------------------------------ relative acceptance (§2, §6)


def test_a_baseline_job_asks_for_the_baselines_score_and_rejects_the_unchanged_model() -> None:
    base_sha = hashlib.sha256(b"the round's global model").hexdigest()
    req = mw.request(
        shards=2,
        validators=1,
        mode=Mode.CUSTODIAL,
        policy="split",
        baseline=Baseline(base_sha, "https://m.example/global.npz", Decimal("0.01")),
    )
    w = _play(mw.start(req), "request", "invoice created", "pay", "result p0 s0")
    w, events = _events(w, mw._result(w, 1, 1))
    assert w.view.state is S.VALIDATING
    [ask] = [parse_evaluation_request(placeholder_event(t)) for t in events if t.kind == 5702]
    assert ask.baseline == (base_sha, "https://m.example/global.npz")
    r0, r1 = w.view.results
    v0 = mw.VALIDATORS[0]
    scores = (
        machine.Score(r0.id, r0.model_sha256, Decimal("0.7")),  # the unchanged model: the baseline's score
        machine.Score(r1.id, r1.model_sha256, Decimal("0.8")),
    )
    # scores of the candidates alone do not end the round: the baseline is still to be scored
    w = mw.step(w, machine.ScoresReceived(v0, w.view.eval_request_id or "", scores[:1], "e1" * 32, w.now, w.now))
    assert w.view.state is S.VALIDATING
    wrong = machine.Score(BASELINE, hashlib.sha256(b"another model").hexdigest(), Decimal("0.1"))
    w = mw.step(w, machine.ScoresReceived(v0, w.view.eval_request_id or "", (wrong,), "e2" * 32, w.now, w.now))
    assert w.view.state is S.VALIDATING  # a score of another model is not the baseline's
    rest = (scores[1], machine.Score(BASELINE, base_sha, Decimal("0.7")))
    w, events = _events(w, machine.ScoresReceived(v0, w.view.eval_request_id or "", rest, "e3" * 32, w.now, w.now))
    assert w.view.state is S.RELEASING
    assert w.view.decision is not None
    assert [(v.result_id, v.accepted) for v in w.view.decision.verdicts] == [(r0.id, False), (r1.id, True)]
    complete = parse_validation_complete(
        placeholder_event(next(t for t in events if _info(t) == "validation complete"))
    )
    assert (BASELINE, v0, Decimal("0.7")) in [(x.result_id, x.validator, x.value) for x in complete.scores]
    assert [p.earned_by for p in w.payouts if p.kind == "reward"] == [r1.id]
    assert not mw.violations(w)


# ---------------------------------------------------------------------------- claim windows (§7)


def _claim_world(refund: str | None = "refund@wallet.example") -> mw.World:
    """A custodial job released to provider 0 (no address: its reward waits for an invoice) and
    its validator, with a 1000 s claim window (reminder 100 s before)."""
    w = mw.start(mw.request(shards=1, validators=1, mode=Mode.CUSTODIAL, refund=refund), config=mw.CLAIMS, claims=9)
    return _play(w, "request", "invoice created", "pay", "result p0 s0", "scores v0 good")


def _tags(template: Template) -> dict[str, tuple[str, ...]]:
    return {t[0]: tuple(t[1:]) for t in template.tags}


def test_a_waiting_payout_announces_its_claim_by_from_its_creation() -> None:
    w = _claim_world()
    assert w.view.state is S.RELEASING
    waiting = [p for p in w.payouts if p.state is machine.PayoutState.NEEDS_INVOICE]
    assert len(waiting) == 2 and all(p.claim_by == w.now + 1_000 for p in waiting)
    fresh = mw.start(mw.request(shards=1, validators=1, mode=Mode.CUSTODIAL), config=mw.CLAIMS)
    before = _play(fresh, "request", "invoice created", "pay", "result p0 s0")
    plan = machine.step(before.view, mw._scores(before, 0, True), w.now, w.config)
    claimables = [o.template for o in plan.events if _tags(o.template)["status"][1] == "reward claimable"]
    assert claimables and all(_tags(t)["claim_by"] == (str(w.now + 1_000),) for t in claimables)
    assert all(np.claim_by == w.now + 1_000 and np.remind_at == w.now + 900 for np in plan.payouts)


def test_the_reminder_repeats_the_claimable_with_its_reason_and_only_while_it_waits() -> None:
    w = _claim_world()
    p = next(x for x in w.payouts if x.state is machine.PayoutState.NEEDS_INVOICE)
    plan = machine.step(w.view, machine.ClaimReminder(p), w.now + 900, w.config)
    (event,) = plan.events
    tags = _tags(event.template)
    assert tags["reason"] == ("claim_window_ending",) and tags["claim_by"] == (str(p.claim_by),)
    assert plan.state is S.RELEASING and not plan.postings
    paid = replace(p, state=machine.PayoutState.PENDING)
    assert not machine.step(w.view, machine.ClaimReminder(paid), w.now + 900, w.config).events
    late = machine.step(w.view, machine.ClaimReminder(p), p.claim_by or 0, w.config)
    assert not late.events and late.outcome.startswith("ignored")


def test_an_expired_claim_is_booked_to_unclaimed_told_to_the_payee_and_closes_the_job() -> None:
    w = _claim_world()
    w = _play(w, "payout 0 claim expired")
    assert w.view.state is S.RELEASING  # the validator's fee is still owed
    w = _play(w, "payout 1 claim expired")
    assert w.view.state is S.CLOSED and w.view.owed_msat == 0 and not mw.violations(w)
    expired = sum(p.amount_msat for p in w.payouts)
    assert -w.balance(accounts.UNCLAIMED) == expired
    # Replayed, the fact books nothing twice.
    again = machine.step(w.view, w.last, w.now, w.config)  # type: ignore[arg-type]
    assert not again.postings and again.outcome.startswith("ignored")
    last = replace(w.payouts[1], state=machine.PayoutState.EXPIRED)
    before = _play(_claim_world(), "payout 0 claim expired")
    plan = machine.step(before.view, machine.PayoutExpired(last), before.now + 1_000, before.config)
    (event,) = plan.events
    body = parse_claim_expired(placeholder_event(event.template))
    assert body.payee == last.payee and body.amount_msat == last.amount_msat and body.claim_by == last.claim_by


def test_a_reopened_claim_is_owed_again_and_paid_once_then_the_job_closes_again() -> None:
    w = _play(_claim_world(), "payout 0 claim expired", "payout 1 claim expired")
    w = _play(w, "payout 0 reopened")
    assert w.view.state is S.RELEASING and w.view.owed_msat == w.payouts[0].amount_msat
    (event,) = machine.step(
        replace(w.view, posted=w.view.posted - {postings.reclaimed_key(w.payouts[0].id, 0)}),
        w.last,  # type: ignore[arg-type]
        w.now,
        w.config,
    ).events
    assert _tags(event.template)["reason"] == ("claim_reopened",)
    assert -w.balance(accounts.UNCLAIMED) == w.payouts[1].amount_msat and not mw.violations(w)
    w = _play(w, "payout 0 invoice given", "payout 0 succeeded")
    assert w.view.state is S.CLOSED and w.sent_msat == w.payouts[0].amount_msat and not mw.violations(w)


def test_a_refund_nobody_claims_expires_and_the_job_is_refunded() -> None:
    w = mw.start(mw.request(shards=1, validators=1, mode=Mode.CUSTODIAL, refund=None), config=mw.CLAIMS, claims=9)
    w = _play(w, "request", "invoice created", "pay", "deadline")
    assert w.view.state is S.REFUNDING
    w = _play(w, "payout 0 claim expired")
    assert w.view.state is S.REFUNDED and not mw.violations(w)
    w = _play(w, "payout 0 reopened")
    assert w.view.state is S.REFUNDING
    w = _play(w, "payout 0 invoice given", "payout 0 succeeded")
    assert w.view.state is S.REFUNDED and w.sent_msat == w.payouts[0].amount_msat and not mw.violations(w)


def test_no_window_means_no_claim_by_and_no_expiry() -> None:
    w = mw.start(mw.request(shards=1, validators=1, mode=Mode.CUSTODIAL))
    w = _play(w, "request", "invoice created", "pay", "result p0 s0", "scores v0 good")
    assert all(p.claim_by is None for p in w.payouts)
    assert not any("claim expired" in label for label, _ in mw.actions(replace(w, claims=9)))


@pytest.mark.parametrize(
    ("window", "reminder", "expected"),
    [(0, 100, (None, None)), (1_000, 100, (2_000, 1_900)), (1_000, 800, (2_000, 1_500)), (1_000, 0, (2_000, 2_000))],
)
def test_the_reminder_comes_before_the_end_at_most_half_the_window_early(
    window: int, reminder: int, expected: tuple[int | None, int | None]
) -> None:
    assert machine.ClaimWindow(window, reminder).times(1_000) == expected
