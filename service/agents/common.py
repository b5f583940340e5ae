"""What the three agents share: keys, the escrow's identity and terms, finding providers by
their capabilities, reading the escrow's feedback, and claiming a reward (providers and
validators are both payees).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from service.lightning.client import InvoiceState, LndClient
from service.nostr.keys import load_or_create
from service.nostr.nip01 import Event, SecretKey, sign_event
from service.nostr.protocol import (
    CAPABILITY_TOPIC,
    KIND_ANNOUNCEMENT,
    KIND_FEEDBACK,
    MAX_MSAT,
    Announcement,
    Capabilities,
    CodecError,
    DeadlineExtension,
    EscrowFeedback,
    EscrowTerms,
    FallbackStarted,
    JobRequest,
    Mode,
    Network,
    Refunded,
    RewardClaimable,
    RewardPaid,
    ValidationComplete,
    build_payee_invoice,
    parse_announcement,
    parse_capabilities,
    parse_escrow_feedback,
    parse_job_request,
)
from service.nostr.protocol.capability import CAPABILITY_D

from .relay import Relays, Subscription

log = logging.getLogger("fedstr_escrow.agents")

#: ``progress(phase, message)``: how agents report what they do (the demo prints it).
Progress = Callable[[str, str], None]
DEFAULT_KEY_DIR = Path("~/.fedstr/agents")


def no_progress(phase: str, message: str) -> None:
    log.info("%s: %s", phase, message)


class AgentError(RuntimeError):
    """The round cannot go on (refused request, refund, timeout, unusable data)."""


def key_path(key_dir: Path | str, role: str, name: str) -> Path:
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise ValueError("agent names are letters, digits, '-', '_' and '.'")
    return Path(key_dir).expanduser() / f"{role}-{name}.key"


def load_key(key_dir: Path | str, role: str, name: str) -> SecretKey:
    """The agent's key, ``<key_dir>/<role>-<name>.key`` (created with mode 0600 on first use)."""
    return load_or_create(key_path(key_dir, role, name))


# ----------------------------------------------------------------------- the escrow


@dataclass(frozen=True, slots=True)
class EscrowInfo:
    pubkey: str
    relays: tuple[str, ...]
    network: str
    terms: dict = field(default_factory=dict)


async def escrow_info(service_url: str, *, timeout: float = 10.0) -> EscrowInfo:
    """``GET <service>/v1/info``: the escrow's key, relays, network and terms."""
    async with httpx.AsyncClient(timeout=timeout, trust_env=False) as http:
        r = await http.get(f"{service_url.rstrip('/')}/v1/info")
        r.raise_for_status()
        body = r.json()
    pubkey = body.get("pubkey")
    if not isinstance(pubkey, str) or len(pubkey) != 64:
        raise AgentError("the escrow's /v1/info has no valid pubkey")
    return EscrowInfo(
        pubkey=pubkey,
        relays=tuple(r for r in body.get("relays", []) if isinstance(r, str)),
        network=str(body.get("network", "")),
        terms=dict(body.get("terms") or {}),
    )


async def escrow_announcement(relays: Relays, escrow: str) -> Announcement | None:
    """The escrow's newest valid NIP-89 announcement (kind 31990), if a relay has it."""
    try:
        found = await relays.query({"kinds": [KIND_ANNOUNCEMENT], "authors": [escrow]})
    except Exception:  # noqa: BLE001 - the announcement is optional knowledge
        return None
    for event in sorted(found, key=lambda e: e.created_at, reverse=True):
        try:
            return parse_announcement(event)
        except CodecError:
            continue
    return None


async def escrow_terms(relays: Relays, escrow: str) -> EscrowTerms | None:
    """The terms from the escrow's newest announcement, if a relay has it."""
    announcement = await escrow_announcement(relays, escrow)
    return None if announcement is None else announcement.terms


async def escrow_pool(relays: Relays, escrow: str) -> frozenset[str] | None:
    """The keys of the escrow's announced validator pool (§1); ``None`` when no announcement is found."""
    announcement = await escrow_announcement(relays, escrow)
    return None if announcement is None else frozenset(v.pubkey for v in announcement.validator_pool)


