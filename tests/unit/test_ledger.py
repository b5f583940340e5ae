"""The double-entry ledger: validation, idempotency, reversal, balances, invariants, reconciliation logic.

Database tests run on SQLite and (marked ``postgres``) on PostgreSQL. Corruption is
simulated by inserting raw rows, bypassing ``post`` (and, where needed, the foreign
keys), exactly as a bug or a manual edit would.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal

import pytest
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service import reconcile as R
from service.db import create_engine, session_factory, utcnow
from service.ledger import accounts as A
from service.ledger import service as L
from service.ledger.models import LedgerLine, LedgerPosting, LedgerReconciliation
from service.lightning import errors
from service.lightning.client import ChannelBalance, FailureReason, Invoice, InvoiceState, Payment, PaymentStatus
from service.lightning.models import LnInvoice
from service.payouts import DestinationKind, PayoutKind
from service.payouts.models import Payout, PayoutAttempt

BACKENDS = [pytest.param("sqlite", id="sqlite"), pytest.param("postgres", id="postgres", marks=pytest.mark.postgres)]
backends = pytest.mark.parametrize("backend", BACKENDS)

JOB = "a1" * 32
JOB2 = "b2" * 32
PAYEE = "c3" * 32
PAYEE2 = "d4" * 32
CUSTOMER = "e5" * 32


def hx() -> str:
    return secrets.token_hex(32)


@dataclass
class Db:
    url: str
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]

    async def counts(self) -> tuple[int, int]:
        async with self.sessions() as s:
            return (
                await s.scalar(select(func.count()).select_from(LedgerPosting)),
                await s.scalar(select(func.count()).select_from(LedgerLine)),
            )

    async def raw(self, *rows: tuple[type, dict], bypass_fk: bool = False) -> None:
        """Insert rows directly (as a bug or a manual edit would), optionally without foreign keys."""
        engine = create_engine(self.url)
        try:
            async with engine.connect() as conn:
                if bypass_fk:
                    if engine.dialect.name == "sqlite":
                        await conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
                    else:
                        await conn.exec_driver_sql("SET session_replication_role = replica")
                for model, values in rows:
                    await conn.execute(insert(model.__table__), [values])
                await conn.commit()
        finally:
            await engine.dispose()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Db]:
    engine = create_engine(database_url)
    yield Db(database_url, engine, session_factory(engine))
    await engine.dispose()


def posting_row(
    key: str | None = None, *, reverses: str | None = None, kind: str = "manual", job_id: str | None = None
) -> tuple[str, tuple[type, dict]]:
    pid = uuid.uuid4().hex
    return pid, (
        LedgerPosting,
        {
            "id": pid,
            "key": key or f"raw:{pid}",
            "kind": kind,
            "job_id": job_id,
            "memo": "",
            "reverses": reverses,
            "created_at": utcnow(),
        },
    )


def line_row(pid: str, account: str, amount: int, job_id: str | None = None) -> tuple[type, dict]:
    return (LedgerLine, {"posting_id": pid, "account": account, "job_id": job_id, "amount_msat": amount})


async def fund(s: AsyncSession, amount: int, job: str = JOB, h: str | None = None) -> str:
    pid = await L.post(
        s, key=f"funding:{h or hx()}", kind="funding", job_id=job, lines=[(A.NODE, amount), (A.escrow(job), -amount)]
    )
    assert pid is not None
    return pid


# ============================================================== accounts


def test_account_names_kinds_and_normal_balance() -> None:
    assert A.NODE == "asset:node" and A.FEE_INCOME == "income:fees" and A.ROUTING_EXPENSE == "expense:routing"
    assert A.escrow(JOB) == f"liability:escrow:{JOB}"
    assert A.payable(PAYEE, JOB) == f"liability:payable:{PAYEE}:{JOB}"
    assert A.refund(CUSTOMER, JOB) == f"liability:refund:{CUSTOMER}:{JOB}"
    expect = {
        A.NODE: ("asset", "debit", None),
        A.FEE_INCOME: ("income", "credit", None),
        A.ROUTING_EXPENSE: ("expense", "debit", None),
        A.escrow(JOB): ("liability", "credit", JOB),
        A.payable(PAYEE, JOB): ("liability", "credit", JOB),
        A.refund(CUSTOMER, JOB2): ("liability", "credit", JOB2),
    }
    for name, (kind, side, job) in expect.items():
        assert (A.kind_of(name), A.normal_balance(name), A.job_of(name)) == (kind, side, job), name
        assert A.is_valid(name) and A.validate(name) == name
    p = A.parse(A.payable(PAYEE, JOB))
    assert (p.kind, p.category, p.party, p.job_id) == ("liability", "payable", PAYEE, JOB)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "asset",
        "asset:",
        "asset:nodes",
        "Asset:node",
        "asset:node ",
        " asset:node",
        "income:fee",
        "liability:escrow:",
        f"liability:escrow:{JOB.upper()}",
        "liability:escrow:xyz",
        "liability:escrow:a b",
        f"liability:escrow:{JOB}:x",
        f"liability:payable:{JOB}",
        f"liability:payable:{PAYEE}:{JOB}:{JOB}",
        f"liability:refund::{JOB}",
        "liability:escrow:" + "a" * 65,
        f"liability:other:{JOB}",
        "equity:capital",
        "liability:escrow:%",
        "liability:escrow:a_b",
        None,
        7,
        b"asset:node",
    ],
)
def test_invalid_account_names_refused(name: object) -> None:
    assert not A.is_valid(name)
    with pytest.raises(A.AccountError):
        A.parse(name)
    if isinstance(name, str):
        with pytest.raises(A.AccountError):
            A.kind_of(name)


@pytest.mark.parametrize("bad", ["", "XYZ", JOB.upper(), "a b", "a:b", "a%", "a" * 65, "0x12", None, 12])
def test_account_builders_refuse_bad_ids(bad: object) -> None:
    for build in (
        lambda: A.escrow(bad),
        lambda: A.payable(bad, JOB),
        lambda: A.payable(PAYEE, bad),
        lambda: A.refund(bad, JOB),
        lambda: A.refund(CUSTOMER, bad),
        lambda: A.job_accounts(bad),
    ):
        with pytest.raises(A.AccountError):
            build()


def test_job_accounts_pattern_matches_exactly_the_jobs_accounts() -> None:
    def like(pattern: str, value: str) -> bool:
        rx = "".join(".*" if c == "%" else "." if c == "_" else re.escape(c) for c in pattern)
        return re.fullmatch(rx, value, re.S) is not None

    pat = A.job_accounts(JOB)
    mine = [A.escrow(JOB), A.payable(PAYEE, JOB), A.refund(CUSTOMER, JOB)]
    others = [
        A.escrow(JOB2),
        A.payable(JOB, JOB2),
        A.refund(JOB, JOB2),
        A.NODE,
        A.FEE_INCOME,
        A.ROUTING_EXPENSE,
        A.escrow(JOB[:-1] + "0"),
        A.escrow("1" + JOB[1:]),
    ]
    assert all(like(pat, a) for a in mine)
    assert not any(like(pat, a) for a in others)


# ============================================================== post: validation

MAX = L.MAX_MSAT
E = A.escrow(JOB)

INVALID_POSTS = [
    ("too_few_lines", {"lines": []}),
    ("too_few_lines", {"lines": [(A.NODE, 5)]}),
    ("too_many_lines", {"lines": [(A.NODE, 1), (E, -1)] * (L.MAX_LINES // 2 + 1)}),
    ("bad_line", {"lines": "asset:node"}),
    ("bad_line", {"lines": [(A.NODE, 5, 1), (E, -5)]}),
    ("bad_line", {"lines": [(A.NODE,), (E, -5)]}),
    ("bad_line", {"lines": [A.NODE, (E, -5)]}),
    ("bad_line", {"lines": 5}),
    ("not_int", {"lines": [(A.NODE, True), (E, -1)]}),
    ("not_int", {"lines": [(A.NODE, 1), (E, -2), (A.FEE_INCOME, True)]}),
    ("not_int", {"lines": [(A.NODE, 5.0), (E, -5)]}),
    ("not_int", {"lines": [(A.NODE, Decimal(5)), (E, -5)]}),
    ("not_int", {"lines": [(A.NODE, "5"), (E, -5)]}),
    ("zero_amount", {"lines": [(A.NODE, 0), (E, 0)]}),
    ("zero_amount", {"lines": [(A.NODE, 5), (A.FEE_INCOME, 0), (E, -5)]}),
    ("amount_too_large", {"lines": [(A.NODE, MAX + 1), (E, -MAX - 1)]}),
    ("amount_too_large", {"lines": [(A.NODE, MAX), (A.ROUTING_EXPENSE, 1), (E, -MAX), (A.FEE_INCOME, -1)]}),
    ("unbalanced", {"lines": [(A.NODE, 5), (E, -4)]}),
    ("unbalanced", {"lines": [(A.NODE, 5), (E, -5), (A.FEE_INCOME, -1)]}),
    ("bad_account", {"lines": [("asset:cash", 5), (E, -5)]}),
    ("bad_account", {"lines": [(A.NODE, 5), (f"liability:escrow:{JOB.upper()}", -5)]}),
    ("bad_account", {"lines": [(A.NODE, 5), (None, -5)]}),
    ("bad_key", {"key": ""}),
    ("bad_key", {"key": "funding: x"}),
    ("bad_key", {"key": "k" * 201}),
    ("bad_key", {"key": "fünding:x"}),
    ("bad_key", {"key": None}),
    ("bad_kind", {"kind": "Funding"}),
    ("bad_kind", {"kind": ""}),
    ("bad_kind", {"kind": "reversal"}),
    ("bad_kind", {"kind": "x" * 33}),
    ("bad_job_id", {"job_id": "XYZ"}),
    ("bad_job_id", {"job_id": ""}),
    ("job_mismatch", {"job_id": JOB2}),
    ("job_mismatch", {"lines": [(A.escrow(JOB2), 5), (E, -5)], "job_id": JOB}),
    ("bad_memo", {"memo": "m" * 501}),
    ("bad_memo", {"memo": None}),
]


@pytest.mark.parametrize(
    ("reason", "override"), INVALID_POSTS, ids=[f"{r}-{i}" for i, (r, _) in enumerate(INVALID_POSTS)]
)
async def test_post_validation_reasons(db: Db, reason: str, override: dict) -> None:
    args = {
        "key": "funding:" + hx(),
        "kind": "funding",
        "lines": [(A.NODE, 5), (E, -5)],
        "job_id": None,
        "memo": "",
    } | override
    async with db.sessions.begin() as s:
        with pytest.raises(L.LedgerError) as ei:
            await L.post(s, **args)
    assert ei.value.reason == reason
    assert isinstance(ei.value.reason, str) and ei.value.message
    assert await db.counts() == (0, 0), "a refused posting writes nothing"


async def test_post_accepts_the_limits(db: Db) -> None:
    async with db.sessions.begin() as s:
        assert (
            await L.post(s, key="k" * 200, kind="x" * 32, memo="m" * 500, lines=[(A.NODE, MAX), (E, -MAX)]) is not None
        )
        assert (
            await L.post(
                s, key="three", kind="funding", lines=[(A.NODE, 7), (A.escrow(JOB2), -3), (A.escrow(JOB2), -4)]
            )
            is not None
        )
    async with db.sessions() as s:
        assert await L.balance(s, A.NODE) == MAX + 7
        assert await L.balance(s, E) == -MAX
        assert await L.balance(s, A.escrow(JOB2)) == -7


# ============================================================== post: idempotency


@backends
async def test_same_key_twice_is_one_posting(db: Db, backend: str) -> None:
    h = hx()
    lines = [(A.NODE, 10_000), (E, -10_000)]
    async with db.sessions.begin() as s:
        pid = await L.post(s, key=f"funding:{h}", kind="funding", lines=lines, job_id=JOB, memo="first")
        assert isinstance(pid, str) and re.fullmatch(r"[0-9a-f]{32}", pid)
    async with db.sessions.begin() as s:
        # same content (lines in another order, another memo) in a later transaction: a replay
        assert (
            await L.post(s, key=f"funding:{h}", kind="funding", lines=list(reversed(lines)), job_id=JOB, memo="again")
            is None
        )
        assert await L.post(s, key=f"funding:{h}", kind="funding", lines=lines) is None  # job derived = JOB
    assert await db.counts() == (1, 2)
    async with db.sessions() as s:
        assert await L.balance(s, A.NODE) == 10_000
        p = await L.get_posting(s, key=f"funding:{h}")
        assert (p.id, p.kind, p.job_id, p.memo, p.reverses) == (pid, "funding", JOB, "first", None)
        assert sorted(p.lines) == sorted(lines)


@backends
@pytest.mark.parametrize("change", ["amount", "account", "kind", "job", "extra_line"])
async def test_same_key_different_content_is_key_conflict(db: Db, backend: str, change: str) -> None:
    key = f"funding:{hx()}"
    async with db.sessions.begin() as s:
        await L.post(s, key=key, kind="funding", lines=[(A.NODE, 10_000), (E, -10_000)])
    other = {
        "amount": {"kind": "funding", "lines": [(A.NODE, 10_001), (E, -10_001)]},
        "account": {"kind": "funding", "lines": [(A.NODE, 10_000), (A.escrow(JOB2), -10_000)]},
        "kind": {"kind": "release", "lines": [(A.NODE, 10_000), (E, -10_000)]},
        "job": {"kind": "funding", "lines": [(A.NODE, 10_000), (A.FEE_INCOME, -10_000)]},
        "extra_line": {"kind": "funding", "lines": [(A.NODE, 10_000), (E, -9_000), (A.FEE_INCOME, -1_000)]},
    }[change]
    async with db.sessions.begin() as s:
        with pytest.raises(L.LedgerError) as ei:
            await L.post(s, key=key, **other)
    assert ei.value.reason == "key_conflict"
    assert await db.counts() == (1, 2)
    async with db.sessions() as s:
        assert await L.balances(s) == {A.NODE: 10_000, E: -10_000}


@backends
@pytest.mark.parametrize("same", [True, False], ids=["replay", "conflict"])
async def test_concurrent_same_key(db: Db, backend: str, same: bool) -> None:
    """A writer that did not see an uncommitted posting of the key loses the insert race cleanly.

    On SQLite the service's engine has one connection (writers queue in the pool); two
    connections on aiosqlite's threads stand for two processes on the same file, where the
    race is real (inline statements would wait on the one event loop both need).
    """
    key = f"funding:{hx()}"
    first_posted = asyncio.Event()
    if backend == "sqlite":
        engine = create_engine(db.url, pool_size=2, sqlite_inline=False)
        db = Db(db.url, engine, session_factory(engine))

    async def first() -> str | None:
        async with db.sessions.begin() as s:
            pid = await L.post(s, key=key, kind="funding", lines=[(A.NODE, 500), (E, -500)])
            first_posted.set()
            await asyncio.sleep(0.5)  # the second writer is now waiting on our row
            return pid

    async def second() -> str | None:
        await first_posted.wait()
        amount = 500 if same else 501
        async with db.sessions.begin() as s:
            assert await L.get_posting(s, key=key) is None  # not committed yet: invisible
            return await L.post(s, key=key, kind="funding", lines=[(A.NODE, amount), (E, -amount)])

    results = await asyncio.gather(first(), second(), return_exceptions=True)
    if backend == "sqlite":
        await engine.dispose()
    assert isinstance(results[0], str)
    if same:
        assert results[1] is None
    else:
        assert isinstance(results[1], L.LedgerError) and results[1].reason == "key_conflict"
    assert await db.counts() == (1, 2)


# ============================================================== reversal


@backends
async def test_reversal_once(db: Db, backend: str) -> None:
    async with db.sessions.begin() as s:
        await fund(s, 10_000)
        rel = await L.post(
            s,
            key=f"release:{JOB}",
            kind="release",
            job_id=JOB,
            lines=[
                (E, 10_000),
                (A.payable(PAYEE, JOB), -7_000),
                (A.payable(PAYEE2, JOB), -2_500),
                (A.FEE_INCOME, -500),
            ],
        )
    async with db.sessions.begin() as s:
        rev = await L.reverse(s, rel, key=f"reversal:release:{JOB}", memo="wrong split")
    async with db.sessions() as s:
        assert await L.balances(s) == {
            A.NODE: 10_000,
            A.FEE_INCOME: 0,
            E: -10_000,
            A.payable(PAYEE, JOB): 0,
            A.payable(PAYEE2, JOB): 0,
        }
        p = await L.get_posting(s, id=rev)
        assert (p.kind, p.reverses, p.job_id, p.memo, p.key) == (
            "reversal",
            rel,
            JOB,
            "wrong split",
            f"reversal:release:{JOB}",
        )
        orig = await L.get_posting(s, id=rel)
        assert sorted(p.lines) == sorted((a, -m) for a, m in orig.lines)
        assert await L.check_invariants(s) == []
    before = await db.counts()
    async with db.sessions.begin() as s:
        assert await L.reverse(s, rel, key=f"reversal:release:{JOB}") == rev  # replay: same reversal
        with pytest.raises(L.LedgerError) as ei:
            await L.reverse(s, rel, key="reversal:again")
        assert ei.value.reason == "already_reversed"
    assert await db.counts() == before
    async with db.sessions.begin() as s:
        with pytest.raises(L.LedgerError) as ei:
            await L.reverse(s, uuid.uuid4().hex, key="reversal:nothing")
        assert ei.value.reason == "not_found"
        with pytest.raises(L.LedgerError) as ei:  # the key is a funding already: never reused
            await L.reverse(s, rev, key=f"release:{JOB}")
        assert ei.value.reason == "key_conflict"
    assert await db.counts() == before
    async with db.sessions.begin() as s:  # a reversal may itself be reversed (re-applying the original)
        again = await L.reverse(s, rev, key="reversal:of-reversal")
        assert await L.balance(s, A.payable(PAYEE, JOB)) == -7_000
        assert (await L.get_posting(s, id=again)).reverses == rev
        assert await L.check_invariants(s) == []


@backends
async def test_reversal_that_would_overdraw_is_refused(db: Db, backend: str) -> None:
    async with db.sessions.begin() as s:
        f = await fund(s, 1_000)
        await L.post(s, key=f"release:{JOB}", kind="release", lines=[(E, 1_000), (A.payable(PAYEE, JOB), -1_000)])
    async with db.sessions.begin() as s:
        with pytest.raises(L.LedgerError) as ei:  # the money was released: undoing the funding overdraws escrow
            await L.reverse(s, f, key="reversal:funding")
        assert ei.value.reason == "overdrawn"
    assert await db.counts() == (2, 4)


@backends
async def test_concurrent_reversals_one_wins(db: Db, backend: str) -> None:
    async with db.sessions.begin() as s:
        f = await fund(s, 1_000)
    first_done = asyncio.Event()

    async def rev(key: str, wait: bool) -> str:
        if wait:
            await first_done.wait()
        async with db.sessions.begin() as s:
            r = await L.reverse(s, f, key=key)
            if not wait:
                first_done.set()
                await asyncio.sleep(0.5)
            return r

    results = await asyncio.gather(rev("reversal:a", False), rev("reversal:b", True), return_exceptions=True)
    assert isinstance(results[0], str)
    assert isinstance(results[1], L.LedgerError) and results[1].reason == "already_reversed"
    async with db.sessions() as s:
        assert await L.balance(s, A.NODE) == 0
        assert await L.check_invariants(s) == []


# ============================================================== overdraft guard


@backends
async def test_post_refuses_to_overdraw_a_liability(db: Db, backend: str) -> None:
    P = A.payable(PAYEE, JOB)
    async with db.sessions.begin() as s:
        await fund(s, 1_000)
        await L.post(s, key="release", kind="release", lines=[(E, 1_000), (P, -900), (A.FEE_INCOME, -100)])
    for lines in (
        [(P, 901), (A.NODE, -901)],  # pay more than is payable
        [(E, 1), (A.NODE, -1)],  # escrow already empty
        [(A.refund(CUSTOMER, JOB), 5), (A.NODE, -5)],
    ):  # never credited
        async with db.sessions.begin() as s:
            with pytest.raises(L.LedgerError) as ei:
                await L.post(s, key=f"payout:{hx()}", kind="payout", lines=lines)
            assert ei.value.reason == "overdrawn"
    async with db.sessions.begin() as s:  # exactly the balance is fine, in two steps of one transaction too
        assert await L.post(s, key="payout:1", kind="payout", lines=[(P, 400), (A.NODE, -400)])
        assert await L.post(s, key="payout:2", kind="payout", lines=[(P, 500), (A.NODE, -500)])
        with pytest.raises(L.LedgerError) as ei:
            await L.post(s, key="payout:3", kind="payout", lines=[(P, 1), (A.NODE, -1)])
        assert ei.value.reason == "overdrawn"
    async with db.sessions() as s:
        assert await L.balance(s, P) == 0


# ============================================================== balances


@backends
async def test_balances_by_account_job_and_prefix(db: Db, backend: str) -> None:
    h = hx()
    async with db.sessions.begin() as s:
        await fund(s, 10_000, JOB)
        await fund(s, 3_000, JOB2)
        await L.post(
            s,
            key=f"release:{JOB}",
            kind="release",
            lines=[
                (E, 10_000),
                (A.payable(PAYEE, JOB), -8_000),
                (A.payable(PAYEE2, JOB), -1_500),
                (A.FEE_INCOME, -500),
            ],
        )
        await L.post(
            s, key=f"payout:{h}", kind="payout", job_id=JOB, lines=[(A.payable(PAYEE, JOB), 8_000), (A.NODE, -8_000)]
        )
        await L.post(
            s, key=f"routing_fee:{h}", kind="routing_fee", job_id=JOB, lines=[(A.ROUTING_EXPENSE, 12), (A.NODE, -12)]
        )
        await L.post(
            s, key=f"refund:{JOB2}", kind="refund", lines=[(A.escrow(JOB2), 3_000), (A.refund(CUSTOMER, JOB2), -3_000)]
        )
    async with db.sessions() as s:
        assert await L.balance(s, A.NODE) == 10_000 + 3_000 - 8_000 - 12
        assert await L.balance(s, A.payable(PAYEE2, JOB)) == -1_500
        assert await L.balance(s, A.escrow("ff")) == 0  # never used
        with pytest.raises(L.LedgerError) as ei:
            await L.balance(s, "asset:cash")
        assert ei.value.reason == "bad_account"
        every = await L.balances(s)
        assert sum(every.values()) == 0
        assert list(every) == sorted(every)
        assert every == {
            A.NODE: 4_988,
            A.ROUTING_EXPENSE: 12,
            A.FEE_INCOME: -500,
            E: 0,
            A.escrow(JOB2): 0,
            A.payable(PAYEE, JOB): 0,
            A.payable(PAYEE2, JOB): -1_500,
            A.refund(CUSTOMER, JOB2): -3_000,
        }
        assert await L.balances(s, prefix="liability:") == {
            E: 0,
            A.escrow(JOB2): 0,
            A.payable(PAYEE, JOB): 0,
            A.payable(PAYEE2, JOB): -1_500,
            A.refund(CUSTOMER, JOB2): -3_000,
        }
        assert await L.balances(s, prefix="liability:payable:") == {
            A.payable(PAYEE, JOB): 0,
            A.payable(PAYEE2, JOB): -1_500,
        }
        assert await L.balances(s, prefix="liability:%") == {}, "a prefix is literal, not a LIKE pattern"
        assert await L.balances(s, prefix="liability:_scrow") == {}
        job1 = await L.balances(s, job_id=JOB)
        assert job1 == {
            A.NODE: 10_000 - 8_000 - 12,
            A.ROUTING_EXPENSE: 12,
            A.FEE_INCOME: -500,
            E: 0,
            A.payable(PAYEE, JOB): 0,
            A.payable(PAYEE2, JOB): -1_500,
        }
        assert sum(job1.values()) == 0
        assert job1 == await L.balances(s, job_id=JOB)
        assert await L.balances(s, job_id=JOB2, prefix="liability:") == {
            A.escrow(JOB2): 0,
            A.refund(CUSTOMER, JOB2): -3_000,
        }
        assert await L.balances(s, job_id="0f") == {}
        assert [p.kind for p in await L.job_postings(s, JOB)] == ["funding", "release", "payout", "routing_fee"]
        pattern = A.job_accounts(JOB2)
        got = (await s.scalars(select(LedgerLine.account).where(LedgerLine.account.like(pattern)).distinct())).all()
        assert sorted(got) == [A.escrow(JOB2), A.refund(CUSTOMER, JOB2)]


@backends
async def test_a_posting_across_two_jobs(db: Db, backend: str) -> None:
    """Lines of job-scoped accounts carry their own job, whatever the posting's job is."""
    async with db.sessions.begin() as s:
        await fund(s, 1_000, JOB)
        moved = await L.post(s, key="move", kind="transfer", lines=[(E, 400), (A.escrow(JOB2), -400)])
        await L.post(s, key="fee", kind="transfer", job_id=JOB, lines=[(E, 100), (A.FEE_INCOME, -100)])
    async with db.sessions() as s:
        assert (await L.get_posting(s, id=moved)).job_id is None, "two jobs: the posting has none"
        assert await L.balances(s, job_id=JOB) == {A.NODE: 1_000, A.FEE_INCOME: -100, E: -500}
        assert await L.balances(s, job_id=JOB2) == {A.escrow(JOB2): -400}
        assert await L.check_invariants(s, closed_job_ids=[JOB2]) == [
            L.Violation(
                "closed_job_balance", A.escrow(JOB2), -400, f"job {JOB2} is closed but {A.escrow(JOB2)} is -400"
            )
        ]


