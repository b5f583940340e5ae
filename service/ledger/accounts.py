"""Ledger account names: plain strings with a type prefix, built only by the functions here.

Grammar (every id is 1–64 lowercase hex digits, so names never contain spaces,
``%``/``_`` or a second meaning for ``:``)::

    asset:node                              the escrow's LND node's funds
    income:fees                             escrow fees and split remainders we keep
    expense:routing                         Lightning routing fees we paid on payouts
    income:unclaimed                        payouts nobody claimed within their claim window (the
                                            operator's; an operator's reopen books one back)
    liability:escrow:<job>                  money held for a job (funded, not yet released)
    liability:appeal:<job>                  a paid appeal fee held while the job's appeal runs
    liability:payable:<payee>:<job>         released to a payee, not yet paid out
    liability:refund:<customer>:<job>       owed back to the customer, not yet paid out

Every job-scoped account ends in ``:<job_id>``; :func:`job_of` reads it back and
:func:`job_accounts` gives the SQL ``LIKE`` pattern of all accounts of one job. The
ledger also stores the job id on every line (``ledger_lines.job_id``), which is what
the service queries, through an index.

Sign convention of the ledger: debit positive, credit negative. Assets and expenses
are debit-normal (a healthy balance is >= 0); liabilities and income are
credit-normal (a healthy balance is <= 0).
"""

from __future__ import annotations

import re
from typing import Literal, NamedTuple

Kind = Literal["asset", "liability", "income", "expense"]
Side = Literal["debit", "credit"]

NODE = "asset:node"
FEE_INCOME = "income:fees"
ROUTING_EXPENSE = "expense:routing"
UNCLAIMED = "income:unclaimed"

GLOBAL_ACCOUNTS: frozenset[str] = frozenset({NODE, FEE_INCOME, ROUTING_EXPENSE, UNCLAIMED})
KINDS: tuple[Kind, ...] = ("asset", "liability", "income", "expense")
CREDIT_NORMAL: frozenset[str] = frozenset({"liability", "income"})
MAX_NAME = 200

_ID = r"[0-9a-f]{1,64}"
_ID_RE = re.compile(rf"\A{_ID}\Z")
_JOB_SCOPED = re.compile(
    rf"\Aliability:(?:(?P<held>escrow|appeal):(?P<job1>{_ID})|(?P<cat>payable|refund):(?P<party>{_ID}):(?P<job2>{_ID}))\Z"
)


class AccountError(ValueError):
    """An account name (or an id used to build one) is not valid."""


class Account(NamedTuple):
    name: str
    kind: Kind
    category: str  # node | fees | routing | unclaimed | escrow | appeal | payable | refund
    party: str | None  # payee or customer pubkey for payable/refund
    job_id: str | None


def _check_id(what: str, value: object) -> str:
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise AccountError(f"{what} must be 1-64 lowercase hex digits, got {value!r}")
    return value


def escrow(job_id: str) -> str:
    """Money held for ``job_id`` (credited by funding, debited by release or refund)."""
    return f"liability:escrow:{_check_id('job_id', job_id)}"


def appeal(job_id: str) -> str:
    """A paid appeal fee held for ``job_id`` while its appeal runs (emptied by the verdict)."""
    return f"liability:appeal:{_check_id('job_id', job_id)}"


def payable(payee_pubkey: str, job_id: str) -> str:
    """Released to ``payee_pubkey`` for ``job_id``, not yet paid out."""
    return f"liability:payable:{_check_id('payee_pubkey', payee_pubkey)}:{_check_id('job_id', job_id)}"


def refund(customer_pubkey: str, job_id: str) -> str:
    """Owed back to ``customer_pubkey`` for ``job_id``, not yet paid out."""
    return f"liability:refund:{_check_id('customer_pubkey', customer_pubkey)}:{_check_id('job_id', job_id)}"


def parse(name: object) -> Account:
    """Split a valid account name into its parts; :class:`AccountError` otherwise."""
    if not isinstance(name, str):
        raise AccountError(f"account name must be a string, got {type(name).__name__}")
    if len(name) > MAX_NAME:
        raise AccountError(f"account name longer than {MAX_NAME} characters")
    if name == NODE:
        return Account(name, "asset", "node", None, None)
    if name == FEE_INCOME:
        return Account(name, "income", "fees", None, None)
    if name == ROUTING_EXPENSE:
        return Account(name, "expense", "routing", None, None)
    if name == UNCLAIMED:
        return Account(name, "income", "unclaimed", None, None)
    m = _JOB_SCOPED.match(name)
    if m is None:
        raise AccountError(f"unknown or malformed account name {name!r}")
    if m["job1"] is not None:
        return Account(name, "liability", m["held"], None, m["job1"])
    return Account(name, "liability", m["cat"], m["party"], m["job2"])


def is_valid(name: object) -> bool:
    try:
        parse(name)
    except AccountError:
        return False
    return True


def validate(name: object) -> str:
    """Return ``name`` if valid, else raise :class:`AccountError`."""
    return parse(name).name


def kind_of(name: str) -> Kind:
    """``asset`` | ``liability`` | ``income`` | ``expense``."""
    return parse(name).kind


def normal_balance(name: str) -> Side:
    """The side on which the account's healthy balance lies: liabilities and income are credit-normal."""
    return "credit" if parse(name).kind in CREDIT_NORMAL else "debit"


def job_of(name: str) -> str | None:
    """The job a job-scoped account belongs to; None for the global accounts."""
    return parse(name).job_id


def job_accounts(job_id: str) -> str:
    """SQL ``LIKE`` pattern matching every account of ``job_id`` (and no other job's).

    Ids are hex, so the pattern holds no stray wildcard, and only job-scoped names
    end in ``:<hex>``. Prefer filtering on the indexed ``ledger_lines.job_id``; this
    pattern is for ad-hoc queries and checks.
    """
    return "%:" + _check_id("job_id", job_id)
