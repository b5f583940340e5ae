"""The money split of a job (protocol.md §9): integer millisatoshis, exact, never negative."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import CodecError, CodecErrorReason

R = CodecErrorReason


@dataclass(frozen=True, slots=True)
class MoneySplit:
    """The bid, split exactly: ``fee + validator_fee * validator_count + provider_share == bid``."""

    bid_msat: int
    fee_msat: int
    validator_fee_msat: int
    validator_count: int
    provider_share_msat: int

    @property
    def validator_fees_msat(self) -> int:
        return self.validator_fee_msat * self.validator_count


def money_split(
    bid_msat: int, *, fee_base_msat: int, fee_ppm: int, validator_fee_msat: int, validator_count: int
) -> MoneySplit:
    """``fee = fee_base + bid * fee_ppm // 1e6``; the providers get what is left, which must be > 0."""
    fee = fee_base_msat + bid_msat * fee_ppm // 1_000_000
    validators_total = validator_fee_msat * validator_count
    share = bid_msat - fee - validators_total
    if share <= 0:
        raise CodecError(R.FEES_EXCEED_BID, "escrow fee plus validator fees leave nothing of the bid for providers")
    return MoneySplit(
        bid_msat=bid_msat,
        fee_msat=fee,
        validator_fee_msat=validator_fee_msat,
        validator_count=validator_count,
        provider_share_msat=share,
    )


MSAT_PER_SAT = 1_000


def whole_sats(msat: int) -> int:
    """``msat`` rounded down to whole satoshis: every payout is one (wallets invoice whole satoshis)."""
    return msat - msat % MSAT_PER_SAT


def split_shares(total_msat: int, count: int) -> tuple[int, int]:
    """``(each, remainder)`` for ``payout=split``: ``each * count + remainder == total``.

    The remainder (< ``count`` msat) goes to the escrow's fee account (protocol.md §2).
    """
    if count < 1:
        raise ValueError("count must be at least 1")
    return divmod(total_msat, count)
