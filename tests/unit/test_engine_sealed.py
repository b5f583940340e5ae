"""Sealed results through the real engine on a real database (protocol.md §5a, §6).

Real signed events go through the inbox to the engine; funding and settlement are ``ln_facts`` rows
as the watcher writes them (tests/unit/test_engine_properties.py's world, no LND). What is checked
is what a customer and a provider rely on: a result whose escrow envelope does not open to its
committed key is not counted (``key_mismatch``); sealed scores are opened and counted (and ones
that do not open are not); the key the escrow keeps is encrypted to the customer, opens to the
committed key, and no row anywhere holds the key itself; the key goes out (event and REST view)
only once the provider is paid from settled money, and never for a result scored unreadable; no
public view shows a score's value before the decision.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from decimal import Decimal

import pytest
from sqlalchemy import select

from service.api import queries
from service.db import Base, create_engine, session_factory
from service.escrow.models import Job, Result, ScoreRow, TimelineEntry
from service.nostr.models import OutboxEvent
from service.nostr.nip01 import Event, SecretKey, sign_event
from service.nostr.protocol import (
    ModelRef,
    Score,
    build_evaluation_result,
    build_result,
    parse_model_key,
    parse_validation_complete,
)
from service.nostr.protocol.feedback import INFO_MODEL_KEY, INFO_VALIDATION_COMPLETE
from service.nostr.protocol.sealing import Sealed, seal, sealed_model, unwrap_key, wrap_key
from tests.unit.test_engine_properties import CUSTOMER, ESCROW, PROVIDERS, VALIDATORS, Clock, World

U = "unreadable"


class SealedWorld(World):
    """The property tests' world, with one funded job (two shards, two validators, quorum 2, best)."""

    async def funded_job(self, mode: str) -> str:
        await self.job_request("best", mode, 1_000_000)
        await self.effects()
        await self.step_engine()
        await self.pay(0)
        await self.step_engine()
        job_id = self.jobs[0][0].id
        assert await self.state(job_id) == "collecting"
        return job_id

    async def state(self, job_id: str) -> str:
        async with self.sessions() as s:
            job = await s.get(Job, job_id)
            assert job is not None
            return str(job.state)

    async def sealed_result(
        self, provider: int, shard: int, *, escrow_key: bytes | None = None
    ) -> tuple[Event, Sealed]:
        """A sealed result with keys for both validators and the escrow (``escrow_key``: the escrow's
        envelope holds another key than the committed one, as a cheating provider would send)."""
        _, req = self.jobs[0]
        sealed = seal(f"model of provider {provider}".encode() + os.urandom(8))
        recipients = (*(v.public_key_hex for v in VALIDATORS), ESCROW.public_key_hex)
        model = sealed_model(PROVIDERS[provider], sealed, url=f"https://b.example/{provider}", recipients=recipients)
        if escrow_key is not None:
            keys = tuple(
                wrap_key(PROVIDERS[provider], k.recipient, escrow_key) if k.recipient == ESCROW.public_key_hex else k
                for k in model.keys
            )
            model = replace(model, keys=keys)
        ev = sign_event(
            PROVIDERS[provider], *build_result(req, shard_index=shard, model=model), created_at=int(self.clock())
        )
        await self.feed(ev)
        return ev, sealed

    async def plain_result(self, provider: int, shard: int) -> Event:
        _, req = self.jobs[0]
        sha = hashlib.sha256(f"plain {provider}".encode()).hexdigest()
        ev = sign_event(
            PROVIDERS[provider],
            *build_result(req, shard_index=shard, model=ModelRef(f"https://m.example/{sha}", sha, 10)),
            created_at=int(self.clock()),
        )
        await self.feed(ev)
        return ev

    async def sealed_scores(
        self, validator: int, values: dict[str, tuple[str, str]], *, to: SecretKey = ESCROW
    ) -> Event:
        """``values``: result id -> (model sha256, score text or "unreadable"), sealed to ``to``."""
        job_id = self.jobs[0][0].id
        async with self.sessions() as s:
            job = await s.get(Job, job_id)
            assert job is not None and job.eval_request_id is not None
            request_id = job.eval_request_id
        scores = tuple(Score(rid, None if v == U else Decimal(v), sha) for rid, (sha, v) in values.items())
        tmpl = build_evaluation_result(
            request_id=request_id,
            job_id=job_id,
            escrow=to.public_key_hex,
            scores=scores,
            seal_with=VALIDATORS[validator],
        )
        tags = [("p", ESCROW.public_key_hex) if t[0] == "p" else t for t in tmpl.tags]  # addressed to us
        ev = sign_event(VALIDATORS[validator], tmpl.kind, tags, tmpl.content, created_at=int(self.clock()))
        await self.feed(ev)
        return ev

    async def published(self, info: str) -> list[Event]:
        async with self.sessions() as s:
            rows = (await s.scalars(select(OutboxEvent.raw))).all()
        events = [Event.from_dict(json.loads(r)) for r in rows]
        return [e for e in events if any(t[:3] == ("status", "success", info) for t in e.tags)]


