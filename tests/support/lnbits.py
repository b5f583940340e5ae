"""LNbits as a payee's wallet: a real LNbits process on the devstack's ``payee`` LND node.

Installed and started by ``bench.lnbits_proc`` (the benchmark's code: one place). The test
session's fixture ``lnbits_payee`` (tests/conftest.py) makes one, with one wallet.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from bench.lnbits_proc import LnbitsProc, install_lnbits, start_lnbits


class LnbitsPayee:
    """One LNbits wallet whose invoices the payee node pays out to."""

    def __init__(self, proc: LnbitsProc, wallet: dict) -> None:
        self.proc = proc
        self.url = proc.url
        self.wallet_id = wallet["wallet_id"]
        self._headers = {"X-Api-Key": wallet["inkey"]}
        self.client = httpx.AsyncClient(base_url=proc.url, timeout=30)

    async def create_invoice(self, amount: float, memo: str, unit: str | None = None) -> httpx.Response:
        """LNbits' own invoice call (``POST /api/v1/payments``; amount in sat unless ``unit`` says)."""
        body = {"out": False, "amount": amount, "memo": memo} | ({"unit": unit} if unit else {})
        return await self.client.post("/api/v1/payments", headers=self._headers, json=body)

    async def invoice(self, amount_sat: int, memo: str) -> str:
        r = await self.create_invoice(amount_sat, memo)
        if r.status_code != 201:
            raise RuntimeError(f"LNbits invoice refused: {r.status_code} {r.text[:200]}")
        return r.json()["bolt11"]

    async def paid(self, payment_hash: str) -> bool:
        r = await self.client.get(f"/api/v1/payments/{payment_hash}", headers=self._headers)
        r.raise_for_status()
        return r.json().get("paid") is True

    async def close(self) -> None:
        await self.client.aclose()
        self.proc.stop()


async def start_payee_wallet(desc: dict, workdir: Path, say=print) -> tuple[LnbitsPayee, dict]:
    """Install (on first use) and start LNbits against the payee node; returns it and timings (s)."""
    t0 = time.monotonic()
    venv = install_lnbits(say)
    t1 = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    proc, wallet = await start_lnbits(
        venv, desc, workdir, workdir / "lnbits.log", node="payee", say=say, account="fedstr-tests-payee"
    )
    return LnbitsPayee(proc, wallet), {"install_s": t1 - t0, "start_s": time.monotonic() - t1}
