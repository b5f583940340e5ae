"""python -m bench.drills [all|sigkill|lnd-outage|relay-restart|postgres-restart|replicas|adversarial|deadline-outage]
[options]

    --jobs N        jobs per drill (default: sigkill 50, the others 10)
    --kills K       SIGKILLs in the sigkill drill (default 20; a quarter of them, at least one,
                    exactly between a payout's write-ahead and its send)
    --seed S        seeds every random choice (printed; repeat a failing run with it)
    --lnd-outage T  seconds the escrow's LND stays stopped (default 30)
    --lnd-stop-anytime  lnd-outage: stop LND while a payout is being sent (the first seen written
                    ahead; LND v0.20.2 may then keep that payment IN_FLIGHT for good): the drill
                    then acts as the operator, reissuing such a payout once LND allows it
    --inject-stuck-payment  lnd-outage: INJECTED, LND's stuck record (IN_FLIGHT for good, an HTLC
                    expiring 80 blocks on) for the second payout sent, which is never sent; the
                    drill as the operator mines past the expiry and reissues it
    --relay-down T  seconds the relay stays stopped (default 8)
    --timeout T     hard timeout of each drill in seconds (default: from its size)
    --no-write      do not write bench/results/drills.json and drills.md

The stack: FEDSTR_BENCH_STACK_DIR reuses a running one (never stopped here); otherwise
``bench.common.stack(postgres=True)`` brings one up on FEDSTR_BENCH_PORT_BASE and stops it
at the end. Exit status 1 when any drill failed: a job not finished, a duplicate payment,
a lost fact, a ledger imbalance or a reconciliation difference.
"""

from __future__ import annotations

import os

# grpc's C core logs every GOAWAY LND sends to long-lived idle channels; the drill's output is its report
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import argparse
import asyncio
import random
import sys
import time

from bench.common import RESULTS, ROOT, markdown_table, stack, stack_down, write
from bench.drills.drills import DRILLS, Options

HEADER = (
    "drill",
    "jobs (finished/total)",
    "faults injected",
    "payments made",
    "duplicate payments",
    "facts lost",
    "ledger imbalance (msat)",
    "recon. diff (msat)",
    "seconds",
    "result",
)


def row(r: dict) -> tuple[str, ...]:
    return (
        r["drill"],
        f"{r['jobs_finished']}/{r['jobs_total']}",
        str(r["faults_injected"]),
        f"{r['payments_made']}/{r['payments_expected']}",
        str(r["duplicate_payments"]),
        str(r["facts_lost"]),
        str(r["ledger_imbalance_msat"]),
        str(r["reconciliation_discrepancy_msat"]),
        f"{r['seconds']:.0f}",
        "PASS" if r["passed"] else "FAIL",
    )


def text_table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEADER)]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=False)))

    return "\n".join([line(HEADER), line(tuple("-" * w for w in widths)), *(line(r) for r in rows)])