# ------------------------------------------------------------------ provider discovery


@dataclass(frozen=True, slots=True)
class FoundProvider:
    pubkey: str
    capabilities: Capabilities
    created_at: int


async def provider_capabilities(relays: Relays, *, since: int | None = None) -> dict[str, FoundProvider]:
    """Every provider's newest capability event (protocol.md §1a) on the relays, by pubkey.

    Newest = greatest ``created_at``, then the lowest id (NIP-01's rule for replaceable events).
    A provider whose newest event does not parse is left out: its last word is unreadable, and an
    older event it replaced is not its word any more. The relay client verifies every signature."""
    flt: dict = {"kinds": [KIND_ANNOUNCEMENT], "#t": [CAPABILITY_TOPIC]}
    if since is not None:
        flt["since"] = since
    newest: dict[str, Event] = {}
    for event in await relays.query(flt):
        if not any(tag[:2] == ("d", CAPABILITY_D) for tag in event.tags):
            continue  # another replaceable slot of the same key: not its capabilities
        held = newest.get(event.pubkey)
        if held is None or (event.created_at, _negated(event.id)) > (held.created_at, _negated(held.id)):
            newest[event.pubkey] = event
    found: dict[str, FoundProvider] = {}
    for pubkey, event in newest.items():
        try:
            found[pubkey] = FoundProvider(pubkey, parse_capabilities(event), event.created_at)
        except CodecError as exc:
            log.info("provider %s: capabilities refused: %s", pubkey[:12], exc)
    return found


def _negated(event_id: str) -> tuple[int, ...]:
    """An order key under which the lowest id is the greatest."""
    return tuple(-b for b in bytes.fromhex(event_id))


def choose_providers(
    found: Collection[FoundProvider],
    *,
    task: str,
    escrow: str,
    max_price_msat_per_shard: int | None = None,
    hardware: str | None = None,
    code_sha256: str | None = None,
    exclude: Collection[str] = (),
) -> list[FoundProvider]:
    """The providers of ``found`` that run ``task`` (with code ``code_sha256``, when given), work
    with ``escrow`` (no ``escrows`` list: any), ask at most ``max_price_msat_per_shard`` and have
    exactly ``hardware`` (when given); ``exclude`` (the customer, its validators) never. Cheapest
    first, then by pubkey: the same relays' answer always gives the same choice."""
    chosen = []
    for p in found:
        caps, offer = p.capabilities, p.capabilities.offer(task)
        if offer is None or p.pubkey in exclude or p.pubkey == escrow or not caps.works_with(escrow):
            continue
        if code_sha256 is not None and offer.code_sha256 != code_sha256:
            continue
        if max_price_msat_per_shard is not None and caps.price_msat_per_shard > max_price_msat_per_shard:
            continue
        if hardware is not None and caps.hardware != hardware:
            continue
        chosen.append(p)
    return sorted(chosen, key=lambda p: (p.capabilities.price_msat_per_shard, p.pubkey))


async def find_providers(
    relays: Relays,
    *,
    task: str,
    escrow: str,
    count: int,
    max_price_msat_per_shard: int | None = None,
    hardware: str | None = None,
    code_sha256: str | None = None,
    exclude: Collection[str] = (),
    since: int | None = None,
) -> list[FoundProvider]:
    """``count`` providers from their capability events (:func:`choose_providers`'s order), or
    :class:`AgentError` saying how many were found. ``since``: only events published since then
    (a provider republishes at start: an old event may be a provider long gone)."""
    if count < 1:
        raise ValueError("count must be at least 1")
    found = await provider_capabilities(relays, since=since)
    chosen = choose_providers(
        found.values(),
        task=task,
        escrow=escrow,
        max_price_msat_per_shard=max_price_msat_per_shard,
        hardware=hardware,
        code_sha256=code_sha256,
        exclude=exclude,
    )
    if len(chosen) < count:
        wanted = (
            f"task {task!r}"
            + (f", at most {max_price_msat_per_shard} msat per shard" if max_price_msat_per_shard is not None else "")
            + (f", hardware {hardware!r}" if hardware else "")
        )
        raise AgentError(
            f"found {len(chosen)} provider(s) for {wanted} and this escrow "
            f"(of {len(found)} announcing capabilities), need {count}"
        )
    return chosen[:count]


