"""Property tests: random escrow-style sequences keep every ledger invariant, and replaying them changes nothing.

Each example runs on its own copy of a migrated SQLite database. An interpreter
plays the operations the escrow engine makes (fund a job, release to N payees with
the remainder to fees, pay out with a routing fee, refund and pay the refund back,
reverse a random posting, post a key again — identically or not, post garbage) and
keeps a model of what every balance must be. After every step the ledger must agree
with the model, sum to zero and report exactly the violations the model predicts
(none, except a closed job's account that holds money again, e.g. after a late
payment or a reversal); at the end, replaying every call with the same keys must
change nothing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import shutil
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from service.db import create_engine, session_factory
from service.ledger import accounts as A
from service.ledger import service as L
from service.ledger.models import LedgerLine, LedgerPosting
from service.migrate import upgrade

JOBS = [f"{i:02x}" * 32 for i in (0xA0, 0xA1)]
PAYEES = [f"{i:02x}" * 32 for i in (0xB0, 0xB1, 0xB2)]
CUSTOMER = "c0" * 32

job = st.sampled_from([0, 0, 0, 1])  # mostly one job, so its fund → release → payout chains form
amount = st.one_of(st.integers(1, 1_000_000), st.integers(1, 10**15))
FUND = st.tuples(st.just("fund"), job, amount)
RELEASE = st.tuples(
    st.just("release"),
    job,
    st.lists(st.tuples(st.integers(0, len(PAYEES) - 1), st.integers(0, 100)), min_size=1, max_size=4),
    st.integers(0, 200_000),
)
PAYOUT = st.tuples(st.just("payout"), job, st.integers(0, 10), st.integers(0, 2_000))
REFUND = st.tuples(st.just("refund"), job)
REFUND_PAYOUT = st.tuples(st.just("refund_payout"), job, st.integers(0, 2_000))
ARGS = {
    "fund": FUND,
    "release": RELEASE,
    "payout": PAYOUT,
    "refund": REFUND,
    "refund_payout": REFUND_PAYOUT,
    "overpay": st.tuples(st.just("overpay"), job, st.integers(0, 10), st.integers(1, 1_000)),
    "reverse": st.tuples(st.just("reverse"), st.integers(0, 10**6)),
    "dup": st.tuples(st.just("dup"), st.integers(0, 10**6), st.booleans()),
    "garbage": st.tuples(st.just("garbage"), job, st.integers(1, 1_000)),
    "close": st.tuples(st.just("close"), job),
}
# Weighted: the escrow's own steps come up more often than corrections and noise.
WEIGHTS = {
    "fund": 4,
    "release": 3,
    "payout": 5,
    "refund": 1,
    "refund_payout": 2,
    "overpay": 1,
    "reverse": 2,
    "dup": 2,
    "garbage": 1,
    "close": 2,
}
OPS = st.sampled_from([name for name, w in WEIGHTS.items() for _ in range(w)]).flatmap(ARGS.__getitem__)


@st.composite
def sequences(draw: st.DrawFn) -> list[tuple]:
    """A life per job (fund, then release and payouts or refund and its payout, then close), interleaved
    with random operations of any kind; plain random lists rarely form such chains."""
    queues: list[list[tuple]] = []
    for j in range(len(JOBS)):
        life = [("fund", j, draw(amount)) for _ in range(draw(st.integers(1, 2)))]
        path = draw(st.sampled_from(["release", "refund", "open"]))
        if path == "release":
            life.append(("release", j, *draw(RELEASE)[2:]))
            life += [
                ("payout", j, draw(st.integers(0, 10)), draw(st.integers(0, 2_000)))
                for _ in range(draw(st.integers(0, 4)))
            ]
        elif path == "refund":
            life += [("refund", j), ("refund_payout", j, draw(st.integers(0, 2_000)))]
        life.append(("close", j))
        queues.append(life)
    queues.append(draw(st.lists(OPS, max_size=12)))
    ops: list[tuple] = []
    while any(queues):
        ready = [q for q in queues if q]
        ops.append(ready[draw(st.integers(0, len(ready) - 1))].pop(0))
    return ops


def h(*parts: object) -> str:
    return hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()


@dataclass
class Call:
    """One call made to the ledger, kept to be replayed."""

    op: str  # post | reverse
    kwargs: dict
    result: str | None = None  # posting id


@dataclass
class Model:
    bal: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    job_bal: dict[str | None, dict[str, int]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(int)))
    ok: list[Call] = field(default_factory=list)  # calls that booked a posting
    refused: list[tuple[Call, str]] = field(default_factory=list)  # state-independent refusals
    lines: dict[str, list[tuple[str, int]]] = field(default_factory=dict)  # posting id -> lines
    keys: dict[str, str] = field(default_factory=dict)  # posting id -> key
    reversed: set[str] = field(default_factory=set)
    closed: set[str] = field(default_factory=set)
    job_of: dict[str, str | None] = field(default_factory=dict)
    events: set[str] = field(default_factory=set)  # what happened, for Hypothesis' statistics
    n: int = 0

    def apply(self, lines: list[tuple[str, int]], job_id: str | None) -> None:
        for a, m in lines:
            self.bal[a] += m
            self.job_bal[job_id][a] += m

    def violations(self) -> set[tuple[str, str, int]]:
        """What check_invariants must report: a closed job's accounts that are not zero (nothing else)."""
        return {("closed_job_balance", a, m) for a, m in self.bal.items() if m and A.job_of(a) in self.closed}

    def owed(self, j: str, pick: int) -> str | None:
        """One of the job's payable accounts still owed something (pick among them), or None."""
        owed = sorted(a for a, m in self.bal.items() if m and a.startswith("liability:payable:") and A.job_of(a) == j)
        return owed[pick % len(owed)] if owed else None

    def nonzero(self) -> dict[str, int]:
        return {a: m for a, m in self.bal.items() if m}

    def overdraws(self, lines: list[tuple[str, int]]) -> bool:
        after = defaultdict(int)
        for a, m in lines:
            after[a] += m
        return any(A.kind_of(a) == "liability" and self.bal[a] + d > 0 for a, d in after.items())


