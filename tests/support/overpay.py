"""Pay a BOLT11 invoice with MORE than its amount, as a hostile or careless payer can.

LND's SendPaymentV2 pays an invoice's exact amount; a route built by hand (``BuildRoute`` +
``SendToRouteV2``, both LND's own RPCs) may carry more, and LND accepts an HTLC set of up to
twice an invoice's amount. Test support only: it uses the client's stubs directly.
"""

from __future__ import annotations

from service.lightning._stubs import rt
from service.lightning.client import LndClient


async def overpay(payer: LndClient, payment_request: str, amount_msat: int, *, timeout: float = 60) -> int:
    """Send ``amount_msat`` to ``payment_request``'s node over a direct channel; returns the
    attempt's status (0 in flight, 1 succeeded, 2 failed). Blocks while a hold invoice holds it."""
    pr = await payer.decode_pay_req(payment_request)
    route = await payer._rt.BuildRoute(
        rt.BuildRouteRequest(  # test support
            amt_msat=amount_msat,
            final_cltv_delta=pr.cltv_expiry,
            hop_pubkeys=[bytes.fromhex(pr.destination)],
            payment_addr=pr.payment_addr,
        ),
        metadata=payer._md,
        timeout=15,
    )
    attempt = await payer._rt.SendToRouteV2(
        rt.SendToRouteRequest(payment_hash=pr.payment_hash, route=route.route), metadata=payer._md, timeout=timeout
    )
    return int(attempt.status)
