"""The hold-invoice deadline guard: we decide before LND's auto-cancel does.

LND cancels an accepted hold invoice by itself when the chain tip comes within
``holdexpirydelta`` blocks of the HTLC's expiry; the money then silently goes back
to the payer. For an escrow that is a decision taken by nobody. The guard checks
every accepted hold invoice against the chain tip and, once fewer than
``hold_expiry_delta + guard_margin`` blocks remain, acts according to the job's
terms recorded on the invoice (``on_deadline``):

- ``settle``: take the money into custody (the job continues custodially; the
  ledger books it as a liability), or
- ``cancel``: give it back (the refund of hold mode).

Either way the result is confirmed by lookup and recorded as an ordinary fact
with source ``guard``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import select

from service.lightning.errors import InvoiceStateError, LndError
from service.lightning.models import LnInvoice
from service.lightning.settlement import SettlementWatcher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GuardAction:
    payment_hash: str
    action: str  # settle | cancel
    remaining_blocks: int
    outcome: str | None  # the invoice's state in LND afterwards: settled | canceled


async def guard_once(watcher: SettlementWatcher, *, hold_expiry_delta: int, margin_blocks: int) -> list[GuardAction]:
    lnd = watcher.lnd
    tip = (await lnd.get_info()).block_height
    async with watcher.sessions() as s:
        rows = (
            await s.execute(
                select(
                    LnInvoice.payment_hash, LnInvoice.htlc_expiry_height, LnInvoice.on_deadline, LnInvoice.preimage
                ).where(LnInvoice.mode == "hold", LnInvoice.state == "accepted")
            )
        ).all()
    actions = []
    for h, expiry_height, on_deadline, preimage in rows:
        if expiry_height is None:
            continue
        remaining = expiry_height - tip
        if remaining > hold_expiry_delta + margin_blocks:
            continue
        try:
            if on_deadline == "settle":
                assert preimage is not None, "a hold invoice we created has its preimage"
                await lnd.settle_invoice(bytes.fromhex(preimage))
            else:
                await lnd.cancel_invoice(bytes.fromhex(h))
        except InvoiceStateError:
            pass  # already settled or cancelled: the lookup below records what happened
        except LndError as e:
            log.error("deadline guard could not %s invoice %s (%d blocks left): %s", on_deadline, h, remaining, e)
            continue
        result = await watcher.confirm(h, "guard")
        outcome = result.lnd_state.name.lower() if result.lnd_state else None
        log.warning("deadline guard: %s hold invoice %s with %d blocks left -> %s", on_deadline, h, remaining, outcome)
        actions.append(GuardAction(h, on_deadline, remaining, outcome))
    return actions