# ============================================================== invariants


@backends
async def test_invariants_detect_each_violation(db: Db, backend: str) -> None:
    async with db.sessions.begin() as s:
        good = await fund(s, 5_000, JOB)
        await L.post(
            s,
            key=f"release:{JOB}",
            kind="release",
            lines=[(E, 5_000), (A.payable(PAYEE, JOB), -4_900), (A.FEE_INCOME, -100)],
        )
        await fund(s, 700, JOB2)
    async with db.sessions() as s:
        assert await L.check_invariants(s) == []
        await L.assert_balanced(s)

    async def found(closed: tuple[str, ...] = ()) -> set[tuple[str, str, int]]:
        async with db.sessions() as s:
            return {(v.kind, v.subject, v.amount_msat) for v in await L.check_invariants(s, closed_job_ids=closed)}

    expected: set[tuple[str, str, int]] = set()

    # an account of a closed job still holding money (valid postings, wrong state)
    assert await found((JOB, JOB2)) == {
        ("closed_job_balance", A.payable(PAYEE, JOB), -4_900),
        ("closed_job_balance", A.escrow(JOB2), -700),
    }
    async with db.sessions.begin() as s:
        await L.post(s, key="payout:x", kind="payout", lines=[(A.payable(PAYEE, JOB), 4_900), (A.NODE, -4_900)])
    assert await found((JOB,)) == set(), "every account of the job is back to zero"

    pid, p = posting_row()  # unbalanced posting
    await db.raw(p, line_row(pid, A.NODE, 50), line_row(pid, A.escrow(JOB2), -40, JOB2))
    expected.add(("unbalanced_posting", pid, 10))
    assert await found() == expected

    pid, p = posting_row()  # a single line (unbalanced too)
    await db.raw(p, line_row(pid, A.FEE_INCOME, -3))
    expected.add(("unbalanced_posting", pid, -3))
    assert await found() == expected

    pid, p = posting_row()  # a posting without lines
    await db.raw(p)
    expected.add(("short_posting", pid, 0))
    assert await found() == expected

    pid, p = posting_row()  # a liability below zero (debit balance)
    await db.raw(p, line_row(pid, A.refund(CUSTOMER, JOB2), 30, JOB2), line_row(pid, A.NODE, -30))
    expected.add(("liability_overdrawn", A.refund(CUSTOMER, JOB2), 30))
    assert await found() == expected

    pid, p = posting_row(reverses=good)  # a "reversal" that does not negate its target
    await db.raw(p, line_row(pid, A.NODE, -5_000), line_row(pid, A.escrow(JOB2), 5_000, JOB2))
    expected |= {
        ("bad_reversal", pid, 5_000),
        ("bad_reversal", pid, -5_000),
        ("liability_overdrawn", A.escrow(JOB2), 5_000 - 700 - 40),
    }
    assert await found() == expected

    missing = uuid.uuid4().hex  # a reversal of a posting that does not exist
    pid, p = posting_row(reverses=missing)
    await db.raw(p, line_row(pid, A.NODE, 1), line_row(pid, A.FEE_INCOME, -1), bypass_fk=True)
    expected |= {("dangling_reversal", pid, 0), ("bad_reversal", pid, 1), ("bad_reversal", pid, -1)}
    assert await found() == expected

    ghost = uuid.uuid4().hex  # lines whose posting does not exist
    await db.raw(line_row(ghost, A.NODE, 9), line_row(ghost, A.FEE_INCOME, -2), bypass_fk=True)
    expected |= {("orphan_line", ghost, 7), ("unbalanced_posting", ghost, 7)}
    assert await found() == expected

    pid, p = posting_row()  # a job-scoped line stored under another job id
    await db.raw(p, line_row(pid, A.NODE, 4), line_row(pid, A.escrow(JOB), -4, JOB2))
    expected.add(("line_job_mismatch", E, 0))
    assert await found() == expected

    pid, p = posting_row()  # an account outside the grammar
    await db.raw(p, line_row(pid, "asset:cash", 6), line_row(pid, A.NODE, -6))
    expected.add(("bad_account", "asset:cash", 6))
    assert await found() == expected

    async with db.sessions() as s:
        with pytest.raises(L.LedgerInvariantError) as ei:
            await L.assert_balanced(s)
    assert ei.value.reason == "invariant_violation"
    assert {(v.kind, v.subject, v.amount_msat) for v in ei.value.violations} == expected


