"""Our invoice API and settlement detection against LNbits, same run, same LND node.

LNbits (PyPI, pinned in ``bench/lnbits-requirements.txt``, its own virtualenv in
``$LNSTACK_CACHE/lnbits-venv-<version>``; ``bench.lnbits_proc``, shared with the tests) runs as
a subprocess with SQLite in a temp dir and the bench stack's ``escrow`` LND node as its funding
source over gRPC (``LndWallet``).
Our service runs as its own process (``bench.common.ServiceProc``) against the same node.

1. **Invoice API**, interleaved rounds after a warm-up, same concurrency and count per side:
   - LNbits: ``POST /api/v1/payments {"out": false, ...}`` with the wallet's invoice key;
     latency = request start to the response carrying the BOLT11.
   - ours: ``POST /v1/events?wait=30`` with a signed job request (hold mode): the answer
     waits for the engine to make the offer's hold invoice and carries it, so one request
     per invoice on both sides; latency = request start to the response carrying the
     BOLT11. (Were it not made within the wait, the job would be polled; it never was in
     the committed run.) Events are signed before the clock starts.
   Throughput = invoices per second of wall time, per round (the mean of the rounds is
   reported), plus each server's CPU time per invoice (from /proc) and, as a diagnostic, our
   pipeline's rate without per-job polling (a burst of POSTs, then one slow poller).
2. **Settlement detection**: payments from the stack's ``customer`` node, alternating an
   invoice of ours (custodial job, settles directly) and LNbits' invoices. Detection =
   from the payer's SUCCEEDED to the response of the first poll that shows the invoice
   paid, the same poll interval on every side: ours ``GET /v1/invoices/{hash}`` (reads
   our DB, written by our settlement watcher); LNbits ``GET /api/v1/payments/{hash}``
   (its status endpoint: for a pending invoice it also asks LND on every poll) and, on
   separate payments, ``GET /api/v1/payments?payment_hash=`` (reads LNbits' DB only, i.e.
   what its invoice listener wrote: the like-for-like figure).

    python -m bench.lnbits [--invoices 300] [--payments 200] [--concurrency 16]

Targets: invoice API throughput >= 1.5x LNbits with a lower p99; settlement detection
p50 <= LNbits' p50 (status endpoint). Results: bench/results/lnbits.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import (
    RESULTS,
    ROOT,
    ServiceProc,
    cpu_seconds,
    job_event,
    markdown_table,
    percentile,
    stack,
    stack_down,
    write,
)
from bench.lnbits_proc import LNBITS_VERSION, install_lnbits, start_lnbits
from service.lightning.client import LndClient, PaymentStatus
from service.nostr.nip01 import SecretKey

POLL_S = 0.005  # poll interval, the same on every side
ROUNDS = 3
WARMUP = 20
_T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[lnbits-bench {time.monotonic() - _T0:7.1f}s] {msg}", flush=True)


# ---------------------------------------------------------------------------- invoice API


async def timed_pool(n: int, concurrency: int, call) -> tuple[float, list[float]]:
    """Run call(i) n times, ``concurrency`` at a time; (calls per second of wall time, latencies ms)."""
    queue = iter(range(n))
    lat: list[float] = []

    async def worker() -> None:
        for i in queue:
            lat.append(await call(i))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return n / (time.perf_counter() - t0), lat


class LnbitsInvoices:
    def __init__(self, client: httpx.AsyncClient, inkey: str) -> None:
        self.c, self.headers = client, {"X-Api-Key": inkey}

    async def create(self, amount_sat: int, memo: str) -> tuple[float, dict]:
        t0 = time.perf_counter()
        r = await self.c.post(
            "/api/v1/payments", headers=self.headers, json={"out": False, "amount": amount_sat, "memo": memo}
        )
        dt = (time.perf_counter() - t0) * 1000
        if r.status_code != 201 or not r.json().get("bolt11", "").startswith("lnbcrt"):
            raise RuntimeError(f"LNbits invoice failed: {r.status_code} {r.text[:200]}")
        return dt, r.json()

    async def one(self, i: int) -> float:
        return (await self.create(100, f"bench {i}"))[0]


class OurInvoices:
    def __init__(self, client: httpx.AsyncClient, escrow_pubkey: str) -> None:
        self.c, self.escrow = client, escrow_pubkey
        self.events: list[dict] = []

    async def submit_and_wait(self, ev: dict) -> tuple[float, dict]:
        """One call, as LNbits': ``POST /v1/events?wait=30`` answers with the offer's invoice."""
        t0 = time.perf_counter()
        r = await self.c.post("/v1/events", params={"wait": 30}, json=ev)
        if r.status_code != 202:
            raise RuntimeError(f"event refused: {r.status_code} {r.text[:200]}")
        job = r.json().get("job")
        if job and (job.get("invoice") or {}).get("payment_request"):
            return (time.perf_counter() - t0) * 1000, job["invoice"]
        if job and job["state"] == "rejected":
            raise RuntimeError(f"job {ev['id'][:16]} rejected: {job.get('reject_reason')}")
        while True:  # not made within the wait: fall back to reading the job
            r = await self.c.get(f"/v1/jobs/{ev['id']}")
            if r.status_code == 200:
                job = r.json()
                inv = job.get("invoice")
                if inv and inv.get("payment_request"):
                    return (time.perf_counter() - t0) * 1000, inv
                if job["state"] in ("rejected", "refunded", "closed"):
                    raise RuntimeError(f"job {ev['id'][:16]} {job['state']}: {job.get('reject_reason')}")
            elif r.status_code != 404:
                raise RuntimeError(f"GET job: {r.status_code} {r.text[:200]}")
            if time.perf_counter() - t0 > 60:
                raise TimeoutError(f"no invoice for job {ev['id'][:16]} after 60 s")
            await asyncio.sleep(POLL_S)

    async def one(self, i: int) -> float:
        return (await self.submit_and_wait(self.events[i]))[0]


def presign(escrow_pubkey: str, n: int, mode: str) -> list[dict]:
    """Signed job requests, one fresh customer key each (distinct ids), made before the clock starts."""
    return [job_event(SecretKey.generate(), escrow_pubkey, bid_msat=100_000, mode=mode).to_dict() for _ in range(n)]


async def burst(ours: OurInvoices, n: int, concurrency: int) -> float:
    """Diagnostic: our pipeline without per-job polling. All n job requests are POSTed
    (``concurrency`` at a time), then one client waits for each job's invoice in turn,
    polling every 50 ms. Invoices per second from the first POST to the last invoice."""
    events = presign(ours.escrow, n, "hold")

    async def post(i: int) -> float:
        r = await ours.c.post("/v1/events", json=events[i])
        if r.status_code != 202:
            raise RuntimeError(f"event refused: {r.status_code} {r.text[:200]}")
        return 0.0

    t0 = time.perf_counter()
    await timed_pool(n, concurrency, post)
    for ev in events:
        while True:
            r = await ours.c.get(f"/v1/jobs/{ev['id']}")
            if r.status_code == 200 and (r.json().get("invoice") or {}).get("payment_request"):
                break
            if time.perf_counter() - t0 > 120:
                raise TimeoutError("burst: invoices missing after 120 s")
            await asyncio.sleep(0.05)
    return n / (time.perf_counter() - t0)


async def invoice_api(lnb: LnbitsInvoices, ours: OurInvoices, n: int, concurrency: int, cpu: dict) -> dict:
    say(f"invoice API: warm-up ({WARMUP} per side)")
    await timed_pool(WARMUP, concurrency, lnb.one)
    ours.events = presign(ours.escrow, WARMUP, "hold")
    await timed_pool(WARMUP, concurrency, ours.one)
    per = max(1, n // ROUNDS)
    rates: dict[str, list[float]] = {"lnbits": [], "ours": []}
    lats: dict[str, list[float]] = {"lnbits": [], "ours": []}
    cpu_s: dict[str, float] = {"lnbits": 0.0, "ours": 0.0}
    for k in range(ROUNDS):
        order = ("lnbits", "ours") if k % 2 == 0 else ("ours", "lnbits")
        for side in order:
            if side == "ours":
                ours.events = presign(ours.escrow, per, "hold")
                c0 = cpu["ours"]()
                rate, lat = await timed_pool(per, concurrency, ours.one)
            else:
                c0 = cpu["lnbits"]()
                rate, lat = await timed_pool(per, concurrency, lnb.one)
            cpu_s[side] += cpu[side]() - c0
            rates[side].append(rate)
            lats[side].extend(lat)
            say(
                f"  round {k + 1}/{ROUNDS} {side:6s}: {rate:6.1f}/s  p50 {percentile(lat, 50):6.1f} ms  "
                f"p99 {percentile(lat, 99):6.1f} ms"
            )
    out: dict = {"per_side": per * ROUNDS, "rounds": ROUNDS, "concurrency": concurrency, "warmup_per_side": WARMUP}
    for side in ("lnbits", "ours"):
        out[side] = {
            "per_s": round(sum(rates[side]) / ROUNDS, 1),
            "p50_ms": round(percentile(lats[side], 50), 2),
            "p99_ms": round(percentile(lats[side], 99), 2),
            "rounds_per_s": [round(x, 1) for x in rates[side]],
            "server_cpu_ms_per_invoice": round(cpu_s[side] / (per * ROUNDS) * 1000, 1),
        }
    out["ratio_throughput"] = round(out["ours"]["per_s"] / out["lnbits"]["per_s"], 3)
    out["ratio_server_cpu_per_invoice"] = round(
        out["ours"]["server_cpu_ms_per_invoice"] / out["lnbits"]["server_cpu_ms_per_invoice"], 3
    )
    say(f"  diagnostic: our pipeline without per-job polling ({per} job requests in a burst)")
    b = await burst(ours, per, concurrency)
    say(f"  burst: {b:.1f}/s")
    out["diagnostic_ours_burst_without_polling"] = {
        "per_s": round(b, 1),
        "ratio_vs_lnbits": round(b / out["lnbits"]["per_s"], 3),
        "invoices": per,
        "method": "all job requests POSTed first, then one client polls each job every 50 ms; not a target figure",
    }
    out["ratio_p99"] = round(out["ours"]["p99_ms"] / out["lnbits"]["p99_ms"], 3)
    out["ratio_p50"] = round(out["ours"]["p50_ms"] / out["lnbits"]["p50_ms"], 3)
    return out


# ---------------------------------------------------------------------------- settlement detection


async def poll_until(c: httpx.AsyncClient, url: str, headers: dict, paid, t_paid: float, limit_s: float = 30) -> float:
    """ms from t_paid to the response of the first poll for which paid(response) holds."""
    while True:
        r = await c.get(url, headers=headers)
        t = time.perf_counter()
        if r.status_code == 200 and paid(r.json()):
            return (t - t_paid) * 1000
        if r.status_code not in (200, 404):
            raise RuntimeError(f"GET {url.split('?')[0]}: {r.status_code} {r.text[:200]}")
        if t - t_paid > limit_s:
            raise TimeoutError(f"{url} not paid {limit_s} s after the payer's SUCCEEDED")
        await asyncio.sleep(POLL_S)


async def settlement(lnb: LnbitsInvoices, ours: OurInvoices, customer: LndClient, n: int) -> dict:
    lat: dict[str, list[float]] = {"ours": [], "lnbits_status": [], "lnbits_listener": []}
    hdr = lnb.headers

    async def pay(bolt11: str) -> float:
        p = await customer.pay(bolt11, fee_limit_msat=10_000, timeout_seconds=30)
        t = time.perf_counter()
        if p.status != PaymentStatus.SUCCEEDED:
            raise RuntimeError(f"payment failed: {p.status} {getattr(p, 'failure_reason', '')}")
        return t

    async def one_ours(i: int) -> None:
        ev = presign(ours.escrow, 1, "custodial")[0]
        _, inv = await ours.submit_and_wait(ev)
        t = await pay(inv["payment_request"])
        lat["ours"].append(
            await poll_until(
                ours.c, f"/v1/invoices/{inv['payment_hash']}", {}, lambda j: j.get("state") == "settled", t
            )
        )

    async def one_lnbits(i: int, how: str) -> None:
        _, inv = await lnb.create(100, f"bench settle {i}")
        h = inv["payment_hash"]
        t = await pay(inv["bolt11"])
        if how == "lnbits_status":  # the status endpoint (asks LND itself while pending)
            d = await poll_until(lnb.c, f"/api/v1/payments/{h}", hdr, lambda j: j.get("paid") is True, t)
        else:  # the wallet's payment list: LNbits' DB only, as its listener left it
            d = await poll_until(
                lnb.c,
                f"/api/v1/payments?payment_hash={h}",
                hdr,
                lambda j: any(x["payment_hash"] == h and x["status"] == "success" for x in j),
                t,
            )
        lat[how].append(d)

    say(f"settlement detection: {n} payments per side, alternating, poll every {POLL_S * 1000:.0f} ms")
    for i in range(n):
        order = ["ours", "lnbits_status", "lnbits_listener"]
        if i % 2:
            order.reverse()
        for side in order:
            if side == "ours":
                await one_ours(i)
            else:
                await one_lnbits(i, side)
            await asyncio.sleep(0.02)  # let the other side's after-work settle a little
        if (i + 1) % max(1, n // 5) == 0:
            say(
                f"  {i + 1}/{n}: p50 ours {percentile(lat['ours'], 50):.1f} ms, LNbits status "
                f"{percentile(lat['lnbits_status'], 50):.1f} ms, LNbits listener {percentile(lat['lnbits_listener'], 50):.1f} ms"
            )

    def stats(v: list[float]) -> dict:
        return {
            "p50_ms": round(percentile(v, 50), 2),
            "p99_ms": round(percentile(v, 99), 2),
            "min_ms": round(min(v), 2),
            "max_ms": round(max(v), 2),
        }

    out = {
        "payments_per_side": n,
        "poll_interval_ms": POLL_S * 1000,
        "ours": stats(lat["ours"]),
        "lnbits_status_endpoint": stats(lat["lnbits_status"]),
        "lnbits_listener_db": stats(lat["lnbits_listener"]),
    }
    out["ratio_p50_vs_status"] = round(out["ours"]["p50_ms"] / out["lnbits_status_endpoint"]["p50_ms"], 3)
    out["ratio_p50_vs_listener"] = round(out["ours"]["p50_ms"] / out["lnbits_listener_db"]["p50_ms"], 3)
    return out


# ---------------------------------------------------------------------------- main

NOTES = [
    "Same LND node (the stack's escrow node) for both; LNbits 1.6.2 LndWallet over gRPC, SQLite; ours SQLite.",
    "LNbits' paid-invoice detection: a permanent task iterates LndWallet.paid_invoices_stream() "
    "(Lightning.SubscribeInvoices, settled updates only); for each settled hash it looks the payment up in its "
    "DB, asks LND again (check_payment_status -> LookupInvoice), marks it success and dispatches it to the "
    "invoice listeners (notifications, websockets, extensions). Both listeners hear every invoice of the node: "
    "LNbits logs our invoices as unknown, ours ignores LNbits' (not in our table).",
    "LNbits' status endpoint GET /api/v1/payments/{hash} calls update_pending_payment() for a pending incoming "
    "invoice, i.e. a LookupInvoice on LND on every poll: it can show 'paid' before its listener has run. "
    "lnbits_listener_db polls the wallet's payment list instead (DB only), the like-for-like comparison with ours "
    "(GET /v1/invoices/{hash} reads our DB as our settlement watcher left it).",
    "Our invoice API is asynchronous (Nostr event in, engine creates a hold invoice, offer out): its latency "
    "includes POST /v1/events?wait (inbox), the engine step, the effect runner's AddHoldInvoice and DB writes "
    "and the offer; LNbits' is one synchronous request (AddInvoice + DB insert).",
    "Both services' per-client rate limits are lifted (FEDSTR_EVENTS_PER_MINUTE, LNBITS_RATE_LIMIT_NO).",
    "The LNbits wallet's accounting currency (USD by default) is cleared: otherwise every invoice asks internet "
    "exchange-rate providers for a fiat amount, which fail slowly on this offline machine (seconds per invoice).",
    "Logging: LNbits at its least verbose (INFO to stdout, its own log files off: ENABLE_LOG_TO_FILE=false); "
    "ours at WARNING (bench.common.ServiceProc). Server CPU per invoice = utime+stime of the server's processes "
    "during its rounds (LNbits: its process group; ours: the service process), divided by the invoices.",
]


async def run(args: argparse.Namespace) -> None:
    venv = install_lnbits(say)
    source = source_state()
    if source["service_uncommitted_changes"]:
        say(f"note: measuring uncommitted service code: {', '.join(source['service_uncommitted_changes'])}")
    desc = stack()
    tmp = Path(tempfile.mkdtemp(prefix="fedstr-bench-lnbits-"))
    lnbits_log, ours_log = tmp / "lnbits.log", tmp / "service.log"
    lnbits = None
    service = ServiceProc(desc, f"sqlite+aiosqlite:///{tmp}/escrow.sqlite3", SecretKey.generate().to_hex(), ours_log)
    n = desc["nodes"]["customer"]
    customer = LndClient.from_files(n["rpc"], n["tls_cert"], n["macaroon"])
    try:
        say(f"logs: LNbits {lnbits_log}, ours {ours_log}")
        service.start()
        lnbits, wallet = await start_lnbits(venv, desc, tmp, lnbits_log, node="escrow", say=say)
        say(
            f"LNbits {LNBITS_VERSION} up on {lnbits.url} (funding source {wallet.get('funding_source', '?')}, "
            f"wallet {wallet['wallet_id'][:8]}…)"
        )
        await service.wait_ready()
        limits = httpx.Limits(max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4)
        async with (
            httpx.AsyncClient(base_url=lnbits.url, timeout=30, limits=limits) as lc,
            httpx.AsyncClient(base_url=service.url, timeout=30, limits=limits) as oc,
        ):
            escrow_pubkey = (await oc.get("/v1/info")).json()["pubkey"]
            say(f"our service up on {service.url}")
            lnb, ours = LnbitsInvoices(lc, wallet["inkey"]), OurInvoices(oc, escrow_pubkey)
            cpu = {"lnbits": lambda: cpu_seconds(pgid=lnbits.proc.pid), "ours": lambda: cpu_seconds(pid=service.pid)}
            inv = await invoice_api(lnb, ours, args.invoices, args.concurrency, cpu)
            det = await settlement(lnb, ours, customer, args.payments)
        report(desc, inv, det, args, source)
    finally:
        await customer.close()
        service.stop()
        if lnbits is not None:
            lnbits.stop()
        stack_down(desc)
        say(f"stopped LNbits and our service; logs kept in {tmp}")


def source_state() -> dict:
    """Which code of ours was measured: HEAD, and any uncommitted change to what the service runs."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "service", "alembic", "pyproject.toml"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "service_uncommitted_changes": None}
    return {"commit": commit, "service_uncommitted_changes": [line[3:] for line in dirty]}


