"""The reference customer: posts one federated-learning round, funds it, and aggregates the result.

One round (:meth:`Customer.run_round`):

0. (:meth:`Customer.discover`) find the providers, when not given their keys: their capability
   events (protocol.md §1a) for the task, this escrow, a price per shard the bid covers, the
   hardware asked and the task's reference code;
1. name each provider's shard (an ``.npz`` of ``X``, ``y``) by its blob URL, which is its
   SHA-256 on the blob server; the URL goes into the request NIP-44-encrypted to the
   provider assigned to it (:meth:`Shard.for_provider`), so only that provider can read it
   and only it may submit for it; the starting model of a later round is named too
   (``param model`` + ``model_sha256``) and the round links the previous job
   (``["i", <id>, "job"]``); so is the task's code (``param code`` + ``code_sha256``: the
   source of the module that trains it, uploaded with the shards) and, when the config says
   so, the ``hardware`` and ``max_runtime_s`` asked of the providers;
2. publish the job request (kind 5701): the validators, ``validation accuracy max
   <threshold> <quorum>``, ``payout split``, deadlines, and ``sealing required`` (by
   default: every model is sealed, so the customer reads only the models it pays for);
3. wait for the escrow's offer, check that it asks exactly the bid; upload the shards (and
   the starting model) naming the job (the escrow's blob store takes uploads only for open
   jobs); pay the offer from the customer's LND node (a hold invoice keeps the payment in
   flight until release);
4. wait for "escrow funded", then for "validation complete" (or a refund);
5. obtain each accepted model's content key from the escrow, which releases it once that
   model's provider is paid (protocol.md §5a): its "model key" events (kind 7000) on the
   relays, or else ``GET /v1/jobs/{id}/keys`` (NIP-98); unwrap it (checked against the
   result's committed key sha256), download the ciphertext and open it (the model's SHA-256
   and size checked); a plain model is downloaded and checked against its ``model`` tag;
6. average the models (FedAvg, weighted by shard size) and measure the average's accuracy
   on the customer's own held-out test set.

The customer never asks anyone but the escrow for a key: a rejected model, or any model of a
refunded round, stays ciphertext to it (:class:`CandidateReport` records, per candidate,
whether a key came and whether the model opened).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx

from service.lightning.client import LndClient, Payment, PaymentStatus
from service.nostr import nip98
from service.nostr.nip01 import Event, SecretKey, sign_event
from service.nostr.protocol import (
    Baseline,
    CodecError,
    ErrorFeedback,
    EscrowOffer,
    EscrowTerms,
    Funded,
    JobRequest,
    JobResult,
    JobSpec,
    Mode,
    ModelKey,
    PayoutPolicy,
    Refunded,
    SealError,
    Sealing,
    Shard,
    Validation,
    ValidationComplete,
    build_job_request,
    money_split,
    open_sealed,
    parse_result,
    unwrap_key,
)
from service.nostr.protocol.sealing import OVERHEAD

from . import ml
from .common import (
    AgentError,
    Progress,
    escrow_feedback,
    feedback_filter,
    find_providers,
    no_progress,
    read_job,
    seconds_until,
    wait_validation,
)
from .relay import Relays, Subscription
from .storage import BlobError, Blobs
from .tasks import DigitsRound, Requirements, RoundTask, task_code, task_code_sha256, task_of


@dataclass(frozen=True)
class RoundConfig:
    """The terms of one round, as the customer writes them."""

    bid_msat: int = 3_000_000
    validator_fee_msat: int = 50_000
    threshold: Decimal = Decimal("0.8")
    quorum: int = 2
    payout: str = "split"
    mode: str = "auto"
    results_in: int = 60  # seconds from now to the results deadline
    # seconds from now to the validation deadline. When a result is missing, the escrow waits
    # for the results deadline plus 60 s of grace before it asks for scores, so leave room
    # after that for the validators (at least ~90 s more).
    validation_in: int = 240
    max_iter: int = 10  # local lbfgs iterations per round (few: FedAvg then improves round by round)
    fee_limit_msat: int = 50_000  # what the customer accepts to pay in routing fees
    refund: str | None = None  # lud16 / lnurl for a custodial refund
    sealing: bool = True  # require sealed results (needs validators: else the customer would validate)
    key_timeout: float = 60.0  # how long to wait for the escrow's model keys after the verdict
    # Relative acceptance (protocol.md §6): a result must beat the round's starting model by this
    # much in the metric's units (None: absolute threshold only; needs a starting model).
    min_improvement: Decimal | None = None
    hardware: str | None = None  # the hardware asked of the providers (param hardware; None: any)
    max_runtime_s: int | None = None  # the providers' training time limit (param max_runtime_s)


@dataclass
class CandidateReport:
    result_id: str
    provider: str
    shard_index: int
    accepted: bool
    median: str | None
    reward_msat: int | None
    accuracy: float | None = None  # digits: on the customer's test set
    test_value: float | None = None  # the task's metric on the customer's test data
    problem: str | None = None
    sealed: bool = False
    key_received: bool = False  # the escrow released this sealed model's content key to us
    key_source: str | None = None  # "relay" (a model key event) or "rest" (GET /v1/jobs/{id}/keys)
    readable: bool = False  # we hold the model: opened (sealed) or downloaded (plain) and verified


@dataclass
class RoundReport:
    job_id: str
    round: int = 1
    previous_job: str | None = None
    mode: str | None = None
    outcome: str = "pending"  # validated | refunded: <code> | failed: <why>
    bid_msat: int = 0
    paid_msat: int = 0  # what left the customer's node (bid + routing fee)
    routing_fee_msat: int = 0  # the customer's, for the funding payment
    payment_status: str | None = None
    escrow_fee_msat: int | None = None
    validator_fee_msat: int = 0
    provider_share_msat: int | None = None
    candidates: list[CandidateReport] = field(default_factory=list)
    accuracy: float | None = None  # digits: of the averaged model on the customer's test set
    metric: str = "accuracy"  # the task's metric (val_loss for DiLoCo)
    test_value: float | None = None  # the new global model's score on the customer's test data
    model: Any = None  # the new global model (the next round's start)
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "model"} | {
            "candidates": [c.__dict__ for c in self.candidates]
        }


class Customer:
    role = "customer"

    def __init__(
        self,
        key: SecretKey,
        relays: Relays,
        escrow: str,
        blobs: Blobs,
        lnd: LndClient,
        *,
        name: str = "customer",
        terms: EscrowTerms | None = None,
        progress: Progress = no_progress,
        escrow_url: str | None = None,
    ) -> None:
        self.key, self.relays, self.escrow, self.blobs, self.lnd = key, relays, escrow, blobs, lnd
        self.name, self.terms, self.progress = name, terms, progress
        self.escrow_url = escrow_url.rstrip("/") if escrow_url else None  # for the keys' REST fallback

    @property
    def pubkey(self) -> str:
        return self.key.public_key_hex

    def reward_per_shard_msat(self, config: RoundConfig, *, shards: int, validators: int) -> int:
        """What one shard's model earns under ``config`` when every model is accepted: the provider
        share (with the escrow's announced fee; 0 fee when unknown) divided by the shards."""
        try:
            split = money_split(
                config.bid_msat,
                fee_base_msat=self.terms.fee_base_msat if self.terms else 0,
                fee_ppm=self.terms.fee_ppm if self.terms else 0,
                validator_fee_msat=config.validator_fee_msat if validators else 0,
                validator_count=validators,
            )
        except CodecError:
            return 0
        return split.provider_share_msat // shards

    async def discover(
        self,
        count: int,
        *,
        task: str,
        config: RoundConfig,
        validators: list[str],
        since: int | None = None,
    ) -> list[str]:
        """``count`` providers for ``task`` from their capability events (protocol.md §1a): for this
        escrow, running the task's reference code, on ``config.hardware`` when set, asking no more
        per shard than this round pays; never ourselves or a validator of ours."""
        found = await find_providers(
            self.relays,
            task=task,
            escrow=self.escrow,
            count=count,
            max_price_msat_per_shard=self.reward_per_shard_msat(config, shards=count, validators=len(validators)),
            hardware=config.hardware,
            code_sha256=task_code_sha256(task),
            exclude={self.pubkey, *validators},
            since=since,
        )
        self.progress(
            "discovery",
            f"{self.name}: discovered {len(found)} providers for {task}: "
            + ", ".join(
                f"{p.capabilities.name} {p.pubkey[:12]} ({p.capabilities.price_msat_per_shard} msat/shard, "
                f"{p.capabilities.hardware})"
                for p in found
            ),
        )
        return [p.pubkey for p in found]

    async def run_round(
        self,
        *,
        providers: list[str],
        validators: list[str],
        shards: list[ml.Dataset] | None = None,
        test: ml.Dataset | None = None,
        config: RoundConfig = RoundConfig(),
        previous_job: str | None = None,
        start_model: ml.Model | None = None,
        round_no: int = 1,
        task: RoundTask | None = None,
    ) -> RoundReport:
        """One escrowed round. ``task`` says what is trained (default: digits from ``shards``,
        ``test`` and ``start_model``; a :class:`~service.agents.tasks.DiLoCoRun` for DiLoCo)."""
        if task is None:
            if shards is None or test is None:
                raise ValueError("a digits round needs its shards and test set")
            task = DigitsRound(shards, test, start_model, config.max_iter)
        payloads = task.shard_payloads()
        if len(providers) != len(payloads) or not payloads:
            raise ValueError("one shard per provider")
        t0 = time.monotonic()
        timings: dict[str, float] = {}
        if config.validation_in - config.results_in < 90:
            self.progress(
                "warning",
                f"{self.name}: only {config.validation_in - config.results_in} s between the "
                "deadlines: if a result is missing, the escrow asks for scores 60 s after the "
                "results deadline and the validators may have no time left",
            )

        def mark(phase: str, since: list[float] = [t0]) -> None:  # noqa: B006 - the running clock
            now = time.monotonic()
            timings[phase] = round(now - since[0], 3)
            since[0] = now

        # 1. the data (and the starting model), named by their blob URLs; uploaded once the job exists
        n_shards = len(payloads)
        shard_tags = [
            Shard.for_provider(self.key, provider, index, self.blobs.locate(payload).url)
            for index, (provider, payload) in enumerate(zip(providers, payloads, strict=True))
        ]
        params = task.params()
        code = task_code(task_of(dict(params)))  # the code we ask for, by reference
        code_blob = self.blobs.locate(code)
        payloads.append(code)
        params += Requirements(
            code_url=code_blob.url,
            code_sha256=code_blob.sha256,
            hardware=config.hardware,
            max_runtime_s=config.max_runtime_s,
        ).params()
        start_payload = task.start_payload()
        baseline: Baseline | None = None
        if start_payload is not None:
            payloads.append(start_payload)
            blob = self.blobs.locate(payloads[-1])
            params += [("model", blob.url), ("model_sha256", blob.sha256)]
            if config.min_improvement is not None:
                baseline = Baseline(blob.sha256, blob.url, config.min_improvement)

        # 2. the request
        now = int(time.time())
        spec = JobSpec(
            escrow=self.escrow,
            bid_msat=config.bid_msat,
            shards=tuple(shard_tags),
            validation=Validation(task.metric, task.direction, config.threshold, config.quorum),
            payout=PayoutPolicy(config.payout),
            results_deadline=now + config.results_in,
            validation_deadline=now + config.validation_in,
            validators=tuple(validators),
            validator_fee_msat=config.validator_fee_msat if validators else 0,
            mode=Mode(config.mode),
            params=tuple(params),
            providers=tuple(providers),
            refund=config.refund,
            relays=self.relays.urls,
            previous_job=previous_job,
            sealing=Sealing.REQUIRED if config.sealing and validators else Sealing.OPTIONAL,
            baseline=baseline,
        )
        event = sign_event(self.key, *build_job_request(spec, customer=self.pubkey))
        report = RoundReport(
            job_id=event.id,
            round=round_no,
            previous_job=previous_job,
            bid_msat=config.bid_msat,
            validator_fee_msat=spec.validator_fee_msat,
            timings=timings,
            metric=task.metric,
        )
        if self.terms is not None:
            with contextlib.suppress(CodecError):
                split = money_split(
                    config.bid_msat,
                    fee_base_msat=self.terms.fee_base_msat,
                    fee_ppm=self.terms.fee_ppm,
                    validator_fee_msat=spec.validator_fee_msat,
                    validator_count=len(validators),
                )
                report.escrow_fee_msat, report.provider_share_msat = split.fee_msat, split.provider_share_msat
        pay_task: asyncio.Task[Payment] | None = None
        async with self.relays.subscribe(feedback_filter(self.escrow, event.id)) as sub:
            try:
                await self.relays.publish(event)
                self.progress(
                    "request",
                    f"{self.name}: job {event.id[:8]} published: bid {config.bid_msat} msat, "
                    f"{n_shards} shards, {len(validators)} validators, quorum {config.quorum}, "
                    f"payout {config.payout}, threshold {config.threshold}",
                )
                mark("request")
                # 3. the offer, paid
                offer = await self._wait_offer(sub, event.id)
                report.mode = str(offer.mode)
                if offer.amount_msat != config.bid_msat:
                    raise AgentError(f"the offer asks {offer.amount_msat} msat, not the bid {config.bid_msat}")
                decoded = await self.lnd.decode_pay_req(offer.bolt11)
                if decoded.num_msat != config.bid_msat:
                    raise AgentError(f"the offer's invoice is for {decoded.num_msat} msat, not the bid")
                mark("offer")
                for payload in payloads:  # the job is open now: the store takes its data
                    await self.blobs.upload(payload, job=event.id)
                self.progress(
                    "upload",
                    f"{self.name}: uploaded {n_shards} encrypted-URL shard(s), the task's code"
                    f"{' and the starting model' if start_payload is not None else ''}",
                )
                mark("upload")
                self.progress("offer", f"{self.name}: offer {offer.amount_msat} msat ({offer.mode}); paying")
                pay_task = asyncio.create_task(
                    self.lnd.pay(offer.bolt11, fee_limit_msat=config.fee_limit_msat, timeout_seconds=60)
                )
                await self._wait_funded(sub, event.id, pay_task, spec.results_deadline)
                self.progress("funding", f"{self.name}: escrow funded ({offer.mode}); providers may start")
                mark("funding")
                # 4. the verdicts
                verdict = await self._wait_verdict(sub, event.id, spec.validation_deadline)
                mark("training_and_validation")
                if isinstance(verdict, Refunded):
                    report.outcome = f"refunded: {verdict.reason}"
                    self.progress("verdict", f"{self.name}: refunded ({verdict.reason}), {verdict.amount_msat} msat")
                elif not any(v.accepted for v in verdict.verdicts):
                    await self._aggregate(report, verdict, event, task, sub, config)
                    report.outcome = "rejected: no model accepted"
                    with contextlib.suppress(TimeoutError):
                        refund = await self._wait_refund(sub, event.id)
                        report.outcome = f"refunded: {refund.reason}"
                        self.progress("verdict", f"{self.name}: refunded ({refund.reason}), {refund.amount_msat} msat")
                else:
                    report.outcome = "validated"
                    await self._aggregate(report, verdict, event, task, sub, config)
                    mark("aggregate")
                self._late_keys(report, sub)
            finally:
                if pay_task is not None:
                    await self._settle_payment(report, pay_task)
        report.timings["total"] = round(time.monotonic() - t0, 3)
        return report

    # ---- waiting on the escrow ------------------------------------------------------------
    async def _wait_offer(self, sub: Subscription, job_id: str) -> EscrowOffer:
        def offer(event: Event) -> EscrowOffer | ErrorFeedback | None:
            fb = escrow_feedback(event, self.escrow, job_id)
            return fb if isinstance(fb, (EscrowOffer, ErrorFeedback)) else None

        try:
            fb = await sub.wait_for(offer, 30)
        except TimeoutError:
            raise AgentError("the escrow made no offer within 30 s (is it running, on these relays?)") from None
        if isinstance(fb, ErrorFeedback):
            raise AgentError(f"the escrow refused the request: {fb.reason}: {fb.message}")
        assert isinstance(fb, EscrowOffer)
        return fb

    async def _wait_funded(self, sub: Subscription, job_id: str, pay_task: asyncio.Task, deadline: int) -> None:
        def funded(event: Event) -> Funded | Refunded | None:
            fb = escrow_feedback(event, self.escrow, job_id)
            return fb if isinstance(fb, (Funded, Refunded)) else None

        waiter = asyncio.ensure_future(sub.wait_for(funded, seconds_until(deadline)))
        try:
            done, _ = await asyncio.wait({waiter, pay_task}, return_when=asyncio.FIRST_COMPLETED)
            if waiter not in done:  # the payment ended first: custodial (settled at once) or failed
                exc = pay_task.exception()
                payment = None if exc else pay_task.result()
                if payment is None or payment.status != PaymentStatus.SUCCEEDED:
                    why = exc or (payment.failure_reason.name if payment else "?")
                    raise AgentError(f"paying the offer failed: {why}")
            fb = await waiter
        except TimeoutError:
            raise AgentError("the escrow did not confirm the funding before the results deadline") from None
        finally:
            waiter.cancel()
        if isinstance(fb, Refunded):
            raise AgentError(f"refunded before funding completed: {fb.reason}")

    async def _wait_verdict(self, sub: Subscription, job_id: str, deadline: int) -> ValidationComplete | Refunded:
        try:
            return await wait_validation(sub, self.escrow, job_id, deadline=deadline, margin=180)
        except TimeoutError:
            raise AgentError("no verdict by the validation deadline") from None

    async def _wait_refund(self, sub: Subscription, job_id: str, timeout: float = 60) -> Refunded:
        def refunded(event: Event) -> Refunded | None:
            fb = escrow_feedback(event, self.escrow, job_id)
            return fb if isinstance(fb, Refunded) else None

        return await sub.wait_for(refunded, timeout)

    async def _settle_payment(self, report: RoundReport, pay_task: asyncio.Task) -> None:
        """The funding payment's final state (a hold payment completes on release or refund)."""
        try:
            payment = await asyncio.wait_for(asyncio.shield(pay_task), 60)
        except (TimeoutError, Exception) as exc:  # noqa: BLE001 - reported
            report.payment_status = f"unknown ({type(exc).__name__})"
            return
        report.payment_status = payment.status.name
        if payment.status == PaymentStatus.SUCCEEDED:
            report.routing_fee_msat = payment.fee_msat
            report.paid_msat = payment.value_msat + payment.fee_msat

    # ---- the models' keys ----------------------------------------------------------------------
    def _model_key(self, event: Event, job_id: str) -> ModelKey | None:
        fb = escrow_feedback(event, self.escrow, job_id)
        return fb if isinstance(fb, ModelKey) and fb.customer == self.pubkey else None

    async def _wait_keys(
        self, sub: Subscription, job_id: str, wanted: set[str], timeout: float
    ) -> dict[str, tuple[str, str]]:
        """The escrow's model keys for ``wanted`` results (result id -> (NIP-44 payload, source)):
        from its "model key" events on the relays, then, for any still missing, from its REST API."""
        found: dict[str, str] = {}

        def collect(event: Event) -> bool:
            mk = self._model_key(event, job_id)
            if mk is not None:
                found.setdefault(mk.result_id, mk.payload)
            return wanted <= found.keys()

        if wanted:
            with contextlib.suppress(TimeoutError):
                await sub.wait_for(collect, timeout)
        keys = {rid: (found[rid], "relay") for rid in wanted if rid in found}
        if wanted - keys.keys() and self.escrow_url:
            rest = await self._keys_from_rest(job_id)
            keys.update({rid: (payload, "rest") for rid, payload in rest.items() if rid in wanted and rid not in keys})
        return keys

    async def _keys_from_rest(self, job_id: str) -> dict[str, str]:
        """``GET /v1/jobs/{id}/keys`` with NIP-98 by the customer: the keys the escrow released."""
        url = f"{self.escrow_url}/v1/jobs/{job_id}/keys"
        auth = sign_event(self.key, nip98.KIND_HTTP_AUTH, [["u", url], ["method", "GET"]], "")
        try:
            async with httpx.AsyncClient(timeout=15, trust_env=False) as http:
                r = await http.get(url, headers={"Authorization": nip98.build_header(auth)})
            if r.status_code != 200:
                return {}
            body = r.json()
        except (httpx.HTTPError, ValueError):
            return {}
        out: dict[str, str] = {}  # a list of {"result_id", "payload", …} (docs/api.md)
        for item in body if isinstance(body, list) else []:
            if (
                isinstance(item, dict)
                and isinstance(item.get("result_id"), str)
                and isinstance(item.get("payload"), str)
            ):
                out[item["result_id"]] = item["payload"]
        return out

    def _late_keys(self, report: RoundReport, sub: Subscription) -> None:
        """Record a model key that came after we stopped waiting (or for a model we did not wait for)."""
        for event in sub.events:
            mk = self._model_key(event, report.job_id)
            cand = next((c for c in report.candidates if mk and c.result_id == mk.result_id), None)
            if cand is not None and not cand.key_received:
                cand.key_received, cand.key_source = True, "relay"
                cand.problem = cand.problem or "the key came late: the model was not opened"

    async def _open(self, result: JobResult, payload: str) -> bytes:
        """A sealed model with the key the escrow released (NIP-44 escrow -> us), verified end to end."""
        sealed = result.sealed
        assert sealed is not None
        key = unwrap_key(self.key, self.escrow, payload, sealed.key_sha256)
        ciphertext = await self.blobs.download(
            sealed.url,
            sealed.ciphertext_sha256,
            max_bytes=min(sealed.ciphertext_bytes, self.blobs.max_model_bytes + OVERHEAD),
        )
        return open_sealed(ciphertext, key, sealed)

    # ---- the aggregate -----------------------------------------------------------------------
    async def _aggregate(
        self,
        report: RoundReport,
        verdict: ValidationComplete,
        job_event: Event,
        task: RoundTask,
        sub: Subscription,
        config: RoundConfig,
    ) -> None:
        job = read_job(job_event, self.escrow)
        ids = [v.result_id for v in verdict.verdicts]
        results = {e.id: e for e in await self.relays.query({"ids": ids})} if ids else {}
        # the keys we are owed: the paid sealed models' (an accepted model earning 0 under `best` gets none)
        owed = {
            v.result_id
            for v in verdict.verdicts
            if v.accepted and v.reward_msat != 0 and v.result_id in results and _sealed(results[v.result_id], job)
        }
        keys = await self._wait_keys(sub, job.id, owed, config.key_timeout)
        models: list[Any] = []
        weights: list[float] = []
        for v in verdict.verdicts:
            cand = CandidateReport(
                result_id=v.result_id,
                provider="?",
                shard_index=-1,
                accepted=v.accepted,
                median=None if v.median is None else str(v.median),
                reward_msat=v.reward_msat,
            )
            report.candidates.append(cand)
            event = results.get(v.result_id)
            if event is None:
                cand.problem = "result not found on the relays"
                continue
            try:
                result = parse_result(event, job)
            except CodecError as exc:
                cand.problem = f"unreadable result: {exc}"
                continue
            cand.provider, cand.shard_index = result.provider, result.shard_index
            cand.sealed = result.sealed is not None
            payload, cand.key_source = keys.get(v.result_id, (None, None))
            cand.key_received = payload is not None
            if not v.accepted:
                continue
            try:
                if result.sealed is not None:
                    if payload is None:
                        cand.problem = "no key from the escrow: the model stays sealed"
                        continue
                    data = await self._open(result, payload)
                else:
                    data = await self.blobs.download(
                        result.model_url,
                        result.model_sha256,
                        max_bytes=min(result.model_size, self.blobs.max_model_bytes),
                    )
                model = await asyncio.to_thread(task.load, data, max_bytes=self.blobs.max_model_bytes)
            except (BlobError, SealError, ml.UnsafeData) as exc:
                cand.problem = f"model unusable: {exc}"
                continue
            cand.readable = True
            cand.test_value = await asyncio.to_thread(task.test_score, model)
            if task.metric == "accuracy":
                cand.accuracy = cand.test_value
            models.append(model)
            weights.append(task.shard_weight(result.shard_index))
        accepted = [c for c in report.candidates if c.accepted]
        self.progress(
            "verdict",
            f"{self.name}: validation complete: {len(accepted)} of {len(report.candidates)} "
            f"accepted ("
            + ", ".join(
                f"{c.result_id[:8]} {'ok' if c.accepted else 'rejected'} median {c.median}"
                + (f", key {'received' if c.key_received else 'not released'}" if c.sealed else "")
                for c in report.candidates
            )
            + ")",
        )
        if not models:
            return
        try:
            report.model, report.test_value = await asyncio.to_thread(task.combine, models, weights)
        except ValueError as exc:
            report.outcome = f"validated; not aggregated: {exc}"
            return
        if task.metric == "accuracy":
            report.accuracy = report.test_value
        how = "FedAvg" if task.metric == "accuracy" else "DiLoCo outer step (Nesterov)"
        self.progress(
            "aggregate",
            f"{self.name}: {how} of {len(models)} model(s): {task.metric} {report.test_value:.4f} on its test data",
        )


def _sealed(event: Event, job: JobRequest) -> bool:
    try:
        return parse_result(event, job).sealed is not None
    except CodecError:
        return False
