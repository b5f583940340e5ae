"""The claim window end to end (real LND, relay, SQLite; docs/escrow.md "Claim window"): a provider
that never claims its reward is reminded once (a restart between the reminder and the end sends no
second one), then the claim expires: the money is in income:unclaimed, the job is closed, the payee
is told and a late invoice is refused with claim_expired (Nostr and REST). An operator reopens it; the payee's
invoice is then paid exactly once on its node."""

from __future__ import annotations

import hashlib
import json
import time

import httpx
import pytest
from sqlalchemy import select

from service.api.models import AdminAction
from service.db import aware
from service.ledger import accounts
from service.ledger import service as ledger
from service.lightning.client import InvoiceState
from service.nostr import nip98
from service.nostr.nip01 import sign_event
from service.nostr.protocol import build_payee_invoice
from service.payouts.models import PayoutAttempt
from service.payouts.types import AttemptState, PayoutState
from tests.conftest import Regtest, wait_until
from tests.e2e.market import Market, publish, tag

pytestmark = [pytest.mark.lnd, pytest.mark.relay]

ADMIN = "claim-window-admin-token-" + "x" * 16
WINDOW, REMINDER = 30, 16  # seconds: reminded 14 s after the release, expired 30 s after it (16 s to restart)
MODEL = b"a model nobody claims the reward for"


def _market(regtest: Regtest, relay_url: str, database_url: str, **kw) -> Market:
    return Market(
        regtest,
        relay_url,
        database_url,
        claim_window_seconds=WINDOW,
        claim_reminder_seconds=REMINDER,
        admin_token=ADMIN,
        **kw,
    )


async def _claimables(m: Market, job_id: str, payee: str) -> list[dict]:
    out = []
    for ev in await m.escrow_events(job_id):
        st, p = tag(ev, "status"), tag(ev, "p")
        if st and st[1:3] == ["success", "reward claimable"] and p and p[1] == payee:
            out.append(ev)
    return out


def _reason(ev: dict) -> str | None:
    r = tag(ev, "reason")
    return r[1] if r else None


