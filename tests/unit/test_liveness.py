"""Deadlines that survive the escrow's outages: the pure rules (service/liveness.py), the heartbeat's
writes on a real database, and the machine's DeadlineExtended (service/escrow/machine.py)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.db import create_engine, session_factory
from service.escrow import machine
from service.escrow.machine import EffectKind, Funds, JobState
from service.liveness import Heartbeat, LivenessInterval, Outage, extend_deadline, outages, outages_since
from service.nostr.protocol import (
    CodecError,
    DeadlineExtension,
    Mode,
    build_deadline_extension,
    parse_deadline_extension,
    parse_escrow_feedback,
)
from service.nostr.protocol.fields import placeholder_event, template
from service.nostr.protocol.terms import KIND_FEEDBACK
from tests.support import machine_world as mw

S = JobState

# ---------------------------------------------------------------------------- the extension rule


def test_an_outage_inside_the_window_adds_its_length() -> None:
    assert extend_deadline(1000, 0, [Outage(100, 130)]) == 1030


def test_an_outage_that_swallows_the_deadline_gives_back_the_part_of_the_window_it_took() -> None:
    # Down from 990 to 1200: 10 s of the window were lost; they are given back after the return.
    assert extend_deadline(1000, 0, [Outage(990, 1200)]) == 1210


def test_outages_outside_the_window_change_nothing() -> None:
    assert extend_deadline(1000, 500, [Outage(100, 400), Outage(1000, 1500), Outage(2000, 3000)]) == 1000


def test_an_outage_that_began_before_the_window_counts_from_its_start() -> None:
    assert extend_deadline(1000, 500, [Outage(100, 600)]) == 1100


def test_an_outage_after_the_original_deadline_but_before_the_extended_one_extends_again() -> None:
    # The first outage moves 1000 to 1210; the escrow is down again from 1205 to 1300.
    assert extend_deadline(1000, 0, [Outage(990, 1200), Outage(1205, 1300)]) == 1305


def test_after_an_outage_that_swallowed_the_deadline_the_backlog_has_its_catch_up() -> None:
    # Down from a second before the deadline: one second back is less than reading the relays'
    # backlog takes; the deadline is at least the catch-up after the return.
    assert extend_deadline(1000, 0, [Outage(999, 1100)], catch_up=60) == 1160
    assert extend_deadline(1000, 0, [Outage(900, 1100)], catch_up=60) == 1200  # 100 s back is more
    assert extend_deadline(1000, 0, [Outage(100, 130)], catch_up=60) == 1030  # long before: its length


def test_fractional_outages_round_the_deadline_up() -> None:
    assert extend_deadline(1000, 0, [Outage(100.2, 100.5)]) == 1001


_outage_lists = st.lists(
    st.tuples(st.integers(0, 5_000), st.integers(1, 2_000)).map(lambda x: Outage(x[0], x[0] + x[1])), max_size=5
).map(lambda xs: sorted(_disjoint(xs)))


def _disjoint(xs: list[Outage]) -> list[Outage]:
    out: list[Outage] = []
    for o in sorted(xs):
        if not out or o.start > out[-1].end:
            out.append(o)
    return out


_catch_up = st.sampled_from([0, 15, 60])


@settings(max_examples=300, deadline=None)
@given(d=st.integers(1, 6_000), s=st.integers(0, 1_000), down=_outage_lists, c=_catch_up)
def test_never_earlier_and_never_more_than_the_outages_added(d: int, s: int, down: list[Outage], c: int) -> None:
    extended = extend_deadline(d, s, down, c)
    assert extended >= d
    # at most every outage's whole length and a catch-up each
    assert extended <= d + sum(o.seconds + c for o in down)
    touched = [o for o in down if max(o.start, s) < extended and o.end > s]
    if touched:  # after the last outage that touched the window, at least the catch-up
        assert extended >= max(o.end for o in touched) + c


@settings(max_examples=300, deadline=None)
@given(
    d=st.integers(1, 6_000),
    s=st.integers(0, 1_000),
    down=_outage_lists,
    more=st.integers(0, 1_000),
    k=st.integers(0, 4),
    c=_catch_up,
)
def test_monotone_in_an_outages_length(d: int, s: int, down: list[Outage], more: int, k: int, c: int) -> None:
    if not down:
        return
    k %= len(down)
    o = down[k]
    nxt = down[k + 1].start if k + 1 < len(down) else o.end + more + 1
    longer = [*down[:k], Outage(o.start, min(o.end + more, nxt - 0.5)), *down[k + 1 :]]  # still disjoint
    earlier = [*down[:k], Outage(max(0, o.start - more), o.end), *down[k + 1 :]]
    if k > 0:
        earlier[k] = Outage(max(down[k - 1].end + 0.5, o.start - more), o.end)
    assert extend_deadline(d, s, longer, c) >= extend_deadline(d, s, down, c)
    assert extend_deadline(d, s, earlier, c) >= extend_deadline(d, s, down, c)


@settings(max_examples=300, deadline=None)
@given(d=st.integers(1, 6_000), s=st.integers(0, 1_000), down=_outage_lists, c=_catch_up)
def test_outages_wholly_outside_the_window_change_nothing(d: int, s: int, down: list[Outage], c: int) -> None:
    outside = [o for o in down if o.end <= s or o.start >= d]
    assert extend_deadline(d, s, outside, c) == d


# ---------------------------------------------------------------------------- intervals -> outages


def test_gaps_longer_than_the_tolerance_between_intervals_are_outages() -> None:
    spans = [(0.0, 100.0), (110.0, 200.0), (260.0, 300.0)]  # gaps of 10 s and 60 s
    assert outages(spans, tolerance=15) == [Outage(200.0, 260.0)]


def test_an_interval_of_another_replica_covers_a_gap() -> None:
    spans = [(0.0, 100.0), (50.0, 250.0), (160.0, 300.0)]  # replica 1 restarted at 160; replica 2 was live
    assert outages(spans, tolerance=15) == []


def test_the_stretch_after_the_last_beat_is_not_an_outage_yet() -> None:
    assert outages([(0.0, 100.0)], tolerance=15) == []  # the present belongs to whoever asks


# ---------------------------------------------------------------------------- the heartbeat, on a database


BOTH = pytest.mark.parametrize("db", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])


@pytest.fixture
async def sessions(database_url: str):  # migrated: SQLite, or PostgreSQL for the postgres case
    engine = create_engine(database_url)
    yield session_factory(engine)
    await engine.dispose()


class Clock:
    def __init__(self) -> None:
        self.t = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += timedelta(seconds=seconds)


@BOTH
async def test_beats_extend_one_interval_and_a_late_beat_opens_a_new_one(db: str, sessions) -> None:
    clock = Clock()
    hb = Heartbeat(sessions, interval=5, tolerance=15, clock=clock)
    first = await hb.open()
    for _ in range(4):
        clock.advance(5)
        await hb.beat()
    assert hb.current == first
    clock.advance(40)  # the process stalled (or its database was away) for 40 s
    await hb.beat()
    assert hb.current != first
    async with sessions() as s:
        down = await outages_since(s, clock.t.timestamp() - 3600, 15)
    start = datetime(2030, 1, 1, tzinfo=UTC).timestamp()
    assert down == [Outage(start + 20, start + 60)]


@BOTH
async def test_a_restart_leaves_the_outage_on_record_and_old_intervals_are_pruned(db: str, sessions) -> None:
    clock = Clock()
    t0 = clock.t.timestamp()
    before = Heartbeat(sessions, interval=5, tolerance=15, retention=7200, clock=clock)
    await before.open()
    clock.advance(5)
    await before.beat()
    clock.advance(30)  # SIGKILLed at t0+5; the new process starts at t0+35
    after = Heartbeat(sessions, interval=5, tolerance=15, retention=7200, clock=clock)
    await after.open()
    async with sessions() as s:
        assert await outages_since(s, t0, 15) == [Outage(t0 + 5, t0 + 35)]
        assert await outages_since(s, t0 + 36, 15) == []  # ended before the window: not this job's
    clock.advance(3 * 3600)
    await after.beat()  # a late beat: a new interval
    assert await after.prune() == 2  # both old intervals are past the retention
    async with sessions() as s:
        assert len((await s.scalars(LivenessInterval.__table__.select())).all()) == 1


# ---------------------------------------------------------------------------- the machine's fact


def _collecting(mode: Mode) -> mw.World:
    w = mw.start(mw.request(shards=2, validators=1, mode=mode))
    for label in ("request", "invoice created", "pay", "result p0 s0"):
        w = dict(mw.actions(w))[label]
    assert w.view.state is S.COLLECTING
    return w


def _extension_of(plan: machine.Plan) -> DeadlineExtension:
    ext = [o for o in plan.events if ("status", "processing", "deadline extended") in o.template.tags]
    assert len(ext) == 1
    return parse_deadline_extension(placeholder_event(ext[0].template))


def test_collecting_moves_both_deadlines_publishes_them_and_counts_a_result_on_time_by_the_new_one() -> None:
    w = _collecting(Mode.CUSTODIAL)
    rd, vd = w.view.results_deadline, w.view.validation_deadline
    now = rd + w.config.results_grace_seconds + 1
    plan = machine.step(w.view, machine.DeadlineExtended(rd + 300, vd + 300), now, w.config)
    assert plan.state is S.COLLECTING and plan.results_extended_to == rd + 300
    assert plan.validation_extended_to == vd + 300
    ext = _extension_of(plan)
    assert (ext.results_deadline, ext.validation_deadline, ext.customer) == (rd + 300, vd + 300, w.view.customer)
    w = mw.after(replace(w, now=now), plan, machine.DeadlineExtended(rd + 300, vd + 300))
    assert w.view.results_deadline == rd + 300 and w.view.req.spec.results_deadline == rd  # both kept
    assert machine.due_deadline(w.view, now, w.config) is None  # the judging waits for the new deadline
    # A result first received after the request's deadline and grace, before the new one: counted.
    late = replace(mw._result(w, 1, 1), received_at=float(now + 10))
    plan = machine.step(w.view, late, now + 10, w.config)
    assert plan.results and plan.state is S.VALIDATING
    # The evaluation request names the validation deadline in force.
    assert any(("param", "deadline", str(vd + 300)) == tuple(t) for o in plan.events for t in o.template.tags)
    # Received after the new deadline and its grace: late.
    too_late = replace(mw._result(w, 1, 1), received_at=float(rd + 300 + w.config.results_grace_seconds + 1))
    assert not machine.step(w.view, too_late, now, w.config).results


def test_a_hold_job_whose_validation_deadline_moves_goes_into_custody_first() -> None:
    w = _collecting(Mode.HOLD)
    assert w.view.funds is Funds.LOCKED
    rd, vd = w.view.results_deadline, w.view.validation_deadline
    w = mw.step(w, machine.DeadlineExtended(rd + 50, vd + 50), now=rd + 100)
    assert EffectKind.SETTLE_HOLD in w.effects and w.view.state is S.COLLECTING
    w = dict(mw.actions(w))["settle"]  # the effect runner settles; the job continues custodially
    assert w.view.funds is Funds.HELD and w.view.state is S.COLLECTING and not mw.violations(w)


def test_a_custodial_job_has_no_effect_and_validating_moves_only_the_validation_deadline() -> None:
    w = _collecting(Mode.CUSTODIAL)
    w = dict(mw.actions(w))["result p1 s1"]
    assert w.view.state is S.VALIDATING
    rd, vd = w.view.results_deadline, w.view.validation_deadline
    plan = machine.step(w.view, machine.DeadlineExtended(rd + 999, vd + 40), vd + 1, w.config)
    assert plan.results_extended_to is None and plan.validation_extended_to == vd + 40 and not plan.effects
    assert _extension_of(plan).results_deadline is None


def test_an_extension_that_is_not_later_is_ignored_and_publishes_nothing() -> None:
    w = _collecting(Mode.CUSTODIAL)
    rd, vd = w.view.results_deadline, w.view.validation_deadline
    plan = machine.step(w.view, machine.DeadlineExtended(rd, vd), rd + 100, w.config)
    assert not plan.writes and plan.outcome.startswith("ignored")


def test_the_validation_deadline_keeps_its_window_after_the_results_deadline() -> None:
    w = _collecting(Mode.CUSTODIAL)
    rd, vd = w.view.results_deadline, w.view.validation_deadline
    plan = machine.step(w.view, machine.DeadlineExtended(vd + 500, None), rd + 100, w.config)
    assert plan.results_extended_to == vd + 500
    assert plan.validation_extended_to == vd + 500 + (vd - rd)


# ---------------------------------------------------------------------------- the codec


def test_the_feedback_round_trips_and_is_recognised() -> None:
    ext = DeadlineExtension("a" * 64, "b" * 64, None, 1_900_000_300)
    t = build_deadline_extension(ext)
    assert ("extended", "validation", "1900000300") in t.tags
    assert parse_escrow_feedback(placeholder_event(t)) == ext


@pytest.mark.parametrize(
    "extended",
    [
        [],
        [("extended", "payment", "1")],
        [("extended", "results", "01")],
        [("extended", "results", "5"), ("extended", "results", "6")],
        [("extended", "results", "9"), ("extended", "validation", "9")],
    ],
)
def test_malformed_extensions_are_refused(extended: list[tuple[str, ...]]) -> None:
    tags = [("status", "processing", "deadline extended"), *extended, ("e", "a" * 64), ("p", "b" * 64)]
    with pytest.raises(CodecError):
        parse_deadline_extension(placeholder_event(template(KIND_FEEDBACK, tags, "")))


def test_a_tolerance_at_or_below_the_heartbeat_is_refused() -> None:
    from pydantic import ValidationError

    from service.config import Settings

    with pytest.raises(ValidationError, match="HEARTBEAT_TOLERANCE"):
        Settings(_env_file=None, heartbeat_seconds=5, heartbeat_tolerance_seconds=5)
    assert Settings(_env_file=None).heartbeat_tolerance_seconds == 3 * Settings(_env_file=None).heartbeat_seconds
