"""Kinds, the protocol's closed vocabularies, and the escrow's terms.

The kinds themselves are :mod:`service.nostr.kinds` (re-exported here for the codec's users).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from service.bitcoin import MAX_MSAT
from service.nostr.kinds import (
    KIND_ANNOUNCEMENT,
    KIND_DELETION,
    KIND_EVALUATION_REQUEST,
    KIND_EVALUATION_RESULT,
    KIND_FEEDBACK,
    KIND_JOB_REQUEST,
    KIND_JOB_RESULT,
    RESULT_KIND_OFFSET,
)

__all__ = [
    "KIND_ANNOUNCEMENT",
    "KIND_DELETION",
    "KIND_EVALUATION_REQUEST",
    "KIND_EVALUATION_RESULT",
    "KIND_FEEDBACK",
    "KIND_JOB_REQUEST",
    "KIND_JOB_RESULT",
    "RESULT_KIND_OFFSET",
    "Direction",
    "EscrowTerms",
    "Mode",
    "Network",
    "PayoutPolicy",
]


class Mode(enum.StrEnum):
    """How the escrow holds the money (protocol.md §3). ``auto`` lets the escrow choose."""

    HOLD = "hold"
    CUSTODIAL = "custodial"
    AUTO = "auto"


class PayoutPolicy(enum.StrEnum):
    BEST = "best"
    SPLIT = "split"


class Sealing(enum.StrEnum):
    """Whether a job admits plain results (protocol.md §5a). ``optional``: a provider may seal."""

    OPTIONAL = "optional"
    REQUIRED = "required"


class Direction(enum.StrEnum):
    """Which way a score must go past the threshold: ``max`` = higher is better (>=)."""

    MAX = "max"
    MIN = "min"


class Network(enum.StrEnum):
    """The Bitcoin network in the announcement (LND's names; Settings' ``mainnet`` is ``bitcoin``)."""

    BITCOIN = "bitcoin"
    TESTNET = "testnet"
    SIGNET = "signet"
    REGTEST = "regtest"

    @classmethod
    def from_settings(cls, name: str) -> Network:
        """Map ``Settings.network`` (mainnet/testnet/signet/regtest) to the announced name."""
        return cls.BITCOIN if name == "mainnet" else cls(name)


@dataclass(frozen=True, slots=True)
class EscrowTerms:
    """What this escrow accepts and charges; announced in kind 31990 and applied to requests.

    ``modes`` holds the concrete modes offered (``hold`` and/or ``custodial``); a request
    for ``auto`` is accepted whenever at least one is. ``max_hold_seconds`` bounds how
    far after receipt a ``hold``-mode job's validation deadline may lie.

    Payouts: every payout is at least ``min_payout_msat`` (a request whose smallest possible
    reward or validator fee would be below it is refused), at most ``max_results_per_shard``
    results per shard are candidates, and a payout's route may cost at most
    ``routing_fee_ppm`` of its amount (and never more, over a job, than the escrow earned on
    it; a refund's route is paid from the refunded amount).

    Claims: a payout that waits for its payee's invoice may be claimed for ``claim_window_s``
    seconds from its creation (the release or the refund); after that it expires and the money
    is the operator's (protocol.md §7). 0: no window (absent from an older announcement).

    Appeals (protocol.md §6c): after validation is complete the decision waits ``appeal_window_s``
    seconds before money moves, and the customer or a rejected provider may appeal, paying
    ``appeal_fee_msat`` (whole satoshis; refunded if the appeal wins). 0: no appeals (absent from
    an older announcement).
    Construction raises ``ValueError`` for inconsistent terms (a configuration error).
    """

    fee_base_msat: int
    fee_ppm: int
    min_bid_msat: int
    max_bid_msat: int
    max_validators: int
    max_shards: int
    min_results_window_s: int
    max_job_duration_s: int
    modes: frozenset[Mode]
    network: Network
    max_hold_seconds: int = 0
    min_payout_msat: int = 1_000
    max_results_per_shard: int = 4
    routing_fee_ppm: int = 5_000
    claim_window_s: int = 0
    appeal_window_s: int = 0
    appeal_fee_msat: int = 0

    def __post_init__(self) -> None:
        for name in (
            "fee_base_msat",
            "fee_ppm",
            "min_bid_msat",
            "max_bid_msat",
            "max_validators",
            "max_shards",
            "min_results_window_s",
            "max_job_duration_s",
            "max_hold_seconds",
            "min_payout_msat",
            "max_results_per_shard",
            "routing_fee_ppm",
            "claim_window_s",
            "appeal_window_s",
            "appeal_fee_msat",
        ):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise ValueError(f"{name} must be a non-negative integer")
        if self.fee_ppm > 1_000_000 or self.routing_fee_ppm > 1_000_000:
            raise ValueError("fee_ppm and routing_fee_ppm must be at most 1000000")
        if self.min_payout_msat < 1_000 or self.min_payout_msat % 1_000:
            raise ValueError("min_payout_msat must be a positive whole number of satoshis (a multiple of 1000)")
        if self.appeal_fee_msat % 1_000:
            raise ValueError("appeal_fee_msat must be a whole number of satoshis (a multiple of 1000)")
        if self.appeal_window_s and self.appeal_fee_msat < 1_000:
            raise ValueError("appeals (appeal_window_s > 0) need an appeal_fee_msat of at least one satoshi")
        if self.max_results_per_shard < 1:
            raise ValueError("max_results_per_shard must be at least 1")
        if not 1 <= self.min_bid_msat <= self.max_bid_msat <= MAX_MSAT:
            raise ValueError("bids must satisfy 1 <= min_bid_msat <= max_bid_msat <= 21e6 BTC")
        if self.max_shards < 1 or self.max_validators < 1:
            raise ValueError("max_shards and max_validators must be at least 1")
        if self.max_job_duration_s <= self.min_results_window_s:
            raise ValueError("max_job_duration_s must exceed min_results_window_s")
        if not isinstance(self.modes, frozenset) or not self.modes or not self.modes <= {Mode.HOLD, Mode.CUSTODIAL}:
            raise ValueError("modes must be a non-empty frozenset of Mode.HOLD / Mode.CUSTODIAL")
        if not isinstance(self.network, Network):
            raise ValueError("network must be a Network")
        if Mode.HOLD in self.modes and self.max_hold_seconds < 1:
            raise ValueError("offering hold mode needs max_hold_seconds >= 1")

    @property
    def appeals(self) -> bool:
        """Whether decisions may be appealed (an appeal window is announced)."""
        return self.appeal_window_s > 0

    def offers(self, mode: Mode) -> bool:
        return mode is Mode.AUTO or mode in self.modes
