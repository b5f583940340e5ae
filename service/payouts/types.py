"""PLACEHOLDER on main until the payouts branch lands (its own types replace these)."""
from __future__ import annotations

import enum
from dataclasses import dataclass


class PayoutKind(enum.StrEnum):
    REWARD = "reward"
    VALIDATOR_FEE = "validator_fee"
    REFUND = "refund"
    OVERPAID = "overpaid"


class PayoutState(enum.StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    UNKNOWN = "unknown"
    NEEDS_INVOICE = "needs_invoice"


class DestinationKind(enum.StrEnum):
    NONE = "none"
    BOLT11 = "bolt11"
    LUD16 = "lud16"
    LNURL = "lnurl"


@dataclass(frozen=True)
class Destination:
    kind: DestinationKind
    value: str = ""

    @classmethod
    def none(cls) -> Destination:
        return cls(DestinationKind.NONE, "")


@dataclass(frozen=True)
class NewPayout:
    id: str
    job_id: str
    kind: PayoutKind
    payee: str
    amount_msat: int
    destination: Destination
    fee_limit_msat: int | None = None
    earned_by: str | None = None