async def _post(
    s: AsyncSession, model: Model, *, key: str, kind: str, lines: list[tuple[str, int]], job_id: str | None
) -> None:
    call = Call("post", {"key": key, "kind": kind, "lines": lines, "job_id": job_id})
    pid = await L.post(s, **call.kwargs)
    assert pid is not None, f"fresh key {key} must book"
    call.result = pid
    model.ok.append(call)
    model.lines[pid] = lines
    model.keys[pid] = key
    model.job_of[pid] = job_id
    model.events.add(f"{kind}: booked")
    model.apply(lines, job_id)


async def step(sessions, model: Model, op: tuple) -> None:
    model.n += 1
    n = model.n
    name = op[0]
    if name in ("release", "payout", "overpay") and JOBS[op[1]] in model.closed:
        return  # no release or payout of a closed job; anything else still happens (a late payment, a reversal)
    async with sessions.begin() as s:
        if name == "fund":
            j = JOBS[op[1]]
            await _post(
                s,
                model,
                key=f"funding:{h('in', j, n)}",
                kind="funding",
                job_id=j,
                lines=[(A.NODE, op[2]), (A.escrow(j), -op[2])],
            )
        elif name == "release":
            j, weights, fee_ppm = JOBS[op[1]], op[2], op[3]
            held = -model.bal[A.escrow(j)]
            if held == 0:
                return
            fee = held * fee_ppm // 1_000_000
            pool, total_w = held - fee, sum(w for _, w in weights)
            lines = [(A.escrow(j), held)]
            paid = 0
            for p, w in weights:
                share = pool * w // total_w if total_w else 0
                if share:
                    lines.append((A.payable(PAYEES[p], j), -share))
                    paid += share
            if held - paid:
                lines.append((A.FEE_INCOME, -(held - paid)))  # escrow fee + the split's remainder
            await _post(s, model, key=f"release:{j}:{n}", kind="release", job_id=j, lines=lines)
        elif name in ("payout", "refund_payout"):
            j, fee = JOBS[op[1]], op[-1]
            acct = model.owed(j, op[2]) if name == "payout" else A.refund(CUSTOMER, j)
            owed = -model.bal[acct] if acct else 0
            if owed == 0:
                return
            ph = h("out", j, n)
            await _post(s, model, key=f"payout:{ph}", kind=name, job_id=j, lines=[(acct, owed), (A.NODE, -owed)])
            if fee:
                await _post(
                    s,
                    model,
                    key=f"routing_fee:{ph}",
                    kind="routing_fee",
                    job_id=j,
                    lines=[(A.ROUTING_EXPENSE, fee), (A.NODE, -fee)],
                )
        elif name == "overpay":
            j = JOBS[op[1]]
            acct = model.owed(j, op[2]) or A.payable(PAYEES[0], j)
            more = -model.bal[acct] + op[3]
            with pytest.raises(L.LedgerError) as ei:
                await L.post(
                    s, key=f"payout:{h('over', j, n)}", kind="payout", job_id=j, lines=[(acct, more), (A.NODE, -more)]
                )
            assert ei.value.reason == "overdrawn"
        elif name == "refund":
            j = JOBS[op[1]]
            held = -model.bal[A.escrow(j)]
            if held == 0:
                return
            await _post(
                s,
                model,
                key=f"refund:{j}:{n}",
                kind="refund",
                job_id=j,
                lines=[(A.escrow(j), held), (A.refund(CUSTOMER, j), -held)],
            )
        elif name == "garbage":
            j = JOBS[op[1]]
            call = Call(
                "post",
                {
                    "key": f"garbage:{j}:{n}",
                    "kind": "funding",
                    "job_id": j,
                    "lines": [(A.NODE, op[2]), (A.escrow(j), -(op[2] + 1))],
                },
            )
            with pytest.raises(L.LedgerError) as ei:
                await L.post(s, **call.kwargs)
            assert ei.value.reason == "unbalanced"
            model.refused.append((call, "unbalanced"))
        elif name == "reverse":
            if not model.ok:
                return
            target = model.ok[op[1] % len(model.ok)].result
            job_id = model.job_of[target]
            neg = [(a, -m) for a, m in model.lines[target]]
            key = f"reversal:{h(model.keys[target])[:40]}"
            if target in model.reversed:
                with pytest.raises(L.LedgerError) as ei:
                    await L.reverse(s, target, key=f"reversal:again:{n}")
                assert ei.value.reason == "already_reversed"
                model.events.add("reverse: already reversed")
                return
            if model.overdraws(neg):
                with pytest.raises(L.LedgerError) as ei:
                    await L.reverse(s, target, key=key)
                assert ei.value.reason == "overdrawn"
                model.events.add("reverse: would overdraw")
                return
            model.events.add("reverse: booked")
            call = Call("reverse", {"posting_id": target, "key": key})
            call.result = await L.reverse(s, target, key=key)
            model.ok.append(call)
            model.lines[call.result] = neg
            model.keys[call.result] = key
            model.job_of[call.result] = job_id
            model.reversed.add(target)
            model.apply(neg, job_id)
        elif name == "dup":
            if not model.ok:
                return
            call = model.ok[op[1] % len(model.ok)]
            if call.op == "reverse":
                assert await L.reverse(s, **call.kwargs) == call.result
            elif not op[2]:
                assert await L.post(s, **call.kwargs) is None
            else:
                (a0, m0), (a1, m1), *rest = call.kwargs["lines"]
                if m0 + 1 != 0 and m1 - 1 != 0:
                    changed = {**call.kwargs, "lines": [(a0, m0 + 1), (a1, m1 - 1), *rest]}
                else:
                    changed = {**call.kwargs, "kind": "other"}
                with pytest.raises(L.LedgerError) as ei:
                    await L.post(s, **changed)
                assert ei.value.reason == "key_conflict"
        elif name == "close":
            j = JOBS[op[1]]
            mine = [a for a in model.bal if A.job_of(a) == j]
            paid_out = any(model.job_of[p] == j and model.keys[p].startswith("payout:") for p in model.lines)
            if paid_out and all(model.bal[a] == 0 for a in mine):  # a job closes after its last payout
                model.events.add("close: job closed")
                model.closed.add(j)


