"""Reference agents of the FEDSTR marketplace: customer, provider and validator.

They speak the escrow protocol (docs/protocol.md) over Nostr relays, exchange shards and
models through a Blossom blob server, pay and get paid over Lightning (LND), and train a
real model: multinomial logistic regression on scikit-learn's bundled digits data set.
See docs/agents.md.

Modules: :mod:`.relay` (relay client), :mod:`.storage` (blobs), :mod:`.ml` (data, training,
safe serialization, FedAvg), :mod:`.common` (keys, escrow info, reward claims),
:mod:`.customer`, :mod:`.provider`, :mod:`.validator`, :mod:`.demo`, :mod:`.cli`.
"""

from __future__ import annotations

EXTRA = "pip install 'fedstr-escrow[agents]'"


def missing_extra() -> str | None:
    """None when the agents' own dependencies import; otherwise one line saying what to install
    (``pip install fedstr-escrow`` is the service alone, without numpy and scikit-learn)."""
    try:
        import numpy  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as e:
        return f"the reference agents need numpy and scikit-learn ({e.name or 'one'} is not installed): {EXTRA}"
    return None