@backends
async def test_append_only_at_database_level(db: Db, backend: str) -> None:
    async with db.sessions.begin() as s:
        pid = await fund(s, 1_000)
    for stmt in (
        update(LedgerLine).values(amount_msat=2_000),
        delete(LedgerLine),
        update(LedgerPosting).values(memo="edited"),
        delete(LedgerPosting).where(LedgerPosting.id == pid),
    ):
        with pytest.raises(DBAPIError, match="append-only"):
            async with db.sessions.begin() as s:
                await s.execute(stmt)
    with pytest.raises(IntegrityError):  # a zero line is refused by the database too
        async with db.sessions.begin() as s:
            await s.execute(insert(LedgerLine.__table__), [{"posting_id": pid, "account": A.NODE, "amount_msat": 0}])
    with pytest.raises(IntegrityError):  # a posting reverses another at most once
        p1, r1 = posting_row(reverses=pid)
        p2, r2 = posting_row(reverses=pid)
        await db.raw(r1, r2)
    assert await db.counts() == (1, 2)
    async with db.sessions() as s:
        assert await L.balance(s, A.NODE) == 1_000


# ============================================================== reconciliation (fake LND)


class FakeLnd:
    """LND's answers, set per payment hash; counts the calls."""

    timeout = 5.0

    def __init__(self) -> None:
        self.invoices: dict[str, Invoice] = {}
        self.payments: dict[str, Payment] = {}
        self.local_msat = 10**12
        self.calls = 0
        self.fail: Exception | None = None
        self.hang = False

    def settle(self, h: str, amount: int, paid: int | None = None, state: InvoiceState = InvoiceState.SETTLED) -> None:
        self.invoices[h] = Invoice(
            payment_hash=bytes.fromhex(h),
            state=state,
            value_msat=amount,
            amt_paid_msat=amount if paid is None else paid,
            payment_request="lnbcrt1",
            memo="",
            add_index=1,
            settle_index=1,
            creation_date=0,
            settle_date=0,
            expiry=3600,
            cltv_expiry=80,
        )

    def paid(self, h: str, value: int, fee: int, status: PaymentStatus = PaymentStatus.SUCCEEDED) -> None:
        self.payments[h] = Payment(
            payment_hash=bytes.fromhex(h),
            status=status,
            value_msat=value,
            fee_msat=fee,
            preimage=b"\x01" * 32,
            failure_reason=FailureReason.NONE,
            payment_index=1,
            creation_time_ns=0,
        )

    async def lookup_invoice(self, payment_hash: bytes) -> Invoice:
        self.calls += 1
        if self.fail:
            raise self.fail
        try:
            return self.invoices[payment_hash.hex()]
        except KeyError:
            raise errors.LndNotFound("LookupInvoiceV2", "unable to locate invoice") from None

    async def track_payment(self, payment_hash: bytes):
        self.calls += 1
        if self.hang:
            await asyncio.sleep(3600)
        p = self.payments.get(payment_hash.hex())
        if p is None:
            raise errors.LndNotFound("TrackPaymentV2", "payment isn't initiated")
        yield p
        yield p  # the stream would go on; reconcile takes the first update only

    async def channel_balance(self) -> ChannelBalance:
        return ChannelBalance(local_msat=self.local_msat, remote_msat=0, pending_open_local_msat=0)


