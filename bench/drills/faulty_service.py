"""FAULT INJECTION, for the sigkill drill only: the service, killing itself at an exact point of a payout.

    python -m bench.drills.faulty_service [service.cli arguments, e.g. --log-level WARNING serve]

Runs exactly ``service.cli`` (the production entry point) after one patch, chosen by
``FEDSTR_DRILL_DIE_AT=<point>:<N>``: on the N-th time this process reaches the point, it
appends a note (point, payout id, payment hash, pid, time) to ``FEDSTR_DRILL_FAULT_NOTE``
and sends SIGKILL to itself. The points:

- ``send``: ``Payouts._send`` is entered — the payout's attempt row is committed, and
  neither ``TrackPaymentV2`` nor ``SendPaymentV2`` has been called (between the
  write-ahead and the send);
- ``settled``: ``Payouts._finish`` is called to mark a payout succeeded — LND said
  SUCCEEDED and the attempt row says so, the payout row does not yet.

A SIGKILL from outside cannot be timed to land exactly there; this wrapper can. Payouts
already in the note file are not counted (their recovery after the restart would otherwise
be hit again and again): each kill lands on another payout. Production code has no such
hook: this module is never imported by the service.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time


def arm() -> None:
    from service.payouts.worker import Payouts

    point, _, n = os.environ.get("FEDSTR_DRILL_DIE_AT", "").partition(":")
    note = os.environ.get("FEDSTR_DRILL_FAULT_NOTE", "")
    if point not in ("send", "settled") or not n.isdigit() or int(n) < 1:
        return
    die_at = int(n)
    calls = 0
    killed_before = set()
    if note and os.path.exists(note):
        with open(note) as f:
            killed_before = {json.loads(line)["payout"] for line in f if line.strip()}

    def reached(payout_id: str, payment_hash: str | None) -> None:
        nonlocal calls
        if payout_id in killed_before:
            return
        calls += 1
        if calls != die_at:
            return
        if note:
            with open(note, "a") as f:
                f.write(
                    json.dumps(
                        {
                            "point": point,
                            "payout": payout_id,
                            "payment_hash": payment_hash,
                            "pid": os.getpid(),
                            "call": calls,
                            "at": time.time(),
                        }
                    )
                    + "\n"
                )
                f.flush()
                os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "send":
        original_send = Payouts._send

        async def _send(self, payout_id, payment_hash, payreq, fee_limit):
            reached(payout_id, payment_hash)
            return await original_send(self, payout_id, payment_hash, payreq, fee_limit)

        Payouts._send = _send
    else:
        original_finish = Payouts._finish

        async def _finish(self, payout_id, state, detail, **kw):
            if state == "succeeded":
                reached(payout_id, kw.get("payment_hash"))
            return await original_finish(self, payout_id, state, detail, **kw)

        Payouts._finish = _finish


def main() -> int:
    arm()
    from service.cli import main as serve

    return serve(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
