"""Time-bounded fuzzing of the Nostr codec and the payout-invoice checks (pure functions, no network).

Run by the normal ``pytest`` command; ``FEDSTR_FUZZ_SECONDS`` (default 55) is the budget
shared by all targets, ``FEDSTR_FUZZ_SEED`` makes a run reproducible. See harness.py.
"""
