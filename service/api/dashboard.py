"""The admin dashboard: small server-rendered HTML pages under ``/admin``.

Sign-in is with the admin token (``FEDSTR_ADMIN_TOKEN``); without one the pages answer
503. Wrong tokens count in the per-address throttle shared with the admin API's bearer
check (``app.state.admin_failures``). A signed-in browser holds the cookie ``fedstr_admin``:
a random session value whose HMAC-SHA256 keyed by the admin token names a row of
``admin_sessions`` (the token never sits in the browser, the cookie never sits in the
database). Signing out deletes the row, so a copied cookie stops working on every replica;
changing the token matches no row, which signs everyone out. Sessions last
``SESSION_SECONDS``; at most ``MAX_SESSIONS`` live at once (the oldest go first). The
cookie is HttpOnly, SameSite=Strict, Secure over HTTPS and scoped to ``/admin``.

Every state-changing form carries a CSRF token (an HMAC keyed by the admin token over
the session's cookie), checked before anything else on POST. Templates are rendered with
Jinja2 autoescaping always on, and every page is sent with a strict Content-Security-Policy
(no scripts, styles only from this router), ``no-store`` and ``frame-ancestors 'none'``.
The pages need nothing from outside: the stylesheet is served here.

Reads go through :mod:`service.api.queries` (which never selects a preimage) and
:mod:`service.quarantine`; the actions, retrying or reissuing a payout and replaying a quarantined item,
through :mod:`service.api.actions`, each in one transaction and audited.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

import jinja2
from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.templating import Jinja2Templates

from service import quarantine
from service.api import actions, queries
from service.api.admin import usable
from service.api.limits import client_address
from service.api.models import AdminSession
from service.db import utcnow
from service.escrow.models import JobState
from service.ledger.models import LedgerPosting
from service.lightning.errors import LndError
from service.payouts.stuck import lnd_report
from service.payouts.types import PayoutState

router = APIRouter(include_in_schema=False)

HERE = Path(__file__).resolve().parent
COOKIE = "fedstr_admin"
FLASH_COOKIE = "fedstr_admin_flash"
SESSION_LABEL = b"fedstr-escrow admin session v2\x00"
CSRF_LABEL = b"fedstr-escrow admin csrf v1\x00"
FLASH_LABEL = b"fedstr-escrow admin flash v1\x00"
SESSION_SECONDS = 12 * 3600
MAX_SESSIONS = 100
FLASH_SECONDS = 120
PAGE_SIZE = 25
MAX_PAGE = 1_000_000
MAX_FORM_BYTES = 8 * 1024
MAX_REASON = 500
MAX_LND_VIEWS = 20  # unknown payouts whose payment the payouts page asks LND about (the oldest first)
STATES = tuple(s.value for s in JobState if s is not JobState.NEW)  # NEW: never a stored job's

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


# ---- formatting -------------------------------------------------------------------------


def sat(msat: int | None) -> str:
    """Millisatoshis as sats with msat precision: ``1234567`` -> ``1,234.567 sat``."""
    if msat is None:
        return "—"
    sign = "-" if msat < 0 else ""
    whole, frac = divmod(abs(int(msat)), 1000)
    return f"{sign}{whole:,}.{frac:03d} sat"


def when(value: object) -> str:
    """A time for people: ISO text, a datetime or unix seconds -> ``2026-01-02 03:04:05 UTC``."""
    if value is None or value == "":
        return "—"
    if isinstance(value, bool):
        return str(value)
    try:
        if isinstance(value, int | float):
            if value <= 0:
                return "—"
            dt = datetime.fromtimestamp(value, UTC)
        elif isinstance(value, datetime):
            dt = value
        else:
            dt = datetime.fromisoformat(str(value))
    except (ValueError, OverflowError, OSError):
        return str(value)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def short(value: object, n: int = 12) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= n + 1 else text[:n] + "…"


_HEX64 = re.compile(r"\b([0-9a-f]{12})[0-9a-f]{52}\b")


def abbr(value: object) -> str:
    """Long hex ids (event ids, pubkeys, hashes) inside a text cut to 12 characters, for tables."""
    return _HEX64.sub(r"\1…", "" if value is None else str(value))


def pretty(value: object) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str, ensure_ascii=False)


def compact(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, default=str, ensure_ascii=False, separators=(", ", ": "))


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        sat=sat, when=when, short=short, abbr=abbr, pretty=pretty, compact=compact, q=lambda v: quote(str(v), safe="")
    )
    return env


templates = Jinja2Templates(env=_env())


# ---- secrets ------------------------------------------------------------------------------


def _key(request: Request) -> bytes | None:
    """The admin token as the HMAC key, or None when the dashboard is disabled."""
    return usable(getattr(request.app.state.settings, "admin_token", None))


@dataclass(frozen=True, slots=True)
class Signed:
    """A signed-in request: the HMAC key (the admin token) and the session's cookie value."""

    key: bytes
    cookie: str


