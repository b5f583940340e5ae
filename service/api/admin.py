"""The admin API (``/v1/admin``): bearer token, compared in constant time; every action audited.

:func:`check_bearer` is the one bearer check (admin API and ``/metrics``): an empty token never
matches, and wrong tokens count in the per-address :class:`~service.api.limits.FailureThrottle`
shared with the dashboard's sign-in.
"""

from __future__ import annotations

import csv
import hmac
import io

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field, SecretStr

from service import quarantine
from service.api import actions, queries
from service.api.errors import ApiError, responses
from service.api.limits import client_address
from service.config import token_problem
from service.escrow.machine import JobState
from service.lightning.errors import LndError

HEX64 = r"^[0-9a-f]{64}$"
#: The largest page offset a listing takes: far beyond any table, and within the 64-bit integers a
#: database binds (a bigger one was a 500 from SQLite: schemathesis found it).
MAX_OFFSET = 1_000_000_000


def usable(token: SecretStr | None) -> bytes | None:
    """A configured token as bytes, or None when unset or unusable (then nothing it guards opens)."""
    if token is None or token_problem(token.get_secret_value()) is not None:
        return None
    return token.get_secret_value().encode()


def check_bearer(request: Request, tokens: list[bytes]) -> None:
    """Accept ``Authorization: Bearer <one of tokens>``; 429 for a throttled address, else 401."""
    throttle = request.app.state.admin_failures
    who = client_address(request)
    throttle.check(who)
    header = request.headers.get("authorization")
    scheme, _, given = (header or "").partition(" ")
    given_bytes = given.strip().encode()
    if scheme.lower() == "bearer" and given_bytes and any(hmac.compare_digest(given_bytes, t) for t in tokens):
        return
    if header is not None:  # a credential was offered, and it was wrong
        throttle.failed(who)
    raise ApiError(401, "unauthorized", "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"})


def require_admin(request: Request) -> None:
    token = usable(request.app.state.settings.admin_token)
    if token is None:
        raise ApiError(503, "admin_disabled", "set FEDSTR_ADMIN_TOKEN to enable the admin API")
    check_bearer(request, [token])


router = APIRouter(
    prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_admin)], responses=responses(401, 429, 503)
)


class Reason(BaseModel):
    reason: str = Field(min_length=3, max_length=500, description="why; recorded in the audit log")


class ActionOut(BaseModel):
    target: str
    result: str


class LndHtlc(BaseModel):
    status: str = Field(description="IN_FLIGHT, SUCCEEDED or FAILED")
    attempted_at: str | None = Field(description="when LND sent it (ISO 8601)")
    resolved_at: str | None = Field(description="when it settled or failed; null while in flight")
    expiry_height: int = Field(description="the route's total time lock: from this height our node may time it out")


class ReissueVerdict(BaseModel):
    allowed: bool = Field(description="whether POST .../reissue would be accepted now")
    code: str | None = Field(description="the refusal code it would get (payment_may_still_settle, ...)")
    why: str


class LndPaymentView(BaseModel):
    """LND's view of a payout's open attempt (TrackPaymentV2's first update, GetInfo's height)."""

    payment_hash: str
    status: str | None = Field(None, description="IN_FLIGHT, INITIATED, SUCCEEDED, FAILED; null: unknown to LND")
    failure_reason: str | None = None
    created_at: str | None = None
    block_height: int | None = Field(None, description="our node's block height now")
    htlcs: list[LndHtlc] = []
    on_channel: bool | None = Field(None, description="an HTLC with this hash is on one of our open channels")
    htlcs_on_chain: int | None = Field(
        None, description="outgoing HTLCs of our channels being force-closed, not swept yet (any refuses a reissue)"
    )
    summary: str | None = Field(None, description='one line, e.g. "LND: IN_FLIGHT, 1 HTLC in flight since …"')
    reissue: ReissueVerdict | None = None
    error: str | None = Field(None, description="node_unavailable (…) when our node did not answer")


class PayoutAttemptOut(BaseModel):
    payment_hash: str
    state: str = Field(description="sending, succeeded, failed, unknown, not_initiated, abandoned")
    fee_msat: int | None
    failure: str | None
    created_at: str | None
    updated_at: str | None


class PayoutDetail(BaseModel):
    id: str
    job_id: str | None
    payee: str
    amount_msat: int
    state: str
    destination: str
    attempts: int
    fee_msat: int | None
    payment_hash: str | None
    last_error: str | None
    updated_at: str | None
    attempts_log: list[PayoutAttemptOut] = Field(description="every attempt, oldest first")
    lnd: LndPaymentView | None = Field(
        description="for a payout `unknown` or `sending` past its lease: LND's view of its open attempt"
    )


def _refused(e: actions.ActionRefused) -> ApiError:
    return ApiError(404 if e.code == "not_found" else 409, e.code, e.message)


