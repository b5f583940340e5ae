"""The double-entry ledger of every millisatoshi the escrow holds, owes, earns and spends.

- :mod:`service.ledger.accounts`: account names (``asset:node``, ``liability:escrow:<job>``, …).
- :mod:`service.ledger.models`: the append-only tables ``ledger_postings`` / ``ledger_lines``
  and ``ledger_reconciliations``.
- :mod:`service.ledger.service`: ``post``, ``reverse``, balances and invariant checks.
- The comparison with what LND reports, and the payout pause, are :mod:`service.reconcile`
  (it reads LND and the Lightning tables; the ledger imports nothing of ``service.lightning``).

See ``docs/ledger.md``.
"""
