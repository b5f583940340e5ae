"""The public API (``/v1``): for customers and payees who prefer HTTP to relays.

A submitted event goes through exactly the same intake as one from a relay: strict
NIP-01 verification, the inbox (stored once by id), then the engine.
"""

from __future__ import annotations

import re
import time

from fastapi import APIRouter, Body, Path, Query, Request
from pydantic import BaseModel, Field
from sqlalchemy import select

from service import __version__
from service.api import queries
from service.api.errors import ApiError, responses
from service.api.limits import client_address
from service.escrow.models import Job
from service.lightning.models import LnInvoice
from service.nostr import nip98
from service.nostr.kinds import INTAKE_KINDS
from service.nostr.nip01 import EventError, verify_event
from service.nostr.nip19 import encode_npub
from service.nostr.protocol import KIND_JOB_REQUEST
from service.payouts import AcceptReason, CheckReason, InvoiceRefused, InvoiceSource
from service.payouts import store as payouts

router = APIRouter(prefix="/v1", tags=["public"])
HEX64 = r"^[0-9a-f]{64}$"
_BOLT11 = re.compile(r"^(lightning:)?ln[a-z0-9]{1,20}1[02-9ac-hj-np-z]{50,7089}$")


class TermsOut(BaseModel):
    fee_base_msat: int
    fee_ppm: int
    min_bid_msat: int
    max_bid_msat: int
    max_validators: int
    max_shards: int
    modes: list[str]
    max_hold_seconds: int
    min_payout_msat: int = Field(description="every payout is at least this, in whole satoshis")
    max_results_per_shard: int = Field(description="results per shard that become candidates (first received)")
    routing_fee_ppm: int = Field(
        description="the most a payout's route may cost, in ppm of the payout; a "
        "refund's route is paid from the refunded amount"
    )
    claim_window_s: int = Field(
        description="seconds a payout waiting for its payee's invoice may be claimed, from its creation; "
        "then it expires (0: no window)"
    )
    appeal_window_s: int = Field(
        description="seconds after validation is complete in which the customer or a rejected provider may "
        "appeal, before money moves (0: no appeals)"
    )
    appeal_fee_msat: int = Field(description="the appeal fee, in whole satoshis; refunded if the appeal wins")


class PoolValidatorOut(BaseModel):
    pubkey: str
    name: str


class InfoOut(BaseModel):
    pubkey: str
    npub: str
    network: str
    relays: list[str]
    version: str
    kinds: list[int]
    terms: TermsOut
    validator_pool: list[PoolValidatorOut] = Field(
        default_factory=list,
        description="validators the operator vouches for (FEDSTR_VALIDATOR_POOL; announced, protocol.md §1)",
    )


class OfferInvoiceOut(BaseModel):
    payment_hash: str
    payment_request: str
    amount_msat: int
    mode: str
    expires_at: int


class OfferOut(BaseModel):
    state: str = Field(description="the job's state (offered once the invoice exists; rejected with the reason)")
    reject_reason: str | None
    invoice: OfferInvoiceOut | None


class SubmittedOut(BaseModel):
    id: str
    new: bool = Field(description="false when the event was already known (from a relay or an earlier submission)")
    job: OfferOut | None = Field(
        None,
        description="with ?wait= on a job request: the offer (or the refusal), "
        "when the escrow made it within the wait; otherwise null",
    )


class InvoiceOut(BaseModel):
    payment_hash: str
    job_id: str | None
    mode: str
    state: str
    amount_msat: int
    amount_paid_msat: int
    payment_request: str
    expires_at: int


class PayoutInvoiceIn(BaseModel):
    bolt11: str = Field(min_length=10, max_length=7200)


# An invoice refused as an invoice (its CheckReason code) is 422; these are about the payout.
_REFUSAL_STATUS: dict[AcceptReason | CheckReason, int] = {
    AcceptReason.NO_PAYOUT: 404,
    AcceptReason.NOT_WAITING: 409,
    AcceptReason.CONFLICT: 409,
    AcceptReason.CLAIM_EXPIRED: 409,  # its claim window ended: only an operator's reopen brings it back
}


class PayoutInvoiceOut(BaseModel):
    payout_id: str
    state: str
    amount_msat: int


def _client(request: Request) -> str:
    return client_address(request)


