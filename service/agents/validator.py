"""The reference validator: scores candidate models on its own held-out data and collects its fee.

For each evaluation request (kind 5702) signed by the escrow and naming this validator
(``#p``), before its deadline:

1. fetch the job request and every candidate result from the relays (signatures
   verified); read each result against the job (codec checks: right job, right shard,
   allowed provider) to get its ``model`` (plain) or ``sealed`` tag;
2. a plain model: download it (at most ``Blobs.max_model_bytes``), refusing any bytes
   whose SHA-256 is not the one in the result; a sealed model (protocol.md §5a): unwrap our
   own key envelope (checked against the committed key sha256; in a fallback round, §6b, where
   the provider gave us none, the escrow's ``key`` tag in the request), download the ciphertext
   (its size and SHA-256 checked) and open it (the model's SHA-256 and size checked);
   then load it without pickle and check its shape;
3. score = accuracy on the hold-out (4 decimals), with the model's SHA-256 (that is what
   was judged). A sealed model that does not open (wrong key, ciphertext missing or not the
   committed one) is scored ``unreadable`` (which rejects it); a plain model that cannot be
   fetched, and any model that cannot be loaded, scores ``0``; the problem is recorded;
4. publish the scores (kind 6702), sealed to the escrow by default (``seal_scores``: no
   other validator can read, hence copy, them before the decision), then wait for the
   verdict and, when the job pays a validator fee, claim it and wait for "reward paid".
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from decimal import Decimal

import httpx

from service.lightning.client import LndClient
from service.nostr.nip01 import Event, EventError, SecretKey, sign_event, verify_event
from service.nostr.protocol import (
    BASELINE,
    KIND_EVALUATION_REQUEST,
    CodecError,
    Direction,
    EvaluationRequest,
    JobRequest,
    JobResult,
    Refunded,
    Score,
    SealError,
    build_evaluation_result,
    open_sealed,
    parse_evaluation_request,
    parse_result,
    unwrap_key,
)
from service.nostr.protocol.sealing import OVERHEAD

from . import ml
from .common import (
    AgentError,
    Payee,
    Progress,
    Reward,
    feedback_filter,
    no_progress,
    read_job,
    wait_validation,
)
from .relay import Relays
from .storage import BlobError, Blobs
from .tasks import DILOCO, TaskError, lm_config_of, task_of


@dataclass
class ValidatorReport:
    job_id: str
    request_id: str | None = None
    evaluation_id: str | None = None
    scores: dict[str, str] = field(default_factory=dict)  # result id -> score ("unreadable" for a sealed
    # model that did not open)
    problems: dict[str, str] = field(default_factory=dict)  # result id -> why it scored 0 or unreadable
    reward: Reward | None = None
    error: str | None = None
    eval_seconds: float = 0.0


class Validator(Payee):
    role = "validator"

    def __init__(
        self,
        key: SecretKey,
        relays: Relays,
        escrow: str,
        blobs: Blobs,
        holdout: ml.Dataset,
        *,
        lnd: LndClient | None = None,
        lud16: str | None = None,
        name: str = "validator",
        progress: Progress = no_progress,
        invoice_expiry: int = 3600,
        allow_private_lnurl: bool = False,
        network: str | None = None,
        escrow_url: str | None = None,
        seal_scores: bool = True,
        text_holdout: bytes | None = None,
    ) -> None:
        if lnd is None and not lud16:
            raise ValueError("a validator needs an LND node or a lud16 address to be paid")
        if len(holdout) == 0:
            raise ValueError("the hold-out set is empty")
        self.key, self.relays, self.escrow, self.blobs, self.holdout = key, relays, escrow, blobs, holdout
        self.lnd, self.lud16, self.name, self.progress = lnd, lud16, name, progress
        self.invoice_expiry, self.allow_private_lnurl, self.network = invoice_expiry, allow_private_lnurl, network
        self.escrow_url = escrow_url.rstrip("/") if escrow_url else None
        self.seal_scores = seal_scores
        self.text_holdout = text_holdout  # the DiLoCo task's held-out text (None: we score digits only)
        self.reports: dict[str, asyncio.Future[ValidatorReport]] = {}  # by job id
        self._tasks: set[asyncio.Task] = set()

    @property
    def pubkey(self) -> str:
        return self.key.public_key_hex

    async def serve(self, *, jobs: int | None = None, since: int | None = None) -> list[ValidatorReport]:
        """Answer every evaluation request naming us (after ``since``); return after ``jobs`` of them."""
        since = int(time.time()) - 60 if since is None else since
        flt = {"kinds": [KIND_EVALUATION_REQUEST], "authors": [self.escrow], "#p": [self.pubkey], "since": since}
        started: list[asyncio.Future[ValidatorReport]] = []
        async with self.relays.subscribe(flt) as sub:
            try:
                async for event in sub:
                    fut = self.start(event)
                    if fut is not None:
                        started.append(fut)
                        if jobs is not None and len(started) >= jobs:
                            return list(await asyncio.gather(*started))
            finally:
                if jobs is None:
                    await self.close()
        return []

    def start(self, event: Event) -> asyncio.Future[ValidatorReport] | None:
        try:
            request = parse_evaluation_request(event)
        except CodecError:
            return None
        if event.pubkey != self.escrow or self.pubkey not in request.validators or request.job_id in self.reports:
            return None
        if request.deadline <= time.time():
            self.progress(
                "skip",
                f"{self.name}: evaluation request for job {request.job_id[:8]} is past its deadline; not scoring",
            )
            return None
        fut: asyncio.Future[ValidatorReport] = asyncio.get_running_loop().create_future()
        self.reports[request.job_id] = fut

        async def run() -> None:
            try:
                report = await self.handle(event.id, request)
            except Exception as exc:  # noqa: BLE001 - reported, never lost
                report = ValidatorReport(
                    job_id=request.job_id, request_id=event.id, error=f"{type(exc).__name__}: {exc}"
                )
                self.progress("error", f"{self.name}: {report.error}")
            if not fut.done():
                fut.set_result(report)

        task = asyncio.create_task(run(), name=f"{self.name} {request.job_id[:8]}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return fut

    async def report_for(self, job_id: str, timeout: float) -> ValidatorReport:
        async with asyncio.timeout(timeout):
            while job_id not in self.reports:
                await asyncio.sleep(0.1)
            return await asyncio.shield(self.reports[job_id])

    async def _score(
        self, result_id: str, events: dict[str, Event], job: JobRequest, request: EvaluationRequest
    ) -> tuple[Score, str | None]:
        event = events.get(result_id)
        if event is None:
            raise AgentError(f"candidate {result_id[:8]} not found on the relays")
        result = parse_result(event, job)
        if result.sealed is not None:
            try:
                data = await self._open(result, request)
            except (SealError, BlobError) as exc:
                return Score(result_id, None, result.model_sha256), f"unreadable: {type(exc).__name__}: {exc}"
        else:
            try:
                data = await self.blobs.download(
                    result.model_url, result.model_sha256, max_bytes=min(result.model_size, self.blobs.max_model_bytes)
                )
            except BlobError as exc:
                return Score(result_id, _worst(job), result.model_sha256), f"{type(exc).__name__}: {exc}"
        return await self._evaluate(result_id, data, result.model_sha256, job)

    async def _evaluate(self, result_id: str, data: bytes, sha256: str, job: JobRequest) -> tuple[Score, str | None]:
        params = dict(job.spec.params)
        try:
            if task_of(params) == DILOCO:
                value = await asyncio.to_thread(self._lm_loss, data, params)
            else:
                value = await asyncio.to_thread(
                    ml.evaluate_bytes, data, self.holdout, max_bytes=self.blobs.max_model_bytes
                )
        except (ml.UnsafeData, TaskError) as exc:  # it is the committed model, but not a usable one
            return Score(result_id, _worst(job), sha256), f"{type(exc).__name__}: {exc}"
        return Score(result_id, Decimal(f"{value:.4f}"), sha256), None

    async def _score_baseline(self, request: EvaluationRequest, job: JobRequest) -> tuple[Score, str | None]:
        """The job's baseline model, scored like a candidate (relative acceptance, protocol.md §6)."""
        assert request.baseline is not None
        sha256, url = request.baseline
        try:
            data = await self.blobs.download(url, sha256, max_bytes=self.blobs.max_model_bytes)
        except BlobError as exc:
            return Score(BASELINE, _worst(job), sha256), f"{type(exc).__name__}: {exc}"
        return await self._evaluate(BASELINE, data, sha256, job)

    def _lm_loss(self, data: bytes, params: dict[str, str]) -> float:
        from . import lm

        if self.text_holdout is None:
            raise TaskError("this validator has no held-out text for the DiLoCo task")
        config = lm_config_of(params)
        tokens = lm.text_from_bytes(self.text_holdout, config=config)
        return lm.evaluate_bytes(data, tokens, config=config, max_bytes=self.blobs.max_model_bytes)

    async def _open(self, result: JobResult, request: EvaluationRequest) -> bytes:
        """A sealed result's model: our envelope unwrapped (the provider's, or in a fallback round the
        escrow's from the request: checked against the same commitment), the ciphertext fetched and
        opened. Raises :class:`SealError` or :class:`BlobError`; neither message names the key."""
        sealed = result.sealed
        assert sealed is not None
        envelope = sealed.key_for(self.pubkey)
        handed = request.key_for(result.id, self.pubkey) if request.round.pooled else None
        if envelope is not None:
            key = unwrap_key(self.key, result.provider, envelope.payload, sealed.key_sha256)
        elif handed is not None:
            key = unwrap_key(self.key, self.escrow, handed.payload, sealed.key_sha256)
        else:
            raise SealError("wrong_key", "neither the result nor the request has a key for this validator")
        ciphertext = await self.blobs.download(
            sealed.url,
            sealed.ciphertext_sha256,
            max_bytes=min(sealed.ciphertext_bytes, self.blobs.max_model_bytes + OVERHEAD),
        )
        return open_sealed(ciphertext, key, sealed)

    async def _from_escrow(self, job_id: str) -> dict[str, Event]:
        """The job's signed request and results from the escrow's API; each signature is checked."""
        try:
            async with httpx.AsyncClient(timeout=15) as c:
                r = await c.get(f"{self.escrow_url}/v1/jobs/{job_id}/events")
            if r.status_code != 200:
                return {}
            body = r.json()
            raw = [body["request"], *body["results"]]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return {}
        out = {}
        for obj in raw:
            try:
                event = verify_event(obj, now=int(time.time()))
            except (EventError, TypeError):
                continue
            out[event.id] = event
        return out

    async def handle(self, request_id: str, request: EvaluationRequest) -> ValidatorReport:
        report = ValidatorReport(job_id=request.job_id, request_id=request_id)
        ids = [c.result_id for c in request.candidates]
        found = {e.id: e for e in await self.relays.query({"ids": [request.job_id, *ids]})}
        if self.escrow_url and not {request.job_id, *ids} <= found.keys():
            # Relays drop events (NIP-40 expiration, retention): the escrow keeps what it counted.
            found = {**await self._from_escrow(request.job_id), **found}
        job_event = found.get(request.job_id)
        if job_event is None:
            raise AgentError("the job request is neither on the relays nor at the escrow")
        job = read_job(job_event, self.escrow)
        if self.pubkey not in job.validators and not request.round.pooled:
            raise AgentError("the job does not name us as a validator")  # (a fallback round's come from the pool)
        t = time.monotonic()
        scores: list[Score] = []
        for rid in ids:
            try:
                score, problem = await self._score(rid, found, job, request)
            except (AgentError, CodecError) as exc:
                report.problems[rid] = str(exc)  # not a result of this job: nothing to score
                continue
            scores.append(score)
            report.scores[rid] = "unreadable" if score.value is None else str(score.value)
            if problem:
                report.problems[rid] = problem
        if request.baseline is not None:
            score, problem = await self._score_baseline(request, job)
            scores.append(score)
            report.scores[BASELINE] = "unreadable" if score.value is None else str(score.value)
            if problem:
                report.problems[BASELINE] = problem
        report.eval_seconds = time.monotonic() - t
        if not any(x.result_id != BASELINE for x in scores):
            raise AgentError("no candidate could be read")
        ev = sign_event(
            self.key,
            *build_evaluation_result(
                request_id=request_id,
                job_id=job.id,
                escrow=self.escrow,
                scores=tuple(scores),
                seal_with=self.key if self.seal_scores else None,
            ),
        )
        report.evaluation_id = ev.id
        async with self.relays.subscribe(feedback_filter(self.escrow, job.id)) as sub:
            await self.relays.publish(ev)
            self.progress(
                "scores",
                f"{self.name}: scored {len(scores)} model(s) on {len(self.holdout)} held-out samples"
                f"{' (sealed to the escrow)' if self.seal_scores else ''}: "
                + ", ".join(f"{r[:8]}={v}" for r, v in report.scores.items()),
            )
            verdict = await wait_validation(sub, self.escrow, job.id, deadline=request.deadline, margin=120)
            if isinstance(verdict, Refunded):
                report.reward = Reward(job_id=job.id, why=f"the job was refunded ({verdict.reason})")
                return report
            if job.spec.validator_fee_msat == 0:
                report.reward = Reward(job_id=job.id, why="the job pays no validator fee")
                return report
            report.reward = await self.collect_reward(sub, job.id, timeout=120)
        return report

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _worst(job: JobRequest) -> Decimal | None:
    """The score of a model we cannot use: accuracy 0 for a ``max`` metric; for a ``min`` one
    (a loss) no number is the worst, so ``unreadable``, which the escrow ranks worst."""
    return Decimal("0.0000") if job.spec.validation.direction is Direction.MAX else None
