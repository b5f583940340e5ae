"""What an audit found: one :class:`Finding` per check, gathered in an :class:`AuditReport`.

A finding is ``ok``, a ``discrepancy`` (the public record does not add up: the command exits 1),
a ``warning`` (worth knowing, not a fault of the escrow: terms that changed since, an event a relay
did not return) or ``not-applicable`` (the job has not got that far). Each has a one-line message
and, for discrepancies and warnings, a stable ``code`` a program can match.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any


class Status(enum.StrEnum):
    OK = "ok"
    DISCREPANCY = "discrepancy"
    WARNING = "warning"
    NOT_APPLICABLE = "not-applicable"


class AuditFetchError(RuntimeError):
    """The job could not be fetched: no relay answered, or none had the job request."""


@dataclass(frozen=True, slots=True)
class Finding:
    check: str  # the check's name: "job", "offer", "verdict", "receipt", …
    status: Status
    message: str  # one line, no secrets (nothing is secret in a public record, but keys stay out)
    code: str = ""  # stable, for discrepancies and warnings: "median_mismatch", "bolt11_hash_mismatch", …
    subject: str | None = None  # the event (or result) id the finding is about

    def as_dict(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "status": str(self.status),
            "code": self.code,
            "message": self.message,
            "subject": self.subject,
        }


@dataclass(frozen=True, slots=True)
class AuditReport:
    job_id: str
    escrow: str | None  # the key the escrow events were checked against
    findings: tuple[Finding, ...]
    events: int = 0  # distinct events examined
    relays: tuple[str, ...] = field(default=())

    @property
    def discrepancies(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.status is Status.DISCREPANCY)

    @property
    def warnings(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if f.status is Status.WARNING)

    @property
    def ok(self) -> bool:
        """No discrepancy (warnings and not-applicable checks do not count)."""
        return not self.discrepancies

    def summary(self) -> str:
        """One line, for the demo and the end of the text report."""
        n, w = len(self.discrepancies), len(self.warnings)
        tail = f", {w} warning{'s' * (w != 1)}" if w else ""
        if n == 0:
            return f"audit of job {self.job_id[:12]}…: no discrepancy{tail}"
        return f"audit of job {self.job_id[:12]}…: {n} discrepanc{'ies' if n != 1 else 'y'}{tail}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "job": self.job_id,
            "escrow": self.escrow,
            "relays": list(self.relays),
            "events": self.events,
            "ok": self.ok,
            "discrepancies": len(self.discrepancies),
            "warnings": len(self.warnings),
            "findings": [f.as_dict() for f in self.findings],
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, ensure_ascii=False)

    def text(self) -> str:
        escrow = f"escrow {self.escrow[:12]}…" if self.escrow else "escrow unknown"
        lines = [f"job {self.job_id}  ({escrow}, {self.events} events)"]
        width = max((len(f.check) for f in self.findings), default=0)
        for f in self.findings:
            label = "DISCREPANCY" if f.status is Status.DISCREPANCY else str(f.status)
            code = f" [{f.code}]" if f.code and f.status is not Status.OK else ""
            lines.append(f"  {label:<14} {f.check:<{width}}  {f.message}{code}")
        lines.append(self.summary())
        return "\n".join(lines)