def _model_sha(sealed: Sealed) -> str:
    return sealed.model_sha256


async def _ignored(world: World, job_id: str) -> list[str]:
    async with world.sessions() as s:
        rows = (
            await s.scalars(
                select(TimelineEntry).where(TimelineEntry.job_id == job_id, TimelineEntry.kind == "ignored")
            )
        ).all()
    return [json.loads(r.detail).get("why", "") for r in rows]


async def _no_row_holds(world: World, secret: str) -> None:
    """No column of any table holds ``secret`` (the content key's hex)."""
    async with world.sessions() as s:
        for table in Base.metadata.sorted_tables:
            for row in (await s.execute(select(table))).all():
                assert secret not in repr(tuple(row)), f"{table.name} holds the content key"


async def _custodial_round(url: str) -> None:
    engine = create_engine(url)
    world = SealedWorld(session_factory(engine), Clock())
    try:
        job_id = await world.funded_job("custodial")
        good, good_seal = await world.sealed_result(0, 0)
        cheat, _ = await world.sealed_result(1, 1, escrow_key=os.urandom(32))
        assert any(w.startswith("key_mismatch: ") for w in await _ignored(world, job_id))
        async with world.sessions() as s:
            assert cheat.id not in set((await s.scalars(select(Result.id))).all())  # not counted
        plain = await world.plain_result(2, 1)
        assert await world.state(job_id) == "validating"  # shard 1 has its result now (the plain one)

        sha = _model_sha(good_seal)
        plain_sha = hashlib.sha256(b"plain 2").hexdigest()
        await world.sealed_scores(0, {good.id: (sha, "0.9"), plain.id: (plain_sha, "0.7")})
        # Sealed scores that do not open for this escrow are not counted.
        await world.sealed_scores(1, {good.id: (sha, "0.1"), plain.id: (plain_sha, "0.1")}, to=SecretKey.generate())
        assert any(w.startswith("undecryptable_scores") for w in await _ignored(world, job_id))
        async with world.sessions() as s:
            stored = {(x.result_id, x.validator): x.value for x in (await s.scalars(select(ScoreRow))).all()}
            assert stored == {
                (good.id, VALIDATORS[0].public_key_hex): "0.9",
                (plain.id, VALIDATORS[0].public_key_hex): "0.7",
            }
            # While validating, nobody sees a score's value (nor the customer's key) in public.
            public = await queries.public_job(s, job_id)
            assert public is not None and public["scores"] and all(x["value"] is None for x in public["scores"])
            assert {x["value"] for x in (await queries.job_detail(s, job_id) or {})["scores"]} == {"0.9", "0.7"}
            assert await queries.released_keys(s, job_id) == []
        assert await world.published(INFO_MODEL_KEY) == []

        await world.sealed_scores(1, {good.id: (sha, "0.8"), plain.id: (plain_sha, "0.6")})
        assert await world.state(job_id) == "releasing"  # custodial: released at the decision
        [key_event] = await world.published(INFO_MODEL_KEY)
        released = parse_model_key(key_event)
        assert (released.result_id, released.customer) == (good.id, CUSTOMER.public_key_hex)
        async with world.sessions() as s:
            row = await s.get(Result, good.id)
            assert row is not None and row.customer_key == released.payload and row.key_released_at is not None
            assert (row.key_sha256, row.ciphertext_sha256) == (
                good_seal.key_sha256,
                hashlib.sha256(good_seal.ciphertext).hexdigest(),
            )
            # The customer opens it to the key the validators scored with; nobody else does.
            key = unwrap_key(CUSTOMER, ESCROW.public_key_hex, released.payload, good_seal.key_sha256)
            assert key == good_seal.key
            [view] = await queries.released_keys(s, job_id)
            assert view == {
                "result_id": good.id,
                "provider": PROVIDERS[0].public_key_hex,
                "model_sha256": sha,
                "ciphertext_url": "https://b.example/0",
                "ciphertext_sha256": row.ciphertext_sha256,
                "key_sha256": good_seal.key_sha256,
                "payload": released.payload,
            }
            public = await queries.public_job(s, job_id)
            admin = await queries.job_detail(s, job_id)
            assert public is not None and admin is not None
            assert {x["value"] for x in public["scores"]} == {"0.9", "0.7", "0.8", "0.6"}  # decided: shown
            assert released.payload not in json.dumps(public) and released.payload not in json.dumps(admin)
        await _no_row_holds(world, good_seal.key.hex())

        [complete_event] = await world.published(INFO_VALIDATION_COMPLETE)
        complete = parse_validation_complete(complete_event)
        assert sorted((x.result_id, x.validator, x.value) for x in complete.scores) == sorted(
            [
                (good.id, VALIDATORS[0].public_key_hex, Decimal("0.9")),
                (good.id, VALIDATORS[1].public_key_hex, Decimal("0.8")),
                (plain.id, VALIDATORS[0].public_key_hex, Decimal("0.7")),
                (plain.id, VALIDATORS[1].public_key_hex, Decimal("0.6")),
            ]
        )
        assert complete.split == world.jobs[0][1].split
    finally:
        await engine.dispose()