def session_id(key: bytes, cookie: str) -> str:
    return hmac.new(key, SESSION_LABEL + cookie.encode(), hashlib.sha256).hexdigest()


def csrf_value(signed: Signed) -> str:
    return hmac.new(signed.key, CSRF_LABEL + signed.cookie.encode(), hashlib.sha256).hexdigest()


def _flash_sig(key: bytes, payload: str) -> str:
    return hmac.new(key, FLASH_LABEL + payload.encode(), hashlib.sha256).hexdigest()[:32]


def _encode_flash(key: bytes, kind: str, text: str) -> str:
    raw = json.dumps({"k": kind, "m": text[:400], "t": int(time.time())}, separators=(",", ":"))
    payload = base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")
    return f"{payload}.{_flash_sig(key, payload)}"


def _decode_flash(key: bytes, cookie: str | None) -> dict | None:
    if not cookie or "." not in cookie:
        return None
    payload, _, sig = cookie.rpartition(".")
    if not hmac.compare_digest(sig.encode(), _flash_sig(key, payload).encode()):
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        kind, text, at = str(data["k"]), str(data["m"]), int(data["t"])
    except (ValueError, KeyError, TypeError):
        return None
    if not 0 <= time.time() - at <= FLASH_SECONDS or kind not in ("ok", "error"):
        return None
    return {"kind": kind, "text": text}


# ---- helpers ------------------------------------------------------------------------------


def _root(request: Request) -> str:
    return request.scope.get("root_path", "").rstrip("/")


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def _render(request: Request, name: str, status: int = 200, *, key: Signed | None = None, **ctx: object) -> Response:
    flash = _decode_flash(key.key, request.cookies.get(FLASH_COOKIE)) if key else None
    ctx.update(
        root=_root(request),
        csrf=csrf_value(key) if key else "",
        signed_in=key is not None,
        flash=flash,
        page_name=name.removesuffix(".html"),
    )
    ctx.setdefault("title", "")
    resp = templates.TemplateResponse(request, name, ctx, status_code=status, headers=SECURITY_HEADERS)
    if FLASH_COOKIE in request.cookies:
        resp.delete_cookie(
            FLASH_COOKIE, path=_root(request) + "/admin", secure=_secure(request), httponly=True, samesite="strict"
        )
    return resp


def _message(request: Request, status: int, title: str, text: str, *, key: Signed | None = None) -> Response:
    return _render(request, "message.html", status, key=key, title=title, text=text)


def _redirect(
    request: Request, path: str, *, key: Signed | None = None, flash: tuple[str, str] | None = None
) -> RedirectResponse:
    resp = RedirectResponse(_root(request) + path, status_code=303, headers=SECURITY_HEADERS)
    if flash is not None and key is not None:
        resp.set_cookie(
            FLASH_COOKIE,
            _encode_flash(key.key, *flash),
            max_age=FLASH_SECONDS,
            path=_root(request) + "/admin",
            secure=_secure(request),
            httponly=True,
            samesite="strict",
        )
    return resp