async def add_invoice_row(s: AsyncSession, h: str, amount: int, job: str = JOB, state: str = "settled") -> None:
    s.add(
        LnInvoice(
            payment_hash=h,
            job_id=job,
            mode="custodial",
            amount_msat=amount,
            payment_request="lnbcrt1",
            expires_at=2**40,
            state=state,
            amount_paid_msat=amount if state == "settled" else 0,
        )
    )
    await s.flush()


async def add_payout_rows(
    s: AsyncSession, h: str, amount: int, fee: int | None, payee: str = PAYEE, job: str = JOB, state: str = "succeeded"
) -> None:
    pid = f"{job[:8]}:reward:{hx()[:16]}"  # ln_payouts.id is String(64)
    s.add(
        Payout(
            id=pid,
            kind=PayoutKind.REWARD,
            job_id=job,
            payee=payee,
            amount_msat=amount,
            destination_kind=DestinationKind.BOLT11,
            destination="x",
            state=state,
            fee_msat=fee,
            payment_hash=h,
        )
    )
    await s.flush()
    s.add(
        PayoutAttempt(
            payment_hash=h, payout_id=pid, payment_request="lnbcrt1", fee_limit_msat=10_000, state=state, fee_msat=fee
        )
    )
    await s.flush()


async def clean_books(db: Db, lnd: FakeLnd) -> tuple[str, str]:
    """A funded, released and paid-out job whose books match LND."""
    hin, hout = hx(), hx()
    P = A.payable(PAYEE, JOB)
    lnd.settle(hin, 10_000)
    lnd.paid(hout, 9_000, 50)
    async with db.sessions.begin() as s:
        await add_invoice_row(s, hin, 10_000)
        await fund(s, 10_000, JOB, hin)
        await L.post(s, key=f"release:{JOB}", kind="release", lines=[(E, 10_000), (P, -9_000), (A.FEE_INCOME, -1_000)])
        await add_payout_rows(s, hout, 9_000, 50)
        await L.post(s, key=f"payout:{hout}", kind="payout", lines=[(P, 9_000), (A.NODE, -9_000)], job_id=JOB)
        await L.post(
            s, key=f"routing_fee:{hout}", kind="routing_fee", job_id=JOB, lines=[(A.ROUTING_EXPENSE, 50), (A.NODE, -50)]
        )
        await add_invoice_row(s, hx(), 777, state="open")  # not settled: not reconciled
    return hin, hout


