"""Make tests/unit/fixtures/blinded_invoices.json: real blinded invoices from a running devstack,
each with LND's own reading of it (``lncli decodepayreq`` on the escrow node).

    python3 tests/support/capture_blinded_invoices.py STACK_DIR tests/unit/fixtures/blinded_invoices.json

(Standard library only; STACK_DIR is a stack's ``--dir``, holding its stack.json.)"""

import json
import subprocess
import sys
from pathlib import Path

desc = json.loads((Path(sys.argv[1]) / "stack.json").read_text())
BIN = desc["bin"]


def lncli(node, *args):
    n = desc["nodes"][node]
    out = subprocess.run(
        [f"{BIN}/lncli", "--network=regtest", f"--lnddir={n['lnddir']}", f"--rpcserver={n['rpc']}", *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)


cases = {}


def make(name, node, how, args):
    inv = lncli(node, "addinvoice", *args)
    pr = inv["payment_request"]
    cases[name] = {
        "made_by": node,
        "how": f"lncli addinvoice {' '.join(args)} (on the {node} node)",
        "how_note": how,
        "payment_request": pr,
        "lnd_decodepayreq": lncli("escrow", "decodepayreq", pr),
    }


make(
    "payee2_one_real_hop",
    "payee2",
    "one path: payee (a real hop, its channel policy x1.1) then payee2; no dummy hops",
    [
        "--amt_msat",
        "50000",
        "--memo",
        "blinded fixture",
        "--expiry",
        "31536000",
        "--blind",
        "--min_real_blinded_hops",
        "1",
        "--num_blinded_hops",
        "1",
    ],
)
make(
    "payee_via_escrow_only",
    "payee",
    "LND's defaults: one path, escrow (our node) as introduction node, 2 dummy hops",
    ["--amt_msat", "50000", "--memo", "blinded fixture, via escrow", "--expiry", "31536000", "--blind"],
)
make(
    "escrow_own",
    "escrow",
    "our own node's blinded invoice: a path of just our node",
    [
        "--amt_msat",
        "50000",
        "--memo",
        "blinded fixture, own",
        "--expiry",
        "31536000",
        "--blind",
        "--min_real_blinded_hops",
        "0",
        "--num_blinded_hops",
        "0",
    ],
)
out = {
    "captured_on": "regtest devstack, LND " + desc["lnd_version"],
    "nodes": {n: desc["nodes"][n]["pubkey"] for n in ("escrow", "payee", "payee2")},
    "cases": cases,
}
Path(sys.argv[2]).write_text(json.dumps(out, indent=2) + "\n")
