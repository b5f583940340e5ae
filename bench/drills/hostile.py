"""Hostile participants for the adversarial drill, beside the honest jobs of :mod:`bench.drills.market`.

Each attacker is a coroutine with its own keys, playing one attack of issue 12
(docs/threat-model.md) against the same escrow, relay and nodes as the honest jobs:

- ``held_htlc``: a provider answers its reward with a HOLD invoice of the payee node and never
  settles it (cancelled when the drill ends): the escrow's HTLC stays locked;
- ``poisoned_scores``: two validators score ``"9" * 64``; the job must still be decided (refunded,
  no quorum) on time;
- ``copies``: three sybil keys copy honest results' model tags through the relay and one more
  copy, backdated to ``created_at=1000``, goes through the REST API: none may earn anything;
- ``invoice_race``: one attacker, validator of two jobs under two keys, gives the SAME invoice for
  both fees at the same moment, over REST and Nostr (PostgreSQL): paid once;
- ``fee_hop``: a provider answers with an invoice of ``payee2``, behind its own hop with a
  9.5-sat base fee (the payee's channel policy); refused, it then gives a direct invoice;
- ``flood``: a burst of job requests from fresh keys through the relay.

Hostile jobs are not in ``market.jobs`` (the audit's honest set); each attack records what it saw
in ``Attacks.findings`` and the drill turns those into its verdict.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import time
from dataclasses import dataclass, field
from decimal import Decimal

import bolt11
import httpx

from bench.drills.market import BID_MSAT, VALIDATOR_FEE_MSAT, JobPlan, JobRun, Market, lnd
from service.lightning import errors as lnerr
from service.lightning.client import InvoiceState
from service.nostr import nip98
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
    build_evaluation_result,
    build_job_request,
    build_payee_invoice,
    build_result,
    parse_escrow_offer,
    parse_job_request,
    parse_reward_claimable,
)
from service.nostr.protocol.money import whole_sats

HOP_BASE_FEE_MSAT = 9_500


@dataclass
class Hostile:
    """One hostile job: its keys and what the attack needs to know about it."""

    label: str
    run: JobRun
    request: object = None
    result: Event | None = None
    notes: dict = field(default_factory=dict)


class Attacks:
    def __init__(self, market: Market, desc: dict, api_urls, fault, say) -> None:
        self.m = market
        self.desc = desc
        self.api_urls = api_urls
        self.fault = fault  # the drill's fault(kind, **detail): recorded and printed
        self.say = say
        self.jobs: list[Hostile] = []
        self.findings: dict[str, dict] = {}
        self.copy_keys: set[str] = set()
        self.held: list[bytes] = []  # payment hashes of hold invoices we never settle
        self.flood_ids: list[str] = []
        self.race_hash: str | None = None
        self.payee2 = lnd(desc, "payee2")

    async def close(self) -> None:
        for h in self.held:  # the held HTLC goes back to the escrow: its payout fails, never pays twice
            with contextlib.suppress(lnerr.LndError):
                await self.m.payee_node.cancel_invoice(h)
        await self.payee2.close()

    # ---- a hostile job, as a customer runs it -----------------------------------------------
    async def _job(
        self,
        label: str,
        *,
        validators: int = 1,
        results_in: int = 1800,
        validation_in: int = 2400,
        validator_fee: int = VALIDATOR_FEE_MSAT,
    ) -> Hostile:
        n = 10_000 + len(self.jobs)
        rng = random.Random(f"{self.m.seed}:hostile:{n}")
        run = JobRun(
            plan=JobPlan(n=n, validators=validators, provider_claim="nostr", validator_claim="nostr", via_api=False),
            rng=rng,
            customer=SecretKey.generate(),
            provider=SecretKey.generate(),
            validators=[SecretKey.generate() for _ in range(validators)],
        )
        now = int(time.time())
        spec = JobSpec(
            escrow=self.m.E,
            bid_msat=BID_MSAT,
            shards=(Shard(index=0, url=f"https://data.example.org/hostile/{self.m.run_id}/{n}.npz"),),
            validation=Validation("accuracy", Direction.MAX, Decimal("0.8"), validators),
            payout=PayoutPolicy.BEST,
            results_deadline=now + results_in,
            validation_deadline=now + validation_in,
            validators=tuple(v.public_key_hex for v in run.validators),
            validator_fee_msat=validator_fee,
            mode=Mode.HOLD,
        )
        run.event = sign_event(run.customer, *build_job_request(spec, customer=run.customer.public_key_hex))
        h = Hostile(label, run, parse_job_request(run.event, escrow_pubkey=self.m.E, terms=self.m.terms, now=now))
        run.reward_msat = whole_sats(h.request.split.provider_share_msat)
        self.jobs.append(h)
        await self.m.publish(run.event)
        _, offer = await self.m.hub.wait(
            lambda: next(iter(self.m.hub.parsed(run.id, parse_escrow_offer)), None), f"offer for hostile job {label}"
        )
        run.offer_hash = bolt11.decode(offer.bolt11).payment_hash
        await self.m._fund(run, offer.bolt11)  # the honest customer's way of paying
        return h

    async def _result(self, h: Hostile, model: bytes | None = None) -> Event:
        model = model or f"hostile model {self.m.run_id} {h.run.plan.n}".encode()
        sha = hashlib.sha256(model).hexdigest()
        h.result = sign_event(
            h.run.provider,
            *build_result(
                h.request, shard_index=0, model=ModelRef(f"https://models.example.org/{sha}", sha, len(model))
            ),
        )
        await self.m.publish(h.result)
        h.notes["sha"] = sha
        return h.result

    async def _eval_request(self, h: Hostile) -> Event:
        def find():
            return next((ev for ev in self.m.hub.by_job.get(h.run.id, ()) if ev.kind == 5702), None)

        return await self.m.hub.wait(find, f"evaluation request of hostile job {h.label}")

    async def _score(self, h: Hostile, value: str = "0.9") -> None:
        req = await self._eval_request(h)
        for v in h.run.validators:
            await self.m.publish(
                sign_event(
                    v,
                    *build_evaluation_result(
                        request_id=req.id,
                        job_id=h.run.id,
                        escrow=self.m.E,
                        scores=(Score(h.result.id, Decimal(value), h.notes["sha"]),),
                    ),
                )
            )

    async def _claimable(
        self, h: Hostile, key: SecretKey, seen: set[str], *, reason: str | None = None, timeout: float = 600
    ):
        def find():
            for ev, c in self.m.hub.parsed(h.run.id, parse_reward_claimable):
                if c.payee == key.public_key_hex and ev.id not in seen and (reason is None or c.reason == reason):
                    return ev, c
            return None

        ev, c = await self.m.hub.wait(find, f"reward claimable of hostile job {h.label}", timeout=timeout)
        seen.add(ev.id)
        return c

    async def _claim(self, h: Hostile, key: SecretKey, seen: set[str] | None = None) -> None:
        """Claim like an honest payee (an invoice of the payee node, over Nostr), once."""
        c = await self._claimable(h, key, seen if seen is not None else set())
        inv = await self.m.payee_node.add_invoice(c.amount_msat, memo=f"hostile {h.label}", expiry=3600)
        await self._send_invoice(h, key, c.amount_msat, inv.payment_request)

    async def _send_invoice(self, h: Hostile, key: SecretKey, amount: int, payreq: str) -> None:
        await self.m.publish(
            sign_event(key, *build_payee_invoice(job_id=h.run.id, escrow=self.m.E, amount_msat=amount, bolt11=payreq))
        )

    # ---- the attacks -----------------------------------------------------------------------
    async def held_htlc(self) -> None:
        h = await self._job("held-htlc")
        await self._result(h)
        validator = asyncio.create_task(self._claim(h, h.run.validators[0]))
        await self._score(h)
        c = await self._claimable(h, h.run.provider, set())
        preimage = os.urandom(32)
        payment_hash = hashlib.sha256(preimage).digest()
        inv = await self.m.payee_node.add_hold_invoice(payment_hash, c.amount_msat, memo="never settled", expiry=3600)
        self.held.append(payment_hash)
        await self._send_invoice(h, h.run.provider, c.amount_msat, inv.payment_request)
        t0 = time.monotonic()
        while (await self.m.payee_node.lookup_invoice(payment_hash)).state != InvoiceState.ACCEPTED:
            await asyncio.sleep(0.5)
        self.fault("payee-holds-htlc", job=h.run.id[:12], accepted_after_s=round(time.monotonic() - t0, 1))
        self.findings["held_htlc"] = {"job": h.run.id, "held_at": time.monotonic()}
        await validator

    async def poisoned_scores(self) -> None:
        h = await self._job("poisoned", validators=2, results_in=20, validation_in=30)
        await self._result(h)
        req = await self._eval_request(h)
        for v in h.run.validators:  # written by hand: the codec's builder refuses to write them
            tags = [
                ["e", req.id, "", "request"],
                ["e", h.run.id, "", "job"],
                ["p", self.m.E],
                ["score", h.result.id, "9" * 64, h.notes["sha"]],
            ]
            await self.m.publish(sign_event(v, 6702, tags, ""))
        self.fault("poisoned-scores", job=h.run.id[:12], value="9" * 8 + "…(64)")
        self.findings["poisoned"] = {"job": h.run.id, "validation_deadline": h.request.spec.validation_deadline}

    async def copies(self, honest: list[JobRun]) -> None:
        """Copies of the first honest results (as they appear on the relay) by other keys."""
        done = 0
        for run in honest[:2]:
            while run.result is None:
                await asyncio.sleep(0.2)
            tags = [list(t) for t in run.result.tags]  # the same model, shard and everything else
            for _ in range(3):
                key = SecretKey.generate()
                self.copy_keys.add(key.public_key_hex)
                await self.m.publish(sign_event(key, run.result.kind, tags, ""))
                done += 1
            key = SecretKey.generate()  # and one backdated, through the REST API
            self.copy_keys.add(key.public_key_hex)
            backdated = sign_event(key, run.result.kind, tags, "", created_at=1000)
            await self.m._post_event(backdated)
            self.fault("sybil-copies", job=run.id[:12], copies=3, backdated=1)
        self.findings["copies"] = {"copies": done, "keys": len(self.copy_keys)}

    async def invoice_race(self) -> None:
        """One attacker validates two jobs under two keys (same fee) and gives ONE invoice for both."""
        a, b = await asyncio.gather(self._job("race-a"), self._job("race-b"))
        for h in (a, b):
            await self._result(h)
        providers = [asyncio.create_task(self._claim(h, h.run.provider)) for h in (a, b)]
        await asyncio.gather(self._score(a), self._score(b))
        seen_a, seen_b = set(), set()
        ca, cb = await asyncio.gather(
            self._claimable(a, a.run.validators[0], seen_a), self._claimable(b, b.run.validators[0], seen_b)
        )
        assert ca.amount_msat == cb.amount_msat
        inv = await self.m.payee_node.add_invoice(ca.amount_msat, memo="one invoice, two rewards", expiry=3600)
        self.race_hash = inv.payment_hash.hex()
        await asyncio.gather(
            self._rest_invoice(a, a.run.validators[0], inv.payment_request),
            self._send_invoice(b, b.run.validators[0], cb.amount_msat, inv.payment_request),
        )
        self.fault("one-invoice-two-rewards", jobs=f"{a.run.id[:8]},{b.run.id[:8]}", via="REST+Nostr")
        # whichever was refused is asked again: answer it with an invoice of its own, so both close
        self.findings["race"] = {"jobs": [a.run.id, b.run.id], "hash": self.race_hash}
        again = [
            asyncio.create_task(self._claim(a, a.run.validators[0], seen_a)),
            asyncio.create_task(self._claim(b, b.run.validators[0], seen_b)),
        ]
        try:
            await asyncio.wait(again, return_when=asyncio.FIRST_COMPLETED)
            await asyncio.gather(*providers)
        finally:
            for t in again:  # the one that was paid is never asked again
                t.cancel()

    async def _rest_invoice(self, h: Hostile, key: SecretKey, payreq: str) -> None:
        body = json.dumps({"bolt11": payreq}).encode()
        path = f"/v1/jobs/{h.run.id}/payout-invoice"
        async with httpx.AsyncClient(timeout=10) as c:
            for base in list(self.api_urls()):
                auth = sign_event(
                    key,
                    nip98.KIND_HTTP_AUTH,
                    [["u", base + path], ["method", "POST"], ["payload", hashlib.sha256(body).hexdigest()]],
                    "",
                )
                with contextlib.suppress(httpx.TransportError):
                    await c.post(
                        base + path,
                        content=body,
                        headers={"Authorization": nip98.build_header(auth), "content-type": "application/json"},
                    )
                    return

    async def fee_hop(self) -> None:
        """The provider's invoice is payee2's, behind the payee's 9.5-sat hop; refused, then direct."""
        h = await self._job("fee-hop")
        await self._result(h)
        validator = asyncio.create_task(self._claim(h, h.run.validators[0]))
        await self._score(h)
        seen: set[str] = set()
        c = await self._claimable(h, h.run.provider, seen)
        inv = await self.payee2.add_invoice(c.amount_msat, memo="behind my own hop", private=True)
        await self._send_invoice(h, h.run.provider, c.amount_msat, inv.payment_request)
        again = await self._claimable(h, h.run.provider, seen, reason="route_fee_exceeds_limit", timeout=120)
        self.fault("fee-charging-hop", job=h.run.id[:12], refused_with="route_fee_exceeds_limit")
        direct = await self.m.payee_node.add_invoice(again.amount_msat, memo="direct after all", expiry=3600)
        await self._send_invoice(h, h.run.provider, again.amount_msat, direct.payment_request)
        self.findings["fee_hop"] = {"job": h.run.id}
        await validator

    async def flood(self, n: int) -> None:
        now = int(time.time())
        events = []
        for k in range(n):
            key = SecretKey.generate()
            spec = JobSpec(
                escrow=self.m.E,
                bid_msat=BID_MSAT,
                shards=(Shard(index=0, url=f"https://flood.example.org/{self.m.run_id}/{k}.npz"),),
                validation=Validation("accuracy", Direction.MAX, Decimal("0.8"), 1),
                payout=PayoutPolicy.BEST,
                results_deadline=now + 600,
                validation_deadline=now + 900,
                validators=(SecretKey.generate().public_key_hex,),
                validator_fee_msat=VALIDATOR_FEE_MSAT,
                mode=Mode.HOLD,
            )
            events.append(sign_event(key, *build_job_request(spec, customer=key.public_key_hex)))
        t0 = time.monotonic()
        await asyncio.gather(*(self.m.publish(ev) for ev in events))
        self.flood_ids = [ev.id for ev in events]
        self.fault("relay-flood", requests=n, published_in_s=round(time.monotonic() - t0, 1))
