"""LNURL-pay against a real LNURL server whose invoices come from the regtest payee node.

The server is a small ASGI app run by uvicorn on a free loopback port; its callback creates
invoices on the payee LND with ``description_hash = sha256(metadata)``. Loopback is a
private address, so the client runs with ``allow_private=True`` except where the refusal
itself is tested.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator
from urllib.parse import parse_qs

import bech32
import pytest
import uvicorn

from service.lightning import errors
from service.lightning.client import InvoiceState, LndClient, PaymentStatus
from service.lightning.lnurl import LnurlError, LnurlReason, fetch_invoice
from service.payouts import Destination, DestinationKind, NewPayout, PayoutKind
from service.payouts.store import create as create_payout
from tests.conftest import Regtest, free_port, wait_until
from tests.support.payouts import pay_due

pytestmark = pytest.mark.lnd

AMOUNT = 123_000
META = json.dumps([["text/plain", "FEDSTR reward ✓"], ["text/identifier", "alice@127.0.0.1"]], ensure_ascii=False)


class LnurlPayServer:
    """``/.well-known/lnurlp/<name>`` and ``/cb/<name>``; the name picks the behaviour:
    ``alice`` is honest, ``wrongamount`` adds 1 sat, ``wronghash`` commits to other metadata."""

    def __init__(self, payee: LndClient) -> None:
        self.payee = payee
        self.port = free_port()
        self.requests: list[str] = []
        self.invoices: dict[str, list[bytes]] = {}

    def address(self, name: str) -> str:
        return f"{name}@127.0.0.1:{self.port}"

    async def app(self, scope: dict, receive, send) -> None:
        assert scope["type"] == "http"
        path: str = scope["path"]
        self.requests.append(path)
        query = parse_qs(scope["query_string"].decode())
        status, body = 404, {"status": "ERROR", "reason": "not found"}
        if path.startswith("/.well-known/lnurlp/"):
            name = path.rsplit("/", 1)[1]
            status, body = (
                200,
                {
                    "tag": "payRequest",
                    "callback": f"http://127.0.0.1:{self.port}/cb/{name}",
                    "minSendable": 1_000,
                    "maxSendable": 1_000_000_000,
                    "metadata": META,
                },
            )
        elif path.startswith("/cb/"):
            name = path.rsplit("/", 1)[1]
            amount = int(query["amount"][0])
            value = amount + 1_000 if name == "wrongamount" else amount
            signed = META if name != "wronghash" else json.dumps([["text/plain", "something else"]])
            added = await self.payee.add_invoice(
                value, expiry=600, description_hash=hashlib.sha256(signed.encode("utf-8")).digest()
            )
            self.invoices.setdefault(name, []).append(added.payment_hash)
            status, body = 200, {"pr": added.payment_request, "routes": []}
        await send(
            {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]}
        )
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})


@pytest.fixture
async def lnurl_server(regtest: Regtest) -> AsyncIterator[LnurlPayServer]:
    s = LnurlPayServer(regtest.payee)
    server = uvicorn.Server(
        uvicorn.Config(
            s.app,
            host="127.0.0.1",
            port=s.port,
            lifespan="off",
            interface="asgi3",
            log_level="warning",
            access_log=False,
        )
    )
    task = asyncio.create_task(server.serve())
    await wait_until(lambda: server.started, 10, "LNURL test server listening")
    try:
        yield s
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def assert_unpaid(regtest: Regtest, payment_hash: bytes) -> None:
    inv = await regtest.payee.lookup_invoice(payment_hash)
    assert inv.state == InvoiceState.OPEN and inv.amt_paid_msat == 0
    with pytest.raises(errors.LndNotFound):
        async for _ in regtest.escrow.track_payment(payment_hash):
            pass


async def test_lightning_address_invoice_is_paid_by_escrow(regtest: Regtest, lnurl_server: LnurlPayServer) -> None:
    got = await fetch_invoice(lnurl_server.address("alice"), AMOUNT, allow_private=True, network="regtest")
    assert lnurl_server.requests == ["/.well-known/lnurlp/alice", "/cb/alice"]
    assert got.payment_hash == lnurl_server.invoices["alice"][0]
    assert got.amount_msat == AMOUNT
    assert got.description_hash == hashlib.sha256(META.encode("utf-8")).digest()
    assert got.payee_pubkey == regtest.node("payee")["pubkey"]

    decoded = await regtest.escrow.decode_pay_req(got.bolt11)  # LND agrees with our decoding
    assert decoded.num_msat == AMOUNT
    assert decoded.payment_hash == got.payment_hash
    assert decoded.description_hash == got.description_hash
    assert decoded.destination == regtest.node("payee")["pubkey"]

    paid = await regtest.escrow.pay(got.bolt11, fee_limit_msat=10_000)
    assert paid.status == PaymentStatus.SUCCEEDED
    assert paid.payment_hash == got.payment_hash and paid.value_msat == AMOUNT
    settled = await regtest.payee.lookup_invoice(got.payment_hash)
    assert settled.state == InvoiceState.SETTLED and settled.amt_paid_msat == AMOUNT


async def test_bech32_lnurl_to_the_same_service_gives_a_payable_invoice(
    regtest: Regtest, lnurl_server: LnurlPayServer
) -> None:
    url = f"http://127.0.0.1:{lnurl_server.port}/.well-known/lnurlp/alice"
    encoded = bech32.bech32_encode("lnurl", bech32.convertbits(url.encode(), 8, 5)).upper()
    got = await fetch_invoice("lightning:" + encoded, 5_000, allow_private=True)
    decoded = await regtest.escrow.decode_pay_req(got.bolt11)
    assert decoded.num_msat == 5_000 and decoded.payment_hash == got.payment_hash
    assert got.payment_hash == lnurl_server.invoices["alice"][0]


@pytest.mark.parametrize(
    "name, reason", [("wrongamount", LnurlReason.AMOUNT_MISMATCH), ("wronghash", LnurlReason.DESCRIPTION_HASH_MISMATCH)]
)
async def test_dishonest_invoice_is_refused_and_never_paid(
    regtest: Regtest, lnurl_server: LnurlPayServer, name: str, reason: LnurlReason
) -> None:
    with pytest.raises(LnurlError) as ei:
        await fetch_invoice(lnurl_server.address(name), AMOUNT, allow_private=True, network="regtest")
    assert ei.value.reason == reason
    (payment_hash,) = lnurl_server.invoices[name]  # the service did issue a (bad) invoice
    await assert_unpaid(regtest, payment_hash)


async def test_loopback_service_is_blocked_without_allow_private(lnurl_server: LnurlPayServer) -> None:
    with pytest.raises(LnurlError) as ei:
        await fetch_invoice(lnurl_server.address("alice"), AMOUNT)
    assert ei.value.reason == LnurlReason.BLOCKED_ADDRESS
    assert lnurl_server.requests == []


async def test_payout_to_a_lightning_address_fetches_a_fresh_invoice_and_pays_once(
    regtest: Regtest, lnurl_server: LnurlPayServer, database_url: str
) -> None:
    """The payout worker end to end: lud16 destination -> LNURL-pay -> checks -> SendPaymentV2."""
    from service.db import create_engine, session_factory
    from service.payouts import PayoutPolicy
    from service.payouts.models import Payout
    from service.payouts.worker import Payouts

    engine = create_engine(database_url)
    sessions = session_factory(engine)
    try:
        payouts = Payouts(
            regtest.escrow,
            sessions,
            PayoutPolicy(network="regtest", min_expiry_seconds=60, lnurl_allow_private=True),
            our_pubkey=regtest.node("escrow")["pubkey"],
        )
        async with sessions.begin() as s:
            await create_payout(
                s,
                NewPayout(
                    "lud16-reward",
                    None,
                    PayoutKind.REWARD,
                    "bb" * 32,
                    AMOUNT,
                    Destination(DestinationKind.LUD16, lnurl_server.address("bob")),
                ),
            )
        [outcome] = await pay_due(payouts)
        assert outcome.state == "succeeded", outcome
        [h] = lnurl_server.invoices["bob"]
        async with sessions() as s:
            p = await s.get(Payout, "lud16-reward")
        assert p.payment_hash == h.hex()
        inv = await regtest.payee.lookup_invoice(h)
        assert inv.state == InvoiceState.SETTLED and inv.amt_paid_msat == AMOUNT
        assert await pay_due(payouts) == []
    finally:
        await engine.dispose()
