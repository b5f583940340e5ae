"""The admin dashboard (/admin): request-level checks, then a real escrow driven in headless Chromium.

The request-level tests use httpx's ASGI client on a migrated database (no LND or relay
is touched). The browser test runs a real scenario in-process against the regtest
network and relay, serves the app with uvicorn on a loopback port, and drives Debian's
Chromium (``/usr/bin/chromium``) through Playwright. Screenshots of every page go to
``test-artifacts/dashboard/``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from pydantic import SecretStr
from sqlalchemy import select, update

from service.api import dashboard
from service.api.dashboard import router
from service.api.models import AdminAction, AdminSession
from service.app import create_app
from service.config import Settings
from service.db import create_engine, session_factory, utcnow
from service.escrow.engine import Engine, EngineConfig
from service.escrow.models import Job, TimelineEntry
from service.escrow.service import terms_from_settings
from service.ledger import accounts
from service.ledger import service as ledger
from service.lightning.client import InvoiceState
from service.lightning.models import LnInvoice
from service.nostr.nip01 import SecretKey
from service.payouts import DestinationKind, PayoutKind
from service.payouts.models import Payout
from tests.conftest import ROOT, Regtest, free_port, wait_until
from tests.e2e.market import Market, settle_payment

pytestmark = [pytest.mark.lnd, pytest.mark.relay]

TOKEN = "test-admin-token-0123456789-abcdefghij"
ARTIFACTS = ROOT / "test-artifacts" / "dashboard"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HOSTILE = "<script>alert('x')</script>"
PAGES = [
    "/admin",
    "/admin/jobs",
    "/admin/jobs/" + "ab" * 32,
    "/admin/payouts",
    "/admin/ledger",
    "/admin/events",
    "/admin/quarantine",
]


def with_dashboard(app: FastAPI) -> FastAPI:
    """Route the dashboard unless the app already does."""
    if not any(getattr(r, "path", None) == "/admin" for r in app.routes):
        app.include_router(router)
    return app


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


# ---- request level (no browser, no network) ---------------------------------------------------


@pytest.fixture
async def offline_app(database_url: str) -> AsyncIterator[FastAPI]:
    """The real app with the dashboard, on a fresh migrated database, without its lifespan."""
    app = with_dashboard(create_app(Settings(_env_file=None, database_url=database_url, admin_token=TOKEN)))
    engine = create_engine(database_url)
    app.state.sessions = session_factory(engine)
    try:
        yield app
    finally:
        await engine.dispose()


def client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")


@asynccontextmanager
async def signed_in(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with client(app) as c:
        r = await c.post("/admin/login", data={"token": TOKEN})
        assert r.status_code == 303 and r.headers["location"] == "/admin", r.text
        yield c


def csrf_of(html: str) -> str:
    m = re.search(r'name="csrf" value="([0-9a-f]{64})"', html)
    assert m, "no CSRF field in the page"
    return m.group(1)


def flash_of(html: str) -> str:
    m = re.search(r'<p class="flash flash-\w+" role="status">([^<]*)</p>', html)
    return m.group(1) if m else ""


async def test_every_page_requires_login(offline_app: FastAPI) -> None:
    async with client(offline_app) as c:
        for path in PAGES:
            r = await c.get(path)
            assert r.status_code == 303 and r.headers["location"] == "/admin/login", path
        for path in (
            "/admin/payouts/x:reward:y/retry",
            "/admin/payouts/x:reward:y/reopen",
            "/admin/quarantine/inbox/x/replay",
            "/admin/logout",
        ):
            r = await c.post(path, data={"reason": "r"})
            assert r.status_code == 303 and r.headers["location"] == "/admin/login", path
        r = await c.get("/admin/login")
        assert r.status_code == 200 and 'name="token"' in r.text


async def test_wrong_token_is_401_and_the_right_one_sets_a_hardened_cookie(offline_app: FastAPI) -> None:
    async with client(offline_app) as c:
        r = await c.post("/admin/login", data={"token": "guess"})
        assert r.status_code == 401 and "wrong token" in r.text and "set-cookie" not in r.headers
        r = await c.post("/admin/login", data={})
        assert r.status_code == 401
        r = await c.post("/admin/login", data={"token": TOKEN})
        assert r.status_code == 303 and r.headers["location"] == "/admin"
        cookie = r.headers["set-cookie"]
        value = c.cookies["fedstr_admin"]
        assert cookie.startswith(f"fedstr_admin={value};") and TOKEN not in cookie and len(value) >= 40
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/admin" in cookie
        async with offline_app.state.sessions() as s:  # the database holds the session's HMAC, not the cookie
            [row] = (await s.scalars(select(AdminSession))).all()
        assert row.id == hmac.new(TOKEN.encode(), dashboard.SESSION_LABEL + value.encode(), hashlib.sha256).hexdigest()
        for path in PAGES[:2] + PAGES[3:]:
            r = await c.get(path)
            assert r.status_code == 200, path
            assert "script-src" not in r.headers["content-security-policy"]
            assert "default-src 'none'" in r.headers["content-security-policy"]
            assert r.headers["cache-control"] == "no-store"
        assert (await c.get(PAGES[2])).status_code == 404
        css = await c.get("/admin/static/dashboard.css")
        assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")


async def test_changing_the_token_signs_everyone_out(offline_app: FastAPI) -> None:
    async with signed_in(offline_app) as c:
        assert (await c.get("/admin")).status_code == 200
        offline_app.state.settings = offline_app.state.settings.model_copy(
            update={"admin_token": SecretStr("another-admin-token-0123456789-abcdef")}
        )
        r = await c.get("/admin")
        assert r.status_code == 303 and r.headers["location"] == "/admin/login"


async def test_repeated_wrong_tokens_are_throttled(offline_app: FastAPI) -> None:
    async with client(offline_app) as c:
        for _ in range(offline_app.state.admin_failures.allowed):
            assert (await c.post("/admin/login", data={"token": "guess"})).status_code == 401
        r = await c.post("/admin/login", data={"token": TOKEN})
        assert r.status_code == 429 and "retry-after" in r.headers and "set-cookie" not in r.headers


async def test_admin_disabled_without_a_token(database_url: str) -> None:
    app = with_dashboard(create_app(Settings(_env_file=None, database_url=database_url, admin_token=None)))
    async with client(app) as c:
        for path in ("/admin/login", *PAGES):
            r = await c.get(path)
            assert r.status_code == 503 and "admin disabled" in r.text, path
        r = await c.post("/admin/login", data={"token": ""})
        assert r.status_code == 503 and "admin disabled" in r.text


async def test_post_forms_need_the_csrf_token(offline_app: FastAPI) -> None:
    async with signed_in(offline_app) as c:
        page = await c.get("/admin/payouts")
        csrf = csrf_of(page.text)
        for data in ({"reason": "r"}, {"reason": "r", "csrf": ""}, {"reason": "r", "csrf": "0" * 64}):
            r = await c.post("/admin/payouts/p1/retry", data=data)
            assert r.status_code == 403 and "CSRF" in r.text, data
        r = await c.post(
            "/admin/payouts/p1/retry",
            content=f'{{"csrf": "{csrf}", "reason": "r"}}',
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 403, "only form posts are read"
        r = await c.post("/admin/logout", data={})
        assert r.status_code == 403
        assert (await c.get("/admin")).status_code == 200, "still signed in"

        r = await c.post("/admin/payouts/p1/retry", data={"csrf": csrf, "reason": "  "})
        assert r.status_code == 303 and r.headers["location"] == "/admin/payouts"
        assert flash_of((await c.get("/admin/payouts")).text) == "a reason is required to retry a payout"
        r = await c.post("/admin/payouts/p1/retry", data={"csrf": csrf, "reason": "customer asked"})
        assert r.status_code == 303
        assert flash_of((await c.get("/admin/payouts")).text) == "retry refused: no such payout"
        assert flash_of((await c.get("/admin/payouts")).text) == "", "a flash shows once"

        c.cookies.set("fedstr_admin_flash", "eyJrIjoib2siLCJtIjoiZm9yZ2VkIiwidCI6MX0.00", path="/admin")
        assert "forged" not in (await c.get("/admin/payouts")).text, "a flash not signed by us is ignored"

        r = await c.post("/admin/logout", data={"csrf": csrf})
        assert r.status_code == 303 and r.headers["location"] == "/admin/login"
        assert (await c.get("/admin")).status_code == 303, "signed out"


async def test_expired_claims_are_listed_with_the_unclaimed_total_and_a_reopen_form(offline_app: FastAPI) -> None:
    """The payouts page lists each expired claim (payee, amount, claim_by) and the unclaimed total
    (the ledger's income:unclaimed); its Reopen form needs the CSRF token and a reason, and a
    refusal is shown and audited (the whole reopen: tests/e2e/test_claim_window.py)."""
    job_id = "ce" * 32
    expired_id, waiting_id = f"{job_id}:reward:{'aa' * 32}", f"{job_id}:validator:{'bb' * 32}"
    async with offline_app.state.sessions.begin() as s:
        for pid, state, payee in ((expired_id, "expired", "56" * 32), (waiting_id, "needs_invoice", "78" * 32)):
            s.add(
                Payout(
                    id=pid,
                    kind=PayoutKind.REWARD,
                    job_id=job_id,
                    payee=payee,
                    amount_msat=2_345_000,
                    destination_kind=DestinationKind.NONE,
                    destination="",
                    state=state,
                    claim_by=utcnow(),
                )
            )
        payable = accounts.payable("56" * 32, job_id)
        for key, kind, lines in (
            ("funding:" + "cf" * 32, "funding", [(accounts.NODE, 2_345_000), (accounts.escrow(job_id), -2_345_000)]),
            (f"release:{job_id}", "release", [(accounts.escrow(job_id), 2_345_000), (payable, -2_345_000)]),
        ):
            await ledger.post(s, key=key, kind=kind, job_id=job_id, lines=lines)
        await ledger.post(
            s,
            key=f"unclaimed:{expired_id}:0",
            kind="unclaimed",
            job_id=job_id,
            lines=[(payable, 2_345_000), (accounts.UNCLAIMED, -2_345_000)],
        )
    offline_app.state.escrow = SimpleNamespace(
        engine=Engine(
            offline_app.state.sessions,
            SecretKey.generate(),
            EngineConfig(terms=terms_from_settings(Settings()), relays=[]),
        ),
        loop=SimpleNamespace(wake=asyncio.Event()),
    )
    async with signed_in(offline_app) as c:
        page = (await c.get("/admin/payouts")).text
        expired = page.split('<table id="expired">', 1)[1]
        assert f'data-payout-id="{expired_id}"' in expired and f'data-payout-id="{waiting_id}"' not in expired
        assert "2,345.000 sat" in expired and ("56" * 32)[:8] in expired
        assert re.search(r'id="unclaimed-total">2,345\.000 sat<', page)
        assert expired.count('<form class="reopen"') == 1
        r = await c.post(f"/admin/payouts/{waiting_id}/reopen", data={"reason": "late claimant"})
        assert r.status_code == 403, "no CSRF token: refused"
        csrf = csrf_of(page)
        r = await c.post(f"/admin/payouts/{waiting_id}/reopen", data={"csrf": csrf, "reason": "late claimant"})
        assert r.status_code == 303
        flash = flash_of((await c.get("/admin/payouts")).text)
        assert flash.startswith("reopen refused: payout is needs_invoice"), flash
    async with offline_app.state.sessions() as s:
        (audit,) = (await s.scalars(select(AdminAction).where(AdminAction.target == waiting_id))).all()
    assert (audit.action, audit.outcome) == ("reopen_payout", "refused: payout_not_expired")


async def test_hostile_strings_are_escaped(offline_app: FastAPI) -> None:
    job_id = "cd" * 32
    async with offline_app.state.sessions.begin() as s:
        s.add(
            Job(
                id=job_id,
                customer="ef" * 32,
                state="rejected",
                reject_reason=HOSTILE,
                request_raw="{}",
                refund_reason='"><img src=x onerror=alert(1)>',
            )
        )
        s.add(TimelineEntry(job_id=job_id, kind="fact", detail=json.dumps({"why": HOSTILE}), at=utcnow()))
        s.add(TimelineEntry(job_id=job_id, kind="<b>kind</b>", detail=HOSTILE, at=utcnow()))
        s.add(
            Payout(
                id=f"{job_id}:reward:{HOSTILE}",
                kind=PayoutKind.REWARD,
                job_id=job_id,
                payee="12" * 32,
                amount_msat=1_234_567,
                destination_kind=DestinationKind.NONE,
                destination="",
                state="needs_invoice",
                last_error=HOSTILE,
            )
        )
        s.add(
            Payout(
                id=f"{job_id}:refund",
                kind=PayoutKind.REFUND,
                job_id=job_id,
                payee="34" * 32,
                amount_msat=1,
                destination_kind=DestinationKind.BOLT11,
                destination="x",
                state="unknown",
            )
        )
    async with signed_in(offline_app) as c:
        for path in ("/admin/jobs", "/admin/jobs?state=rejected", f"/admin/jobs/{job_id}", "/admin/payouts"):
            r = await c.get(path)
            assert r.status_code == 200, path
            assert "<script" not in r.text and "<img" not in r.text and "<b>kind" not in r.text, path
            assert "&lt;script&gt;" in r.text, path
        detail = (await c.get(f"/admin/jobs/{job_id}")).text
        assert detail.count("&lt;script&gt;alert(") >= 3  # the reason and both timeline entries
        payouts = (await c.get("/admin/payouts")).text
        assert "1,234.567 sat" in payouts
        assert payouts.count('<form class="retry"') == 1, "an unknown payout has no Retry button"
        assert "tracked in LND, never retried by hand" in payouts
        assert 'action="/admin/payouts/' + job_id + "%3Areward%3A%3Cscript%3E" in payouts
        r = await c.get("/admin/jobs?state=" + HOSTILE)
        assert r.status_code == 400 and "<script" not in r.text


def test_amounts_in_sats_with_msat_precision() -> None:
    assert dashboard.sat(1_234_567) == "1,234.567 sat"
    assert dashboard.sat(0) == "0.000 sat"
    assert dashboard.sat(5) == "0.005 sat"
    assert dashboard.sat(-2_000_001) == "-2,000.001 sat"
    assert dashboard.sat(None) == "—"


# ---- in the browser, over a real escrow --------------------------------------------------------


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[str]:
    """uvicorn on a free loopback port; the app's lifespan is the caller's (market.running())."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning"))
    task = asyncio.create_task(server.serve())
    await wait_until(lambda: server.started or task.done(), 20, "uvicorn started")
    if task.done():
        task.result()
        raise AssertionError("uvicorn stopped at once")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)


