"""The engine under random sequences of facts, with duplicates and reordering (hypothesis).

The engine is driven directly (no relay, no LND): job requests, results and scores are
real signed events handed to its inbox handler; funding, settlement and cancellation are
``ln_facts`` rows as the watcher writes them; payouts are completed as the payout worker
would. After every step the ledger's invariants must hold, every job must be in a state
of the closed set, and money must add up.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from decimal import Decimal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select, update

from service.db import create_engine, insert_ignore, session_factory, utcnow
from service.escrow.engine import Engine, EngineConfig, appeal_of
from service.escrow.models import Effect, Job, JobState
from service.ledger import accounts
from service.ledger import service as ledger
from service.lightning.models import InvoicePurpose, LnFact, LnInvoice
from service.migrate import upgrade_async
from service.nostr.inbox import Inbox
from service.nostr.nip01 import SecretKey, sign_event
from service.nostr.protocol import (
    Direction,
    EscrowTerms,
    JobSpec,
    Mode,
    ModelRef,
    Network,
    PayoutPolicy,
    Score,
    Shard,
    Validation,
    build_evaluation_result,
    build_job_request,
    build_result,
    parse_job_request,
)
from service.payouts import PayoutPolicy as LnPayoutPolicy
from service.payouts.models import Payout

TERMS = EscrowTerms(
    fee_base_msat=1_000,
    fee_ppm=10_000,
    min_bid_msat=10_000,
    max_bid_msat=10_000_000_000,
    max_validators=5,
    max_shards=8,
    min_results_window_s=0,
    max_job_duration_s=30 * 86_400,
    modes=frozenset({Mode.HOLD, Mode.CUSTODIAL}),
    network=Network.REGTEST,
    max_hold_seconds=86_400,
)
T0 = 1_900_000_000
POLICY = LnPayoutPolicy()  # the fee bound of the worker's defaults
FAKE_BOLT11 = "lnbcrt1" + "qpzry9x8gf2tvdw0s3jn54khce6mua7l" * 4  # shaped like an invoice; never paid here
ESCROW = SecretKey(hashlib.sha256(b"prop escrow").digest())
CUSTOMER = SecretKey(hashlib.sha256(b"prop customer").digest())
PROVIDERS = [SecretKey(hashlib.sha256(f"prop provider {i}".encode()).digest()) for i in range(3)]
VALIDATORS = [SecretKey(hashlib.sha256(f"prop validator {i}".encode()).digest()) for i in range(2)]


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


class World:
    def __init__(self, sessions, clock: Clock) -> None:
        self.sessions = sessions
        self.clock = clock
        self.engine = Engine(sessions, ESCROW, EngineConfig(terms=TERMS, relays=["ws://127.0.0.1:1"]), clock=clock)
        self.inbox = Inbox(sessions)
        self.jobs: list = []  # (event, JobRequest)
        self.results: dict[str, list] = {}
        self.events: list = []  # everything fed so far (for duplicates)
        self.paid: dict[str, int] = {}  # payment hash -> what the customer paid

    async def feed(self, event) -> None:
        self.events.append(event)
        await self.inbox.store(event, "prop")
        await self.inbox.process_pending(self.engine.handle_event)

    async def job_request(self, policy: str, mode: str, bid: int) -> None:
        now = int(self.clock())
        spec = JobSpec(
            escrow=ESCROW.public_key_hex,
            bid_msat=bid,
            shards=tuple(Shard(index=k, url=f"https://d.example/{len(self.jobs)}/{k}") for k in range(2)),
            validation=Validation("accuracy", Direction.MAX, Decimal("0.5"), 2),
            payout=PayoutPolicy(policy),
            results_deadline=now + 100,
            validation_deadline=now + 200,
            validators=tuple(v.public_key_hex for v in VALIDATORS),
            validator_fee_msat=1_000,
            mode=Mode(mode),
        )
        ev = sign_event(CUSTOMER, *build_job_request(spec, customer=CUSTOMER.public_key_hex), created_at=now)
        self.jobs.append((ev, parse_job_request(ev, escrow_pubkey=ESCROW.public_key_hex, terms=TERMS, now=now)))
        await self.feed(ev)

    async def effects(self) -> None:
        """Carry out pending effects as the effect runner would, with a fake invoice."""
        async with self.sessions() as s:
            effs = (await s.scalars(select(Effect).where(Effect.state == "pending"))).all()
        for eff in effs:
            async with self.sessions.begin() as s:
                job = await s.get(Job, eff.job_id)
                inv = (
                    await s.scalars(
                        select(LnInvoice).where(LnInvoice.job_id == job.id, LnInvoice.purpose == InvoicePurpose.JOB)
                    )
                ).first()
                if eff.kind == "appeal_invoice":  # the appeal fee's plain invoice
                    appeal = appeal_of(job.appeal, None)
                    assert appeal is not None
                    h = hashlib.sha256(os.urandom(32)).hexdigest()
                    s.add(
                        LnInvoice(
                            payment_hash=h,
                            job_id=job.id,
                            mode="custodial",
                            amount_msat=appeal.fee_msat,
                            payment_request=FAKE_BOLT11,
                            expires_at=T0 + 10**6,
                            purpose=InvoicePurpose.APPEAL_FEE,
                        )
                    )
                    await s.flush()
                    await self.engine.on_appeal_invoice_created(s, job.id, h, FAKE_BOLT11, appeal.fee_msat)
                elif eff.kind == "create_invoice":
                    if inv is None:
                        pre = os.urandom(32)
                        h = hashlib.sha256(pre).hexdigest()
                        s.add(
                            LnInvoice(
                                payment_hash=h,
                                job_id=job.id,
                                mode=job.mode,
                                amount_msat=job.bid_msat,
                                payment_request=FAKE_BOLT11,
                                preimage=pre.hex(),
                                expires_at=T0 + 10**6,
                            )
                        )
                        await s.flush()
                        inv_hash = h
                    else:
                        inv_hash = inv.payment_hash
                    await self.engine.on_invoice_created(s, job.id, inv_hash, FAKE_BOLT11, job.mode, job.bid_msat)
                elif inv is not None and eff.kind == "settle_hold" and inv.state == "accepted":
                    await self._fact(s, inv, "settled")
                elif inv is not None and eff.kind == "cancel_invoice" and inv.state in ("open", "accepted"):
                    await self._fact(s, inv, "canceled")
                await s.execute(update(Effect).where(Effect.id == eff.id).values(state="done"))

    async def _fact(self, s, inv: LnInvoice, kind: str, extra: int = 0) -> None:
        paid = self.paid.setdefault(inv.payment_hash, inv.amount_msat + extra)  # settled: what was accepted
        await s.execute(update(LnInvoice).where(LnInvoice.payment_hash == inv.payment_hash).values(state=kind))
        await s.execute(
            insert_ignore(s, LnFact.__table__),
            [
                {
                    "payment_hash": inv.payment_hash,
                    "kind": kind,
                    "amount_msat": paid if kind != "canceled" else 0,
                    "source": "prop",
                    "observed_at": utcnow(),
                }
            ],
        )

    async def pay(self, which: int, extra: int = 0) -> None:
        """The customer pays a job's invoice (hold: accepted; custodial: settled), ``extra`` msat more
        than asked (LND takes up to twice an invoice's amount)."""
        async with self.sessions.begin() as s:
            invs = (
                await s.scalars(select(LnInvoice).where(LnInvoice.state == "open").order_by(LnInvoice.created_at))
            ).all()
            if invs:
                inv = invs[which % len(invs)]
                await self._fact(s, inv, "accepted" if inv.mode == "hold" else "settled", extra)

    async def result(self, job_i: int, provider: int, shard: int, good: bool) -> None:
        if not self.jobs:
            return
        ev_job, req = self.jobs[job_i % len(self.jobs)]
        model = hashlib.sha256(f"{ev_job.id}{provider}{good}".encode()).hexdigest()
        ev = sign_event(
            PROVIDERS[provider],
            *build_result(req, shard_index=shard, model=ModelRef(f"https://m.example/{model}", model, 10)),
            created_at=int(self.clock()),
        )
        self.results.setdefault(ev_job.id, []).append((ev.id, model, good))
        await self.feed(ev)

    async def score(self, job_i: int, validator: int, wrong_hash: bool) -> None:
        if not self.jobs:
            return
        ev_job, _ = self.jobs[job_i % len(self.jobs)]
        async with self.sessions() as s:
            job = await s.get(Job, ev_job.id)
        if job is None or job.eval_request_id is None:
            return
        scores = tuple(
            Score(rid, Decimal("0.9") if good else Decimal("0.1"), "00" * 32 if wrong_hash else sha)
            for rid, sha, good in self.results.get(ev_job.id, [])
        )
        if not scores:
            return
        ev = sign_event(
            VALIDATORS[validator],
            *build_evaluation_result(
                request_id=job.eval_request_id, job_id=ev_job.id, escrow=ESCROW.public_key_hex, scores=scores
            ),
            created_at=int(self.clock()),
        )
        await self.feed(ev)

    async def payouts(self, fee: int, fail: bool) -> None:
        """Complete pending payouts as the payout worker would: LND never pays a route above the
        payment's fee limit, which the worker sets to the lower of the payout's own limit and the
        policy's fraction of its amount (service/payouts/types.py); a payee may ask any fee."""
        async with self.sessions.begin() as s:
            pending = (await s.scalars(select(Payout).where(Payout.state.in_(("pending", "needs_invoice"))))).all()
            for p in pending:
                if fail:
                    await s.execute(
                        update(Payout)
                        .where(Payout.id == p.id)
                        .values(state="needs_invoice", attempts=Payout.attempts + 1)
                    )
                else:
                    limit = POLICY.fee_limit(p.amount_msat)
                    if p.fee_limit_msat is not None:
                        limit = min(limit, p.fee_limit_msat)
                    pre = os.urandom(32)
                    await s.execute(
                        update(Payout)
                        .where(Payout.id == p.id)
                        .values(
                            state="succeeded",
                            fee_msat=min(fee, limit),
                            preimage=pre.hex(),
                            payment_hash=hashlib.sha256(pre).hexdigest(),
                        )
                    )

    async def step_engine(self) -> None:
        from service.escrow.runner import EngineRunner

        await EngineRunner(self.engine, self.inbox).step()

    async def duplicate(self, i: int) -> None:
        if self.events:
            ev = self.events[i % len(self.events)]
            await self.inbox.store(ev, "dup")
            await self.inbox.process_pending(self.engine.handle_event)

    async def check(self) -> None:
        async with self.sessions() as s:
            jobs = (await s.scalars(select(Job))).all()
            closed = [j.id for j in jobs if j.state in ("closed", "refunded", "cancelled", "rejected")]
            violations = await ledger.check_invariants(s, closed_job_ids=closed)
            assert violations == [], violations
            for j in jobs:
                assert j.state in {x.value for x in JobState}
                paid = sum(p.amount_msat for p in (await s.scalars(select(Payout).where(Payout.job_id == j.id))).all())
                # Never more than the customer paid in: the bid, or more when it overpaid (LND takes up
                # to twice an invoice's amount; the excess goes back to it).
                hashes = (await s.scalars(select(LnInvoice.payment_hash).where(LnInvoice.job_id == j.id))).all()
                received = max([j.bid_msat, *(self.paid[h] for h in hashes if h in self.paid)])
                assert paid <= received, (j.id, paid, j.bid_msat, received)
                if j.state == "closed":
                    assert (
                        paid
                        + sum(v for k, v in (await ledger.balances(s, job_id=j.id)).items() if k.startswith("income:"))
                        * -1
                        >= 0
                    )
            total = sum((await ledger.balances(s)).values())
            assert total == 0
            # The escrow never pays to work: per job, what it earned covers the routes it paid.
            for j in jobs:
                b = await ledger.balances(s, job_id=j.id)
                earned, routing = -b.get(accounts.FEE_INCOME, 0), b.get(accounts.ROUTING_EXPENSE, 0)
                assert earned - routing >= 0, (j.id, j.state, earned, routing)


ACTIONS = st.one_of(
    st.tuples(
        st.just("job"),
        st.sampled_from(["best", "split"]),
        st.sampled_from(["hold", "custodial"]),
        st.integers(100_000, 5_000_000),
    ),
    st.tuples(st.just("effects")),
    st.tuples(st.just("pay"), st.integers(0, 5), st.sampled_from([0, 0, 0, 1, 999, 150_000])),
    st.tuples(st.just("result"), st.integers(0, 3), st.integers(0, 2), st.integers(0, 1), st.booleans()),
    st.tuples(st.just("score"), st.integers(0, 3), st.integers(0, 1), st.booleans()),
    st.tuples(st.just("tick"), st.integers(1, 250)),
    st.tuples(st.just("payouts"), st.integers(0, 2_000), st.booleans()),
    st.tuples(st.just("dup"), st.integers(0, 50)),
    st.tuples(st.just("engine")),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(st.lists(ACTIONS, min_size=5, max_size=30))
def test_invariants_hold_after_every_fact(tmp_path_factory, actions) -> None:
    asyncio.run(_run(tmp_path_factory.mktemp("prop"), actions))


_TEMPLATE: list = []


async def _fresh_db(tmp) -> str:
    """A migrated SQLite file: migrate once, copy for each example (migrations are tested elsewhere)."""
    import shutil
    import tempfile

    if not _TEMPLATE:
        path = os.path.join(tempfile.mkdtemp(prefix="prop-template-"), "t.sqlite3")
        await upgrade_async(f"sqlite+aiosqlite:///{path}")
        _TEMPLATE.append(path)
    shutil.copy(_TEMPLATE[0], f"{tmp}/p.sqlite3")
    return f"sqlite+aiosqlite:///{tmp}/p.sqlite3"


async def _run(tmp, actions) -> None:
    url = await _fresh_db(tmp)
    engine = create_engine(url)
    world = World(session_factory(engine), Clock())
    try:
        for action in actions:
            kind, *args = action
            if kind == "job":
                await world.job_request(*args)
            elif kind == "effects":
                await world.effects()
            elif kind == "pay":
                await world.pay(*args)
            elif kind == "result":
                await world.result(*args)
            elif kind == "score":
                await world.score(*args)
            elif kind == "tick":
                world.clock.t += args[0]
            elif kind == "payouts":
                await world.payouts(*args)
            elif kind == "dup":
                await world.duplicate(*args)
            await world.step_engine()
            await world.check()
    finally:
        await engine.dispose()


def test_a_full_happy_path_through_the_property_world(tmp_path) -> None:
    """The same world, scripted: a custodial best-of-two job closes with zero balances."""
    actions = [
        ("job", "best", "custodial", 1_000_000),
        ("effects",),
        ("pay", 0),
        ("engine",),
        ("result", 0, 0, 0, True),
        ("result", 0, 1, 1, False),
        ("engine",),
        ("score", 0, 0, False),
        ("score", 0, 1, False),
        ("engine",),
        ("payouts", 7, False),
        ("engine",),
    ]
    asyncio.run(_scripted(tmp_path, actions))


async def _scripted(tmp, actions) -> None:
    await _run(tmp, actions)
    url = f"sqlite+aiosqlite:///{tmp}/p.sqlite3"
    engine = create_engine(url)
    try:
        async with session_factory(engine)() as s:
            [job] = (await s.scalars(select(Job))).all()
            assert job.state == "closed", job.state
            balances = await ledger.balances(s, job_id=job.id)
            assert all(v == 0 for k, v in balances.items() if k.startswith("liability:"))
    finally:
        await engine.dispose()
