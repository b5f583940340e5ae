"""The market the drills play: customers, providers, validators and payees as keys of the drill.

Every job is a small whole round, as the protocol runs it (docs/protocol.md):

1. the customer signs a kind-5701 request (1 shard, 1–2 validators with a fee, payout
   ``best``, hold mode) and publishes it to the relay (some also through ``POST /v1/events``);
2. it waits for the escrow's offer (kind 7000 ``payment-required``) and pays the hold
   invoice from the stack's ``customer`` LND node; the payment stays in flight until the
   escrow settles it, so it is followed in a task and paid again if it fails before the
   escrow reports the job funded;
3. the provider publishes its result (kind 6701) once funded — some carry their own
   invoice for the exact reward, the others claim it later;
4. each validator scores the candidate (kind 6702) once the evaluation request is out;
5. each payee answers every "reward claimable" addressed to it with a fresh invoice from the
   ``payee`` LND node: a kind-7000 payee-invoice event, or ``POST /v1/jobs/{id}/payout-invoice``
   signed with NIP-98.

Agents read the escrow's events from one relay subscription (signatures verified,
reconnecting) and publish until the relay says OK, so events published while the relay or
the service is down are published again afterwards. Every invoice a payee issues is
recorded (hash → job, payee, amount) for the audit.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal

import bolt11
import httpx
import websockets

from service.config import Settings
from service.escrow.service import terms_from_settings
from service.lightning import errors as lnerr
from service.lightning.client import LndClient, PaymentStatus
from service.nostr import nip98
from service.nostr.nip01 import Event, EventError, SecretKey, sign_event, verify_event
from service.nostr.protocol import (
    CodecError,
    Direction,
    JobSpec,
    Mode,
    ModelRef,
    PayoutPolicy,
    Score,
    Shard,
    Validation,
    build_evaluation_result,
    build_job_request,
    build_payee_invoice,
    build_result,
    parse_escrow_offer,
    parse_evaluation_request,
    parse_funded,
    parse_job_request,
    parse_reward_claimable,
)
from service.nostr.protocol.fields import Invoice
from service.nostr.protocol.money import whole_sats

BID_MSAT = 200_000
VALIDATOR_FEE_MSAT = 10_000


def lnd(desc: dict, node: str) -> LndClient:
    n = desc["nodes"][node]
    return LndClient.from_files(n["rpc"], n["tls_cert"], n["macaroon"], timeout=10)


def terms() -> object:
    """The terms a drill service runs with (bench.common.ServiceProc's settings)."""
    return terms_from_settings(Settings(_env_file=None, min_bid_msat=10_000, min_results_window_seconds=0))


# ---------------------------------------------------------------------------- the relay
class RelayHub:
    """One subscription to every event the escrow signs; agents wait on it."""

    def __init__(self, url: str, escrow_pubkey: str, since: int) -> None:
        self.url, self.E, self.since = url, escrow_pubkey, since
        self.seen: set[str] = set()
        self.by_job: dict[str, list[Event]] = defaultdict(list)
        self.reconnects = 0
        self.connected = False
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="relay hub")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            try:
                async with websockets.connect(self.url, open_timeout=5, close_timeout=1, max_size=None) as ws:
                    await ws.send(json.dumps(["REQ", "drill", {"authors": [self.E], "since": self.since}]))
                    self.connected = True
                    while True:  # quiet for 20 s: subscribe again (a replay, deduplicated)
                        msg = json.loads(await asyncio.wait_for(ws.recv(), 20))
                        if msg[0] == "EVENT" and len(msg) == 3:
                            self._add(msg[2])
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the relay went away or stayed quiet: subscribe again
                self.connected = False
                self.reconnects += 1
                await asyncio.sleep(0.5)

    def _add(self, obj: dict) -> None:
        if obj.get("id") in self.seen:
            return
        try:
            ev = verify_event(obj, now=int(time.time()))
        except EventError:
            return
        if ev.pubkey != self.E:
            return
        self.seen.add(ev.id)
        for t in ev.tags:
            if len(t) >= 2 and t[0] == "e":
                self.by_job[t[1]].append(ev)
        old, self._changed = self._changed, asyncio.Event()
        old.set()

    async def wait(self, find, what: str, timeout: float = 3600):
        """``find()`` until it returns something; re-checked on every new event (and every 2 s)."""
        end = time.monotonic() + timeout
        while True:
            found = find()
            if found:
                return found
            if time.monotonic() > end:
                raise TimeoutError(f"waiting for {what}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), 2)

    def parsed(self, job_id: str, parser):
        out = []
        for ev in self.by_job.get(job_id, ()):
            with contextlib.suppress(CodecError, ValueError):
                out.append((ev, parser(ev)))
        return out


class Publisher:
    """Publishes to the relay until it says OK; counts events that needed more than one try."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.published = 0
        self.republished = 0

    async def __call__(self, ev: Event) -> None:
        tries = 0
        while True:
            tries += 1
            try:
                async with websockets.connect(self.url, open_timeout=5, close_timeout=1) as ws:
                    await ws.send(json.dumps(["EVENT", ev.to_dict()]))
                    while True:
                        msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
                        if msg[0] == "OK" and msg[1] == ev.id:
                            break
                if msg[2] is True or str(msg[3]).startswith("duplicate:"):
                    self.published += 1
                    self.republished += tries > 1
                    return
                raise RuntimeError(f"the relay refused event {ev.id[:12]} (kind {ev.kind}): {msg[3]}")
            except (OSError, TimeoutError, websockets.exceptions.WebSocketException):
                await asyncio.sleep(0.5 + random.random())


# ---------------------------------------------------------------------------- jobs
@dataclass
class JobPlan:
    n: int
    validators: int  # 1 or 2
    provider_claim: str  # "inline" (its invoice in the result), "nostr" or "rest"
    validator_claim: str  # "nostr" or "rest"
    via_api: bool  # the request is also POSTed to /v1/events


@dataclass
class JobRun:
    plan: JobPlan
    rng: random.Random
    customer: SecretKey
    provider: SecretKey
    validators: list[SecretKey]
    event: Event | None = None
    reward_msat: int = 0
    offer_hash: str | None = None
    phase: str = "new"
    times: dict[str, float] = field(default_factory=dict)
    pay_attempts: int = 0
    result: Event | None = None  # the provider's result, once published (what a copier sees on the relay)

    @property
    def id(self) -> str:
        return self.event.id if self.event else ""

    def expected(self) -> dict[str, int]:
        """payee pubkey -> msat it must receive, exactly once."""
        out = {self.provider.public_key_hex: self.reward_msat}
        for v in self.validators:
            out[v.public_key_hex] = VALIDATOR_FEE_MSAT
        return out


@dataclass
class Issued:
    job_id: str
    payee: str
    role: str
    amount_msat: int
    payment_request: str


class Market:
    """Runs jobs against one escrow (key ``E``); ``api_urls()`` are the running replicas' base URLs."""

    def __init__(
        self,
        desc: dict,
        escrow_pubkey: str,
        api_urls,
        seed: str,
        run_id: str,
        work: tuple[float, float, float] = (4.0, 2.0, 2.0),
    ) -> None:
        self.desc = desc
        self.E = escrow_pubkey
        self.api_urls = api_urls
        self.seed = seed
        self.run_id = run_id
        self.work = work  # at most this long to train, to score, to pay an offer (each job draws its own)
        self.relay = desc["relay"]["url"]
        self.publish = Publisher(self.relay)
        self.hub = RelayHub(self.relay, escrow_pubkey, since=int(time.time()) - 5)
        self.customer_node = lnd(desc, "customer")
        self.payee_node = lnd(desc, "payee")
        self.terms = terms()
        self.jobs: list[JobRun] = []
        self.issued: dict[str, Issued] = {}  # payee invoice hash -> what it was for
        self.offers: dict[str, str] = {}  # escrow invoice hash -> job id
        self.rest_submissions = 0
        self.api_posts = 0
        self.t0 = time.monotonic()

    async def close(self) -> None:
        await self.hub.stop()
        await self.customer_node.close()
        await self.payee_node.close()

    @staticmethod
    def plan(n: int, r: random.Random) -> JobPlan:
        return JobPlan(
            n=n,
            validators=r.choice((1, 1, 2)),
            provider_claim=r.choice(("inline", "nostr", "rest")),
            validator_claim=r.choice(("nostr", "rest")),
            via_api=r.random() < 0.3,
        )

    def new_job(self, n: int, customer: SecretKey | None = None) -> JobRun:
        """Job ``n`` of a fresh customer, or of ``customer`` (a returning one)."""
        rng = random.Random(f"{self.seed}:job:{n}")  # a job's choices do not depend on timing
        p = self.plan(n, rng)
        job = JobRun(
            plan=p,
            rng=rng,
            customer=customer or SecretKey.generate(),
            provider=SecretKey.generate(),
            validators=[SecretKey.generate() for _ in range(p.validators)],
        )
        self.jobs.append(job)
        return job

    def _mark(self, job: JobRun, phase: str) -> None:
        job.phase = phase
        job.times[phase] = round(time.monotonic() - self.t0, 2)

    # ---- one whole job --------------------------------------------------------------------
    async def run_job(self, job: JobRun) -> None:
        now = int(time.time())
        spec = JobSpec(
            escrow=self.E,
            bid_msat=BID_MSAT,
            shards=(Shard(index=0, url=f"https://data.example.org/drill/{self.run_id}/{job.plan.n}.npz"),),
            validation=Validation("accuracy", Direction.MAX, Decimal("0.8"), 1),
            payout=PayoutPolicy.BEST,
            results_deadline=now + 1800,
            validation_deadline=now + 2400,
            validators=tuple(v.public_key_hex for v in job.validators),
            validator_fee_msat=VALIDATOR_FEE_MSAT,
            mode=Mode.HOLD,
        )
        job.event = sign_event(job.customer, *build_job_request(spec, customer=job.customer.public_key_hex))
        req = parse_job_request(job.event, escrow_pubkey=self.E, terms=self.terms, now=now)
        job.reward_msat = whole_sats(req.split.provider_share_msat)  # every payout is whole satoshis
        await self.publish(job.event)
        if job.plan.via_api:
            await self._post_event(job.event)
        self._mark(job, "requested")

        _, offer = await self.hub.wait(
            lambda: next(iter(self.hub.parsed(job.id, parse_escrow_offer)), None), f"offer for job {job.id[:12]}"
        )
        job.offer_hash = bolt11.decode(offer.bolt11).payment_hash
        self.offers[job.offer_hash] = job.id
        self._mark(job, "offered")
        await asyncio.sleep(job.rng.uniform(0, self.work[2]))  # the customer looks at the offer first
        await self._fund(job, offer.bolt11)
        self._mark(job, "funded")

        # The provider trains, then publishes its result, with its own invoice for the exact reward or none.
        await asyncio.sleep(job.rng.uniform(0, self.work[0]))
        model = f"drill model {self.run_id} {job.plan.n}".encode()
        sha = hashlib.sha256(model).hexdigest()
        invoice = None
        if job.plan.provider_claim == "inline":
            pr = await self._payee_invoice(job, job.provider.public_key_hex, "provider", job.reward_msat)
            invoice = Invoice(job.reward_msat, pr)
        result = sign_event(
            job.provider,
            *build_result(
                req,
                shard_index=0,
                invoice=invoice,
                model=ModelRef(f"https://models.example.org/{sha}", sha, len(model)),
            ),
        )
        await self.publish(result)
        job.result = result
        self._mark(job, "result")

        claims = [asyncio.create_task(self._claim_loop(job, job.provider, "provider", job.plan.provider_claim))]
        claims += [
            asyncio.create_task(self._claim_loop(job, v, "validator", job.plan.validator_claim)) for v in job.validators
        ]
        try:

            def eval_request():
                for ev in self.hub.by_job.get(job.id, ()):
                    if ev.kind == 5702:
                        with contextlib.suppress(CodecError, ValueError):
                            parse_evaluation_request(ev)
                            return ev
                return None

            ereq = await self.hub.wait(eval_request, f"evaluation request for {job.id[:12]}")
            self._mark(job, "validating")

            async def score(v: SecretKey, pause: float) -> None:
                await asyncio.sleep(pause)
                await self.publish(
                    sign_event(
                        v,
                        *build_evaluation_result(
                            request_id=ereq.id,
                            job_id=job.id,
                            escrow=self.E,
                            scores=(Score(result.id, Decimal("0.9"), sha),),
                        ),
                    )
                )

            await asyncio.gather(*(score(v, job.rng.uniform(0, self.work[1])) for v in job.validators))
            self._mark(job, "scored")
            await asyncio.gather(*claims)  # they run until the drill cancels them (job closed)
        finally:
            for t in claims:
                t.cancel()

    async def _fund(self, job: JobRun, payreq: str) -> None:
        """Pay the hold invoice; pay again if LND reports the payment failed before the escrow is funded."""

        def funded():
            return next(iter(self.hub.parsed(job.id, parse_funded)), None)

        while not funded():
            job.pay_attempts += 1
            pay = asyncio.create_task(self._pay_once(payreq, job.offer_hash))
            wait_funded = asyncio.create_task(self.hub.wait(funded, f"funding of {job.id[:12]}"))
            done, _ = await asyncio.wait({pay, wait_funded}, return_when=asyncio.FIRST_COMPLETED)
            if wait_funded in done:
                pay.cancel()  # closes our stream only: LND keeps the payment going
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await pay
                return
            wait_funded.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await wait_funded
            status = pay.result() if not pay.exception() else None
            if status == PaymentStatus.SUCCEEDED:  # custodial, or settled already
                return
            await asyncio.sleep(1 + job.rng.random())

    async def _pay_once(self, payreq: str, payment_hash: str) -> PaymentStatus | None:
        """One SendPaymentV2 (or, if LND already has a payment for the hash, TrackPaymentV2) to its end."""
        try:
            try:
                stream = self.customer_node.send_payment(payreq, fee_limit_msat=10_000, timeout_seconds=20)
                async for p in stream:
                    if p.status.final:
                        return p.status
            except (lnerr.PaymentInTransition, lnerr.PaymentAlreadyPaid):
                async for p in self.customer_node.track_payment(bytes.fromhex(payment_hash)):
                    if p.status.final:
                        return p.status
        except lnerr.LndError:
            return None
        return None

    async def _payee_invoice(self, job: JobRun, payee: str, role: str, amount: int) -> str:
        while True:
            try:
                inv = await self.payee_node.add_invoice(
                    amount, memo=f"drill {self.run_id} {job.id[:16]} {role}", expiry=3600
                )
                break
            except lnerr.LndError:
                await asyncio.sleep(1)
        self.issued[inv.payment_hash.hex()] = Issued(job.id, payee, role, amount, inv.payment_request)
        return inv.payment_request

    async def _claim_loop(self, job: JobRun, key: SecretKey, role: str, how: str) -> None:
        """Answer every 'reward claimable' addressed to this payee, each once, with a fresh invoice."""
        answered: set[str] = set()

        def claimable():
            for ev, c in self.hub.parsed(job.id, parse_reward_claimable):
                if c.payee == key.public_key_hex and ev.id not in answered:
                    return ev, c
            return None

        while True:
            ev, c = await self.hub.wait(claimable, f"reward claimable for {key.public_key_hex[:8]}")
            answered.add(ev.id)
            pr = await self._payee_invoice(job, key.public_key_hex, role, c.amount_msat)
            if how == "rest":
                await self._rest_invoice(job.id, key, pr)
            else:
                await self.publish(
                    sign_event(
                        key, *build_payee_invoice(job_id=job.id, escrow=self.E, amount_msat=c.amount_msat, bolt11=pr)
                    )
                )

    async def _rest_invoice(self, job_id: str, key: SecretKey, bolt11: str) -> None:
        """``POST /v1/jobs/{id}/payout-invoice`` with NIP-98, to whichever replica answers."""
        body = json.dumps({"bolt11": bolt11}).encode()
        path = f"/v1/jobs/{job_id}/payout-invoice"
        async with httpx.AsyncClient(timeout=10) as c:
            while True:
                for base in list(self.api_urls()):
                    auth = sign_event(
                        key,
                        nip98.KIND_HTTP_AUTH,
                        [["u", base + path], ["method", "POST"], ["payload", hashlib.sha256(body).hexdigest()]],
                        "",
                    )
                    try:
                        r = await c.post(
                            base + path,
                            content=body,
                            headers={"Authorization": nip98.build_header(auth), "content-type": "application/json"},
                        )
                    except httpx.TransportError:
                        continue
                    if r.status_code in (202, 409):  # taken, or the payout no longer waits for one
                        self.rest_submissions += r.status_code == 202
                        return
                await asyncio.sleep(1 + random.random())

    async def _post_event(self, ev: Event) -> None:
        """The same event through ``POST /v1/events`` (best effort: the relay has it anyway)."""
        async with httpx.AsyncClient(timeout=5) as c:
            for base in list(self.api_urls()):
                with contextlib.suppress(httpx.TransportError):
                    r = await c.post(base + "/v1/events", json=ev.to_dict())
                    if r.status_code == 202:
                        self.api_posts += 1
                        return
