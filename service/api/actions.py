"""Admin actions: each checks that it is safe now, acts in one transaction, and is audited.

Raise :class:`ActionRefused` (HTTP 409 with a stable code) when the current state does
not allow the action; nothing is changed then, but the refusal is audited too.
"""

from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from service import quarantine
from service.api.models import AdminAction
from service.db import rowcount, utcnow
from service.escrow.engine import Engine
from service.escrow.machine import OPERATOR_REFUNDABLE
from service.escrow.models import Effect, Job, JobState
from service.lightning.client import LndClient
from service.nostr.models import Delivery, InboxEvent
from service.payouts import CancelRefused, ReissueRefused, ReopenRefused, RetryRefused
from service.payouts import store as payouts
from service.reconcile import resume_payouts


class ActionRefused(Exception):
    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


async def audit(s: AsyncSession, action: str, target: str, reason: str, outcome: str) -> None:
    s.add(AdminAction(action=action, target=target[:200], reason=reason[:500], outcome=outcome[:500], at=utcnow()))


async def retry_payout(s: AsyncSession, payout_id: str, reason: str) -> str:
    """Pay a failed or handed-back payout again with the invoice or address it has (checked by
    the payouts package as any invoice given to a payout is)."""
    try:
        state = await payouts.retry(s, payout_id)
    except RetryRefused as e:
        raise ActionRefused(e.code.value, e.message) from None
    await audit(s, "retry_payout", payout_id, reason, state.value)
    return state.value


async def cancel_payout(s: AsyncSession, lnd: LndClient, payout_id: str, reason: str) -> str:
    """Stop a payout's payment that has not left (its worker cancels it in LND; LND's report
    decides what follows: see the payouts package)."""
    try:
        result = await payouts.cancel_payment(s, lnd, payout_id)
    except CancelRefused as e:
        raise ActionRefused(e.code.value, e.message) from None
    await audit(s, "cancel_payout", payout_id, reason, result)
    return result


async def reopen_payout(s: AsyncSession, engine: Engine, payout_id: str, reason: str) -> str:
    """Reopen an expired claim for a late claimant: a fresh claim window, the unclaimed booking
    reversed and the payee asked again (the engine consumes it in this transaction)."""
    try:
        plan = await engine.reopen_claim(s, payout_id)
    except ReopenRefused as e:
        raise ActionRefused(e.code.value, e.message) from None
    if plan.outcome.startswith("ignored"):
        raise ActionRefused("conflict", f"the job did not take the reopen: {plan.outcome}")
    result = f"needs_invoice (job {plan.state.value})"
    await audit(s, "reopen_payout", payout_id, reason, result)
    return result


async def reissue_payout(
    s: AsyncSession, lnd: LndClient, payout_id: str, reason: str, *, payment_timeout_seconds: float
) -> str:
    """Send the payee of a payout whose payment LND keeps in flight back to giving a new invoice,
    once LND reports the payment failed or no HTLC of it can settle (the rule:
    :func:`service.payouts.stuck.reissue_refusal`)."""
    try:
        result = await payouts.reissue(s, lnd, payout_id, payment_timeout_seconds=payment_timeout_seconds)
    except ReissueRefused as e:
        raise ActionRefused(e.code.value, e.message) from None
    await audit(s, "reissue_payout", payout_id, reason, result)
    return result


async def refund_job(s: AsyncSession, engine: Engine, job_id: str, reason: str) -> str:
    """A manual refund: only before any release decision, when nothing has been paid out."""
    job = await s.get(Job, job_id)
    if job is None:
        raise ActionRefused("not_found", "no such job")
    if job.state not in OPERATOR_REFUNDABLE:
        raise ActionRefused(
            "refund_not_safe",
            f"a job that is {job.state} cannot be refunded by hand (only collecting, validating or fallback jobs)",
        )
    plan = await engine.operator_refund(s, job_id, reason)
    if plan.state not in (JobState.REFUNDING, JobState.REFUNDED):
        raise ActionRefused("conflict", "the job changed meanwhile")
    await audit(s, "refund_job", job_id, reason, plan.state.value)
    return plan.state.value


async def resume(s: AsyncSession, reason: str) -> str:
    await resume_payouts(s, reason=reason)
    await audit(s, "resume_payouts", "reconciliation", reason, "payouts resumed")
    return "resumed"


async def _reset_inbox(s: AsyncSession, ref: str) -> int:
    return rowcount(
        await s.execute(
            update(InboxEvent)
            .where(InboxEvent.id == ref, InboxEvent.outcome.like("error:%"))
            .values(handled_at=None, attempts=0, outcome=None)
            .execution_options(synchronize_session=False)
        )
    )


async def _reset_effect(s: AsyncSession, ref: str) -> int:
    if not ref.isdigit():
        return 0
    return rowcount(
        await s.execute(
            update(Effect)
            .where(Effect.id == int(ref), Effect.state == "quarantined")
            .values(state="pending", attempts=0, next_attempt_at=utcnow())
            .execution_options(synchronize_session=False)
        )
    )


async def _reset_delivery(s: AsyncSession, ref: str) -> int:
    event_id, _, relay = ref.partition(":")
    return rowcount(
        await s.execute(
            update(Delivery)
            .where(Delivery.event_id == event_id, Delivery.relay == relay, Delivery.state == "quarantined")
            .values(state="pending", next_attempt_at=utcnow(), updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )
    )


# What a replay must undo in the item itself, for the sources whose items keep a state of
# their own (the others are skipped only through their row here, which the replay deletes).
REPLAY_RESETS: dict[str, quarantine.Reset] = {
    "inbox": _reset_inbox,
    "effect": _reset_effect,
    "publisher": _reset_delivery,
}


async def replay_quarantined(s: AsyncSession, source: str, ref: str, reason: str) -> str:
    """Clear an item's quarantine (after a fix): its loop processes it again at once."""
    try:
        await quarantine.replay(s, source, ref, REPLAY_RESETS.get(source))
    except quarantine.NotQuarantined as e:
        raise ActionRefused(e.code, e.message) from None
    await audit(s, "replay_quarantined", f"{source}/{ref}", reason, "pending")
    return "pending"


def wake_engine(state: object) -> None:
    """After the commit: this replica's engine loop looks at payout outcomes now (a reissued payout's
    payee is asked for a new invoice without waiting for the next scan)."""
    escrow = getattr(state, "escrow", None)
    if escrow is not None:
        escrow.loop.wake.set()


def wake_for_replay(state: object, source: str) -> None:
    """After the commit: tell this replica's loop of ``source`` that a replayed item waits (other
    replicas find it at their next scan)."""
    escrow = getattr(state, "escrow", None)
    if escrow is not None:
        escrow.loop.notify_replay(source)
    nostr = getattr(state, "nostr", None)
    if source == "publisher" and nostr is not None:
        nostr.publisher.wake()


async def replay_event(s: AsyncSession, event_id: str, reason: str) -> str:
    """Process again an inbox event whose handler failed (after a fix): the same as replaying the
    quarantined item ``inbox/<event id>``, under the inbox's own refusal code."""
    try:
        await quarantine.replay(s, "inbox", event_id, _reset_inbox)
    except quarantine.NotQuarantined:
        raise ActionRefused("not_replayable", "only events whose handler failed can be replayed") from None
    await audit(s, "replay_event", event_id, reason, "pending")
    return "pending"
