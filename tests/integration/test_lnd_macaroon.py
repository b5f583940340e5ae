"""The macaroon docs/operations.md tells operators to bake is enough for every call the service makes
(the rights list, read from the doc), and LND enforces a macaroon's rights."""

from __future__ import annotations

import asyncio
import re
import subprocess
from pathlib import Path

import pytest

from service.lightning import errors
from service.lightning.client import LndClient
from tests.conftest import Regtest, devstack, new_preimage

pytestmark = pytest.mark.lnd

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def _documented_rights() -> list[str]:
    m = re.search(r"lncli bakemacaroon --save_to escrow\.macaroon \\\n\s+([a-z: ]+)\n", OPERATIONS.read_text())
    assert m, "docs/operations.md no longer shows the bakemacaroon line this test reads"
    return m[1].split()


def _bake(regtest: Regtest, rights: list[str]) -> bytes:
    stack = regtest.stack
    argv = [
        str(devstack.BIN / "lncli"),
        "--network=regtest",
        f"--lnddir={stack.lnddir('escrow')}",
        f"--rpcserver=127.0.0.1:{stack.port('escrow')}",
        "bakemacaroon",
        *rights,
    ]
    return bytes.fromhex(subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout.strip())


async def test_the_documented_macaroon_allows_every_call_the_service_makes(regtest: Regtest) -> None:
    rights = _documented_rights()
    escrow = regtest.node("escrow")
    mac = await asyncio.to_thread(_bake, regtest, rights)
    async with LndClient(escrow["rpc"], Path(escrow["tls_cert"]).read_bytes(), mac) as lnd:
        await lnd.get_info()
        await lnd.channel_balance()
        await lnd.channel_htlcs()  # ListChannels, PendingChannels (a stuck payment's view)
        payee = await regtest.payee.add_invoice(3_000, memo="macaroon check")
        await lnd.decode_pay_req(payee.payment_request)
        assert await lnd.route_fee(payee.payment_request) == 0  # QueryRoutes
        assert (await lnd.estimate_route_fee(payee.payment_request, timeout_seconds=10)).fee_msat == 0
        p = await lnd.pay(payee.payment_request, fee_limit_msat=0, timeout_seconds=20)  # SendPaymentV2
        assert [q.status async for q in lnd.track_payment(payee.payment_hash)][-1] == p.status
        _, h = new_preimage()
        await lnd.add_hold_invoice(h, 1_000, memo="macaroon check")
        await lnd.lookup_invoice(h)
        await lnd.cancel_invoice(h)
        await lnd.add_invoice(1_000, memo="macaroon check")
        await lnd.list_invoices(max_invoices=1)
        async for _ in lnd.subscribe_single_invoice(h):
            break
        await lnd.delete_canceled_invoice(h)
    # The rights are enforced (so the list above is what was tested): without offchain:read, no ChannelBalance.
    narrow = await asyncio.to_thread(_bake, regtest, ["info:read"])
    async with LndClient(escrow["rpc"], Path(escrow["tls_cert"]).read_bytes(), narrow) as lnd:
        with pytest.raises(errors.LndAuthError):
            await lnd.channel_balance()
