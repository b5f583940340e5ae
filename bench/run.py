"""Every benchmark, one network: ``make bench`` (``python -m bench.run``).

Brings up the bench network once (``.devstack/bench-29900``, or reuses
``FEDSTR_BENCH_STACK_DIR``), runs each benchmark as its own process against it, stops the
network, and writes ``bench/results/summary.md``: every target with its figure, its
baseline from the same run, and whether it is met. Each benchmark also writes its own
JSON and markdown in ``bench/results/``.

    python -m bench.run [--only intake,lightning,escrow,lnbits,blobs]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from bench.common import RESULTS, ROOT, markdown_table, stack, stack_down

BENCHES = ("intake", "lightning", "escrow", "lnbits", "blobs")


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def summary_rows() -> list[tuple]:
    rows: list[tuple] = []
    if d := _load("intake"):
        rows.append(
            (
                "intake: verified events/s",
                d["intake_events_per_s"],
                f"coincurve ceiling {d['ceiling_events_per_s']}",
                d["ratio"],
                ">= 0.25",
                d["ratio"] >= 0.25,
            )
        )
    if d := _load("escrow"):
        if c := d.get("creation"):
            rows.append(
                (
                    f"escrow creation, full path, {c['concurrency']} clients: jobs/s",
                    c["ours_full_path"]["per_s"],
                    f"AddHoldInvoice {c['direct_add_hold_invoice']['per_s']}",
                    c["ratio"],
                    ">= 0.8",
                    c["met"],
                )
            )
            if h := c.get("at_high_concurrency"):
                rows.append(
                    (
                        f"escrow creation, full path, {h['concurrency']} clients: jobs/s",
                        h["ours_full_path"]["per_s"],
                        f"AddHoldInvoice {h['direct_add_hold_invoice']['per_s']}",
                        h["ratio"],
                        ">= 0.8",
                        h["met"],
                    )
                )
        if p := d.get("payouts"):
            rows.append(
                (
                    "payouts succeeded/s",
                    p["ours_per_s"],
                    f"SendPaymentV2 loop {p['raw_send_payment_v2_per_s']}",
                    p["ratio"],
                    ">= 0.8",
                    p["met"],
                )
            )
        if m := d.get("memory"):
            rows.append(
                (
                    f"RSS with {m['open_escrows']} open escrows (MB)",
                    m["rss_mb"],
                    f"idle {m['idle_rss_mb']}",
                    "",
                    "<= 300",
                    m["met"],
                )
            )
    if d := _load("lnbits"):
        inv, det = d["invoice_api"], d["settlement_detection"]
        rows.append(
            (
                "invoice API: invoices/s",
                inv["ours"]["per_s"],
                f"LNbits {inv['lnbits']['per_s']}",
                inv["ratio_throughput"],
                ">= 1.5",
                d["pass"]["invoice_throughput"],
            )
        )
        rows.append(
            (
                "invoice API: p99 ms",
                inv["ours"]["p99_ms"],
                f"LNbits {inv['lnbits']['p99_ms']}",
                inv["ratio_p99"],
                "< 1",
                d["pass"]["invoice_p99"],
            )
        )
        rows.append(
            (
                "settlement detection: p50 ms",
                det["ours"]["p50_ms"],
                f"LNbits {det['lnbits_status_endpoint']['p50_ms']}",
                det["ratio_p50_vs_status"],
                "<= 1",
                d["pass"]["settlement_p50"],
            )
        )
    if d := _load("lightning"):
        c, s = d["invoice_creation"], d["settlement_detection"]
        rows.append(
            (
                "escrow invoices (our layer, no engine): /s",
                c["ours_per_s"],
                f"AddHoldInvoice {c['direct_add_hold_invoice_per_s']}",
                c["ratio"],
                ">= 0.8",
                c["ratio"] >= 0.8,
            )
        )
        rows.append(
            (
                "settlement detection (watcher): p50 ms",
                s["p50_ms"],
                f"p99 {s['p99_ms']}",
                "",
                "<= 50",
                s["p50_ms"] <= 50,
            )
        )
    if d := _load("blobs"):  # no network needed: the blob store over loopback
        for op, label in (("up", "upload"), ("down", "download")):
            x = d[op]
            rows.append(
                (
                    f"blob {label}, {d['size_mb']} MB: MB/s",
                    x["ours_mb_per_s"],
                    f"plain loopback copy {x['plain_mb_per_s']}",
                    x["ratio"],
                    ">= 0.5",
                    x["met"]["throughput"],
                )
            )
            rows.append(
                (
                    f"blob {label}, {d['size_mb']} MB: peak RSS growth, server / client (MB)",
                    f"{x['ours_server_peak_mb']} / {x['ours_client_peak_mb']}",
                    f"plain {x['plain_server_peak_mb']} / {x['plain_client_peak_mb']}",
                    "",
                    "<= 32",
                    x["met"]["rss"],
                )
            )
    return [(*r[:5], "met" if r[5] else "**missed**") for r in rows]


def write_summary() -> str:
    text = (
        f"# Benchmarks ({time.strftime('%Y-%m-%d')}; each ratio against a baseline from the same run)\n\n"
        + markdown_table(summary_rows(), ("figure", "ours", "baseline", "ratio", "target", ""))
    )
    (RESULTS / "summary.md").write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset of " + ",".join(BENCHES))
    args = ap.parse_args()
    chosen = [b for b in args.only.split(",") if b]
    unknown = set(chosen) - set(BENCHES)
    if unknown:
        raise SystemExit(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    desc = stack()
    env = {**os.environ, "FEDSTR_BENCH_STACK_DIR": desc["dir"]}
    failed = []
    try:
        for name in chosen:
            print(f"\n===== bench.{name} =====", flush=True)
            t0 = time.monotonic()
            rc = subprocess.run([sys.executable, "-m", f"bench.{name}"], cwd=ROOT, env=env).returncode
            print(f"===== bench.{name}: exit {rc} in {time.monotonic() - t0:.0f} s", flush=True)
            if rc:
                failed.append(name)
    finally:
        stack_down(desc)
    print("\n" + write_summary())
    if failed:
        raise SystemExit(f"benchmark(s) failed to run: {', '.join(failed)}")


if __name__ == "__main__":
    main()
