"""The double-entry ledger: balanced, idempotent, append-only postings in integer millisatoshis.

Every function takes an open ``AsyncSession`` and only flushes; the caller's
transaction commits (so a posting is durable exactly when the business change that
caused it is).

Sign convention: debit positive, credit negative; the lines of every posting sum to
exactly zero, so the sum of all balances is always zero. Liabilities (escrow,
payable, refund) and income are credit-normal: a liability holding money has a
*negative* balance, and ``-balance`` is what we owe.

Idempotency: ``post`` inserts the posting with ``INSERT … ON CONFLICT DO NOTHING`` on
its ``key``. Posting the same key again with the same content returns ``None`` and
changes nothing; the same key with different content raises
``LedgerError("key_conflict")`` — a replay is never silently taken for a new fact.

Corrections are postings too: :func:`reverse` books the negated lines of a posting,
at most once per posting (``ledger_postings.reverses`` is UNIQUE).
"""

from __future__ import annotations

import enum
import re
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import String, exists, func, insert, literal, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased
from sqlalchemy.sql import Select
from sqlalchemy.sql.elements import ColumnElement

from service.bitcoin import MAX_MSAT  # no amount, and no posting, moves more than 21 million BTC
from service.db import insert_ignore, utcnow
from service.ledger import accounts
from service.ledger.models import LedgerLine, LedgerPosting

MAX_LINES = 10_000
MAX_KEY = 200
MAX_MEMO = 500
REVERSAL = "reversal"

_KEY_RE = re.compile(r"\A[\x21-\x7e]{1,200}\Z")  # printable ASCII, no whitespace
_KIND_RE = re.compile(r"\A[a-z][a-z0-9_]{0,31}\Z")
_JOB_RE = re.compile(r"\A[0-9a-f]{1,64}\Z")


class Reason(enum.StrEnum):
    TOO_FEW_LINES = "too_few_lines"  # fewer than two lines
    TOO_MANY_LINES = "too_many_lines"
    BAD_LINE = "bad_line"  # a line is not an (account, amount) pair
    NOT_INT = "not_int"  # an amount is not an int (bools and floats refused)
    ZERO_AMOUNT = "zero_amount"
    AMOUNT_TOO_LARGE = "amount_too_large"  # |amount|, or the posting's total debit, above 21M BTC
    UNBALANCED = "unbalanced"  # lines do not sum to exactly zero
    BAD_ACCOUNT = "bad_account"
    BAD_KEY = "bad_key"
    BAD_KIND = "bad_kind"
    BAD_JOB_ID = "bad_job_id"
    JOB_MISMATCH = "job_mismatch"  # a job-scoped account of another job than the posting's
    BAD_MEMO = "bad_memo"
    KEY_CONFLICT = "key_conflict"  # the key was posted before with different content
    OVERDRAWN = "overdrawn"  # a liability would be left with a debit balance
    NOT_FOUND = "not_found"  # reverse: no such posting
    ALREADY_REVERSED = "already_reversed"
    INVARIANT_VIOLATION = "invariant_violation"


class LedgerError(Exception):
    """A posting was refused; ``reason`` is one of :class:`Reason` (a ``str``)."""

    def __init__(self, reason: str, message: str = "") -> None:
        self.reason = Reason(reason)
        self.message = message or str(self.reason)
        super().__init__(f"{self.reason}: {self.message}")


@dataclass(frozen=True, slots=True)
class Violation:
    """One broken invariant, found by :func:`check_invariants`."""

    kind: str  # see check_invariants
    subject: str  # a posting id or an account name
    amount_msat: int  # the offending sum or balance
    detail: str = ""


class LedgerInvariantError(LedgerError):
    def __init__(self, violations: Sequence[Violation]) -> None:
        self.violations = list(violations)
        head = "; ".join(f"{v.kind} {v.subject} ({v.amount_msat} msat)" for v in self.violations[:5])
        more = f" and {len(self.violations) - 5} more" if len(self.violations) > 5 else ""
        super().__init__(Reason.INVARIANT_VIOLATION, f"{len(self.violations)} violation(s): {head}{more}")


