"""Fetching a job's public events from relays, then auditing them (:func:`audit_job`).

Two rounds of queries: the job request and every event that references it (``#e``: the escrow's
feedback, results, the evaluation request and results, payee invoices); then the escrow's
announcement (kind 31990, by the key the job names), for its fee terms. Relays are untrusted: the
relay client drops events that do not verify, and the checks verify every event again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from service.agents.relay import RelayError, Relays
from service.nostr.nip01 import Event
from service.nostr.protocol.terms import KIND_ANNOUNCEMENT

from .checks import audit_events
from .report import AuditFetchError, AuditReport

Progress = Callable[[str], None]


def _escrow_named(job: Event) -> str | None:
    named = {t[1] for t in job.tags if t[0] == "escrow" and len(t) >= 2}
    return named.pop() if len(named) == 1 else None


async def fetch_job_events(
    relays: Relays, job_id: str, *, escrow: str | None = None, progress: Progress | None = None
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
    except RelayError as e:
        raise AuditFetchError(str(e)) from None
    say(f"{where} {len(events)} events")
    return events


async def audit_job(
    relays: Relays | Sequence[str],
    job_id: str,
    *,
    escrow: str | None = None,
    progress: Progress | None = None,
    timeout: float = 10.0,
) -> AuditReport:
    """Fetch job ``job_id``'s public events from ``relays`` and audit them (no database, no token).

    ``escrow``: the escrow's public key (hex) to check its events against; default: the key the
    job's ``escrow`` tag names. ``progress`` receives a line while fetching. Raises
    :class:`AuditFetchError` when the job could not be fetched.
    """
    pool = relays if isinstance(relays, Relays) else Relays(list(relays), timeout=timeout)
    events = await fetch_job_events(pool, job_id, escrow=escrow, progress=progress)
    return audit_events(job_id, events, escrow=escrow, relays=pool.urls)