async def run(db: Db, lnd: FakeLnd, **kw) -> R.ReconciliationReport:
    async with db.sessions.begin() as s:
        return await R.reconcile(s, lnd, **kw)


def kinds(report: R.ReconciliationReport) -> set[tuple[str, str | None, int, int]]:
    return {(d.kind, d.payment_hash, d.expected_msat, d.actual_msat) for d in report.discrepancies}


@backends
async def test_reconcile_clean_books_are_ok_and_stored(db: Db, backend: str) -> None:
    lnd = FakeLnd()
    await clean_books(db, lnd)
    async with db.sessions() as s:
        assert not await R.payouts_paused(s), "never reconciled: not paused"
    rep = await run(db, lnd)
    assert rep.ok and rep.discrepancies == [] and rep.discrepancy_msat == 0
    assert (rep.invoices_checked, rep.payments_checked) == (1, 1)
    assert (rep.ledger_node_msat, rep.lnd_node_msat) == (950, 950)
    assert (rep.lnd_settled_msat, rep.lnd_paid_msat, rep.lnd_fees_msat) == (10_000, 9_000, 50)
    assert rep.liabilities_msat == 0 and rep.warnings == []
    assert lnd.calls == 2, "one LND call per settled invoice and per succeeded attempt"
    async with db.sessions() as s:
        row = await s.get(LedgerReconciliation, rep.id)
        assert (row.kind, row.ok, row.discrepancy_msat) == ("run", True, 0)
        stored = json.loads(row.report)
        assert stored["ok"] is True and stored["ledger_node_msat"] == 950 and stored["discrepancies"] == []
        assert not await R.payouts_paused(s)


