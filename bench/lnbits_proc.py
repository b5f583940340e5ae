"""LNbits as a real part: its pinned virtualenv and its process, for bench.lnbits and the tests.

LNbits (PyPI, pinned in ``bench/lnbits-requirements.txt``) gets its own virtualenv in
``$LNSTACK_CACHE/lnbits-venv-<version>``, made on first use (and again when the pins change)
under a file lock, so two sessions sharing the cache never build it at once. It runs as a
subprocess on 127.0.0.1 with SQLite in a directory of the caller's, funded by one of the
devstack's LND nodes over gRPC (``LndWallet``): the ``escrow`` node for the benchmark, the
``payee`` node when LNbits plays a payee's wallet in the tests. Standard library and httpx only.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

LNBITS_VERSION = "1.6.2"
ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "bench" / "lnbits-requirements.txt"


def lnstack_cache() -> Path:
    return Path(os.environ.get("LNSTACK_CACHE", "~/.cache/fedstr-lnstack")).expanduser()


def install_lnbits(say: Callable[[str], None] = print) -> Path:
    """The LNbits virtualenv, (re)created from the pinned requirements when they changed."""
    if not ((3, 10) <= sys.version_info[:2] < (3, 13)):
        raise RuntimeError(f"LNbits {LNBITS_VERSION} needs Python >=3.10,<3.13; this is {sys.version.split()[0]}")
    venv = lnstack_cache() / f"lnbits-venv-{LNBITS_VERSION}"
    py = venv / "bin" / "python"
    stamp = venv / ".fedstr-stamp"
    want = (
        f"requirements-sha256={hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()} "
        f"python={sys.version_info[0]}.{sys.version_info[1]}"
    )
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".lnbits-venv-{LNBITS_VERSION}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session may be installing it right now
        if py.exists() and stamp.exists() and stamp.read_text().strip() == want:
            say(f"LNbits {LNBITS_VERSION}: virtualenv up to date ({venv})")
            return venv
        if venv.exists():
            say(f"LNbits virtualenv stale or incomplete: removing {venv}")
            shutil.rmtree(venv)
        t0 = time.monotonic()
        say(f"creating {venv} with {sys.executable} -m venv")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        n = sum(1 for line in REQUIREMENTS.read_text().splitlines() if line.strip() and not line.startswith("#"))
        say(f"installing {n} pinned packages from {REQUIREMENTS.relative_to(ROOT)} (--no-deps; PyPI)")
        subprocess.run(
            [
                str(py),
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-input",
                "--progress-bar",
                "off",
                "--no-deps",
                "-r",
                str(REQUIREMENTS),
            ],
            check=True,
        )
        say("pip check (every requirement of every installed package satisfied)")
        subprocess.run([str(py), "-m", "pip", "check", "--disable-pip-version-check"], check=True)
        stamp.write_text(want + "\n")
        say(f"LNbits {LNBITS_VERSION} installed in {time.monotonic() - t0:.0f} s")
    return venv


class PortTaken(RuntimeError):
    pass


def lnbits_port(port_base: int, skip: int = 0) -> int:
    """A free port in the stack's own block (base+80..base+99, below the ephemeral range, so
    no outgoing connection grabs it while LNbits takes seconds to start); else any free port."""
    for port in range(port_base + 80 + skip, port_base + 100):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LnbitsProc:
    """LNbits as a subprocess on 127.0.0.1, funded by the stack's ``node`` LND node over gRPC.

    Its own session (process group), so stopping it reaches the worker process its
    ``lnbits`` command forks. The working directory is the venv's site-packages because
    LNbits 1.6 mounts ``lnbits/static`` and ``lnbits/templates`` relative to it; data and
    extensions go to the work directory.
    """

    def __init__(
        self,
        venv: Path,
        desc: dict,
        workdir: Path,
        log_path: Path,
        port: int,
        *,
        node: str = "escrow",
        rate_limit: int = 10_000_000,
    ) -> None:
        lnd = desc["nodes"][node]
        host, grpc_port = lnd["rpc"].rsplit(":", 1)
        self.port = port
        self.url = f"http://127.0.0.1:{self.port}"
        self.venv = venv
        self.log_path = log_path
        self.data = workdir / "data"
        self.first_install_token = secrets.token_hex(16)
        (workdir / "extensions").mkdir(parents=True, exist_ok=True)
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/tmp"),
            "LANG": "C.UTF-8",
            "LNBITS_DATA_FOLDER": str(self.data),
            "LNBITS_EXTENSIONS_PATH": str(workdir / "extensions"),
            "LNBITS_BACKEND_WALLET_CLASS": "LndWallet",
            "LND_GRPC_ENDPOINT": host,
            "LND_GRPC_PORT": grpc_port,
            "LND_GRPC_CERT": lnd["tls_cert"],
            "LND_GRPC_MACAROON": lnd["macaroon"],  # a path; read by LNbits
            "FIRST_INSTALL_TOKEN": self.first_install_token,
            # one client calling the API in a loop: LNbits' per-client limit out of the way
            "LNBITS_RATE_LIMIT_NO": str(rate_limit),
            # its least verbose logging: INFO to stdout (our log file) only, not also to two files of its own
            "ENABLE_LOG_TO_FILE": "false",
        }
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        site = next((self.venv / "lib").glob("python3.*/site-packages"))
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(
                [str(self.venv / "bin" / "lnbits"), "--host", "127.0.0.1", "--port", str(self.port)],
                env=self.env,
                cwd=site,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15) -> None:
        if self.proc is None:
            return
        pgid = self.proc.pid  # start_new_session: the group is ours and only ours
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                self.proc.poll()  # reap the leader; the group lives while its forked worker does
                try:
                    os.killpg(pgid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                continue  # still there after SIGTERM: SIGKILL
            break
        self.proc.poll()

    async def setup(self, timeout: float = 90, account: str = "fedstr-bench") -> dict:
        """Wait until healthy, finish the first install headlessly, create a user and wallet.

        Returns the wallet (``inkey`` is the invoice key, ``adminkey`` the admin key) and the
        funding-source status.
        """
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(base_url=self.url, timeout=10) as c:
            status = None
            while time.monotonic() < deadline:
                if not self.alive():
                    raise RuntimeError(f"LNbits exited with {self.proc.returncode}; log: {self.log_path}")
                if "error while attempting to bind" in self.log_path.read_text(errors="replace"):
                    raise PortTaken(f"LNbits could not bind port {self.port}")
                try:
                    r = await c.get("/api/v1/health")
                    status = r.status_code
                    if status in (200, 307):
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.2)
            else:
                raise TimeoutError(f"LNbits not up after {timeout} s; log: {self.log_path}")
            admin_token = None
            if status == 307:  # fresh data folder: every route redirects to /first_install until done
                password = secrets.token_urlsafe(18)
                r = await c.put(
                    "/api/v1/auth/first_install",
                    json={
                        "username": "benchadmin",
                        "password": password,
                        "password_repeat": password,
                        "first_install_token": self.first_install_token,
                    },
                )
                if r.status_code != 200:
                    raise RuntimeError(f"LNbits first install refused: {r.status_code} {r.text[:200]}")
                admin_token = r.json()["access_token"]
            r = await c.get("/api/v1/health")
            if r.status_code != 200:
                raise RuntimeError(f"LNbits unhealthy after set-up: {r.status_code}")
            funding = {}
            if admin_token:
                r = await c.get("/api/v1/status", headers={"Authorization": f"Bearer {admin_token}"})
                if r.status_code == 200:
                    st = r.json()
                    funding = {
                        "funding_source": st.get("funding_source"),
                        "funding_source_error": st.get("funding_source_error"),
                    }
            if funding.get("funding_source") not in (None, "LndWallet") or funding.get("funding_source_error"):
                raise RuntimeError(f"LNbits funding source not LND: {funding}; log: {self.log_path}")
            r = await c.post("/api/v1/account", json={"name": account})
            if r.status_code != 200:
                raise RuntimeError(f"LNbits account creation refused: {r.status_code} {r.text[:200]}")
            wallet = r.json()
            # Every new wallet gets accounting currency USD, so each invoice asks exchange-rate
            # providers on the internet for a USD amount (cached 60 s when it succeeds). This
            # machine has no route to them: each invoice would pay for failed lookups LNbits
            # never has with internet. Clear the currency (LNbits then skips the fiat amounts).
            r = await c.patch("/api/v1/wallet", headers={"X-Api-Key": wallet["adminkey"]}, json={"currency": ""})
            if r.status_code != 200 or r.json().get("currency"):
                raise RuntimeError(f"LNbits wallet currency not cleared: {r.status_code} {r.text[:200]}")
        return {"wallet_id": wallet["id"], "inkey": wallet["inkey"], "adminkey": wallet["adminkey"], **funding}


async def start_lnbits(
    venv: Path,
    desc: dict,
    workdir: Path,
    log_path: Path,
    *,
    node: str = "escrow",
    say: Callable[[str], None] = print,
    account: str = "fedstr-bench",
) -> tuple[LnbitsProc, dict]:
    """Start LNbits on a free port of the stack's block (trying another if one is taken meanwhile)
    and set it up; returns the process and its wallet (see ``LnbitsProc.setup``)."""
    skip = 0
    for attempt in range(3):
        proc = LnbitsProc(
            venv, desc, workdir / f"lnbits-{attempt}", log_path, lnbits_port(desc["port_base"], skip=skip), node=node
        )
        proc.start()
        try:
            return proc, await proc.setup(account=account)
        except PortTaken as e:
            proc.stop()
            if attempt == 2:
                raise
            say(f"{e}; starting it again on another port")
            skip = proc.port - desc["port_base"] - 79
        except BaseException:
            proc.stop()
            raise
    raise AssertionError("unreachable")
