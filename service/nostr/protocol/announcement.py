"""Handler announcement (kind 31990, NIP-89, by the escrow): protocol.md §1.

``["d", <identifier>]``, ``["k", "<job kind>"]``, content = the terms as a JSON object
(keys sorted, compact): ``name``, ``about``, every :class:`~.terms.EscrowTerms` field,
``modes`` as a sorted list and ``network`` as its name. Parsers ignore unknown JSON
keys (forward compatibility) and refuse missing or mistyped ones, except the terms added later
(``claim_window_s``: absent is 0, no window announced; ``appeal_window_s`` and
``appeal_fee_msat``: absent is 0, no appeals). ``validators`` (optional) is
the operator's validator pool: ``[{"pubkey": <hex>, "name": <text>}, …]``.

Providers publish kind 31990 too (their capabilities, :mod:`.capability`, §1a): such an event is
refused here as ``provider_capabilities`` before anything else is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from service.nostr.nip01 import Event

from .capability import is_capability_event
from .errors import CodecError, CodecErrorReason
from .fields import Template, arity, check_text, expect_kind, is_hex64, parse_uint, placeholder_event, single, template
from .terms import KIND_ANNOUNCEMENT, KIND_JOB_REQUEST, EscrowTerms, Mode, Network

R = CodecErrorReason

_INT_TERMS = (
    "fee_base_msat",
    "fee_ppm",
    "min_bid_msat",
    "max_bid_msat",
    "max_validators",
    "max_shards",
    "min_results_window_s",
    "max_job_duration_s",
    "max_hold_seconds",
    "min_payout_msat",
    "max_results_per_shard",
    "routing_fee_ppm",
)
#: Terms added after the first announcements: absent means their default (older announcements
#: still parse); present, they must be integers like the others.
_OPTIONAL_INT_TERMS = {"claim_window_s": 0, "appeal_window_s": 0, "appeal_fee_msat": 0}


MAX_POOL = 64


@dataclass(frozen=True, slots=True)
class PoolValidator:
    """A validator the operator vouches for (``{"pubkey": <hex>, "name": <text>}`` in ``validators``)."""

    pubkey: str
    name: str


@dataclass(frozen=True, slots=True)
class Announcement:
    d: str
    name: str
    about: str
    terms: EscrowTerms
    job_kind: int = KIND_JOB_REQUEST
    validator_pool: tuple[PoolValidator, ...] = ()  # the escrow's validator pool (protocol.md §1)


def _read_pool(body: dict[str, Any]) -> tuple[PoolValidator, ...]:
    raw = body.get("validators", [])
    if type(raw) is not list or len(raw) > MAX_POOL:
        raise CodecError(R.INVALID_POOL, f"validators must be a list of at most {MAX_POOL} objects")
    pool: list[PoolValidator] = []
    for item in raw:
        if type(item) is not dict or not is_hex64(item.get("pubkey")) or type(item.get("name")) is not str:
            raise CodecError(R.INVALID_POOL, "each pool validator is {pubkey: 64 hex, name: text}")
        check_text(item["name"], R.INVALID_POOL, "pool validator name", 64)
        if any(v.pubkey == item["pubkey"] for v in pool):
            raise CodecError(R.INVALID_POOL, "a pool validator is listed twice")
        pool.append(PoolValidator(item["pubkey"], item["name"]))
    return tuple(pool)


def _bad(message: str) -> CodecError:
    return CodecError(R.INVALID_ANNOUNCEMENT, message)


def _terms_json(announcement: Announcement) -> str:
    terms = announcement.terms
    body: dict[str, Any] = {name: getattr(terms, name) for name in (*_INT_TERMS, *_OPTIONAL_INT_TERMS)}
    body.update(
        name=announcement.name,
        about=announcement.about,
        network=str(terms.network),
        modes=sorted(str(mode) for mode in terms.modes),
    )
    if announcement.validator_pool:
        body["validators"] = [{"pubkey": v.pubkey, "name": v.name} for v in announcement.validator_pool]
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def parse_announcement(event: Event) -> Announcement:
    expect_kind(event, KIND_ANNOUNCEMENT)
    if is_capability_event(event):
        raise CodecError(R.PROVIDER_CAPABILITIES, "a provider's capability event (§1a), not an escrow's announcement")
    d = single(event.tags, "d", R.INVALID_ANNOUNCEMENT)
    k = single(event.tags, "k", R.INVALID_ANNOUNCEMENT)
    assert d is not None and k is not None
    arity(d, 2, 2, R.INVALID_ANNOUNCEMENT)
    arity(k, 2, 2, R.INVALID_ANNOUNCEMENT)
    check_text(d[1], R.INVALID_ANNOUNCEMENT, "d identifier", 256, empty=True)
    job_kind = parse_uint(k[1], R.INVALID_ANNOUNCEMENT, "k", 65535)
    try:
        body = json.loads(event.content)
    except (ValueError, RecursionError):
        raise _bad("content is not JSON") from None
    if not isinstance(body, dict):
        raise _bad("content must be a JSON object")
    values: dict[str, Any] = {}
    for name in _INT_TERMS:
        value = body.get(name)
        if type(value) is not int:
            raise _bad(f"{name} must be an integer")
        values[name] = value
    for name, default in _OPTIONAL_INT_TERMS.items():
        value = body.get(name, default)
        if type(value) is not int:
            raise _bad(f"{name} must be an integer")
        values[name] = value
    for name in ("name", "about", "network"):
        if type(body.get(name)) is not str:
            raise _bad(f"{name} must be a string")
    modes = body.get("modes")
    if type(modes) is not list or not all(type(m) is str for m in modes) or len(set(modes)) != len(modes):
        raise _bad("modes must be a list of distinct strings")
    try:
        terms = EscrowTerms(modes=frozenset(Mode(m) for m in modes), network=Network(body["network"]), **values)
    except ValueError as exc:
        raise _bad(f"inconsistent terms: {exc}") from None
    check_text(body["name"], R.INVALID_ANNOUNCEMENT, "name", 256)
    check_text(body["about"], R.INVALID_ANNOUNCEMENT, "about", 4096, empty=True)
    return Announcement(
        d=d[1],
        name=body["name"],
        about=body["about"],
        terms=terms,
        job_kind=job_kind,
        validator_pool=_read_pool(body),
    )


def build_announcement(announcement: Announcement) -> Template:
    result = template(
        KIND_ANNOUNCEMENT, [("d", announcement.d), ("k", str(announcement.job_kind))], _terms_json(announcement)
    )
    if parse_announcement(placeholder_event(result)) != announcement:
        raise ValueError("the announcement does not round-trip: check its fields' types")
    return result