@router.get("/overview")
async def overview(request: Request) -> dict:
    """Jobs per state, money held and owed, fees, node balances, relays, reconciliation."""
    st = request.app.state
    async with st.sessions() as s:
        out = await queries.overview(s)
    out["node"] = None
    if st.lnd is not None:
        try:
            bal = await st.lnd.channel_balance()
            out["node"] = {"channel_local_msat": bal.local_msat, "channel_remote_msat": bal.remote_msat}
        except LndError as e:
            out["node"] = {"error": type(e).__name__}
    out["relays"] = st.nostr.pool.status() if st.nostr is not None else []
    out["payouts_paused"] = bool(st.lightning and st.lightning.paused)
    out["leader"] = st.leadership.is_leader
    return out


@router.get("/jobs")
async def jobs(
    request: Request,
    state: JobState | None = Query(None, description="only jobs in this state"),
    customer: str | None = Query(None, pattern=HEX64),
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
) -> dict:
    async with request.app.state.sessions() as s:
        items, total = await queries.list_jobs(s, state=state, customer=customer, limit=limit, offset=offset)
    return {"items": items, "total": total, "limit": limit, "offset": offset}


@router.get("/jobs/{job_id}", responses=responses(404, 422))
async def job(request: Request, job_id: str = Path(pattern=HEX64)) -> dict:
    async with request.app.state.sessions() as s:
        detail = await queries.job_detail(s, job_id)
    if detail is None:
        raise ApiError(404, "job_not_found", "no job with this id")
    return detail


@router.post("/jobs/{job_id}/refund", response_model=ActionOut, responses=responses(404, 409, 422))
async def refund(request: Request, body: Reason, job_id: str = Path(pattern=HEX64)) -> ActionOut:
    """Refund a collecting, validating or fallback job by hand (never after a release decision)."""
    st = request.app.state
    try:
        async with st.sessions.begin() as s:
            result = await actions.refund_job(s, st.escrow.engine, job_id, body.reason)
    except actions.ActionRefused as e:
        async with st.sessions.begin() as s:
            await actions.audit(s, "refund_job", job_id, body.reason, f"refused: {e.code}")
        raise _refused(e) from None
    st.escrow.loop.wake.set()
    return ActionOut(target=job_id, result=result)


@router.get("/payouts")
async def payouts(request: Request) -> dict:
    """Payouts that need attention: unknown, failed, or waiting for the payee's invoice; and the
    expired claims (nobody gave an invoice within the claim window; reopen with
    `POST /payouts/{id}/reopen`) with the unclaimed total (`income:unclaimed`)."""
    async with request.app.state.sessions() as s:
        expired, unclaimed_msat = await queries.expired_claims(s)
        return {
            "items": await queries.payouts_needing_attention(s),
            "expired": expired,
            "unclaimed_msat": unclaimed_msat,
        }


@router.get("/payouts/{payout_id}", response_model=PayoutDetail, responses=responses(404, 422))
async def payout(request: Request, payout_id: str = Path(min_length=1, max_length=200)) -> dict:
    """One payout, its attempts, and, when its payment may be stuck (`unknown`, or `sending` past its
    lease), LND's view of its open attempt: status, each HTLC's state, attempt time and expiry
    height, the current block height, and whether a reissue is allowed now (`lnd.reissue`)."""
    st = request.app.state
    async with st.sessions() as s:
        detail = await queries.payout_detail(
            s, payout_id, st.lnd, payment_timeout_seconds=st.settings.payout_timeout_seconds
        )
    if detail is None:
        raise ApiError(404, "payout_not_found", "no payout with this id")
    return detail


@router.post("/payouts/{payout_id}/reissue", response_model=ActionOut, responses=responses(404, 409, 422, 503))
async def reissue(request: Request, body: Reason, payout_id: str = Path(min_length=1, max_length=200)) -> ActionOut:
    """Close the payment LND keeps in flight for an `unknown` payout and ask its payee for a new
    invoice (`reward claimable` with reason `payment_failed`). Allowed only when LND reports the
    payment FAILED, or when every HTLC of it is failed or in flight at least 6 blocks past its
    expiry height, none is on a channel or unresolved on chain, and LND can start no new one (docs/operations.md, *A payment stuck in flight*).
    `409 payment_may_still_settle`, `payment_succeeded`, `payment_not_initiated`,
    `payout_not_unknown`, `payout_being_reconciled`, `no_attempt`, `conflict`: nothing changed;
    `503 node_unavailable`."""
    st = request.app.state
    if st.lnd is None:
        raise ApiError(503, "node_unavailable", "no LND node is configured")
    try:
        async with st.sessions.begin() as s:
            result = await actions.reissue_payout(
                s, st.lnd, payout_id, body.reason, payment_timeout_seconds=st.settings.payout_timeout_seconds
            )
    except actions.ActionRefused as e:
        async with st.sessions.begin() as s:
            await actions.audit(s, "reissue_payout", payout_id, body.reason, f"refused: {e.code}")
        raise _refused(e) from None
    except LndError as e:
        async with st.sessions.begin() as s:
            await actions.audit(
                s, "reissue_payout", payout_id, body.reason, f"refused: node_unavailable ({type(e).__name__})"
            )
        raise ApiError(503, "node_unavailable", f"our node did not answer: {type(e).__name__}") from None
    actions.wake_engine(st)
    return ActionOut(target=payout_id, result=result)


