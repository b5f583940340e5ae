"""The reference provider: trains on the shard a customer assigned to it, publishes the model
sealed, and collects its reward.

For each job request routed to the escrow (kind 5701, ``#p`` = escrow) that holds a private
shard encrypted to this provider's key:

0. apply its :class:`AcceptancePolicy` *before* any work: reward (its announced price per
   shard), threshold, whether every validator is trusted (by default: the escrow's announced
   validator pool), whether the job can be sealed; then :func:`unsupported_task`: the task, the
   code the job asks for (``code_sha256``: the one we run for the task?), the hardware; a
   refused job is reported (``ProviderReport.refused``) and left alone;
1. once the escrow announced "escrow funded", decrypt the shard URL (NIP-44), download the
   shard, check its SHA-256 (the URL is content-addressed) and its shape;
2. if the job names a starting model (``param model`` + ``param model_sha256``, the
   previous round's average), download and check it too, and warm-start from it;
3. train for the job's task (:mod:`service.agents.tasks`: digits, or DiLoCo's inner AdamW
   steps from the round's global model; ``dishonest=True``: skip training and return random
   weights; ``lazy=True``: return the starting model unchanged, the cheat relative acceptance
   exists for);
4. seal the model (protocol.md §5a: a fresh content key, wrapped for the job's validators
   and the escrow, never for the customer), upload only the ciphertext, and publish the
   result (kind 6701) with its ``sealed`` and ``key`` tags (``seal=False``, or a job it may
   not seal, and a policy that allows it: the plain model), and a ``payout lud16`` tag when
   it has a lightning address;
5. wait for the verdict; if accepted, answer "reward claimable" with an invoice and wait
   for "reward paid" (the escrow then gives the customer the content key).

At start (:meth:`Provider.serve`) it publishes its capabilities (kind 31990, protocol.md §1a):
the tasks it runs with the SHA-256 of the code it runs for each (:func:`tasks.task_code`), its
hardware, the largest model it handles and its price (``min_reward_per_shard_msat``), for this
escrow, so that customers can discover it. Training stops at the job's ``max_runtime_s``: no
result is published then, and the report says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TypeVar

from service.lightning.client import LndClient
from service.nostr.nip01 import Event, SecretKey, sign_event
from service.nostr.protocol import (
    KIND_JOB_REQUEST,
    Capabilities,
    CodecError,
    Direction,
    EscrowTerms,
    Funded,
    JobRequest,
    ModelRef,
    PayoutAddress,
    Refunded,
    SealedModel,
    Sealing,
    TaskOffer,
    build_capabilities,
    build_result,
    decrypt_shard,
    money_split,
    seal,
    sealed_model,
)

from . import ml
from .common import (
    AgentError,
    Payee,
    Progress,
    Reward,
    escrow_announcement,
    escrow_feedback,
    feedback_filter,
    no_progress,
    read_job,
    seconds_until,
    wait_validation,
)
from .relay import RelayError, Relays, Subscription
from .storage import Blobs, sha256_from_url
from .tasks import (
    DIGITS,
    DILOCO,
    TaskError,
    inner_steps_of,
    lm_available,
    lm_config_of,
    requirements_of,
    task_code_sha256,
    task_of,
)

T = TypeVar("T")


def default_hardware() -> str:
    """What the reference provider announces as its hardware: ``cpu:<cores>``."""
    return f"cpu:{os.cpu_count() or 1}"


def runnable_code() -> dict[str, str]:
    """The tasks this installation runs -> the SHA-256 of the code it runs for each (DiLoCo only
    with the ``lm`` extra)."""
    tasks = [DIGITS, *([DILOCO] if lm_available() else [])]
    return {task: task_code_sha256(task) for task in tasks}


class RuntimeExceeded(AgentError):
    """Training ran past the job's ``max_runtime_s``."""


