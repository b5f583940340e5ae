"""Fair exchange (issue 14, protocol.md §5a) with the reference agents on the real regtest network
and relay: the customer reads a provider's model only once that provider is paid.

One service (in-process, with its HTTP API and blob store) and one set of agents serve the whole
module; its validator pool (``FEDSTR_VALIDATOR_POOL``) is the two validators, so the providers'
default policy takes their jobs. Rounds:

* round A (validated): alice and bob train honestly, mallory returns random weights (rejected
  on its scores), oscar commits to a content key its ciphertext does not open with (validators
  score it ``unreadable``). The customer opens alice's and bob's models and no other.
* round B (refunded): a threshold no model reaches: no key at all.
* a job naming validators outside the pool: the reference provider refuses it before training.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from decimal import Decimal

import httpx
import pytest

from service.agents import ml
from service.agents.customer import Customer, RoundConfig
from service.agents.demo import Cast, run_round
from service.agents.provider import Provider
from service.agents.relay import Relays
from service.agents.storage import Blobs
from service.agents.validator import Validator
from service.escrow.service import terms_from_settings
from service.migrate import upgrade_async
from service.nostr.nip01 import Event, SecretKey
from service.nostr.protocol import (
    CodecError,
    JobRequest,
    ModelRef,
    Sealed,
    SealedModel,
    Shard,
    open_scores,
    open_sealed,
    parse_evaluation_result,
    parse_model_key,
    parse_result,
    seal,
    sealed_model,
    unwrap_key,
)
from service.nostr.protocol.sealing import key_sha256
from tests.conftest import Regtest
from tests.e2e.market import Market, query, serving, tag

pytestmark = [pytest.mark.lnd, pytest.mark.relay]

ROUND = RoundConfig(bid_msat=3_000_000, validator_fee_msat=50_000, results_in=45, validation_in=200, max_iter=10)


class BadSealer(Provider):
    """A provider whose ciphertext does not open with the content key it commits to (and wraps for
    the escrow and the validators): it encrypts with another key. Its envelopes are honest, so the
    escrow counts the result; only opening the ciphertext shows the cheat."""

    async def _upload(self, job: JobRequest, model: bytes) -> ModelRef | SealedModel:
        committed = seal(model)  # the key it wraps and commits to
        other = seal(model)  # the key it encrypted with
        blob = await self.blobs.upload(other.ciphertext, job=job.id)
        fake = Sealed(other.ciphertext, committed.key, committed.model_sha256, key_sha256(committed.key))
        return sealed_model(self.key, fake, url=blob.url, recipients=(*job.spec.validators, self.escrow))


@dataclass
class World:
    market: Market
    url: str
    relays: Relays
    cast: Cast
    by_name: dict[str, Provider | Validator]
    round_a: dict
    lines: list[str]


def _agents(market: Market, url: str, relays: Relays, progress) -> Cast:
    split = ml.split_digits(4, 2)
    customer = Customer(
        market.customer,
        relays,
        market.E,
        Blobs(f"{url}/blobs", market.customer),
        market.regtest.customer,
        name="carol",
        terms=terms_from_settings(market.settings),
        progress=progress,
        escrow_url=url,
    )
    providers: list[Provider] = []
    for name, cls, dishonest in (
        ("alice", Provider, False),
        ("bob", Provider, False),
        ("mallory", Provider, True),
        ("oscar", BadSealer, False),
    ):
        k = SecretKey.generate()
        providers.append(
            cls(
                k,
                relays,
                market.E,
                Blobs(f"{url}/blobs", k),
                lnd=market.regtest.payee,
                name=name,
                dishonest=dishonest,
                progress=progress,
                network="regtest",
            )
        )
    validators = [
        Validator(
            k,
            relays,
            market.E,
            Blobs(f"{url}/blobs", k),
            split.holdouts[i],
            lnd=market.regtest.payee,
            name=name,
            progress=progress,
            network="regtest",
            escrow_url=url,
        )
        for i, (name, k) in enumerate(zip(("victor", "vera"), market.validators, strict=True))
    ]
    cast = Cast(customer=customer, providers=providers, validators=validators, split=split)
    for agent in (customer, *providers, *validators):
        cast.names[agent.pubkey] = agent.name
        cast.roles[agent.pubkey] = agent.role
    return cast


@pytest.fixture(scope="module")
async def world(regtest: Regtest, relay_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[World]:
    directory = tmp_path_factory.mktemp("sealed")
    database_url = f"sqlite+aiosqlite:///{directory / 'test.sqlite3'}"
    await upgrade_async(database_url)
    pool = [SecretKey.generate() for _ in range(2)]
    market = Market(
        regtest,
        relay_url,
        database_url,
        validator_pool=[(name, k.public_key_hex) for k, name in zip(pool, ("victor", "vera"), strict=True)],
    )
    market.validators = pool
    # FEDSTR_VALIDATOR_POOL is the engine's setting (branch seal-engine): without it the escrow
    # announces no pool and the providers' default policy takes no job at all.
    assert getattr(market.settings, "validator_pool", None), "the escrow has no validator pool setting"
    lines: list[str] = []
    t0 = time.monotonic()

    def progress(phase: str, message: str) -> None:
        lines.append(f"[{time.monotonic() - t0:6.1f}s] {phase:<10} {message}")

    async with serving(market, directory / "blobs") as url:
        relays = Relays([relay_url])
        cast = _agents(market, url, relays, progress)
        async with cast.running():
            try:
                round_a = await asyncio.wait_for(run_round(cast, config=ROUND, service_url=url), 200)
            finally:
                print("\n".join(lines))
            by_name = {a.name: a for a in (*cast.providers, *cast.validators)}
            yield World(market, url, relays, cast, by_name, round_a, lines)


# ----------------------------------------------------------------------------- helpers


async def model_keys(relay_url: str, escrow: str, job_id: str) -> dict[str, str]:
    """The escrow's "model key" events for ``job_id`` on the relay: result id -> payload."""
    out = {}
    for raw in await query(relay_url, {"kinds": [7000], "authors": [escrow], "#e": [job_id]}):
        st = tag(raw, "status")
        if st and st[1] == "success" and len(st) > 2 and st[2] == "model key":
            mk = parse_model_key(Event.from_dict(raw))
            out[mk.result_id] = mk.payload
    return out


