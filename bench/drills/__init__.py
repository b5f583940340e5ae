"""Fault drills: scripted, seeded, bounded in time, counted from the real parts.

``python -m bench.drills [all|sigkill|lnd-outage|relay-restart|postgres-restart|replicas]``
(see ``__main__``). Each drill runs a batch of jobs through the escrow service (its own
process, real LND, relay and PostgreSQL), injects its faults while the jobs run, and counts
jobs finished, faults injected, payments made, duplicate payments, facts lost, ledger
imbalance and the reconciliation difference (``audit``). The modules:

- ``market``: customers, providers, validators and payees as keys of the drill;
- ``faults``: the service processes and the stack's processes the drills stop and start;
- ``faulty_service``: fault injection (a SIGKILL exactly after a payout's write-ahead);
- ``audit``: the counting; ``drills``: the five drills.
"""
