"""The payouts' typed values: states, kinds, destinations, reasons and the worker's policy.

Nothing here does I/O; the table columns (``service/lightning/models.py``) are typed with these
enums, so a value outside them never reaches ``ln_payouts`` or ``ln_payout_attempts``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from service.config import Settings


class PayoutState(enum.StrEnum):
    """``ln_payouts.state``. pending -> sending -> succeeded | failed | unknown | needs_invoice;
    needs_invoice -> pending when the payee gives an invoice (:func:`store.accept_invoice`);
    needs_invoice -> expired at its ``claim_by`` (:func:`store.expire_due`), terminal unless an
    operator reopens it (:func:`store.reopen`: back to needs_invoice with a fresh window)."""

    PENDING = "pending"
    SENDING = "sending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    UNKNOWN = "unknown"
    NEEDS_INVOICE = "needs_invoice"
    EXPIRED = "expired"  # nobody claimed it within its claim window: the money is the operator's


class AttemptState(enum.StrEnum):
    """``ln_payout_attempts.state``. sending -> succeeded | failed | unknown | not_initiated;
    unknown -> abandoned (an operator's reissue, :func:`store.reissue`)."""

    SENDING = "sending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    UNKNOWN = "unknown"
    NOT_INITIATED = "not_initiated"
    # closed by an operator's reissue once LND's payment failed or can no longer settle
    # (service.payouts.stuck.reissue_refusal): never sent again, its hash never used again
    ABANDONED = "abandoned"

    @property
    def reusable(self) -> bool:
        """Whether the same payout may send this attempt's hash again: LND retries only a FAILED
        payment, and a never-initiated one was never sent."""
        return self in (AttemptState.FAILED, AttemptState.NOT_INITIATED)


class PayoutKind(enum.StrEnum):
    """What a payout is for: earned (reward, validator fee) or money back to the customer."""

    REWARD = "reward"
    VALIDATOR_FEE = "validator_fee"
    REFUND = "refund"
    OVERPAID = "overpaid"
    APPEAL_FEE_REFUND = "appeal_refund"  # an appeal fee back to its appellant (customer or provider)

    @property
    def to_customer(self) -> bool:
        """Money back to whoever paid it (booked against its refund account), not earned: the
        customer's refund or overpayment, or an appellant's appeal fee."""
        return self in (PayoutKind.REFUND, PayoutKind.OVERPAID, PayoutKind.APPEAL_FEE_REFUND)


class DestinationKind(enum.StrEnum):
    NONE = "none"  # waiting for the payee's invoice
    BOLT11 = "bolt11"  # an invoice, paid as it is
    LUD16 = "lud16"  # a Lightning address: the worker fetches an invoice
    LNURL = "lnurl"  # an LNURL-pay link: the worker fetches an invoice


@dataclass(frozen=True)
class Destination:
    """Where a payout goes; stored as two columns (``destination_kind``, ``destination``)."""

    kind: DestinationKind
    value: str = ""

    def __post_init__(self) -> None:
        if (self.kind is DestinationKind.NONE) != (self.value == ""):
            raise ValueError("a destination has a value unless it is none")

    @classmethod
    def none(cls) -> Destination:
        return cls(DestinationKind.NONE)

    @classmethod
    def parse(cls, text: str) -> Destination:
        """``none`` or ``<kind>:<value>``, the one-string form of migration 0011 and before."""
        if text == "none":
            return cls.none()
        kind, sep, value = text.partition(":")
        if not sep or kind not in {k.value for k in DestinationKind} - {"none"}:
            raise ValueError("destination must be none, bolt11:…, lud16:… or lnurl:…")
        return cls(DestinationKind(kind), value)

    def __str__(self) -> str:
        return "none" if self.kind is DestinationKind.NONE else f"{self.kind.value}:{self.value}"


class InvoiceSource(enum.StrEnum):
    """Who handed a payout its invoice (written on the job's timeline)."""

    NOSTR = "nostr"  # the payee's kind-7000 event
    REST = "rest"  # POST /v1/jobs/{id}/payout-invoice, NIP-98 signed
    ADMIN = "admin"  # an operator's retry of the payout's own invoice


class CheckReason(enum.StrEnum):
    """Why an invoice was refused; the first word of ``last_error`` and of API errors."""

    UNDECODABLE = "invoice_undecodable"
    NODE_REFUSED = "node_cannot_decode"
    DECODERS_DISAGREE = "decoders_disagree"
    WRONG_NETWORK = "wrong_network"
    NO_AMOUNT = "amountless_invoice"
    WRONG_AMOUNT = "wrong_amount"
    EXPIRED = "invoice_expired"
    EXPIRES_TOO_SOON = "invoice_expires_too_soon"
    CLTV_TOO_LARGE = "final_cltv_too_large"
    SELF_PAYMENT = "own_node_invoice"
    PATHS_START_AT_US = "blinded_paths_start_at_our_node"  # LND v0.20 cannot pay such a path
    HASH_REUSED = "payment_hash_used_before"


class PayoutReason(enum.StrEnum):
    """Why the worker handed a payout back (``needs_invoice``), retries it or left it ``unknown``,
    besides the :class:`CheckReason` values; always the first word of ``Payout.last_error``."""

    NO_DESTINATION = "no_destination"  # no invoice yet: the payee must give one
    ROUTE_FEE_EXCEEDS_LIMIT = "route_fee_exceeds_limit"  # handed back: a cheaper route is the payee's to offer
    PAYEE_REJECTED = "payee_rejected_payment"  # handed back: its node refused (invoice canceled, unknown)
    NO_ROUTE = "no_route"  # retried: no route at all (liquidity, offline payee)
    PAYMENT_FAILED = "payment_failed"  # retried: LND's other failure reasons
    INVOICE_FETCH_FAILED = "invoice_fetch_failed"  # retried: the LNURL service did not give an invoice
    GAVE_UP = "gave_up"  # handed back after payout_max_attempts
    IN_FLIGHT = "payment_in_flight"  # unknown: LND has not finished it (e.g. a held HTLC)
    OUTCOME_UNKNOWN = "payment_outcome_unknown"  # unknown: LND did not answer in time
    NODE_UNAVAILABLE = "node_unavailable"  # pending: our node could not check the invoice
    CANCELED = "payment_canceled"  # retried: stopped before it left (lease lost, operator's cancel)
    CLAIM_EXPIRED = "claim_expired"  # expired: nobody gave an invoice within the claim window
    CLAIM_REOPENED = "claim_reopened"  # waiting again: an operator reopened an expired claim


class AcceptReason(enum.StrEnum):
    """Why :func:`store.accept_invoice` found no payout to give the invoice to (invoice refusals
    are :class:`CheckReason`)."""

    NO_PAYOUT = "no_payout"  # this job owes nothing to this key
    NOT_WAITING = "payout_not_waiting"  # nothing of this payee's waits for an invoice
    CONFLICT = "conflict"  # the payout changed meanwhile (compare-and-set lost)
    CLAIM_EXPIRED = "claim_expired"  # its claim window ended before the invoice came


class ReopenReason(enum.StrEnum):
    """Why an operator's reopen (:func:`store.reopen`) was refused."""

    NOT_FOUND = "not_found"
    NOT_EXPIRED = "payout_not_expired"  # only an expired claim is reopened
    CONFLICT = "conflict"


class ReopenRefused(Exception):
    def __init__(self, code: ReopenReason, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code.value}: {message}")


class RetryReason(enum.StrEnum):
    """Why an operator's retry (:func:`store.retry`) was refused."""

    NOT_FOUND = "not_found"
    UNKNOWN = "payout_unknown"  # resolved by tracking it in LND, never retried
    NOT_RETRYABLE = "payout_not_retryable"
    NEEDS_INVOICE = "payout_needs_invoice"  # no invoice or address to retry with
    CONFLICT = "conflict"


class CancelReason(enum.StrEnum):
    """Why an operator's cancel (:func:`store.cancel_payment`) was refused."""

    NOT_FOUND = "not_found"
    NOT_SENDING = "payout_not_sending"  # no payment of it is being sent now
    PAYMENT_LEFT = "payment_left"  # an HTLC is out (or it succeeded): only LND's outcome decides now
    CONFLICT = "conflict"


class ReissueReason(enum.StrEnum):
    """Why an operator's reissue of a stuck payout (:func:`store.reissue`) was refused; nothing
    changed then."""

    NOT_FOUND = "not_found"
    NOT_STUCK = "payout_not_unknown"  # only an `unknown` payout's payment can be stuck
    BEING_RECONCILED = "payout_being_reconciled"  # the reconciler is looking at it this moment
    NO_ATTEMPT = "no_attempt"  # nothing was written ahead: the reconciler sets it back to pending
    NOT_INITIATED = "payment_not_initiated"  # LND does not know it: the reconciler sends it
    SUCCEEDED = "payment_succeeded"  # LND has (or an HTLC has) the payee's preimage: it is paid
    MAY_STILL_SETTLE = "payment_may_still_settle"  # an HTLC of it could still settle, or LND could send one
    CONFLICT = "conflict"


class ReissueRefused(Exception):
    def __init__(self, code: ReissueReason, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code.value}: {message}")


class CancelRefused(Exception):
    def __init__(self, code: CancelReason, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code.value}: {message}")


def why(reason: CheckReason | PayoutReason, message: str) -> str:
    """A ``last_error``: the stable reason code, then what a person needs to know (no secret)."""
    return f"{reason.value}: {message}"[:300]


class InvoiceCheckError(Exception):
    """An invoice refused by a check; ``reason`` is the stable code."""

    def __init__(self, reason: CheckReason, message: str) -> None:
        self.reason = reason
        self.message = message
        super().__init__(f"{reason.value}: {message}")


class InvoiceRefused(Exception):
    """:func:`store.accept_invoice` gave the invoice to no payout; ``code`` is stable (API bodies,
    the engine's "ignored: <code>" note)."""

    def __init__(self, code: CheckReason | AcceptReason, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code.value}: {message}")


class RetryRefused(Exception):
    def __init__(self, code: RetryReason | CheckReason, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code.value}: {message}")


@dataclass(frozen=True)
class NewPayout:
    """A payout the engine decided; :func:`store.create` writes it once (``id`` is the key)."""

    id: str  # idempotency key chosen by the engine
    job_id: str | None  # None only outside any job (the bench): the engine never reads it
    kind: PayoutKind
    payee: str  # Nostr pubkey hex
    amount_msat: int
    destination: Destination
    fee_limit_msat: int | None = None  # the engine's routing budget; None: the policy's alone
    earned_by: str | None = None  # a reward's result event id
    # Until when the payee may give an invoice while it waits for one (unix seconds; None: no window),
    # and when it is reminded (the engine decides both: service/escrow/machine.py, claim_window).
    claim_by: int | None = None
    remind_at: int | None = None


@dataclass(frozen=True)
class ClaimWindow:
    """How long a payout waiting for its payee's invoice may be claimed (``window_s``, announced as
    ``claim_window_s``; 0: for ever) and how long before the end its payee is reminded
    (``reminder_s``, at most half the window). The one place these times are computed."""

    window_s: int = 0
    reminder_s: int = 0

    def times(self, start: int) -> tuple[int | None, int | None]:
        """``(claim_by, remind_at)`` of a window opening at ``start`` (unix seconds); None, None: no window."""
        if self.window_s <= 0:
            return None, None
        claim_by = start + self.window_s
        return claim_by, claim_by - min(self.reminder_s, self.window_s // 2)


@dataclass(frozen=True)
class PayoutPolicy:
    network: str = "regtest"
    fee_ppm: int = 5_000
    fee_cap_msat: int = 5_000_000
    timeout_seconds: int = 60
    fee_quote_seconds: int = 10  # EstimateRouteFee's probe time limit; 0: no quote
    max_attempts: int = 3
    retry_seconds: float = 60.0
    min_expiry_seconds: int = 300
    max_final_cltv: int = 288
    cltv_limit: int = 432
    lease_seconds: float = 300.0
    lnurl_allow_private: bool = False
    reconcile_budget_seconds: float = 5.0

    @classmethod
    def from_settings(cls, s: Settings) -> PayoutPolicy:
        return cls(
            network=s.network,
            fee_ppm=s.payout_fee_ppm,
            fee_cap_msat=s.payout_fee_cap_msat,
            timeout_seconds=s.payout_timeout_seconds,
            fee_quote_seconds=s.payout_fee_quote_seconds,
            max_attempts=s.payout_max_attempts,
            retry_seconds=s.payout_retry_seconds,
            min_expiry_seconds=s.payout_invoice_min_expiry_seconds,
            max_final_cltv=s.payout_max_final_cltv,
            cltv_limit=s.payout_cltv_limit,
            lease_seconds=s.payout_lease_seconds,
            lnurl_allow_private=s.lnurl_allow_private,
            reconcile_budget_seconds=s.payout_reconcile_budget_seconds,
        )

    def fee_limit(self, amount_msat: int, payout_limit_msat: int | None = None) -> int:
        """The most a payout may spend on routing: its fraction (ppm), capped, and never more than
        the engine's own limit for it. No floor: a 10-sat floor let a payee's route take 9.5 sat
        from a 1-sat payout. 0 allows zero-fee routes only (a direct channel, for instance)."""
        limit = min(self.fee_cap_msat, amount_msat * self.fee_ppm // 1_000_000)
        return limit if payout_limit_msat is None else max(0, min(limit, payout_limit_msat))
