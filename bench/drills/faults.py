"""What the drills break, and how they put it back.

- :class:`Service`: the escrow service as its own process (``bench.common.ServiceProc``) with
  the drills' short timers; ``kill()`` is SIGKILL; ``start(die_at_send=N)`` runs the fault
  injection wrapper ``bench.drills.faulty_service`` instead of ``service.cli``.
- :class:`StackParts`: stop and start the stack's own processes the way it started them
  (``devstack/stack``'s ``Stack``: the PID files stay right, so ``down`` still stops
  everything): the escrow LND node (``stop_node``/``start_node``), the relay (SIGTERM, then
  the same ``relay_start``), PostgreSQL (fast shutdown = SIGINT, or immediate = SIGQUIT to
  the postmaster, then the recorded command line again; the data directory is kept).
"""

from __future__ import annotations

import asyncio
import importlib.machinery
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.common import ROOT, ServiceProc

# As tests/e2e/test_replicas.py: retries, leases and sweeps in seconds, not minutes.
DRILL_SETTINGS = {
    "payout_retry_seconds": 1,
    "payout_lease_seconds": 3,
    "effect_lease_seconds": 3,
    "payout_invoice_min_expiry_seconds": 60,
    "sweep_interval_seconds": 2,
    "guard_interval_seconds": 2,
    "payout_reconcile_seconds": 5,
}


