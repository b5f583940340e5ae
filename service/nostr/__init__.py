"""Nostr protocol support.

The NIP codec modules are pure (no I/O):

* :mod:`service.nostr.nip01` - events: canonical serialization, ids, keys, signing
  and strict verification.
* :mod:`service.nostr.nip19` - bech32 ``npub``/``nsec``/``note`` (and ``nprofile``/``nevent``).
* :mod:`service.nostr.nip44` - version 2 encrypted payloads.

Their only ambient inputs are the operating system's random generator (new keys,
signature aux randomness, NIP-44 nonces) and, when no timestamp is passed to
``sign_event``, the wall clock.
"""