def _disabled(request: Request) -> Response:
    return _message(
        request, 503, "Admin disabled", "admin disabled: no admin token is configured (set FEDSTR_ADMIN_TOKEN)."
    )


async def _signed_in(request: Request) -> Signed | Response:
    """The session when the request carries a live session cookie, else the answer to send."""
    key = _key(request)
    if key is None:
        return _disabled(request)
    cookie = request.cookies.get(COOKIE, "")
    if cookie and len(cookie) <= 100:
        async with request.app.state.sessions() as s:
            found = await s.scalar(
                select(func.count())
                .select_from(AdminSession)
                .where(AdminSession.id == session_id(key, cookie), AdminSession.expires_at > utcnow())
            )
        if found:
            return Signed(key, cookie)
    return _redirect(request, "/admin/login")


async def _start_session(request: Request, key: bytes) -> str:
    """A new session row (expired ones and those past MAX_SESSIONS removed); returns the cookie."""
    cookie = secrets.token_urlsafe(32)
    now = utcnow()
    async with request.app.state.sessions.begin() as s:
        await s.execute(delete(AdminSession).where(AdminSession.expires_at <= now))
        keep = select(AdminSession.id).order_by(AdminSession.created_at.desc()).limit(MAX_SESSIONS - 1)
        await s.execute(delete(AdminSession).where(AdminSession.id.not_in(keep.scalar_subquery())))
        s.add(
            AdminSession(
                id=session_id(key, cookie), created_at=now, expires_at=now + timedelta(seconds=SESSION_SECONDS)
            )
        )
    return cookie


class _FormTooLarge(Exception):
    pass