def report(desc: dict, inv: dict, det: dict, args: argparse.Namespace, source: dict) -> None:
    targets = {
        "invoice_throughput_ratio_min": 1.5,
        "invoice_p99_lower_than_lnbits": True,
        "settlement_p50_at_most_lnbits_p50": True,
    }
    passed = {
        "invoice_throughput": inv["ratio_throughput"] >= 1.5,
        "invoice_p99": inv["ours"]["p99_ms"] < inv["lnbits"]["p99_ms"],
        "settlement_p50": det["ours"]["p50_ms"] <= det["lnbits_status_endpoint"]["p50_ms"],
    }
    result = {
        "lnbits_version": LNBITS_VERSION,
        "lnd_version": desc["lnd_version"],
        "database": "sqlite (both)",
        "source": source,
        "args": {"invoices": args.invoices, "payments": args.payments, "concurrency": args.concurrency},
        "invoice_api": inv,
        "settlement_detection": det,
        "targets": targets,
        "pass": passed,
        "notes": NOTES,
    }
    path = write("lnbits", result)
    i, d = inv, det
    rows = [
        (
            "invoice API throughput (/s)",
            i["lnbits"]["per_s"],
            i["ours"]["per_s"],
            i["ratio_throughput"],
            ">= 1.5",
            "pass" if passed["invoice_throughput"] else "MISS",
        ),
        ("invoice API p50 (ms)", i["lnbits"]["p50_ms"], i["ours"]["p50_ms"], i["ratio_p50"], "", ""),
        (
            "invoice API p99 (ms)",
            i["lnbits"]["p99_ms"],
            i["ours"]["p99_ms"],
            i["ratio_p99"],
            "< 1",
            "pass" if passed["invoice_p99"] else "MISS",
        ),
        (
            "server CPU per invoice (ms)",
            i["lnbits"]["server_cpu_ms_per_invoice"],
            i["ours"]["server_cpu_ms_per_invoice"],
            i["ratio_server_cpu_per_invoice"],
            "",
            "",
        ),
        (
            "diagnostic: ours without per-job polling (/s)",
            i["lnbits"]["per_s"],
            i["diagnostic_ours_burst_without_polling"]["per_s"],
            i["diagnostic_ours_burst_without_polling"]["ratio_vs_lnbits"],
            "",
            "",
        ),
        (
            "settlement detection p50 (ms), LNbits status endpoint",
            d["lnbits_status_endpoint"]["p50_ms"],
            d["ours"]["p50_ms"],
            d["ratio_p50_vs_status"],
            "<= 1",
            "pass" if passed["settlement_p50"] else "MISS",
        ),
        (
            "settlement detection p99 (ms), LNbits status endpoint",
            d["lnbits_status_endpoint"]["p99_ms"],
            d["ours"]["p99_ms"],
            "",
            "",
            "",
        ),
        (
            "settlement detection p50 (ms), LNbits listener (DB)",
            d["lnbits_listener_db"]["p50_ms"],
            d["ours"]["p50_ms"],
            d["ratio_p50_vs_listener"],
            "",
            "",
        ),
        (
            "settlement detection p99 (ms), LNbits listener (DB)",
            d["lnbits_listener_db"]["p99_ms"],
            d["ours"]["p99_ms"],
            "",
            "",
            "",
        ),
    ]
    table = markdown_table(rows, ("figure", f"LNbits {LNBITS_VERSION}", "ours", "ours/LNbits", "target", ""))
    md = (
        f"# Invoice API and settlement detection vs LNbits {LNBITS_VERSION}\n\n"
        f"Same run, same regtest LND node ({desc['lnd_version']}), SQLite on both sides; "
        f"`python -m bench.lnbits --invoices {args.invoices} --payments {args.payments} "
        f"--concurrency {args.concurrency}` ({i['per_side']} invoices per side in {i['rounds']} interleaved rounds, "
        f"{d['payments_per_side']} payments per side, polls every {d['poll_interval_ms']:.0f} ms). "
        f"Measured {time.strftime('%Y-%m-%d')} on commit {(source['commit'] or 'unknown')[:12]}"
        + (
            f" with uncommitted service changes ({', '.join(source['service_uncommitted_changes'])})"
            if source["service_uncommitted_changes"]
            else ""
        )
        + "; details in lnbits.json.\n\n"
        + table
        + "\n"
        + "".join(f"- {x}\n" for x in NOTES)
    )
    (RESULTS / "lnbits.md").write_text(md)
    print()
    print(table)
    print(f"results: {path} and {RESULTS / 'lnbits.md'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--invoices", type=int, default=300, help="invoices per side over the rounds")
    ap.add_argument("--payments", type=int, default=200, help="payments per side for settlement detection")
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    if args.invoices < ROUNDS or args.payments < 1 or args.concurrency < 1:
        ap.error(f"need --invoices >= {ROUNDS}, --payments >= 1, --concurrency >= 1")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
