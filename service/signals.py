"""The wake-ups between the service's loops, in one object.

The loops (relay pool, escrow engine and effects, settlement watcher, payout worker,
publisher) each poll on their own; a signal only cuts a poll short, so a lost or early
signal costs latency, never correctness. The app creates one ``Signals`` and hands it to
every layer; a layer built alone (a test, a bench) gets its own, with nobody listening.

    signals.event_stored      the relay pool stored new inbox events    -> the engine steps
    signals.fact_recorded     the watcher recorded an LN invoice fact   -> the engine scans facts
    signals.payout_changed    a payout reached an outcome               -> the engine scans outcomes
    signals.progress          the engine or its effects did work        -> publisher, payout worker
    signals.offer_made(job)   a job's offer invoice is committed        -> waiting POST /v1/jobs
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Generic, ParamSpec

log = logging.getLogger(__name__)

P = ParamSpec("P")


class Signal(Generic[P]):
    """Synchronous subscribers called in order on ``emit``; one that raises is logged and the
    others still run (a listener never stops the loop that emitted)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._subscribers: list[Callable[P, object]] = []

    def connect(self, subscriber: Callable[P, object]) -> None:
        self._subscribers.append(subscriber)

    def emit(self, *args: P.args, **kwargs: P.kwargs) -> None:
        for subscriber in self._subscribers:
            try:
                subscriber(*args, **kwargs)
            except Exception:
                log.exception("subscriber of signal %s failed", self.name)

    def __len__(self) -> int:
        return len(self._subscribers)


class Signals:
    """Every signal between the loops (see the module's table)."""

    def __init__(self) -> None:
        self.event_stored: Signal[[]] = Signal("event_stored")
        self.fact_recorded: Signal[[]] = Signal("fact_recorded")
        self.payout_changed: Signal[[]] = Signal("payout_changed")
        self.progress: Signal[[]] = Signal("progress")
        self.offer_made: Signal[[str]] = Signal("offer_made")