async def rest_keys(w: World, job_id: str) -> dict[str, str]:
    """``GET /v1/jobs/{id}/keys`` as the customer (NIP-98): result id -> payload."""
    return await w.cast.customer._keys_from_rest(job_id)


async def results_of(w: World, job_id: str) -> dict[str, tuple[str, Event]]:
    """The job's results on the relay: provider name -> (result id, event)."""
    names = {a.pubkey: a.name for a in w.cast.providers}
    out = {}
    for raw in await query(w.market.relay, {"kinds": [6701], "#e": [job_id]}):
        ev = Event.from_dict(raw)
        out[names.get(ev.pubkey, ev.pubkey[:8])] = (ev.id, ev)
    return out


async def job_of(w: World, job_id: str) -> JobRequest:
    [raw] = await query(w.market.relay, {"ids": [job_id]})
    return await w.market.job_request(Event.from_dict(raw))


def models_by_name(summary: dict) -> dict[str, dict]:
    return {m["provider"]: m for m in summary["models"]}


# ----------------------------------------------------------------------------- (a) accepted


async def test_the_customer_opens_an_accepted_sealed_model_and_its_hash_matches(world: World) -> None:
    w, summary = world, world.round_a
    assert summary["state"] == "closed" and summary["outcome"] == "validated", summary
    models = models_by_name(summary)
    for name in ("alice", "bob"):
        m = models[name]
        assert m["accepted"] and m["sealed"] and m["key_received"] and m["readable"], m
        assert summary["payees"][name]["paid"], summary["payees"][name]
    assert summary["accuracy"] is not None and summary["accuracy"] > 0.85

    # independently of the reference customer: the released key opens the ciphertext to the committed model
    job_id = summary["job_id"]
    job = await job_of(w, job_id)
    keys = await model_keys(w.market.relay, w.market.E, job_id)
    results = await results_of(w, job_id)
    for name in ("alice", "bob"):
        rid, ev = results[name]
        result = parse_result(ev, job)
        assert result.sealed is not None and result.model is None
        key = unwrap_key(w.market.customer, w.market.E, keys[rid], result.sealed.key_sha256)
        async with httpx.AsyncClient(trust_env=False) as http:
            ciphertext = (await http.get(result.sealed.url)).content
        plain = open_sealed(ciphertext, key, result.sealed)
        assert hashlib.sha256(plain).hexdigest() == result.model_sha256
        ml.model_from_bytes(plain)  # a real model
    assert set(await rest_keys(w, job_id)) >= {results["alice"][0], results["bob"][0]}


# ----------------------------------------------------------------------------- (b) rejected


async def test_a_rejected_model_key_is_never_released_and_only_ciphertext_is_stored(world: World) -> None:
    w, summary = world, world.round_a
    job_id = summary["job_id"]
    m = models_by_name(summary)["mallory"]
    assert not m["accepted"] and m["sealed"] and not m["key_received"] and not m["readable"], m
    assert summary["payees"]["mallory"]["received_msat"] == 0
    results = await results_of(w, job_id)
    mallory_id, mallory_ev = results["mallory"]
    job = await job_of(w, job_id)
    sealed = parse_result(mallory_ev, job).sealed
    assert sealed is not None

    relay_keys = await model_keys(w.market.relay, w.market.E, job_id)
    assert results["alice"][0] in relay_keys, "the keys are on the relay (this test can see them)"
    assert mallory_id not in relay_keys
    assert mallory_id not in await rest_keys(w, job_id)
    async with httpx.AsyncClient(trust_env=False) as http:
        r = await http.get(f"{w.url}/v1/jobs/{job_id}/events")
        assert r.status_code == 200, r.text
        for obj in _events_in(r.json()):
            refs = [t[1] for t in obj.get("tags", []) if t and t[0] == "e" and len(t) > 1]
            has_key = any(
                t and t[0] == "key" and len(t) > 1 and t[1] == w.market.customer.public_key_hex
                for t in obj.get("tags", [])
            )
            assert not (mallory_id in refs and has_key), obj
        # the blob store holds the ciphertext, never the model
        for name in ("alice", "bob", "mallory", "oscar"):
            s = parse_result(results[name][1], job).sealed
            assert s is not None
            assert (await http.get(f"{w.url}/blobs/{s.sha256}")).status_code == 404, name
            assert (await http.get(f"{w.url}/blobs/{s.ciphertext_sha256}")).status_code == 200, name


