"""Which escrow mode a job gets: the one rule, applied once, when its request is accepted
(``service/escrow/machine.py``). Invoices are then created in the decided mode; nothing
decides it again.
"""

from __future__ import annotations

from service.lightning.hold import HoldSizing
from service.nostr.protocol.errors import CodecErrorReason
from service.nostr.protocol.terms import EscrowTerms, Mode


class ModeRefused(ValueError):
    """No mode the escrow offers can hold the job (a request refusal with ``reason``)."""

    def __init__(self, reason: CodecErrorReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def decide_mode(requested: Mode, job_seconds: int, margin_seconds: int, terms: EscrowTerms, sizing: HoldSizing) -> Mode:
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
    raise ModeRefused(
        CodecErrorReason.HOLD_WINDOW_EXCEEDED,
        f"the job needs {sizing.cltv_blocks(hold_seconds)} blocks of HTLC lifetime; hold invoices are "
        f"limited to {sizing.max_cltv_blocks} blocks and jobs to {terms.max_hold_seconds} s",
    )