@router.post("/payouts/{payout_id}/retry", response_model=ActionOut, responses=responses(404, 409, 422))
async def retry(request: Request, body: Reason, payout_id: str = Path(min_length=1, max_length=200)) -> ActionOut:
    st = request.app.state
    try:
        async with st.sessions.begin() as s:
            result = await actions.retry_payout(s, payout_id, body.reason)
    except actions.ActionRefused as e:
        async with st.sessions.begin() as s:
            await actions.audit(s, "retry_payout", payout_id, body.reason, f"refused: {e.code}")
        raise _refused(e) from None
    return ActionOut(target=payout_id, result=result)


@router.post("/payouts/{payout_id}/cancel", response_model=ActionOut, responses=responses(404, 409, 422, 503))
async def cancel(request: Request, body: Reason, payout_id: str = Path(min_length=1, max_length=200)) -> ActionOut:
    """Stop a sending payout's payment that has not left our node (LND reports no HTLC of it): its
    worker ends the payment's cancelable stream, LND fails it (`FAILURE_REASON_CANCELED`) and the
    payout is sent again after the retry pause. `409 payment_left` once an HTLC is out (the payment
    then completes or fails as LND decides); `409 payout_not_sending`; `503 node_unavailable`."""
    st = request.app.state
    if st.lnd is None:
        raise ApiError(503, "node_unavailable", "no LND node is configured")
    try:
        async with st.sessions.begin() as s:
            result = await actions.cancel_payout(s, st.lnd, payout_id, body.reason)
    except actions.ActionRefused as e:
        async with st.sessions.begin() as s:
            await actions.audit(s, "cancel_payout", payout_id, body.reason, f"refused: {e.code}")
        raise _refused(e) from None
    except LndError as e:
        async with st.sessions.begin() as s:
            await actions.audit(
                s, "cancel_payout", payout_id, body.reason, f"refused: node_unavailable ({type(e).__name__})"
            )
        raise ApiError(503, "node_unavailable", f"our node did not answer: {type(e).__name__}") from None
    return ActionOut(target=payout_id, result=result)


@router.post("/payouts/{payout_id}/reopen", response_model=ActionOut, responses=responses(404, 409, 422))
async def reopen(request: Request, body: Reason, payout_id: str = Path(min_length=1, max_length=200)) -> ActionOut:
    """Reopen an expired claim (a payout nobody gave an invoice for within its claim window), to
    honour a late claimant: it waits for the payee's invoice again with a fresh window, the money
    goes back from `income:unclaimed` to what the job owes, the payee gets a new reward claimable
    (`["reason", "claim_reopened"]`), and a closed (refunded) job is releasing (refunding) again
    until it is paid. `409 payout_not_expired` for any other payout."""
    st = request.app.state
    try:
        async with st.sessions.begin() as s:
            result = await actions.reopen_payout(s, st.escrow.engine, payout_id, body.reason)
    except actions.ActionRefused as e:
        async with st.sessions.begin() as s:
            await actions.audit(s, "reopen_payout", payout_id, body.reason, f"refused: {e.code}")
        raise _refused(e) from None
    st.escrow.loop.wake.set()
    return ActionOut(target=payout_id, result=result)


def _csv(rows: list[dict], fields: list[str]) -> Response:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return Response(buf.getvalue(), media_type="text/csv")


@router.get("/ledger/accounts", responses={200: {"content": {"text/csv": {}}}})
async def ledger_accounts(
    request: Request,
    prefix: str | None = Query(None, max_length=200),
    format: str = Query("json", pattern="^(json|csv)$"),
):
    async with request.app.state.sessions() as s:
        rows = await queries.accounts(s, prefix=prefix)
    return _csv(rows, ["account", "balance_msat"]) if format == "csv" else {"items": rows}


