"""The real engine (SQLite, and PostgreSQL) and the pure machine, driven by the same random facts.

A hypothesis state machine picks, at every step, one of the facts the world can produce now
(``tests/support/machine_world.py``: requests, invoices, payments on time and late, settles
and cancels, results and copies, scores, deadlines, deletions, payouts succeeding or handed
back, duplicates of the last fact). The pure side steps ``machine.step`` and applies the plan
in memory; the real side hands the same fact to ``Engine.apply`` in a database transaction
(payout outcomes through ``Engine.handle_payout``, after writing the payout row as the payout
worker would: a fault the real worker would need LND for, injected here by name). After every
step both must agree on the job (state, funds, results, scores, payouts, what is held and
owed, the postings) and the real ledger's invariants must hold.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from sqlalchemy import select, update

from service.db import create_engine, session_factory
from service.escrow.engine import Engine, EngineConfig, appeal_of
from service.escrow.machine import FactKind, JobState
from service.escrow.models import Result
from service.ledger import service as ledger
from service.migrate import upgrade_async
from service.nostr.protocol import Mode
from service.payouts.models import Payout
from service.payouts.types import DestinationKind
from tests.support import machine_world as mw

ROOTS = [
    dict(shards=1, validators=1, mode=Mode.HOLD),
    dict(shards=1, validators=1, mode=Mode.CUSTODIAL),
    dict(shards=2, validators=2, quorum=1, mode=Mode.CUSTODIAL, policy="split"),
    dict(shards=2, validators=2, mode=Mode.HOLD, policy="best"),
    dict(shards=1, validators=1, mode=Mode.HOLD),  # with appeals (APPEALED)
    dict(shards=2, validators=1, quorum=1, mode=Mode.CUSTODIAL),  # with appeals
]
#: Roots (by index) run with the escrow announcing a validator pool: a missed quorum may get a fallback round.
POOLED = {1, 3}
#: Their config: the pool and its fallback window, with the claim window every root has.
POOLED_CLAIMS = replace(mw.CLAIMS, validator_pool=mw.POOL_CONFIG.validator_pool, fallback_round_seconds=100)
#: Roots (by index) whose decisions may be appealed (a window, a fee, an appeal round from the pool).
APPEALED = {4, 5}
APPEALED_CLAIMS = replace(mw.APPEALS, terms=replace(mw.APPEAL_TERMS, claim_window_s=1_000), claim_reminder_seconds=100)


def _config(root: int) -> Any:
    return APPEALED_CLAIMS if root in APPEALED else POOLED_CLAIMS if root in POOLED else mw.CLAIMS


_TEMPLATE: list[str] = []


def _sqlite_url() -> str:
    """A migrated SQLite file: migrated once, copied for each run."""
    if not _TEMPLATE:
        path = os.path.join(tempfile.mkdtemp(prefix="mve-template-"), "t.sqlite3")
        asyncio.run(upgrade_async(f"sqlite+aiosqlite:///{path}"))
        _TEMPLATE.append(path)
    copy = os.path.join(tempfile.mkdtemp(prefix="mve-"), "t.sqlite3")
    shutil.copy(_TEMPLATE[0], copy)
    return f"sqlite+aiosqlite:///{copy}"


class EngineVsMachine(RuleBasedStateMachine):
    url: str = ""
    runs = 0

    def __init__(self) -> None:
        super().__init__()
        EngineVsMachine.runs += 1
        self.loop = asyncio.new_event_loop()
        self.db = create_engine(self.url or _sqlite_url())
        self.sessions = session_factory(self.db)
        self.world: mw.World | None = None
        config = EngineConfig(
            terms=mw.CLAIMS.terms,
            relays=["ws://127.0.0.1:1"],
            claim_reminder_seconds=mw.CLAIMS.claim_reminder_seconds,
        )
        self.engine = Engine(self.sessions, mw.ESCROW, config, clock=lambda: self.now)
        self.now = mw.T0
        self.steps: list[str] = []

    def run(self, aw: Any) -> Any:
        return self.loop.run_until_complete(aw)

    def teardown(self) -> None:
        self.run(self.db.dispose())
        self.loop.close()

    @rule(root=st.integers(0, len(ROOTS) - 1), overpay=st.sampled_from([0, 0, 150_000]))
    def new_job(self, root: int, overpay: int) -> None:
        if self.world is not None:
            return
        # One job per run, its id unique across runs (a PostgreSQL database is shared by them).
        req = mw.request(bid=1_000_000 + 1_000 * EngineVsMachine.runs, **ROOTS[root])  # type: ignore[arg-type]
        # One escrow outage across a deadline may happen; payouts expire and are reopened, twice.
        config = _config(root)
        self.world = mw.start(req, overpay=overpay, outages=1, config=config, claims=2)
        self.engine.machine_config = config  # the engine's pool, fallback and claim windows: the world's

    @rule(choice=st.integers(0, 10_000))
    def next_fact(self, choice: int) -> None:
        if self.world is None:
            return
        options = list(mw.actions(self.world))
        label, nxt = options[choice % len(options)]
        self.steps.append(label)
        self.now = nxt.now  # the world's clock, as the machine saw it
        self.run(self._engine_does(label, nxt))
        self.world = nxt
        self.run(self._sync_eval_request_id())

    async def _engine_does(self, label: str, nxt: mw.World) -> None:
        w = self.world
        assert w is not None
        fact = nxt.last
        if fact is None or (nxt.payouts != w.payouts and fact is w.last):
            await self._write_payouts(nxt)  # a payee gave an invoice: no job fact
            return
        if fact.kind is FactKind.PAYOUT_EXPIRED and fact is not w.last:
            async with self.sessions.begin() as s:  # the claim scan: service/payouts' CAS, then the outcome
                await self.engine.expire_claim(s, fact.payout.id)  # type: ignore[union-attr]
            return
        if fact.kind is FactKind.PAYOUT_REOPENED and fact is not w.last:
            async with self.sessions.begin() as s:  # the operator's reopen (POST /v1/admin/payouts/{id}/reopen)
                await self.engine.reopen_claim(s, fact.payout.id)  # type: ignore[union-attr]
            return
        if fact.kind is FactKind.CLAIM_REMINDER:
            async with self.sessions.begin() as s:
                row = await s.get(Payout, fact.payout.id)  # type: ignore[union-attr]
                assert row is not None
                await self.engine.remind_claim(s, row)
            return
        if fact.kind in (FactKind.PAYOUT_SUCCEEDED, FactKind.PAYOUT_NEEDS_INVOICE) and fact is not w.last:
            await self._write_payouts(nxt)
            async with self.sessions.begin() as s:
                row = await s.get(Payout, fact.payout.id)  # type: ignore[union-attr]
                assert row is not None
                await self.engine.handle_payout(s, row)
            return
        if fact.kind in (
            FactKind.PAYOUT_SUCCEEDED,
            FactKind.PAYOUT_NEEDS_INVOICE,
            FactKind.PAYOUT_EXPIRED,
            FactKind.PAYOUT_REOPENED,
        ):  # a duplicate outcome
            async with self.sessions.begin() as s:
                await self.engine.apply(s, w.view.id, fact)
            return
        async with self.sessions.begin() as s:
            await self.engine.apply(s, w.view.id, fact)

    async def _write_payouts(self, w: mw.World) -> None:
        """The payout worker's writes (injected: the real worker needs LND and a payee's node)."""
        async with self.sessions.begin() as s:
            for p in w.payouts:
                await s.execute(
                    update(Payout)
                    .where(Payout.id == p.id)
                    .values(
                        state=p.state,
                        attempts=p.attempts,
                        needs_invoice_count=p.needs_invoice_count,
                        fee_msat=p.fee_msat or None,
                        payment_hash=p.payment_hash,
                        preimage=p.preimage,
                        last_error=p.last_error,
                        destination_kind=p.destination,
                        destination=""
                        if p.destination is DestinationKind.NONE
                        else (await s.scalar(select(Payout.destination).where(Payout.id == p.id)) or "lnbcrt1given"),
                    )
                )

    async def _sync_eval_request_id(self) -> None:
        """The evaluation request's id is the signed event's (the world's model cannot know it)."""
        assert self.world is not None
        async with self.sessions() as s:
            from service.escrow.models import Job

            row = (
                await s.execute(
                    select(Job.eval_request_id, Job.fallback_request_id, Job.appeal).where(Job.id == self.world.view.id)
                )
            ).one_or_none()
        eid, fid, appeal = row if row is not None else (None, None, None)
        stored = appeal_of(appeal, None)
        pure = self.world.view.appeal
        if stored is not None and pure is not None and stored.request_id != pure.request_id:
            self.world = replace(
                self.world, view=replace(self.world.view, appeal=replace(pure, request_id=stored.request_id))
            )
        if eid is not None and eid != self.world.view.eval_request_id:
            self.world = replace(self.world, view=replace(self.world.view, eval_request_id=eid))
        if fid is not None and fid != self.world.view.fallback_request_id:
            self.world = replace(self.world, view=replace(self.world.view, fallback_request_id=fid))

    @invariant()
    def engine_and_machine_agree(self) -> None:
        if self.world is None:
            return
        w = self.world
        assert not mw.violations(w), (self.steps, mw.violations(w))

        async def check() -> None:
            async with self.sessions() as s:
                real = await self.engine.load(s, w.view.id, FactKind.PAYOUT_SUCCEEDED, full=True)
                released = set(
                    (
                        await s.scalars(
                            select(Result.id).where(Result.job_id == w.view.id, Result.key_released_at.is_not(None))
                        )
                    ).all()
                )
                problems = await ledger.check_invariants(s)
                total = sum((await ledger.balances(s)).values())
            pure = w.view
            where = f"after {self.steps}"
            assert real.state is pure.state, where
            assert (real.funds, real.mode, real.refund_reason) == (pure.funds, pure.mode, pure.refund_reason), where
            assert real.offer_expires_at == pure.offer_expires_at, where
            assert (real.results_extended_to, real.validation_extended_to, real.deadlines_extended_at) == (
                pure.results_extended_to,
                pure.validation_extended_to,
                pure.deadlines_extended_at,
            ), where
            assert (real.fallback_deadline, real.fallback_validators) == (
                pure.fallback_deadline,
                pure.fallback_validators,
            ), where
            assert (real.appeal_deadline, real.appeal) == (pure.appeal_deadline, pure.appeal), where
            assert [r.id for r in real.results] == [r.id for r in pure.results], where
            assert [r.customer_key for r in real.results] == [r.customer_key for r in pure.results], where
            assert released == set(w.keys), where  # the sealed results whose model key went out
            assert sorted((x.result_id, x.validator, x.value) for x in real.scores) == sorted(
                (x.result_id, x.validator, x.value) for x in pure.scores
            ), where
            assert sorted(
                (p.id, p.kind, p.amount_msat, p.state, p.payee, p.claim_by, p.claim_round) for p in real.payouts
            ) == sorted(
                (p.id, p.kind, p.amount_msat, p.state, p.payee, p.claim_by, p.claim_round) for p in pure.payouts
            ), where
            assert (real.held_msat, real.owed_msat, real.posted) == (pure.held_msat, pure.owed_msat, pure.posted), where
            assert (real.decision is None) == (pure.decision is None), where
            if real.decision and pure.decision:
                assert real.decision.verdicts == pure.decision.verdicts, where
            assert problems == [] and total == 0, (where, problems, total)

        self.run(check())


def _run(url: str, examples: int) -> None:
    EngineVsMachine.url = url
    # No shrinking: a failure names its whole sequence of steps already, and shrinking steps that
    # each run a database transaction takes minutes.
    run_state_machine_as_test(
        EngineVsMachine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=30,
            deadline=None,
            phases=[Phase.explicit, Phase.reuse, Phase.generate],
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        ),
    )