@router.get("/info", response_model=InfoOut)
async def info(request: Request) -> InfoOut:
    """The escrow's Nostr identity, network, relays and terms."""
    st = request.app.state
    t = st.escrow.terms
    return InfoOut(
        pubkey=st.escrow.key.public_key_hex,
        npub=encode_npub(st.escrow.key.public_key_hex),
        network=st.settings.network,
        relays=st.settings.relays,
        version=__version__,
        kinds=list(INTAKE_KINDS),
        terms=TermsOut(
            fee_base_msat=t.fee_base_msat,
            fee_ppm=t.fee_ppm,
            min_bid_msat=t.min_bid_msat,
            max_bid_msat=t.max_bid_msat,
            max_validators=t.max_validators,
            max_shards=t.max_shards,
            modes=sorted(str(m) for m in t.modes),
            max_hold_seconds=t.max_hold_seconds,
            min_payout_msat=t.min_payout_msat,
            max_results_per_shard=t.max_results_per_shard,
            routing_fee_ppm=t.routing_fee_ppm,
            claim_window_s=t.claim_window_s,
            appeal_window_s=t.appeal_window_s,
            appeal_fee_msat=t.appeal_fee_msat,
        ),
        validator_pool=[PoolValidatorOut(pubkey=v.pubkey, name=v.name) for v in st.escrow.validator_pool],
    )


@router.post("/events", response_model=SubmittedOut, status_code=202, responses=responses(400, 413, 422, 429))
async def submit_event(
    request: Request,
    event: dict = Body(..., description="a signed Nostr event (NIP-01)"),
    wait: float = Query(
        0,
        ge=0,
        le=30,
        description="for a job request: seconds to wait for "
        "the escrow's offer, returned in `job` (its invoice) if made in time",
    ),
) -> SubmittedOut:
    """Submit a job request, result, evaluation result, payee invoice or deletion."""
    st = request.app.state
    st.limits_events.check("ip:" + _client(request))
    try:
        ev = verify_event(event, now=int(time.time()))
    except EventError as e:
        raise ApiError(400, e.reason.value, e.message) from None
    if ev.kind not in INTAKE_KINDS:
        raise ApiError(422, "kind_not_accepted", f"kind {ev.kind} is not one the escrow reads ({list(INTAKE_KINDS)})")
    st.limits_events.check("pubkey:" + ev.pubkey)
    new = await st.escrow.runner.inbox.store(ev, "api")
    st.escrow.loop.wake.set()
    job = None
    if wait and ev.kind == KIND_JOB_REQUEST:
        job = await st.escrow.wait_offer(ev.id, wait, new=new)
    return SubmittedOut(id=ev.id, new=new, job=job)


@router.get("/jobs/{job_id}", responses=responses(404, 422))
async def get_job(request: Request, job_id: str = Path(pattern=HEX64)) -> dict:
    """A job: state, offer invoice, results, scores, decision, payouts and timeline. Errors show as
    reason codes only (a payout's ``last_error`` is e.g. ``blocked_address``); the text is for admins."""
    async with request.app.state.sessions() as s:
        detail = await queries.public_job(s, job_id)
    if detail is None:
        raise ApiError(404, "job_not_found", "no job with this id")
    return detail


class JobEventsOut(BaseModel):
    request: dict = Field(description="the job request, as its customer signed it")
    results: list[dict] = Field(description="the counted results (the candidates), as their providers signed them")


@router.get("/jobs/{job_id}/events", response_model=JobEventsOut, responses=responses(404, 422))
async def get_job_events(request: Request, job_id: str = Path(pattern=HEX64)) -> JobEventsOut:
    """The job's signed request and counted results, for participants whose relays dropped them (a
    NIP-40 expiration, a relay's retention). Each is the original signed event: verify it."""
    async with request.app.state.sessions() as s:
        events = await queries.job_events(s, job_id)
    if events is None:
        raise ApiError(404, "job_not_found", "no job with this id")
    return JobEventsOut(**events)


class ModelKeyOut(BaseModel):
    result_id: str = Field(description="the sealed result's event id")
    provider: str
    model_sha256: str = Field(description="the model's (the plaintext's) sha256")
    ciphertext_url: str
    ciphertext_sha256: str
    key_sha256: str = Field(description="the SHA-256 of the 32-byte content key the result commits to")
    payload: str = Field(
        description="the content key (64 hex) NIP-44 v2-encrypted escrow -> customer: the same "
        "payload as the model key event's ['key', <customer>, <payload>]"
    )