async def within_runtime(limit_s: int | None, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
    """``fn(*args, **kwargs)`` in a worker thread, given up after ``limit_s`` seconds (None: no
    limit). The thread cannot be interrupted: past the limit its result is dropped, never used."""
    if limit_s is None:
        return await asyncio.to_thread(fn, *args, **kwargs)
    try:
        async with asyncio.timeout(limit_s):
            return await asyncio.to_thread(fn, *args, **kwargs)
    except TimeoutError:
        raise RuntimeExceeded(f"training ran past the job's max_runtime_s ({limit_s} s): no result") from None


@dataclass(frozen=True)
class AcceptancePolicy:
    """Which jobs a provider takes, decided from the request alone, before it trains.

    ``trusted_validators`` None: the escrow's announced validator pool (its kind-31990
    announcement on the relays; protocol.md §1). Every validator a job names must be trusted:
    under sealing the validators are the ones who read the model before the customer pays.
    ``require_sealing``: refuse a job whose result cannot be sealed (the customer validates,
    so it would score, i.e. read, the model without paying for it).
    """

    min_reward_per_shard_msat: int = 0
    max_threshold: Decimal | None = None  # direction max: refuse a threshold above this
    min_threshold: Decimal | None = None  # direction min: refuse a threshold below this
    trusted_validators: frozenset[str] | None = None
    require_sealing: bool = True

    def refusal(self, job: JobRequest, *, pool: frozenset[str] | None, terms: EscrowTerms | None) -> str | None:
        """Why this provider does not take ``job`` (one short sentence), or None.

        ``pool``: the escrow's announced pool (None: no announcement found); ``terms``: its
        announced terms, for the escrow fee (without them the fee is taken as 0, an upper bound
        of what a provider can earn)."""
        spec = job.spec
        if self.require_sealing and job.customer_validates:
            return "the customer validates: the result could not be sealed"
        v = spec.validation
        if v.direction is Direction.MAX and self.max_threshold is not None and v.threshold > self.max_threshold:
            return f"threshold {v.threshold} is above our maximum {self.max_threshold}"
        if v.direction is Direction.MIN and self.min_threshold is not None and v.threshold < self.min_threshold:
            return f"threshold {v.threshold} is below our minimum {self.min_threshold}"
        trusted = self.trusted_validators if self.trusted_validators is not None else pool
        if trusted is None:
            return "no validator pool known for this escrow (no announcement on the relays)"
        untrusted = [pk for pk in spec.validators if pk not in trusted]
        if untrusted:
            source = "our trusted validators" if self.trusted_validators is not None else "the escrow's validator pool"
            return f"{len(untrusted)} validator(s) not in {source}: {', '.join(pk[:12] for pk in untrusted)}"
        per_shard = reward_per_shard_msat(job, terms)
        if per_shard < self.min_reward_per_shard_msat:
            return f"reward per shard {per_shard} msat is below our minimum {self.min_reward_per_shard_msat}"
        return None


def reward_per_shard_msat(job: JobRequest, terms: EscrowTerms | None) -> int:
    """The provider share divided by the job's shards: what one shard's model earns under ``split``
    when every shard's model is accepted (under ``best`` the whole share goes to one model, so this is
    its expected value among equals). 0 when the fees leave nothing."""
    spec = job.spec
    try:
        split = money_split(
            spec.bid_msat,
            fee_base_msat=terms.fee_base_msat if terms else 0,
            fee_ppm=terms.fee_ppm if terms else 0,
            validator_fee_msat=spec.validator_fee_msat,
            validator_count=len(spec.validators),
        )
    except CodecError:
        return 0
    return split.provider_share_msat // len(spec.shards)


@dataclass
class ProviderReport:
    job_id: str
    shard_index: int | None = None
    samples: int = 0
    result_id: str | None = None
    model_sha256: str | None = None  # the model's (plaintext's), sealed or not
    sealed: bool = False
    refused: str | None = None  # why the acceptance policy refused the job (nothing was done)
    dishonest: bool = False
    lazy: bool = False
    accepted: bool | None = None
    median: str | None = None
    reward: Reward | None = None
    train_seconds: float = 0.0
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)


