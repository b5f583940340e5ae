"""Jobs whose work arrives just before its deadlines, for the deadline-outage drill and its e2e tests.

A job here has short windows (results ``results_in`` seconds after the request, validation
``validation_window`` after that). Its provider publishes its result a little before the results
deadline *in force* (the request's, or the latest ``deadline extended`` feedback the escrow
published), its validators score a little before the validation deadline in force. Whatever is
published before the deadline in force is on-time work: the escrow must count it and pay for it,
even when it was down when the work was sent (the relay keeps it) and came back after the deadline.

What each job's participants sent and when is kept in :attr:`DeadlineMarket.sent`, so a drill can
name on-time work that was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from dataclasses import dataclass, field
from decimal import Decimal

import bolt11

from bench.drills.market import BID_MSAT, VALIDATOR_FEE_MSAT, JobRun, Market
from service.nostr.nip01 import Event, sign_event
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
    build_result,
    parse_deadline_extension,
    parse_escrow_offer,
    parse_evaluation_request,
    parse_job_request,
)
from service.nostr.protocol.fields import Invoice
from service.nostr.protocol.money import whole_sats


@dataclass
class Sent:
    """On-time work of one job: what was published, and the deadline in force when it was."""

    result_at: float | None = None
    result_deadline: int | None = None
    scores_at: dict[str, float] = field(default_factory=dict)  # validator -> when
    scores_deadline: dict[str, int] = field(default_factory=dict)


class DeadlineMarket(Market):
    def __init__(self, *args, results_in: float = 30, validation_window: float = 30, lead=(1.0, 4.0), **kw) -> None:
        super().__init__(*args, **kw)
        self.results_in = results_in
        self.validation_window = validation_window
        self.lead = lead  # work arrives this long (drawn per job) before the deadline in force
        self.sent: dict[str, Sent] = {}
        self.funded_at: dict[str, float] = {}

    def deadlines(self, job: JobRun) -> tuple[int, int]:
        """The job's deadlines in force, as a participant sees them: the request's, moved by the
        latest extension the escrow published."""
        assert job.event is not None
        req = parse_job_request(job.event, escrow_pubkey=self.E, terms=self.terms, now=job.event.created_at)
        rd, vd = req.spec.results_deadline, req.spec.validation_deadline
        for _, ext in self.hub.parsed(job.id, parse_deadline_extension):
            rd = max(rd, ext.results_deadline or rd)
            vd = max(vd, ext.validation_deadline or vd)
        return rd, vd

    async def _until(self, job: JobRun, which: int, lead: float) -> None:
        """Sleep until ``lead`` seconds before the deadline in force (re-read: it may move meanwhile)."""
        while True:
            left = self.deadlines(job)[which] - lead - time.time()
            if left <= 0:
                return
            await asyncio.sleep(min(left, 1.0))

    async def run_job(self, job: JobRun) -> None:
        now = int(time.time())
        rd = now + int(self.results_in)
        spec = JobSpec(
            escrow=self.E,
            bid_msat=BID_MSAT,
            shards=(Shard(index=0, url=f"https://data.example.org/deadline-drill/{self.run_id}/{job.plan.n}.npz"),),
            validation=Validation("accuracy", Direction.MAX, Decimal("0.8"), len(job.validators)),
            payout=PayoutPolicy.BEST,
            results_deadline=rd,
            validation_deadline=rd + int(self.validation_window),
            validators=tuple(v.public_key_hex for v in job.validators),
            validator_fee_msat=VALIDATOR_FEE_MSAT,
            mode=Mode.HOLD,
        )
        job.event = sign_event(job.customer, *build_job_request(spec, customer=job.customer.public_key_hex))
        req = parse_job_request(job.event, escrow_pubkey=self.E, terms=self.terms, now=now)
        job.reward_msat = whole_sats(req.split.provider_share_msat)
        sent = self.sent.setdefault(job.id, Sent())
        await self.publish(job.event)
        self._mark(job, "requested")
        _, offer = await self.hub.wait(
            lambda: next(iter(self.hub.parsed(job.id, parse_escrow_offer)), None), f"offer for job {job.id[:12]}"
        )
        job.offer_hash = bolt11.decode(offer.bolt11).payment_hash
        self.offers[job.offer_hash] = job.id
        self._mark(job, "offered")
        await self._fund(job, offer.bolt11)
        self.funded_at[job.id] = time.time()
        self._mark(job, "funded")

        # The provider delivers just before the results deadline in force, with its invoice inline.
        pr = await self._payee_invoice(job, job.provider.public_key_hex, "provider", job.reward_msat)
        model = f"deadline drill model {self.run_id} {job.plan.n}".encode()
        sha = hashlib.sha256(model).hexdigest()
        result = sign_event(
            job.provider,
            *build_result(
                req,
                shard_index=0,
                invoice=Invoice(job.reward_msat, pr),
                model=ModelRef(f"https://models.example.org/{sha}", sha, len(model)),
            ),
        )
        await self._until(job, 0, job.rng.uniform(*self.lead))
        sent.result_deadline = self.deadlines(job)[0]
        sent.result_at = time.time()
        await self.publish(result)
        job.result = result
        self._mark(job, "result")

        claims = [
            asyncio.create_task(self._claim_loop(job, v, "validator", job.plan.validator_claim)) for v in job.validators
        ]
        try:

            def eval_request() -> Event | None:
                for ev in self.hub.by_job.get(job.id, ()):
                    if ev.kind == 5702:
                        with contextlib.suppress(CodecError, ValueError):
                            parse_evaluation_request(ev)
                            return ev
                return None

            ereq = await self.hub.wait(eval_request, f"evaluation request for {job.id[:12]}")
            self._mark(job, "validating")

            async def score(v, lead: float) -> None:
                await self._until(job, 1, lead)
                sent.scores_deadline[v.public_key_hex] = self.deadlines(job)[1]
                sent.scores_at[v.public_key_hex] = time.time()
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

            await asyncio.gather(*(score(v, job.rng.uniform(*self.lead)) for v in job.validators))
            self._mark(job, "scored")
            await asyncio.gather(*claims)  # they run until the drill cancels them (job closed)
        finally:
            for t in claims:
                t.cancel()

    def on_time_sent(self, job: JobRun) -> tuple[bool, bool]:
        """Whether this job's result and every score were published before the deadline in force."""
        s = self.sent.get(job.id, Sent())
        result_ok = s.result_at is not None and s.result_deadline is not None and s.result_at < s.result_deadline
        scores_ok = len(s.scores_at) == len(job.validators) and all(
            s.scores_at[v] < s.scores_deadline[v] for v in s.scores_at
        )
        return result_ok, scores_ok

    def extensions(self, job: JobRun) -> list:
        return [ext for _, ext in self.hub.parsed(job.id, parse_deadline_extension)]
