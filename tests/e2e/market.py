"""A small market for end-to-end tests: the whole service in-process, agents over a real relay.

The service (relay pool, inbox, engine, outbox, LND watcher, payout worker) runs as in
production, against the session's regtest network and relay. Customers, providers and
validators are keys of the test that publish signed events to the relay and read the
escrow's answers from it; the customer pays from the customer LND node and payees'
invoices come from the payee node.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace

import httpx
import uvicorn
import websockets
from sqlalchemy import select

from service.api import blobs
from service.app import create_app
from service.config import Settings
from service.escrow.models import Job, TimelineEntry
from service.escrow.service import terms_from_settings
from service.ledger import service as ledger
from service.lightning.client import Payment
from service.nostr.models import InboxEvent
from service.nostr.nip01 import Event, SecretKey, sign_event
from service.nostr.protocol import (
    Direction,
    JobSpec,
    Mode,
    ModelRef,
    PayoutPolicy,
    Score,
    Shard,
    Validation,
    build_deletion,
    build_evaluation_result,
    build_job_request,
    build_payee_invoice,
    build_result,
    parse_job_request,
)
from service.payouts.models import Payout
from tests.conftest import Regtest, free_port, wait_until


async def publish(url: str, event: Event) -> None:
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps(["EVENT", event.to_dict()]))
        while True:
            msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if msg[0] == "OK" and msg[1] == event.id:
                assert msg[2] is True or str(msg[3]).startswith("duplicate:"), msg
                return


async def query(url: str, flt: dict) -> list[dict]:
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps(["REQ", "q", flt]))
        out = []
        while True:
            msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
            if msg[0] == "EOSE":
                return out
            if msg[0] == "EVENT":
                out.append(msg[2])


def tag(ev: dict, name: str) -> list[str] | None:
    return next((t for t in ev["tags"] if t and t[0] == name), None)


class Market:
    def __init__(
        self, regtest: Regtest, relay: str, database_url: str, escrow_key: SecretKey | None = None, **settings
    ) -> None:
        self.regtest = regtest
        self.relay = relay
        self.escrow_key = escrow_key or SecretKey.generate()  # given: the same escrow started again
        self.E = self.escrow_key.public_key_hex
        node = regtest.node("escrow")
        base = dict(
            network="regtest",
            database_url=database_url,
            lnd_grpc_host=node["rpc"],
            lnd_tls_cert_path=node["tls_cert"],
            lnd_macaroon_path=node["macaroon"],
            relays=[relay],
            nostr_secret_key=self.escrow_key.to_hex(),
            min_results_window_seconds=0,
            min_bid_msat=10_000,
            invoice_expiry_seconds=300,
            guard_interval_seconds=1.0,
            payout_retry_seconds=1.0,
            payout_invoice_min_expiry_seconds=60,
            sweep_interval_seconds=2.0,
        )
        base.update(settings)
        self.settings = Settings(_env_file=None, **base)
        self.app = create_app(self.settings)
        self.customer = SecretKey.generate()
        self.providers = [SecretKey.generate() for _ in range(3)]
        self.validators = [SecretKey.generate() for _ in range(2)]

    @asynccontextmanager
    async def running(self):
        async with self.app.router.lifespan_context(self.app):
            await wait_until(lambda: self.app.state.nostr.pool.status()[0]["connected"], 15, "relay connected")
            await wait_until(lambda: self.app.state.lightning.watcher.health.connected, 60, "invoice stream")
            yield self

    external_sessions = None  # set when the service runs in other processes

    @property
    def sessions(self):
        return self.external_sessions or self.app.state.sessions

    # ---- the customer ----------------------------------------------------------------
    def job_spec(
        self,
        *,
        shards: int = 3,
        validators: int = 2,
        quorum: int = 2,
        policy: str = "best",
        bid: int = 3_000_000,
        validator_fee: int = 50_000,
        results_in: int = 25,
        validation_in: int = 50,
        mode: str = "auto",
        providers: tuple[str, ...] = (),
        threshold: str = "0.8",
    ) -> JobSpec:
        now = int(time.time())
        return JobSpec(
            escrow=self.E,
            bid_msat=bid,
            shards=tuple(Shard(index=k, url=f"https://data.example.org/digits/{k}.npz") for k in range(shards)),
            validation=Validation("accuracy", Direction.MAX, Decimal(threshold), quorum),
            payout=PayoutPolicy(policy),
            results_deadline=now + results_in,
            validation_deadline=now + validation_in,
            validators=tuple(v.public_key_hex for v in self.validators[:validators]),
            validator_fee_msat=validator_fee if validators else 0,
            mode=Mode(mode),
            providers=providers,
        )

    async def post_job(self, spec: JobSpec) -> Event:
        ev = sign_event(self.customer, *build_job_request(spec, customer=self.customer.public_key_hex))
        await publish(self.relay, ev)
        return ev

    async def escrow_events(self, job_id: str) -> list[dict]:
        return await query(self.relay, {"authors": [self.E], "#e": [job_id]})

    async def wait_status(self, job_id: str, status: str, info: str | None = None, timeout: float = 30) -> dict:
        async def find():
            for ev in await self.escrow_events(job_id):
                st = tag(ev, "status")
                if st and st[1] == status and (info is None or (len(st) > 2 and st[2].startswith(info))):
                    return ev
            return None

        return await wait_until(find, timeout, f"escrow event {status} {info or ''} for {job_id[:12]}", interval=0.3)

    async def offer(self, job_id: str) -> tuple[int, str]:
        ev = await self.wait_status(job_id, "payment-required")
        amount = tag(ev, "amount")
        return int(amount[1]), amount[2]

    async def fund(self, job_id: str) -> asyncio.Task:
        """Pay the offer from the customer node (a task: a hold payment stays in flight)."""
        amount, bolt11 = await self.offer(job_id)
        task = asyncio.create_task(self.regtest.customer_pays(bolt11, timeout_seconds=60))
        await self.wait_status(job_id, "processing", "escrow funded")
        return task

    async def job_request(self, job_event: Event):
        return parse_job_request(
            job_event, escrow_pubkey=self.E, terms=terms_from_settings(self.settings), now=job_event.created_at
        )

    # ---- providers and validators -----------------------------------------------------------
    async def submit(self, job_event: Event, provider: SecretKey, shard: int, model_bytes: bytes) -> Event:
        job = await self.job_request(job_event)
        sha = hashlib.sha256(model_bytes).hexdigest()
        ev = sign_event(
            provider,
            *build_result(
                job, shard_index=shard, model=ModelRef(f"https://models.example.org/{sha}", sha, len(model_bytes))
            ),
        )
        await publish(self.relay, ev)
        return ev

    async def eval_request(self, job_id: str, timeout: float = 30) -> dict:
        async def find():
            evs = [e for e in await self.escrow_events(job_id) if e["kind"] == 5702]
            return evs[0] if evs else None

        return await wait_until(find, timeout, "evaluation request", interval=0.3)

    async def score(self, job_id: str, validator: SecretKey, scores: dict[str, tuple[str, str]]) -> Event:
        """``scores``: result id -> (value, model sha256)."""
        req = await self.eval_request(job_id)
        ev = sign_event(
            validator,
            *build_evaluation_result(
                request_id=req["id"],
                job_id=job_id,
                escrow=self.E,
                scores=tuple(Score(rid, Decimal(v), sha) for rid, (v, sha) in scores.items()),
            ),
        )
        await publish(self.relay, ev)
        return ev

    async def claim_rewards(self, job_id: str, payees: list[SecretKey], timeout: float = 30) -> dict[str, bytes]:
        """Each payee answers its 'reward claimable' with an invoice from the payee node."""
        hashes: dict[str, bytes] = {}
        for key in payees:

            async def claimable(k=key):
                for ev in await self.escrow_events(job_id):
                    st, p = tag(ev, "status"), tag(ev, "p")
                    if (
                        st
                        and st[1] == "success"
                        and st[2].startswith("reward claimable")
                        and p
                        and p[1] == k.public_key_hex
                    ):
                        return ev
                return None

            ev = await wait_until(claimable, timeout, f"reward claimable for {key.public_key_hex[:8]}", interval=0.3)
            amount = int(tag(ev, "amount")[1])
            payreq, h = await self.regtest.payee_invoice(amount, memo="reward")
            await publish(
                self.relay,
                sign_event(key, *build_payee_invoice(job_id=job_id, escrow=self.E, amount_msat=amount, bolt11=payreq)),
            )
            hashes[key.public_key_hex] = h
        return hashes

    async def delete(self, job_id: str) -> None:
        await publish(self.relay, sign_event(self.customer, *build_deletion((job_id,), kinds=(5701,), escrow=self.E)))

    async def submit_model(
        self,
        job_event: Event,
        provider: SecretKey,
        shard: int,
        model: ModelRef,
        *,
        created_at: int | None = None,
        **extra,
    ) -> Event:
        """A result naming ``model`` (a copy of another's, say), signed with any ``created_at``.
        A backdated one goes through the REST API: relays may refuse an old event, the escrow's
        own intake takes any signed event."""
        job = await self.job_request(job_event)
        tmpl = build_result(job, shard_index=shard, model=model, **extra)
        ev = sign_event(provider, tmpl.kind, tmpl.tags, tmpl.content, created_at=created_at)
        if created_at is None:
            await publish(self.relay, ev)
        else:
            await self.submit_rest(ev)
        return ev

    async def submit_rest(self, event: Event) -> httpx.Response:
        """``POST /v1/events`` to the running app (in-process)."""
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://api.test") as c:
            r = await c.post("/v1/events", json=event.to_dict())
        assert r.status_code in (200, 202), r.text
        return r

    async def handled(self, *event_ids: str, timeout: float = 20) -> dict[str, str]:
        """Wait until the escrow's inbox has processed every one of ``event_ids``; their outcomes."""

        async def check():
            async with self.sessions() as s:
                rows = (
                    await s.execute(
                        select(InboxEvent.id, InboxEvent.outcome).where(
                            InboxEvent.id.in_(event_ids),
                            InboxEvent.handled_at.is_not(None),
                            InboxEvent.outcome != "processing",
                        )
                    )
                ).all()
            return dict(rows) if len(rows) == len(set(event_ids)) else None

        return await wait_until(check, timeout, f"the inbox to process {len(event_ids)} event(s)", interval=0.1)

    # ---- the service's view ------------------------------------------------------------------------
    async def job(self, job_id: str) -> Job:
        async with self.sessions() as s:
            return await s.get(Job, job_id)

    async def invoice_hash(self, job_id: str) -> str:
        """The payment hash of the job's escrow invoice."""
        from service.lightning.models import LnInvoice

        async with self.sessions() as s:
            return (
                await s.scalars(
                    select(LnInvoice.payment_hash).where(LnInvoice.job_id == job_id).order_by(LnInvoice.created_at)
                )
            ).first()

    async def wait_state(self, job_id: str, *states: str, timeout: float = 60) -> Job:
        async def check():
            j = await self.job(job_id)
            return j if j is not None and j.state in states else None

        try:
            return await wait_until(check, timeout, f"job {job_id[:12]} in {states}", interval=0.2)
        except AssertionError:
            raise AssertionError(
                f"job is {(await self.job(job_id)).state if await self.job(job_id) else None}; "
                f"timeline: {await self.timeline(job_id)}"
            ) from None

    async def timeline(self, job_id: str) -> list[tuple[str, dict]]:
        async with self.sessions() as s:
            rows = (
                await s.scalars(select(TimelineEntry).where(TimelineEntry.job_id == job_id).order_by(TimelineEntry.seq))
            ).all()
        return [(r.kind, json.loads(r.detail) if r.detail.startswith("{") else r.detail) for r in rows]

    async def released(self, job_id: str, timeout: float = 60) -> list[Payout]:
        """Wait until the job is released and its payouts exist (a hold job creates them only once
        the hold invoice is settled, after it entered ``releasing``); its payouts."""
        await self.wait_state(job_id, "releasing", "closed", timeout=timeout)
        return await wait_until(lambda: self.payouts(job_id), timeout, f"the payouts of {job_id[:12]}")

    async def payouts(self, job_id: str) -> list[Payout]:
        async with self.sessions() as s:
            return list((await s.scalars(select(Payout).where(Payout.job_id == job_id))).all())

    async def check_ledger(self, job_id: str, *, closed: bool) -> dict[str, int]:
        async with self.sessions() as s:
            violations = await ledger.check_invariants(s, closed_job_ids=[job_id] if closed else [])
            balances = await ledger.balances(s, job_id=job_id)
        assert violations == [], violations
        return balances


async def settle_payment(task: asyncio.Task, timeout: float = 60) -> Payment:
    return await asyncio.wait_for(task, timeout)


@asynccontextmanager
async def serving(market: Market, directory: Path) -> AsyncIterator[str]:
    """The service (in-process) and its HTTP API on a free port, with the blob store; yields the URL."""
    port = free_port()
    async with market.running():
        serve_blobs(market, directory)
        server = uvicorn.Server(
            uvicorn.Config(market.app, host="127.0.0.1", port=port, lifespan="off", log_level="warning")
        )
        task = asyncio.create_task(server.serve())
        await wait_until(lambda: server.started, 10, "API listening")
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            await task


def serve_blobs(market: Market, directory: Path) -> None:
    """The Blossom routes, if the app does not mount them itself; a store in the test's directory."""
    if not any(getattr(route, "path", "").startswith(blobs.PREFIX + "/") for route in market.app.routes):
        market.app.include_router(blobs.router)
    market.app.state.blobs = blobs.build_service(
        SimpleNamespace(blob_dir=str(directory), blob_uploads_per_minute=6000.0, blob_uploads_burst=1000)
    )
