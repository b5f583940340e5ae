"""``fedstr-escrow demo``: a whole training-market round on a local regtest network.

1. Builds (or reuses) btcd + LND and the relay (``devstack/stack build``) and brings up the
   local network (``devstack/stack up``; a healthy running stack is reused).
2. Starts the escrow service in this process against the ``escrow`` node and the relay,
   with its HTTP side (API, dashboard, blob store) on 127.0.0.1; it announces the demo's two
   validators as its validator pool (``FEDSTR_VALIDATOR_POOL``), so the providers' default
   policy trusts them.
3. Plays ``--rounds`` rounds with the reference agents (``service/agents``): a customer,
   three providers (one dishonest) and two validators, with live progress; the providers
   announce their capabilities (NIP-89) and the customer discovers them; every model is
   sealed. Then one more round that no model passes: it is refunded.
4. Prints a summary (who got what, fees, accuracy, keys, ledger, time per phase). With
   ``--once`` it stops and exits 0 only if every round closed with the honest paid, the
   dishonest not paid, the customer holding the keys of the paid models and of no other (none
   of the refunded round), every round's public record auditing clean (``fedstr-escrow audit``,
   from the relays alone) and the ledger balanced; otherwise the service and dashboard stay
   up, with their URL printed, until Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _stack(args: argparse.Namespace) -> Path:
    stack = [
        sys.executable,
        str(ROOT / "devstack" / "stack"),
        "--dir",
        str(args.stack_dir),
        "--port-base",
        str(args.port_base),
    ]
    for cmd in (["build"], ["up"]):
        print(f"[demo] devstack {' '.join(cmd)} …", flush=True)
        r = subprocess.run(stack + cmd)
        if r.returncode != 0:
            raise SystemExit(f"devstack {cmd[0]} failed (see above)")
    return Path(args.stack_dir) / "stack.json"


def _free_port(preferred: int) -> int:
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", preferred)) != 0:
            return preferred
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _ledger_ok(app, job_ids: list[str]) -> list:
    from service.ledger import service as ledger

    async with app.state.sessions() as s:
        return await ledger.check_invariants(s, closed_job_ids=job_ids)


async def run(args: argparse.Namespace) -> int:
    import uvicorn

    from service.agents.demo import demo_problems, demo_validator_pool, format_summary, run_demo
    from service.app import create_app
    from service.config import Settings

    stack_json = _stack(args)
    desc = json.loads(stack_json.read_text())
    port = _free_port(args.http_port)
    url = f"http://127.0.0.1:{port}"
    admin_token = secrets.token_urlsafe(32)  # 43 characters: tokens are at least 32 (service/config.py)
    node = desc["nodes"]["escrow"]
    data = Path(args.stack_dir)
    pool = demo_validator_pool(data / "agents")  # the demo's validators, vouched for by its escrow
    settings = Settings(
        _env_file=None,
        network="regtest",
        database_url=f"sqlite+aiosqlite:///{data / 'demo.sqlite3'}",
        lnd_grpc_host=node["rpc"],
        lnd_tls_cert_path=node["tls_cert"],
        lnd_macaroon_path=node["macaroon"],
        relays=[desc["relay"]["url"]],
        nostr_key_file=data / "escrow.nostr-key",
        http_port=port,
        public_url=url,
        admin_token=admin_token,
        blob_dir=data / "blobs",
        min_results_window_seconds=0,
        min_bid_msat=10_000,
        payout_retry_seconds=2.0,
        sweep_interval_seconds=5.0,
        validator_pool=[(name, pubkey) for pubkey, name in pool],
    )
    from service.migrate import upgrade_async

    await upgrade_async(settings.database_url)
    app = create_app(settings)
    from service.app import uvicorn_config

    server = uvicorn.Server(uvicorn_config(app, settings, host="127.0.0.1", port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    t0 = time.monotonic()
    while not server.started:
        if serving.done():
            raise SystemExit("the service failed to start (see the log above)")
        await asyncio.sleep(0.1)
    print(f"[demo] escrow service on {url} (dashboard {url}/admin, admin token {admin_token})", flush=True)
    ok = False
    try:
        summary = await run_demo(
            stack_json,
            url,
            desc["relay"]["url"],
            f"{url}/blobs",
            rounds=args.rounds,
            key_dir=data / "agents",
            task=args.task,
            inner_steps=args.inner_steps,
        )
        job_ids = [r["job_id"] for r in summary["rounds"]]
        violations = await _ledger_ok(app, job_ids)
        print("\n" + format_summary(summary))
        print(f"ledger: {'balanced, every closed job at zero' if not violations else violations}")
        refund = summary.get("refund_round")
        ok = (
            len(summary["rounds"]) == args.rounds
            and not violations
            and all(r.get("ok", r.get("state") == "closed") for r in summary["rounds"])
            and refund is not None
            and refund["state"] == "refunded"
            and not demo_problems(summary)
        )
        print(f"[demo] {'SUCCESS' if ok else 'FAILED'} in {time.monotonic() - t0:.1f} s", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=2, default=str))
        if not args.once:
            print(
                f"[demo] the service keeps running: {url}  dashboard: {url}/admin  "
                f"(admin token {admin_token}). Ctrl-C stops it; `make down` stops the network.",
                flush=True,
            )
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(serving, 30)
    return 0 if ok else 1


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="fedstr-escrow demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=1, help="federated rounds, each its own escrowed job (default 1)")
    ap.add_argument("--once", action="store_true", help="exit after the rounds with a status code")
    ap.add_argument(
        "--task",
        choices=("digits", "diloco"),
        default="digits",
        help="digits: FedAvg of logistic regressions (default); diloco: DiLoCo rounds of a small "
        "language model (needs the lm extra: pip install 'fedstr-escrow[lm]')",
    )
    ap.add_argument(
        "--inner-steps", type=int, default=30, help="diloco: inner AdamW steps per provider per round (default 30)"
    )
    ap.add_argument("--stack-dir", type=Path, default=ROOT / ".devstack" / "dev")
    ap.add_argument("--port-base", type=int, default=29700)
    ap.add_argument("--http-port", type=int, default=8080)
    ap.add_argument("--json", help="also write the summary as JSON to this file")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(run(args))