async def test_an_unclaimed_reward_is_reminded_once_expires_to_unclaimed_and_an_operator_reopens_it(
    regtest: Regtest, relay_url: str, database_url: str
) -> None:
    first = _market(regtest, relay_url, database_url)
    provider = first.providers[0]
    payee = provider.public_key_hex
    async with first.running():
        job_ev = await first.post_job(
            first.job_spec(shards=1, validators=1, quorum=1, validator_fee=0, mode="custodial", results_in=8)
        )
        await first.fund(job_ev.id)
        result = await first.submit(job_ev, provider, 0, MODEL)
        await first.score(job_ev.id, first.validators[0], {result.id: ("0.9", hashlib.sha256(MODEL).hexdigest())})
        (payout,) = await first.released(job_ev.id)
        assert payout.state is PayoutState.NEEDS_INVOICE and payout.claim_by is not None
        claim_by = int(aware(payout.claim_by).timestamp())
        # The release's reward claimable says until when (the window runs from the payout's creation).
        (announced,) = await wait_until(lambda: _claimables(first, job_ev.id, payee), 15, "the reward claimable")
        assert tag(announced, "claim_by") == ["claim_by", str(claim_by)] and _reason(announced) is None

        async def reminded() -> list[dict]:
            return [e for e in await _claimables(first, job_ev.id, payee) if _reason(e) == "claim_window_ending"]

        (reminder,) = await wait_until(reminded, WINDOW, "the reminder before the window ends", interval=0.3)
        assert tag(reminder, "claim_by") == ["claim_by", str(claim_by)]
        assert time.time() < claim_by  # reminded before the end
    # The escrow restarts between the reminder and the end of the window: no second reminder.
    second = _market(regtest, relay_url, database_url, escrow_key=first.escrow_key)
    second.customer, second.providers, second.validators = first.customer, first.providers, first.validators
    async with second.running():
        assert time.time() < claim_by, "the restart took the whole window: make WINDOW longer"
        job = await second.wait_state(job_ev.id, "closed", timeout=WINDOW + 15)
        assert job.state == "closed"
        expired = await second.wait_status(job_ev.id, "error", "claim expired")
        assert tag(expired, "p") == ["p", payee] and tag(expired, "claim_by") == ["claim_by", str(claim_by)]
        (payout,) = await second.payouts(job_ev.id)
        assert payout.state is PayoutState.EXPIRED
        reminders = [e for e in await _claimables(second, job_ev.id, payee) if _reason(e) == "claim_window_ending"]
        assert len(reminders) == 1, reminders
        # The money is the operator's: in income:unclaimed; the job's own accounts are at zero.
        await second.check_ledger(job_ev.id, closed=True)
        async with second.sessions() as s:
            unclaimed = (await ledger.balances(s, prefix=accounts.UNCLAIMED)).get(accounts.UNCLAIMED, 0)
        assert -unclaimed == payout.amount_msat

        # A late invoice is refused with claim_expired (Nostr: the inbox's outcome).
        late, _ = await regtest.payee_invoice(payout.amount_msat, memo="late claim")
        ev = sign_event(
            provider,
            *build_payee_invoice(job_id=job_ev.id, escrow=second.E, amount_msat=payout.amount_msat, bolt11=late),
        )
        await publish(relay_url, ev)
        outcome = (await second.handled(ev.id))[ev.id]
        assert outcome.startswith("ignored: claim_expired"), outcome

        # The operator reopens it (audited): owed again, the payee asked again, the job open again.
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=second.app), base_url="http://api.test"
        ) as client:
            # ... after the same late invoice over REST (NIP-98, the payee's key) is refused: 409 claim_expired.
            path = f"/v1/jobs/{job_ev.id}/payout-invoice"
            body = json.dumps({"bolt11": late}).encode()
            auth = sign_event(
                provider,
                nip98.KIND_HTTP_AUTH,
                [["u", "http://api.test" + path], ["method", "POST"], ["payload", hashlib.sha256(body).hexdigest()]],
                "",
            )
            r = await client.post(
                path,
                content=body,
                headers={"Authorization": nip98.build_header(auth), "content-type": "application/json"},
            )
            assert r.status_code == 409 and r.json()["code"] == "claim_expired", r.text
            r = await client.post(
                f"/v1/admin/payouts/{payout.id}/reopen",
                json={"reason": "the provider's wallet was down for a month"},
                headers={"Authorization": f"Bearer {ADMIN}"},
            )
            assert r.status_code == 200, r.text
            again = await client.post(
                f"/v1/admin/payouts/{payout.id}/reopen",
                json={"reason": "twice"},
                headers={"Authorization": f"Bearer {ADMIN}"},
            )
            assert again.status_code == 409 and again.json()["code"] == "payout_not_expired", again.text
        async with second.sessions() as s:
            audit = (
                await s.scalars(select(AdminAction).where(AdminAction.target == payout.id).order_by(AdminAction.id))
            ).all()
        assert [(a.action, a.outcome.split(" ")[0]) for a in audit] == [
            ("reopen_payout", "needs_invoice"),
            ("reopen_payout", "refused:"),
        ]
        assert (await second.job(job_ev.id)).state == "releasing"

        async def asked_again() -> list[dict]:
            return [e for e in await _claimables(second, job_ev.id, payee) if _reason(e) == "claim_reopened"]

        reopened = await wait_until(asked_again, 15, "the reward claimable of the reopened claim", interval=0.3)
        assert len(reopened) == 1 and int(tag(reopened[0], "claim_by")[1]) > claim_by

        # The payee gives an invoice now: paid exactly once, on its node; the job closes again.
        (fresh,) = await second.payouts(job_ev.id)
        hashes = await second.claim_rewards(job_ev.id, [provider])
        await second.wait_state(job_ev.id, "closed", timeout=60)
        inv = await regtest.payee.lookup_invoice(hashes[payee])
        assert inv.state == InvoiceState.SETTLED and inv.amt_paid_msat == fresh.amount_msat
        async with second.sessions() as s:
            sent = (
                await s.scalars(
                    select(PayoutAttempt).where(
                        PayoutAttempt.payout_id == payout.id, PayoutAttempt.state == AttemptState.SUCCEEDED
                    )
                )
            ).all()
            unclaimed = (await ledger.balances(s, prefix=accounts.UNCLAIMED)).get(accounts.UNCLAIMED, 0)
        assert len(sent) == 1 and unclaimed == 0
        await second.check_ledger(job_ev.id, closed=True)
