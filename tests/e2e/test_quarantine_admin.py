"""The operator's side of the quarantine: admin API, metrics and dashboard, on the running service.

The app runs with its lifespan (engine loop, inbox, leadership) on a real database, without
LND or relays: events come in over ``POST /v1/events``. The fault is injected into the engine's
job-request handler for chosen event ids (it stands in for a handler bug meeting one event).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from decimal import Decimal

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from service.api.models import AdminAction
from service.app import create_app
from service.config import Settings
from service.escrow.models import Job
from service.nostr.nip01 import Event, SecretKey, sign_event
from service.nostr.protocol import (
    Direction,
    JobSpec,
    Mode,
    PayoutPolicy,
    Shard,
    Validation,
    build_job_request,
)
from tests.conftest import wait_until
from tests.e2e.test_dashboard import (
    ARTIFACTS,
    chromium_page,
    csrf_of,
    flash_of,
    serving,
)

TOKEN = "quarantine-admin-token-of-at-least-32-characters"
HOSTILE = "<script>alert('q')</script>"
ESCROW = SecretKey.generate()
CUSTOMER = SecretKey.generate()


class Injected(RuntimeError):
    pass


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
async def app(backend: str, database_url: str) -> AsyncIterator[FastAPI]:
    app = create_app(
        Settings(
            _env_file=None,
            database_url=database_url,
            admin_token=TOKEN,
            nostr_secret_key=ESCROW.to_hex(),
            min_results_window_seconds=0,
            min_bid_msat=10_000,
            quarantine_after=2,
            item_retry_base_seconds=0,
            item_retry_max_seconds=0,
        )
    )
    async with app.router.lifespan_context(app):
        yield app


def api(app: FastAPI, token: str | None = TOKEN) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://escrow", headers=headers)


def job_request(bid: int) -> Event:
    now = int(time.time())
    spec = JobSpec(
        escrow=ESCROW.public_key_hex,
        bid_msat=bid,
        shards=(Shard(index=0, url="https://d.example/0"),),
        validation=Validation("accuracy", Direction.MAX, Decimal("0.8"), 1),
        payout=PayoutPolicy("best"),
        results_deadline=now + 600,
        validation_deadline=now + 1200,
        validators=(),
        validator_fee_msat=0,
        mode=Mode("auto"),
    )
    return sign_event(CUSTOMER, *build_job_request(spec, customer=CUSTOMER.public_key_hex))


def poison(app: FastAPI, ids: set[str]) -> None:
    engine = app.state.escrow.engine
    real = engine.on_job_request

    async def on_job_request(s, event):
        if event.id in ids:
            raise Injected(f"handler bug {HOSTILE}")
        return await real(s, event)

    engine.on_job_request = on_job_request


async def quarantined(c: httpx.AsyncClient, event_id: str) -> dict | None:
    body = (await c.get("/v1/admin/quarantine", params={"source": "inbox"})).json()
    return next((i for i in body["items"] if i["ref"] == event_id), None)


async def job_state(app: FastAPI, job_id: str) -> str | None:
    async with app.state.sessions() as s:
        job = await s.get(Job, job_id)
    return job.state if job else None


async def _is_requested(app: FastAPI, job_id: str) -> bool:
    return await job_state(app, job_id) == "requested"


async def audit(app: FastAPI) -> list[tuple[str, str, str]]:
    async with app.state.sessions() as s:
        return [
            (a.action, a.target, a.outcome)
            for a in (await s.scalars(select(AdminAction).order_by(AdminAction.id))).all()
        ]


async def test_admin_lists_counts_and_replays_a_quarantined_event(app: FastAPI) -> None:
    bad, good = job_request(1_000_000), job_request(1_000_001)
    poison(app, {bad.id})
    failures_before = app.state.escrow.quarantine.failures["inbox"]  # the app's counter
    async with api(app) as c:
        for ev in (bad, good):
            assert (await c.post("/v1/events", json=ev.to_dict())).status_code == 202
        item = await wait_until(lambda: quarantined(c, bad.id), 20, "the poisoned event quarantined")
        # the poisoned event blocks nobody: the good one is handled too (its turn may come just after)
        await wait_until(lambda: _is_requested(app, good.id), 20, "the good job request handled")
        assert item["job_id"] == bad.id and item["failures"] == 2 and item["quarantined_at"]
        assert item["last_error"] == f"Injected: handler bug {HOSTILE}" and item["next_attempt_at"] is None
        metrics = (await c.get("/metrics")).text
        assert 'fedstr_quarantined_items{source="inbox"} 1' in metrics
        assert 'fedstr_quarantined_items{source="effect"} 0' in metrics
        assert f'fedstr_item_failures_total{{source="inbox"}} {failures_before + 2}' in metrics

        assert (await api(app, None).get("/v1/admin/quarantine")).status_code == 401
        assert (await c.get("/v1/admin/quarantine", params={"source": "nope"})).status_code == 422
        r = await c.post(f"/v1/admin/quarantine/inbox/{good.id}/replay", json={"reason": "try it"})
        assert (r.status_code, r.json()["code"]) == (404, "not_found")
        r = await c.post(f"/v1/admin/quarantine/bogus/{bad.id}/replay", json={"reason": "try it"})
        assert r.status_code == 422
        assert (await c.post(f"/v1/admin/quarantine/inbox/{bad.id}/replay", json={"reason": ""})).status_code == 422
        await app.state.escrow.quarantine.failed("ln_fact", "999999", KeyError("still retried"))
        r = await c.post("/v1/admin/quarantine/ln_fact/999999/replay", json={"reason": "too early"})
        assert (r.status_code, r.json()["code"]) == (409, "not_quarantined")
        retrying = (await c.get("/v1/admin/quarantine", params={"retrying": "true"})).json()
        assert [(i["source"], i["ref"]) for i in retrying["items"]] == [("ln_fact", "999999")]
        assert retrying["retrying"] == 1 and (await c.get("/v1/admin/quarantine")).json()["retrying"] == 1

        # The inbox's own replay route is the same action on the same item.
        r = await c.post(f"/v1/admin/inbox/{good.id}/replay", json={"reason": "not failed"})
        assert (r.status_code, r.json()["code"]) == (409, "not_replayable")
        app.state.escrow.engine.on_job_request = type(app.state.escrow.engine).on_job_request.__get__(
            app.state.escrow.engine
        )  # the fix is deployed
        r = await c.post(f"/v1/admin/inbox/{bad.id}/replay", json={"reason": "handler fixed"})
        assert r.status_code == 200 and r.json() == {"target": bad.id, "result": "pending"}
        await wait_until(lambda: job_state(app, bad.id), 10, "the replayed event processed")
        assert await quarantined(c, bad.id) is None
        assert (await c.get("/v1/admin/quarantine")).json()["total"] == 0
    assert await audit(app) == [
        ("replay_quarantined", f"inbox/{good.id}", "refused: not_found"),
        ("replay_quarantined", "ln_fact/999999", "refused: not_quarantined"),
        ("replay_event", good.id, "refused: not_replayable"),
        ("replay_event", bad.id, "pending"),
    ]


async def test_dashboard_shows_the_quarantine_and_replays_with_csrf(app: FastAPI) -> None:
    bad = job_request(1_000_002)
    poison(app, {bad.id})
    async with api(app, None) as c:
        assert (await c.post("/v1/events", json=bad.to_dict())).status_code == 202
        async with api(app) as admin_api:
            await wait_until(lambda: quarantined(admin_api, bad.id), 20, "the poisoned event quarantined")
        assert (await c.get("/admin/quarantine")).status_code == 303, "signed-in only"
        r = await c.post("/admin/login", data={"token": TOKEN})
        assert r.status_code == 303
        overview = (await c.get("/admin")).text
        assert 'id="quarantined"' in overview and '/admin/quarantine">1</a>' in overview
        page = await c.get("/admin/quarantine")
        assert page.status_code == 200 and "default-src 'none'" in page.headers["content-security-policy"]
        assert "<script" not in page.text and "&lt;script&gt;" in page.text
        action = f'action="/admin/quarantine/inbox/{bad.id}/replay"'
        assert action in page.text and page.text.count('<form class="replay"') == 1
        path = f"/admin/quarantine/inbox/{bad.id}/replay"
        assert (await c.post(path, data={"reason": "fixed"})).status_code == 403, "no CSRF token"
        csrf = csrf_of(page.text)
        r = await c.post(path, data={"csrf": csrf, "reason": "  "})
        assert r.status_code == 303
        assert flash_of((await c.get("/admin/quarantine")).text) == "a reason is required to replay an item"

        app.state.escrow.engine.on_job_request = type(app.state.escrow.engine).on_job_request.__get__(
            app.state.escrow.engine
        )
        r = await c.post(path, data={"csrf": csrf, "reason": "handler fixed"})
        assert r.status_code == 303 and r.headers["location"] == "/admin/quarantine"
        assert flash_of((await c.get("/admin/quarantine")).text).startswith("inbox ")
        await wait_until(lambda: job_state(app, bad.id), 10, "the replayed event processed")
        r = await c.post(path, data={"csrf": csrf, "reason": "again"})
        assert "replay refused" in flash_of((await c.get("/admin/quarantine")).text)
        assert "Nothing is quarantined." in (await c.get("/admin/quarantine")).text
    assert [a[0::2] for a in await audit(app)] == [
        ("replay_quarantined", "pending"),
        ("replay_quarantined", "refused: not_found"),
    ]


async def test_replay_from_the_dashboard_in_headless_chromium(app: FastAPI, backend: str) -> None:
    """The quarantine page under its Content-Security-Policy in a real browser (Debian's Chromium)."""
    bad = job_request(1_000_003)
    poison(app, {bad.id})
    async with api(app) as c:
        assert (await c.post("/v1/events", json=bad.to_dict())).status_code == 202
        await wait_until(lambda: quarantined(c, bad.id), 20, "the poisoned event quarantined")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    async with serving(app) as base, chromium_page() as page:
        blocked: list[str] = []
        page.on("console", lambda m: blocked.append(m.text) if "Content Security Policy" in m.text else None)
        await page.goto(base + "/admin/login")
        await page.fill("#token", TOKEN)
        async with page.expect_navigation():
            await page.click("section.login button")
        assert await page.inner_text("#quarantined a") == "1"
        await page.click("header nav >> text=Quarantine")
        row = page.locator(f'tr[data-ref="{bad.id}"]')
        assert "inbox" in await row.inner_text() and HOSTILE in await row.inner_text(), "shown as text, not run"
        await page.screenshot(path=str(ARTIFACTS / f"11-quarantine-{backend}.png"), full_page=True)
        app.state.escrow.engine.on_job_request = type(app.state.escrow.engine).on_job_request.__get__(
            app.state.escrow.engine
        )
        await row.locator('input[name="reason"]').fill("handler fixed")
        async with page.expect_navigation():
            await row.locator("button").click()
        assert (await page.inner_text("p.flash")).endswith("will be processed again (now pending)")
        await wait_until(lambda: job_state(app, bad.id), 10, "the replayed event processed")
        await page.reload()
        assert await page.locator("#quarantine").count() == 0 and "Nothing is quarantined." in await page.content()
        assert blocked == [], "the page needs nothing the policy forbids"