def test_the_engine_on_sqlite_does_what_the_machine_says() -> None:
    _run("", 100)


@pytest.mark.postgres
def test_the_engine_on_postgres_does_what_the_machine_says(database_url: str) -> None:
    _run(database_url, 25)


def test_the_world_offers_every_kind_of_fact() -> None:
    """The random walk can reach every fact kind (else the comparison would miss a path)."""
    seen: set[FactKind] = set()
    states: set[JobState] = set()
    for k, r in enumerate(ROOTS):  # each root's walk on its own: one cannot crowd out another's facts
        frontier = [mw.start(mw.request(bid=1_000_000, **r), outages=1, config=_config(k), claims=2)]  # type: ignore[arg-type]
        for _ in range(9):
            nxt = []
            for w in frontier:
                for _, x in mw.actions(w):
                    if x.last is not None:
                        seen.add(x.last.kind)
                    states.add(x.view.state)
                    nxt.append(x)
            frontier = nxt[:3000]
    assert seen == set(FactKind), set(FactKind) - seen
    assert JobState.FALLBACK in states  # the pooled roots reach a fallback round
    assert JobState.APPEAL in states  # the appealed roots reach an appeal round


APPEAL_SCRIPTS = {
    # the provider of a rejected result appeals, pays, the pool accepts it: won (fee back), released
    "won": (4, ["request", "invoice created", "pay", "result p0 s0", "scores v0 bad", "appeal by {p0}",
                "appeal invoice created", "appeal fee paid", "appeal scores a0 good", "settle"]),
    # the customer appeals an acceptance, the pool agrees with it: lost (fee kept, pays the appeal validator)
    "lost": (5, ["request", "invoice created", "pay", "result p0 s1", "result p1 s0", "scores v0 good",
                 "appeal by the customer",
                 "appeal invoice created", "appeal fee paid", "appeal scores a0 good"]),
    # the fee paid after the appeal deadline: refunded, the decision as it was
    "late": (5, ["request", "invoice created", "pay", "result p0 s1", "result p1 s0", "scores v0 bad",
                 "appeal by {p1}",
                 "appeal invoice created", "deadline", "appeal fee paid late"]),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(APPEAL_SCRIPTS))
def test_the_engine_follows_the_machine_through_an_appeal(name: str) -> None:
    """The appeal paths, scripted (the random walk reaches them less often): the engine on SQLite
    agrees with the machine after every step, and its ledger's invariants hold."""
    root, script = APPEAL_SCRIPTS[name]
    EngineVsMachine.url = ""
    m = EngineVsMachine()
    try:
        m.new_job(root, 0)
        for label in script:
            label = label.format(p0=mw.PROVIDERS[0][:4], p1=mw.PROVIDERS[1][:4])
            assert m.world is not None
            labels = [x for x, _ in mw.actions(m.world)]
            assert label in labels, (label, labels)
            m.next_fact(labels.index(label))
            m.engine_and_machine_agree()
        assert m.world is not None and m.world.view.appeal is not None
        status = m.world.view.appeal.status.value
        assert status == name, status
    finally:
        m.teardown()
