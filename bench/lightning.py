"""Lightning benchmarks on the regtest network (ratios against LND itself, same run).

1. Escrow invoices per second through our layer (AddHoldInvoice + the invoice record
   committed to SQLite by group commit, durable before the call returns) vs direct
   AddHoldInvoice calls, interleaved in rounds.
2. Settlement detection latency: from the payer's SUCCEEDED to our recorded fact,
   p50 and p99 over N payments, with the settlement watcher running as in the service.

    python -m bench.lightning [--invoices 300] [--payments 200] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import tempfile
import time
from datetime import UTC

from sqlalchemy import select

from bench.common import percentile, stack, stack_down, write
from service.db import create_engine, session_factory
from service.lightning.client import LndClient, PaymentStatus
from service.lightning.invoices import EscrowInvoices, HoldSizing
from service.lightning.models import LnFact
from service.lightning.settlement import SettlementWatcher
from service.migrate import upgrade_async


def client(desc: dict, node: str) -> LndClient:
    n = desc["nodes"][node]
    return LndClient.from_files(n["rpc"], n["tls_cert"], n["macaroon"])


async def run_pool(n: int, concurrency: int, make) -> float:
    """Run make(i) n times with the given concurrency; returns calls per second."""
    queue = iter(range(n))

    async def worker() -> None:
        for i in queue:
            await make(i)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - t0)


async def invoice_rates(lnd: LndClient, sessions, n: int, concurrency: int, rounds: int = 6) -> dict:
    invoices = EscrowInvoices(lnd, HoldSizing(), expiry_seconds=600, sessions=sessions)

    async def direct(_i: int) -> None:
        pre = os.urandom(32)
        await lnd.add_hold_invoice(
            hashlib.sha256(pre).digest(),
            10_000,
            memo="bench direct",
            expiry=600,
            cltv_expiry=HoldSizing().cltv_blocks(3600),
        )

    async def ours(i: int) -> None:
        await invoices.create(
            None, job_id=f"bench-{i}", amount_msat=10_000, mode="hold", hold_seconds=3600, memo="bench ours"
        )

    await run_pool(20, concurrency, direct)  # warm-up
    await run_pool(20, concurrency, ours)
    d_rates, o_rates = [], []
    per = max(1, n // rounds)
    for _ in range(rounds):
        d_rates.append(await run_pool(per, concurrency, direct))
        o_rates.append(await run_pool(per, concurrency, ours))
    d, o = sum(d_rates) / rounds, sum(o_rates) / rounds
    return {
        "direct_add_hold_invoice_per_s": round(d, 1),
        "ours_per_s": round(o, 1),
        "ratio": round(o / d, 3),
        "rounds": {"direct": [round(x, 1) for x in d_rates], "ours": [round(x, 1) for x in o_rates]},
        "invoices": per * rounds * 2,
        "concurrency": concurrency,
        "target_ratio": 0.8,
    }


async def detection_latency(escrow: LndClient, customer: LndClient, sessions, n: int) -> dict:
    invoices = EscrowInvoices(escrow, HoldSizing(), expiry_seconds=600)
    watcher = SettlementWatcher(escrow, sessions, sweep_interval=3600)
    await watcher.start()
    while not watcher.health.connected:
        await asyncio.sleep(0.05)
    latencies = []
    try:
        for i in range(n):
            async with sessions.begin() as s:
                inv = await invoices.create(s, job_id=f"lat-{i}", amount_msat=5_000 + i, mode="custodial")
            p = await customer.pay(inv.payment_request, fee_limit_msat=10_000, timeout_seconds=30)
            t_paid = time.time()
            assert p.status == PaymentStatus.SUCCEEDED, p
            observed = None
            for _ in range(2000):
                async with sessions() as s:
                    observed = await s.scalar(
                        select(LnFact.observed_at).where(
                            LnFact.payment_hash == inv.payment_hash, LnFact.kind == "settled"
                        )
                    )
                if observed is not None:
                    break
                await asyncio.sleep(0.002)
            if observed is None:
                raise RuntimeError(f"settlement of payment {i} never detected")
            if observed.tzinfo is None:
                observed = observed.replace(tzinfo=UTC)
            latencies.append((observed.timestamp() - t_paid) * 1000)
    finally:
        await watcher.stop()
    return {
        "payments": n,
        "p50_ms": round(percentile(latencies, 50), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "min_ms": round(min(latencies), 2),
        "max_ms": round(max(latencies), 2),
        "target_p50_ms": 50,
        "note": "negative = our fact was recorded before the payer saw SUCCEEDED",
    }


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--invoices", type=int, default=600)
    ap.add_argument("--payments", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    desc = stack()
    escrow, customer = client(desc, "escrow"), client(desc, "customer")
    tmp = tempfile.mkdtemp(prefix="fedstr-bench-")
    url = f"sqlite+aiosqlite:///{tmp}/bench.sqlite3"
    await upgrade_async(url)
    engine = create_engine(url)
    sessions = session_factory(engine)
    try:
        rates = await invoice_rates(escrow, sessions, args.invoices, args.concurrency)
        print(
            f"escrow invoices: ours {rates['ours_per_s']}/s vs direct AddHoldInvoice "
            f"{rates['direct_add_hold_invoice_per_s']}/s -> ratio {rates['ratio']} (target >= 0.8)"
        )
        lat = await detection_latency(escrow, customer, sessions, args.payments)
        print(
            f"settlement detection over {lat['payments']} payments: p50 {lat['p50_ms']} ms, "
            f"p99 {lat['p99_ms']} ms (target p50 <= 50 ms)"
        )
        path = write(
            "lightning",
            {
                "invoice_creation": rates,
                "settlement_detection": lat,
                "lnd_version": desc["lnd_version"],
                "database": "sqlite",
            },
        )
        print(f"results: {path}")
    finally:
        await engine.dispose()
        await escrow.close()
        await customer.close()
        stack_down(desc)


if __name__ == "__main__":
    asyncio.run(main())
