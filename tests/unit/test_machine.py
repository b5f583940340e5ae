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

import itertools
import time
from dataclasses import replace

import pytest

from service.escrow import machine
from service.escrow.machine import TRANSITIONS, FactKind, Funds, JobState
from service.nostr.protocol import Mode
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
    return _worlds(9, [*ROOTS, wide, too_long_for_hold, *dust])


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
    ]
    total = sum(paths(r, depth) for r in roots)
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
    assert not any(s.final for s, _ in TRANSITIONS if s is not S.CANCELLED)  # only a cancelled job may still be paid
    assert list(itertools.islice(TRANSITIONS, 1)) == [(S.NEW, FactKind.REQUEST_ACCEPTED)]