def _events_in(body: object) -> list[dict]:
    """Every event object anywhere in a JSON body."""
    if isinstance(body, dict):
        found = [body] if {"id", "kind", "tags"} <= body.keys() else []
        return found + [e for v in body.values() for e in _events_in(v)]
    if isinstance(body, list):
        return [e for v in body for e in _events_in(v)]
    return []


# ----------------------------------------------------------------------------- (d) unreadable


async def test_a_ciphertext_that_does_not_open_is_scored_unreadable_and_rejected(world: World) -> None:
    w, summary = world, world.round_a
    job_id = summary["job_id"]
    results = await results_of(w, job_id)
    oscar_id = results["oscar"][0]
    for v in w.cast.validators:
        report = await v.report_for(job_id, 10)
        assert report.scores[oscar_id] == "unreadable", report
        assert "not_decryptable" in report.problems[oscar_id], report.problems
    m = models_by_name(summary)["oscar"]
    assert not m["accepted"] and m["median"] is None and not m["key_received"] and not m["readable"], m
    assert oscar_id not in await model_keys(w.market.relay, w.market.E, job_id)
    assert oscar_id not in await rest_keys(w, job_id)
    assert summary["payees"]["oscar"]["received_msat"] == 0


# ----------------------------------------------------------------------------- (e) copying scores


async def test_a_validator_cannot_read_another_validators_scores(world: World) -> None:
    w, summary = world, world.round_a
    job_id = summary["job_id"]
    victor, vera = w.cast.validators
    report = await victor.report_for(job_id, 10)
    [raw] = await query(w.market.relay, {"ids": [report.evaluation_id]})
    assert not [t for t in raw["tags"] if t[0] == "score"], "no score in the clear"
    published = parse_evaluation_result(Event.from_dict(raw), escrow_pubkey=w.market.E)
    assert published.sealed
    with pytest.raises(CodecError) as exc:
        open_scores(published, vera.key)  # the copier's own key
    assert exc.value.reason == "undecryptable_scores"
    opened = open_scores(published, w.market.escrow_key)  # only the escrow reads them
    assert {s.result_id for s in opened.scores} == set(report.scores)


# ----------------------------------------------------------------------------- (c) refunded


async def test_a_refunded_round_releases_no_key(world: World) -> None:
    w = world
    two = Cast(
        customer=w.cast.customer,
        providers=w.cast.providers[:2],
        validators=w.cast.validators,
        split=replace(w.cast.split, shards=w.cast.split.shards[:2]),
        names=w.cast.names,
        roles=w.cast.roles,
    )
    summary = await asyncio.wait_for(
        run_round(two, config=replace(ROUND, threshold=Decimal("0.99")), round_no=2, service_url=w.url), 200
    )
    job_id = summary["job_id"]
    assert summary["outcome"].startswith("refunded"), summary
    assert summary["state"] == "refunded", summary
    assert len(summary["models"]) == 2
    for m in summary["models"]:
        assert m["sealed"] and not m["accepted"] and not m["key_received"] and not m["readable"], m
    assert await model_keys(w.market.relay, w.market.E, job_id) == {}
    assert await rest_keys(w, job_id) == {}


# ----------------------------------------------------------------------------- (f) untrusted validators


async def test_the_reference_provider_refuses_a_job_naming_validators_outside_the_pool(world: World) -> None:
    w = world
    alice = w.by_name["alice"]
    assert isinstance(alice, Provider)
    outsiders = tuple(SecretKey.generate().public_key_hex for _ in range(2))
    spec = replace(
        w.market.job_spec(shards=1, validators=2, quorum=2, results_in=60, validation_in=200),
        shards=(Shard.for_provider(w.market.customer, alice.pubkey, 0, f"{w.url}/blobs/{'ab' * 32}"),),
        validators=outsiders,
        providers=(alice.pubkey,),
    )
    ev = await w.market.post_job(spec)
    report = await alice.report_for(ev.id, 30)
    assert report.refused is not None and "not in the escrow's validator pool" in report.refused, report
    assert report.result_id is None and report.samples == 0, "refused before any work"
    assert any("refused" in line and ev.id[:8] in line for line in w.lines), "the reason is in its log"
    await asyncio.sleep(2)  # a result, had one been made, would be on the relay by now
    assert await query(w.market.relay, {"kinds": [6701], "#e": [ev.id]}) == []