async def test_a_sealed_custodial_round_on_sqlite(database_url: str) -> None:
    await _custodial_round(database_url)


@pytest.mark.postgres
async def test_a_sealed_custodial_round_on_postgres(database_url: str) -> None:
    await _custodial_round(database_url)


async def test_hold_the_key_goes_out_once_the_invoice_is_settled_never_before(database_url: str) -> None:
    engine = create_engine(database_url)
    world = SealedWorld(session_factory(engine), Clock())
    try:
        job_id = await world.funded_job("hold")
        good, good_seal = await world.sealed_result(0, 0)
        plain = await world.plain_result(2, 1)
        sha, plain_sha = good_seal.model_sha256, hashlib.sha256(b"plain 2").hexdigest()
        for v in (0, 1):
            await world.sealed_scores(v, {good.id: (sha, "0.9"), plain.id: (plain_sha, "0.7")})
        await world.step_engine()
        assert await world.state(job_id) == "releasing"
        # Decided, but the hold invoice is not settled yet: no key anywhere.
        assert await world.published(INFO_MODEL_KEY) == []
        async with world.sessions() as s:
            assert await queries.released_keys(s, job_id) == []
        await world.effects()  # the settle effect: LND settles, the watcher writes the fact
        await world.step_engine()
        [key_event] = await world.published(INFO_MODEL_KEY)
        assert parse_model_key(key_event).result_id == good.id
        async with world.sessions() as s:
            assert [k["result_id"] for k in await queries.released_keys(s, job_id)] == [good.id]
        await world.duplicate(0)  # replays publish nothing again
        await world.step_engine()
        assert len(await world.published(INFO_MODEL_KEY)) == 1
    finally:
        await engine.dispose()


async def test_a_result_scored_unreadable_is_rejected_and_its_key_never_released(database_url: str) -> None:
    engine = create_engine(database_url)
    world = SealedWorld(session_factory(engine), Clock())
    try:
        job_id = await world.funded_job("custodial")
        sealed_ev, sealed = await world.sealed_result(0, 0)
        plain = await world.plain_result(2, 1)
        plain_sha = hashlib.sha256(b"plain 2").hexdigest()
        await world.sealed_scores(0, {sealed_ev.id: (sealed.model_sha256, U), plain.id: (plain_sha, "0.7")})
        await world.sealed_scores(1, {sealed_ev.id: (sealed.model_sha256, "0.9"), plain.id: (plain_sha, "0.7")})
        assert await world.state(job_id) == "releasing"  # the plain result is accepted and paid
        async with world.sessions() as s:
            values = {x.value for x in (await s.scalars(select(ScoreRow).where(ScoreRow.result_id == sealed_ev.id)))}
            assert values == {"unreadable", "0.9"}  # stored as its text
            job = await s.get(Job, job_id)
            assert job is not None and job.decision is not None
            verdicts = {v["result"]: v for v in json.loads(job.decision)["verdicts"]}
            assert verdicts[sealed_ev.id]["unreadable"] and not verdicts[sealed_ev.id]["accepted"]
            assert verdicts[plain.id]["accepted"]
            assert await queries.released_keys(s, job_id) == []
        assert await world.published(INFO_MODEL_KEY) == []
        [complete] = [parse_validation_complete(e) for e in await world.published(INFO_VALIDATION_COMPLETE)]
        verdict = next(v for v in complete.verdicts if v.result_id == sealed_ev.id)
        assert verdict.unreadable and not verdict.accepted
        assert (sealed_ev.id, VALIDATORS[0].public_key_hex, None) in {
            (x.result_id, x.validator, x.value) for x in complete.scores
        }
    finally:
        await engine.dispose()
