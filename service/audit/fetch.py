"""Fetching a job's public events from relays, then auditing them (:func:`audit_job`).

Two rounds of queries: the job request and every event that references it (``#e``: the escrow's
feedback, results, the evaluation request and results, payee invoices); then the escrow's
announcement (kind 31990, by the key the job names), for its fee terms. Relays are untrusted: the
checks verify every event again, whatever the relay client did.

The relay client is the caller's (:class:`RelayReader`: the agents' ``Relays`` is one), so the audit
depends on the codec and the rule only, and the agents' demo can audit with the relays it has.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from service.nostr.nip01 import Event
from service.nostr.protocol.terms import KIND_ANNOUNCEMENT

from .checks import audit_events
from .report import AuditFetchError, AuditReport

Progress = Callable[[str], None]


class RelayReader(Protocol):
    """What the audit needs of a relay client (``service.agents.relay.Relays`` is one)."""

    urls: tuple[str, ...]

    async def query(self, *filters: dict[str, Any]) -> list[Event]:
        """Stored events matching any filter, from every relay, each once; raises ``RuntimeError``
        (``Relays``: ``RelayError``) when no relay answers."""
        ...


def _escrow_named(job: Event) -> str | None:
    named = {t[1] for t in job.tags if t[0] == "escrow" and len(t) >= 2}
    return named.pop() if len(named) == 1 else None


async def fetch_job_events(
    relays: RelayReader, job_id: str, *, escrow: str | None = None, progress: Progress | None = None
) -> list[Event]:
    """Every public event of the job. Raises :class:`AuditFetchError` when no relay answers or
    none has the job request."""
    say = progress or (lambda _line: None)
    n = len(relays.urls)
    where = f"fetching from {n} relay{'s' * (n != 1)}…"
    say(where)
    try:
        events = await relays.query({"ids": [job_id]}, {"#e": [job_id]})
        job = next((e for e in events if e.id == job_id), None)
        if job is None:
            raise AuditFetchError(f"no relay has job {job_id}")
        key = escrow or _escrow_named(job)
        if key is not None:
            events += await relays.query({"kinds": [KIND_ANNOUNCEMENT], "authors": [key]})
    except AuditFetchError:
        raise
    except RuntimeError as e:  # the reader's "no relay answered"
        raise AuditFetchError(str(e)) from None
    say(f"{where} {len(events)} events")
    return events


async def audit_job(
    relays: RelayReader, job_id: str, *, escrow: str | None = None, progress: Progress | None = None
) -> AuditReport:
    """Fetch job ``job_id``'s public events from ``relays`` and audit them (no database, no token).

    ``escrow``: the escrow's public key (hex) to check its events against; default: the key the
    job's ``escrow`` tag names. ``progress`` receives a line while fetching. Raises
    :class:`AuditFetchError` when the job could not be fetched.
    """
    events = await fetch_job_events(relays, job_id, escrow=escrow, progress=progress)
    return audit_events(job_id, events, escrow=escrow, relays=tuple(relays.urls))
