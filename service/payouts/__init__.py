"""Payouts: money the escrow owes, paid over Lightning. The only writer of ``ln_payouts`` and
``ln_payout_attempts`` (tests/unit/test_payout_writers.py checks it).

- :mod:`.types`   the typed values: states, kinds, destinations, reasons, the worker's policy
- :mod:`.store`   writes in the caller's transaction: :func:`~.store.create`,
                  :func:`~.store.accept_invoice` (every path that gives a payout an invoice),
                  :func:`~.store.retry`, :func:`~.store.cancel_payment` (an operator's),
                  :func:`~.store.expire` (a claim window's end), :func:`~.store.reopen` and
                  :func:`~.store.reissue` (an operator's)
- :mod:`.stuck`   LND's view of a payment it keeps in flight, and the rule for reissuing its payout
- :mod:`.check`   the invoice checks: offline (any path) and full, with our node (before paying)
- :mod:`.worker`  :class:`~.worker.Payouts`: claim, pay, finish, reconcile

Only the types are imported here: ``service/lightning/models.py`` types its columns with them,
and the other modules import those models.
"""

from service.payouts.types import (
    AcceptReason,
    AttemptState,
    CancelReason,
    CancelRefused,
    CheckReason,
    ClaimWindow,
    Destination,
    DestinationKind,
    InvoiceCheckError,
    InvoiceRefused,
    InvoiceSource,
    NewPayout,
    PayoutKind,
    PayoutPolicy,
    PayoutReason,
    PayoutState,
    ReissueReason,
    ReissueRefused,
    ReopenReason,
    ReopenRefused,
    RetryReason,
    RetryRefused,
    why,
)

__all__ = [
    "AcceptReason",
    "AttemptState",
    "CancelReason",
    "CancelRefused",
    "CheckReason",
    "ClaimWindow",
    "Destination",
    "DestinationKind",
    "InvoiceCheckError",
    "InvoiceRefused",
    "InvoiceSource",
    "NewPayout",
    "PayoutKind",
    "PayoutPolicy",
    "PayoutReason",
    "PayoutState",
    "ReissueReason",
    "ReissueRefused",
    "ReopenReason",
    "ReopenRefused",
    "RetryReason",
    "RetryRefused",
    "why",
]
