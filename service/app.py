"""FastAPI application factory; the lifespan builds and closes shared clients."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from service import __version__
from service.api import admin, blobs, dashboard, errors, metrics, public
from service.api.limits import BodyLimit, FailureThrottle, RateLimiter
from service.config import Settings, token_problem
from service.db import create_engine, session_factory
from service.escrow.service import EscrowService
from service.health import readiness
from service.leader import Leadership
from service.lightning import webhook
from service.lightning.client import LndClient
from service.lightning.errors import LndError
from service.node import LightningService
from service.nostr.keys import load_or_create, parse_secret
from service.nostr.nip01 import SecretKey
from service.nostr.outbox import PublisherConfig
from service.nostr.service import NostrService
from service.signals import Signals

if TYPE_CHECKING:
    import uvicorn


class Liveness(BaseModel):
    status: str
    version: str


class CheckOut(BaseModel):
    ok: bool
    detail: str
    latency_ms: float
    info: dict | None = None


class RelayCheckOut(CheckOut):
    url: str


class ReadinessChecks(BaseModel):
    database: CheckOut
    lnd: CheckOut
    settlement: CheckOut | None = None
    relays: list[RelayCheckOut]


class WebhookAck(BaseModel):
    accepted: bool
    payment_hash: str
    fact: str | None
    lnd_state: str | None
    detail: str


class Readiness(BaseModel):
    status: str
    checks: ReadinessChecks


def uvicorn_config(app: FastAPI, settings: Settings, **kw: Any) -> uvicorn.Config:
    """The uvicorn configuration of the service: proxy headers (``X-Forwarded-For`` and
    ``X-Forwarded-Proto``) are honoured only from ``FEDSTR_TRUSTED_PROXIES``; with none, from
    nobody (uvicorn's own default trusts loopback, which would let anyone behind a local
    forwarder pick their rate-limit bucket)."""
    import uvicorn

    trusted = list(settings.trusted_proxies)
    return uvicorn.Config(
        app,
        host=kw.pop("host", settings.http_host),
        port=kw.pop("port", settings.http_port),
        proxy_headers=bool(trusted),
        forwarded_allow_ips=trusted or [],
        **kw,
    )


def build_lnd(settings: Settings) -> LndClient | None:
    if settings.lnd_tls_cert_path is None or settings.lnd_macaroon_path is None:
        return None
    return LndClient.from_files(
        settings.lnd_grpc_host,
        settings.lnd_tls_cert_path,
        settings.lnd_macaroon_path,
        timeout=settings.lnd_timeout_seconds,
    )


def load_key(settings: Settings) -> SecretKey:
    if settings.nostr_secret_key is not None:
        return parse_secret(settings.nostr_secret_key.get_secret_value())
    return load_or_create(settings.nostr_key_file)


def check_tokens(settings: Settings) -> None:
    """Refuse to build an app whose tokens break the settings' rule (``model_copy`` skips validators)."""
    for name, token in (("FEDSTR_ADMIN_TOKEN", settings.admin_token), ("FEDSTR_METRICS_TOKEN", settings.metrics_token)):
        problem = token_problem(token.get_secret_value()) if token is not None else None
        if problem is not None:
            raise ValueError(f"{name} {problem}")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    check_tokens(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings.database_url)
        app.state.engine = engine
        app.state.sessions = session_factory(engine)
        app.state.lnd = build_lnd(settings)
        # One set of signals between the loops: the pool, the watcher and the payout worker wake
        # the escrow loop (it subscribes itself); its progress wakes the publisher and the payouts.
        signals = app.state.signals = Signals()
        app.state.lightning = None
        if app.state.lnd is not None:
            app.state.lightning = LightningService(app.state.lnd, app.state.sessions, settings, signals)
            signals.progress.connect(app.state.lightning.wake_payouts)
        key = load_key(settings)
        app.state.escrow = EscrowService(app.state.sessions, settings, key, app.state.lightning, signals)
        app.state.nostr = None
        if settings.relays:
            app.state.nostr = NostrService(
                app.state.sessions,
                settings.relays,
                key,
                quarantine=app.state.escrow.quarantine,
                publisher_config=PublisherConfig(reply_relays_allow_private=settings.reply_relays_allow_private),
                signals=signals,
            )
            signals.progress.connect(app.state.nostr.publisher.wake)

        app.state.blob_sweeper = None

        async def gain() -> None:  # this replica leads: watchers, publisher, announcement, blob expiry
            if app.state.lightning is not None:
                await app.state.lightning.start_leader()
            if app.state.nostr is not None:
                await app.state.nostr.start()
            await app.state.escrow.announce()
            app.state.blob_sweeper = asyncio.create_task(blobs.run_sweeper(app), name="blob sweeper")

        async def loss() -> None:
            if app.state.blob_sweeper is not None:
                app.state.blob_sweeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await app.state.blob_sweeper
                app.state.blob_sweeper = None
            if app.state.nostr is not None:
                await app.state.nostr.stop()
            if app.state.lightning is not None:
                await app.state.lightning.stop_leader()

        app.state.leadership = Leadership(engine, gain, loss)
        if app.state.lightning is not None:
            await app.state.lightning.start_workers()
        await app.state.escrow.heartbeat.start()  # before the timers: a restart's outage is on record first
        await app.state.escrow.loop.start()
        await app.state.leadership.start()
        try:
            yield
        finally:
            await app.state.leadership.stop()
            await app.state.escrow.loop.stop()
            await app.state.escrow.heartbeat.stop()
            if app.state.lightning is not None:
                await app.state.lightning.stop()
            if app.state.lnd is not None:
                await app.state.lnd.close()
            await engine.dispose()

    app = FastAPI(
        title="fedstr-escrow",
        version=__version__,
        lifespan=lifespan,
        description="Lightning escrow for a FEDSTR machine-learning training marketplace on Nostr.",
    )
    app.state.settings = settings
    app.state.limits_events = RateLimiter(settings.events_per_minute, settings.events_burst)
    app.state.limits_invoices = RateLimiter(settings.invoices_per_minute, settings.invoices_burst)
    app.state.admin_failures = FailureThrottle()  # wrong admin/metrics tokens and sign-ins, per address
    app.state.webhooks_refused = Counter()  # reason -> count (metrics): this app's, not the module's
    errors.install(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, exempt_paths=frozenset({"/blobs/upload"}))
    app.include_router(public.router)
    app.include_router(admin.router)
    app.include_router(metrics.router)
    app.include_router(dashboard.router)
    app.include_router(blobs.router)

    @app.get("/v1/health/live", response_model=Liveness, tags=["health"])
    async def live() -> Liveness:
        """The process is up and serving HTTP."""
        return Liveness(status="ok", version=__version__)

    @app.get(
        "/v1/health/ready",
        response_model=Readiness,
        tags=["health"],
        responses={503: {"model": Readiness, "description": "a dependency is not ready"}},
    )
    async def ready(request: Request) -> JSONResponse:
        """Database, LND (reachable and synced) and relays (at least one answering)."""
        nostr = request.app.state.nostr
        lightning = request.app.state.lightning
        leader = request.app.state.leadership.is_leader  # followers run no pool and no watcher
        body = await readiness(
            request.app.state.engine,
            request.app.state.lnd,
            settings.relays,
            pool_status=nostr.pool.status() if nostr and leader else None,
            watcher=lightning.watcher.health.as_dict() if lightning and leader else None,
        )
        return JSONResponse(body, status_code=200 if body["status"] == "ready" else 503)

    @app.post(
        "/v1/webhooks/lnd",
        response_model=WebhookAck,
        tags=["webhooks"],
        status_code=202,
        responses=errors.responses(401, 503),
    )
    async def lnd_webhook(request: Request) -> JSONResponse:
        """A hint from an LND-side notifier (HMAC-SHA256 + timestamp). It only triggers a lookup in
        LND; the answer of the lookup, never the webhook, decides what is recorded."""
        body = await request.body()
        secret = settings.webhook_secret.get_secret_value().encode() if settings.webhook_secret else None
        now = int(time.time())
        try:
            h, signature = webhook.verify(
                secret,
                {k.lower(): v for k, v in request.headers.items()},
                body,
                now=now,
                window=settings.webhook_window_seconds,
            )
            async with request.app.state.sessions.begin() as s:
                await webhook.consume(s, signature, now=now, window=settings.webhook_window_seconds)
        except webhook.WebhookError as e:
            request.app.state.webhooks_refused[e.reason.value] += 1
            status = 503 if e.reason == webhook.WebhookReason.NOT_CONFIGURED else 401
            return errors.problem(status, e.reason.value, e.message)
        lightning = request.app.state.lightning
        if lightning is None:
            return errors.problem(503, "lnd_not_configured", "no LND node is configured")
        try:
            result = await lightning.watcher.confirm(h, "webhook")
        except LndError as e:
            return JSONResponse(
                {
                    "accepted": True,
                    "payment_hash": h,
                    "lnd_state": None,
                    "fact": None,
                    "detail": f"lookup failed: {type(e).__name__}",
                },
                status_code=202,
            )
        return JSONResponse(
            {
                "accepted": True,
                "payment_hash": h,
                "fact": result.kind,
                "lnd_state": result.lnd_state.name if result.lnd_state else None,
                "detail": result.detail,
            },
            status_code=202,
        )

    return app
