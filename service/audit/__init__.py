"""``fedstr-escrow audit``: anyone can check a job's public record (docs/audit.md).

From the job's public events alone (no database, no admin token) the audit recomputes the decision
with the published rule from the published scores, and checks every amount against the split and
every receipt against its invoice. :func:`audit_job` fetches and audits; :func:`audit_events` is
the pure part (events in, :class:`AuditReport` out).
"""

from __future__ import annotations

from .checks import audit_events
from .fetch import audit_job, fetch_job_events
from .report import AuditFetchError, AuditReport, Finding, Status

__all__ = ["AuditFetchError", "AuditReport", "Finding", "Status", "audit_events", "audit_job", "fetch_job_events"]