class Provider(Payee):
    role = "provider"

    def __init__(
        self,
        key: SecretKey,
        relays: Relays,
        escrow: str,
        blobs: Blobs,
        *,
        lnd: LndClient | None = None,
        lud16: str | None = None,
        name: str = "provider",
        dishonest: bool = False,
        lazy: bool = False,
        policy: AcceptancePolicy | None = None,
        seal: bool = True,
        max_iter: int = 10,
        C: float = 1.0,
        progress: Progress = no_progress,
        invoice_expiry: int = 3600,
        allow_private_lnurl: bool = False,
        network: str | None = None,
        hardware: str | None = None,
        code: Mapping[str, str] | None = None,
    ) -> None:
        """``hardware``: what we announce and accept jobs for (default :func:`default_hardware`);
        ``code``: task -> SHA-256 of the code we run for it (default :func:`runnable_code`)."""
        if lnd is None and not lud16:
            raise ValueError("a provider needs an LND node or a lud16 address to be paid")
        self.key, self.relays, self.escrow, self.blobs = key, relays, escrow, blobs
        self.lnd, self.lud16, self.name, self.dishonest, self.lazy = lnd, lud16, name, dishonest, lazy
        self.policy = policy or AcceptancePolicy()
        self.seal = seal
        self.max_iter, self.C, self.progress = max_iter, C, progress
        self.invoice_expiry, self.allow_private_lnurl, self.network = invoice_expiry, allow_private_lnurl, network
        self.hardware = hardware or default_hardware()
        self.code = dict(runnable_code() if code is None else code)
        self.reports: dict[str, asyncio.Future[ProviderReport]] = {}
        self._tasks: set[asyncio.Task] = set()
        build_capabilities(self.capabilities())  # an unannounceable provider (e.g. hardware text) fails here

    @property
    def pubkey(self) -> str:
        return self.key.public_key_hex

    def capabilities(self) -> Capabilities:
        """What we announce (protocol.md §1a): our tasks and code, hardware, model size and price."""
        return Capabilities(
            name=self.name,
            tasks=tuple(TaskOffer(task, sha) for task, sha in sorted(self.code.items())),
            hardware=self.hardware,
            max_model_bytes=self.blobs.max_model_bytes,
            price_msat_per_shard=self.policy.min_reward_per_shard_msat,
            escrows=(self.escrow,),
        )

    async def publish_capabilities(self) -> Event:
        """Publish (replace) our capability event on the relays."""
        caps = self.capabilities()
        event = sign_event(self.key, *build_capabilities(caps))
        await self.relays.publish(event)
        self.progress(
            "setup",
            f"{self.name}: announced {', '.join(t.task for t in caps.tasks)} on {caps.hardware}, "
            f"{caps.price_msat_per_shard} msat per shard",
        )
        return event

    def my_shard(self, job: JobRequest) -> int | None:
        for shard in job.spec.shards:
            if shard.encrypted and shard.provider == self.pubkey:
                return shard.index
        return None

    # ---- the loop ----------------------------------------------------------------------
    async def serve(
        self, *, jobs: int | None = None, since: int | None = None, announce: bool = True
    ) -> list[ProviderReport]:
        """Handle every job naming this provider (after ``since``); return after ``jobs`` of them.
        ``announce``: publish our capabilities first (False: the caller already did)."""
        since = int(time.time()) - 60 if since is None else since
        if announce:
            try:
                await self.publish_capabilities()
            except RelayError as exc:  # customers who know our key can still use us
                self.progress("warning", f"{self.name}: capabilities not published: {exc}")
        started: list[asyncio.Future[ProviderReport]] = []
        flt = {"kinds": [KIND_JOB_REQUEST], "#p": [self.escrow], "since": since}
        async with self.relays.subscribe(flt) as sub:
            try:
                async for event in sub:
                    if self.accepts(event):
                        started.append(self.start(event))
                        if jobs is not None and len(started) >= jobs:
                            return list(await asyncio.gather(*started))
            finally:
                if jobs is None:
                    await self.close()
        return []

    async def report_for(self, job_id: str, timeout: float) -> ProviderReport:
        """This provider's report on ``job_id`` (once it has seen the job and finished it)."""
        async with asyncio.timeout(timeout):
            while job_id not in self.reports:
                await asyncio.sleep(0.1)
            return await asyncio.shield(self.reports[job_id])

    def accepts(self, event: Event) -> bool:
        if event.id in self.reports:
            return False
        try:
            job = read_job(event, self.escrow)
        except CodecError:
            return False
        return self.my_shard(job) is not None and job.spec.results_deadline > time.time()

    def start(self, event: Event) -> asyncio.Future[ProviderReport]:
        """Handle ``event`` in the background; the future resolves to this job's report."""
        if event.id not in self.reports:
            self.reports[event.id] = asyncio.get_running_loop().create_future()
            task = asyncio.create_task(self._handle_into(event), name=f"{self.name} {event.id[:8]}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return self.reports[event.id]

    async def _handle_into(self, event: Event) -> None:
        fut = self.reports[event.id]
        try:
            report = await self.handle(event)
        except Exception as exc:  # noqa: BLE001 - reported, never lost
            report = ProviderReport(job_id=event.id, error=f"{type(exc).__name__}: {exc}")
            self.progress("error", f"{self.name}: {report.error}")
        if not fut.done():
            fut.set_result(report)

    # ---- one job ------------------------------------------------------------------------
    async def handle(self, event: Event) -> ProviderReport:
        job = read_job(event, self.escrow)
        index = self.my_shard(job)
        if index is None:
            raise AgentError("this job has no shard for us")
        report = ProviderReport(job_id=job.id, shard_index=index, dishonest=self.dishonest, lazy=self.lazy)
        announcement = await escrow_announcement(self.relays, self.escrow)
        pool = None if announcement is None else frozenset(v.pubkey for v in announcement.validator_pool)
        terms = None if announcement is None else announcement.terms
        report.refused = self.policy.refusal(job, pool=pool, terms=terms) or unsupported_task(
            job, code=self.code, hardware=self.hardware, max_model_bytes=self.blobs.max_model_bytes
        )
        if report.refused is not None:
            self.progress("refused", f"{self.name}: job {job.id[:8]} refused: {report.refused}")
            return report
        t0 = time.monotonic()
        async with self.relays.subscribe(feedback_filter(self.escrow, job.id)) as sub:
            await self._wait_funded(sub, job)
            report.timings["wait_funded"] = time.monotonic() - t0
            try:
                result = await self._train_and_publish(job, index, report)
            except RuntimeExceeded as exc:
                report.error = str(exc)
                self.progress("training", f"{self.name}: job {job.id[:8]}: {exc}")
                return report
            report.result_id = result.id
            report.timings["train_publish"] = time.monotonic() - t0 - report.timings["wait_funded"]
            verdict = await wait_validation(sub, self.escrow, job.id, deadline=job.spec.validation_deadline, margin=120)
            if isinstance(verdict, Refunded):
                report.accepted = False
                self.progress("verdict", f"{self.name}: job refunded ({verdict.reason}), nothing earned")
                return report
            mine = next((v for v in verdict.verdicts if v.result_id == result.id), None)
            report.accepted = bool(mine and mine.accepted)
            report.median = None if mine is None or mine.median is None else str(mine.median)
            if not report.accepted or (mine and mine.reward_msat == 0):
                self.progress("verdict", f"{self.name}: result rejected (median {report.median or 'n/a'})")
                return report
            self.progress("verdict", f"{self.name}: result accepted (median {report.median})")
            report.reward = await self.collect_reward(sub, job.id, timeout=120)
            report.timings["total"] = time.monotonic() - t0
            return report

    async def _wait_funded(self, sub: Subscription, job: JobRequest) -> None:
        def funded(event: Event) -> Funded | Refunded | None:
            fb = escrow_feedback(event, self.escrow, job.id)
            return fb if isinstance(fb, (Funded, Refunded)) else None

        try:
            fb = await sub.wait_for(funded, seconds_until(job.spec.results_deadline))
        except TimeoutError:
            raise AgentError("the job was not funded before its results deadline") from None
        if not isinstance(fb, Funded):
            raise AgentError("the job was refunded before we started")
        self.progress("training", f"{self.name}: job {job.id[:8]} funded ({fb.amount_msat} msat held)")

    async def _fetch_start_model(self, job: JobRequest) -> ml.Model | None:
        params = dict(job.spec.params)
        url, sha = params.get("model"), params.get("model_sha256")
        if not url or not sha:
            return None
        data = await self.blobs.download(url, sha, max_bytes=self.blobs.max_model_bytes)
        return ml.model_from_bytes(data, max_bytes=self.blobs.max_model_bytes)

    async def _train_and_publish(self, job: JobRequest, index: int, report: ProviderReport) -> Event:
        shard = job.shard(index)
        assert shard is not None and shard.payload is not None
        url = decrypt_shard(self.key, job.customer, shard.payload)
        sha = sha256_from_url(url)
        if sha is None:
            raise AgentError("the shard URL is not content-addressed (no /<sha256>): cannot verify it")
        params = dict(job.spec.params)
        if task_of(params) == DILOCO:
            model_bytes = await self._train_lm(job, index, report, url, sha, params)
        else:
            model_bytes = await self._train_digits(job, index, report, url, sha, params)
        ref = await self._upload(job, model_bytes)
        report.sealed = isinstance(ref, SealedModel)
        report.model_sha256 = ref.sha256
        payout = PayoutAddress("lud16", self.lud16) if self.lud16 and self.lnd is None else None
        ev = sign_event(self.key, *build_result(job, shard_index=index, model=ref, payout_address=payout))
        await self.relays.publish(ev)
        self.progress(
            "result",
            f"{self.name}: published result {ev.id[:8]} (model {ref.sha256[:8]}, {ref.size_bytes} B"
            f"{', sealed for ' + str(len(job.spec.validators)) + ' validator(s) and the escrow' if report.sealed else ''})",
        )
        return ev

    async def _train_digits(
        self, job: JobRequest, index: int, report: ProviderReport, url: str, sha: str, params: dict[str, str]
    ) -> bytes:
        data = ml.dataset_from_bytes(await self.blobs.download(url, sha, max_bytes=ml.MAX_SHARD_BYTES))
        report.samples = len(data)
        max_iter = _int_param(params, "max_iter", self.max_iter, 1, 10_000)
        limit = requirements_of(params).max_runtime_s
        t = time.monotonic()
        start = await self._fetch_start_model(job)
        if self.dishonest:
            model = ml.random_model()
            self.progress("training", f"{self.name}: (dishonest) skipped training, random weights for shard {index}")
        elif self.lazy and start is not None:
            model = start
            self.progress("training", f"{self.name}: (lazy) returned the starting model unchanged for shard {index}")
        else:
            model = await within_runtime(limit, ml.train, data, start=start, max_iter=max_iter, C=self.C)
            local = ml.accuracy(model, data)
            self.progress(
                "training",
                f"{self.name}: trained on shard {index} ({len(data)} samples"
                f"{', warm start' if start else ''}) in {time.monotonic() - t:.2f} s, "
                f"train accuracy {local:.3f}",
            )
        report.train_seconds = time.monotonic() - t
        return ml.model_to_bytes(model)

    async def _train_lm(
        self, job: JobRequest, index: int, report: ProviderReport, url: str, sha: str, params: dict[str, str]
    ) -> bytes:
        """DiLoCo's inner loop: H AdamW steps on our text shard from the round's global model."""
        from . import lm

        config, steps = lm_config_of(params), inner_steps_of(params)
        text = lm.text_from_bytes(await self.blobs.download(url, sha, max_bytes=lm.MAX_SHARD_BYTES), config=config)
        report.samples = len(text)
        start_url, start_sha = params.get("model"), params.get("model_sha256")
        if not start_url or not start_sha:
            raise AgentError("a DiLoCo round names its global model (param model, model_sha256)")
        start_bytes = await self.blobs.download(start_url, start_sha, max_bytes=self.blobs.max_model_bytes)
        start = await asyncio.to_thread(
            lm.model_from_bytes, start_bytes, config=config, max_bytes=self.blobs.max_model_bytes
        )
        t = time.monotonic()
        if self.lazy:
            self.progress("training", f"{self.name}: (lazy) returned the global model unchanged for shard {index}")
            report.train_seconds = time.monotonic() - t
            return start_bytes
        if self.dishonest:
            params_out = await asyncio.to_thread(lm.init_params, config, int(job.id[:8], 16))
            self.progress("training", f"{self.name}: (dishonest) skipped training, random weights for shard {index}")
        else:
            seed = int(job.id[:8], 16) ^ index  # reproducible per job and shard
            params_out, loss = await within_runtime(
                requirements_of(params).max_runtime_s,
                lm.train_inner,
                start,
                text,
                config=config,
                steps=steps,
                seed=seed,
            )
            self.progress(
                "training",
                f"{self.name}: {steps} inner AdamW steps on shard {index} ({len(text)} bytes) in "
                f"{time.monotonic() - t:.2f} s, last batch loss {loss:.3f}",
            )
        report.train_seconds = time.monotonic() - t
        return await asyncio.to_thread(lm.model_to_bytes, params_out, config)

    def _seals(self, job: JobRequest) -> bool:
        """Whether this job's result is sealed: always when the job requires it; else when we seal and
        the job has named validators (a sealed result needs them: protocol.md §5a)."""
        return job.spec.sealing is Sealing.REQUIRED or (self.seal and not job.customer_validates)

    async def _upload(self, job: JobRequest, model: bytes) -> ModelRef | SealedModel:
        """Upload the model for ``job``: only its ciphertext when sealed (the store admits it for the job)."""
        if not self._seals(job):
            blob = await self.blobs.upload(model, job=job.id)
            return ModelRef(blob.url, blob.sha256, blob.size)
        sealed = seal(model)
        blob = await self.blobs.upload(sealed.ciphertext, job=job.id)
        return sealed_model(self.key, sealed, url=blob.url, recipients=(*job.spec.validators, self.escrow))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def unsupported_task(
    job: JobRequest, *, code: Mapping[str, str], hardware: str, max_model_bytes: int | None = None
) -> str | None:
    """Why we cannot run this job as asked (one short sentence), or None: its task is not one of
    ours (``code``: task -> SHA-256 of the code we run for it), its task params are malformed,
    it asks for other code than ours (``code_sha256``) or other hardware than ours (``hardware``),
    or (DiLoCo) its model's parameters alone are larger than ``max_model_bytes``."""
    params = dict(job.spec.params)
    task = task_of(params)
    if task not in code:
        if task == DILOCO and not lm_available():
            return "the DiLoCo task needs the 'lm' extra (pip install 'fedstr-escrow[lm]')"
        return f"task {task!r} is not one we run"
    try:
        wanted = requirements_of(params)
        if task == DILOCO:
            config, _ = lm_config_of(params), inner_steps_of(params)
            if max_model_bytes is not None:
                from . import lm

                size = lm.parameter_bytes(config)
                if size > max_model_bytes:
                    return f"the job's model has {size} bytes of parameters, more than our max_model_bytes {max_model_bytes}"
    except TaskError as exc:
        return str(exc)
    if wanted.code_sha256 is not None and wanted.code_sha256 != code[task]:
        return f"the job asks for code {wanted.code_sha256[:12]}, we run {code[task][:12]} for {task}"
    if wanted.hardware is not None and wanted.hardware != hardware:
        return f"the job asks for hardware {wanted.hardware!r}, ours is {hardware!r}"
    return None


def _int_param(params: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    try:
        value = int(params.get(name, default))
    except ValueError:
        return default
    return min(max(value, low), high)
