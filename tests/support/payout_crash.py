"""A payout worker that dies at a chosen point (fault injection: stands in for SIGKILL).

Usage: python -m tests.support.payout_crash DB_URL STACK_JSON WHERE
WHERE = after_write_ahead (dies before SendPaymentV2) | in_flight (dies on the first
payment update from LND, i.e. with the payment under way).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from service.db import create_engine, session_factory
from service.lightning.client import LndClient
from service.payouts import PayoutPolicy
from service.payouts.worker import Payouts
from tests.support.payouts import pay_due

DIE = 9


class Crashing(Payouts):
    where = ""

    async def _send(self, payout_id, payment_hash, payreq, fee_limit):
        if self.where == "after_write_ahead":
            os._exit(DIE)
        return await super()._send(payout_id, payment_hash, payreq, fee_limit)

    async def _follow(self, stream):
        async for _update in stream:
            if self.where == "in_flight":
                os._exit(DIE)
        return None


async def main(db_url: str, stack_json: str, where: str) -> None:
    node = json.load(open(stack_json))["nodes"]["escrow"]
    lnd = LndClient.from_files(node["rpc"], node["tls_cert"], node["macaroon"])
    payouts = Crashing(
        lnd,
        session_factory(create_engine(db_url)),
        PayoutPolicy(network="regtest", min_expiry_seconds=60, lease_seconds=1.0),
        our_pubkey=node["pubkey"],
    )
    payouts.where = where
    await pay_due(payouts)
    print("the worker was supposed to die", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