async def discover_providers(
    relays: Relays,
    *,
    task: str,
    escrow: str,
    count: int,
    max_price_msat_per_shard: int | None = None,
    hardware: str | None = None,
    code_sha256: str | None = None,
    exclude: Collection[str] = (),
    since: int | None = None,
) -> list[str]:
    """The pubkeys of :func:`find_providers`'s choice."""
    found = await find_providers(
        relays,
        task=task,
        escrow=escrow,
        count=count,
        max_price_msat_per_shard=max_price_msat_per_shard,
        hardware=hardware,
        code_sha256=code_sha256,
        exclude=exclude,
        since=since,
    )
    return [p.pubkey for p in found]


#: Terms that accept any well-formed request: agents read jobs with these (the escrow applies its own).
PERMISSIVE_TERMS = EscrowTerms(
    fee_base_msat=0,
    fee_ppm=0,
    min_bid_msat=1,
    max_bid_msat=MAX_MSAT,
    max_validators=1_000,
    max_shards=1_000_000,
    min_results_window_s=0,
    max_job_duration_s=10 * 365 * 86_400,
    modes=frozenset({Mode.HOLD, Mode.CUSTODIAL}),
    network=Network.REGTEST,
    max_hold_seconds=10 * 365 * 86_400,
)


def read_job(event: Event, escrow: str, terms: EscrowTerms | None = None) -> JobRequest:
    """A job request as an agent reads it (shape and roles; the escrow judges terms and time)."""
    return parse_job_request(event, escrow_pubkey=escrow, terms=terms or PERMISSIVE_TERMS, now=event.created_at)


def feedback_filter(escrow: str, job_id: str) -> dict:
    return {"kinds": [KIND_FEEDBACK], "authors": [escrow], "#e": [job_id]}


def escrow_feedback(event: Event, escrow: str, job_id: str) -> EscrowFeedback | None:
    """The escrow's kind-7000 about ``job_id`` in ``event``, parsed; ``None`` for anything else."""
    if event.pubkey != escrow or event.kind != KIND_FEEDBACK:
        return None
    try:
        fb = parse_escrow_feedback(event)
    except CodecError:
        return None
    return fb if getattr(fb, "job_id", None) == job_id else None


# -------------------------------------------------------------------------- payees


@dataclass
class Reward:
    """What a payee got for one job (``amount_msat`` 0: nothing was due)."""

    job_id: str
    amount_msat: int = 0
    paid: bool = False
    payment_hash: str | None = None
    preimage: str | None = None
    routing_fee_msat: int | None = None  # paid by the escrow
    invoice_settled: bool | None = None  # checked on our own node, when we have one
    why: str = ""