@router.get("/jobs/{job_id}/keys", response_model=list[ModelKeyOut], responses=responses(401, 403, 404, 422, 429))
async def get_job_keys(request: Request, job_id: str = Path(pattern=HEX64)) -> list[ModelKeyOut]:
    """The content keys of the job's sealed results released to its customer (NIP-98 auth: the
    customer's key): one per sealed result whose provider was paid a reward from settled money
    (protocol.md §5a). Empty until then; a rejected result's key, or a refunded job's, never shows."""
    st = request.app.state
    st.limits_invoices.check("ip:" + _client(request))
    url = (st.settings.public_url.rstrip("/") + request.url.path) if st.settings.public_url else str(request.url)
    try:
        auth = await nip98.verify_request(
            st.sessions, request.headers.get("authorization"), method="GET", url=url, body=None, now=int(time.time())
        )
    except nip98.AuthError as e:
        raise ApiError(401, e.reason.value, e.message, headers={"WWW-Authenticate": "Nostr"}) from None
    async with st.sessions() as s:
        customer = await s.scalar(select(Job.customer).where(Job.id == job_id))
        if customer is None:
            raise ApiError(404, "job_not_found", "no job with this id")
        if auth.pubkey != customer:
            raise ApiError(403, "not_the_customer", "only the job's customer may read its keys")
        keys = await queries.released_keys(s, job_id)
    return [ModelKeyOut(**k) for k in keys]


@router.get("/invoices/{payment_hash}", response_model=InvoiceOut, responses=responses(404, 422))
async def get_invoice(request: Request, payment_hash: str = Path(pattern=HEX64)) -> InvoiceOut:
    """The state of an escrow invoice, as confirmed with LND."""
    async with request.app.state.sessions() as s:
        inv = await s.get(LnInvoice, payment_hash)
    if inv is None:
        raise ApiError(404, "invoice_not_found", "no escrow invoice with this payment hash")
    return InvoiceOut(
        payment_hash=inv.payment_hash,
        job_id=inv.job_id,
        mode=inv.mode,
        state=inv.state,
        amount_msat=inv.amount_msat,
        amount_paid_msat=inv.amount_paid_msat,
        payment_request=inv.payment_request,
        expires_at=inv.expires_at,
    )


@router.post(
    "/jobs/{job_id}/payout-invoice",
    response_model=PayoutInvoiceOut,
    status_code=202,
    responses=responses(401, 404, 409, 422, 429),
)
async def submit_payout_invoice(
    request: Request, body: PayoutInvoiceIn, job_id: str = Path(pattern=HEX64)
) -> PayoutInvoiceOut:
    """A payee gives the invoice for its reward (NIP-98 auth: the payee's key). Checked now
    without our node (BOLT11, network, an amount that is exactly a waiting payout's, not expired,
    hash unused: 422 with the reason's code), then in full (our node's
    decoding, expiry window, CLTV, not ours) before payment. `409 claim_expired`: the payout's
    claim window ended (`claim_by`); an operator may reopen it."""
    st = request.app.state
    st.limits_invoices.check("ip:" + _client(request))
    raw = await request.body()
    url = (st.settings.public_url.rstrip("/") + request.url.path) if st.settings.public_url else str(request.url)
    bolt11 = body.bolt11.strip()
    if not _BOLT11.match(bolt11.lower()):
        raise ApiError(422, "invalid_bolt11", "bolt11 must be a BOLT11 payment request")
    # verify_request commits the authorization as spent before any business check below: a
    # request refused with 404, 409 or 429 cannot be replayed once it would pass.
    try:
        auth = await nip98.verify_request(
            st.sessions, request.headers.get("authorization"), method="POST", url=url, body=raw, now=int(time.time())
        )
    except nip98.AuthError as e:
        raise ApiError(401, e.reason.value, e.message, headers={"WWW-Authenticate": "Nostr"}) from None
    st.limits_invoices.check("pubkey:" + auth.pubkey)
    async with st.sessions.begin() as s:
        try:
            p = await payouts.accept_invoice(
                s,
                job_id=job_id,
                payee=auth.pubkey,
                bolt11=bolt11,
                amount_msat=None,
                source=InvoiceSource.REST,
                network=st.settings.network,
            )
        except InvoiceRefused as e:
            # raised inside the transaction: rolled back (the payee is answered here, not on Nostr)
            raise ApiError(_REFUSAL_STATUS.get(e.code, 422), e.code.value, e.message) from None
    return PayoutInvoiceOut(payout_id=p.id, state=p.state.value, amount_msat=p.amount_msat)
