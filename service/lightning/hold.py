"""How long a hold invoice can lock a job's money, and so which escrow mode a job gets.

Pure (no LND, no clock): the one rule that decides a job's mode (:func:`decide_mode`),
used once, when the request is accepted (``service/escrow/machine.py``). Invoices are then
created in the decided mode; nothing decides it again.

A hold invoice locks the customer's money in an HTLC without taking it; it must outlive the
job. Its final CLTV delta is sized from the time the job needs (RoboSats' rule: seconds x
speed-up / pessimistic block time), plus LND's ``holdexpirydelta``, our deadline guard's
margin and a safety margin.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from service.nostr.protocol.errors import CodecErrorReason
from service.nostr.protocol.terms import EscrowTerms, Mode

if TYPE_CHECKING:
    from service.config import Settings


@dataclass(frozen=True)
class HoldSizing:
    block_seconds: int = 480
    speedup: float = 1.7
    margin_blocks: int = 36
    max_cltv_blocks: int = 1008
    hold_expiry_delta: int = 12
    guard_margin_blocks: int = 12

    @classmethod
    def from_settings(cls, s: Settings) -> HoldSizing:
        return cls(s.hold_block_seconds, s.hold_speedup, s.hold_margin_blocks, s.hold_max_cltv_blocks,
                   s.hold_expiry_delta, s.guard_margin_blocks)

    def cltv_blocks(self, hold_seconds: int) -> int:
        """Final CLTV delta for a hold that must last ``hold_seconds``."""
        if hold_seconds < 0:
            raise ValueError("hold_seconds must be >= 0")
        job_blocks = math.ceil(hold_seconds * self.speedup / self.block_seconds)
        return job_blocks + self.margin_blocks + self.hold_expiry_delta + self.guard_margin_blocks

    def fits(self, hold_seconds: int) -> bool:
        return self.cltv_blocks(hold_seconds) <= self.max_cltv_blocks


class ModeRefused(ValueError):
    """No mode the escrow offers can hold the job (a request refusal with ``reason``)."""

    def __init__(self, reason: CodecErrorReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def decide_mode(requested: Mode, job_seconds: int, margin_seconds: int, terms: EscrowTerms,
                sizing: HoldSizing) -> Mode:
    """The concrete mode (hold or custodial) of a job that runs ``job_seconds`` from now (to its
    validation deadline), whose hold invoice must outlive that by ``margin_seconds``.

    Hold fits when it is offered, the job is within the announced ``max_hold_seconds`` and
    the HTLC's CLTV delta for the job and the margin within ``max_cltv_blocks``. ``auto`` takes hold when it fits,
    else custodial when offered; ``hold`` and ``custodial`` are taken as asked or refused.
    """
    hold_offered, custodial_offered = Mode.HOLD in terms.modes, Mode.CUSTODIAL in terms.modes
    if requested is Mode.CUSTODIAL or (requested is Mode.AUTO and not hold_offered):
        if not custodial_offered:
            raise ModeRefused(CodecErrorReason.MODE_NOT_OFFERED, "custodial escrow is not offered")
        return Mode.CUSTODIAL
    if not hold_offered:
        raise ModeRefused(CodecErrorReason.MODE_NOT_OFFERED, "hold escrow is not offered")
    hold_seconds = job_seconds + margin_seconds
    if job_seconds <= terms.max_hold_seconds and sizing.fits(hold_seconds):
        return Mode.HOLD
    if requested is Mode.AUTO and custodial_offered:
        return Mode.CUSTODIAL
    raise ModeRefused(CodecErrorReason.HOLD_WINDOW_EXCEEDED,
                      f"the job needs {sizing.cltv_blocks(hold_seconds)} blocks of HTLC lifetime; hold invoices are "
                      f"limited to {sizing.max_cltv_blocks} blocks and jobs to {terms.max_hold_seconds} s")