class Payee:
    """Claims rewards: answers "reward claimable" with an invoice of its own LND node, or with one
    fetched from its lightning address (``lud16``), and waits for "reward paid"."""

    key: SecretKey
    escrow: str
    relays: Relays
    lnd: LndClient | None
    lud16: str | None
    progress: Progress
    name: str
    invoice_expiry: int = 3600
    allow_private_lnurl: bool = False
    network: str | None = None

    async def _invoice(self, amount_msat: int, job_id: str) -> tuple[str, str]:
        """``(bolt11, payment hash hex)`` for exactly ``amount_msat``."""
        if self.lnd is not None:
            inv = await self.lnd.add_invoice(
                amount_msat, memo=f"fedstr reward {job_id[:12]} {self.name}", expiry=self.invoice_expiry
            )
            return inv.payment_request, inv.payment_hash.hex()
        if self.lud16:
            from service.lightning.lnurl import fetch_invoice

            fetched = await fetch_invoice(
                self.lud16, amount_msat, allow_private=self.allow_private_lnurl, network=self.network
            )
            return fetched.bolt11, fetched.payment_hash.hex()
        raise AgentError("no way to receive money: give an LND node or a lud16 address")

    async def collect_reward(self, sub: Subscription, job_id: str, *, timeout: float) -> Reward:
        """Wait for our reward on ``job_id`` (``sub`` follows the job's feedback) and claim it."""
        me = self.key.public_key_hex
        reward = Reward(job_id=job_id)

        def ours(event: Event) -> EscrowFeedback | None:
            fb = escrow_feedback(event, self.escrow, job_id)
            if isinstance(fb, (RewardClaimable, RewardPaid)) and fb.payee == me:
                return fb
            return fb if isinstance(fb, Refunded) else None

        try:
            fb = await sub.wait_for(ours, timeout)
        except TimeoutError:
            reward.why = "no reward announced"
            return reward
        if isinstance(fb, Refunded):
            reward.why = f"the job was refunded ({fb.reason})"
            return reward
        expected_hash = None
        if isinstance(fb, RewardClaimable):
            reward.amount_msat = fb.amount_msat
            bolt11, expected_hash = await self._invoice(fb.amount_msat, job_id)
            ev = sign_event(
                self.key,
                *build_payee_invoice(job_id=job_id, escrow=self.escrow, amount_msat=fb.amount_msat, bolt11=bolt11),
            )
            await self.relays.publish(ev)
            self.progress("payout", f"{self.name}: claimed {fb.amount_msat} msat with an invoice")

            def paid(event: Event) -> RewardPaid | None:
                p = escrow_feedback(event, self.escrow, job_id)
                return p if isinstance(p, RewardPaid) and p.payee == me else None

            try:
                fb = await sub.wait_for(paid, timeout)
            except TimeoutError:
                reward.why = "claimed, but no payment receipt in time"
                return reward
        assert isinstance(fb, RewardPaid)
        proof = fb.payment
        reward.amount_msat = reward.amount_msat or proof.amount_msat
        reward.payment_hash, reward.preimage, reward.routing_fee_msat = (
            proof.payment_hash,
            proof.preimage,
            proof.fee_msat,
        )
        if expected_hash is not None and proof.payment_hash != expected_hash:
            reward.why = "the receipt names another invoice than ours"
            return reward
        if self.lnd is not None and expected_hash is not None:
            inv = await self.lnd.lookup_invoice(bytes.fromhex(expected_hash))
            reward.invoice_settled = inv.state == InvoiceState.SETTLED and inv.amt_paid_msat >= reward.amount_msat
            if not reward.invoice_settled:
                reward.why = f"the receipt is there but our invoice is {inv.state.name}"
                return reward
        reward.paid = True
        self.progress(
            "payout", f"{self.name}: received {proof.amount_msat} msat (escrow paid {proof.fee_msat} msat routing)"
        )
        return reward


async def wait_validation(
    sub: Subscription, escrow: str, job_id: str, *, deadline: int, margin: float
) -> ValidationComplete | Refunded:
    """The job's verdicts, or its refund; given up ``margin`` seconds after the validation deadline
    in force (the request's, or where the escrow moved it after an outage: protocol.md §4a; or a
    fallback round's, when the escrow started one: §6b)."""

    def done(event: Event) -> ValidationComplete | Refunded | None:
        fb = escrow_feedback(event, escrow, job_id)
        return fb if isinstance(fb, (ValidationComplete, Refunded)) else None

    def moved(event: Event) -> float | None:
        fb = escrow_feedback(event, escrow, job_id)
        if isinstance(fb, DeadlineExtension):
            later = fb.fallback_deadline if fb.fallback_deadline is not None else fb.validation_deadline
            return None if later is None else later + margin
        if isinstance(fb, FallbackStarted):  # the decision waits for the fallback round
            return fb.deadline + margin
        return None

    return await sub.wait_for(done, seconds_until(deadline, margin), extend=moved)


def seconds_until(ts: int, margin: float = 0.0) -> float:
    return max(1.0, ts - time.time() + margin)