async def snapshot(sessions) -> tuple[int, int, dict[str, int]]:
    async with sessions() as s:
        return (
            await s.scalar(select(func.count()).select_from(LedgerPosting)),
            await s.scalar(select(func.count()).select_from(LedgerLine)),
            await L.balances(s),
        )


async def verify(sessions, model: Model, *, full: bool = False) -> None:
    async with sessions() as s:
        got = await L.balances(s)
        assert {a: m for a, m in got.items() if m} == model.nonzero()
        assert sum(got.values()) == 0
        found = await L.check_invariants(s, closed_job_ids=model.closed)
        assert {(v.kind, v.subject, v.amount_msat) for v in found} == model.violations()
        assert len(found) == len(model.violations())
        if model.violations():
            model.events.add("a closed job holds money again")
        if full:
            assert await s.scalar(select(func.count()).select_from(LedgerPosting)) == len(model.ok)
            for j in JOBS:
                jb = await L.balances(s, job_id=j)
                assert sum(jb.values()) == 0
                assert {a: m for a, m in jb.items() if m} == {a: m for a, m in model.job_bal[j].items() if m}


async def scenario(url: str, ops: list[tuple]) -> Model:
    engine = create_engine(url)
    sessions = session_factory(engine)
    try:
        model = Model()
        for op in ops:
            await step(sessions, model, op)
            await verify(sessions, model)
        await verify(sessions, model, full=True)
        before = await snapshot(sessions)
        async with sessions.begin() as s:  # replay everything, same keys: nothing changes
            for call in model.ok:
                if call.op == "post":
                    assert await L.post(s, **call.kwargs) is None
                else:
                    assert await L.reverse(s, **call.kwargs) == call.result
            for call, reason in model.refused:
                with pytest.raises(L.LedgerError) as ei:
                    await L.post(s, **call.kwargs)
                assert ei.value.reason == reason
        assert await snapshot(sessions) == before
        await verify(sessions, model, full=True)
        return model
    finally:
        await engine.dispose()


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ledger-props") / "template.sqlite3"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # alembic's env.py runs its own event loop
        pool.submit(upgrade, f"sqlite+aiosqlite:///{path}").result()
    return path


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=sequences())
def test_random_escrow_sequences_keep_the_invariants(template: Path, ops: list[tuple]) -> None:
    db = template.parent / f"{uuid.uuid4().hex}.sqlite3"
    shutil.copyfile(template, db)
    loop = asyncio.new_event_loop()
    try:
        model = loop.run_until_complete(scenario(f"sqlite+aiosqlite:///{db}", ops))
    finally:
        loop.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
    for e in sorted(model.events):
        event(e)


