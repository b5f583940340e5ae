"""Shared fixtures: the real regtest network, the relay, and a fresh database per test.

The network (btcd + LND nodes escrow/customer/payee/payee2 + nostr relay + PostgreSQL) is
brought up by ``devstack/stack`` once per session, only when a test asks for it,
in a temporary directory on its own port base (``FEDSTR_TEST_PORT_BASE``, default
29800) so it never collides with a developer's ``make run`` stack. Set
``FEDSTR_TEST_STACK_DIR`` to a directory holding a running stack's ``stack.json``
to reuse it (it is then left running).
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from service.lightning.client import LndClient, Payment
from service.migrate import upgrade_async

ROOT = Path(__file__).resolve().parent.parent
STACK_SCRIPT = ROOT / "devstack" / "stack"


def _load_devstack():
    loader = importlib.machinery.SourceFileLoader("devstack_stack", str(STACK_SCRIPT))
    spec = importlib.util.spec_from_loader("devstack_stack", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


devstack = _load_devstack()


@dataclass
class Regtest:
    """The running regtest network, with helpers the tests use."""

    desc: dict
    stack: object  # devstack Stack, for btcd RPC
    escrow: LndClient
    customer: LndClient
    payee: LndClient
    payee2: LndClient  # behind the payee, over a private channel (a payee's own hop)

    def node(self, name: str) -> dict:
        return self.desc["nodes"][name]

    async def mine(self, n: int = 1) -> int:
        await asyncio.to_thread(self.stack.mine, n)
        height = await asyncio.to_thread(self.stack.btcd_rpc, "getblockcount")
        await self.wait_synced(height)
        return height

    async def block_height(self) -> int:
        return await asyncio.to_thread(self.stack.btcd_rpc, "getblockcount")

    async def wait_synced(self, height: int, timeout: float = 60) -> None:
        for client in (self.escrow, self.customer, self.payee, self.payee2):
            await wait_until(lambda c=client: _synced(c, height), timeout, f"{client.host} synced to {height}")

    async def customer_pays(
        self, payment_request: str, *, fee_limit_msat: int = 100_000, timeout_seconds: int = 30
    ) -> Payment:
        """Pay from the customer node and wait for the final state."""
        return await self.customer.pay(payment_request, fee_limit_msat=fee_limit_msat, timeout_seconds=timeout_seconds)

    async def stop_node(self, node: str) -> None:
        await asyncio.to_thread(self.stack.stop, f"lnd-{node}")

    async def start_node(self, node: str) -> None:
        """Start a stopped node again and wait until its channels work."""
        await asyncio.to_thread(self.stack.lnd_start, node)
        await asyncio.to_thread(
            devstack.wait_for, 120, lambda: self.stack.lnd_state(node) == "SERVER_ACTIVE", f"lnd {node} active"
        )
        await self.wait_synced(await self.block_height(), timeout=120)
        for payer, payee in devstack.PROBES:  # every channel whose path touches the node, proven again
            if node in (payer, payee) or (node == "payee" and payee == "payee2"):
                await asyncio.to_thread(
                    devstack.wait_for,
                    120,
                    lambda a=payer, b=payee: self.stack.probe_payment(a, b),
                    f"channel {payer}->{payee} usable again",
                )

    async def payee_invoice(self, value_msat: int, memo: str = "reward", expiry: int = 3600) -> tuple[str, bytes]:
        inv = await self.payee.add_invoice(value_msat, memo=memo, expiry=expiry)
        return inv.payment_request, inv.payment_hash

    async def set_payee_hop_fee(self, base_fee_msat: int, fee_rate_ppm: int) -> None:
        """The payee's fee policy on its private channel to payee2 (a payee's own hop), and wait
        until payee2's invoices advertise it in their route hint."""
        payee2 = self.node("payee2")["pubkey"]
        [ch] = [c for c in self.stack.lncli("payee", "listchannels")["channels"] if c["remote_pubkey"] == payee2]
        await asyncio.to_thread(
            self.stack.lncli,
            "payee",
            "updatechanpolicy",
            "--base_fee_msat",
            str(base_fee_msat),
            "--fee_rate_ppm",
            str(fee_rate_ppm),
            "--time_lock_delta",
            "40",
            "--chan_point",
            ch["channel_point"],
        )

        async def hinted() -> bool:
            inv = await self.payee2.add_invoice(1_000, memo="policy check", private=True)
            d = await asyncio.to_thread(self.stack.lncli, "escrow", "decodepayreq", inv.payment_request)
            hops = [h for r in d.get("route_hints", []) for h in r["hop_hints"]]
            return any(int(h["fee_base_msat"]) == base_fee_msat for h in hops)

        await wait_until(hinted, 30, f"payee2's route hint with base fee {base_fee_msat} msat", interval=0.3)