@dataclass(frozen=True, slots=True)
class Posting:
    id: str
    key: str
    kind: str
    job_id: str | None
    memo: str
    reverses: str | None
    created_at: datetime
    lines: tuple[tuple[str, int], ...]


# ---------------------------------------------------------------- validation


def _validate_lines(lines: object) -> list[tuple[str, int]]:
    if isinstance(lines, str | bytes) or not isinstance(lines, Iterable):
        raise LedgerError(Reason.BAD_LINE, "lines must be a sequence of (account, amount_msat) pairs")
    out: list[tuple[str, int]] = []
    for line in lines:
        if isinstance(line, str | bytes) or not isinstance(line, Sequence) or len(line) != 2:
            raise LedgerError(Reason.BAD_LINE, f"a line must be an (account, amount_msat) pair, got {line!r}")
        account, amount = line
        try:
            accounts.validate(account)
        except accounts.AccountError as e:
            raise LedgerError(Reason.BAD_ACCOUNT, str(e)) from None
        if type(amount) is not int:
            raise LedgerError(Reason.NOT_INT, f"amount on {account} must be an int, got {type(amount).__name__}")
        if amount == 0:
            raise LedgerError(Reason.ZERO_AMOUNT, f"zero amount on {account}")
        if abs(amount) > MAX_MSAT:
            raise LedgerError(Reason.AMOUNT_TOO_LARGE, f"|{amount}| msat on {account} exceeds {MAX_MSAT}")
        out.append((account, amount))
        if len(out) > MAX_LINES:
            raise LedgerError(Reason.TOO_MANY_LINES, f"more than {MAX_LINES} lines")
    if len(out) < 2:
        raise LedgerError(Reason.TOO_FEW_LINES, f"a posting needs at least two lines, got {len(out)}")
    total = sum(a for _, a in out)
    if total != 0:
        raise LedgerError(Reason.UNBALANCED, f"lines sum to {total} msat, not 0")
    if sum(a for _, a in out if a > 0) > MAX_MSAT:
        raise LedgerError(Reason.AMOUNT_TOO_LARGE, f"the posting moves more than {MAX_MSAT} msat")
    return out


def _validate_key(key: object) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise LedgerError(
            Reason.BAD_KEY, f"key must be 1-{MAX_KEY} printable ASCII characters without whitespace, got {key!r}"
        )
    return key


def _validate_memo(memo: object) -> str:
    if not isinstance(memo, str) or len(memo) > MAX_MEMO:
        raise LedgerError(Reason.BAD_MEMO, f"memo must be a string of at most {MAX_MEMO} characters")
    return memo


def _posting_job(job_id: object, lines: Sequence[tuple[str, int]]) -> str | None:
    if job_id is not None and (not isinstance(job_id, str) or not _JOB_RE.match(job_id)):
        raise LedgerError(Reason.BAD_JOB_ID, f"job_id must be 1-64 lowercase hex digits, got {job_id!r}")
    jobs = {j for a, _ in lines if (j := accounts.job_of(a)) is not None}
    if job_id is None:
        return next(iter(jobs)) if len(jobs) == 1 else None
    if jobs - {job_id}:
        raise LedgerError(
            Reason.JOB_MISMATCH, f"posting of job {job_id} touches accounts of job(s) {sorted(jobs - {job_id})}"
        )
    return job_id