def test_a_full_escrow_life_by_hand(template: Path) -> None:
    """The same interpreter on one fixed, complete sequence (a readable example of the properties)."""
    ops = [
        ("fund", 0, 100_000),
        ("fund", 0, 5),
        ("dup", 0, False),
        ("dup", 1, True),
        ("release", 0, [(0, 70), (1, 29), (0, 1)], 10_000),  # two lines on one payee's account
        ("overpay", 0, 0, 1),
        ("reverse", 0),  # refused: overdraw
        ("payout", 0, 0, 17),
        ("payout", 0, 0, 0),
        ("close", 0),
        ("fund", 1, 50_000),
        ("refund", 1),
        ("reverse", 7),  # the refund is undone ...
        ("refund", 1),
        ("refund_payout", 1, 3),  # ... and done again, then paid
        ("reverse", 7),
        ("garbage", 1, 10),
        ("close", 1),
        ("dup", 8, False),
        ("fund", 0, 9),
        ("refund", 0),
        ("refund_payout", 0, 0),
    ]  # a late payment, paid back
    db = template.parent / f"{uuid.uuid4().hex}.sqlite3"
    shutil.copyfile(template, db)
    loop = asyncio.new_event_loop()
    try:
        model = loop.run_until_complete(scenario(f"sqlite+aiosqlite:///{db}", ops))
    finally:
        loop.close()
    assert model.events == {
        "funding: booked",
        "release: booked",
        "payout: booked",
        "routing_fee: booked",
        "refund: booked",
        "refund_payout: booked",
        "reverse: booked",
        "reverse: would overdraw",
        "reverse: already reversed",
        "close: job closed",
        "a closed job holds money again",
    }
    assert model.closed == {JOBS[0], JOBS[1]}
    # 100_005 in; 1_000 escrow fee; 99_005 split 69_303 + 28_711 + 990 = 99_004, remainder 1 to fees
    assert dict(model.nonzero()) == {
        A.NODE: 100_005 - 99_004 - 17 + 50_000 - 50_000 - 3,
        A.FEE_INCOME: -1_001,
        A.ROUTING_EXPENSE: 17 + 3,
    }