@backends
async def test_reconcile_finds_each_discrepancy(db: Db, backend: str) -> None:
    lnd = FakeLnd()
    hin, hout = await clean_books(db, lnd)

    async def expect(found: set, msat: int) -> None:
        rep = await run(db, lnd)
        assert kinds(rep) == found
        assert rep.discrepancy_msat == msat and rep.ok is (msat == 0)
        async with db.sessions() as s:
            assert await R.payouts_paused(s) is (msat != 0)

    # LND charged another fee than the attempt and the ledger say
    lnd.paid(hout, 9_000, 80)
    await expect(
        {
            ("payment_fee_mismatch", hout, 50, 80),
            ("routing_fee_mismatch", hout, 80, 50),
            ("routing_expense_mismatch", hout, 80, 50),
        },
        90,
    )
    rep = await run(db, lnd, threshold_msat=90)
    assert rep.ok and rep.discrepancy_msat == 90, "within the threshold"
    assert not (await run(db, lnd, threshold_msat=89)).ok
    lnd.paid(hout, 9_000, 50)
    await expect(set(), 0)

    # a settled invoice without its funding posting; another whose posting books less than LND's amt_paid
    h2, h3 = hx(), hx()
    lnd.settle(h2, 2_000)
    lnd.settle(h3, 3_000, paid=3_100)  # overpaid
    async with db.sessions.begin() as s:
        await add_invoice_row(s, h2, 2_000, JOB2)
        await add_invoice_row(s, h3, 3_000, JOB2)
        await L.post(s, key=f"funding:{h3}", kind="funding", lines=[(A.NODE, 3_000), (A.escrow(JOB2), -3_000)])
    await expect({("funding_missing", h2, 2_000, 0), ("funding_mismatch", h3, 3_100, 3_000)}, 2_100)
    async with db.sessions.begin() as s:
        await L.post(s, key=f"funding:{h2}", kind="funding", lines=[(A.NODE, 2_000), (A.escrow(JOB2), -2_000)])
        await L.post(s, key=f"overpaid:{h3}", kind="funding", lines=[(A.NODE, 100), (A.escrow(JOB2), -100)])
    await expect({("funding_mismatch", h3, 3_100, 3_000), ("unmatched_node_posting", h3, 0, 100)}, 200)
    async with db.sessions() as s:
        rev = (await L.get_posting(s, key=f"overpaid:{h3}")).id
    async with db.sessions.begin() as s:
        await L.reverse(s, rev, key=f"reversal:overpaid:{h3}")
        await L.reverse(s, (await L.get_posting(s, key=f"funding:{h3}")).id, key=f"reversal:funding:{h3}")
        await L.post(s, key=f"funding:{h3}:v2", kind="funding", lines=[(A.NODE, 3_100), (A.escrow(JOB2), -3_100)])
    # the reversed funding and the correction (funding:<hash>:<suffix>) both count for the invoice: clean
    await expect(set(), 0)
    async with db.sessions.begin() as s:  # a correction under another prefix does not count
        await L.post(s, key=f"adjust:{h3}", kind="adjustment", lines=[(A.NODE, 1), (A.escrow(JOB2), -1)])
    await expect({("unmatched_node_posting", h3, 0, 1)}, 1)

    # LND does not know an invoice / says it is open / says it was underpaid; one payment unknown, one failed
    async with db.sessions() as s:
        n_runs = await s.scalar(select(func.count()).select_from(LedgerReconciliation))
    hu, ho, hp, hpu, hpf = hx(), hx(), hx(), hx(), hx()
    lnd.settle(ho, 400, state=InvoiceState.OPEN)
    lnd.settle(hp, 500, paid=450)
    lnd.paid(hpf, 60, 0, status=PaymentStatus.FAILED)
    async with db.sessions.begin() as s:
        for h, amt in ((hu, 300), (ho, 400), (hp, 500)):
            await add_invoice_row(s, h, amt, JOB2)
        await add_payout_rows(s, hpu, 70, 0, job=JOB2)
        await add_payout_rows(s, hpf, 60, 0, job=JOB2)
    rep = await run(db, lnd)
    assert {
        ("invoice_unknown", hu, 300, 0),
        ("invoice_not_settled", ho, 400, 0),
        ("invoice_underpaid", hp, 500, 450),
        ("funding_missing", hp, 450, 0),
        ("payment_unknown", hpu, 70, 0),
        ("payment_not_succeeded", hpf, 60, 0),
    } <= kinds(rep)
    assert not rep.ok
    async with db.sessions() as s:
        assert await s.scalar(select(func.count()).select_from(LedgerReconciliation)) == n_runs + 1