def _canonical(lines: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
    return sorted((a, int(m)) for a, m in lines)


# ---------------------------------------------------------------- reading postings


async def _lines_of(session: AsyncSession, posting_id: str) -> list[tuple[str, int]]:
    rows = await session.execute(
        select(LedgerLine.account, LedgerLine.amount_msat)
        .where(LedgerLine.posting_id == posting_id)
        .order_by(LedgerLine.id)
    )
    return [(a, int(m)) for a, m in rows.all()]


async def _posting_where(session: AsyncSession, cond: ColumnElement[bool]) -> Posting | None:
    row = (
        await session.execute(
            select(
                LedgerPosting.id,
                LedgerPosting.key,
                LedgerPosting.kind,
                LedgerPosting.job_id,
                LedgerPosting.memo,
                LedgerPosting.reverses,
                LedgerPosting.created_at,
            ).where(cond)
        )
    ).first()
    if row is None:
        return None
    return Posting(
        id=row.id,
        key=row.key,
        kind=row.kind,
        job_id=row.job_id,
        memo=row.memo,
        reverses=row.reverses,
        created_at=row.created_at,
        lines=tuple(await _lines_of(session, row.id)),
    )


async def get_posting(session: AsyncSession, *, key: str | None = None, id: str | None = None) -> Posting | None:
    """The posting with this idempotency ``key`` (or this ``id``), with its lines; None if absent."""
    if (key is None) == (id is None):
        raise ValueError("give exactly one of key= or id=")
    return await _posting_where(session, LedgerPosting.key == key if key is not None else LedgerPosting.id == id)


async def job_postings(session: AsyncSession, job_id: str) -> list[Posting]:
    """Every posting of ``job_id``, oldest first."""
    ids = (
        await session.scalars(
            select(LedgerPosting.id)
            .where(LedgerPosting.job_id == job_id)
            .order_by(LedgerPosting.created_at, LedgerPosting.id)
        )
    ).all()
    return [p for i in ids if (p := await get_posting(session, id=i)) is not None]


# ---------------------------------------------------------------- writing


async def _check_not_overdrawn(session: AsyncSession, lines: Sequence[tuple[str, int]]) -> None:
    """Refuse a posting that would leave a liability with a debit balance (more out than in).

    Checked inside the caller's transaction before the insert; concurrent writers that
    both pass are still caught by :func:`check_invariants`.
    """
    delta: dict[str, int] = defaultdict(int)
    for account, amount in lines:
        if accounts.kind_of(account) == "liability":
            delta[account] += amount
    debited = sorted(a for a, d in delta.items() if d > 0)
    if not debited:
        return
    rows = await session.execute(
        select(LedgerLine.account, func.sum(LedgerLine.amount_msat))
        .where(LedgerLine.account.in_(debited))
        .group_by(LedgerLine.account)
    )
    current = {a: int(s) for a, s in rows.all()}
    for account in debited:
        after = current.get(account, 0) + delta[account]
        if after > 0:
            raise LedgerError(
                Reason.OVERDRAWN,
                f"{account} would hold {after} msat less than nothing "
                f"(balance {current.get(account, 0)}, debit {delta[account]})",
            )


async def _insert(
    session: AsyncSession,
    *,
    key: str,
    kind: str,
    job_id: str | None,
    memo: str,
    reverses: str | None,
    lines: Sequence[tuple[str, int]],
) -> str | None:
    """Insert the posting and its lines; None if a unique constraint (key or reverses) stopped it."""
    posting_id = uuid.uuid4().hex
    res = await session.execute(
        insert_ignore(session, LedgerPosting.__table__),
        [
            {
                "id": posting_id,
                "key": key,
                "kind": kind,
                "job_id": job_id,
                "memo": memo,
                "reverses": reverses,
                "created_at": utcnow(),
            }
        ],
    )
    if res.rowcount != 1:  # type: ignore[attr-defined]  # a CursorResult
        return None
    await session.execute(
        insert(LedgerLine),
        [
            {"posting_id": posting_id, "account": a, "job_id": accounts.job_of(a) or job_id, "amount_msat": m}
            for a, m in lines
        ],
    )
    return posting_id


def _same(
    existing: Posting, *, kind: str, job_id: str | None, reverses: str | None, lines: Sequence[tuple[str, int]]
) -> bool:
    return (
        existing.kind == kind
        and existing.job_id == job_id
        and existing.reverses == reverses
        and _canonical(existing.lines) == _canonical(lines)
    )


def _conflict(key: str, existing: Posting) -> LedgerError:
    return LedgerError(
        Reason.KEY_CONFLICT,
        f"key {key!r} was posted before ({existing.kind}, posting {existing.id}) with different content",
    )


async def post(
    session: AsyncSession,
    *,
    key: str,
    kind: str,
    lines: Sequence[tuple[str, int]],
    job_id: str | None = None,
    memo: str = "",
) -> str | None:
    """Book a balanced posting; return its id, or None if ``key`` was already posted identically.

    ``lines`` are ``(account, amount_msat)`` pairs, debit positive and credit negative,
    at least two, each a non-zero ``int`` of at most 21M BTC, summing to exactly zero.
    ``job_id`` defaults to the job of the job-scoped accounts touched (if exactly one).
    Raises :class:`LedgerError` (see :class:`Reason`) and then writes nothing.
    """
    key = _validate_key(key)
    if not isinstance(kind, str) or not _KIND_RE.match(kind) or kind == REVERSAL:
        raise LedgerError(
            Reason.BAD_KIND,
            f"kind must match [a-z][a-z0-9_]{{0,31}} and not be {REVERSAL!r} (use reverse()), got {kind!r}",
        )
    memo = _validate_memo(memo)
    norm = _validate_lines(lines)
    job_id = _posting_job(job_id, norm)

    existing = await get_posting(session, key=key)
    if existing is None:
        await _check_not_overdrawn(session, norm)
        posting_id = await _insert(session, key=key, kind=kind, job_id=job_id, memo=memo, reverses=None, lines=norm)
        if posting_id is not None:
            return posting_id
        existing = await get_posting(session, key=key)  # a concurrent writer committed this key first
        if existing is None:  # pragma: no cover - only key or id (uuid4) can conflict here
            raise RuntimeError(f"posting {key!r} neither inserted nor found")
    if not _same(existing, kind=kind, job_id=job_id, reverses=None, lines=norm):
        raise _conflict(key, existing)
    return None


async def reverse(session: AsyncSession, posting_id: str, *, key: str, memo: str = "") -> str:
    """Book the negation of posting ``posting_id`` under ``key``; return the reversal's id.

    A posting is reversed at most once: another key for the same posting raises
    ``already_reversed``. Calling again with the same key returns the same reversal's
    id (idempotent). A reversal that would overdraw a liability (e.g. undoing a
    funding whose money was already released) raises ``overdrawn``.
    """
    key = _validate_key(key)
    memo = _validate_memo(memo)
    target = await get_posting(session, id=posting_id) if isinstance(posting_id, str) else None
    if target is None:
        raise LedgerError(Reason.NOT_FOUND, f"no posting {posting_id!r}")
    lines = _validate_lines([(a, -m) for a, m in target.lines])

    async def _replay(existing: Posting) -> str:
        if _same(existing, kind=REVERSAL, job_id=target.job_id, reverses=target.id, lines=lines):
            return existing.id
        raise _conflict(key, existing)

    existing = await get_posting(session, key=key)
    if existing is not None:
        return await _replay(existing)
    other = await session.scalar(select(LedgerPosting.id).where(LedgerPosting.reverses == target.id))
    if other is not None:
        raise LedgerError(Reason.ALREADY_REVERSED, f"posting {target.id} was already reversed by {other}")
    await _check_not_overdrawn(session, lines)
    new_id = await _insert(
        session,
        key=key,
        kind=REVERSAL,
        job_id=target.job_id,
        memo=memo or f"reversal of {target.key}",
        reverses=target.id,
        lines=lines,
    )
    if new_id is not None:
        return new_id
    existing = await get_posting(session, key=key)
    if existing is not None:
        return await _replay(existing)
    raise LedgerError(Reason.ALREADY_REVERSED, f"posting {target.id} was reversed concurrently")


# ---------------------------------------------------------------- balances


async def balance(session: AsyncSession, account: str) -> int:
    """Signed balance of ``account`` (debit positive); 0 for an account never used."""
    try:
        accounts.validate(account)
    except accounts.AccountError as e:
        raise LedgerError(Reason.BAD_ACCOUNT, str(e)) from None
    total = await session.scalar(select(func.sum(LedgerLine.amount_msat)).where(LedgerLine.account == account))
    return int(total or 0)


async def balances(session: AsyncSession, *, prefix: str | None = None, job_id: str | None = None) -> dict[str, int]:
    """Signed balance of every account that has lines, sorted by name (zero balances included).

    ``prefix`` keeps accounts whose name starts with it (e.g. ``"liability:"``).
    ``job_id`` keeps the lines of that job: its job-scoped accounts, plus that job's
    share of the global accounts (node, fees, routing), so the result sums to zero.
    """
    q = select(LedgerLine.account, func.sum(LedgerLine.amount_msat)).group_by(LedgerLine.account)
    if prefix is not None:
        q = q.where(LedgerLine.account.startswith(prefix, autoescape=True))
    if job_id is not None:
        q = q.where(LedgerLine.job_id == job_id)
    rows = (await session.execute(q.order_by(LedgerLine.account))).all()
    return {a: int(s) for a, s in rows}


# ---------------------------------------------------------------- invariants


async def _all(session: AsyncSession, query: Select[*tuple[Any, ...]]) -> list[Any]:
    return list((await session.execute(query)).all())


_LIABILITY = "liability:%"
_SCOPED_PREFIXES = ("liability:escrow:%", "liability:appeal:%", "liability:payable:%:%", "liability:refund:%:%")
_CHUNK = 500


async def check_invariants(session: AsyncSession, *, closed_job_ids: Iterable[str] = ()) -> list[Violation]:
    """Every broken invariant of the ledger (an empty list when all hold). Never raises on a finding.

    Violation kinds:

    - ``unbalanced_posting``: a posting whose lines do not sum to zero (amount = the sum);
    - ``short_posting``: a posting without lines (one line is an unbalanced posting);
    - ``orphan_line``: lines whose posting does not exist;
    - ``dangling_reversal``: a reversal whose reversed posting does not exist;
    - ``bad_reversal``: a reversal whose lines are not the exact negation of its target's;
    - ``bad_account``: lines on an account whose name has no known prefix (see :mod:`accounts`);
    - ``line_job_mismatch``: lines of a job-scoped account stored with another job id;
    - ``liability_overdrawn``: an escrow/payable/refund account with a debit balance;
    - ``closed_job_balance``: an account of a job in ``closed_job_ids`` with a non-zero balance.

    Each check is one aggregate query (GROUP BY in SQL) returning only offenders.
    """
    out: list[Violation] = []
    amount = LedgerLine.amount_msat
    total = func.sum(amount)

    # (one non-zero line never sums to zero, so a one-line posting is reported here too)
    rows = await _all(
        session,
        select(LedgerLine.posting_id, total, func.count())
        .group_by(LedgerLine.posting_id)
        .having(total != 0)
        .order_by(LedgerLine.posting_id),
    )
    out += [Violation("unbalanced_posting", pid, int(s), f"{n} line(s) sum to {int(s)} msat") for pid, s, n in rows]
    no_lines = await session.scalars(
        select(LedgerPosting.id)
        .where(~exists().where(LedgerLine.posting_id == LedgerPosting.id))
        .order_by(LedgerPosting.id)
    )
    out += [Violation("short_posting", pid, 0, "no lines") for pid in no_lines.all()]

    rows = await _all(
        session,
        select(LedgerLine.posting_id, total)
        .where(~exists().where(LedgerPosting.id == LedgerLine.posting_id))
        .group_by(LedgerLine.posting_id)
        .order_by(LedgerLine.posting_id),
    )
    out += [Violation("orphan_line", pid, int(s), "lines of a posting that does not exist") for pid, s in rows]

    target = aliased(LedgerPosting)
    rows = await _all(
        session,
        select(LedgerPosting.id, LedgerPosting.reverses)
        .outerjoin(target, target.id == LedgerPosting.reverses)
        .where(LedgerPosting.reverses.isnot(None), target.id.is_(None))
        .order_by(LedgerPosting.id),
    )
    out += [Violation("dangling_reversal", pid, 0, f"reverses missing posting {t}") for pid, t in rows]

    rev = aliased(LedgerPosting)
    rows = await _all(
        session,
        select(rev.id, LedgerLine.account, total)
        .select_from(rev)
        .join(LedgerLine, or_(LedgerLine.posting_id == rev.id, LedgerLine.posting_id == rev.reverses))
        .where(rev.reverses.isnot(None))
        .group_by(rev.id, LedgerLine.account)
        .having(total != 0)
        .order_by(rev.id, LedgerLine.account),
    )
    out += [
        Violation("bad_reversal", pid, int(s), f"reversal and target leave {int(s)} msat on {a}") for pid, a, s in rows
    ]

    known = or_(
        LedgerLine.account.in_(sorted(accounts.GLOBAL_ACCOUNTS)),
        *(LedgerLine.account.like(p) for p in _SCOPED_PREFIXES),
    )
    rows = await _all(
        session,
        select(LedgerLine.account, total).where(~known).group_by(LedgerLine.account).order_by(LedgerLine.account),
    )
    out += [Violation("bad_account", a, int(s), "account name outside the ledger's grammar") for a, s in rows]
    rows = await _all(
        session,
        select(LedgerLine.account, total)
        .where(LedgerLine.account.like(_LIABILITY))
        .group_by(LedgerLine.account)
        .having(total > 0)
        .order_by(LedgerLine.account),
    )
    out += [
        Violation("liability_overdrawn", a, int(s), f"debit balance of {int(s)} msat: more went out than came in")
        for a, s in rows
    ]

    rows = await _all(
        session,
        select(LedgerLine.account, LedgerLine.job_id, func.count())
        .where(
            LedgerLine.account.like(_LIABILITY),
            or_(LedgerLine.job_id.is_(None), ~LedgerLine.account.like(literal("%:", String) + LedgerLine.job_id)),
        )
        .group_by(LedgerLine.account, LedgerLine.job_id)
        .order_by(LedgerLine.account),
    )
    out += [Violation("line_job_mismatch", a, 0, f"{n} line(s) stored with job id {j!r}") for a, j, n in rows]

    closed = sorted({j for j in closed_job_ids})
    for i in range(0, len(closed), _CHUNK):
        chunk = closed[i : i + _CHUNK]
        scoped = (
            select(LedgerLine.account)
            .where(LedgerLine.job_id.in_(chunk), LedgerLine.account.like(_LIABILITY))
            .distinct()
        )
        rows = await _all(
            session,
            select(LedgerLine.account, total)
            .where(LedgerLine.account.in_(scoped))
            .group_by(LedgerLine.account)
            .having(total != 0)
            .order_by(LedgerLine.account),
        )
        wanted = set(chunk)
        for a, s in rows:
            job = accounts.job_of(a) if accounts.is_valid(a) else None
            if job in wanted:
                out.append(Violation("closed_job_balance", a, int(s), f"job {job} is closed but {a} is {int(s)}"))
    return out


async def assert_balanced(session: AsyncSession, *, closed_job_ids: Iterable[str] = ()) -> None:
    """Raise :class:`LedgerInvariantError` (reason ``invariant_violation``) if any invariant is broken."""
    violations = await check_invariants(session, closed_job_ids=closed_job_ids)
    if violations:
        raise LedgerInvariantError(violations)


__all__ = [
    "MAX_MSAT",
    "LedgerError",
    "LedgerInvariantError",
    "Posting",
    "Reason",
    "Violation",
    "assert_balanced",
    "balance",
    "balances",
    "check_invariants",
    "get_posting",
    "job_postings",
    "post",
    "reverse",
]