@router.get("/ledger/postings", responses={200: {"content": {"text/csv": {}}}})
async def ledger_postings(
    request: Request,
    job_id: str | None = Query(None, pattern=HEX64),
    limit: int = Query(500, ge=1, le=5000),
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
    format: str = Query("json", pattern="^(json|csv)$"),
):
    async with request.app.state.sessions() as s:
        rows = await queries.postings(s, job_id=job_id, limit=limit, offset=offset)
    if format == "csv":
        flat = [
            {
                "posting_id": p["id"],
                "key": p["key"],
                "kind": p["kind"],
                "job_id": p["job_id"],
                "created_at": p["created_at"],
                "account": ln["account"],
                "amount_msat": ln["amount_msat"],
            }
            for p in rows
            for ln in p["lines"]
        ]
        return _csv(flat, ["posting_id", "key", "kind", "job_id", "created_at", "account", "amount_msat"])
    return {"items": rows}


@router.get("/reconciliation")
async def reconciliation(request: Request) -> dict:
    async with request.app.state.sessions() as s:
        return {"latest": await queries.latest_reconciliation(s)}


@router.post("/reconciliation/resume", response_model=ActionOut)
async def resume(request: Request, body: Reason) -> ActionOut:
    """Resume payouts paused by a reconciliation alert (after an operator has looked)."""
    async with request.app.state.sessions.begin() as s:
        result = await actions.resume(s, body.reason)
    return ActionOut(target="reconciliation", result=result)


@router.get("/rejected-events")
async def rejected(request: Request, limit: int = Query(100, ge=1, le=1000)) -> dict:
    async with request.app.state.sessions() as s:
        return {"items": await queries.rejected_events(s, limit=limit)}


@router.post("/inbox/{event_id}/replay", response_model=ActionOut, responses=responses(409, 422))
async def replay(request: Request, body: Reason, event_id: str = Path(pattern=HEX64)) -> ActionOut:
    """Process again an event whose handler failed: the same as replaying the quarantined item
    ``inbox/{event_id}`` (`409 not_replayable` when its handler did not fail for good)."""
    st = request.app.state
    try:
        async with st.sessions.begin() as s:
            result = await actions.replay_event(s, event_id, body.reason)
    except actions.ActionRefused as e:
        async with st.sessions.begin() as s:
            await actions.audit(s, "replay_event", event_id, body.reason, f"refused: {e.code}")
        raise _refused(e) from None
    st.escrow.loop.notify_replay("inbox")
    return ActionOut(target=event_id, result=result)


SOURCE = "^(" + "|".join(quarantine.SOURCES) + ")$"


class QuarantinedItem(BaseModel):
    source: str = Field(description="the loop: " + ", ".join(quarantine.SOURCES))
    ref: str = Field(
        description="the item within its loop: event id, job id:deadline, fact seq, payout outcome, "
        "effect id, event id:relay"
    )
    job_id: str | None = Field(description="the job it concerns, when known")
    failures: int
    last_error: str = Field(description="type and message of the last failure (cut short, secrets masked)")
    since: str = Field(description="first failure (ISO 8601)")
    last_failed_at: str
    quarantined_at: str | None
    next_attempt_at: str | None = Field(description="when it is tried again (items still being retried)")


class QuarantineOut(BaseModel):
    items: list[QuarantinedItem]
    total: int = Field(description="items matching, beyond this page too")
    retrying: int = Field(description="items failing but not quarantined yet (retried with backoff)")
    limit: int
    offset: int


@router.get("/quarantine", response_model=QuarantineOut, responses=responses(422))
async def quarantined(
    request: Request,
    source: str | None = Query(None, pattern=SOURCE),
    retrying: bool = Query(False, description="list the items still being retried instead"),
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=MAX_OFFSET),
) -> QuarantineOut:
    """Items a loop gave up on after repeated failures: never retried until replayed."""
    async with request.app.state.sessions() as s:
        items, total = await quarantine.listing(s, source=source, limit=limit, offset=offset, quarantined=not retrying)
        _, still = await quarantine.listing(s, source=source, limit=1, quarantined=False)
    return QuarantineOut(
        items=[QuarantinedItem(**i) for i in items], total=total, retrying=still, limit=limit, offset=offset
    )


@router.post("/quarantine/{source}/{ref:path}/replay", response_model=ActionOut, responses=responses(404, 409, 422))
async def replay_quarantined(
    request: Request, body: Reason, source: str = Path(pattern=SOURCE), ref: str = Path(min_length=1, max_length=400)
) -> ActionOut:
    """Clear an item's quarantine (after fixing its cause): its loop processes it again at once,
    and quarantines it again if it keeps failing. `404 not_found`; `409 not_quarantined` for an
    item still being retried automatically."""
    st = request.app.state
    try:
        async with st.sessions.begin() as s:
            result = await actions.replay_quarantined(s, source, ref, body.reason)
    except actions.ActionRefused as e:
        async with st.sessions.begin() as s:
            await actions.audit(s, "replay_quarantined", f"{source}/{ref}", body.reason, f"refused: {e.code}")
        raise _refused(e) from None
    actions.wake_for_replay(st, source)
    return ActionOut(target=f"{source}/{ref}", result=result)
