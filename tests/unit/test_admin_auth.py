"""Admin authentication holds for every source: the admin token's rules at start-up, empty and
wrong bearer tokens, one throttle for wrong tokens (API, dashboard login, metrics), and a logout
that revokes its session server-side (in the database, so on every replica).

The app is the real one on a migrated SQLite database, reached over ASGI (no LND or relay).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from pydantic import SecretStr, ValidationError

from service.app import create_app
from service.config import Settings
from service.db import create_engine, session_factory
from tests.conftest import free_port

TOKEN = "admin-token-0123456789-abcdefghijklmnop"  # 40 characters
ADMIN_PATH = "/v1/admin/rejected-events"  # needs nothing but the database


def settings(database_url: str, **over: object) -> Settings:
    return Settings(_env_file=None, database_url=database_url, admin_token=TOKEN, **over)


@pytest.fixture
async def app(database_url: str) -> AsyncIterator[FastAPI]:
    """The real app, without its lifespan (nothing here needs LND or the relays)."""
    application = create_app(settings(database_url))
    engine = create_engine(database_url)
    application.state.sessions = session_factory(engine)
    try:
        yield application
    finally:
        await engine.dispose()


def client(app: FastAPI, host: str = "203.0.113.7") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(host, 50000)), base_url="http://testserver")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ---- the token's rules at start-up ----------------------------------------------------------


@pytest.mark.parametrize(
    "value,needle", [("", "empty"), ("   \t", "empty"), ("short-admin-token", "at least 32"), ("x" * 31, "at least 32")]
)
def test_an_empty_or_short_admin_token_is_refused(value: str, needle: str) -> None:
    with pytest.raises(ValidationError) as exc:
        Settings(_env_file=None, admin_token=value)
    assert "admin_token" in str(exc.value) and needle in str(exc.value)
    assert value.strip() == "" or value not in str(exc.value), "the refused token is not echoed"


def test_unset_disables_and_a_long_token_is_kept_without_surrounding_space() -> None:
    assert Settings(_env_file=None).admin_token is None
    s = Settings(_env_file=None, admin_token=f"  {TOKEN}\n")
    assert s.admin_token is not None and s.admin_token.get_secret_value() == TOKEN


def test_the_cli_refuses_to_start_with_an_empty_admin_token(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "FEDSTR_ADMIN_TOKEN": "",
        "FEDSTR_HTTP_PORT": str(free_port()),
        "FEDSTR_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite3'}",
        "FEDSTR_NOSTR_KEY_FILE": str(tmp_path / "key"),
    }
    r = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert r.returncode == 2, r.stderr
    assert "FEDSTR_ADMIN_TOKEN" in r.stderr and "empty" in r.stderr


def test_the_app_refuses_settings_that_bypassed_validation(database_url: str) -> None:
    """``model_copy`` skips validators: the app checks the token again when it is built."""
    for bad in ("", "too-short"):
        tampered = Settings(_env_file=None, database_url=database_url).model_copy(
            update={"admin_token": SecretStr(bad)}
        )
        with pytest.raises(ValueError, match="FEDSTR_ADMIN_TOKEN"):
            create_app(tampered)


# ---- bearer tokens -------------------------------------------------------------------------------


async def test_an_empty_bearer_token_is_401_in_every_case(app: FastAPI) -> None:
    async with client(app) as c:
        assert (await c.get(ADMIN_PATH, headers=bearer(TOKEN))).status_code == 200
        for header in ("Bearer ", "Bearer", "bearer    ", "Bearer \t", "Basic " + TOKEN, TOKEN):
            r = await c.get(ADMIN_PATH, headers={"Authorization": header})
            assert r.status_code == 401 and r.json()["code"] == "unauthorized", header
        # Even if the configured token were empty (settings swapped at run time, validation
        # bypassed), an empty bearer token never matches it.
        app.state.settings = app.state.settings.model_copy(update={"admin_token": SecretStr("")})
        r = await c.get(ADMIN_PATH, headers={"Authorization": "Bearer "})
        assert r.status_code in (401, 503) and r.status_code != 200, r.text
        r = await c.post(
            "/v1/admin/reconciliation/resume", json={"reason": "attack"}, headers={"Authorization": "Bearer "}
        )
        assert r.status_code in (401, 503), r.text


async def test_wrong_bearer_tokens_are_throttled_with_the_dashboard_login(app: FastAPI) -> None:
    throttle = app.state.admin_failures
    async with client(app) as attacker, client(app, host="198.51.100.9") as operator:
        for i in range(throttle.allowed):
            r = await attacker.get(ADMIN_PATH, headers=bearer(f"guess-{i}"))
            assert r.status_code == 401, (i, r.text)
        r = await attacker.get(ADMIN_PATH, headers=bearer("guess-again"))
        assert r.status_code == 429 and r.json()["code"] == "too_many_failures"
        assert int(r.headers["retry-after"]) >= 1
        # The right token from the throttled address is refused too, until the window passes ...
        r = await attacker.get(ADMIN_PATH, headers=bearer(TOKEN))
        assert r.status_code == 429, "a correct token does not lift the throttle"
        # ... and so is the dashboard's sign-in: one throttle for both.
        r = await attacker.post("/admin/login", data={"token": TOKEN})
        assert r.status_code == 429 and "set-cookie" not in r.headers and "retry-after" in r.headers
        # Another address is not affected.
        assert (await operator.get(ADMIN_PATH, headers=bearer(TOKEN))).status_code == 200
        # Once the window has passed (the throttle's clock moved on), the right token works again.
        start = throttle.clock()
        throttle.clock = lambda: start + throttle.window + 1
        assert (await attacker.get(ADMIN_PATH, headers=bearer(TOKEN))).status_code == 200


async def test_wrong_dashboard_logins_count_for_the_api_too(app: FastAPI) -> None:
    throttle = app.state.admin_failures
    async with client(app) as c:
        for _ in range(throttle.allowed):
            assert (await c.post("/admin/login", data={"token": "guess"})).status_code == 401
        assert (await c.get(ADMIN_PATH, headers=bearer(TOKEN))).status_code == 429


# ---- dashboard sessions ----------------------------------------------------------------------


async def _sign_in(c: httpx.AsyncClient) -> tuple[str, str]:
    r = await c.post("/admin/login", data={"token": TOKEN})
    assert r.status_code == 303 and r.headers["location"] == "/admin", r.text
    cookie = c.cookies.get("fedstr_admin")
    assert cookie and TOKEN not in cookie
    page = await c.get("/admin")
    assert page.status_code == 200
    m = re.search(r'name="csrf" value="([0-9a-f]{64})"', page.text)
    assert m
    return cookie, m.group(1)


async def test_logout_revokes_the_session_on_every_replica(app: FastAPI, database_url: str) -> None:
    replica = create_app(settings(database_url))  # a second process on the same database
    engine = create_engine(database_url)
    replica.state.sessions = session_factory(engine)
    try:
        async with client(app) as browser, client(app) as thief, client(replica) as thief2:
            cookie, csrf = await _sign_in(browser)
            for c in (thief, thief2):
                c.cookies.set("fedstr_admin", cookie, path="/admin")
                assert (await c.get("/admin")).status_code == 200, "a copied cookie works until logout"
            r = await browser.post("/admin/logout", data={"csrf": csrf})
            assert r.status_code == 303 and r.headers["location"] == "/admin/login"
            for c in (thief, thief2):
                r = await c.get("/admin")
                assert r.status_code == 303 and r.headers["location"] == "/admin/login", "revoked"
            # A second sign-in gets a new session; the old cookie stays dead.
            new_cookie, _ = await _sign_in(browser)
            assert new_cookie != cookie
            assert (await thief.get("/admin")).status_code == 303
    finally:
        await engine.dispose()


async def test_two_sign_ins_are_two_sessions(app: FastAPI) -> None:
    async with client(app) as a, client(app) as b:
        cookie_a, csrf_a = await _sign_in(a)
        cookie_b, csrf_b = await _sign_in(b)
        assert cookie_a != cookie_b and csrf_a != csrf_b
        assert (await a.post("/admin/logout", data={"csrf": csrf_b})).status_code == 403, (
            "a CSRF token belongs to its own session"
        )
        assert (await a.post("/admin/logout", data={"csrf": csrf_a})).status_code == 303
        assert (await b.get("/admin")).status_code == 200, "signing out one session leaves the other"


@pytest.mark.postgres
async def test_logout_revokes_the_session_on_postgres(database_url: str) -> None:
    application = create_app(settings(database_url))
    engine = create_engine(database_url)
    application.state.sessions = session_factory(engine)
    try:
        await test_logout_revokes_the_session_on_every_replica(application, database_url)
        await test_two_sign_ins_are_two_sessions(application)
    finally:
        await engine.dispose()