def devstack():
    """``devstack/stack`` as a module (it has no .py suffix)."""
    path = ROOT / "devstack" / "stack"
    loader = importlib.machinery.SourceFileLoader("devstack_stack", str(path))
    spec = importlib.util.spec_from_loader("devstack_stack", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


class Service(ServiceProc):
    def __init__(
        self, name: str, desc: dict, database_url: str, escrow_key_hex: str, log_path: Path, **settings: object
    ) -> None:
        super().__init__(desc, database_url, escrow_key_hex, log_path, **{**DRILL_SETTINGS, **settings})
        self.name = name
        self.starts = 0
        self.note = log_path.with_suffix(".faults.jsonl")

    def start(self, die_at: str | None = None) -> None:
        env = dict(self.env)
        module = "service.cli"
        if die_at:
            module = "bench.drills.faulty_service"
            env.update(FEDSTR_DRILL_DIE_AT=die_at, FEDSTR_DRILL_FAULT_NOTE=str(self.note))
        self.starts += 1
        with open(self.log_path, "a") as log:
            log.write(
                f"\n=== drill: start #{self.starts} of {self.name} ({module}"
                f"{f', fault injected: {die_at}' if die_at else ''}) {time.strftime('%H:%M:%S')}\n"
            )
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", module, "--log-level", "WARNING", "serve"],
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def notes(self) -> list[str]:
        return self.note.read_text().splitlines() if self.note.exists() else []

    async def ready_body(self) -> dict | None:
        try:
            async with httpx.AsyncClient() as c:
                r = await c.get(f"{self.url}/v1/health/ready", timeout=3)
                return r.json()
        except (httpx.TransportError, ValueError):
            return None

    async def leads(self) -> bool:
        """The leader runs the settlement watcher: its readiness shows ``checks.settlement``."""
        body = await self.ready_body()
        return bool(body and body.get("checks", {}).get("settlement") is not None)


class StackParts:
    def __init__(self, desc: dict) -> None:
        self.mod = devstack()
        self.stack = self.mod.Stack(Path(desc["dir"]), desc["port_base"])
        self.desc = desc

    # ---- LND --------------------------------------------------------------------------
    async def stop_lnd(self, node: str) -> None:
        await asyncio.to_thread(self.stack.stop_node, node)

    async def start_lnd(self, node: str) -> None:
        await asyncio.to_thread(self._start_lnd, node)

    def _start_lnd(self, node: str) -> None:
        """``start_node``, with its channel peers told to connect at once: a peer that cannot dial
        back (the customer, which opened its channel and announces no address) otherwise waits
        out LND's reconnection backoff, which doubles with every short-lived connection (minutes
        after a few restarts of the same node)."""
        if not self.stack.alive(f"lnd-{node}"):
            self.stack.lnd_start(node)
        logf = self.stack.dir / f"lnd-{node}.log"
        self.mod.wait_for(
            120, lambda: self.stack.lnd_state(node) == "SERVER_ACTIVE", f"lnd {node} active", logfile=logf
        )
        pubkey = self.desc["nodes"][node]["pubkey"]
        for other in self.desc["nodes"]:
            if other == node or not self.stack.alive(f"lnd-{other}"):
                continue
            try:
                chans = self.stack.lncli(other, "listchannels", timeout=10).get("channels", [])
                if any(c.get("remote_pubkey") == pubkey for c in chans):
                    self.stack.lncli(other, "connect", f"{pubkey}@127.0.0.1:{self.stack.port(node) + 1}", timeout=10)
            except (
                self.mod.StackError,
                subprocess.TimeoutExpired,
            ):  # already connected, or dialing: start_node waits for the channels
                pass
        self.stack.start_node(node)

    def lncli(self, node: str, *args: str) -> dict:
        return self.stack.lncli(node, *args, timeout=60)

    # ---- relay ------------------------------------------------------------------------
    async def stop_relay(self) -> None:
        await asyncio.to_thread(self.stack.stop, "relay")

    async def start_relay(self) -> None:
        if not self.stack.alive("relay"):
            await asyncio.to_thread(self.stack.relay_start)
        await asyncio.to_thread(self.mod.wait_for, 30, self.stack.relay_ready, "relay", self.stack.dir / "relay.log")

    def relay_up(self) -> bool:
        return bool(self.stack.alive("relay")) and self.stack.relay_ready()

    # ---- PostgreSQL -------------------------------------------------------------------
    def _pg_data(self) -> Path:
        return Path(self.stack._pidfile("postgres")[1])

    async def stop_postgres(self, mode: str = "fast") -> list[str]:
        """Fast (SIGINT: abort transactions, disconnect clients, checkpoint) or immediate
        (SIGQUIT: no checkpoint, crash recovery at the next start) shutdown; returns the
        command line to start it again with."""
        pid = self.stack.alive("postgres")
        if not pid:
            raise RuntimeError("PostgreSQL of the stack is not running")
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").decode().split("\0")
        postmaster = int((self._pg_data() / "postmaster.pid").read_text().split("\n")[0])
        os.kill(postmaster, signal.SIGINT if mode == "fast" else signal.SIGQUIT)
        end = time.monotonic() + 30
        while self.stack.alive("postgres") and time.monotonic() < end:
            await asyncio.sleep(0.1)
        if self.stack.alive("postgres"):
            raise RuntimeError("PostgreSQL did not stop within 30 s")
        return argv

    async def start_postgres(self, argv: list[str]) -> None:
        marker = str(self._pg_data())
        self.stack.spawn("postgres", argv, marker=marker)
        pg = self.desc["postgres"]
        import asyncpg

        end = time.monotonic() + 60
        while True:
            try:
                conn = await asyncpg.connect(
                    host=pg["host"], port=pg["port"], user=pg["user"], database="postgres", timeout=3
                )
                await conn.execute("select 1")
                await conn.close()
                return
            except (OSError, asyncpg.PostgresError, TimeoutError):
                if time.monotonic() > end:
                    raise RuntimeError("PostgreSQL not accepting connections 60 s after its restart") from None
                await asyncio.sleep(0.2)

    async def health(self) -> list[str]:
        """What is not as ``up`` left it (empty when all is well)."""
        bad = []
        for name in ("btcd", "lnd-escrow", "lnd-customer", "lnd-payee", "relay"):
            if not self.stack.alive(name):
                bad.append(f"{name} not running")
        if self.desc.get("postgres") and not self.stack.alive("postgres"):
            bad.append("postgres not running")
        return bad
