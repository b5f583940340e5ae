"""Public views show a payout's reason code, never its free text (which may name internal hosts).

The payout's error comes from the real LNURL client refusing a Lightning address whose host
resolves to a private address; the DNS answer is injected (fault injection: no resolver here
knows ``internal-db.corp``). The admin view keeps the whole text.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI

from service.app import create_app
from service.config import Settings
from service.db import create_engine, session_factory, utcnow
from service.escrow.models import Job, TimelineEntry
from service.lightning import lnurl
from service.payouts import DestinationKind, PayoutKind
from service.payouts.models import Payout

TOKEN = "admin-token-0123456789-abcdefghijklmnop"
JOB = "ab" * 32


async def _ssrf_error() -> str:
    async def resolver(host: str, port: int) -> list[str]:
        return ["10.1.2.3"]

    with pytest.raises(lnurl.LnurlError) as exc:
        await lnurl.fetch_invoice("carol@internal-db.corp", 5_000, resolver=resolver)
    return str(exc.value)


@pytest.fixture
async def app(database_url: str) -> AsyncIterator[FastAPI]:
    application = create_app(Settings(_env_file=None, database_url=database_url, admin_token=TOKEN))
    engine = create_engine(database_url)
    application.state.sessions = session_factory(engine)
    try:
        yield application
    finally:
        await engine.dispose()


@pytest.mark.parametrize("prefix", ["", "fetching invoice: "])
async def test_public_job_view_shows_the_code_and_the_admin_the_text(app: FastAPI, prefix: str) -> None:
    text = prefix + await _ssrf_error()
    assert "10.1.2.3" in text and "internal-db.corp" in text
    async with app.state.sessions.begin() as s:
        s.add(Job(id=JOB, customer="cd" * 32, state="refunding", request_raw="{}"))
        s.add(
            Payout(
                id=f"{JOB}:refund",
                kind=PayoutKind.REFUND,
                job_id=JOB,
                payee="cd" * 32,
                amount_msat=5_000,
                destination_kind=DestinationKind.LUD16,
                destination="carol@internal-db.corp",
                state="failed",
                attempts=3,
                last_error=text,
            )
        )
        s.add(
            TimelineEntry(
                job_id=JOB,
                kind="payment",
                at=utcnow(),
                detail=json.dumps({"payout": f"{JOB}:refund", "state": "needs_invoice", "why": text}),
            )
        )
        s.add(
            TimelineEntry(
                job_id=JOB,
                kind="effect",
                at=utcnow(),
                detail=json.dumps({"kind": "settle_hold", "state": "pending", "error": text}),
            )
        )
    expected = "blocked_address" if not prefix else "error"
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        public = await c.get(f"/v1/jobs/{JOB}")
        assert public.status_code == 200
        assert "10.1.2.3" not in public.text and "internal-db" not in public.text, public.text
        [payout] = public.json()["payouts"]
        assert payout["last_error"] == expected
        whys = [t["detail"].get("why") or t["detail"].get("error") for t in public.json()["timeline"]]
        assert whys == [expected, expected]
        admin = await c.get(f"/v1/admin/jobs/{JOB}", headers={"Authorization": f"Bearer {TOKEN}"})
        assert admin.status_code == 200
        assert admin.json()["payouts"][0]["last_error"] == text
        assert text in [t["detail"].get("why") for t in admin.json()["timeline"]]


@pytest.mark.parametrize(
    "text,code",
    [
        ("blocked_address: x resolves to 10.0.0.1", "blocked_address"),
        ("no_route: no path found", "no_route"),
        ("Timeout: x", "error"),
        ("fetching invoice: dns_failure: y", "error"),
        ("payout_failed:nospace", "error"),
        ("", "error"),
        (None, None),
    ],
)
def test_reason_codes(text: str | None, code: str | None) -> None:
    from service.api.queries import reason_code

    assert reason_code(text) == code
