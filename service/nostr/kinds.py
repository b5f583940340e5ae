"""Every Nostr event kind the service reads or writes, one constant each.

The four job kinds are the protocol's (docs/protocol.md "Kinds"): a result kind is its
request kind + :data:`RESULT_KIND_OFFSET`, as in NIP-90. The others are fixed by their NIPs.
"""

from __future__ import annotations

from typing import Final

KIND_DELETION: Final = 5  # NIP-09: a customer cancels an unfunded job
KIND_JOB_REQUEST: Final = 5701  # the customer's job request
KIND_EVALUATION_REQUEST: Final = 5702  # the escrow asks a validator to score the results
KIND_JOB_RESULT: Final = 6701  # a provider's result
KIND_EVALUATION_RESULT: Final = 6702  # a validator's scores
KIND_FEEDBACK: Final = 7000  # NIP-90 feedback: offers, verdicts, rewards, payee invoices
KIND_RELAY_AUTH: Final = 22242  # NIP-42: our AUTH answer to a relay's challenge
KIND_HTTP_AUTH: Final = 27235  # NIP-98: HTTP Authorization events
KIND_ANNOUNCEMENT: Final = 31990  # NIP-89: the escrow's announcement and terms

RESULT_KIND_OFFSET: Final = 1000

# What the escrow subscribes to, each tagged ["p", <escrow pubkey>] (docs/protocol.md).
INTAKE_KINDS: Final = (KIND_JOB_REQUEST, KIND_JOB_RESULT, KIND_EVALUATION_RESULT, KIND_FEEDBACK, KIND_DELETION)
