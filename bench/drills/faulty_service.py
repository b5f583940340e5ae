"""FAULT INJECTION, for the drills only: the service, killing itself at an exact point of a payout (sigkill),
or given LND's stuck record of one payment (lnd-outage).

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

And one point that kills nothing, for the lnd-outage drill (``--inject-stuck-payment``):

- ``stuck``: the N-th payout sent gets LND v0.20.2's stuck record instead of a payment:
  ``SendPaymentV2`` is never called for it, and LND's view of it (``SendPaymentV2``'s stream,
  ``TrackPaymentV2``) is IN_FLIGHT for good with one HTLC in flight whose expiry height is
  the height at the send plus STUCK_EXPIRY_BLOCKS (no HTLC on the channel, the payee's
  invoice open, as the drill saw LND do after being stopped mid-dispatch).

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
    if point not in ("send", "settled", "stuck") or not n.isdigit() or int(n) < 1:
        return
    die_at = int(n)
    if point == "stuck":
        arm_stuck(die_at, note)
        return
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


STUCK_EXPIRY_BLOCKS = 80


def arm_stuck(n: int, note: str) -> None:
    """INJECTED: LND's record of the n-th payout's payment kept IN_FLIGHT for good (see above)."""
    import asyncio

    from service.lightning.client import (
        FailureReason,
        HtlcAttemptStatus,
        LndClient,
        Payment,
        PaymentHtlc,
        PaymentStatus,
    )
    from service.payouts.worker import Payouts

    stuck: dict[bytes, Payment] = {}  # payment hash -> the record LND keeps
    stuck_requests: dict[str, bytes] = {}
    seen: set[str] = set()
    original_send = Payouts._send

    async def _send(self, payout_id, payment_hash, payreq, fee_limit):
        if payout_id not in seen:
            seen.add(payout_id)
            if len(seen) == n:
                height = (await self.lnd.get_info()).block_height
                at = time.time_ns()
                h = bytes.fromhex(payment_hash)
                stuck[h] = Payment(
                    payment_hash=h,
                    status=PaymentStatus.IN_FLIGHT,
                    value_msat=0,
                    fee_msat=0,
                    preimage=None,
                    failure_reason=FailureReason.NONE,
                    payment_index=0,
                    creation_time_ns=at,
                    htlc_attempts=1,
                    htlcs=(PaymentHtlc(HtlcAttemptStatus.IN_FLIGHT, at, 0, height + STUCK_EXPIRY_BLOCKS),),
                )
                stuck_requests[payreq] = h
                if note:
                    with open(note, "a") as f:
                        f.write(
                            json.dumps(
                                {
                                    "point": "stuck",
                                    "payout": payout_id,
                                    "payment_hash": payment_hash,
                                    "expiry_height": height + STUCK_EXPIRY_BLOCKS,
                                    "at": time.time(),
                                }
                            )
                            + "\n"
                        )
        return await original_send(self, payout_id, payment_hash, payreq, fee_limit)

    original_send_payment = LndClient.send_payment
    original_track = LndClient.track_payment

    async def send_payment(self, payment_request, **kw):
        h = stuck_requests.get(payment_request)
        if h is None:
            async for p in original_send_payment(self, payment_request, **kw):
                yield p
            return
        yield stuck[h]
        await asyncio.Event().wait()  # LND never finishes it

    async def track_payment(self, payment_hash, **kw):
        if payment_hash in stuck:
            yield stuck[payment_hash]
            return
        async for p in original_track(self, payment_hash, **kw):
            yield p

    Payouts._send = _send
    LndClient.send_payment = send_payment
    LndClient.track_payment = track_payment


def main() -> int:
    arm()
    from service.cli import main as serve

    return serve(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
