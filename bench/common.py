"""Shared benchmark plumbing: the regtest stack, percentiles, result files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def stack(port_base: int | None = None, *, postgres: bool = False) -> dict:
    """Bring up (or reuse) the bench stack.

    FEDSTR_BENCH_STACK_DIR reuses a running stack (never stopped by us);
    FEDSTR_BENCH_PORT_BASE moves the bench stack (default 29900, in .devstack/bench).
    """
    reuse = os.environ.get("FEDSTR_BENCH_STACK_DIR")
    if port_base is None:
        port_base = int(os.environ.get("FEDSTR_BENCH_PORT_BASE", "29900"))
    d = Path(reuse) if reuse else ROOT / ".devstack" / f"bench-{port_base}"
    if not reuse:
        cmd = [sys.executable, str(ROOT / "devstack" / "stack"), "--dir", str(d), "--port-base", str(port_base), "up"]
        if not postgres:
            cmd.append("--no-postgres")
        subprocess.run(cmd, check=True)
    return json.loads((d / "stack.json").read_text())


def stack_down(desc: dict) -> None:
    if os.environ.get("FEDSTR_BENCH_STACK_DIR"):
        return
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "devstack" / "stack"),
            "--dir",
            desc["dir"],
            "--port-base",
            str(desc["port_base"]),
            "down",
        ],
        check=False,
    )


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def write(name: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": name,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        **result,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProc:
    """Our service as its own process (``python -m service.cli serve``) against a stack.

    The process is what production runs: migrations, relay pool, inbox, engine, effect
    runner, settlement watcher, payout worker and the HTTP API. ``kill()`` is SIGKILL.
    """

    def __init__(
        self,
        desc: dict,
        database_url: str,
        escrow_key_hex: str,
        log_path: Path,
        *,
        port: int | None = None,
        relays: list[str] | None = None,
        **settings: object,
    ) -> None:
        node = desc["nodes"]["escrow"]
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            "FEDSTR_DATABASE_URL": database_url,
            "FEDSTR_NETWORK": "regtest",
            "FEDSTR_LND_GRPC_HOST": node["rpc"],
            "FEDSTR_LND_TLS_CERT_PATH": node["tls_cert"],
            "FEDSTR_LND_MACAROON_PATH": node["macaroon"],
            "FEDSTR_RELAYS": ",".join(relays if relays is not None else [desc["relay"]["url"]]),
            "FEDSTR_NOSTR_SECRET_KEY": escrow_key_hex,
            "FEDSTR_HTTP_PORT": str(self.port),
            "FEDSTR_MIN_RESULTS_WINDOW_SECONDS": "0",
            "FEDSTR_MIN_BID_MSAT": "10000",
            # a benchmark or drill is one client hammering the API: per-client limits off, and
            # the engine's intake budget too (the benchmarks measure the pipeline; the
            # adversarial drill sets the budget it plays against)
            "FEDSTR_EVENTS_PER_MINUTE": "10000000",
            "FEDSTR_JOB_REQUESTS_PER_MINUTE": "10000000",
            "FEDSTR_MAX_OPEN_OFFERS": "10000000",
            "FEDSTR_MAX_OPEN_OFFERS_PER_KEY": "10000000",
            "FEDSTR_JOB_REQUESTS_PER_MINUTE_PER_KEY": "10000000",
        }
        env.update({f"FEDSTR_{k.upper()}": str(v) for k, v in settings.items()})
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.log_path, "a")
        # FEDSTR_BENCH_PROFILE=FILE runs the service under cProfile (stats written at a clean stop)
        profile = os.environ.get("FEDSTR_BENCH_PROFILE")
        prefix = ["-m", "cProfile", "-o", profile] if profile else []
        self.proc = subprocess.Popen(
            [sys.executable, *prefix, "-m", "service.cli", "--log-level", "WARNING", "serve"],
            env=self.env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        import signal

        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 20) -> None:
        import signal

        profiling = bool(os.environ.get("FEDSTR_BENCH_PROFILE"))
        if profiling:
            timeout = max(timeout, 120)  # writing the profile takes a while
        if self.alive():
            # uvicorn re-raises SIGTERM after its shutdown, which would lose the profile;
            # SIGINT ends in KeyboardInterrupt, which cProfile survives.
            self.proc.send_signal(signal.SIGINT if profiling else signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    async def wait_ready(self, timeout: float = 60) -> None:
        """Until /v1/health/ready answers 200 (database, LND, invoice stream, relays)."""
        import asyncio

        import httpx

        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient() as c:
            while time.monotonic() < deadline:
                if not self.alive():
                    raise RuntimeError(f"service exited with {self.proc.returncode}; log: {self.log_path}")
                try:
                    r = await c.get(f"{self.url}/v1/health/ready", timeout=3)
                    if r.status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.2)
        raise TimeoutError(f"service not ready after {timeout} s; log: {self.log_path}")


def job_event(
    customer,
    escrow_pubkey: str,
    *,
    bid_msat: int = 100_000,
    shards: int = 1,
    validators: tuple[str, ...] = (),
    quorum: int = 1,
    validator_fee_msat: int = 0,
    results_in: int = 3600,
    validation_in: int = 7200,
    mode: str = "hold",
    policy: str = "best",
):
    """A signed job request (kind 5701) from ``customer`` (a SecretKey) to the escrow.

    With no validators named, the customer validates (quorum 1).
    """
    from decimal import Decimal

    from service.nostr.nip01 import sign_event
    from service.nostr.protocol import Direction, JobSpec, Mode, PayoutPolicy, Shard, Validation, build_job_request

    now = int(time.time())
    nonce = os.urandom(8).hex()  # two requests signed in the same second must differ
    spec = JobSpec(
        escrow=escrow_pubkey,
        bid_msat=bid_msat,
        shards=tuple(Shard(index=k, url=f"https://data.example.org/bench/{nonce}/{k}.npz") for k in range(shards)),
        validation=Validation("accuracy", Direction.MAX, Decimal("0.8"), quorum),
        payout=PayoutPolicy(policy),
        results_deadline=now + results_in,
        validation_deadline=now + validation_in,
        validators=validators,
        validator_fee_msat=validator_fee_msat,
        mode=Mode(mode),
    )
    return sign_event(customer, *build_job_request(spec, customer=customer.public_key_hex))


def markdown_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def cpu_seconds(pgid: int | None = None, pid: int | None = None) -> float:
    """utime+stime of one process, or of every process in a process group, from /proc (CPU time is
    noise-free where wall time is not)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pids = [pid] if pid is not None else [int(p) for p in os.listdir("/proc") if p.isdigit()]
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if pid is None and int(fields[2]) != pgid:  # field 5 of stat: the process group
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


async def fresh_pg_database(desc: dict, name: str) -> str:
    """Create (or re-create) database ``name`` on the stack's PostgreSQL; returns its URL."""
    import asyncpg

    pg = desc.get("postgres")
    if not pg:
        raise RuntimeError("this needs the stack's PostgreSQL (`devstack/stack up` without --no-postgres)")
    con = await asyncpg.connect(host=pg["host"], port=pg["port"], user=pg["user"], database="postgres")
    try:
        await con.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await con.execute(f'CREATE DATABASE "{name}"')
    finally:
        await con.close()
    return f"postgresql+asyncpg://{pg['user']}@{pg['host']}:{pg['port']}/{name}"
