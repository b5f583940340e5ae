"""How long a hold invoice can lock a job's money (pure: no LND, no clock).

A hold invoice locks the customer's money in an HTLC without taking it; it must outlive the
job. Its final CLTV delta is sized from the time the job needs (RoboSats' rule: seconds x
speed-up / pessimistic block time), plus LND's ``holdexpirydelta``, our deadline guard's
margin and a safety margin.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.config import Settings


class EscrowMode(enum.StrEnum):
    """How an escrow invoice holds a job's money (decided once, at intake: service/escrow/mode.py)."""

    HOLD = "hold"  # a hold invoice: the HTLC is locked at our node until we settle or cancel
    CUSTODIAL = "custodial"  # a regular invoice: the money is ours once paid


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
        return cls(
            s.hold_block_seconds,
            s.hold_speedup,
            s.hold_margin_blocks,
            s.hold_max_cltv_blocks,
            s.hold_expiry_delta,
            s.guard_margin_blocks,
        )

    def cltv_blocks(self, hold_seconds: int) -> int:
        """Final CLTV delta for a hold that must last ``hold_seconds``."""
        if hold_seconds < 0:
            raise ValueError("hold_seconds must be >= 0")
        job_blocks = math.ceil(hold_seconds * self.speedup / self.block_seconds)
        return job_blocks + self.margin_blocks + self.hold_expiry_delta + self.guard_margin_blocks

    def fits(self, hold_seconds: int) -> bool:
        return self.cltv_blocks(hold_seconds) <= self.max_cltv_blocks