@backends
async def test_reconcile_payout_postings_and_node_total(db: Db, backend: str) -> None:
    lnd = FakeLnd()
    hin, hout = await clean_books(db, lnd)
    h2 = hx()
    P2 = A.payable(PAYEE2, JOB2)
    lnd.settle(hin2 := hx(), 5_000)
    lnd.paid(h2, 4_000, 7)
    async with db.sessions.begin() as s:
        await add_invoice_row(s, hin2, 5_000, JOB2)
        await fund(s, 5_000, JOB2, hin2)
        await L.post(s, key=f"release:{JOB2}", kind="release", lines=[(A.escrow(JOB2), 5_000), (P2, -5_000)])
        await add_payout_rows(s, h2, 4_000, 7, payee=PAYEE2, job=JOB2)
        # payout booked for too little, routing fee missing
        await L.post(s, key=f"payout:{h2}", kind="payout", lines=[(P2, 3_999), (A.NODE, -3_999)])
    rep = await run(db, lnd)
    assert kinds(rep) == {("payout_mismatch", h2, 4_000, 3_999), ("routing_fee_missing", h2, 7, 0)}
    assert rep.discrepancy_msat == 8 and rep.ledger_node_msat - rep.lnd_node_msat == 8
    assert rep.liabilities_msat == 1_001

    # a routing fee booked against the wrong account: node right, expense wrong
    async with db.sessions.begin() as s:
        await L.post(s, key=f"routing_fee:{h2}", kind="routing_fee", lines=[(A.FEE_INCOME, 7), (A.NODE, -7)])
    rep = await run(db, lnd)
    assert kinds(rep) == {("payout_mismatch", h2, 4_000, 3_999), ("routing_expense_mismatch", h2, 7, 0)}

    # NODE lines without any posting (bypassing the ledger) show in the total only
    ghost = uuid.uuid4().hex
    await db.raw(line_row(ghost, A.NODE, 25), line_row(ghost, A.FEE_INCOME, -25), bypass_fk=True)
    rep = await run(db, lnd)
    assert ("node_total_mismatch", None, rep.lnd_node_msat + 1, rep.ledger_node_msat) in kinds(rep)
    assert rep.ledger_node_msat - rep.lnd_node_msat == 1 + 25

    lnd.local_msat = 5
    rep = await run(db, lnd)
    assert rep.lnd_local_balance_msat == 5 and any("below what the ledger owes" in w for w in rep.warnings)