@asynccontextmanager
async def chromium_page():
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.fail("the Python package playwright is missing (pip install -e '.[dev]')", pytrace=False)
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium", pytrace=False)
    async with async_playwright() as pw:
        # A fresh temporary profile per launch; headless; nothing but loopback is reached.
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
        try:
            context = await browser.new_context(viewport={"width": 1400, "height": 900})
            page = await context.new_page()
            page.set_default_timeout(15_000)
            yield page
        finally:
            await browser.close()


async def test_dashboard_in_headless_chromium(regtest: Regtest, relay_url: str, database_url: str) -> None:
    market = Market(regtest, relay_url, database_url, admin_token=TOKEN)
    with_dashboard(market.app)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    good, bad = b"a trained model", b"random weights"
    async with market.running():
        # A funded job, three results, two validators: the winner and both validators are owed a reward,
        # and nobody has given an invoice yet.
        job_ev = await market.post_job(market.job_spec(policy="best"))
        pay = await market.fund(job_ev.id)
        p1, p2, p3 = market.providers
        results = [
            await market.submit(job_ev, p1, 0, good + b"1"),
            await market.submit(job_ev, p2, 1, good + b"2"),
            await market.submit(job_ev, p3, 2, bad),
        ]
        r1, r2, r3 = results
        v1, v2 = market.validators
        await market.score(
            job_ev.id,
            v1,
            {r1.id: ("0.91", sha(good + b"1")), r2.id: ("0.95", sha(good + b"2")), r3.id: ("0.10", sha(bad))},
        )
        await market.score(
            job_ev.id,
            v2,
            {r1.id: ("0.90", sha(good + b"1")), r2.id: ("0.93", sha(good + b"2")), r3.id: ("0.12", sha(bad))},
        )
        await market.wait_state(job_ev.id, "releasing")
        await settle_payment(pay)

        async def owed() -> list:  # written when the engine consumes the settlement fact, just after
            found = await market.payouts(job_ev.id)
            return found if len(found) == 3 else []

        payouts = await wait_until(owed, 30, "the three payouts written at release")
        assert {p.state for p in payouts} == {"needs_invoice"}, payouts
        async with market.sessions() as s:
            preimage = await s.scalar(select(LnInvoice.preimage).where(LnInvoice.job_id == job_ev.id))
        assert preimage, "the escrow invoice has a preimage in the database"

        async with serving(market.app) as base, chromium_page() as page:

            async def shot(name: str) -> None:
                await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

            async def submit(button) -> int:  # a Playwright locator
                async with page.expect_navigation() as nav:
                    await button.click()
                response = await nav.value
                return response.status if response is not None else 0

            # Sign-in: a wrong token first.
            await page.goto(base + "/admin")
            assert page.url == base + "/admin/login"
            await page.fill("#token", "not-the-token")
            assert await submit(page.locator("section.login button")) == 401
            assert await page.inner_text(".flash-error") == "wrong token"
            await shot("01-login-wrong-token")
            await page.fill("#token", TOKEN)
            assert await submit(page.locator("section.login button")) == 200
            assert page.url == base + "/admin"

            # Overview.
            assert await page.inner_text("#attention") == "3"
            assert (await page.inner_text("#payable")).endswith(" sat")
            assert "releasing\t1" in await page.inner_text("#states")
            await shot("02-overview")

            # Jobs list, filtered by state.
            await page.click("header nav >> text=Jobs")
            row = page.locator(f'tr[data-job-id="{job_ev.id}"]')
            assert await row.count() == 1 and "releasing" in await row.inner_text()
            await page.select_option("#state", "releasing")
            await submit(page.locator("form.filter button"))
            assert page.url.endswith("/admin/jobs?state=releasing")
            assert await row.count() == 1
            await shot("03-jobs")

            # Job detail: timeline with the funding and the results; never a preimage.
            await submit(row.locator("a").first)
            assert page.url == f"{base}/admin/jobs/{job_ev.id}"
            timeline = await page.inner_text("#timeline")
            assert "accepted" in timeline and "funding:" in timeline, timeline
            for r in results:
                assert r.id in timeline, f"result {r.id} not in the timeline"
            assert await page.locator("#results tbody tr").count() == 3
            assert await page.locator("#scores tbody tr").count() == 6
            assert await page.locator("#payouts tbody tr").count() == 3
            assert "needs_invoice" in await page.inner_text("#payouts")
            html = await page.content()
            assert preimage not in html
            await shot("04-job-detail")

            # Payouts: a retry without a destination is refused with the action's message.
            await page.click("header nav >> text=Payouts")
            assert await page.locator("#payouts tbody tr").count() == 3
            refused, target = payouts[0], payouts[1]
            form = page.locator(f'tr[data-payout-id="{refused.id}"] form.retry')
            await form.locator('input[name="reason"]').fill("payee says they sent an invoice")
            assert await submit(form.locator("button")) == 200
            assert page.url == base + "/admin/payouts"
            assert (
                await page.inner_text("p.flash") == "retry refused: the payee has not given an invoice or address yet"
            )
            await shot("05-payouts-retry-refused")

            # Give one payout a destination (as if it had failed on an invoice) and retry it: it is paid.
            payreq, h = await regtest.payee_invoice(target.amount_msat, memo="dashboard retry")
            async with market.sessions.begin() as s:
                await s.execute(
                    update(Payout)
                    .where(Payout.id == target.id)
                    .values(
                        destination_kind=DestinationKind.BOLT11,
                        destination=payreq,
                        state="failed",
                        attempts=3,
                        last_error="no route (test)",
                        updated_at=utcnow(),
                    )
                )
            await page.reload()
            row = page.locator(f'tr[data-payout-id="{target.id}"]')
            assert "failed" in await row.inner_text() and "bolt11" in await row.inner_text()
            await shot("06-payouts-failed")
            await row.locator('input[name="reason"]').fill("route fixed by the operator")
            assert await submit(row.locator("button")) == 200
            assert "will be retried (now pending)" in await page.inner_text("p.flash")
            await shot("07-payouts-retried")

            async def settled() -> bool:
                return (await regtest.payee.lookup_invoice(h)).state == InvoiceState.SETTLED

            await wait_until(settled, 60, "the retried payout paid", interval=0.5)
            inv = await regtest.payee.lookup_invoice(h)
            assert inv.amt_paid_msat == target.amount_msat

            async def booked() -> bool:
                return {p.id: p.state for p in await market.payouts(job_ev.id)}[target.id] == "succeeded"

            await wait_until(booked, 30, "the payout recorded as succeeded")
            await page.reload()
            assert await page.locator("#payouts tbody tr").count() == 2
            assert await page.locator(f'tr[data-payout-id="{target.id}"]').count() == 0

            # The job again: the payout succeeded and shows in the timeline.
            await page.goto(f"{base}/admin/jobs/{job_ev.id}")
            assert "succeeded" in await page.inner_text("#payouts")
            await shot("08-job-after-retry")

            # Ledger and rejected events.
            await page.click("header nav >> text=Ledger")
            accounts = await page.inner_text("#accounts")
            assert "income:fees" in accounts and "asset:node" in accounts
            assert (await page.inner_text("#accounts tfoot")).endswith("0.000 sat")
            assert await page.locator("#postings tbody > tr").count() >= 3
            await shot("09-ledger")
            await page.click("header nav >> text=Rejected events")
            await shot("10-rejected-events")

            # Sign out.
            await submit(page.locator("form.logout button"))
            assert page.url == base + "/admin/login"
            await page.goto(base + "/admin/payouts")
            assert page.url == base + "/admin/login"

        async with market.sessions() as s:
            audited = (await s.execute(select(AdminAction.outcome, AdminAction.target).order_by(AdminAction.id))).all()
        assert [(o, t) for o, t in audited] == [("refused: payout_needs_invoice", refused.id), ("pending", target.id)]


@pytest.mark.parametrize("path", ["/v1/admin/jobs", "/v1/admin/ledger/postings", "/v1/admin/quarantine"])
async def test_a_page_offset_beyond_any_table_is_a_422_not_a_server_error(offline_app: FastAPI, path: str) -> None:
    async with client(offline_app) as c:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        r = await c.get(path, params={"offset": 21220605398943604028215394304}, headers=auth)
        assert r.status_code == 422, r.text
        assert (await c.get(path, params={"offset": 1_000_000_000}, headers=auth)).status_code == 200