def markdown(results: list[dict], command: str, seed: int, rev: dict) -> str:
    out = [
        "# Fault drills: last results",
        "",
        f"`{command}` (seed {seed}) on {time.strftime('%Y-%m-%d')}, commit {rev['commit']}"
        + (f" with uncommitted changes in {', '.join(rev['service_modified'])}" if rev["service_modified"] else "")
        + "; what each drill does and counts: docs/devstack.md, section *Drills*.",
        "",
        markdown_table([row(r) for r in results], HEADER),
    ]
    for r in results:
        out += ["", f"## {r['drill']}", "", r["about"] + ".", ""]
        kinds: dict[str, int] = {}
        for f in r["faults"]:
            kinds[f["kind"]] = kinds.get(f["kind"], 0) + 1
        out.append("- faults: " + (", ".join(f"{k} × {v}" for k, v in kinds.items()) or "none"))
        if r["drill"] == "sigkill":
            exact = sum(1 for f in r["faults"] if f["kind"] == "sigkill-after-write-ahead" and f.get("exact"))
            out.append(
                f"- kills exactly between a payout's write-ahead row and SendPaymentV2 (attempt row "
                f"`sending`, LND had no payment for the hash): {exact}"
            )
            exact = sum(1 for f in r["faults"] if f["kind"] == "sigkill-after-attempt-succeeded" and f.get("exact"))
            out.append(
                f"- kills exactly between a payment's SUCCEEDED recorded on its attempt row and the payout "
                f"row (LND: SUCCEEDED, payout not yet `succeeded`): {exact}"
            )
        out.append(
            f"- payments: {r['payments_made']} settled at the payee node, {r['escrow_payments_succeeded']} "
            f"succeeded in the escrow node's ListPayments, {r['payout_invoices_issued']} payout invoices issued; "
            f"customer payments succeeded: {r['customer_payments_succeeded']}"
        )
        if r.get("job_seconds"):
            js = r["job_seconds"]
            out.append(f"- a job from request to closed: min {js['min']} s, median {js['median']} s, max {js['max']} s")
        m = r["market"]
        out.append(
            f"- market: {m['events_published']} events published ({m['events_republished']} needed another try), "
            f"{m['relay_resubscriptions']} relay re-subscriptions, {m['rest_payout_invoices']} payout invoices "
            f"over REST, {m['customer_payment_attempts']} customer payment attempts; service starts: "
            f"{r['service_starts']}; database: {r['database']}"
        )
        if r.get("hostile"):
            h = r["hostile"]
            out.append(
                f"- hostile participants: copies of honest results paid {h['copies_paid']}; the invoice given "
                f"for two rewards paid {h['race_paid_by_node']} time(s) by the escrow node; the poisoned job "
                f"{h['poisoned_job']} {h['poisoned_decided_after_deadline_s']} s after its deadline; the flood: "
                f"{h['flood_accepted']} accepted, {h['flood_refused_busy']} refused (escrow_busy); the held "
                f"payout {h['held_payout_state']} while the honest jobs closed (slowest {h['honest_max_s']} s); "
                f"escrow net per job at least {h['min_net_msat']} msat, negative for "
                f"{len(h['negative_net_jobs'])} job(s)"
            )
        for n in r["notes"]:
            out.append(f"- note: {n}")
    return "\n".join(out) + "\n"


async def run(names: list[str], opts: Options, desc: dict) -> list[dict]:
    run_dir = ROOT / ".devstack" / "drills" / time.strftime("%Y%m%d-%H%M%S")
    results = []
    for name in names:
        drill = DRILLS[name](desc, opts, run_dir, lambda s: print(s, flush=True))
        results.append(await drill.run())
        r = results[-1]
        print(f"== {name}: {'PASS' if r['passed'] else 'FAIL'} in {r['seconds']:.0f} s", flush=True)
        for n in r["notes"]:
            print(f"   note: {n}", flush=True)
    return results


def revision() -> dict:
    """The commit the drills ran on, and whether the service's files differed from it."""
    import subprocess

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "service", "alembic"], cwd=ROOT, capture_output=True, text=True
    )
    return {
        "commit": head.stdout.strip() or None,
        "service_modified": sorted(line[3:] for line in dirty.stdout.splitlines() if line.strip()),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.drills", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("drill", nargs="?", default="all", choices=["all", *DRILLS])
    ap.add_argument("--jobs", type=int)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--lnd-outage", type=float, default=30.0)
    ap.add_argument("--lnd-stop-anytime", action="store_true")
    ap.add_argument("--inject-stuck-payment", action="store_true")
    ap.add_argument("--relay-down", type=float, default=8.0)
    ap.add_argument("--timeout", type=float)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1, 10**6)
    names = list(DRILLS) if args.drill == "all" else [args.drill]
    command = "python -m bench.drills " + " ".join(sys.argv[1:] if argv is None else argv)
    print(
        f"fault drills: {', '.join(names)}; seed {seed} (repeat: python -m bench.drills {args.drill} "
        f"--seed {seed}{f' --jobs {args.jobs}' if args.jobs else ''}"
        f"{f' --kills {args.kills}' if args.kills != 20 else ''})",
        flush=True,
    )
    opts = Options(
        jobs=args.jobs,
        kills=args.kills,
        seed=seed,
        lnd_outage=args.lnd_outage,
        relay_down=args.relay_down,
        timeout=args.timeout,
        lnd_stop_anytime=args.lnd_stop_anytime,
        inject_stuck_payment=args.inject_stuck_payment,
    )
    desc = stack(postgres=True)
    try:
        results = asyncio.run(run(names, opts, desc))
    finally:
        stack_down(desc)
    print()
    print(text_table([row(r) for r in results]))
    print(f"seed {seed}")
    if not args.no_write:
        write("drills", {"command": command.strip(), "seed": seed, "revision": revision(), "drills": results})
        (RESULTS / "drills.md").write_text(markdown(results, command.strip(), seed, revision()))
        print(f"wrote {RESULTS / 'drills.json'} and {RESULTS / 'drills.md'}")
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