async def _form(request: Request) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body (the only kind our forms send), bounded."""
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype != "application/x-www-form-urlencoded":
        return {}
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise _FormTooLarge
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=20, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        return {}
    return {k: v[0] for k, v in fields.items()}


async def _checked_form(request: Request, key: Signed) -> dict[str, str] | Response:
    try:
        form = await _form(request)
    except _FormTooLarge:
        return _message(request, 413, "Too large", "the form is too large.", key=key)
    if not hmac.compare_digest(form.get("csrf", "").encode(), csrf_value(key).encode()):
        return _message(
            request,
            403,
            "Forbidden",
            "the form's CSRF token is missing or wrong: reload the page and try again.",
            key=key,
        )
    return form


def _page(request: Request) -> int:
    try:
        return min(MAX_PAGE, max(1, int(request.query_params.get("page", "1"))))
    except ValueError:
        return 1


# ---- sign-in ------------------------------------------------------------------------------


@router.get("/admin/static/dashboard.css", name="admin_css")
async def stylesheet() -> Response:
    return Response(
        (HERE / "static" / "dashboard.css").read_bytes(),
        media_type="text/css",
        headers={"Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"},
    )


@router.get("/admin/login", name="admin_login")
async def login_form(request: Request) -> Response:
    if _key(request) is None:
        return _disabled(request)
    return _render(request, "login.html", title="Sign in", error=None)


@router.post("/admin/login")
async def login(request: Request) -> Response:
    key = _key(request)
    if key is None:
        return _disabled(request)
    throttle = request.app.state.admin_failures
    who = client_address(request)
    wait = throttle.retry_after(who)
    if wait is not None:
        resp = _render(
            request, "login.html", 429, title="Sign in", error="too many wrong tokens: wait a few minutes and try again"
        )
        resp.headers["Retry-After"] = str(wait)
        return resp
    try:
        form = await _form(request)
    except _FormTooLarge:
        form = {}
    given = form.get("token", "").strip().encode()
    if not given or not hmac.compare_digest(given, key):
        throttle.failed(who)
        return _render(request, "login.html", 401, title="Sign in", error="wrong token")
    resp = _redirect(request, "/admin")
    resp.set_cookie(
        COOKIE,
        await _start_session(request, key),
        max_age=SESSION_SECONDS,
        path=_root(request) + "/admin",
        secure=_secure(request),
        httponly=True,
        samesite="strict",
    )
    return resp


@router.post("/admin/logout")
async def logout(request: Request) -> Response:
    key = await _signed_in(request)
    if isinstance(key, Response):
        return key
    form = await _checked_form(request, key)
    if isinstance(form, Response):
        return form
    async with request.app.state.sessions.begin() as s:
        await s.execute(delete(AdminSession).where(AdminSession.id == session_id(key.key, key.cookie)))
    resp = _redirect(request, "/admin/login")
    resp.delete_cookie(
        COOKIE, path=_root(request) + "/admin", secure=_secure(request), httponly=True, samesite="strict"
    )
    return resp


# ---- pages --------------------------------------------------------------------------------


@router.get("/admin", name="admin_overview")
async def overview(request: Request) -> Response:
    key = await _signed_in(request)
    if isinstance(key, Response):
        return key
    async with request.app.state.sessions() as s:
        data = await queries.overview(s)
        quarantined = sum((await quarantine.Quarantine.counts(s)).values())
    nostr = getattr(request.app.state, "nostr", None)
    return _render(
        request,
        "overview.html",
        key=key,
        title="Overview",
        o=data,
        quarantined=quarantined,
        relays=nostr.pool.status() if nostr is not None else [],
    )


@router.get("/admin/jobs", name="admin_jobs")
async def jobs(request: Request) -> Response:
    key = await _signed_in(request)
    if isinstance(key, Response):
        return key
    state = request.query_params.get("state") or None
    if state is not None and state not in STATES:
        return _message(request, 400, "Unknown state", f"there is no job state {state!r}.", key=key)
    page = _page(request)
    async with request.app.state.sessions() as s:
        rows, total = await queries.list_jobs(s, state=state, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
    pages = max(1, math.ceil(total / PAGE_SIZE))

    def link(p: int) -> str:
        return "?" + urlencode({k: v for k, v in (("state", state), ("page", p)) if v})

    return _render(
        request,
        "jobs.html",
        key=key,
        title="Jobs",
        jobs=rows,
        total=total,
        state=state,
        states=STATES,
        page=page,
        pages=pages,
        prev_link=link(page - 1) if page > 1 else None,
        next_link=link(page + 1) if page < pages else None,
    )


@router.get("/admin/jobs/{job_id}", name="admin_job")
async def job(request: Request, job_id: str) -> Response:
    key = await _signed_in(request)
    if isinstance(key, Response):
        return key
    data = None
    if len(job_id) <= 64:
        async with request.app.state.sessions() as s:
            data = await queries.job_detail(s, job_id)
    if data is None:
        return _message(request, 404, "Not found", f"there is no job {job_id!r}.", key=key)
    return _render(request, "job.html", key=key, title=f"Job {short(job_id)}", j=data)


@router.get("/admin/payouts", name="admin_payouts")
async def payouts(request: Request) -> Response:
    key = await _signed_in(request)
    if isinstance(key, Response):
        return key
    st = request.app.state
    async with st.sessions() as s:
        rows = await queries.payouts_needing_attention(s)
        expired, unclaimed_msat = await queries.expired_claims(s)
        # LND's view of each unknown payout's open attempt (its payment may be stuck in flight)
        unknown = [r for r in rows if r["state"] == "unknown"][:MAX_LND_VIEWS]
        hashes = {r["id"]: await queries.open_attempt(s, r["id"]) for r in unknown}
    views = await asyncio.gather(
        *(
            lnd_report(st.lnd, h, state=PayoutState.UNKNOWN, payment_timeout_seconds=st.settings.payout_timeout_seconds)
            for h in hashes.values()
            if h is not None and st.lnd is not None
        )
    )
    by_hash = {v["payment_hash"]: v for v in views}
    for r in rows:
        h = hashes.get(r["id"])
        r["lnd"] = by_hash.get(h) if h else None
    return _render(
        request,
        "payouts.html",
        key=key,
        title="Payouts",
        payouts=rows,
        expired=expired,
        unclaimed_msat=unclaimed_msat,
        max_reason=MAX_REASON,
    )


async def _action(request: Request, back: str, no_reason: str) -> tuple[Signed, str] | Response:
    """An operator's action form: signed in, its CSRF token checked, and a reason given (for the
    audit log); else the response to send (the login page, a 403, or ``back`` with a message)."""
    key = await _signed_in(request)
    if isinstance(key, Response):
        return key
    form = await _checked_form(request, key)
    if isinstance(form, Response):
        return form
    reason = " ".join(form.get("reason", "").split())[:MAX_REASON]
    if not reason:
        return _redirect(request, back, key=key, flash=("error", no_reason))
    return key, reason


async def _payout_action(
    request: Request,
    payout_id: str,
    *,
    verb: str,
    run: Callable[[AsyncSession, Any, str], Awaitable[str]],
    done: Callable[[str], str],
    needs_lnd: bool = False,
) -> Response:
    """An operator's action on one payout from the payouts page: signed in, CSRF, a reason; ``run``
    (session, app state, reason) in a transaction of its own; a refusal audited in another (as
    ``<verb>_payout``); the engine woken after a success; back to the page with ``done(outcome)``."""
    action = await _action(request, "/admin/payouts", f"a reason is required to {verb} a payout")
    if isinstance(action, Response):
        return action
    key, reason = action
    st = request.app.state
    if len(payout_id) > 200:  # longer than any payout id can be
        return _redirect(request, "/admin/payouts", key=key, flash=("error", f"{verb} refused: no such payout"))
    if needs_lnd and st.lnd is None:
        return _redirect(request, "/admin/payouts", key=key, flash=("error", f"{verb} refused: no LND node"))
    try:
        async with st.sessions.begin() as s:
            outcome = await run(s, st, reason)
    except (actions.ActionRefused, LndError) as e:
        code, message = (
            (e.code, e.message)
            if isinstance(e, actions.ActionRefused)
            else (f"node_unavailable ({type(e).__name__})", "our node did not answer")
        )
        async with st.sessions.begin() as s:  # the refusal is audited too, in a transaction of its own
            await actions.audit(s, f"{verb}_payout", payout_id, reason, f"refused: {code}")
        return _redirect(request, "/admin/payouts", key=key, flash=("error", f"{verb} refused: {message}"))
    actions.wake_engine(st)
    return _redirect(request, "/admin/payouts", key=key, flash=("ok", done(outcome)))


@router.post("/admin/payouts/{payout_id:path}/retry")
async def retry_payout(request: Request, payout_id: str) -> Response:
    return await _payout_action(
        request,
        payout_id,
        verb="retry",
        run=lambda s, st, reason: actions.retry_payout(s, payout_id, reason),
        done=lambda outcome: f"payout {abbr(payout_id)} will be retried (now {outcome})",
    )


@router.post("/admin/payouts/{payout_id:path}/reopen")
async def reopen_payout(request: Request, payout_id: str) -> Response:
    return await _payout_action(
        request,
        payout_id,
        verb="reopen",
        run=lambda s, st, reason: actions.reopen_payout(s, st.escrow.engine, payout_id, reason),
        done=lambda outcome: f"claim {abbr(payout_id)} reopened (now {outcome})",
    )


@router.post("/admin/payouts/{payout_id:path}/reissue")
async def reissue_payout(request: Request, payout_id: str) -> Response:
    return await _payout_action(
        request,
        payout_id,
        verb="reissue",
        run=lambda s, st, reason: actions.reissue_payout(
            s, st.lnd, payout_id, reason, payment_timeout_seconds=st.settings.payout_timeout_seconds
        ),
        done=lambda outcome: (
            f"payout {abbr(payout_id)} reissued: its payee is asked for a new invoice ({outcome[:120]})"
        ),
        needs_lnd=True,
    )


@router.get("/admin/ledger", name="admin_ledger")
async def ledger_page(request: Request) -> Response:
    key = await _signed_in(request)
    if isinstance(key, Response):
        return key
    page = _page(request)
    async with request.app.state.sessions() as s:
        accts = await queries.accounts(s)
        total = int(await s.scalar(select(func.count()).select_from(LedgerPosting)) or 0)
        # Page 1 holds the newest postings; queries.postings reads oldest first.
        end = total - (page - 1) * PAGE_SIZE
        start = max(0, end - PAGE_SIZE)
        recent = list(reversed(await queries.postings(s, limit=end - start, offset=start))) if end > 0 else []
    pages = max(1, math.ceil(total / PAGE_SIZE))
    return _render(
        request,
        "ledger.html",
        key=key,
        title="Ledger",
        accounts=accts,
        balance_sum=sum(a["balance_msat"] for a in accts),
        postings=recent,
        total=total,
        page=page,
        pages=pages,
        prev_link=f"?page={page - 1}" if page > 1 else None,
        next_link=f"?page={page + 1}" if page < pages else None,
    )


@router.get("/admin/events", name="admin_events")
async def rejected(request: Request) -> Response:
    key = await _signed_in(request)
    if isinstance(key, Response):
        return key
    async with request.app.state.sessions() as s:
        rows = await queries.rejected_events(s, limit=100)
    return _render(request, "events.html", key=key, title="Rejected events", events=rows)


@router.get("/admin/quarantine", name="admin_quarantine")
async def quarantine_page(request: Request) -> Response:
    key = await _signed_in(request)
    if isinstance(key, Response):
        return key
    page = _page(request)
    async with request.app.state.sessions() as s:
        rows, total = await quarantine.listing(s, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE)
        retrying, retrying_total = await quarantine.listing(s, limit=PAGE_SIZE, quarantined=False)
    pages = max(1, math.ceil(total / PAGE_SIZE))
    return _render(
        request,
        "quarantine.html",
        key=key,
        title="Quarantine",
        items=rows,
        total=total,
        retrying=retrying,
        retrying_total=retrying_total,
        max_reason=MAX_REASON,
        page=page,
        pages=pages,
        prev_link=f"?page={page - 1}" if page > 1 else None,
        next_link=f"?page={page + 1}" if page < pages else None,
    )


@router.post("/admin/quarantine/{source}/{ref:path}/replay")
async def replay_quarantined(request: Request, source: str, ref: str) -> Response:
    action = await _action(request, "/admin/quarantine", "a reason is required to replay an item")
    if isinstance(action, Response):
        return action
    key, reason = action
    if source not in quarantine.SOURCES or len(ref) > 400:
        return _redirect(request, "/admin/quarantine", key=key, flash=("error", "replay refused: no such item"))
    sessions = request.app.state.sessions
    try:
        async with sessions.begin() as s:
            outcome = await actions.replay_quarantined(s, source, ref, reason)
    except actions.ActionRefused as e:
        async with sessions.begin() as s:  # the refusal is audited too, in a transaction of its own
            await actions.audit(s, "replay_quarantined", f"{source}/{ref}", reason, f"refused: {e.code}")
        return _redirect(request, "/admin/quarantine", key=key, flash=("error", f"replay refused: {e.message}"))
    actions.wake_for_replay(request.app.state, source)
    return _redirect(
        request,
        "/admin/quarantine",
        key=key,
        flash=("ok", f"{source} {abbr(ref)} will be processed again (now {outcome})"),
    )