@backends
async def test_pause_and_operator_override(db: Db, backend: str) -> None:
    lnd = FakeLnd()
    hin, _ = await clean_books(db, lnd)
    lnd.settle(hin, 10_000, paid=9_000)  # LND disagrees with the books
    rep = await run(db, lnd)
    assert not rep.ok
    async with db.sessions.begin() as s:
        assert await R.payouts_paused(s)
        with pytest.raises(ValueError):
            await R.resume_payouts(s, reason="  ")
        oid = await R.resume_payouts(s, reason="checked by hand: LND rounding, ticket 42")
    async with db.sessions() as s:
        assert not await R.payouts_paused(s)
        row = await R.latest_reconciliation(s)
        assert (row.id, row.kind, row.ok) == (oid, "override", True)
        assert json.loads(row.report)["overrides"] == rep.id
    assert not (await run(db, lnd)).ok
    async with db.sessions() as s:
        assert await R.payouts_paused(s), "the next failing run pauses again"
    lnd.settle(hin, 10_000)
    assert (await run(db, lnd)).ok
    async with db.sessions() as s:
        assert not await R.payouts_paused(s)


@backends
async def test_reconcile_aborts_on_lnd_failure_and_stores_nothing(db: Db, backend: str) -> None:
    lnd = FakeLnd()
    await clean_books(db, lnd)
    lnd.fail = errors.LndUnavailable("LookupInvoiceV2", "connection refused")
    with pytest.raises(errors.LndUnavailable):
        await run(db, lnd)
    lnd.fail = None
    lnd.hang = True
    with pytest.raises(errors.LndTimeout):
        await run(db, lnd, call_timeout=0.2)
    async with db.sessions() as s:
        assert await s.scalar(select(func.count()).select_from(LedgerReconciliation)) == 0
        assert not await R.payouts_paused(s)
    with pytest.raises(ValueError):
        await run(db, lnd, threshold_msat=-1)


async def test_reconcile_persist_false_stores_nothing(db: Db) -> None:
    lnd = FakeLnd()
    await clean_books(db, lnd)
    async with db.sessions.begin() as s:
        rep = await R.reconcile(s, lnd, persist=False)
    assert rep.ok and rep.id is None
    async with db.sessions() as s:
        assert await R.latest_reconciliation(s) is None


def test_report_json_caps_discrepancies() -> None:
    ds = [R.Discrepancy("funding_missing", "00" * 32, 1, 0) for _ in range(R.MAX_STORED_DISCREPANCIES + 5)]
    rep = R.ReconciliationReport(
        ran_at=utcnow(),
        ok=False,
        threshold_msat=0,
        discrepancy_msat=len(ds),
        discrepancies=ds,
        invoices_checked=0,
        payments_checked=0,
        ledger_node_msat=0,
        lnd_settled_msat=0,
        lnd_paid_msat=0,
        lnd_fees_msat=0,
    )
    d = json.loads(rep.to_json())
    assert len(d["discrepancies"]) == R.MAX_STORED_DISCREPANCIES and d["discrepancies_omitted"] == 5
    assert d["discrepancies"][0] == {
        "kind": "funding_missing",
        "payment_hash": "00" * 32,
        "expected_msat": 1,
        "actual_msat": 0,
        "detail": "",
    }
