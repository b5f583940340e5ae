"""Payout rules that need no Lightning node: settings refused at start-up, the fee limit, claims
per payee, and the database constraint that a payment hash pays one payout (SQLite and PostgreSQL).
"""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from service.config import Settings
from service.db import create_engine, session_factory
from service.payouts import (
    CheckReason,
    Destination,
    DestinationKind,
    NewPayout,
    PayoutKind,
    PayoutPolicy,
    PayoutReason,
    why,
)
from service.payouts.models import Payout
from service.payouts.store import create as create_payout
from service.payouts.worker import Payouts


def test_the_removed_fee_floor_is_refused_with_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDSTR_PAYOUT_FEE_FLOOR_MSAT", "10000")
    with pytest.raises(ValidationError) as exc:
        Settings(_env_file=None)
    assert "FEDSTR_PAYOUT_FEE_FLOOR_MSAT is no longer supported" in str(exc.value)
    assert "FEDSTR_PAYOUT_FEE_PPM" in str(exc.value) and "unset it" in str(exc.value)
    monkeypatch.setenv("FEDSTR_PAYOUT_FEE_FLOOR_MSAT", "0")  # "no floor" is what the service does
    assert Settings(_env_file=None).payout_fee_floor_msat == 0


@pytest.mark.parametrize(
    ("final", "limit", "ok"),
    [
        (288, 432, True),  # the defaults: 288 + 3 + 80 = 371 <= 432
        (349, 432, True),
        (350, 432, False),
        (432, 432, False),  # the old final-CLTV default under the new limit: refused
        (432, 515, True),
    ],
)
def test_the_final_cltv_limit_must_fit_under_the_payout_cltv_limit(final: int, limit: int, ok: bool) -> None:
    if ok:
        s = Settings(_env_file=None, payout_max_final_cltv=final, payout_cltv_limit=limit)
        assert PayoutPolicy.from_settings(s).cltv_limit == limit
        return
    with pytest.raises(ValidationError) as exc:
        Settings(_env_file=None, payout_max_final_cltv=final, payout_cltv_limit=limit)
    assert f"FEDSTR_PAYOUT_CLTV_LIMIT ({limit}) must be at least FEDSTR_PAYOUT_MAX_FINAL_CLTV ({final})" in str(
        exc.value
    )


def test_the_cltv_limit_stays_within_lnds_default_max_cltv_expiry() -> None:
    with pytest.raises(ValidationError):
        Settings(_env_file=None, payout_cltv_limit=2017)


@pytest.mark.parametrize(
    ("amount", "own", "expected"),
    [
        (1_000, None, 5),  # a 1-sat payout: 5 msat (was max(10 sat floor, ...): 10,000)
        (100_000, None, 500),
        (10**12, None, 5_000_000),  # capped
        (4_000_000, 9_000, 9_000),  # the payout's own limit, lower than the policy's 20,000
        (4_000_000, 50_000, 20_000),  # ... higher: the policy's
        (4_000_000, 0, 0),  # zero-fee routes only
    ],
)
def test_the_fee_limit_is_a_fraction_capped_and_the_lower_of_two(amount: int, own: int | None, expected: int) -> None:
    assert PayoutPolicy().fee_limit(amount, own) == expected


def test_a_zero_fee_fraction_allows_zero_fee_routes_only() -> None:
    assert PayoutPolicy(fee_ppm=0).fee_limit(10**9) == 0


def test_every_reason_is_a_stable_code_first() -> None:
    for reason in [*CheckReason, *PayoutReason]:
        assert re.fullmatch(r"[a-z_]+: .+", why(reason, "something happened")), reason
    assert len(why(PayoutReason.NO_ROUTE, "x" * 1000)) == 300


@pytest.fixture
async def sessions(database_url: str):
    engine = create_engine(database_url)
    yield session_factory(engine)
    await engine.dispose()


async def _create(sessions, rows: list[tuple[str, str]]) -> None:
    async with sessions.begin() as s:
        for pid, payee in rows:
            await create_payout(
                s,
                NewPayout(pid, None, PayoutKind.REWARD, payee, 1_000, Destination(DestinationKind.BOLT11, "lnbcrt1x")),
            )


async def test_claims_take_one_payout_per_payee_and_none_of_a_busy_payee(sessions) -> None:
    a, b, c = "aa" * 32, "bb" * 32, "cc" * 32
    await _create(sessions, [("a1", a), ("a2", a), ("a3", a), ("b1", b), ("c1", c)])
    payouts = Payouts(None, sessions, PayoutPolicy(), our_pubkey="02" + "11" * 32)
    first = await payouts.claim_due(10)
    assert sorted(c.payee for c in first) == [a, b, c], "one payout per payee"
    assert await payouts.claim_due(10, busy_payees={a, b, c}) == [], "each payee has one in flight"
    assert [c.payout_id for c in await payouts.claim_due(10, busy_payees={b, c})] in (["a2"], ["a3"], ["a1"])
    async with sessions() as s:
        sending = (await s.scalars(select(Payout.id).where(Payout.state == "sending", Payout.payee == a))).all()
    assert len(sending) == 2, "the busy list is the caller's: two of a's are claimed now"


async def _two_payouts_one_hash(sessions) -> None:
    await _create(sessions, [("p1", "aa" * 32), ("p2", "bb" * 32)])
    async with sessions.begin() as s:
        await s.execute(update(Payout).where(Payout.id == "p1").values(state="succeeded", payment_hash="ab" * 32))
    with pytest.raises(IntegrityError):
        async with sessions.begin() as s:
            await s.execute(update(Payout).where(Payout.id == "p2").values(state="succeeded", payment_hash="ab" * 32))
    async with sessions.begin() as s:  # unpaid payouts (no hash) are many
        assert (await s.scalars(select(Payout.id).where(Payout.payment_hash.is_(None)))).all() == ["p2"]


async def test_a_payment_hash_pays_one_payout_sqlite(sessions) -> None:
    await _two_payouts_one_hash(sessions)


@pytest.mark.postgres
async def test_a_payment_hash_pays_one_payout_postgres(sessions) -> None:
    await _two_payouts_one_hash(sessions)
