"""FAULT INJECTION, for the sigkill drill only: the service, dying between a payout's write-ahead and its send.

    python -m bench.drills.faulty_service [service.cli arguments, e.g. --log-level WARNING serve]

Runs exactly ``service.cli`` (the production entry point) after one patch:
``service.lightning.payouts.Payouts._send`` — called right after the payout's attempt row
is committed and before ``TrackPaymentV2``/``SendPaymentV2`` — is wrapped so that its
N-th call in this process (``FEDSTR_DRILL_DIE_AT_SEND=N``) appends a note (payout id,
payment hash, pid, time) to ``FEDSTR_DRILL_FAULT_NOTE`` and sends SIGKILL to this very
process. Calls for payouts already in the note file are not counted (their re-send after
the restart would otherwise be hit again and again): each kill lands on another payout. A SIGKILL from outside cannot be timed to land exactly there; this wrapper can.
Production code has no such hook: this module is never imported by the service.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time


def arm() -> None:
    from service.lightning.payouts import Payouts

    die_at = int(os.environ.get("FEDSTR_DRILL_DIE_AT_SEND", "0"))
    note = os.environ.get("FEDSTR_DRILL_FAULT_NOTE", "")
    if die_at <= 0:
        return
    original = Payouts._send
    calls = 0
    killed_before = set()
    if note and os.path.exists(note):
        with open(note) as f:
            killed_before = {json.loads(line)["payout"] for line in f if line.strip()}

    async def _send(self, payout_id, payment_hash, payreq, fee_limit):  # noqa: ANN001, ANN202
        nonlocal calls
        calls += payout_id not in killed_before
        if calls == die_at and payout_id not in killed_before:
            if note:
                with open(note, "a") as f:
                    f.write(json.dumps({"payout": payout_id, "payment_hash": payment_hash, "pid": os.getpid(),
                                        "call": calls, "at": time.time()}) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return await original(self, payout_id, payment_hash, payreq, fee_limit)

    Payouts._send = _send


def main() -> int:
    arm()
    from service.cli import main as serve
    return serve(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
