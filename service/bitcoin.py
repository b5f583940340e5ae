"""Facts of Bitcoin and Lightning that several layers check against, each in one place.

* :data:`MAX_MSAT`: 21 million BTC in millisatoshis; no amount (a bid, a posting, an invoice,
  a payout) is ever larger.
* :data:`BOLT11_HRP`: the network (``Settings.network``'s names) -> the human-readable prefix
  of its BOLT11 invoices (BOLT 11: ``ln`` + the currency). Every check of an invoice's
  network goes through :func:`network_of_bolt11`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

MAX_MSAT: Final = 21_000_000 * 100_000_000 * 1000  # 2_100_000_000_000_000_000

BOLT11_HRP: Final[Mapping[str, str]] = MappingProxyType(
    {
        "mainnet": "lnbc",
        "testnet": "lntb",
        "signet": "lntbs",
        "regtest": "lnbcrt",
    }
)
NETWORK_OF_HRP: Final[Mapping[str, str]] = MappingProxyType({hrp: net for net, hrp in BOLT11_HRP.items()})

# The prefix of an invoice, then its optional amount (digits and a multiplier). Longest
# prefix first: "lnbcrt" must not be read as "lnbc" + "rt…".
BOLT11_PREFIX_RE: Final = re.compile(
    "(" + "|".join(sorted(map(re.escape, BOLT11_HRP.values()), key=len, reverse=True)) + r")(?:([0-9]{1,20})([munp]?))?"
)


def network_of_currency(currency: str) -> str | None:
    """The network of a decoded invoice's currency (the ``bolt11`` library's ``bc``, ``bcrt``…)."""
    return NETWORK_OF_HRP.get("ln" + currency.lower())


def network_of_bolt11(invoice: str) -> str | None:
    """The network of a BOLT11 string by its prefix (nothing decoded, checksum unchecked); None
    for a prefix of no network we know."""
    hrp = invoice[: invoice.rfind("1")].lower()
    m = BOLT11_PREFIX_RE.fullmatch(hrp)
    return NETWORK_OF_HRP[m.group(1)] if m else None


def looks_like_bolt11(text: str) -> bool:
    """Starts like an invoice of one of the networks (a cheap test, to tell it from an address)."""
    return text.lower().startswith(tuple(BOLT11_HRP.values()))