async def _synced(client: LndClient, height: int) -> bool:
    info = await client.get_info()
    return info.synced_to_chain and info.block_height >= height


async def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    """Await ``predicate()`` (sync or async) until truthy; fail the test after ``timeout`` s."""
    end = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < end:
        try:
            value = predicate()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - retried until the deadline, then reported
            last_exc = e
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}" + (f": {last_exc!r}" if last_exc else ""))


def new_preimage() -> tuple[bytes, bytes]:
    pre = secrets.token_bytes(32)
    return pre, hashlib.sha256(pre).digest()


def _say(config: pytest.Config, line: str) -> None:
    """Print past pytest's capture, so a long set-up shows progress."""
    reporter = config.pluginmanager.getplugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(line)


@pytest.fixture(scope="session")
def stack_desc(pytestconfig: pytest.Config) -> Iterator[dict]:
    reuse = os.environ.get("FEDSTR_TEST_STACK_DIR")
    if reuse:
        yield json.loads((Path(reuse) / "stack.json").read_text())
        return
    missing = [b for b in ("btcd", "lnd", "lncli") if not (devstack.BIN / b).exists()]
    if missing:
        pytest.fail(
            f"devstack binaries missing in {devstack.BIN} ({', '.join(missing)}): "
            "run `devstack/stack build` (or `make test`, which does)",
            pytrace=False,
        )
    d = ROOT / ".devstack" / "test"
    base = os.environ.get("FEDSTR_TEST_PORT_BASE", "29800")
    cmd = [sys.executable, str(STACK_SCRIPT), "--dir", str(d), "--port-base", base]
    t0 = time.monotonic()
    _say(pytestconfig, f"\n[tests] bringing up the regtest stack in {d} (port base {base}) ...")
    r = subprocess.run([*cmd, "up"], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.fail(f"devstack up failed:\n{r.stdout}\n{r.stderr}", pytrace=False)
    _say(pytestconfig, f"[tests] regtest stack up in {time.monotonic() - t0:.1f} s")
    try:
        yield json.loads((d / "stack.json").read_text())
    finally:
        r = subprocess.run([*cmd, "down"], capture_output=True, text=True)
        if r.returncode != 0:
            sys.stderr.write(f"[tests] devstack down failed:\n{r.stdout}\n{r.stderr}\n")
        else:
            shutil.rmtree(d, ignore_errors=True)


def client_for(desc: dict, node: str, timeout: float = 15.0) -> LndClient:
    n = desc["nodes"][node]
    return LndClient.from_files(n["rpc"], n["tls_cert"], n["macaroon"], timeout=timeout)


@pytest.fixture(scope="session")
async def regtest(stack_desc: dict) -> AsyncIterator[Regtest]:
    stack = devstack.Stack(Path(stack_desc["dir"]), stack_desc["port_base"])
    missing = [n for n in devstack.NODES if n not in stack_desc["nodes"]]
    if missing:
        pytest.fail(
            f"the reused stack has no {', '.join(missing)} node: bring it up again with this "
            "devstack/stack (down, then up)",
            pytrace=False,
        )
    clients = {n: client_for(stack_desc, n) for n in devstack.NODES}
    try:
        yield Regtest(desc=stack_desc, stack=stack, **clients)
    finally:
        for c in clients.values():
            await c.close()


@pytest.fixture(scope="session")
async def lnbits_payee(pytestconfig: pytest.Config, stack_desc: dict, tmp_path_factory: pytest.TempPathFactory):
    """LNbits as a payee's wallet on the payee node (tests/support/lnbits.py); its virtualenv is made
    in the devstack cache on first use (PyPI, pinned), then reused."""
    from tests.support.lnbits import start_payee_wallet

    wallet, took = await start_payee_wallet(
        stack_desc, tmp_path_factory.mktemp("lnbits"), say=lambda m: _say(pytestconfig, f"[tests] {m}")
    )
    _say(
        pytestconfig,
        f"[tests] LNbits payee wallet on {wallet.url}: install/check {took['install_s']:.1f} s, "
        f"start {took['start_s']:.1f} s",
    )
    try:
        yield wallet
    finally:
        await wallet.close()


@pytest.fixture(scope="session")
def relay_url(stack_desc: dict) -> str:
    return stack_desc["relay"]["url"]


@pytest.fixture
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh, migrated database: SQLite by default, PostgreSQL for tests marked ``postgres``."""
    if request.node.get_closest_marker("postgres") is None:
        url = f"sqlite+aiosqlite:///{tmp_path / 'test.sqlite3'}"
        await upgrade_async(url)
        yield url
        return
    desc = request.getfixturevalue("stack_desc")
    pg = desc.get("postgres")
    if not pg:
        pytest.fail("the regtest stack was started without PostgreSQL", pytrace=False)
    import asyncpg

    name = f"t_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(host=pg["host"], port=pg["port"], user=pg["user"], database="postgres")
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = f"postgresql+asyncpg://{pg['user']}@{pg['host']}:{pg['port']}/{name}"
    await upgrade_async(url)
    try:
        yield url
    finally:
        admin = await asyncpg.connect(host=pg["host"], port=pg["port"], user=pg["user"], database="postgres")
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RelayProcess:
    """A real nostr-relay process of a test's own, which the test may stop and restart."""

    def __init__(self, directory: Path, auth_roles: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.stack = devstack.Stack(directory, self.port - 50)
        self.auth_roles = auth_roles
        self.url = f"ws://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.stack.relay_start(self.auth_roles)
        devstack.wait_for(30, self.stack.relay_ready, f"relay {self.url}", logfile=self.stack.dir / "relay.log")

    def stop(self) -> None:
        self.stack.stop("relay")

    def grant(self, pubkey: str, roles: str) -> None:
        self.stack.relay_roles(pubkey, roles)


class SdkRelayProcess:
    """nostr-sdk's (rust-nostr) local relay with an LMDB store, in a subprocess of its own."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.dir = directory
        self.url = f"ws://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.sdk_relay", str(self.port), str(self.dir / "lmdb")],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        line = self.proc.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError(f"nostr-sdk relay did not start: {line}{self.proc.stdout.read()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


RELAY_IMPLS = ("nostr-relay", "nostr-sdk")


@pytest.fixture
def relay_factory(tmp_path: Path) -> Iterator:
    """Start real relays of the test's own: ``make(impl="nostr-relay"|"nostr-sdk")``."""
    if not (devstack.RELAY_VENV / "bin" / "nostr-relay").exists():
        pytest.fail("relay venv missing: run `devstack/stack build`", pytrace=False)
    started: list = []

    def make(auth_roles: dict[str, str] | None = None, start: bool = True, impl: str = "nostr-relay"):
        d = tmp_path / f"relay{len(started)}"
        r = SdkRelayProcess(d) if impl == "nostr-sdk" else RelayProcess(d, auth_roles)
        started.append(r)
        if start:
            r.start()
        return r

    yield make
    for r in started:
        r.stop()
